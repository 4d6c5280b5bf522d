//! Concurrent attempts with one key: exactly one executes.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)] // test code

use e2e::{Stack, StackOptions};
use serde_json::{json, Value};

/// Twenty requests with one key at once, the first holder taking 300 ms upstream; returns
/// (first executions, 409s, replays) and checks the service ran once.
async fn twenty_at_once(stack: &Stack, key: &str) -> (u32, u32, u32) {
    let order = json!({"sku": "RACE", "qty": 1});
    // The first holder takes 300 ms upstream, so the others arrive while it runs.
    let attempts = (0..20).map(|_| {
        stack
            .post_order(Some(key), &order)
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
    assert_eq!(stack.executions_of(key).await, 1);
    (created, conflicts, replays)
}

#[tokio::test]
async fn twenty_concurrent_same_key_requests_execute_once_and_the_others_get_its_order() {
    // The default `in_progress_wait` (5 s): the others wait for the first one's answer.
    let stack = Stack::start().await;
    let (_, conflicts, replays) = twenty_at_once(&stack, "race-1").await;
    assert_eq!((conflicts, replays), (0, 19), "every other caller gets the order");
}

#[tokio::test]
async fn without_a_wait_the_others_get_409_and_the_service_still_runs_once() {
    let stack = Stack::start_with(StackOptions::plugin(json!({"in_progress_wait": "0s"}))).await;
    let (_, conflicts, _) = twenty_at_once(&stack, "race-2").await;
    assert!(conflicts >= 1, "some attempts overlapped the holder");
}
