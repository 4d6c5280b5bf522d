//! A keyed request executes once; retries replay; changed parameters are refused.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)] // test code

use e2e::{metric_sum, Stack};
use serde_json::{json, Value};

#[tokio::test]
async fn first_execution_reaches_the_service_once_and_is_recorded() {
    let stack = Stack::start().await;
    let response = stack
        .post_order(Some("first-1"), &json!({"sku": "A", "qty": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    assert!(response.headers().get("idempotent-replayed").is_none());
    let body: Value = response.json().await.unwrap();
    assert!(body["orderId"].as_str().unwrap().starts_with("ORD-"));
    assert_eq!(stack.executions_of("first-1").await, 1);
    let record = stack.record("first-1").await.expect("record stored");
    assert_eq!(record["state"], "completed");
    assert_eq!(record["response"]["status"], 201);
}

#[tokio::test]
async fn retry_replays_the_same_status_headers_and_body_without_executing_again() {
    let stack = Stack::start().await;
    let order = json!({"sku": "A", "qty": 2});
    let first = stack.post_order(Some("replay-1"), &order).send().await.unwrap();
    let first_location = first.headers()["location"].clone();
    let first_body = first.text().await.unwrap();

    for _ in 0..3 {
        let again = stack.post_order(Some("replay-1"), &order).send().await.unwrap();
        assert_eq!(again.status(), 201);
        assert_eq!(again.headers()["idempotent-replayed"], "true");
        assert_eq!(again.headers()["location"], first_location);
        assert_eq!(again.headers()["content-type"], "application/json");
        assert_eq!(again.text().await.unwrap(), first_body);
    }
    assert_eq!(stack.executions_of("replay-1").await, 1);
    assert_eq!(
        metric_sum(&stack.store_metrics().await, "idempotency_hits_total"),
        3.0
    );
}

#[tokio::test]
async fn quoted_ietf_key_and_bare_key_name_the_same_record() {
    let stack = Stack::start().await;
    let order = json!({"sku": "Q"});
    stack.post_order(Some("quoted-1"), &order).send().await.unwrap();
    let again = stack
        .post_order(Some("\"quoted-1\""), &order)
        .send()
        .await
        .unwrap();
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(stack.executions_of("quoted-1").await, 1);
}

#[tokio::test]
async fn same_key_with_a_changed_body_is_refused_with_422() {
    let stack = Stack::start().await;
    stack
        .post_order(Some("mismatch-1"), &json!({"amount": 100}))
        .send()
        .await
        .unwrap();
    let response = stack
        .post_order(Some("mismatch-1"), &json!({"amount": 200}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 422);
    assert_eq!(response.headers()["content-type"], "application/problem+json");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "IDEMPOTENCY_PARAMETER_MISMATCH");
    assert_eq!(body["status"], 422);
    assert!(body["message"].as_str().unwrap().contains("different"));
    assert!(body["details"].is_object());
    assert_eq!(stack.executions_of("mismatch-1").await, 1);
}

#[tokio::test]
async fn put_and_delete_are_tracked_like_post() {
    let stack = Stack::start().await;
    for _ in 0..2 {
        let put = stack
            .client
            .put(format!("{}/api/v1/orders/ORD-1", stack.url))
            .header("Idempotency-Key", "put-1")
            .json(&json!({"qty": 3}))
            .send()
            .await
            .unwrap();
        assert_eq!(put.status(), 200);
    }
    for _ in 0..2 {
        let delete = stack
            .client
            .delete(format!("{}/api/v1/orders/ORD-1", stack.url))
            .header("Idempotency-Key", "delete-1")
            .send()
            .await
            .unwrap();
        assert_eq!(delete.status(), 200);
    }
    assert_eq!(stack.executions_of("put-1").await, 1);
    assert_eq!(stack.executions_of("delete-1").await, 1);
}

#[tokio::test]
async fn get_requests_are_untouched_and_never_reach_the_store() {
    let stack = Stack::start().await;
    let before = metric_sum(&stack.store_metrics().await, "idempotency_store_requests_total");
    for _ in 0..3 {
        let response = stack
            .client
            .get(format!("{}/api/v1/orders", stack.url))
            .header("Idempotency-Key", "get-1")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert!(response.headers().get("idempotent-replayed").is_none());
    }
    let after = metric_sum(&stack.store_metrics().await, "idempotency_store_requests_total");
    assert_eq!(before, after, "GET must not call the store");
}

#[tokio::test]
async fn request_body_over_the_limit_is_413_before_any_store_call() {
    let stack = Stack::start_with(e2e::StackOptions::plugin(json!({"max_request_body": 1024}))).await;
    let big = json!({"blob": "x".repeat(4096)});
    let response = stack.post_order(Some("big-1"), &big).send().await.unwrap();
    assert_eq!(response.status(), 413);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "IDEMPOTENCY_REQUEST_TOO_LARGE");
    assert_eq!(
        metric_sum(&stack.store_metrics().await, "idempotency_store_requests_total"),
        0.0
    );
    assert_eq!(stack.executions().await["total"], 0);
}

#[tokio::test]
async fn replays_are_served_from_the_proxy_cache_without_store_calls() {
    let stack = Stack::start_with(e2e::StackOptions::plugin(
        json!({"replay_cache_max_entries": 1000}),
    ))
    .await;
    let order = json!({"sku": "CACHED"});
    let first: Value = stack
        .post_order(Some("cache-1"), &order)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let store_calls = metric_sum(&stack.store_metrics().await, "idempotency_store_requests_total");
    for _ in 0..5 {
        let replay = stack.post_order(Some("cache-1"), &order).send().await.unwrap();
        assert_eq!(replay.status(), 201);
        assert_eq!(replay.headers()["idempotent-replayed"], "true");
        let body: Value = replay.json().await.unwrap();
        assert_eq!(body, first);
    }
    // The same order in other bytes (spaces): not the cached bytes, but the same fingerprint.
    let respaced = stack
        .post_order(Some("cache-1"), &order)
        .body(r#"{ "sku" : "CACHED" }"#)
        .send()
        .await
        .unwrap();
    assert_eq!(respaced.status(), 201);
    assert_eq!(respaced.headers()["idempotent-replayed"], "true");
    let mismatch = stack
        .post_order(Some("cache-1"), &json!({"sku": "OTHER"}))
        .send()
        .await
        .unwrap();
    assert_eq!(mismatch.status(), 422);
    assert_eq!(
        metric_sum(&stack.store_metrics().await, "idempotency_store_requests_total"),
        store_calls,
        "no store call for cached replays"
    );
    assert_eq!(
        metric_sum(
            &stack.envoy_metrics().await,
            "idempotency_replay_cache_hits_total"
        ),
        6.0
    );
    assert_eq!(stack.executions_of("cache-1").await, 1);
}
