//! Lock lifecycle: retryable failures release, expired locks are taken over, fencing refuses
//! the old holder.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)] // test code

use std::time::Duration;

use e2e::{metric_sum, Stack, StackOptions};
use serde_json::{json, Value};

#[tokio::test]
async fn server_error_releases_the_lock_so_a_retry_executes_again() {
    let stack = Stack::start().await;
    let order = json!({"sku": "FLAKY"});
    let failed = stack
        .post_order(Some("flaky-1"), &order)
        .header("x-demo-fail", "500")
        .send()
        .await
        .unwrap();
    assert_eq!(failed.status(), 500);
    let retry = stack.post_order(Some("flaky-1"), &order).send().await.unwrap();
    assert_eq!(retry.status(), 201);
    assert!(retry.headers().get("idempotent-replayed").is_none());
    assert_eq!(stack.executions_of("flaky-1").await, 2);
    let record = stack.record("flaky-1").await.unwrap();
    assert_eq!(record["fencing_token"], 2);
    // And now it is stored.
    let replay = stack.post_order(Some("flaky-1"), &order).send().await.unwrap();
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
}

#[tokio::test]
async fn too_many_requests_and_timeouts_release_too() {
    let stack = Stack::start().await;
    for (key, status) in [("r429", "429"), ("r408", "408"), ("r503", "503")] {
        let failed = stack
            .post_order(Some(key), &json!({}))
            .header("x-demo-fail", status)
            .send()
            .await
            .unwrap();
        assert_eq!(failed.status().as_str(), status);
        let retry = stack.post_order(Some(key), &json!({})).send().await.unwrap();
        assert_eq!(retry.status(), 201, "{key}");
    }
}

#[tokio::test]
async fn client_errors_are_stored_and_replayed() {
    let stack = Stack::start().await;
    let failed = stack
        .post_order(Some("c404"), &json!({}))
        .header("x-demo-fail", "404")
        .send()
        .await
        .unwrap();
    assert_eq!(failed.status(), 404);
    let retry = stack.post_order(Some("c404"), &json!({})).send().await.unwrap();
    assert_eq!(retry.status(), 404);
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(stack.executions_of("c404").await, 1);
}

#[tokio::test]
async fn expired_lock_is_taken_over_and_the_old_holders_late_result_is_refused() {
    let stack = Stack::start_with(StackOptions::plugin(
        json!({"lock_timeout": "1s", "in_progress_wait": "0s"}),
    ))
    .await;
    let order = json!({"sku": "SLOW"});
    // The first attempt holds the lock for 3 s, longer than the 1 s lock timeout.
    let slow = {
        let request = stack
            .post_order(Some("takeover-1"), &order)
            .header("x-demo-delay-ms", "3000");
        tokio::spawn(async move { request.send().await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let blocked = stack.post_order(Some("takeover-1"), &order).send().await.unwrap();
    assert_eq!(blocked.status(), 409, "lock still held");

    tokio::time::sleep(Duration::from_millis(1200)).await;
    let takeover = stack.post_order(Some("takeover-1"), &order).send().await.unwrap();
    assert_eq!(takeover.status(), 201, "stale lock taken over");
    let takeover_body: Value = takeover.json().await.unwrap();
    assert_eq!(takeover_body["idempotency"]["x-idempotency-fencing-token"], "2");

    // The old holder finishes late; the store refuses its completion (stale fencing token), the
    // client still gets the upstream's answer.
    let late = slow.await.unwrap().unwrap();
    assert_eq!(late.status(), 201);
    assert!(
        metric_sum(
            &stack.store_metrics().await,
            "idempotency_stale_fencing_tokens_total"
        ) >= 1.0
    );

    // The record holds the takeover's response, not the late one.
    let replay = stack.post_order(Some("takeover-1"), &order).send().await.unwrap();
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    let replay_body: Value = replay.json().await.unwrap();
    assert_eq!(replay_body["orderId"], takeover_body["orderId"]);
    assert_eq!(stack.executions_of("takeover-1").await, 2);
}
