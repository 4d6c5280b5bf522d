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

/// What the client saw for one key: its first attempt and its retries, each (status, replayed,
/// milliseconds).
pub(crate) struct KeyAnswers {
    first: (u16, bool, f64),
    retries: Vec<(u16, bool, f64)>,
}

impl KeyAnswers {
    /// Every answer a 201 and exactly one of them not a replay: the key ran once, whichever of
    /// its requests reached the store first.
    fn ran_once(&self) -> bool {
        let all = || std::iter::once(&self.first).chain(&self.retries);
        all().all(|(status, _, _)| *status == 201) && all().filter(|(_, replayed, _)| !replayed).count() == 1
    }
}

/// `workers` loops, each: a first attempt of a fresh key that takes the upstream `first_ms`, then
/// `retries` retries of that key 20 ms later, which wait in the store for it. Returns what the
/// client saw for every key.
pub(crate) async fn retries_of_in_flight_keys(
    addr: SocketAddr,
    label: &'static str,
    workers: usize,
    first_ms: u64,
    retries: usize,
    duration: Duration,
) -> Vec<KeyAnswers> {
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
                    let first = first.await.unwrap_or((0, false, 0.0));
                    answers.push(KeyAnswers {
                        first,
                        retries: waited,
                    });
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

/// Retries of in-flight keys, as the clients saw them.
#[derive(Debug, Clone)]
pub(crate) struct InFlightRetries {
    /// Keys tried (a first attempt and its retries each).
    pub keys: u64,
    /// Keys whose requests all got a 201 and ran once (one answer not a replay).
    pub keys_run_once: u64,
    /// Retries sent.
    pub retries: u64,
    /// Retries answered with the replay (201, `Idempotent-Replayed`).
    pub replayed: u64,
    /// Retries that reached the store before their first attempt and ran the key themselves
    /// (201, not a replay; the first attempt then waited and got the replay).
    pub ran_the_key: u64,
    /// Statuses of answers, first attempts included, that were not a 201 (0: no answer).
    pub other_answers: Vec<u16>,
    pub retry_p50_ms: f64,
    pub retry_p99_ms: f64,
}

/// Retries waiting for a 200 ms first attempt.
pub(crate) async fn in_flight_retries(
    addr: SocketAddr,
    workers: usize,
    duration: Duration,
) -> InFlightRetries {
    let keys = retries_of_in_flight_keys(addr, "inflight", workers, 200, 4, duration).await;
    let retries = || keys.iter().flat_map(|k| &k.retries);
    let count = |wanted: fn(&(u16, bool, f64)) -> bool| retries().filter(|a| wanted(a)).count() as u64;
    let other_answers = keys
        .iter()
        .flat_map(|k| std::iter::once(&k.first).chain(&k.retries))
        .filter(|(status, _, _)| *status != 201)
        .map(|(status, _, _)| *status)
        .collect();
    let mut latencies: Vec<f64> = retries().map(|(_, _, ms)| *ms).collect();
    latencies.sort_by(f64::total_cmp);
    let at = |q: f64| {
        latencies
            .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0.0)
    };
    InFlightRetries {
        keys: keys.len() as u64,
        keys_run_once: keys.iter().filter(|k| k.ran_once()).count() as u64,
        retries: latencies.len() as u64,
        replayed: count(|(status, replayed, _)| *status == 201 && *replayed),
        ran_the_key: count(|(status, replayed, _)| *status == 201 && !*replayed),
        other_answers,
        retry_p50_ms: at(0.5),
        retry_p99_ms: at(0.99),
    }
}

/// Keep `firsts × retries` acquires waiting in the store for `duration` (first attempts that
/// take the upstream 1 s); returns the retries served with a replay.
pub(crate) async fn hold_waiters(addr: SocketAddr, firsts: usize, retries: usize, duration: Duration) -> u64 {
    let keys = retries_of_in_flight_keys(addr, "held", firsts, 1_000, retries, duration).await;
    keys.iter()
        .flat_map(|k| &k.retries)
        .filter(|(status, replayed, _)| *status == 201 && *replayed)
        .count() as u64
}
