//! Retention against a real store process: with short retention under steady load the expiry
//! sweep keeps up (the live-record count levels off instead of growing), and a message
//! completed without `retention_ms` keeps its dedup record.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::{free_port, metric_sum, spawn_store, wait_ready, STORE_TOKEN};
use serde_json::{json, Value};

async fn live_records(client: &reqwest::Client, url: &str) -> f64 {
    let text = client
        .get(format!("{url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    metric_sum(&text, "idempotency_store_live_records")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_short_retention_under_steady_load_the_live_record_count_levels_off() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let args = ["--sweep-interval".to_owned(), "200ms".to_owned()];
    let mut store = spawn_store(
        dir.path(),
        port,
        &dir.path().join("store-data"),
        &args,
        "store.log",
    );
    let url = format!("http://127.0.0.1:{port}");
    wait_ready(&format!("{url}/readyz"), &mut store, Duration::from_secs(30)).await;
    let client = reqwest::Client::new();
    let created = Arc::new(AtomicUsize::new(0));
    let load_for = Duration::from_secs(4);
    let started = Instant::now();
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let (client, url, created) = (client.clone(), url.clone(), created.clone());
            tokio::spawn(async move {
                let mut i = 0;
                while started.elapsed() < load_for {
                    i += 1;
                    let key = format!("w{w}-{i}");
                    let acquire = json!({"service": "orders", "scope": "", "key": key, "fingerprint": "f",
                        "method": "POST", "path": "/", "lock_timeout_ms": 300, "retention_ms": 300});
                    let lock: Value = client
                        .post(format!("{url}/v1/acquire"))
                        .bearer_auth(STORE_TOKEN)
                        .json(&acquire)
                        .send()
                        .await
                        .unwrap()
                        .json()
                        .await
                        .unwrap();
                    let complete = json!({"service": "orders", "scope": "", "key": key,
                        "record_id": lock["record_id"], "attempt_id": lock["attempt_id"], "fencing_token": lock["fencing_token"],
                        "retention_ms": 300, "response": {"status": 201, "headers": [], "body": ""}});
                    let done = client
                        .post(format!("{url}/v1/complete"))
                        .bearer_auth(STORE_TOKEN)
                        .json(&complete)
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(done.status(), 200);
                    created.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let mut samples = Vec::new();
    while started.elapsed() < load_for {
        tokio::time::sleep(Duration::from_millis(500)).await;
        samples.push((created.load(Ordering::Relaxed), live_records(&client, &url).await));
    }
    for writer in writers {
        writer.await.unwrap();
    }
    let total = created.load(Ordering::Relaxed);
    eprintln!("created {total}; (created, live) samples: {samples:?}");
    assert!(total > 200, "load too light to say anything: {total}");
    // Records live ~300 ms plus at most one 200 ms sweep interval: at any sample, the live ones
    // are among those created in the last 1.5 s (three samples), whatever the load rate did —
    // and far fewer than everything created. Unswept records would break both within seconds.
    let most_live = samples.iter().map(|(_, live)| *live).fold(0.0, f64::max);
    assert!(most_live < total as f64 / 2.0, "{samples:?}");
    for (i, (created, live)) in samples.iter().enumerate() {
        let created_before = if i >= 3 { samples[i - 3].0 } else { 0 };
        let recent = (created - created_before) as f64;
        assert!(
            *live <= recent + 100.0,
            "sample {i}: {live} live but only {recent} created in the last 1.5 s: {samples:?}"
        );
    }
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert_eq!(
        live_records(&client, &url).await,
        0.0,
        "everything expired was swept"
    );
}
