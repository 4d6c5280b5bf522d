//! The filter checks its store route when it starts: a `store_cluster` Envoy does not have, or
//! one that leads somewhere other than the store's API, is named in Envoy's log with the fix,
//! while requests keep failing closed as for any store outage.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::time::{Duration, Instant};

use e2e::{Stack, StackOptions};
use serde_json::json;

async fn logged_within(stack: &Stack, needle: &str, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let log = std::fs::read_to_string(stack.dir().join("envoy.log")).unwrap_or_default();
        if log.contains(needle) || Instant::now() > deadline {
            return log;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_store_cluster_envoy_does_not_have_is_named_at_start_up() {
    let stack = Stack::start_with(StackOptions::plugin(json!({"store_cluster": "idempotency_stor"}))).await;
    let log = logged_within(&stack, "not a cluster of this Envoy", Duration::from_secs(10)).await;
    assert!(
        log.contains("store_cluster \"idempotency_stor\"") && log.contains("not a cluster of this Envoy"),
        "{log}"
    );
    let refused = stack.post_order(Some("k1"), &json!({})).send().await.unwrap();
    assert_eq!(refused.status(), 503, "fails closed, as for a store outage");
    assert_eq!(stack.executions_of("k1").await, 0);
}

#[tokio::test]
async fn a_store_cluster_that_leads_elsewhere_is_named_at_start_up() {
    // `orders` is the demo service: it answers /healthz, but not as the store.
    let stack = Stack::start_with(StackOptions::plugin(json!({"store_cluster": "orders"}))).await;
    let log = logged_within(&stack, "without the store's mark", Duration::from_secs(10)).await;
    assert!(
        log.contains("store_cluster \"orders\"") && log.contains("without the store's mark"),
        "{log}"
    );
}

#[tokio::test]
async fn the_right_store_cluster_logs_no_error() {
    let stack = Stack::start().await;
    // The check runs on the first tick; give it the time the failing cases needed.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let log = std::fs::read_to_string(stack.dir().join("envoy.log")).unwrap();
    let complaints: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("[error]") && l.contains("store_cluster"))
        .collect();
    assert!(complaints.is_empty(), "{complaints:?}");
}
