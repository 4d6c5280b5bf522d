//! `idempotencyctl` against a running store (embedded and MongoDB), through its real binary:
//! get, purge, locks, stats, and its exit codes.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::process::{Command, Output};
use std::time::Duration;

use e2e::{Stack, StackOptions, STORE_TOKEN};
use serde_json::{json, Value};

fn ctl(store: &str, token: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_idempotencyctl"))
        .arg("--store")
        .arg(store)
        .args(args)
        .env("IDEMPOTENCY_TOKEN", token)
        .output()
        .unwrap()
}

fn text(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr)
}

async fn exercise(stack: Stack) {
    let url = stack.store_url.clone();
    // One completed record, one stuck lock (the client gave up: outcome unknown).
    assert_eq!(
        stack
            .post_order(Some("ctl-done"), &json!({}))
            .send()
            .await
            .unwrap()
            .status(),
        201
    );
    let gave_up = stack
        .post_order(Some("ctl-stuck"), &json!({}))
        .header("x-demo-delay-ms", "1500")
        .timeout(Duration::from_millis(200))
        .send()
        .await;
    assert!(gave_up.is_err());
    tokio::time::sleep(Duration::from_millis(500)).await;

    let get = ctl(
        &url,
        STORE_TOKEN,
        &["get", "--service", "orders", "--key", "ctl-done"],
    );
    assert!(get.status.success(), "{}", text(&get));
    let shown = text(&get);
    assert!(
        shown.contains("state       completed") && shown.contains("response    201"),
        "{shown}"
    );
    assert!(
        shown.contains("body") && shown.contains("orderId"),
        "body preview: {shown}"
    );

    let json_get = ctl(
        &url,
        STORE_TOKEN,
        &["--json", "get", "--service", "orders", "--key", "ctl-stuck"],
    );
    let record: Value = serde_json::from_slice(&json_get.stdout).unwrap();
    assert_eq!(record["state"], "in_progress");
    assert_eq!(record["outcome_unknown"]["reason"], "downstream_disconnect");

    let locks = ctl(
        &url,
        STORE_TOKEN,
        &["locks", "--service", "orders", "--older-than", "0s"],
    );
    assert!(locks.status.success(), "{}", text(&locks));
    let listed = text(&locks);
    assert!(
        listed.contains("ctl-stuck") && listed.contains("downstream_disconnect"),
        "{listed}"
    );
    assert!(
        !listed.contains("ctl-done"),
        "completed records are not locks: {listed}"
    );
    let young = ctl(
        &url,
        STORE_TOKEN,
        &["--json", "locks", "--service", "orders", "--older-than", "1h"],
    );
    assert_eq!(serde_json::from_slice::<Value>(&young.stdout).unwrap(), json!([]));

    let stats = ctl(&url, STORE_TOKEN, &["--json", "stats"]);
    let summary: Value = serde_json::from_slice(&stats.stdout).unwrap();
    assert!(
        summary["idempotency_misses_total"].as_f64().unwrap() >= 2.0,
        "{summary}"
    );
    assert!(
        summary["idempotency_outcome_unknown_total"].as_f64().unwrap() >= 1.0,
        "{summary}"
    );

    let purge = ctl(
        &url,
        STORE_TOKEN,
        &["purge", "--service", "orders", "--key", "ctl-stuck", "--yes"],
    );
    assert!(purge.status.success(), "{}", text(&purge));
    let gone = ctl(
        &url,
        STORE_TOKEN,
        &["get", "--service", "orders", "--key", "ctl-stuck"],
    );
    assert_eq!(gone.status.code(), Some(1), "not found: {}", text(&gone));

    let refused = ctl(&url, "wrong-token-000000000", &["stats"]);
    assert_eq!(refused.status.code(), Some(0), "metrics need no token");
    let refused = ctl(
        &url,
        "wrong-token-000000000",
        &["get", "--service", "orders", "--key", "ctl-done"],
    );
    assert_eq!(refused.status.code(), Some(3), "{}", text(&refused));
    assert!(
        !text(&refused).contains("wrong-token"),
        "the token is never echoed"
    );
    let down = ctl(
        "http://127.0.0.1:9",
        STORE_TOKEN,
        &["get", "--service", "orders", "--key", "k"],
    );
    assert_eq!(down.status.code(), Some(4), "{}", text(&down));
    assert!(text(&down).contains("store unavailable"), "{}", text(&down));
}

#[tokio::test]
async fn get_purge_locks_and_stats_on_the_embedded_backend() {
    exercise(Stack::start().await).await;
}

#[tokio::test]
async fn get_purge_locks_and_stats_on_mongodb() {
    exercise(
        Stack::start_with(StackOptions {
            mongodb: true,
            ..StackOptions::default()
        })
        .await,
    )
    .await;
}
