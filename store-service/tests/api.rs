//! Handler tests through the router (`oneshot`), plus one over a real socket.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)] // test code

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use idempotency_store::api::{app, AppState};
use idempotency_store::metrics::Metrics;
use idempotency_store::storage::embedded::EmbeddedStorage;
use serde_json::{json, Value};
use tower::ServiceExt;

const TOKEN: &str = "test-token";

fn state(dir: &tempfile::TempDir) -> AppState {
    AppState::new(
        Arc::new(EmbeddedStorage::open(&dir.path().join("store-data")).unwrap()),
        Metrics::new().unwrap(),
        Some(Arc::from(TOKEN)),
    )
}

async fn call(
    router: &axum::Router,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Value,
) -> (StatusCode, Value) {
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json");
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let response = router
        .clone()
        .oneshot(request.body(Body::from(body.to_string())).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

fn acquire_body(key: &str) -> Value {
    json!({"service": "orders", "scope": "", "key": key, "fingerprint": "ab", "method": "POST",
           "path": "/api/v1/orders", "lock_timeout_ms": 60000, "retention_ms": 86400000})
}

#[tokio::test]
async fn calls_without_the_token_are_refused_with_401() {
    let dir = tempfile::tempdir().unwrap();
    let router = app(state(&dir));
    let (status, body) = call(&router, "POST", "/v1/acquire", None, acquire_body("k")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"], "unauthorized");
    let (status, _) = call(&router, "POST", "/v1/acquire", Some("wrong"), acquire_body("k")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn acquire_complete_then_replay() {
    let dir = tempfile::tempdir().unwrap();
    let router = app(state(&dir));
    let (status, body) = call(&router, "POST", "/v1/acquire", Some(TOKEN), acquire_body("k1")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["outcome"], "acquired");
    let token = body["fencing_token"].as_u64().unwrap();

    let complete = json!({"service": "orders", "scope": "", "key": "k1", "fencing_token": token,
        "record_id": body["record_id"], "attempt_id": body["attempt_id"],
        "retention_ms": 60000, "response": {"status": 201, "headers": [["content-type", "application/json"]], "body": "e30="}});
    let (status, _) = call(&router, "POST", "/v1/complete", Some(TOKEN), complete.clone()).await;
    assert_eq!(status, StatusCode::OK);

    let (_, body) = call(&router, "POST", "/v1/acquire", Some(TOKEN), acquire_body("k1")).await;
    assert_eq!(body["outcome"], "completed");
    assert_eq!(body["response"]["body"], "e30=");

    let (status, body) = call(&router, "POST", "/v1/complete", Some(TOKEN), complete).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["error"], "stale_fencing_token");
}

#[tokio::test]
async fn records_can_be_read_and_purged_by_an_admin() {
    let dir = tempfile::tempdir().unwrap();
    let router = app(state(&dir));
    call(&router, "POST", "/v1/acquire", Some(TOKEN), acquire_body("k2")).await;
    let (status, body) = call(
        &router,
        "GET",
        "/v1/records?service=orders&scope=&key=k2",
        Some(TOKEN),
        Value::Null,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["state"], "in_progress");
    let (status, _) = call(
        &router,
        "DELETE",
        "/v1/records?service=orders&scope=&key=k2",
        Some(TOKEN),
        Value::Null,
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = call(
        &router,
        "GET",
        "/v1/records?service=orders&scope=&key=k2",
        Some(TOKEN),
        Value::Null,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn empty_keys_and_malformed_bodies_are_client_errors() {
    let dir = tempfile::tempdir().unwrap();
    let router = app(state(&dir));
    let (status, _) = call(&router, "POST", "/v1/acquire", Some(TOKEN), acquire_body("")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = call(&router, "POST", "/v1/acquire", Some(TOKEN), json!({"key": 1})).await;
    assert!(status.is_client_error());
}

#[tokio::test]
async fn health_readiness_and_metrics_need_no_token() {
    let dir = tempfile::tempdir().unwrap();
    let router = app(state(&dir));
    call(&router, "POST", "/v1/acquire", Some(TOKEN), acquire_body("k3")).await;
    for path in ["/healthz", "/readyz"] {
        let response = router
            .clone()
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
    }
    let response = router
        .clone()
        .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
        .await
        .unwrap();
    let text = String::from_utf8(response.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    assert!(
        text.contains("idempotency_misses_total{service=\"orders\"} 1"),
        "{text}"
    );
    assert!(text.contains("idempotency_store_live_records 1"), "{text}");
    // The embedded engine holds the acquire in its memtable until a flush.
    let buffered: f64 = text
        .lines()
        .find_map(|line| line.strip_prefix("idempotency_store_write_buffer_bytes "))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no write buffer gauge: {text}"));
    assert!(buffered > 0.0, "{text}");
}

#[tokio::test]
async fn serves_over_a_real_socket() {
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = app(state(&dir));
    let server = tokio::spawn(async move { axum::serve(listener, router).await });
    let client = reqwest::Client::new();
    let response = client
        .post(format!("http://{addr}/v1/acquire"))
        .bearer_auth(TOKEN)
        .json(&acquire_body("socket"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["outcome"], "acquired");
    server.abort();
}

#[tokio::test]
async fn message_claims_dedupe_and_count_duplicates_per_topic_and_group() {
    let dir = tempfile::tempdir().unwrap();
    let router = app(state(&dir));
    let claim = json!({"service": "orders", "topic": "orders.received", "consumer_group": "order-processor",
                       "message_id": "evt-1", "lock_timeout_ms": 60000, "retention_ms": 600000});
    let (status, body) = call(&router, "POST", "/v1/messages/claim", Some(TOKEN), claim.clone()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["outcome"], "claimed");
    let done = json!({"service": "orders", "topic": "orders.received", "consumer_group": "order-processor",
                      "message_id": "evt-1", "fencing_token": body["fencing_token"],
                      "record_id": body["record_id"], "attempt_id": body["attempt_id"], "retention_ms": 600000});
    let (status, _) = call(&router, "POST", "/v1/messages/complete", Some(TOKEN), done).await;
    assert_eq!(status, StatusCode::OK);
    let (_, body) = call(&router, "POST", "/v1/messages/claim", Some(TOKEN), claim.clone()).await;
    assert_eq!(body["outcome"], "duplicate");

    // Another consumer group is independent.
    let mut other = claim.clone();
    other["consumer_group"] = json!("auditor");
    let (_, body) = call(&router, "POST", "/v1/messages/claim", Some(TOKEN), other).await;
    assert_eq!(body["outcome"], "claimed");

    let response = router
        .clone()
        .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
        .await
        .unwrap();
    let text = String::from_utf8(response.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    assert!(
        text.contains(
            r#"message_deduplication_hits_total{consumer_group="order-processor",topic="orders.received"} 1"#
        ),
        "{text}"
    );
}

#[tokio::test]
async fn a_message_completed_without_retention_keeps_the_claims_retention() {
    let dir = tempfile::tempdir().unwrap();
    let router = app(state(&dir));
    let claim = json!({"service": "orders", "topic": "t", "consumer_group": "g",
                       "message_id": "evt-2", "lock_timeout_ms": 60000, "retention_ms": 600000});
    let (_, body) = call(&router, "POST", "/v1/messages/claim", Some(TOKEN), claim.clone()).await;
    let done = json!({"service": "orders", "topic": "t", "consumer_group": "g", "message_id": "evt-2",
                      "fencing_token": body["fencing_token"], "record_id": body["record_id"], "attempt_id": body["attempt_id"]});
    let (status, _) = call(&router, "POST", "/v1/messages/complete", Some(TOKEN), done).await;
    assert_eq!(status, StatusCode::OK);
    let (_, body) = call(&router, "POST", "/v1/messages/claim", Some(TOKEN), claim).await;
    assert_eq!(
        body["outcome"], "duplicate",
        "the dedup record must not expire at once"
    );
}

#[tokio::test]
async fn a_waiting_acquire_gets_the_replay_as_soon_as_the_holder_completes() {
    let dir = tempfile::tempdir().unwrap();
    let router = app(state(&dir));
    let (_, lock) = call(&router, "POST", "/v1/acquire", Some(TOKEN), acquire_body("w1")).await;
    let mut waiting = acquire_body("w1");
    waiting["wait_ms"] = json!(5_000);
    let started = std::time::Instant::now();
    let waiter = {
        let router = router.clone();
        tokio::spawn(async move { call(&router, "POST", "/v1/acquire", Some(TOKEN), waiting).await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let complete = json!({"service": "orders", "scope": "", "key": "w1", "fencing_token": lock["fencing_token"],
        "record_id": lock["record_id"], "attempt_id": lock["attempt_id"], "retention_ms": 60000,
        "response": {"status": 201, "headers": [], "body": "e30="}});
    let (status, _) = call(&router, "POST", "/v1/complete", Some(TOKEN), complete).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = waiter.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["outcome"], "completed", "{body}");
    let waited = started.elapsed();
    assert!(
        waited >= std::time::Duration::from_millis(300) && waited < std::time::Duration::from_secs(4),
        "woken by the completion, not by the end of the wait: {waited:?}"
    );

    // A wait that runs out answers in progress.
    let (_, _) = call(&router, "POST", "/v1/acquire", Some(TOKEN), acquire_body("w2")).await;
    let mut short = acquire_body("w2");
    short["wait_ms"] = json!(200);
    let (_, body) = call(&router, "POST", "/v1/acquire", Some(TOKEN), short).await;
    assert_eq!(body["outcome"], "in_progress");
}

#[tokio::test]
async fn a_lock_of_unknown_outcome_is_not_waited_for() {
    // Nothing changes such a lock before it expires: the wait would only delay the 409.
    let dir = tempfile::tempdir().unwrap();
    let router = app(state(&dir));
    let (_, lock) = call(&router, "POST", "/v1/acquire", Some(TOKEN), acquire_body("u1")).await;
    let unknown = json!({"service": "orders", "scope": "", "key": "u1", "fencing_token": lock["fencing_token"],
        "record_id": lock["record_id"], "attempt_id": lock["attempt_id"], "reason": "upstream_status"});
    let (status, _) = call(&router, "POST", "/v1/outcome-unknown", Some(TOKEN), unknown).await;
    assert_eq!(status, StatusCode::OK);
    let mut waiting = acquire_body("u1");
    waiting["wait_ms"] = json!(5_000);
    let started = std::time::Instant::now();
    let (_, body) = call(&router, "POST", "/v1/acquire", Some(TOKEN), waiting).await;
    assert_eq!(body["outcome"], "in_progress");
    assert_eq!(body["outcome_unknown"], true);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_batch_answers_each_call_as_if_it_came_alone() {
    let dir = tempfile::tempdir().unwrap();
    let router = app(state(&dir));
    let (_, first) = call(&router, "POST", "/v1/acquire", Some(TOKEN), acquire_body("b1")).await;
    let complete = json!({"service": "orders", "scope": "", "key": "b1",
        "fencing_token": first["fencing_token"], "record_id": first["record_id"],
        "attempt_id": first["attempt_id"], "retention_ms": 60000,
        "response": {"status": 201, "headers": [], "body": "e30="}});
    let stale = json!({"service": "orders", "scope": "", "key": "b1", "fencing_token": 999,
        "record_id": first["record_id"], "attempt_id": "nope"});
    let (status, body) = call(
        &router,
        "POST",
        "/v1/batch",
        Some(TOKEN),
        json!({"calls": [
            {"path": "/v1/acquire", "body": acquire_body("b2")},
            {"path": "/v1/complete", "body": complete},
            {"path": "/v1/acquire", "body": acquire_body("")},
            {"path": "/v1/release", "body": stale},
        ]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let replies = body["replies"].as_array().unwrap();
    assert_eq!(replies.len(), 4, "{body}");
    assert_eq!(replies[0]["status"], 200);
    assert_eq!(replies[0]["body"]["outcome"], "acquired");
    assert_eq!(replies[1]["status"], 200, "{body}");
    assert_eq!(replies[2]["status"], 400, "an invalid call fails alone: {body}");
    assert!(
        replies[2]["body"]["message"].as_str().unwrap().contains("key"),
        "{body}"
    );
    assert_eq!(replies[3]["status"], 409, "{body}");
    assert_eq!(replies[3]["body"]["error"], "stale_fencing_token");

    // What the batch wrote is what the calls alone would have written.
    let (_, replay) = call(&router, "POST", "/v1/acquire", Some(TOKEN), acquire_body("b1")).await;
    assert_eq!(replay["outcome"], "completed");
    let (_, again) = call(&router, "POST", "/v1/acquire", Some(TOKEN), acquire_body("b2")).await;
    assert_eq!(again["outcome"], "in_progress");
}

/// The value of an unlabelled series in a Prometheus exposition.
fn series(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name}: {text}"))
}

async fn metrics_text(router: &axum::Router) -> String {
    let response = router
        .clone()
        .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
        .await
        .unwrap();
    String::from_utf8(response.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
}

#[tokio::test]
async fn durable_commits_count_the_syncs_and_a_batch_shares_one() {
    let dir = tempfile::tempdir().unwrap();
    let router = app(state(&dir));
    // Each batch's writes reach the writer together, so each batch is exactly one sync (sent
    // one by one, 10-20% of such batches were split over two).
    let batches = 20;
    for batch in 0..batches {
        let calls: Vec<Value> = (0..8)
            .map(|i| json!({"path": "/v1/acquire", "body": acquire_body(&format!("g{batch}-{i}"))}))
            .collect();
        let (status, body) = call(&router, "POST", "/v1/batch", Some(TOKEN), json!({"calls": calls})).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let text = metrics_text(&router).await;
    let commits = series(&text, "idempotency_store_durable_commits_total");
    let operations = series(&text, "idempotency_store_durable_commit_operations_total");
    assert_eq!(
        operations,
        f64::from(8 * batches),
        "every write of the batches was made durable: {text}"
    );
    assert_eq!(commits, f64::from(batches), "one sync per batch: {text}");
    let synced = series(&text, "idempotency_store_durable_commit_sync_seconds_total");
    assert!(
        synced > 0.0 && synced < 60.0,
        "the syncs' time is counted: {text}"
    );

    // A duplicate acquire writes nothing and syncs nothing; scraping again adds nothing.
    let (_, again) = call(&router, "POST", "/v1/acquire", Some(TOKEN), acquire_body("g0-0")).await;
    assert_eq!(again["outcome"], "in_progress");
    let text = metrics_text(&router).await;
    assert_eq!(
        series(&text, "idempotency_store_durable_commits_total"),
        commits,
        "{text}"
    );
    assert_eq!(
        series(&text, "idempotency_store_durable_commit_operations_total"),
        operations,
        "{text}"
    );
    assert_eq!(
        series(&text, "idempotency_store_durable_commit_sync_seconds_total"),
        synced,
        "no sync, no sync time: {text}"
    );

    // One more write: one more sync.
    call(
        &router,
        "POST",
        "/v1/acquire",
        Some(TOKEN),
        acquire_body("g-next"),
    )
    .await;
    let text = metrics_text(&router).await;
    assert_eq!(
        series(&text, "idempotency_store_durable_commits_total"),
        commits + 1.0,
        "{text}"
    );
    assert_eq!(
        series(&text, "idempotency_store_durable_commit_operations_total"),
        operations + 1.0,
        "{text}"
    );
    assert!(
        series(&text, "idempotency_store_durable_commit_sync_seconds_total") > synced,
        "{text}"
    );
}

#[tokio::test]
async fn a_batch_carries_only_proxy_calls_and_needs_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let router = app(state(&dir));
    let batch = |path: &str| json!({"calls": [{"path": path, "body": acquire_body("x")}]});
    let (status, _) = call(&router, "POST", "/v1/batch", None, batch("/v1/acquire")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    for path in ["/v1/checkpoint", "/v1/messages/claim", "/v1/records", "/v1/batch"] {
        let (status, body) = call(&router, "POST", "/v1/batch", Some(TOKEN), batch(path)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {body}");
        assert!(
            body["message"].as_str().unwrap().contains("cannot be batched"),
            "{body}"
        );
    }
    let (status, _) = call(&router, "POST", "/v1/batch", Some(TOKEN), json!({"calls": 1})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, body) = call(&router, "POST", "/v1/batch", Some(TOKEN), json!({"calls": []})).await;
    assert_eq!((status, body), (StatusCode::OK, json!({"replies": []})));
}

#[tokio::test]
async fn a_wait_whose_proxy_went_away_leaves_the_waiter_gauge() {
    let dir = tempfile::tempdir().unwrap();
    let router = app(state(&dir));
    call(&router, "POST", "/v1/acquire", Some(TOKEN), acquire_body("gone")).await;
    let mut waiting = acquire_body("gone");
    waiting["wait_ms"] = json!(30_000);
    let waiter = {
        let router = router.clone();
        tokio::spawn(async move { call(&router, "POST", "/v1/acquire", Some(TOKEN), waiting).await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(
        series(&metrics_text(&router).await, "idempotency_acquire_waiters"),
        1.0
    );
    // The proxy's connection closes: its handler's future is dropped mid-wait.
    waiter.abort();
    let _ = waiter.await;
    assert_eq!(
        series(&metrics_text(&router).await, "idempotency_acquire_waiters"),
        0.0
    );
}
