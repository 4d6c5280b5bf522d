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
