//! Internal headers are ours alone; stored and replayed headers are filtered; oversize bodies.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)] // test code

use e2e::{Stack, StackOptions};
use serde_json::{json, Value};

#[tokio::test]
async fn client_forged_internal_headers_never_reach_the_upstream() {
    let stack = Stack::start().await;
    let response = stack
        .post_order(Some("forged-1"), &json!({}))
        .header("x-idempotency-fencing-token", "999")
        .header("x-idempotency-recovery-point", "notify_sent")
        .header("x-idempotency-anything", "evil")
        .send()
        .await
        .unwrap();
    let body: Value = response.json().await.unwrap();
    let seen = &body["idempotency"];
    assert_eq!(
        seen["x-idempotency-fencing-token"], "1",
        "the filter's token, not the client's"
    );
    assert!(seen.get("x-idempotency-recovery-point").is_none());
    assert!(seen.get("x-idempotency-anything").is_none());
    assert_eq!(seen["x-idempotency-key"], "forged-1");

    // Untracked requests are cleaned too.
    let get: Value = stack
        .client
        .get(format!("{}/api/v1/orders", stack.url))
        .header("x-idempotency-fencing-token", "999")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(get["idempotency"], json!({}));
    let keyless: Value = stack
        .post_order(None, &json!({}))
        .header("x-idempotency-record-id", "forged")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(keyless["idempotency"], json!({}));
}

#[tokio::test]
async fn replay_keeps_location_etag_content_type_but_not_date_or_cookies() {
    let stack = Stack::start().await;
    stack.post_order(Some("hdr-1"), &json!({})).send().await.unwrap();
    let record = stack.record("hdr-1").await.unwrap();
    let names: Vec<String> = record["response"]["headers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|pair| pair[0].as_str().unwrap().to_owned())
        .collect();
    for kept in ["location", "etag", "content-type"] {
        assert!(names.contains(&kept.to_owned()), "{kept} in {names:?}");
    }
    for dropped in [
        "date",
        "content-length",
        "server",
        "x-envoy-upstream-service-time",
    ] {
        assert!(!names.contains(&dropped.to_owned()), "{dropped} in {names:?}");
    }
}

#[tokio::test]
async fn response_over_max_response_size_is_recorded_without_body_and_replayed_with_a_marker() {
    let stack = Stack::start_with(StackOptions::plugin(json!({"max_response_size": 1024}))).await;
    let first = stack
        .post_order(Some("huge-1"), &json!({}))
        .header("x-demo-response-bytes", "200000")
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 201);
    assert!(
        first.text().await.unwrap().len() > 200_000,
        "the first client gets the whole body"
    );

    let replay = stack
        .post_order(Some("huge-1"), &json!({}))
        .header("x-demo-response-bytes", "200000")
        .send()
        .await
        .unwrap();
    assert_eq!(replay.status(), 201);
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert_eq!(replay.headers()["idempotent-body-omitted"], "true");
    assert_eq!(replay.text().await.unwrap(), "");
    assert_eq!(
        stack.executions_of("huge-1").await,
        1,
        "never silently re-executed"
    );
}

/// Header values that are not UTF-8 (obs-text bytes, which Envoy passes through) reach the
/// filter as text with replacement characters: such a request still runs once and is replayed,
/// a key made of such bytes is refused with a 400 that names the character, and the Wasm VM
/// keeps serving.
#[tokio::test]
async fn header_values_that_are_not_utf8_are_served_once_and_a_key_of_them_is_refused() {
    use reqwest::header::HeaderValue;
    let stack = Stack::start().await;
    let note = HeaderValue::from_bytes(b"caf\xe9 \xff\xfe").unwrap();
    for attempt in 0..2 {
        let response = stack
            .post_order(Some("not-utf8-1"), &json!({"n": 1}))
            .header("x-note", note.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201, "attempt {attempt}");
        assert_eq!(
            response.headers().contains_key("idempotent-replayed"),
            attempt == 1,
            "attempt {attempt}: the second is a replay"
        );
    }
    assert_eq!(stack.executions_of("not-utf8-1").await, 1);

    let response = stack
        .post_order(None, &json!({}))
        .header("idempotency-key", HeaderValue::from_bytes(b"order-\xff").unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "IDEMPOTENCY_KEY_INVALID", "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("position 7"),
        "the message says where: {body}"
    );

    let after = stack
        .post_order(Some("not-utf8-2"), &json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(after.status(), 201, "the VM still serves");
    assert_eq!(stack.executions_of("not-utf8-2").await, 1);
}
