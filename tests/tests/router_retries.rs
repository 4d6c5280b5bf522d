//! Envoy's router never sends a tracked request twice, from the client's side: a caller's own
//! `x-envoy-*` retry headers, and a gateway route's `retry_policy` with an upstream that does the
//! work and then resets, run the request once; the lock is kept (the retry is told the outcome
//! is unknown). Each test runs the same setup with `block_router_retries: false` too, and sees
//! the router run the request again: the hazard is real here, and the filter is what stops it.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use e2e::envoy_config::{bootstrap, Ports};
use e2e::{free_port, plugin_config, spawn_store, start_envoy, wait_ready};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn order() -> Value {
    json!({"customerId": "C-1", "items": [{"sku": "S-1", "quantity": 1}]})
}

/// Executions of one keyed POST whose caller, one Envoy treats as internal (its address is in
/// `internal_address_config`, with `use_remote_address`), asks Envoy to retry even a 201, three
/// times.
async fn executions_with_caller_retry_headers(block_router_retries: bool) -> u64 {
    let dir = tempfile::tempdir().unwrap();
    let demo_port = free_port();
    let (url, _store, _envoy) = envoy_in_front_of(dir.path(), demo_port, block_router_retries, |config| {
        let hcm = config
            .pointer_mut("/static_resources/listeners/0/filter_chains/0/filters/0/typed_config")
            .unwrap();
        hcm["use_remote_address"] = json!(true);
        // Envoy 1.40 trusts no address as internal unless told which.
        hcm["internal_address_config"] =
            json!({"cidr_ranges": [{"address_prefix": "127.0.0.1", "prefix_len": 32}]});
    })
    .await;
    let mut demo = e2e::spawn_demo(dir.path(), demo_port, free_port());
    wait_ready(
        &format!("http://127.0.0.1:{demo_port}/healthz"),
        &mut demo,
        Duration::from_secs(30),
    )
    .await;
    let client = reqwest::Client::new();
    let response = client
        .post(format!("{url}/api/v1/orders"))
        .header("Idempotency-Key", "retry-me")
        .header("x-envoy-retry-on", "retriable-status-codes")
        .header("x-envoy-retriable-status-codes", "201")
        .header("x-envoy-max-retries", "3")
        .json(&order())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let executions = e2e::demo_executions(&client, &format!("http://127.0.0.1:{demo_port}")).await;
    executions["byKey"]["retry-me"].as_u64().unwrap_or(0)
}

#[tokio::test]
async fn a_callers_retry_headers_cannot_make_envoy_run_a_tracked_request_twice() {
    assert_eq!(executions_with_caller_retry_headers(true).await, 1);
    assert_eq!(
        executions_with_caller_retry_headers(false).await,
        4,
        "without the filter's word, Envoy's router runs it again"
    );
}

/// An upstream that reads a request, does its work (counts it), then resets the connection
/// without answering.
async fn resetting_upstream() -> (u16, Arc<AtomicU64>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let executions = Arc::new(AtomicU64::new(0));
    let counted = executions.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let counted = counted.clone();
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buffer = [0u8; 4096];
                loop {
                    let Ok(n) = socket.read(&mut buffer).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    request.extend_from_slice(&buffer[..n]);
                    let text = String::from_utf8_lossy(&request);
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let length = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                            })
                            .unwrap_or(0);
                        if body.len() >= length {
                            break;
                        }
                    }
                }
                counted.fetch_add(1, Ordering::SeqCst);
                // The work is done; the answer never comes: a reset (RST), as a crashing
                // server's kernel sends.
                let _ = socket.flush().await;
                let _ = socket.set_zero_linger();
                drop(socket);
            });
        }
    });
    (port, executions)
}

/// A store and an Envoy with the test bootstrap (changed by `tweak`) in front of `upstream`;
/// returns (listener URL, store, envoy).
async fn envoy_in_front_of(
    dir: &std::path::Path,
    upstream: u16,
    block_router_retries: bool,
    tweak: impl FnOnce(&mut Value),
) -> (String, e2e::Proc, e2e::Proc) {
    let (listener, admin, store_port) = (free_port(), free_port(), free_port());
    let mut store = spawn_store(dir, store_port, &dir.join("store-data"), &[], "store.log");
    let ports = Ports {
        listener,
        admin,
        upstream,
        stores: vec![store_port],
        replays: Vec::new(),
    };
    let mut config: Value = serde_json::from_str(&bootstrap(
        &ports,
        &plugin_config(&json!({"block_router_retries": block_router_retries})),
    ))
    .unwrap();
    tweak(&mut config);
    let mut envoy = start_envoy(dir, &config.to_string(), "envoy.log");
    wait_ready(
        &format!("http://127.0.0.1:{store_port}/readyz"),
        &mut store,
        Duration::from_secs(30),
    )
    .await;
    wait_ready(
        &format!("http://127.0.0.1:{admin}/ready"),
        &mut envoy,
        Duration::from_secs(60),
    )
    .await;
    (format!("http://127.0.0.1:{listener}"), store, envoy)
}

/// A gateway-like Envoy whose route retries `5xx,reset,connect-failure` twice, in front of
/// `upstream`.
async fn gateway(
    dir: &std::path::Path,
    upstream: u16,
    block_router_retries: bool,
) -> (String, e2e::Proc, e2e::Proc) {
    envoy_in_front_of(dir, upstream, block_router_retries, |config| {
        let routes = config
            .pointer_mut("/static_resources/listeners/0/filter_chains/0/filters/0/typed_config/route_config/virtual_hosts/0/routes")
            .unwrap()
            .as_array_mut()
            .unwrap();
        let default_route = routes.last_mut().unwrap();
        default_route["route"]["retry_policy"] = json!({"retry_on": "5xx,reset,connect-failure", "num_retries": 2});
    })
    .await
}

#[tokio::test]
async fn a_route_retry_policy_cannot_run_a_request_again_after_the_upstream_did_the_work_and_reset() {
    let dir = tempfile::tempdir().unwrap();
    let (upstream, executions) = resetting_upstream().await;
    let (url, _store, _envoy) = gateway(dir.path(), upstream, true).await;
    let client = reqwest::Client::new();
    let post = || {
        client
            .post(format!("{url}/api/v1/orders"))
            .header("Idempotency-Key", "reset-1")
            .json(&order())
    };
    let first = post().send().await.unwrap();
    assert!(first.status().is_server_error(), "{}", first.status());
    assert_eq!(
        executions.load(Ordering::SeqCst),
        1,
        "one execution, no router retry"
    );
    // Retries, at once and until the record says why: 409, the lock is kept (it may have run).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let retry = post().send().await.unwrap();
        assert_eq!(retry.status(), 409, "the lock is kept: it may have run");
        let body: Value = retry.json().await.unwrap();
        if body["details"]["outcomeUnknown"] == true {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never marked outcome unknown: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(executions.load(Ordering::SeqCst), 1);

    // The same gateway without the filter's word: the router runs it three times.
    let dir = tempfile::tempdir().unwrap();
    let (upstream, executions) = resetting_upstream().await;
    let (url, _store, _envoy) = gateway(dir.path(), upstream, false).await;
    let _ = client
        .post(format!("{url}/api/v1/orders"))
        .header("Idempotency-Key", "reset-2")
        .json(&order())
        .send()
        .await
        .unwrap();
    assert_eq!(
        executions.load(Ordering::SeqCst),
        3,
        "the hazard the filter removes"
    );
}

#[tokio::test]
async fn a_request_that_never_reached_the_upstream_is_released_and_the_clients_retry_runs_once() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens on the upstream's port yet: every try's connection is refused.
    let upstream = free_port();
    let (url, _store, _envoy) = gateway(dir.path(), upstream, true).await;
    let client = reqwest::Client::new();
    let post = || {
        client
            .post(format!("{url}/api/v1/orders"))
            .header("Idempotency-Key", "refused-1")
            .json(&order())
    };
    let first = post().send().await.unwrap();
    assert_eq!(first.status(), 503, "Envoy could not connect");
    // The upstream comes up; the client's keyed retry is not told "in progress": it runs, once.
    let mut demo = e2e::spawn_demo(dir.path(), upstream, free_port());
    wait_ready(
        &format!("http://127.0.0.1:{upstream}/healthz"),
        &mut demo,
        Duration::from_secs(30),
    )
    .await;
    let retry = post().send().await.unwrap();
    assert_eq!(retry.status(), 201);
    let again = post().send().await.unwrap();
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let executions = e2e::demo_executions(&client, &format!("http://127.0.0.1:{upstream}")).await;
    assert_eq!(executions["byKey"]["refused-1"], 1);
}
