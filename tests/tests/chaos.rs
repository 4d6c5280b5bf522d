//! Fault injection with real processes: concurrent retries over many keys, the store killed and
//! restarted under load, a slow store, the upstream killed mid-request, Envoy restarted under
//! load, a gateway route that retries in front of an upstream that resets after the work. Zero
//! duplicate executions, zero completed records lost, every failure a clean status.
//!
//! Scale: `CHAOS_KEYS` keys × `CHAOS_PER_KEY` concurrent requests per key (short defaults for
//! `make test`; `make chaos` runs 1000 × 64). Each scenario writes its figures to
//! `target/chaos/<scenario>.json`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)] // test code

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use e2e::{repo_root, Stack, StackOptions};
use futures::StreamExt;
use serde_json::{json, Value};

/// The load scenarios run one at a time: on two cores, two storms at once would measure CPU
/// starvation (callout timeouts → 503) instead of the guarantees.
static ONE_STORM_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Plugin settings for storms: a generous callout timeout, so an overloaded 2-core machine does
/// not turn slow acquires into 503s (fail-closed is tested on its own below).
fn storm_options() -> StackOptions {
    StackOptions::plugin(json!({"store_timeout": "10s"}))
}

fn scale() -> (usize, usize) {
    let read = |name: &str, default: usize| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    (read("CHAOS_KEYS", 60), read("CHAOS_PER_KEY", 16))
}

/// What the clients saw.
#[derive(Debug, Default)]
struct Tally {
    requests: usize,
    first_executions: BTreeMap<String, usize>,
    bodies: BTreeMap<String, String>,
    replays: usize,
    conflicts: usize,
    unavailable: usize,
    transport_errors: usize,
    other: Vec<u16>,
}

#[derive(Clone)]
struct Load {
    client: reqwest::Client,
    url: String,
}

impl Load {
    fn of(stack: &Stack) -> Load {
        Load {
            client: reqwest::Client::builder()
                .pool_max_idle_per_host(512)
                .build()
                .unwrap(),
            url: stack.url.clone(),
        }
    }

    /// `per_key` requests for every key, the ones of one key in flight together.
    async fn storm(&self, keys: Vec<String>, per_key: usize, in_flight: usize, delay_ms: u64) -> Tally {
        let requests = keys
            .iter()
            .flat_map(|k| std::iter::repeat_n(k.clone(), per_key))
            .collect::<Vec<_>>();
        let results = futures::stream::iter(requests.into_iter().map(|key| {
            let load = self.clone();
            async move {
                let response = load
                    .client
                    .post(format!("{}/api/v1/orders", load.url))
                    .header("Idempotency-Key", &key)
                    .header("x-demo-delay-ms", delay_ms.to_string())
                    .json(&json!({"sku": "CHAOS", "key": key}))
                    .send()
                    .await;
                match response {
                    Ok(r) => {
                        let status = r.status().as_u16();
                        let replayed = r.headers().contains_key("idempotent-replayed");
                        let body = r.text().await.unwrap_or_default();
                        (key, Some((status, replayed, body)))
                    }
                    Err(_) => (key, None),
                }
            }
        }))
        .buffer_unordered(in_flight)
        .collect::<Vec<_>>()
        .await;
        let mut tally = Tally::default();
        for (key, outcome) in results {
            tally.requests += 1;
            match outcome {
                None => tally.transport_errors += 1,
                Some((201, false, body)) => {
                    *tally.first_executions.entry(key.clone()).or_insert(0) += 1;
                    tally.bodies.insert(key, body);
                }
                Some((201, true, _)) => tally.replays += 1,
                Some((409, _, _)) => tally.conflicts += 1,
                Some((503, _, _)) => tally.unavailable += 1,
                Some((status, _, _)) => tally.other.push(status),
            }
        }
        tally
    }
}

/// A client that gives up after `patience` and sends the same keyed `order` again every 300 ms,
/// `attempts` times in all; the status of each try (0: it gave up or could not connect).
async fn impatient_client(
    order: impl Fn() -> reqwest::RequestBuilder,
    attempts: usize,
    patience: Duration,
) -> Vec<u16> {
    let mut seen = Vec::new();
    for attempt in 0..attempts {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let outcome = order().timeout(patience).send().await;
        seen.push(outcome.map(|r| r.status().as_u16()).unwrap_or(0));
    }
    seen
}

fn keys(prefix: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("{prefix}-{i}-{}", uuid::Uuid::new_v4().simple()))
        .collect()
}

/// Executions per key at the demo service; every key must have run at most once.
async fn duplicates(stack: &Stack, keys: &[String]) -> usize {
    let executions = stack.executions().await;
    keys.iter()
        .filter(|k| executions["byKey"][k.as_str()].as_u64().unwrap_or(0) > 1)
        .count()
}

fn report(scenario: &str, figures: Value) {
    let dir = repo_root().join("target/chaos");
    std::fs::create_dir_all(&dir).unwrap();
    let text = serde_json::to_string_pretty(&figures).unwrap();
    std::fs::write(dir.join(format!("{scenario}.json")), &text).unwrap();
    eprintln!("{scenario}: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_retries_over_many_keys_execute_each_key_exactly_once() {
    let _one_at_a_time = ONE_STORM_AT_A_TIME.lock().await;
    let (n_keys, per_key) = scale();
    let stack = Stack::start_with(storm_options()).await;
    let keys = keys("storm", n_keys);
    let started = Instant::now();
    let tally = Load::of(&stack).storm(keys.clone(), per_key, 256, 5).await;
    let elapsed = started.elapsed();

    assert_eq!(tally.transport_errors + tally.unavailable, 0, "{tally:?}");
    assert!(
        tally.other.is_empty(),
        "only first executions, replays and 409s: {:?}",
        tally.other
    );
    for key in &keys {
        assert_eq!(
            tally.first_executions.get(key),
            Some(&1),
            "{key}: exactly one first execution"
        );
    }
    let dups = duplicates(&stack, &keys).await;
    assert_eq!(dups, 0);
    assert_eq!(
        stack.executions().await["total"].as_u64().unwrap() as usize,
        n_keys
    );
    report(
        "concurrent_retries",
        json!({"keys": n_keys, "requests_per_key": per_key, "requests": tally.requests,
               "first_executions": n_keys, "replays": tally.replays, "conflicts_409": tally.conflicts,
               "duplicates": dups, "seconds": elapsed.as_secs_f64()}),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_killed_and_restarted_under_load_loses_nothing_and_duplicates_nothing() {
    let _one_at_a_time = ONE_STORM_AT_A_TIME.lock().await;
    let (n_keys, per_key) = scale();
    let mut stack = Stack::start().await;
    let keys = keys("kill", n_keys);
    let load = Load::of(&stack);
    let storm = tokio::spawn({
        let (load, keys) = (load.clone(), keys.clone());
        async move { load.storm(keys, per_key, 128, 20).await }
    });

    // Let some keys complete, note which ones the store acknowledged, then SIGKILL it.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let mut completed_before_kill = BTreeSet::new();
    for key in &keys {
        if let Some(record) = stack.record(key).await {
            if record["state"] == "completed" {
                completed_before_kill.insert(key.clone());
            }
        }
    }
    stack.kill_store();
    let killed_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(800)).await;
    stack.restart_store().await;
    let downtime = killed_at.elapsed();
    let tally = storm.await.unwrap();

    assert!(
        tally.other.is_empty(),
        "only 201, 409 and 503 (while down): {:?}",
        tally.other
    );
    assert_eq!(tally.transport_errors, 0);
    let dups = duplicates(&stack, &keys).await;
    assert_eq!(dups, 0, "no key executed twice");

    // Every record the store had acknowledged survived the SIGKILL: its key replays the body
    // its first client received.
    let mut lost = 0;
    for key in &completed_before_kill {
        let replay = load
            .client
            .post(format!("{}/api/v1/orders", stack.url))
            .header("Idempotency-Key", key)
            .json(&json!({"sku": "CHAOS", "key": key}))
            .send()
            .await
            .unwrap();
        let replayed = replay.headers().contains_key("idempotent-replayed");
        let body = replay.text().await.unwrap();
        if !replayed || tally.bodies.get(key).is_some_and(|first| *first != body) {
            lost += 1;
        }
    }
    assert!(
        !completed_before_kill.is_empty(),
        "the kill happened after some keys completed"
    );
    assert_eq!(lost, 0, "completed records lost");
    // Normal service after the restart.
    let fresh = stack
        .post_order(Some(&format!("after-{}", uuid::Uuid::new_v4())), &json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(fresh.status(), 201);
    assert_eq!(duplicates(&stack, &keys).await, 0);
    report(
        "store_killed_under_load",
        json!({"keys": n_keys, "requests": tally.requests, "faults": "store SIGKILL + restart",
               "store_down_ms": downtime.as_millis() as u64, "answered_503": tally.unavailable,
               "answered_409": tally.conflicts, "completed_before_kill": completed_before_kill.len(),
               "completed_records_lost": lost, "duplicates": dups}),
    );
}

#[tokio::test]
async fn a_slow_store_gets_503_within_the_callout_timeout_and_nothing_is_forwarded() {
    let stack = Stack::start_with(StackOptions {
        plugin: json!({"store_timeout": "300ms"}),
        store_delay: Some(Duration::from_millis(1500)),
        ..StackOptions::default()
    })
    .await;
    let mut answered_within = Vec::new();
    for i in 0..3 {
        let started = Instant::now();
        let response = stack
            .post_order(Some(&format!("slow-{i}")), &json!({}))
            .send()
            .await
            .unwrap();
        answered_within.push(started.elapsed());
        assert_eq!(response.status(), 503);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["code"], "IDEMPOTENCY_STORAGE_UNAVAILABLE");
    }
    assert!(
        answered_within.iter().all(|d| *d < Duration::from_millis(1200)),
        "{answered_within:?}"
    );
    assert_eq!(
        stack.executions().await["total"],
        0,
        "never forwarded without a lock"
    );
    report(
        "slow_store",
        json!({"injected_delay_ms": 1500, "store_timeout_ms": 300,
               "slowest_answer_ms": answered_within.iter().max().unwrap().as_millis() as u64,
               "forwarded": 0}),
    );
}

#[tokio::test]
async fn upstream_killed_mid_request_keeps_the_lock_until_it_expires_then_the_takeover_resumes() {
    // A short lock so the takeover happens within the test.
    let mut stack = Stack::start_with(StackOptions::plugin(json!({"lock_timeout": "3s"}))).await;
    // Plain request: the upstream dies while handling it.
    let in_flight = {
        let request = stack
            .post_order(Some("dies-1"), &json!({}))
            .header("x-demo-delay-ms", "3000");
        tokio::spawn(async move { request.send().await })
    };
    // Phased request: the upstream dies after phase 2 was checkpointed.
    let phased_in_flight = {
        let request = stack
            .client
            .post(format!("{}/api/v1/orders/phased", stack.url))
            .header("Idempotency-Key", "dies-2")
            .header("x-demo-pause-after-phase", "2")
            .header("x-demo-pause-ms", "3000")
            .json(&json!({}));
        tokio::spawn(async move { request.send().await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    stack.kill_demo();
    let died = in_flight.await.unwrap().unwrap();
    assert_eq!(died.status(), 503, "Envoy reports the reset");
    assert_eq!(phased_in_flight.await.unwrap().unwrap().status(), 503);
    stack.restart_demo().await;

    // The upstream may have done the work before it died: no retry runs while the lock lasts.
    let during = stack.post_order(Some("dies-1"), &json!({})).send().await.unwrap();
    assert_eq!(during.status(), 409, "outcome unknown keeps the lock");
    // The reason is written by the proxy's root context as the 503 leaves: a client that
    // retries at once can be faster than it, so wait for it (briefly).
    let mut reason = Value::Null;
    for _ in 0..40 {
        reason = stack.record("dies-1").await.unwrap()["outcome_unknown"]["reason"].clone();
        if !reason.is_null() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(reason, "upstream_reset");

    tokio::time::sleep(Duration::from_millis(3_200)).await;
    let retry: Value = stack
        .post_order(Some("dies-1"), &json!({}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        retry["idempotency"]["x-idempotency-previous-attempt"], "unknown",
        "the takeover tells the service an earlier attempt may have run"
    );
    assert_eq!(stack.record("dies-1").await.unwrap()["fencing_token"], 2);
    let phased: Value = stack
        .client
        .post(format!("{}/api/v1/orders/phased", stack.url))
        .header("Idempotency-Key", "dies-2")
        .json(&json!({}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(phased["resumedFrom"], "inventory_reserved");
    assert_eq!(phased["phasesRun"], json!(["order_created", "notification_sent"]));
    // Counted in a file that survived the crash: the killed run and the takeover, never at once.
    let counts = stack.executions().await;
    assert_eq!(counts["byKey"]["dies-1"], 2, "{counts}");
    assert_eq!(counts["overlaps"], json!({}), "{counts}");
    // Phase counts live in memory (the restart cleared the killed run's): after it, none ran again.
    assert_eq!(
        counts["phases"].get("validated"),
        None,
        "phase 1 did not run again: {counts}"
    );
    report(
        "upstream_killed",
        json!({"faults": "upstream SIGKILL mid-request (plain and phased)", "overlaps": 0,
               "retries_during_lock": "409"}),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_restarted_under_load_keeps_records_and_never_duplicates() {
    let _one_at_a_time = ONE_STORM_AT_A_TIME.lock().await;
    let (n_keys, per_key) = scale();
    let mut stack = Stack::start_with(storm_options()).await;
    let keys = keys("envoy", n_keys);
    let load = Load::of(&stack);
    let storm = tokio::spawn({
        let (load, keys) = (load.clone(), keys.clone());
        async move { load.storm(keys, per_key, 128, 20).await }
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    stack.restart_envoy().await;
    let tally = storm.await.unwrap();
    assert!(tally.other.is_empty(), "{:?}", tally.other);
    let dups = duplicates(&stack, &keys).await;
    assert_eq!(dups, 0);

    // Every key that executed now replays (or is still locked by a request the killed Envoy
    // was forwarding): never a second execution.
    let executions = stack.executions().await;
    let never_ran = keys
        .iter()
        .filter(|k| executions["byKey"][k.as_str()].as_u64().unwrap_or(0) == 0)
        .count();
    let after = load.storm(keys.clone(), 1, 64, 0).await;
    let ran_now = after.first_executions.values().sum::<usize>();
    // A key whose lock the killed Envoy held (before forwarding, or after the upstream answered
    // but before the record was written) stays locked: 409 until lock_timeout, never a second
    // execution now.
    assert!(ran_now <= never_ran, "only never-run keys may run now");
    assert_eq!(ran_now + after.replays + after.conflicts, keys.len(), "{after:?}");
    assert!(
        after.other.is_empty() && after.unavailable == 0 && after.transport_errors == 0,
        "{after:?}"
    );
    assert_eq!(duplicates(&stack, &keys).await, 0);
    report(
        "envoy_restarted_under_load",
        json!({"keys": n_keys, "requests": tally.requests + after.requests, "faults": "Envoy SIGKILL + restart",
               "connection_errors_during_restart": tally.transport_errors,
               "keys_locked_by_the_killed_proxy": after.conflicts, "duplicates": dups}),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_time_out_and_retry_at_once_never_cause_a_second_execution() {
    let _one_at_a_time = ONE_STORM_AT_A_TIME.lock().await;
    let (n_keys, per_key) = scale();
    let clients_per_key = per_key.min(8);
    const ATTEMPTS: usize = 3;
    let mut stack = Stack::start_with(storm_options()).await;
    let keys = keys("impatient", n_keys);
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(512)
        .build()
        .unwrap();
    let url = stack.url.clone();
    // Every client gives up after 150 ms on work that takes the upstream 200 ms to 1.4 s, and
    // retries with the same key every 300 ms: the retries land while the first attempt still
    // runs, after it finished with its answer lost, and while the upstream is dead or restarting.
    let storm = tokio::spawn({
        let keys = keys.clone();
        async move {
            let attempts = keys
                .iter()
                .enumerate()
                .flat_map(|(i, k)| std::iter::repeat_n((i, k.clone()), clients_per_key))
                .collect::<Vec<_>>();
            futures::stream::iter(attempts.into_iter().map(|(i, key)| {
                let (client, url) = (client.clone(), url.clone());
                let work_ms = 200 + (i % 5) * 300;
                async move {
                    let order = || {
                        client
                            .post(format!("{url}/api/v1/orders"))
                            .header("Idempotency-Key", &key)
                            .header("x-demo-delay-ms", work_ms.to_string())
                            .json(&json!({"sku": "IMPATIENT"}))
                    };
                    impatient_client(order, ATTEMPTS, Duration::from_millis(150)).await
                }
            }))
            .buffer_unordered(128)
            .collect::<Vec<_>>()
            .await
        }
    });
    // The upstream is SIGKILLed and restarted in the middle: the attempts it was running end in
    // Envoy resets, whose outcome is unknown.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stack.kill_demo();
    stack.restart_demo().await;
    let outcomes: Vec<u16> = storm.await.unwrap().into_iter().flatten().collect();
    tokio::time::sleep(Duration::from_millis(1_500)).await; // let the last runs finish

    let counts = stack.executions().await;
    let executed: Vec<u64> = keys
        .iter()
        .map(|k| counts["byKey"][k.as_str()].as_u64().unwrap_or(0))
        .collect();
    let dups = executed.iter().filter(|n| **n > 1).count();
    assert_eq!(dups, 0, "a key ran twice: {counts}");
    assert_eq!(counts["overlaps"], json!({}), "two runs of one key overlapped");
    let unexpected: Vec<u16> = outcomes
        .iter()
        .copied()
        .filter(|s| !matches!(s, 0 | 201 | 409 | 503))
        .collect();
    assert!(unexpected.is_empty(), "{unexpected:?}");
    let tally = |wanted: u16| outcomes.iter().filter(|s| **s == wanted).count();
    report(
        "impatient_clients",
        json!({"keys": n_keys, "clients_per_key": clients_per_key, "attempts_per_client": ATTEMPTS,
               "requests": outcomes.len(), "client_timeouts": tally(0), "answered_201": tally(201),
               "answered_409": tally(409), "answered_503": tally(503),
               "keys_executed": executed.iter().filter(|n| **n == 1).count(),
               "faults": "upstream SIGKILL + restart mid-storm",
               "duplicates": dups, "overlaps": 0}),
    );
}

/// Storm a gateway route (retrying `5xx,reset,connect-failure` twice) in front of an upstream
/// that resets after doing the work on a third of its runs, with impatient clients (give up
/// after 250 ms, retry every 300 ms with the same key). Returns (keys, ledger, client outcomes,
/// seconds).
async fn gateway_storm(
    plugin: &Value,
) -> (
    Vec<String>,
    std::sync::Arc<std::sync::Mutex<e2e::gateway::WorkLedger>>,
    Vec<u16>,
    f64,
) {
    let (n_keys, per_key) = scale();
    let clients_per_key = per_key.min(8);
    let dir = tempfile::tempdir().unwrap();
    let (upstream, ledger) = e2e::gateway::work_then_reset_upstream(33).await;
    let (url, _store, _envoy) = e2e::gateway::gateway_with_plugin(dir.path(), upstream, plugin).await;
    let keys = keys("gateway", n_keys);
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(512)
        .build()
        .unwrap();
    let attempts = keys
        .iter()
        .flat_map(|k| std::iter::repeat_n(k.clone(), clients_per_key))
        .collect::<Vec<_>>();
    let started = Instant::now();
    let outcomes: Vec<u16> = futures::stream::iter(attempts.into_iter().map(|key| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            let order = || {
                client
                    .post(format!("{url}/api/v1/orders"))
                    .header("Idempotency-Key", &key)
                    .json(&json!({"sku": "GATEWAY"}))
            };
            impatient_client(order, GATEWAY_STORM_ATTEMPTS, Duration::from_millis(250)).await
        }
    }))
    .buffer_unordered(128)
    .collect::<Vec<Vec<u16>>>()
    .await
    .into_iter()
    .flatten()
    .collect();
    let elapsed = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(600)).await; // let the last runs finish
    (keys, ledger, outcomes, elapsed)
}

const GATEWAY_STORM_ATTEMPTS: usize = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_storm_with_router_retries_and_resetting_upstreams_never_runs_a_key_twice() {
    let _one_at_a_time = ONE_STORM_AT_A_TIME.lock().await;
    let (keys, ledger, outcomes, seconds) = gateway_storm(&json!({"store_timeout": "10s"})).await;
    let ledger = ledger.lock().unwrap();
    let dups = keys
        .iter()
        .filter(|k| ledger.executions.get(k.as_str()).copied().unwrap_or(0) > 1)
        .count();
    assert_eq!(dups, 0, "a key ran twice: {:?}", ledger.executions);
    assert_eq!(ledger.overlaps, 0, "two runs of one key overlapped");
    let executed = keys
        .iter()
        .filter(|k| ledger.executions.contains_key(k.as_str()))
        .count();
    assert!(executed > 0, "nothing ran");
    let unexpected: Vec<u16> = outcomes
        .iter()
        .copied()
        .filter(|s| !matches!(s, 0 | 201 | 409 | 503))
        .collect();
    assert!(unexpected.is_empty(), "{unexpected:?}");
    let tally = |wanted: u16| outcomes.iter().filter(|s| **s == wanted).count();
    report(
        "gateway_storm",
        json!({"keys": keys.len(), "clients_per_key": scale().1.min(8), "attempts_per_client": GATEWAY_STORM_ATTEMPTS,
               "requests": outcomes.len(), "client_timeouts": tally(0), "answered_201": tally(201),
               "answered_409": tally(409), "answered_503": tally(503), "keys_executed": executed,
               "faults": "route retry_policy 5xx,reset,connect-failure x2; upstream resets after the work on ~33% of runs",
               "duplicates": dups, "overlaps": ledger.overlaps, "seconds": seconds}),
    );
}
