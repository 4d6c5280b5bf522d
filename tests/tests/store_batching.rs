//! Store calls made while the store is busy leave together (`/v1/batch`); each request still
//! runs exactly once, and a store from before batching still gets every call, one by one.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)] // test code

use e2e::{metric_sum, Stack, StackOptions};
use serde_json::json;

const REQUESTS: usize = 48;

/// `REQUESTS` new keys at once, then a retry of each at once: what the clients saw.
async fn first_attempts_then_retries(stack: &Stack, prefix: &str) {
    let order = json!({"sku": "BATCH", "qty": 1});
    let send = |i: usize| {
        stack
            .post_order(Some(&format!("{prefix}-{i}")), &order)
            .header("x-demo-delay-ms", "20")
            .send()
    };
    for (round, replayed) in [("first attempts", false), ("retries", true)] {
        let responses = futures::future::join_all((0..REQUESTS).map(send)).await;
        for (i, response) in responses.into_iter().enumerate() {
            let response = response.unwrap();
            assert_eq!(response.status(), 201, "{round}: request {i}");
            assert_eq!(
                response.headers().contains_key("idempotent-replayed"),
                replayed,
                "{round}: request {i}"
            );
        }
    }
    for i in 0..REQUESTS {
        assert_eq!(
            stack.executions_of(&format!("{prefix}-{i}")).await,
            1,
            "key {i} ran exactly once"
        );
    }
}

#[tokio::test]
async fn requests_that_meet_a_busy_store_share_its_calls_and_each_runs_once() {
    let stack = Stack::start().await;
    first_attempts_then_retries(&stack, "batched").await;
    let metrics = stack.store_metrics().await;
    let batches = metric_sum(&metrics, "idempotency_batch_calls_count");
    let batched_calls = metric_sum(&metrics, "idempotency_batch_calls_sum");
    assert!(batches >= 1.0, "some calls were batched:\n{metrics}");
    assert!(
        batched_calls >= 2.0 * batches,
        "a batch carries several calls ({batched_calls} calls in {batches} batches)"
    );
    // Envoy made fewer store requests than the filter made calls (2 per execution, 1 per
    // replay): the saving batching is for.
    let envoy = stack.envoy_metrics().await;
    let store_requests: f64 = envoy
        .lines()
        .filter(|l| l.starts_with("envoy_cluster_upstream_rq_total{") && l.contains("\"idempotency_store\""))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum();
    let calls = (3 * REQUESTS) as f64;
    assert!(
        store_requests > 0.0 && store_requests < calls,
        "{store_requests} store requests for {calls} calls"
    );
}

#[tokio::test]
async fn a_store_without_batch_support_still_gets_every_call_one_by_one() {
    let mut stack = Stack::start_with(StackOptions {
        store_without_batch: true,
        ..StackOptions::default()
    })
    .await;
    first_attempts_then_retries(&stack, "unbatched").await;
    let metrics = stack.store_metrics().await;
    assert_eq!(metric_sum(&metrics, "idempotency_batch_calls_count"), 0.0);
    stack.envoy.kill();
    let log = stack.envoy.output();
    assert!(
        log.contains("does not know /v1/batch"),
        "the filter says why it stopped batching:\n{}",
        log.lines()
            .filter(|l| l.contains("idempotency"))
            .take(20)
            .collect::<Vec<_>>()
            .join("\n")
    );
}
