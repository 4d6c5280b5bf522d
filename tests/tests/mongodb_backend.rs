//! The MongoDB backend end to end: store replicas sharing one MongoDB behind Envoy.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)] // test code

use e2e::{metric_sum, Stack, StackOptions};
use serde_json::{json, Value};

fn two_replicas_on_mongodb() -> StackOptions {
    StackOptions {
        mongodb: true,
        store_replicas: 2,
        ..StackOptions::default()
    }
}

#[tokio::test]
async fn twenty_concurrent_same_key_requests_over_two_store_replicas_execute_exactly_once() {
    // Every store call alone, so Envoy spreads the twenty acquires over both replicas (batched,
    // they could all reach one replica in one request and the race would not cross replicas).
    let stack = Stack::start_with(StackOptions {
        plugin: json!({"store_batch_max_calls": 1}),
        ..two_replicas_on_mongodb()
    })
    .await;
    let order = json!({"sku": "RACE", "qty": 1});
    let attempts = (0..20).map(|_| {
        stack
            .post_order(Some("mongo-race-1"), &order)
            .header("x-demo-delay-ms", "500")
            .send()
    });
    let mut created = 0;
    for response in futures::future::join_all(attempts).await {
        let response = response.unwrap();
        match response.status().as_u16() {
            201 if !response.headers().contains_key("idempotent-replayed") => created += 1,
            201 | 409 => {}
            other => panic!("unexpected status {other}: {}", response.text().await.unwrap()),
        }
    }
    assert_eq!(created, 1);
    assert_eq!(stack.executions_of("mongo-race-1").await, 1);
    // Both replicas answered acquires: the race really crossed replicas.
    for replica in 0..2 {
        let text = stack.replica_metrics(replica).await;
        let acquires = metric_sum(&text, "idempotency_misses_total")
            + metric_sum(&text, "idempotency_concurrent_collisions_total")
            + metric_sum(&text, "idempotency_hits_total");
        assert!(acquires >= 1.0, "replica {replica} served no acquire:\n{text}");
    }
    // A retry through either replica replays.
    for _ in 0..4 {
        let again = stack
            .post_order(Some("mongo-race-1"), &order)
            .send()
            .await
            .unwrap();
        assert_eq!(again.headers()["idempotent-replayed"], "true");
    }
    assert_eq!(stack.executions_of("mongo-race-1").await, 1);
}

#[tokio::test]
async fn lock_taken_on_one_replica_is_seen_by_the_other() {
    let stack = Stack::start_with(two_replicas_on_mongodb()).await;
    let client = reqwest::Client::new();
    let acquire = json!({"service": "orders", "scope": "", "key": "cross-1", "fingerprint": "ab",
        "method": "POST", "path": "/x", "lock_timeout_ms": 60000, "retention_ms": 600000});
    let mut outcomes = Vec::new();
    for port in &stack.store_ports {
        let body: Value = client
            .post(format!("http://127.0.0.1:{port}/v1/acquire"))
            .bearer_auth(e2e::STORE_TOKEN)
            .json(&acquire)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        outcomes.push(body["outcome"].as_str().unwrap().to_owned());
    }
    assert_eq!(outcomes, ["acquired", "in_progress"]);
}

#[tokio::test]
async fn unreachable_mongodb_at_run_time_gives_503_and_never_a_duplicate() {
    let mut stack = Stack::start_with(two_replicas_on_mongodb()).await;
    let order = json!({"sku": "A"});
    let first = stack
        .post_order(Some("mongo-down-1"), &order)
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 201);

    stack.mongo.as_mut().unwrap().stop();
    for key in ["mongo-down-1", "mongo-down-2"] {
        let response = stack.post_order(Some(key), &order).send().await.unwrap();
        assert_eq!(response.status(), 503, "{key}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["code"], "IDEMPOTENCY_STORAGE_UNAVAILABLE");
    }
    let executions = stack.executions().await;
    assert_eq!(
        executions["total"], 1,
        "nothing executed while MongoDB was down: {executions}"
    );
    let readiness = reqwest::get(format!("{}/readyz", stack.store_url)).await.unwrap();
    assert_eq!(readiness.status(), 503, "readiness reflects the outage");
}

#[tokio::test]
async fn retries_waiting_on_either_replica_get_the_replay_of_the_attempt_in_flight() {
    let stack = Stack::start_with(StackOptions {
        plugin: json!({"in_progress_wait": "5s"}),
        ..two_replicas_on_mongodb()
    })
    .await;
    let first = {
        let request = stack
            .post_order(Some("mongo-wait-1"), &json!({}))
            .header("x-demo-delay-ms", "1000");
        tokio::spawn(async move { request.send().await.unwrap() })
    };
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    // Several retries: Envoy spreads them over both replicas; a replica that did not see the
    // completion itself finds it by polling MongoDB.
    let retries = (0..6).map(|_| stack.post_order(Some("mongo-wait-1"), &json!({})).send());
    let (first, retries) = tokio::join!(first, futures::future::join_all(retries));
    let first: Value = first.unwrap().json().await.unwrap();
    for retry in retries {
        let retry = retry.unwrap();
        assert_eq!(retry.status(), 201);
        assert_eq!(retry.headers()["idempotent-replayed"], "true");
        let body: Value = retry.json().await.unwrap();
        assert_eq!(body["orderId"], first["orderId"]);
    }
    assert_eq!(stack.executions_of("mongo-wait-1").await, 1);
    let mut waited = 0.0;
    for replica in 0..2 {
        let text = stack.replica_metrics(replica).await;
        waited += metric_sum(&text, "idempotency_acquire_waits_total");
    }
    assert!(waited >= 6.0, "every retry waited in a store: {waited}");
}

#[tokio::test]
async fn batched_store_calls_on_mongodb_each_run_once() {
    let stack = Stack::start_with(two_replicas_on_mongodb()).await;
    let order = json!({"sku": "BATCH", "qty": 1});
    let send = |i: usize| {
        stack
            .post_order(Some(&format!("mongo-batch-{i}")), &order)
            .header("x-demo-delay-ms", "20")
            .send()
    };
    for replayed in [false, true] {
        for response in futures::future::join_all((0..16).map(send)).await {
            let response = response.unwrap();
            assert_eq!(response.status(), 201);
            assert_eq!(response.headers().contains_key("idempotent-replayed"), replayed);
        }
    }
    for i in 0..16 {
        assert_eq!(
            stack.executions_of(&format!("mongo-batch-{i}")).await,
            1,
            "key {i}"
        );
    }
    let mut batches = 0.0;
    for replica in 0..2 {
        batches += metric_sum(
            &stack.replica_metrics(replica).await,
            "idempotency_batch_calls_count",
        );
    }
    assert!(batches >= 1.0, "the calls met a busy store and were batched");
}
