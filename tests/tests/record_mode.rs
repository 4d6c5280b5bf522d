//! `record_mode`: write-ahead (the default) answers the client only once the store has the
//! record; `async` answers first and writes the record after. Either way a retry never runs the
//! request again, seen from the client: it gets the replay, or 409 while the write is on its way.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)] // test code

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use e2e::{replay_of, Stack, StackOptions};
use serde_json::{json, Value};

/// Async everywhere except PUTs of one order, which stay write-ahead; a store behind a proxy whose
/// delay the tests switch on once the request has been forwarded.
async fn stack() -> Stack {
    Stack::start_with(StackOptions {
        store_delay: Some(Duration::ZERO),
        ..StackOptions::plugin(json!({
            "record_mode": "async",
            "store_timeout": "5s",
            "routes": [{"name": "write-ahead", "path_prefix": "/api/v1/orders/", "methods": ["PUT"],
                        "mode": "optional", "record_mode": "write_ahead"}],
        }))
    })
    .await
}

/// Send `request` (its upstream takes 600 ms), wait until it has been forwarded, make the store
/// slow (1.5 s each way), and return the response with the record as the store holds it at the
/// moment the client has its answer.
async fn answer_with_a_slow_record(
    stack: &Stack,
    key: &str,
    request: reqwest::RequestBuilder,
) -> (reqwest::StatusCode, Value, Value) {
    let in_flight = tokio::spawn(request.header("x-demo-delay-ms", "600").send());
    let deadline = Instant::now() + Duration::from_secs(5);
    while stack.executions_of(key).await == 0 {
        assert!(Instant::now() < deadline, "{key} never reached the upstream");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stack
        .store_delay_ms
        .as_ref()
        .unwrap()
        .store(1_500, Ordering::Relaxed);
    let response = in_flight.await.unwrap().unwrap();
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    let record = stack.record(key).await.unwrap();
    stack.store_delay_ms.as_ref().unwrap().store(0, Ordering::Relaxed);
    (status, body, record)
}

#[tokio::test]
async fn async_answers_before_the_record_is_written_and_write_ahead_only_after() {
    let stack = stack().await;

    let (status, body, record) = answer_with_a_slow_record(
        &stack,
        "async-1",
        stack.post_order(Some("async-1"), &json!({"sku": "A"})),
    )
    .await;
    assert_eq!(status, 201);
    assert_eq!(
        record["state"], "in_progress",
        "async: the client has its answer while the store has no record of it yet"
    );
    let replayed = replay_of("async-1", || {
        stack.post_order(Some("async-1"), &json!({"sku": "A"}))
    })
    .await;
    assert_eq!(
        replayed, body,
        "the record written after the answer is the same answer"
    );
    assert_eq!(stack.record("async-1").await.unwrap()["state"], "completed");
    assert_eq!(stack.executions_of("async-1").await, 1);

    let put = || {
        stack
            .client
            .put(format!("{}/api/v1/orders/o-7", stack.url))
            .header("Idempotency-Key", "ahead-1")
            .json(&json!({"qty": 3}))
    };
    let (status, body, record) = answer_with_a_slow_record(&stack, "ahead-1", put()).await;
    assert_eq!(status, 200);
    assert_eq!(
        record["state"], "completed",
        "write-ahead (this route's rule): the store had the record before the client had the answer"
    );
    assert_eq!(replay_of("ahead-1", put).await, body);
    assert_eq!(stack.executions_of("ahead-1").await, 1);

    let stats = stack.envoy_metrics().await;
    assert_eq!(
        e2e::metric_sum(&stats, "idempotency_records_written_async_total"),
        1.0,
        "only the async route: {stats}"
    );
}

#[tokio::test]
async fn async_retries_at_once_never_run_twice_and_replay_once_the_record_lands() {
    let stack = stack().await;
    for i in 0..20 {
        let key = format!("quick-{i}");
        let order = json!({"sku": "B", "n": i});
        let first = stack.post_order(Some(&key), &order).send().await.unwrap();
        assert_eq!(first.status(), 201);
        let body: Value = first.json().await.unwrap();
        // At once, as an impatient client would: the replay, or 409 while the write lands.
        assert_eq!(
            replay_of(&key, || stack.post_order(Some(&key), &order)).await,
            body
        );
        // Other parameters with the same key: refused, once the record is there.
        let other = stack
            .post_order(Some(&key), &json!({"sku": "C"}))
            .send()
            .await
            .unwrap();
        assert_eq!(other.status(), 422);
    }
    let executions = stack.executions().await;
    assert_eq!(executions["total"], 20, "{executions}");
}

#[tokio::test]
async fn async_with_the_store_down_at_the_answer_writes_the_record_once_it_is_back() {
    let mut stack = stack().await;
    let original = stack.answered_with_the_store_killed("down-async-1", 1000).await;

    // While the store is down a retry cannot be decided: 503, never a second run.
    let during = stack
        .post_order(Some("down-async-1"), &json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(during.status(), 503);
    stack.restart_store().await;

    // The proxy kept retrying the write: the record lands, and the retry replays it.
    let replayed = replay_of("down-async-1", || {
        stack.post_order(Some("down-async-1"), &json!({}))
    })
    .await;
    assert_eq!(replayed, original);
    assert_eq!(stack.executions_of("down-async-1").await, 1);
}
