//! What an upstream's status proves, from the client's side: a gateway between Envoy and the app
//! that gives up waiting (nginx's 504, a 502) says nothing about the work, so the lock is kept and
//! a retry never runs the request again; a status where the service says it did not do the work
//! (500, 503, 429, 408, 425) releases it. Executions are counted by the demo service's ledger.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)] // test code

use std::time::{Duration, Instant};

use e2e::gateway::{envoy_in_front_of, impatient_hop};
use e2e::{demo_executions, free_port, spawn_demo, wait_ready};
use serde_json::{json, Value};

/// A demo service behind an nginx-like hop that gives up after 300 ms, behind Envoy with the
/// filter configured by `plugin`. Returns (Envoy URL, demo URL, processes to keep alive).
async fn app_behind_an_impatient_hop(
    dir: &std::path::Path,
    plugin: &Value,
) -> (String, String, Vec<e2e::Proc>) {
    let demo_port = free_port();
    let mut demo = spawn_demo(dir, demo_port, free_port());
    wait_ready(
        &format!("http://127.0.0.1:{demo_port}/healthz"),
        &mut demo,
        Duration::from_secs(30),
    )
    .await;
    let hop = impatient_hop(demo_port, Duration::from_millis(300)).await;
    let (url, store, envoy) = envoy_in_front_of(dir, hop, plugin, |_| {}).await;
    (
        url,
        format!("http://127.0.0.1:{demo_port}"),
        vec![demo, store, envoy],
    )
}

/// One keyed POST the app takes 1 s over (the hop answers 504 at 300 ms, the app finishes), then
/// a retry once the app is done. Returns (the retry's status, executions of the key).
async fn slow_order_then_retry(url: &str, demo_url: &str, key: &str) -> (u16, u64) {
    let client = reqwest::Client::new();
    let post = || {
        client
            .post(format!("{url}/api/v1/orders"))
            .header("Idempotency-Key", key)
            .json(&json!({"sku": "SLOW"}))
    };
    let first = post().header("x-demo-delay-ms", "1000").send().await.unwrap();
    assert_eq!(first.status(), 504, "the hop gave up waiting");
    // The app finishes the order after the hop left.
    let deadline = Instant::now() + Duration::from_secs(10);
    while demo_executions(&client, demo_url).await["byKey"][key] != 1 {
        assert!(Instant::now() < deadline, "the app never ran the order");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(900)).await;
    let retry = post().send().await.unwrap();
    let status = retry.status().as_u16();
    let executions = demo_executions(&client, demo_url).await["byKey"][key]
        .as_u64()
        .unwrap_or(0);
    (status, executions)
}

#[tokio::test]
async fn a_gateway_that_gave_up_waiting_proves_nothing_so_the_retry_does_not_run_again() {
    let dir = tempfile::tempdir().unwrap();
    let (url, demo_url, _procs) = app_behind_an_impatient_hop(dir.path(), &json!({})).await;
    let (status, executions) = slow_order_then_retry(&url, &demo_url, "hop-504").await;
    assert_eq!(status, 409, "the lock is kept: the order may exist");
    assert_eq!(executions, 1, "the app ran the order once");

    // The release list of before (every 5xx) runs the order a second time: the hazard.
    let dir = tempfile::tempdir().unwrap();
    let (url, demo_url, _procs) = app_behind_an_impatient_hop(
        dir.path(),
        &json!({"release_statuses": ["5xx"], "unknown_statuses": []}),
    )
    .await;
    let (status, executions) = slow_order_then_retry(&url, &demo_url, "hop-504-old").await;
    assert_eq!(status, 201);
    assert_eq!(executions, 2, "released on a 504, the retry ran it again");
}

#[tokio::test]
async fn statuses_that_say_not_done_release_and_502_keeps_the_lock() {
    let dir = tempfile::tempdir().unwrap();
    let (url, demo_url, _procs) = app_behind_an_impatient_hop(dir.path(), &json!({})).await;
    let client = reqwest::Client::new();
    for (status, released) in [
        ("500", true),
        ("503", true),
        ("429", true),
        ("408", true),
        ("425", true),
        ("502", false),
    ] {
        let key = format!("status-{status}");
        let post = || {
            client
                .post(format!("{url}/api/v1/orders"))
                .header("Idempotency-Key", &key)
                .json(&json!({}))
        };
        let failed = post().header("x-demo-fail", status).send().await.unwrap();
        assert_eq!(failed.status().as_str(), status);
        let retry = post().send().await.unwrap();
        let executions = demo_executions(&client, &demo_url).await["byKey"][&key]
            .as_u64()
            .unwrap_or(0);
        if released {
            assert_eq!(retry.status(), 201, "{status} released: the retry runs");
            assert_eq!(executions, 2, "{status}");
        } else {
            assert_eq!(retry.status(), 409, "{status} keeps the lock");
            let body: Value = retry.json().await.unwrap();
            assert_eq!(executions, 1, "{status}: {body}");
        }
    }
}
