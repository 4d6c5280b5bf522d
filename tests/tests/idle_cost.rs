//! What an idle Envoy pays for the filter: its thread wake-ups, against the same Envoy without
//! the filter, before and after the filter has retried a write through a store outage.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)] // test code

use std::time::{Duration, Instant};

use e2e::envoy_config::{passthrough_bootstrap, Ports};
use e2e::{free_port, replay_of, scheduled, start_envoy, wait_ready, Proc, Stack, StackOptions};
use serde_json::json;

/// Extra wake-ups per second an idle Envoy may have with the filter. The filter's tick fires
/// once a second per VM when nothing waits for a clock (two VMs here: the main thread's and the
/// worker's); a tick at the retry backoff (50 ms) would add ~40, the old fixed 5 ms tick ~800.
const EXTRA_WAKEUPS_PER_SECOND: f64 = 10.0;

/// Wake-ups per second of each Envoy over the same idle seconds.
async fn idle_wakeups_per_second(filtered: &Proc, plain: &Proc) -> (f64, f64) {
    let (filtered, plain) = (filtered.pid().unwrap(), plain.pid().unwrap());
    // Let whatever the last request started settle first.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let wakeups = |pid| scheduled(pid).1;
    let (f0, p0, started) = (wakeups(filtered), wakeups(plain), Instant::now());
    tokio::time::sleep(Duration::from_secs(5)).await;
    let seconds = started.elapsed().as_secs_f64();
    let (f1, p1) = (wakeups(filtered), wakeups(plain));
    let rates = ((f1 - f0) as f64 / seconds, (p1 - p0) as f64 / seconds);
    eprintln!(
        "idle Envoy: {:.1} wake-ups/s with the filter, {:.1} without",
        rates.0, rates.1
    );
    rates
}

#[tokio::test]
async fn an_idle_envoy_wakes_about_as_often_with_the_filter_as_without_also_after_an_outage() {
    let mut stack = Stack::start_with(StackOptions::plugin(json!({
        "record_mode": "async",
        "store_timeout": "1s",
    })))
    .await;
    let demo_port: u16 = stack.demo_url.rsplit(':').next().unwrap().parse().unwrap();
    let plain_ports = Ports {
        listener: free_port(),
        admin: free_port(),
        upstream: demo_port,
        stores: stack.store_ports.clone(),
        replays: Vec::new(),
    };
    let mut plain = start_envoy(
        stack.dir(),
        &passthrough_bootstrap(&plain_ports),
        "envoy-passthrough.log",
    );
    wait_ready(
        &format!("http://127.0.0.1:{}/ready", plain_ports.admin),
        &mut plain,
        Duration::from_secs(60),
    )
    .await;
    // Both have served a request: the filter's VMs are configured and its worker has sent store
    // calls.
    let served = stack.post_order(Some("idle-1"), &json!({})).send().await.unwrap();
    assert_eq!(served.status(), 201);
    let through_plain = stack
        .client
        .post(format!("http://127.0.0.1:{}/api/v1/orders", plain_ports.listener))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert!(through_plain.status().is_success());

    let (with_filter, without) = idle_wakeups_per_second(&stack.envoy, &plain).await;
    assert!(
        with_filter - without < EXTRA_WAKEUPS_PER_SECOND,
        "idle: {with_filter:.1} wake-ups/s with the filter, {without:.1} without"
    );

    // The store goes away while a record is being written: the filter retries the write on its
    // tick until the store is back (it must not stop ticking then), and must go back to idle after.
    let original = stack.answered_with_the_store_killed("idle-2", 500).await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    stack.restart_store().await;
    let replayed = replay_of("idle-2", || stack.post_order(Some("idle-2"), &json!({}))).await;
    assert_eq!(replayed, original);
    assert_eq!(stack.executions_of("idle-2").await, 1);

    let (with_filter, without) = idle_wakeups_per_second(&stack.envoy, &plain).await;
    assert!(
        with_filter - without < EXTRA_WAKEUPS_PER_SECOND,
        "idle after the outage: {with_filter:.1} wake-ups/s with the filter, {without:.1} without"
    );
    plain.kill();
}
