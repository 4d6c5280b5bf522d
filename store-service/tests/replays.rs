//! gRPC replays: the replay listener's router serves `/v1/replay` and nothing else, the API's
//! router no replay; a ticket names one record — purged and created again with other
//! parameters inside the ticket's life, the record is not served to it.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use idempotency_store::api::{app, replay_app, AppState};
use idempotency_store::metrics::Metrics;
use idempotency_store::storage::embedded::EmbeddedStorage;
use serde_json::{json, Value};
use tower::ServiceExt;

const TOKEN: &str = "test-token-000000001";

fn state(dir: &tempfile::TempDir) -> AppState {
    AppState::new(
        Arc::new(EmbeddedStorage::open(&dir.path().join("store-data")).unwrap()),
        Metrics::new().unwrap(),
        Some(Arc::from(TOKEN)),
    )
}

async fn send(router: &axum::Router, request: Request<Body>) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
    let response = router.clone().oneshot(request).await.unwrap();
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes().to_vec();
    (parts.status, parts.headers, bytes)
}

async fn api(router: &axum::Router, method: &str, path: &str, body: Value) -> Value {
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(Body::from(body.to_string()))
        .unwrap();
    let (status, _, bytes) = send(router, request).await;
    assert!(status.is_success(), "{method} {path}: {status}");
    serde_json::from_slice(&bytes).unwrap_or(Value::Null)
}

fn acquire(fingerprint: &str) -> Value {
    json!({"service": "orders", "scope": "", "key": "g1", "fingerprint": fingerprint, "method": "POST",
           "path": "/demo.Orders/Create", "lock_timeout_ms": 60000, "retention_ms": 60000, "replay_ticket": true})
}

/// Acquire and complete key `g1` with `fingerprint`, answering `body` (base64).
async fn executed(router: &axum::Router, fingerprint: &str, body: &str) {
    let lock = api(router, "POST", "/v1/acquire", acquire(fingerprint)).await;
    assert_eq!(lock["outcome"], "acquired");
    let complete = json!({"service": "orders", "scope": "", "key": "g1", "fencing_token": lock["fencing_token"],
        "record_id": lock["record_id"], "attempt_id": lock["attempt_id"], "retention_ms": 60000,
        "response": {"status": 200, "headers": [["content-type", "application/grpc"]], "body": body,
                     "trailers": [["grpc-status", "0"]]}});
    api(router, "POST", "/v1/complete", complete).await;
}

fn replay(ticket: &str) -> Request<Body> {
    Request::builder()
        .method("POST")
        .uri("/v1/replay")
        .header("x-idempotency-replay-ticket", ticket)
        .body(Body::empty())
        .unwrap()
}

#[tokio::test]
async fn the_replay_listener_serves_replays_only_and_the_api_none() {
    let dir = tempfile::tempdir().unwrap();
    let state = state(&dir);
    let (api_router, replays) = (app(state.clone()), replay_app(state));
    executed(&api_router, "fp-1", "AAAAAAA=").await;
    let completed = api(&api_router, "POST", "/v1/acquire", acquire("fp-1")).await;
    let ticket = completed["replay_ticket"].as_str().unwrap();

    let (status, headers, body) = send(&replays, replay(ticket)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["x-idempotency-store"], "replay");
    assert_eq!(headers["idempotent-replayed"], "true");
    assert_eq!(body, [0, 0, 0, 0, 0]);
    let (status, headers, _) = send(&api_router, replay(ticket)).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "no replay on the API's listener");
    assert_eq!(headers["x-idempotency-store"], "api");
    for path in [
        "/v1/acquire",
        "/v1/records?service=orders&scope=&key=g1",
        "/metrics",
        "/readyz",
        "/healthz",
    ] {
        let request = Request::builder()
            .method(if path == "/v1/acquire" { "POST" } else { "GET" })
            .uri(path)
            .header("authorization", format!("Bearer {TOKEN}"))
            .header("content-type", "application/json")
            .body(Body::from(acquire("fp-1").to_string()))
            .unwrap();
        let (status, _, _) = send(&replays, request).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path} on the replay listener");
    }
}

#[tokio::test]
async fn a_ticket_is_not_served_a_record_purged_and_created_again_with_other_parameters() {
    let dir = tempfile::tempdir().unwrap();
    let state = state(&dir);
    let (api_router, replays) = (app(state.clone()), replay_app(state));
    executed(&api_router, "fp-1", "AAAAAAE=").await;
    let completed = api(&api_router, "POST", "/v1/acquire", acquire("fp-1")).await;
    let ticket = completed["replay_ticket"].as_str().unwrap().to_owned();

    api(
        &api_router,
        "DELETE",
        "/v1/records?service=orders&scope=&key=g1",
        Value::Null,
    )
    .await;
    executed(&api_router, "fp-2", "AAAAAAI=").await;
    let (status, headers, body) = send(&replays, replay(&ticket)).await;
    assert_eq!(status, StatusCode::OK, "a gRPC answer");
    assert_eq!(
        headers["grpc-status"], "14",
        "UNAVAILABLE: the client retries with its key"
    );
    assert!(headers["grpc-message"].to_str().unwrap().contains("changed"));
    assert!(
        headers.get("idempotent-replayed").is_none() && body.is_empty(),
        "not the new record's response"
    );
    // Purged and created again with the same parameters: still another record, not served.
    api(
        &api_router,
        "DELETE",
        "/v1/records?service=orders&scope=&key=g1",
        Value::Null,
    )
    .await;
    executed(&api_router, "fp-1", "AAAAAAM=").await;
    let (_, headers, _) = send(&replays, replay(&ticket)).await;
    assert_eq!(headers["grpc-status"], "14");
}
