//! Caller isolation and smarter fingerprints through real Envoy.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)] // test code

use e2e::{Stack, StackOptions};
use serde_json::{json, Value};

#[tokio::test]
async fn a_caller_never_receives_another_callers_response_for_the_same_key() {
    let stack = Stack::start_with(StackOptions::plugin(
        json!({"scope_from": ["header:x-tenant-id"]}),
    ))
    .await;
    let order = json!({"sku": "A"});
    let send = |tenant: &'static str| {
        stack
            .post_order(Some("shared-key"), &order)
            .header("x-tenant-id", tenant)
            .send()
    };
    let a: Value = send("tenant-a").await.unwrap().json().await.unwrap();
    let b = send("tenant-b").await.unwrap();
    assert!(
        b.headers().get("idempotent-replayed").is_none(),
        "B is a different record"
    );
    let b: Value = b.json().await.unwrap();
    assert_ne!(a["orderId"], b["orderId"]);
    assert_eq!(stack.executions_of("shared-key").await, 2);
    // Each caller replays its own response.
    let a_again: Value = send("tenant-a").await.unwrap().json().await.unwrap();
    let b_again: Value = send("tenant-b").await.unwrap().json().await.unwrap();
    assert_eq!(a_again["orderId"], a["orderId"]);
    assert_eq!(b_again["orderId"], b["orderId"]);
    assert_eq!(stack.executions_of("shared-key").await, 2);
}

#[tokio::test]
async fn authorization_scoping_isolates_credentials() {
    let stack = Stack::start_with(StackOptions::plugin(
        json!({"scope_from": ["authorization"], "scope_secret": "e2e-scope-secret-0001"}),
    ))
    .await;
    let order = json!({"sku": "A"});
    for token in ["Bearer alice", "Bearer mallory"] {
        let response = stack
            .post_order(Some("auth-key"), &order)
            .header("authorization", token)
            .send()
            .await
            .unwrap();
        assert!(response.headers().get("idempotent-replayed").is_none(), "{token}");
    }
    assert_eq!(stack.executions_of("auth-key").await, 2);
}

#[tokio::test]
async fn reordered_json_is_the_same_request_and_excluded_fields_do_not_count() {
    let stack = Stack::start_with(StackOptions::plugin(
        json!({"exclude_fields": ["/clientTimestamp"]}),
    ))
    .await;
    let send = |body: &'static str| {
        stack
            .client
            .post(format!("{}/api/v1/orders", stack.url))
            .header("Idempotency-Key", "canon-1")
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    assert_eq!(
        send(r#"{"sku":"A","qty":2,"clientTimestamp":"10:00"}"#)
            .await
            .unwrap()
            .status(),
        201
    );
    let reordered = send("{\n  \"qty\": 2, \"clientTimestamp\": \"10:09\",\n  \"sku\": \"A\"\n}")
        .await
        .unwrap();
    assert_eq!(reordered.headers()["idempotent-replayed"], "true");
    let changed = send(r#"{"sku":"A","qty":3}"#).await.unwrap();
    assert_eq!(changed.status(), 422);
    assert_eq!(stack.executions_of("canon-1").await, 1);
}
