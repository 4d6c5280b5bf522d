//! The store alone, with no Envoy in front: per-operation latency, acquire+complete pairs per
//! second (one call per request and batched), consumer dedup, memory at a number of records.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use e2e::{Proc, STORE_TOKEN};
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use serde_json::{json, Value};

use crate::process::{peak_rss_kib, reset_peak_rss, rss_kib};
use crate::steal;
use crate::traffic::{keep_alive_connection, latency_histogram, stolen_since};

/// The CPU the store runs on for the store-alone phases (the load generator keeps the other).
const STORE_ALONE_CPU: usize = 0;

/// A JSON POST to the store API, with the bench's token.
pub(crate) fn store_request(path: &str, body: &Value) -> Request<Full<Bytes>> {
    Request::post(path)
        .header("host", "store")
        .header("authorization", format!("Bearer {STORE_TOKEN}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

/// The store alone (Envoy idle or absent): per-operation latency at one connection beside this
/// machine's floor under it (the disk's write + sync and an HTTP round trip, probed in
/// `data_dir`, the store's filesystem), acquire + complete pairs per second at `connections`,
/// consumer dedup per message, memory at `records` live records (100k unless `--store-records`).
pub(crate) async fn measure_store_alone(
    store: &Proc,
    data_dir: &Path,
    store_port: u16,
    store_connections: usize,
    duration: Duration,
    records: u64,
) -> Value {
    // The store alone: acquire + complete pairs per second, embedded backend, durable commits.
    // Envoy is idle now: give the store CPU 0 and keep the load generator on CPU 1.
    if let Some(pid) = store.pid() {
        let _ = Command::new("taskset")
            .args(["-a", "-p", "-c", &STORE_ALONE_CPU.to_string(), &pid.to_string()])
            .output();
    }
    // The peak from here on is the store-alone phases' own (1 KiB bodies), not the large
    // bodies of rows measured earlier against the same store.
    let peak_reset = store.pid().is_some_and(reset_peak_rss);
    let store_addr = SocketAddr::from(([127, 0, 0, 1], store_port));
    // Per durable operation at one connection (acquire and complete, each one group commit),
    // and how much of it the commit spent reaching the disk (the store's sync-time counter).
    let client = reqwest::Client::new();
    let metrics_url = format!("http://{store_addr}/metrics");
    let disk_totals = |text: &str| {
        (
            e2e::metric_sum(text, "idempotency_store_durable_commits_total"),
            e2e::metric_sum(text, "idempotency_store_durable_commit_sync_seconds_total"),
        )
    };
    let floor = crate::floor::measure(data_dir, store_addr, STORE_ALONE_CPU).await;
    let (commits_before, synced_before) = disk_totals(&e2e::get_text(&client, &metrics_url).await);
    let host_before = steal::Snapshot::take();
    let single = store_pairs(store_addr, 1, duration).await;
    let single_stolen = stolen_since(host_before);
    let (commits_after, synced_after) = disk_totals(&e2e::get_text(&client, &metrics_url).await);
    let commits = commits_after - commits_before;
    let store_latency = json!({
        "operations": single.2.len(),
        "p50_us": single.2.value_at_quantile(0.5),
        "p99_us": single.2.value_at_quantile(0.99),
        "mean_sync_us_per_commit": if commits > 0.0 { (synced_after - synced_before) * 1e6 / commits } else { 0.0 },
        "host_stolen_percent": single_stolen, "disturbed": steal::disturbed(single_stolen),
        "floor": floor,
    });
    let host_before = steal::Snapshot::take();
    let pairs = store_pairs(store_addr, store_connections, duration).await;
    let pairs_stolen = stolen_since(host_before);
    // As the filter sends them under load: 8 callers (workers), 16 calls per batch.
    let host_before = steal::Snapshot::take();
    let batched = store_pairs_batched(store_addr, 8, 16, duration).await;
    let batched_stolen = stolen_since(host_before);
    let consumer_dedup = consumer_dedup_cost(&format!("http://{store_addr}"), duration).await;
    // Fill to `records` live records (100k by default), then measure the store's memory.
    let mut filled = pairs.0 + single.0 + batched.0;
    while filled < records {
        filled += store_pairs(store_addr, store_connections, Duration::from_secs(2))
            .await
            .0;
    }
    let store_rss = store.pid().map(rss_kib);
    let store_rss_peak = store.pid().filter(|_| peak_reset).map(peak_rss_kib);
    // How much of it is written data waiting in memtables, and what is left once idle.
    let metrics = e2e::get_text(&client, &metrics_url).await;
    let write_buffer_kib = e2e::metric_sum(&metrics, "idempotency_store_write_buffer_bytes") / 1024.0;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let store_rss_idle = store.pid().map(rss_kib);
    json!({
        "store_alone": {"pairs_per_second": pairs.0 as f64 / pairs.1, "connections": store_connections,
                        "host_stolen_percent": pairs_stolen, "disturbed": steal::disturbed(pairs_stolen),
                        "one_connection_per_operation": store_latency,
                        "batched": {"pairs_per_second": batched.0 as f64 / batched.1, "connections": 8, "calls_per_batch": 16,
                                    "host_stolen_percent": batched_stolen, "disturbed": steal::disturbed(batched_stolen)}},
        "store_rss_kib_at_live_records": {"records": filled, "rss_kib": store_rss,
                                          "write_buffer_kib": write_buffer_kib, "rss_kib_5s_idle": store_rss_idle,
                                          "rss_kib_peak_while_writing": store_rss_peak},
        "consumer_dedup": consumer_dedup,
    })
}

/// Acquire + complete pairs against the store API; returns (pairs, seconds, latency of each
/// operation in µs).
pub(crate) async fn store_pairs(
    addr: SocketAddr,
    connections: usize,
    duration: Duration,
) -> (u64, f64, Histogram<u64>) {
    let started = Instant::now();
    let deadline = started + duration;
    // Every call uses fresh keys: a reused key would be a replay, not a pair of durable writes.
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let run = std::process::id();
    let nonce = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tasks: Vec<_> = (0..connections)
        .map(|c| {
            tokio::spawn(async move {
                let mut sender = keep_alive_connection(addr).await;
                let body = "e".repeat(1024);
                let mut done = 0u64;
                let mut latency = latency_histogram();
                while Instant::now() < deadline {
                    let key = format!("pair-{run}-{nonce}-{c}-{done}");
                    let acquire = json!({"service": "bench", "scope": "", "key": key, "fingerprint": "f", "method": "POST",
                        "path": "/x", "lock_timeout_ms": 60000, "retention_ms": 3_600_000});
                    let request = store_request("/v1/acquire", &acquire);
                    let sent = Instant::now();
                    let Ok(response) = sender.send_request(request).await else { break };
                    let reply: Value = serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap_or_default();
                    let complete = json!({"service": "bench", "scope": "", "key": key, "fencing_token": reply["fencing_token"],
                        "record_id": reply["record_id"], "attempt_id": reply["attempt_id"],
                        "retention_ms": 3_600_000, "response": {"status": 201, "headers": [["content-type", "application/json"]], "body": body}});
                    let request = store_request("/v1/complete", &complete);
                    latency.record(sent.elapsed().as_micros().max(1) as u64).unwrap();
                    let sent = Instant::now();
                    let Ok(response) = sender.send_request(request).await else { break };
                    let acknowledged = response.status() == 200;
                    let _ = response.into_body().collect().await;
                    latency.record(sent.elapsed().as_micros().max(1) as u64).unwrap();
                    // Only acknowledged pairs count: a refused complete costs the store nothing.
                    assert!(acknowledged, "the store refused a complete: the benchmark would measure nothing");
                    done += 1;
                }
                (done, latency)
            })
        })
        .collect();
    let mut total = 0;
    let mut latency = latency_histogram();
    for task in tasks {
        // A connection that failed its checks fails the benchmark: its figures would be wrong.
        let (done, part) = task.await.unwrap();
        total += done;
        latency.add(part).unwrap();
    }
    (total, started.elapsed().as_secs_f64(), latency)
}

/// The store alone as the filter calls it under load: each of `connections` loops sends
/// `batch` acquires as one `/v1/batch`, then their `batch` completes as another. Returns (pairs,
/// seconds).
pub(crate) async fn store_pairs_batched(
    addr: SocketAddr,
    connections: usize,
    batch: usize,
    duration: Duration,
) -> (u64, f64) {
    let started = Instant::now();
    let deadline = started + duration;
    let run = std::process::id();
    let tasks: Vec<_> = (0..connections)
        .map(|c| {
            tokio::spawn(async move {
                let mut sender = keep_alive_connection(addr).await;
                let body = "e".repeat(1024);
                let mut done = 0u64;
                let mut round = 0u64;
                while Instant::now() < deadline {
                    round += 1;
                    let keys: Vec<String> = (0..batch).map(|i| format!("batched-{run}-{c}-{round}-{i}")).collect();
                    let acquires: Vec<Value> = keys
                        .iter()
                        .map(|key| json!({"path": "/v1/acquire", "body": {"service": "bench", "scope": "", "key": key,
                            "fingerprint": "f", "method": "POST", "path": "/x", "lock_timeout_ms": 60000,
                            "retention_ms": 3_600_000}}))
                        .collect();
                    let request = store_request("/v1/batch", &json!({"calls": acquires}));
                    let Ok(response) = sender.send_request(request).await else { break };
                    let reply: Value = serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap_or_default();
                    let completes: Vec<Value> = keys
                        .iter()
                        .zip(reply["replies"].as_array().cloned().unwrap_or_default())
                        .map(|(key, lock)| {
                            let lock = &lock["body"];
                            json!({"path": "/v1/complete", "body": {"service": "bench", "scope": "", "key": key,
                                "fencing_token": lock["fencing_token"], "record_id": lock["record_id"],
                                "attempt_id": lock["attempt_id"], "retention_ms": 3_600_000,
                                "response": {"status": 201, "headers": [["content-type", "application/json"]], "body": body}}})
                        })
                        .collect();
                    let request = store_request("/v1/batch", &json!({"calls": completes}));
                    let Ok(response) = sender.send_request(request).await else { break };
                    let reply: Value = serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap_or_default();
                    let acknowledged = reply["replies"].as_array().map_or(0, |r| r.iter().filter(|r| r["status"] == 200).count());
                    // Only acknowledged pairs count, and a refused one fails the benchmark.
                    assert_eq!(acknowledged, batch, "the store refused a batched complete: {reply}");
                    done += batch as u64;
                }
                done
            })
        })
        .collect();
    let mut total = 0;
    for task in tasks {
        total += task.await.unwrap();
    }
    (total, started.elapsed().as_secs_f64())
}

/// What deduplication adds per consumed message, through the client library a consumer uses
/// (`DeduplicatingHandler`, the same claim/complete the Kafka loop makes): one consumer, one
/// message at a time, a handler that does nothing. New messages cost a claim and a complete (two
/// durable writes); a duplicate costs one claim (a read).
pub(crate) async fn consumer_dedup_cost(store_url: &str, duration: Duration) -> Value {
    use cloudevents::EventBuilder as _;
    use idempotency_client::{ConsumerConfig, DeduplicatingHandler, Outcome, StoreClient};

    let store = StoreClient::new(store_url, Some(STORE_TOKEN.to_owned())).unwrap();
    let config = ConsumerConfig {
        service_name: "bench".into(),
        topic: "orders.received".into(),
        consumer_group: "bench".into(),
        lock_timeout: Duration::from_secs(30),
        retention_period: Duration::from_secs(3600),
    };
    let handler = DeduplicatingHandler::new(store, config, |_event| async { Ok::<(), ()>(()) });
    let event = |n: u64| {
        cloudevents::EventBuilderV10::new()
            .id(format!("m-{}-{n}", std::process::id()))
            .source("/bench")
            .ty("bench")
            .build()
            .unwrap()
    };
    let mut new_message = latency_histogram();
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed() < duration {
        let sent = Instant::now();
        assert_eq!(handler.handle(event(n)).await.unwrap(), Outcome::Processed);
        new_message
            .record(sent.elapsed().as_micros().max(1) as u64)
            .unwrap();
        n += 1;
    }
    let seconds = started.elapsed().as_secs_f64();
    let mut duplicate = latency_histogram();
    for m in 0..n.min(2000) {
        let sent = Instant::now();
        assert_eq!(handler.handle(event(m)).await.unwrap(), Outcome::Duplicate);
        duplicate
            .record(sent.elapsed().as_micros().max(1) as u64)
            .unwrap();
    }
    json!({
        "new_messages_per_second": n as f64 / seconds,
        "new_message": {"messages": n, "p50_us": new_message.value_at_quantile(0.5), "p99_us": new_message.value_at_quantile(0.99)},
        "duplicate": {"messages": duplicate.len(), "p50_us": duplicate.value_at_quantile(0.5), "p99_us": duplicate.value_at_quantile(0.99)},
    })
}
