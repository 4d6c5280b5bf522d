//! Retries of in-flight keys (`in_progress_wait`) and gRPC calls through Envoy.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::traffic::{body_1k, gather, latency_histogram, Stats};

/// Closed-loop unary gRPC calls through Envoy on `port`: `replay` sends one seeded key per
/// connection (every call after the first is a replay), otherwise keyless calls that execute.
pub(crate) async fn grpc_load(port: u16, connections: usize, duration: Duration, replay: bool) -> Stats {
    use e2e::grpc::pb::{orders_client::OrdersClient, CreateRequest};
    let url = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    let deadline = started + duration;
    let tasks: Vec<_> = (0..connections)
        .map(|c| {
            let url = url.clone();
            tokio::spawn(async move {
                let mut client = OrdersClient::connect(url).await.unwrap();
                let mut latency = latency_histogram();
                let (mut requests, mut errors, mut unexpected) = (0u64, 0u64, 0u64);
                let key = format!("grpc-replay-{}-{c}", std::process::id());
                let message = CreateRequest {
                    sku: "BENCH".into(),
                    ..CreateRequest::default()
                };
                let call = |client: &mut OrdersClient<tonic::transport::Channel>| {
                    let request = if replay {
                        e2e::grpc::keyed(&key, message.clone())
                    } else {
                        tonic::Request::new(message.clone())
                    };
                    let mut client = client.clone();
                    async move { client.create(request).await }
                };
                if replay {
                    let _ = call(&mut client).await; // seed the record
                }
                while Instant::now() < deadline {
                    let sent = Instant::now();
                    match call(&mut client).await {
                        Ok(response) => {
                            latency.record(sent.elapsed().as_micros().max(1) as u64).unwrap();
                            requests += 1;
                            if replay && response.metadata().get("idempotent-replayed").is_none() {
                                unexpected += 1;
                            }
                        }
                        Err(_) => errors += 1,
                    }
                }
                (latency, requests, errors, unexpected)
            })
        })
        .collect();
    gather(tasks, started).await
}

/// One keyed POST with the upstream taking `delay_ms`; returns (status, replayed, milliseconds).
pub(crate) async fn keyed(
    client: &reqwest::Client,
    addr: SocketAddr,
    key: &str,
    delay_ms: u64,
) -> (u16, bool, f64) {
    let sent = Instant::now();
    match client
        .post(format!("http://{addr}/api/v1/orders"))
        .header("idempotency-key", key)
        .header("content-type", "application/json")
        .header("x-demo-delay-ms", delay_ms.to_string())
        .body(body_1k())
        .send()
        .await
    {
        Ok(r) => {
            let replayed = r.headers().contains_key("idempotent-replayed");
            let status = r.status().as_u16();
            let _ = r.bytes().await;
            (status, replayed, sent.elapsed().as_secs_f64() * 1000.0)
        }
        Err(_) => (0, false, sent.elapsed().as_secs_f64() * 1000.0),
    }
}

/// `workers` loops, each: a first attempt of a fresh key that takes the upstream `first_ms`, then
/// `retries` retries of that key 20 ms later, which wait in the store for it. Returns every
/// retry's (replayed with 201, milliseconds).
pub(crate) async fn retries_of_in_flight_keys(
    addr: SocketAddr,
    label: &'static str,
    workers: usize,
    first_ms: u64,
    retries: usize,
    duration: Duration,
) -> Vec<(bool, f64)> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()
        .unwrap();
    let deadline = Instant::now() + duration;
    let tasks: Vec<_> = (0..workers)
        .map(|w| {
            let client = client.clone();
            tokio::spawn(async move {
                let mut answers = Vec::new();
                let mut i = 0;
                while Instant::now() < deadline {
                    i += 1;
                    let key = format!("{label}-{}-{w}-{i}", std::process::id());
                    let first = {
                        let (client, key) = (client.clone(), key.clone());
                        tokio::spawn(async move { keyed(&client, addr, &key, first_ms).await })
                    };
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    let waited =
                        futures::future::join_all((0..retries).map(|_| keyed(&client, addr, &key, 0))).await;
                    let _ = first.await;
                    answers.extend(
                        waited
                            .into_iter()
                            .map(|(status, replayed, ms)| (status == 201 && replayed, ms)),
                    );
                }
                answers
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    all
}

/// Retries waiting for a 200 ms first attempt: (retries, replayed, p50 ms, p99 ms).
pub(crate) async fn in_flight_retries(
    addr: SocketAddr,
    workers: usize,
    duration: Duration,
) -> (u64, u64, f64, f64) {
    let answers = retries_of_in_flight_keys(addr, "inflight", workers, 200, 4, duration).await;
    let replayed = answers.iter().filter(|(replayed, _)| *replayed).count() as u64;
    let mut latencies: Vec<f64> = answers.into_iter().map(|(_, ms)| ms).collect();
    latencies.sort_by(f64::total_cmp);
    let at = |q: f64| {
        latencies
            .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0.0)
    };
    (latencies.len() as u64, replayed, at(0.5), at(0.99))
}

/// Keep `firsts × retries` acquires waiting in the store for `duration` (first attempts that
/// take the upstream 1 s); returns the retries served with a replay.
pub(crate) async fn hold_waiters(addr: SocketAddr, firsts: usize, retries: usize, duration: Duration) -> u64 {
    let answers = retries_of_in_flight_keys(addr, "held", firsts, 1_000, retries, duration).await;
    answers.iter().filter(|(replayed, _)| *replayed).count() as u64
}
