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

/// A stack scoped by `x-tenant-id` that fingerprints `x-currency`.
async fn tenant_and_currency_stack() -> Stack {
    Stack::start_with(StackOptions::plugin(json!({
        "scope_from": ["header:x-tenant-id"],
        "fingerprint_headers": ["x-currency"],
    })))
    .await
}

/// Scope and fingerprint headers whose values are not UTF-8 (obs-text bytes, which Envoy passes
/// through) are told apart by their bytes: two tenants that differ only in such bytes get a
/// record each, and a retry whose fingerprinted header differs only there is a different request
/// (422), not a replay of someone else's answer.
#[tokio::test]
async fn scope_and_fingerprint_headers_that_are_not_utf8_are_told_apart_by_their_bytes() {
    use reqwest::header::HeaderValue;
    let stack = tenant_and_currency_stack().await;
    let send = |tenant: &'static [u8], currency: &'static [u8]| {
        stack
            .post_order(Some("bytes-key"), &json!({"sku": "A"}))
            .header("x-tenant-id", HeaderValue::from_bytes(tenant).unwrap())
            .header("x-currency", HeaderValue::from_bytes(currency).unwrap())
            .send()
    };
    let a = send(b"tenant-\xff", b"\xe9").await.unwrap();
    assert_eq!(a.status(), 201);
    let a: Value = a.json().await.unwrap();
    let b = send(b"tenant-\xfe", b"\xe9").await.unwrap();
    assert_eq!(b.status(), 201);
    assert!(
        b.headers().get("idempotent-replayed").is_none(),
        "another tenant's bytes: another record"
    );
    let b: Value = b.json().await.unwrap();
    assert_ne!(a["orderId"], b["orderId"]);
    assert_eq!(stack.executions_of("bytes-key").await, 2);

    let a_again = send(b"tenant-\xff", b"\xe9").await.unwrap();
    assert_eq!(a_again.headers()["idempotent-replayed"], "true");
    let a_again: Value = a_again.json().await.unwrap();
    assert_eq!(a_again["orderId"], a["orderId"], "each tenant replays its own");

    let other_currency = send(b"tenant-\xff", b"\xe8").await.unwrap();
    assert_eq!(
        other_currency.status(),
        422,
        "other fingerprinted bytes: other parameters"
    );
    let body: Value = other_currency.json().await.unwrap();
    assert_eq!(body["code"], "IDEMPOTENCY_PARAMETER_MISMATCH", "{body}");
    assert_eq!(stack.executions_of("bytes-key").await, 2);
}

/// A scope or fingerprint header sent on two field lines counts both, as HTTP joins them: a
/// retry that adds a second currency line is another request (422), and a second tenant line
/// does not borrow the first tenant's record.
#[tokio::test]
async fn scope_and_fingerprint_headers_count_every_field_line() {
    let stack = tenant_and_currency_stack().await;
    let send = |tenants: &'static [&'static str], currencies: &'static [&'static str]| {
        let mut request = stack.post_order(Some("lines-key"), &json!({"sku": "A"}));
        for tenant in tenants {
            request = request.header("x-tenant-id", *tenant);
        }
        for currency in currencies {
            request = request.header("x-currency", *currency);
        }
        request.send()
    };
    let first = send(&["acme"], &["EUR"]).await.unwrap();
    assert_eq!(first.status(), 201);
    let first: Value = first.json().await.unwrap();

    let second_currency = send(&["acme"], &["EUR", "USD"]).await.unwrap();
    assert_eq!(
        second_currency.status(),
        422,
        "a second currency line is another request"
    );

    let joined = send(&["acme"], &["EUR, USD"]).await.unwrap();
    assert_eq!(joined.status(), 422, "the same as one line holding both");

    let second_tenant = send(&["acme", "mallory"], &["EUR"]).await.unwrap();
    assert_eq!(second_tenant.status(), 201);
    assert!(
        second_tenant.headers().get("idempotent-replayed").is_none(),
        "a second tenant line is another caller, not acme"
    );
    let second_tenant: Value = second_tenant.json().await.unwrap();
    assert_ne!(second_tenant["orderId"], first["orderId"]);

    let acme_again = send(&["acme"], &["EUR"]).await.unwrap();
    assert_eq!(acme_again.headers()["idempotent-replayed"], "true");
    assert_eq!(stack.executions_of("lines-key").await, 2);
}
