//! Per-route rollout: rules, route metadata, percentages and shadow mode through real Envoy.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)] // test code

use e2e::{metric_sum, wait_for_metric, ShippedStack, Stack, StackOptions};
use serde_json::{json, Value};

async fn put(client: &reqwest::Client, url: &str, key: &str) -> reqwest::Response {
    client
        .put(format!("{url}/api/v1/orders/ORD-1"))
        .header("Idempotency-Key", key)
        .json(&json!({"qty": 1}))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn plugin_rules_put_two_routes_in_different_modes() {
    let stack = Stack::start_with(StackOptions::plugin(json!({
        "mode": "optional",
        "routes": [
            {"name": "create", "path_exact": "/api/v1/orders", "methods": ["POST"], "mode": "required"},
            {"name": "update", "path_prefix": "/api/v1/orders/", "mode": "shadow"}
        ]
    })))
    .await;
    // Required route: no key → 400.
    let response = stack.post_order(None, &json!({})).send().await.unwrap();
    assert_eq!(response.status(), 400);
    // Shadow route: same key twice executes twice, answers untouched, outcome counted.
    for _ in 0..2 {
        let response = put(&stack.client, &stack.url, "shadow-1").await;
        assert_eq!(response.status(), 200);
        assert!(response.headers().get("idempotent-replayed").is_none());
        // Shadow records on the side, after the response; a real retry comes later than this.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert_eq!(
        stack.executions_of("shadow-1").await,
        2,
        "shadow never blocks or replays"
    );
    let stats = stack.envoy_metrics().await;
    assert_eq!(
        metric_sum(&stats, "idempotency_shadow_executed_total"),
        1.0,
        "{stats}"
    );
    assert_eq!(
        metric_sum(&stats, "idempotency_shadow_would_replay_total"),
        1.0,
        "{stats}"
    );
    // Shadow still records: the record exists for a later switch to optional.
    assert_eq!(stack.record("shadow-1").await.unwrap()["state"], "completed");
}

#[tokio::test]
async fn shadow_never_answers_for_the_store_even_when_it_is_down() {
    let mut stack = Stack::start_with(StackOptions::plugin(json!({"mode": "shadow"}))).await;
    stack.kill_store();
    let response = stack
        .post_order(Some("shadow-down"), &json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let response = stack
        .post_order(Some("not a valid key!"), &json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201, "shadow does not reject bad keys either");
    let stats = stack.envoy_metrics().await;
    assert!(
        metric_sum(&stats, "idempotency_shadow_would_reject_total") >= 1.0,
        "{stats}"
    );
}

#[tokio::test]
async fn route_metadata_sets_modes_per_route_in_the_shipped_two_route_bootstrap() {
    let stack = ShippedStack::start("envoy-two-routes.yaml").await;
    let orders = format!("{}/api/v1/orders", stack.url);
    // POST /api/v1/orders is `required` by route metadata (the plugin default is optional).
    let missing = stack.client.post(&orders).json(&json!({})).send().await.unwrap();
    assert_eq!(missing.status(), 400);
    let body: Value = missing.json().await.unwrap();
    assert_eq!(body["code"], "IDEMPOTENCY_KEY_REQUIRED");

    // PUT /api/v1/orders/* enforces 25% of keys; the rest run in shadow and execute twice.
    let mut enforced = 0;
    let keys: Vec<String> = (0..24).map(|i| format!("pct-{i}")).collect();
    for key in &keys {
        put(&stack.client, &stack.url, key).await;
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let again = put(&stack.client, &stack.url, key).await;
        if again.headers().contains_key("idempotent-replayed") {
            enforced += 1;
            assert_eq!(
                stack.executions_of(key).await,
                1,
                "{key}: enforced keys execute once"
            );
        } else {
            assert_eq!(
                stack.executions_of(key).await,
                2,
                "{key}: shadow keys are never blocked"
            );
        }
    }
    assert!(
        (1..=14).contains(&enforced),
        "{enforced} of 24 keys enforced at 25%"
    );
    // `mode: off` written unquoted (YAML boolean false) turns the legacy route off.
    for _ in 0..2 {
        let legacy = stack
            .client
            .put(format!("{}/api/v1/orders/legacy", stack.url))
            .header("Idempotency-Key", "legacy")
            .json(&json!({"qty": 1}))
            .send()
            .await
            .unwrap();
        assert_eq!(legacy.status(), 200);
        assert!(!legacy.headers().contains_key("idempotent-replayed"));
    }
    assert_eq!(
        stack.executions_of("legacy").await,
        2,
        "untracked on the `off` route"
    );

    let name = "idempotency_shadow_would_replay_total";
    let expected = f64::from(24 - enforced);
    let stats = wait_for_metric(
        &stack.client,
        &format!("{}/stats/prometheus", stack.admin_url),
        name,
        expected,
    )
    .await;
    assert_eq!(
        metric_sum(&stats, name),
        expected,
        "every shadowed retry counted as a would-be replay"
    );
}
