//! Concurrent attempts with one key: exactly one executes.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)] // test code

use e2e::Stack;
use serde_json::{json, Value};

#[tokio::test]
async fn twenty_concurrent_same_key_requests_execute_exactly_once() {
    let stack = Stack::start().await;
    let order = json!({"sku": "RACE", "qty": 1});
    // The first holder takes 300 ms upstream, so the others arrive while it runs.
    let attempts = (0..20).map(|_| {
        stack
            .post_order(Some("race-1"), &order)
            .header("x-demo-delay-ms", "300")
            .send()
    });
    let responses = futures::future::join_all(attempts).await;
    let mut created = 0;
    let mut conflicts = 0;
    let mut replays = 0;
    for response in responses {
        let response = response.unwrap();
        match response.status().as_u16() {
            201 if response.headers().contains_key("idempotent-replayed") => replays += 1,
            201 => created += 1,
            409 => {
                assert!(response.headers().contains_key("retry-after"));
                let body: Value = response.json().await.unwrap();
                assert_eq!(body["code"], "IDEMPOTENCY_CONCURRENT_REQUEST");
                assert!(body["details"]["retryAfter"].as_u64().unwrap() >= 1);
                conflicts += 1;
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(created, 1, "exactly one first execution");
    assert_eq!(created + conflicts + replays, 20);
    assert!(conflicts >= 1, "some attempts overlapped the holder");
    assert_eq!(stack.executions_of("race-1").await, 1);
}
