//! Key validation: missing (optional vs required) and invalid keys.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)] // test code

use e2e::{Stack, StackOptions};
use serde_json::{json, Value};

#[tokio::test]
async fn missing_key_passes_through_untracked_when_optional() {
    let stack = Stack::start().await;
    for _ in 0..2 {
        let response = stack.post_order(None, &json!({"sku": "A"})).send().await.unwrap();
        assert_eq!(response.status(), 201);
    }
    assert_eq!(stack.executions().await["total"], 2, "no key, no deduplication");
}

#[tokio::test]
async fn missing_key_is_400_when_required() {
    let stack = Stack::start_with(StackOptions::plugin(json!({"require_key": true}))).await;
    let response = stack.post_order(None, &json!({"sku": "A"})).send().await.unwrap();
    assert_eq!(response.status(), 400);
    assert_eq!(response.headers()["content-type"], "application/problem+json");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "IDEMPOTENCY_KEY_REQUIRED");
    assert!(body["message"].as_str().unwrap().contains("Idempotency-Key"));
    assert_eq!(stack.executions().await["total"], 0);
    // GET stays allowed without a key on a required route.
    let get = stack
        .client
        .get(format!("{}/api/v1/orders", stack.url))
        .send()
        .await
        .unwrap();
    assert_eq!(get.status(), 200);
}

#[tokio::test]
async fn invalid_keys_are_400_with_a_reason() {
    let stack = Stack::start().await;
    let too_long = "k".repeat(256);
    for (key, reason) in [
        ("has space", "invalid_character"),
        ("semi;colon", "invalid_character"),
        (too_long.as_str(), "too_long"),
        ("\"unterminated", "malformed_quoted_string"),
        ("\"\"", "empty"),
    ] {
        let response = stack.post_order(Some(key), &json!({})).send().await.unwrap();
        assert_eq!(response.status(), 400, "{key}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["code"], "IDEMPOTENCY_KEY_INVALID", "{key}");
        assert_eq!(body["details"]["reason"], reason, "{key}");
        assert!(!body["message"].as_str().unwrap().is_empty());
    }
    assert_eq!(stack.executions().await["total"], 0);
    // 255 characters is still fine.
    let ok = stack
        .post_order(Some(&"k".repeat(255)), &json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 201);
}
