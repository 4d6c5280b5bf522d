//! Exactly once when clients give up: an attempt whose outcome is unknown keeps its lock, a
//! retry meanwhile gets 409 (or waits for the replay), a takeover after expiry says an earlier
//! attempt may have run, and store calls that must happen, happen. Through real Envoy.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use e2e::{free_port, spawn_demo, spawn_store, start_envoy, Stack, StackOptions, STORE_TOKEN};
use serde_json::{json, Value};

/// The client gives up after `timeout` on a request the upstream takes `delay_ms` to run.
async fn give_up(stack: &Stack, key: &str, delay_ms: u64, timeout: Duration) {
    let outcome = stack
        .post_order(Some(key), &json!({}))
        .header("x-demo-delay-ms", delay_ms.to_string())
        .timeout(timeout)
        .send()
        .await;
    assert!(outcome.is_err(), "the client was meant to time out: {outcome:?}");
}

async fn executions(stack: &Stack, key: &str) -> (u64, Value) {
    let counts = stack.executions().await;
    (
        counts["byKey"][key].as_u64().unwrap_or(0),
        counts["overlaps"].clone(),
    )
}

#[tokio::test]
async fn client_timeout_then_immediate_retry_gets_409_and_the_service_runs_once() {
    let stack = Stack::start().await;
    give_up(&stack, "dc-1", 2_000, Duration::from_secs(1)).await;
    let retry = stack.post_order(Some("dc-1"), &json!({})).send().await.unwrap();
    assert_eq!(retry.status(), 409, "the first attempt may still be running");
    let body: Value = retry.json().await.unwrap();
    assert_eq!(body["code"], "IDEMPOTENCY_CONCURRENT_REQUEST");

    // The upstream finished its work after the client left; its answer was lost. Still one run.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let again = stack.post_order(Some("dc-1"), &json!({})).send().await.unwrap();
    assert_eq!(
        again.status(),
        409,
        "never guessed 'not executed' within lock_timeout"
    );
    let retry_after: u64 = again.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(
        retry_after > 200,
        "Retry-After is the rest of the 5 min lock: {retry_after}"
    );
    let body: Value = again.json().await.unwrap();
    assert_eq!(body["details"]["outcomeUnknown"], true);
    assert_eq!(executions(&stack, "dc-1").await, (1, json!({})));
    let record = stack.record("dc-1").await.unwrap();
    assert_eq!(record["state"], "in_progress");
    assert_eq!(record["outcome_unknown"]["reason"], "downstream_disconnect");
    let proxy = stack.envoy_metrics().await;
    assert!(
        e2e::metric_sum(&proxy, "idempotency_outcome_unknown_total") >= 1.0,
        "{proxy}"
    );
    let store = stack.store_metrics().await;
    assert!(
        store.contains(
            r#"idempotency_outcome_unknown_total{reason="downstream_disconnect",service="orders"} 1"#
        ),
        "{store}"
    );
}

#[tokio::test]
async fn a_retry_that_waits_gets_the_replay_of_the_attempt_in_flight() {
    let stack = Stack::start_with(StackOptions::plugin(json!({"in_progress_wait": "5s"}))).await;
    let first = {
        let request = stack
            .post_order(Some("wait-1"), &json!({"sku": "A"}))
            .header("x-demo-delay-ms", "1500");
        tokio::spawn(async move { request.send().await.unwrap() })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let retry = stack
        .post_order(Some("wait-1"), &json!({"sku": "A"}))
        .send()
        .await
        .unwrap();
    assert_eq!(retry.status(), 201);
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "woken by the completion"
    );
    let replayed: Value = retry.json().await.unwrap();
    let original: Value = first.await.unwrap().json().await.unwrap();
    assert_eq!(replayed["orderId"], original["orderId"]);
    assert_eq!(executions(&stack, "wait-1").await, (1, json!({})));
}

#[tokio::test]
async fn an_envoy_route_timeout_keeps_the_lock() {
    let stack = Stack::start().await;
    let timed_out = stack
        .post_order(Some("rt-1"), &json!({}))
        .header("x-demo-delay-ms", "1500")
        .header("x-e2e-route", "short-timeout")
        .send()
        .await
        .unwrap();
    assert_eq!(timed_out.status(), 504, "Envoy's own route timeout");
    let retry = stack.post_order(Some("rt-1"), &json!({})).send().await.unwrap();
    assert_eq!(retry.status(), 409, "the upstream is still running it");
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(executions(&stack, "rt-1").await, (1, json!({})));
    let record = stack.record("rt-1").await.unwrap();
    assert_eq!(record["outcome_unknown"]["reason"], "upstream_timeout");
}

#[tokio::test]
async fn an_upstream_sent_503_releases_and_the_retry_runs() {
    let stack = Stack::start().await;
    let failed = stack
        .post_order(Some("u503"), &json!({}))
        .header("x-demo-fail", "503")
        .send()
        .await
        .unwrap();
    assert_eq!(failed.status(), 503);
    let retry = stack.post_order(Some("u503"), &json!({})).send().await.unwrap();
    assert_eq!(retry.status(), 201, "the service itself said: not done, retry");
    let body: Value = retry.json().await.unwrap();
    assert_eq!(body["idempotency"]["x-idempotency-previous-attempt"], "released");
    assert_eq!(executions(&stack, "u503").await, (2, json!({})));
}

#[tokio::test]
async fn after_the_lock_expires_the_takeover_says_the_previous_attempt_may_have_run() {
    let stack = Stack::start_with(StackOptions::plugin(json!({"lock_timeout": "2s"}))).await;
    give_up(&stack, "exp-1", 500, Duration::from_millis(200)).await;
    tokio::time::sleep(Duration::from_millis(2_300)).await;
    let takeover = stack.post_order(Some("exp-1"), &json!({})).send().await.unwrap();
    assert_eq!(takeover.status(), 201);
    let body: Value = takeover.json().await.unwrap();
    assert_eq!(body["idempotency"]["x-idempotency-previous-attempt"], "unknown");
    assert_eq!(
        executions(&stack, "exp-1").await,
        (2, json!({})),
        "two runs, never at once"
    );
    let replay = stack.post_order(Some("exp-1"), &json!({})).send().await.unwrap();
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
}

#[tokio::test]
async fn after_a_slow_store_a_retry_once_it_recovers_executes_once() {
    let stack = Stack::start_with(StackOptions {
        store_delay: Some(Duration::from_millis(1_500)),
        ..StackOptions::plugin(json!({"store_timeout": "1s"}))
    })
    .await;
    let slow = stack.post_order(Some("slow-1"), &json!({})).send().await.unwrap();
    assert_eq!(slow.status(), 503, "the acquire timed out");
    assert_eq!(executions(&stack, "slow-1").await.0, 0);
    stack.store_delay_ms.as_ref().unwrap().store(0, Ordering::Relaxed);
    // The late acquire is refused after its deadline, or abandoned: no orphan lock either way.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let retry = stack.post_order(Some("slow-1"), &json!({})).send().await.unwrap();
    assert_eq!(retry.status(), 201, "not 409 for the rest of a 5 minute lock");
    assert_eq!(executions(&stack, "slow-1").await, (1, json!({})));
}

#[tokio::test]
async fn a_store_outage_during_complete_is_ridden_out_and_the_next_retry_replays() {
    let mut stack = Stack::start().await;
    let first = {
        let request = stack
            .post_order(Some("blip-1"), &json!({}))
            .header("x-demo-delay-ms", "1000");
        tokio::spawn(async move { request.send().await.unwrap() })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    stack.kill_store();
    let answered = first.await.unwrap();
    assert_eq!(
        answered.status(),
        201,
        "the client gets the upstream's answer meanwhile"
    );
    let original: Value = answered.json().await.unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    stack.restart_store().await;

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let retry = stack.post_order(Some("blip-1"), &json!({})).send().await.unwrap();
        if retry.status() == 201 {
            assert_eq!(retry.headers()["idempotent-replayed"], "true");
            let replayed: Value = retry.json().await.unwrap();
            assert_eq!(replayed["orderId"], original["orderId"]);
            break;
        }
        assert_eq!(retry.status(), 409, "until the retried complete lands");
        assert!(Instant::now() < deadline, "the complete never landed");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(executions(&stack, "blip-1").await, (1, json!({})));
}

#[tokio::test]
async fn a_12_mb_response_streams_through_whole_and_replays_as_body_omitted() {
    let stack = Stack::start().await;
    let big = stack
        .post_order(Some("big-1"), &json!({}))
        .header("x-demo-response-bytes", "12000000")
        .send()
        .await
        .unwrap();
    assert_eq!(big.status(), 201);
    let body = big.bytes().await.unwrap();
    assert!(body.len() > 12_000_000, "whole: {} bytes", body.len());
    assert!(serde_json::from_slice::<Value>(&body).is_ok(), "and intact");
    let deadline = Instant::now() + Duration::from_secs(5);
    let replay = loop {
        let replay = stack.post_order(Some("big-1"), &json!({})).send().await.unwrap();
        if replay.status() != 409 || Instant::now() > deadline {
            break replay;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(replay.status(), 201);
    assert_eq!(replay.headers()["idempotent-body-omitted"], "true");
    assert_eq!(executions(&stack, "big-1").await, (1, json!({})));
}

#[tokio::test]
async fn numbers_are_fingerprinted_exactly_as_written() {
    let stack = Stack::start().await;
    let post = |body: &'static str| {
        stack
            .client
            .post(format!("{}/api/v1/orders", stack.url))
            .header("Idempotency-Key", "num-1")
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    assert_eq!(post(r#"{"amount":0.1}"#).await.unwrap().status(), 201);
    assert_eq!(
        post(r#"{"amount":0.1000000000000000055511}"#)
            .await
            .unwrap()
            .status(),
        422,
        "the same double, other parameters"
    );
    assert_eq!(
        post(r#"{ "amount" : 0.1 }"#).await.unwrap().status(),
        201,
        "whitespace still ignored"
    );
    assert_eq!(
        post(r#"{"amount":0.1,"amount":0.1}"#).await.unwrap().status(),
        422
    );
}

#[tokio::test]
async fn a_12_mb_response_reaches_the_client_whole_through_the_shipped_envoy_config() {
    let stack = e2e::ShippedStack::start("envoy.yaml").await;
    let big = stack
        .client
        .post(format!("{}/api/v1/orders", stack.url))
        .header("Idempotency-Key", "big-shipped")
        .header("x-demo-response-bytes", "12000000")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(big.status(), 201, "not Envoy's 500 for an overflowing buffer");
    let body = big.bytes().await.unwrap();
    assert!(body.len() > 12_000_000 && serde_json::from_slice::<Value>(&body).is_ok());
}

#[tokio::test]
async fn a_12_mb_response_reaches_the_client_whole_through_the_istio_envoyfilter() {
    // The EnvoyFilter's own filters in a sidecar-like listener with Envoy's default 1 MiB
    // per-connection buffer limit (what an Istio sidecar has unless told otherwise).
    let dir = tempfile::tempdir().unwrap();
    let (store_port, demo_port, listener, admin) = (free_port(), free_port(), free_port(), free_port());
    let mut store = spawn_store(
        dir.path(),
        store_port,
        &dir.path().join("store-data"),
        &[],
        "store.log",
    );
    let mut demo = spawn_demo(dir.path(), demo_port, store_port);
    let (filters, shipped) = e2e::istio_envoyfilter_filters(STORE_TOKEN, Some("store"));
    assert_eq!(shipped["max_response_size"], 1_048_576);
    let bootstrap = e2e::inbound_bootstrap(
        listener,
        Some(admin),
        "app",
        vec![json!({"match": {"prefix": "/"}, "route": {"cluster": "app"}})],
        filters,
        vec![
            e2e::static_cluster("app", demo_port),
            e2e::static_cluster("store", store_port),
        ],
    );
    let mut envoy = start_envoy(dir.path(), &bootstrap.to_string(), "envoy.log");
    e2e::wait_all_ready(
        (store_port, &mut store),
        (demo_port, &mut demo),
        (admin, &mut envoy),
    )
    .await;

    let client = reqwest::Client::new();
    let big = client
        .post(format!("http://127.0.0.1:{listener}/api/v1/orders"))
        .header("Idempotency-Key", "big-istio")
        .header("x-demo-response-bytes", "12000000")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(big.status(), 201, "not Envoy's 500 for an overflowing buffer");
    let body = big.bytes().await.unwrap();
    assert!(body.len() > 12_000_000 && serde_json::from_slice::<Value>(&body).is_ok());
    let replay = client
        .post(format!("http://127.0.0.1:{listener}/api/v1/orders"))
        .header("Idempotency-Key", "big-istio")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        replay.headers()["idempotent-body-omitted"],
        "true",
        "it was enforced, not shadowed"
    );
}

#[tokio::test]
async fn after_a_purge_and_a_new_record_the_abandoned_attempts_result_is_refused() {
    let stack = Stack::start().await;
    // Attempt A runs long; an operator purges its record; attempt B re-creates and completes it.
    let a = {
        let request = stack
            .post_order(Some("purge-1"), &json!({}))
            .header("x-demo-delay-ms", "1500");
        tokio::spawn(async move { request.send().await.unwrap() })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let old = stack.record("purge-1").await.unwrap();
    let purged = stack
        .client
        .delete(format!("{}/v1/records", stack.store_url))
        .query(&[("service", "orders"), ("scope", ""), ("key", "purge-1")])
        .bearer_auth(e2e::STORE_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(purged.status(), 204);
    let b = stack
        .post_order(Some("purge-1"), &json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(b.status(), 201);
    let b: Value = b.json().await.unwrap();
    let new = stack.record("purge-1").await.unwrap();
    assert_eq!(
        new["fencing_token"], old["fencing_token"],
        "same token number, other record"
    );
    assert_ne!(new["record_id"], old["record_id"]);

    // A finishes later: its client gets A's answer, but the record keeps B's.
    assert_eq!(a.await.unwrap().status(), 201);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let replay = stack
        .post_order(Some("purge-1"), &json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    let replayed: Value = replay.json().await.unwrap();
    assert_eq!(
        replayed["orderId"], b["orderId"],
        "the abandoned attempt could not overwrite it"
    );
    let store = stack.store_metrics().await;
    assert!(
        store.contains(r#"idempotency_stale_fencing_tokens_total{operation="complete"} 1"#),
        "{store}"
    );
}

#[tokio::test]
async fn a_request_that_never_reached_the_upstream_releases_its_lock() {
    let mut stack = Stack::start().await;
    stack.kill_demo();
    let refused = stack.post_order(Some("nc-1"), &json!({})).send().await.unwrap();
    assert_eq!(refused.status(), 503, "Envoy could not connect to the upstream");
    let record = stack.record("nc-1").await.unwrap();
    assert!(record["outcome_unknown"].is_null(), "{record}");
    stack.restart_demo().await;
    let retry = stack.post_order(Some("nc-1"), &json!({})).send().await.unwrap();
    assert_eq!(
        retry.status(),
        201,
        "released: the request provably never left Envoy"
    );
    let body: Value = retry.json().await.unwrap();
    assert_eq!(body["idempotency"]["x-idempotency-previous-attempt"], "released");
    assert_eq!(executions(&stack, "nc-1").await, (1, json!({})));
}
