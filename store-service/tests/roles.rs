//! The role matrix: every `/v1` endpoint × every role → allowed or 403 naming the permission;
//! unknown tokens → 401; proxy and service credentials act only for their own services, and the
//! proxy API never touches a consumer's message records.

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
use idempotency_store::api::{app, AppState};
use idempotency_store::auth::Authenticator;
use idempotency_store::metrics::Metrics;
use idempotency_store::storage::embedded::EmbeddedStorage;
use serde_json::{json, Value};
use tower::ServiceExt;

const PROXY: &str = "proxy-token-0000001";
const ORDERS: &str = "orders-token-000001";
const ADMIN: &str = "admin-token-0000001";

fn router(dir: &tempfile::TempDir) -> axum::Router {
    let path = dir.path().join("credentials.yaml");
    std::fs::write(
        &path,
        format!(
            "credentials:\n  - {{name: mesh-proxies, role: proxy, services: [orders], tokens: [{PROXY}]}}\n  - {{name: orders-service, role: service, services: [orders], tokens: [{ORDERS}]}}\n  - {{name: oncall, role: admin, tokens: [{ADMIN}]}}\n"
        ),
    )
    .unwrap();
    let state = AppState {
        auth: Some(Arc::new(Authenticator::new(Some(path), None).unwrap())),
        ..AppState::new(
            Arc::new(EmbeddedStorage::open(&dir.path().join("store-data")).unwrap()),
            Metrics::new().unwrap(),
            None,
        )
    };
    app(state)
}

async fn call(
    router: &axum::Router,
    method: &str,
    path: &str,
    token: &str,
    body: Value,
) -> (StatusCode, Value) {
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {token}"))
        .body(Body::from(body.to_string()))
        .unwrap();
    let response = router.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

fn identity(service: &str) -> Value {
    json!({"service": service, "scope": "", "key": "k1"})
}

fn with(mut base: Value, extra: Value) -> Value {
    for (k, v) in extra.as_object().unwrap() {
        base[k] = v.clone();
    }
    base
}

/// (method, path, body, permission) of every authenticated endpoint, for service `orders`.
fn endpoints() -> Vec<(&'static str, String, Value, &'static str)> {
    let id = identity("orders");
    let holder = json!({"record_id": "r", "fencing_token": 1});
    let message = json!({"service": "orders", "topic": "t", "consumer_group": "g", "message_id": "m"});
    vec![
        (
            "POST",
            "/v1/acquire".into(),
            with(
                id.clone(),
                json!({"fingerprint": "f", "method": "POST", "path": "/", "lock_timeout_ms": 1000, "retention_ms": 1000}),
            ),
            "proxy",
        ),
        (
            "POST",
            "/v1/complete".into(),
            with(
                with(id.clone(), holder.clone()),
                json!({"response": {"status": 200}}),
            ),
            "proxy",
        ),
        (
            "POST",
            "/v1/release".into(),
            with(id.clone(), holder.clone()),
            "proxy",
        ),
        (
            "POST",
            "/v1/outcome-unknown".into(),
            with(with(id.clone(), holder.clone()), json!({"reason": "x"})),
            "proxy",
        ),
        (
            "POST",
            "/v1/abandon".into(),
            with(id.clone(), json!({"attempt_id": "a"})),
            "proxy",
        ),
        (
            "POST",
            "/v1/checkpoint".into(),
            with(with(id.clone(), holder.clone()), json!({"phase": "p"})),
            "checkpoint",
        ),
        (
            "POST",
            "/v1/messages/claim".into(),
            with(
                message.clone(),
                json!({"lock_timeout_ms": 1000, "retention_ms": 1000}),
            ),
            "messages",
        ),
        (
            "POST",
            "/v1/messages/complete".into(),
            with(message.clone(), holder.clone()),
            "messages",
        ),
        (
            "POST",
            "/v1/messages/release".into(),
            with(message, holder),
            "messages",
        ),
        (
            "GET",
            "/v1/records?service=orders&scope=&key=k1".into(),
            Value::Null,
            "admin:read",
        ),
        (
            "DELETE",
            "/v1/records?service=orders&scope=&key=k1".into(),
            Value::Null,
            "admin:purge",
        ),
    ]
}

#[tokio::test]
async fn each_endpoint_is_allowed_to_its_role_and_forbidden_to_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let router = router(&dir);
    for (method, path, body, permission) in endpoints() {
        for (token, role) in [(PROXY, "proxy"), (ORDERS, "service"), (ADMIN, "admin")] {
            let allowed = match role {
                "proxy" => permission == "proxy",
                "service" => permission == "checkpoint" || permission == "messages",
                _ => permission.starts_with("admin"),
            };
            let (status, answer) = call(&router, method, &path, token, body.clone()).await;
            if allowed {
                assert_ne!(status, StatusCode::FORBIDDEN, "{role} {method} {path}: {answer}");
                assert_ne!(status, StatusCode::UNAUTHORIZED, "{role} {method} {path}");
            } else {
                assert_eq!(status, StatusCode::FORBIDDEN, "{role} {method} {path}: {answer}");
                assert_eq!(answer["error"], "forbidden");
                assert!(
                    answer["message"].as_str().unwrap().contains(permission),
                    "names the missing permission: {answer}"
                );
            }
        }
        let (status, _) = call(&router, method, &path, "not-a-known-token", body.clone()).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {path}");
    }
}

#[tokio::test]
async fn a_service_credential_cannot_act_for_another_service() {
    let dir = tempfile::tempdir().unwrap();
    let router = router(&dir);
    let checkpoint = with(
        identity("payments"),
        json!({"record_id": "r", "fencing_token": 1, "phase": "p"}),
    );
    let (status, answer) = call(&router, "POST", "/v1/checkpoint", ORDERS, checkpoint).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(
        answer["message"].as_str().unwrap().contains("payments"),
        "{answer}"
    );
    let claim = json!({"service": "payments", "topic": "t", "consumer_group": "g", "message_id": "m",
                       "lock_timeout_ms": 1000, "retention_ms": 1000});
    let (status, _) = call(&router, "POST", "/v1/messages/claim", ORDERS, claim).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

/// The five proxy calls (and the same calls inside `/v1/batch`) for `id`.
fn proxy_calls(id: &Value) -> Vec<(&'static str, Value)> {
    let holder = json!({"record_id": "r", "fencing_token": 1, "attempt_id": "a"});
    vec![
        (
            "/v1/acquire",
            with(
                id.clone(),
                json!({"fingerprint": "f", "method": "POST", "path": "/", "lock_timeout_ms": 1000, "retention_ms": 1000}),
            ),
        ),
        (
            "/v1/complete",
            with(
                with(id.clone(), holder.clone()),
                json!({"response": {"status": 200}}),
            ),
        ),
        ("/v1/release", with(id.clone(), holder.clone())),
        (
            "/v1/outcome-unknown",
            with(with(id.clone(), holder), json!({"reason": "x"})),
        ),
        ("/v1/abandon", with(id.clone(), json!({"attempt_id": "a"}))),
    ]
}

#[tokio::test]
async fn a_proxy_credential_acts_only_for_its_services_alone_and_in_batches() {
    let dir = tempfile::tempdir().unwrap();
    let router = router(&dir);
    for (path, body) in proxy_calls(&identity("payments")) {
        let (status, answer) = call(&router, "POST", path, PROXY, body.clone()).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}: {answer}");
        let message = answer["message"].as_str().unwrap();
        assert!(
            message.contains("mesh-proxies") && message.contains("proxy") && message.contains("payments"),
            "names credential, permission and service: {answer}"
        );
        let batch = json!({"calls": [{"path": path, "body": body}]});
        let (status, answer) = call(&router, "POST", "/v1/batch", PROXY, batch).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert_eq!(answer["replies"][0]["status"], 403, "{path} in a batch: {answer}");
        assert!(
            answer["replies"][0]["body"]["message"]
                .as_str()
                .unwrap()
                .contains("payments"),
            "{answer}"
        );
    }
    // Its own service still works.
    let (path, body) = proxy_calls(&identity("orders")).remove(0);
    let (status, answer) = call(&router, "POST", path, PROXY, body).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["outcome"], "acquired");
}

#[tokio::test]
async fn a_proxy_credential_cannot_complete_a_consumers_message_so_the_consumer_still_handles_it() {
    let dir = tempfile::tempdir().unwrap();
    let router = router(&dir);
    // The record a claim of message m on topic t, group g of `orders` maps to.
    let message_scope = json!({"service": "orders", "scope": "message:1:t:g", "key": "m"});
    for (path, body) in proxy_calls(&message_scope) {
        let (status, answer) = call(&router, "POST", path, PROXY, body.clone()).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}: {answer}");
        assert!(
            answer["message"].as_str().unwrap().contains("/v1/messages"),
            "says where messages are claimed: {answer}"
        );
        let batch = json!({"calls": [{"path": path, "body": body}]});
        let (_, answer) = call(&router, "POST", "/v1/batch", PROXY, batch).await;
        assert_eq!(answer["replies"][0]["status"], 403, "{path} in a batch: {answer}");
    }
    // The consumer's claim is untouched: it gets the message to handle, not "duplicate".
    let claim = json!({"service": "orders", "topic": "t", "consumer_group": "g", "message_id": "m",
                       "lock_timeout_ms": 1000, "retention_ms": 1000});
    let (status, answer) = call(&router, "POST", "/v1/messages/claim", ORDERS, claim).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["outcome"], "claimed", "{answer}");
}
