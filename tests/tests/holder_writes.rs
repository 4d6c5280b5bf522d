//! A holder write the store refuses is never silently lost, from the client's side: a response
//! the store will not take keeps its lock (retries are told the outcome is unknown, and the
//! service never runs again), and rotating the proxy's credential while 64 clients execute
//! loses no record (every executed key replays afterwards).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use e2e::envoy_config::{bootstrap, Ports};
use e2e::{
    free_port, plugin_config, spawn_demo, spawn_store, start_envoy, wait_all_ready, Stack, StackOptions,
};
use serde_json::{json, Value};

fn order() -> Value {
    json!({"customerId": "CUST-1", "items": [{"sku": "SKU-1", "quantity": 1}]})
}

#[tokio::test]
async fn a_response_the_store_refuses_to_record_keeps_its_lock_and_never_runs_again() {
    // The filter may buffer 4 MiB; this store takes requests of at most 1 MiB (an older store,
    // or a proxy in front of it with a smaller limit): the `complete` of a 2 MB response gets 413.
    let stack = Stack::start_with(StackOptions {
        plugin: json!({"max_response_size": 4_194_304}),
        store_args: vec!["--max-request-bytes".into(), "1048576".into()],
        ..StackOptions::default()
    })
    .await;
    let first = stack
        .post_order(Some("too-big-1"), &order())
        .header("x-demo-response-bytes", "2000000")
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 201, "the client gets the upstream's answer");
    assert!(first.bytes().await.unwrap().len() > 2_000_000);

    let deadline = Instant::now() + Duration::from_secs(5);
    let record = loop {
        let record = stack.record("too-big-1").await.unwrap();
        if !record["outcome_unknown"].is_null() || Instant::now() > deadline {
            break record;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(record["state"], "in_progress", "{record}");
    assert_eq!(
        record["outcome_unknown"]["reason"], "record_refused_by_store",
        "{record}"
    );

    // Retries, at once and a little later: told the outcome is unknown, never run again.
    for _ in 0..3 {
        let retry = stack
            .post_order(Some("too-big-1"), &order())
            .header("x-demo-response-bytes", "2000000")
            .send()
            .await
            .unwrap();
        assert_eq!(retry.status(), 409);
        let body: Value = retry.json().await.unwrap();
        assert_eq!(body["details"]["outcomeUnknown"], true, "{body}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(stack.executions_of("too-big-1").await, 1);
}

const OLD: &str = "proxy-token-old-0000001";
const NEW: &str = "proxy-token-new-0000001";

fn write_credentials(path: &Path, tokens: &[&str]) {
    let tokens: Vec<String> = tokens.iter().map(|t| format!("\"{t}\"")).collect();
    let text = format!(
        "credentials:\n  - {{name: orders-proxies, role: proxy, services: [orders], tokens: [{}]}}\n",
        tokens.join(", ")
    );
    let staged = path.with_extension("staged");
    std::fs::write(&staged, text).unwrap();
    std::fs::rename(&staged, path).unwrap();
}

/// The listener of a test bootstrap, as an LDS file Envoy watches.
fn write_listeners(path: &Path, listener: &Value) {
    let mut resource = listener.clone();
    resource["@type"] = json!("type.googleapis.com/envoy.config.listener.v3.Listener");
    let staged = path.with_extension("staged");
    std::fs::write(&staged, json!({"resources": [resource]}).to_string()).unwrap();
    std::fs::rename(&staged, path).unwrap();
}

fn hangup(store: &e2e::Proc) {
    std::process::Command::new("kill")
        .arg("-HUP")
        .arg(store.pid().unwrap().to_string())
        .status()
        .unwrap();
}

async fn lds_updates(client: &reqwest::Client, admin: &str) -> f64 {
    let text = e2e::get_text(
        client,
        &format!("{admin}/stats?filter=listener_manager.lds.update_success"),
    )
    .await;
    text.split(':')
        .nth(1)
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn rotating_the_proxy_credential_under_load_loses_no_record() {
    let dir = tempfile::tempdir().unwrap();
    let credentials = dir.path().join("credentials.yaml");
    write_credentials(&credentials, &[OLD]);
    let (store_port, demo_port, listener_port, admin_port) =
        (free_port(), free_port(), free_port(), free_port());
    let mut store = spawn_store(
        dir.path(),
        store_port,
        &dir.path().join("store-data"),
        &["--credentials".into(), credentials.display().to_string()],
        "store.log",
    );
    let mut demo = spawn_demo(dir.path(), demo_port, store_port);
    let ports = Ports {
        listener: listener_port,
        admin: admin_port,
        upstream: demo_port,
        stores: vec![store_port],
        replays: Vec::new(),
    };
    let plugin = |token: &str| plugin_config(&json!({"store_token": token}));
    // The listener comes from a file Envoy watches (LDS): a new plugin configuration is pushed
    // the way a control plane pushes it, and connections of the old one drain.
    let mut config: Value = serde_json::from_str(&bootstrap(&ports, &plugin(OLD))).unwrap();
    let old_listener = config["static_resources"]["listeners"][0].clone();
    config["static_resources"]["listeners"] = json!([]);
    let lds = dir.path().join("listeners.json");
    write_listeners(&lds, &old_listener);
    config["node"] = json!({"id": "rotation-test", "cluster": "e2e"});
    config["dynamic_resources"] = json!({"lds_config": {"path_config_source": {"path": lds.display().to_string()},
        "resource_api_version": "V3"}});
    let mut envoy = start_envoy(dir.path(), &config.to_string(), "envoy.log");
    wait_all_ready(
        (store_port, &mut store),
        (demo_port, &mut demo),
        (admin_port, &mut envoy),
    )
    .await;
    let url = format!("http://127.0.0.1:{listener_port}");
    let admin = format!("http://127.0.0.1:{admin_port}");
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()
        .unwrap();
    let until = Instant::now() + Duration::from_secs(8);
    let answers: Arc<Mutex<BTreeMap<String, u16>>> = Arc::default();
    let mut workers = Vec::new();
    for worker in 0..64 {
        let (client, url, answers) = (client.clone(), url.clone(), answers.clone());
        workers.push(tokio::spawn(async move {
            let mut n = 0;
            while Instant::now() < until {
                let key = format!("rot-{worker}-{n}");
                n += 1;
                let status = client
                    .post(format!("{url}/api/v1/orders"))
                    .header("Idempotency-Key", &key)
                    .json(&order())
                    .send()
                    .await
                    .map_or(0, |r| r.status().as_u16());
                answers.lock().unwrap().insert(key, status);
            }
        }));
    }

    // The rotation, while the clients execute: the store accepts both tokens; the proxies get
    // the new one; the store drops the old one at once (old connections may still be draining).
    tokio::time::sleep(Duration::from_secs(1)).await;
    write_credentials(&credentials, &[OLD, NEW]);
    hangup(&store);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = lds_updates(&client, &admin).await;
    let mut new_listener = old_listener.clone();
    let wasm = new_listener
        .pointer_mut("/filter_chains/0/filters/0/typed_config/http_filters/0")
        .unwrap();
    e2e::envoy_config::shipped_wasm_config(wasm)["configuration"]["value"] = json!(plugin(NEW).to_string());
    write_listeners(&lds, &new_listener);
    let deadline = Instant::now() + Duration::from_secs(10);
    while lds_updates(&client, &admin).await <= before {
        assert!(Instant::now() < deadline, "Envoy did not take the new listener");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    write_credentials(&credentials, &[NEW]);
    hangup(&store);
    for worker in workers {
        worker.await.unwrap();
    }
    // Writes that a refusal sent to the background get there.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let answers = answers.lock().unwrap().clone();
    let executed: Vec<&String> = answers
        .iter()
        .filter(|(_, s)| **s == 201)
        .map(|(k, _)| k)
        .collect();
    let others: Vec<(&String, &u16)> = answers.iter().filter(|(_, s)| **s != 201).collect();
    assert!(executed.len() > 200, "{} executed", executed.len());
    // Old connections kept running under the old configuration after its token was dropped;
    // none of their calls was refused, because every call presents the newest token.
    let store_metrics = e2e::get_text(&client, &format!("http://127.0.0.1:{store_port}/metrics")).await;
    let refused: f64 = store_metrics
        .lines()
        .filter(|l| l.starts_with("idempotency_store_requests_total{") && l.contains("unauthorized"))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum();
    assert_eq!(refused, 0.0, "calls the store refused during the rotation");
    assert!(
        others.is_empty(),
        "the rotation showed to {} clients, e.g. {:?}",
        others.len(),
        &others[..others.len().min(10)]
    );
    let executions = e2e::demo_executions(&client, &format!("http://127.0.0.1:{demo_port}")).await;
    let mut lost = Vec::new();
    for key in &executed {
        let retry = client
            .post(format!("{url}/api/v1/orders"))
            .header("Idempotency-Key", key.as_str())
            .json(&order())
            .send()
            .await
            .unwrap();
        let replayed = retry.headers().get("idempotent-replayed").is_some();
        if retry.status() != 201 || !replayed {
            lost.push(format!("{key}: {}", retry.status()));
        }
        assert_eq!(executions["byKey"][key.as_str()], 1, "{key} ran once");
    }
    assert!(
        lost.is_empty(),
        "{} of {} executed keys do not replay, e.g. {:?}",
        lost.len(),
        executed.len(),
        &lost[..lost.len().min(10)]
    );
}
