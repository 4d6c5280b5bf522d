//! The store is down, slow or killed: never a duplicate execution.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)] // test code

use e2e::{Stack, StackOptions};
use serde_json::{json, Value};

#[tokio::test]
async fn store_down_fails_closed_with_503_and_never_forwards() {
    let mut stack = Stack::start().await;
    stack.kill_store();
    let response = stack
        .post_order(Some("down-1"), &json!({"sku": "A"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "5");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "IDEMPOTENCY_STORAGE_UNAVAILABLE");
    assert_eq!(body["details"]["retryAfter"], 5);
    assert_eq!(stack.executions().await["total"], 0);

    // Back up: the same key executes normally, once.
    stack.restart_store().await;
    let response = stack
        .post_order(Some("down-1"), &json!({"sku": "A"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    assert_eq!(stack.executions_of("down-1").await, 1);
}

#[tokio::test]
async fn store_down_passes_through_untracked_when_failure_mode_is_open() {
    let mut stack = Stack::start_with(StackOptions::plugin(json!({"failure_mode": "open"}))).await;
    stack.kill_store();
    let response = stack
        .post_order(Some("open-1"), &json!({"sku": "A"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    assert_eq!(stack.executions_of("open-1").await, 1);
    let stats = stack.envoy_metrics().await;
    assert!(
        e2e::metric_sum(&stats, "idempotency_fail_open_total") >= 1.0,
        "{stats}"
    );
}

#[tokio::test]
async fn completed_records_survive_a_kill_9_of_the_store() {
    let mut stack = Stack::start().await;
    let order = json!({"sku": "DURABLE"});
    let first = stack.post_order(Some("durable-1"), &order).send().await.unwrap();
    assert_eq!(first.status(), 201);
    let first_body = first.text().await.unwrap();

    stack.kill_store(); // SIGKILL: no shutdown hook runs
    stack.restart_store().await;

    let again = stack.post_order(Some("durable-1"), &order).send().await.unwrap();
    assert_eq!(again.status(), 201);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.text().await.unwrap(), first_body);
    assert_eq!(stack.executions_of("durable-1").await, 1);
}

/// A store acquire for `key` (what the writers and the check after the restart both send).
fn acquire_body(key: &str) -> Value {
    json!({"service": "orders", "scope": "", "key": key, "fingerprint": "f", "method": "POST",
        "path": "/o", "lock_timeout_ms": 600_000, "retention_ms": 3_600_000})
}

/// POST `body` to the store's `path` with the test token.
async fn store_post(
    client: &reqwest::Client,
    url: &str,
    path: &str,
    body: &Value,
) -> reqwest::Result<reqwest::Response> {
    client
        .post(format!("{url}{path}"))
        .bearer_auth(e2e::STORE_TOKEN)
        .json(body)
        .send()
        .await
}

/// One writer's view of its key after the store came back.
#[derive(Debug, PartialEq, Eq)]
enum Acknowledged {
    /// The acquire was acknowledged (the lock must have survived).
    Lock,
    /// The complete was acknowledged (the response must have survived).
    Response,
}

/// Send `calls` (path, body) to the store: alone when there is one and `batched` is false, else
/// in one `/v1/batch`. Each call's status and body, or `None` when the store could not answer
/// (it was killed).
async fn send_calls(
    client: &reqwest::Client,
    url: &str,
    calls: &[(&str, Value)],
    batched: bool,
) -> Option<Vec<(u16, Value)>> {
    if let ([(path, body)], false) = (calls, batched) {
        let reply = store_post(client, url, path, body).await.ok()?;
        let status = reply.status().as_u16();
        return Some(vec![(status, reply.json::<Value>().await.ok()?)]);
    }
    let calls: Vec<Value> = calls
        .iter()
        .map(|(path, body)| json!({"path": path, "body": body}))
        .collect();
    let reply = store_post(client, url, "/v1/batch", &json!({"calls": calls}))
        .await
        .ok()?;
    if reply.status() != 200 {
        return None;
    }
    let replies: Value = reply.json().await.ok()?;
    replies["replies"]
        .as_array()?
        .iter()
        .map(|r| Some((u16::try_from(r["status"].as_u64()?).ok()?, r["body"].clone())))
        .collect()
}

/// 64 writers hammer the store with acquire + complete pairs (so every group commit holds many
/// operations), each alone or, with `per_batch` > 1, that many per `/v1/batch` (the filter's
/// way; a batch's writes share one commit); the store is SIGKILLed mid-stream and restarted on
/// the same data. Every write the store acknowledged must be there: no acknowledged lock comes
/// back free, no acknowledged response comes back missing.
async fn acknowledged_writes_survive_a_kill_9_inside_large_batches(engine: &str, per_batch: usize) {
    let dir = tempfile::tempdir().unwrap();
    let port = e2e::free_port();
    let data = dir.path().join("store-data");
    let args = vec![format!("--embedded-engine={engine}")];
    let url = format!("http://127.0.0.1:{port}");
    let mut store = e2e::spawn_store(dir.path(), port, &data, &args, "store.log");
    e2e::wait_ready(
        &format!("{url}/readyz"),
        &mut store,
        std::time::Duration::from_secs(30),
    )
    .await;

    let acknowledged = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(String, Acknowledged)>::new()));
    let writers: Vec<_> = (0..64)
        .map(|w| {
            let (url, acknowledged) = (url.clone(), acknowledged.clone());
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                let batched = per_batch > 1;
                for n in 0.. {
                    let keys: Vec<String> = (0..per_batch).map(|k| format!("batch-{w}-{n}-{k}")).collect();
                    let acquires: Vec<(&str, Value)> = keys
                        .iter()
                        .map(|key| ("/v1/acquire", acquire_body(key)))
                        .collect();
                    let Some(locks) = send_calls(&client, &url, &acquires, batched).await else {
                        return; // the store was killed
                    };
                    let mut completes = Vec::new();
                    for (key, (_, lock)) in keys.iter().zip(&locks) {
                        assert_eq!(lock["outcome"], "acquired", "{lock}");
                        acknowledged
                            .lock()
                            .unwrap()
                            .push((key.clone(), Acknowledged::Lock));
                        completes.push((
                            "/v1/complete",
                            json!({"service": "orders", "scope": "", "key": key,
                            "record_id": lock["record_id"], "fencing_token": lock["fencing_token"],
                            "attempt_id": lock["attempt_id"], "retention_ms": 3_600_000,
                            "response": {"status": 201, "headers": [], "body": "eyJvayI6dHJ1ZX0="}}),
                        ));
                    }
                    let Some(replies) = send_calls(&client, &url, &completes, batched).await else {
                        return; // the store was killed
                    };
                    for (key, (status, _)) in keys.iter().zip(replies) {
                        if status == 200 {
                            acknowledged
                                .lock()
                                .unwrap()
                                .push((key.clone(), Acknowledged::Response));
                        }
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    store.kill(); // SIGKILL while batches are in flight
    for writer in writers {
        writer.await.unwrap();
    }
    let acknowledged = std::mem::take(&mut *acknowledged.lock().unwrap());
    let responses = acknowledged
        .iter()
        .filter(|(_, a)| *a == Acknowledged::Response)
        .count();
    assert!(
        responses > 500,
        "the load was too light to fill batches: {responses} pairs"
    );

    let mut store = e2e::spawn_store(dir.path(), port, &data, &args, "store-after.log");
    e2e::wait_ready(
        &format!("{url}/readyz"),
        &mut store,
        std::time::Duration::from_secs(30),
    )
    .await;
    let client = reqwest::Client::new();
    let mut state: std::collections::HashMap<String, Acknowledged> = std::collections::HashMap::new();
    for (key, what) in acknowledged {
        let strongest = state.entry(key).or_insert(Acknowledged::Lock);
        if what == Acknowledged::Response {
            *strongest = Acknowledged::Response;
        }
    }
    for (key, what) in &state {
        let answer: Value = store_post(&client, &url, "/v1/acquire", &acquire_body(key))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        match what {
            Acknowledged::Response => assert_eq!(
                answer["outcome"], "completed",
                "{key}: acknowledged response lost: {answer}"
            ),
            // The complete may have reached the disk without its answer reaching the writer.
            Acknowledged::Lock => assert!(
                answer["outcome"] == "in_progress" || answer["outcome"] == "completed",
                "{key}: acknowledged lock lost: {answer}"
            ),
        }
    }
    eprintln!(
        "{engine}: {} keys acknowledged before the kill ({responses} responses), all present after restart",
        state.len()
    );
}

#[tokio::test]
async fn acknowledged_writes_survive_a_kill_9_inside_large_batches_fjall() {
    acknowledged_writes_survive_a_kill_9_inside_large_batches("fjall", 1).await;
}

#[tokio::test]
async fn acknowledged_writes_survive_a_kill_9_inside_proxy_batches_fjall() {
    acknowledged_writes_survive_a_kill_9_inside_large_batches("fjall", 8).await;
}

#[tokio::test]
async fn acknowledged_writes_survive_a_kill_9_inside_large_batches_redb() {
    acknowledged_writes_survive_a_kill_9_inside_large_batches("redb", 1).await;
}
