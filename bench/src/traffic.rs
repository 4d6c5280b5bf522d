//! The load generator: closed-loop or paced HTTP/1.1 keep-alive connections, the requests they
//! send, and one row's measurement (throughput, latency, Envoy's CPU, the CPU the host took).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::Request;

use crate::process::cpu_us;
use crate::steal;
use crate::Scenario;

pub(crate) type MakeRequest = Arc<dyn Fn(usize, u64) -> Request<Full<Bytes>> + Send + Sync>;

#[derive(Debug, Clone)]
pub(crate) struct Stats {
    pub(crate) requests: u64,
    pub(crate) errors: u64,
    pub(crate) unexpected: u64,
    pub(crate) seconds: f64,
    pub(crate) latency: Histogram<u64>,
}

impl Stats {
    pub(crate) fn rps(&self) -> f64 {
        self.requests as f64 / self.seconds
    }
    pub(crate) fn p50_us(&self) -> u64 {
        self.latency.value_at_quantile(0.5)
    }
    pub(crate) fn p99_us(&self) -> u64 {
        self.latency.value_at_quantile(0.99)
    }
}

/// Closed-loop load: `connections` keep-alive connections for `duration`; `expect` checks
/// each response (status, replayed header).
pub(crate) async fn load(
    addr: SocketAddr,
    connections: usize,
    duration: Duration,
    make: MakeRequest,
    expect: fn(u16, bool) -> bool,
) -> Stats {
    paced_load(addr, connections, duration, make, expect, None).await
}

/// [`load`], with each connection sending at most one request per `interval` when one is given
/// (on a fixed schedule, so the rate holds on average although the timer ticks by the
/// millisecond; a connection behind its schedule catches up by one request at most). Together
/// the connections then offer `connections / interval` requests per second.
pub(crate) async fn paced_load(
    addr: SocketAddr,
    connections: usize,
    duration: Duration,
    make: MakeRequest,
    expect: fn(u16, bool) -> bool,
    interval: Option<Duration>,
) -> Stats {
    // Request numbers are unique across calls, so a scenario that needs fresh keys never reuses
    // one from an earlier round, the warm-up or the one-connection pass (a reused key would be
    // a replay, counted in the wrong row).
    static LOADS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let first_request = LOADS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) << 32;
    let started = Instant::now();
    let deadline = started + duration;
    let tasks: Vec<_> = (0..connections)
        .map(|c| {
            let make = make.clone();
            tokio::spawn(async move {
                let mut latency = latency_histogram();
                let (mut requests, mut errors, mut unexpected) = (0u64, 0u64, 0u64);
                let mut sender = keep_alive_connection(addr).await;
                let mut i = first_request;
                let mut due = tokio::time::Instant::now();
                while Instant::now() < deadline {
                    if let Some(interval) = interval {
                        tokio::time::sleep_until(due).await;
                        due = (due + interval).max(tokio::time::Instant::now() - interval);
                        // A request due after the end would stretch the measured time.
                        if Instant::now() >= deadline {
                            break;
                        }
                    }
                    let request = make(c, i);
                    i += 1;
                    let sent = Instant::now();
                    match sender.send_request(request).await {
                        Ok(response) => {
                            let status = response.status().as_u16();
                            let replayed = response.headers().contains_key("idempotent-replayed");
                            let _ = response.into_body().collect().await;
                            latency.record(sent.elapsed().as_micros().max(1) as u64).unwrap();
                            requests += 1;
                            if !expect(status, replayed) {
                                unexpected += 1;
                            }
                        }
                        Err(_) => {
                            errors += 1;
                            break;
                        }
                    }
                }
                (latency, requests, errors, unexpected)
            })
        })
        .collect();
    gather(tasks, started).await
}

/// What one row measured.
pub(crate) struct Measured {
    pub(crate) stats: Stats,
    /// The Envoy's CPU per request, µs.
    pub(crate) cpu_per_request: f64,
    /// The largest share of one CPU's time the hypervisor took meanwhile ([`steal`]).
    pub(crate) stolen_percent: Option<f64>,
}

/// One row: `scenario`'s load against `target` (an address and the Envoy process serving it),
/// paced when `interval` is given, that Envoy's CPU per request and the CPU time the host took
/// meanwhile. A response the scenario does not expect fails the benchmark ([`assert_clean`]);
/// the row is reported as `name`.
pub(crate) async fn measure(
    name: &str,
    scenario: &Scenario,
    (target, envoy): (SocketAddr, Option<u32>),
    connections: usize,
    duration: Duration,
    interval: Option<Duration>,
) -> Measured {
    let host_before = steal::Snapshot::take();
    let cpu_before = envoy.map(cpu_us).unwrap_or(0);
    let stats = paced_load(
        target,
        connections,
        duration,
        scenario.make.clone(),
        scenario.expect,
        interval,
    )
    .await;
    let cpu = envoy
        .map(|pid| cpu_us(pid).saturating_sub(cpu_before))
        .unwrap_or(0);
    let stolen_percent = stolen_since(host_before);
    assert_clean(name, &stats);
    let cpu_per_request = if stats.requests > 0 {
        cpu as f64 / stats.requests as f64
    } else {
        0.0
    };
    Measured {
        stats,
        cpu_per_request,
        stolen_percent,
    }
}

/// The share of a CPU the host took since `before` (see [`steal`]).
pub(crate) fn stolen_since(before: Option<steal::Snapshot>) -> Option<f64> {
    before
        .zip(steal::Snapshot::take())
        .and_then(|(before, now)| before.stolen_percent_until(&now))
}

/// Fail the benchmark when a row measured something other than its scenario: a response the
/// scenario did not expect (a replay where an execution was meant, a refusal, an error status)
/// or a broken connection. Such a row's figures would describe different work.
fn assert_clean(scenario: &str, stats: &Stats) {
    assert!(
        stats.unexpected == 0 && stats.errors == 0,
        "{scenario}: {} of {} responses were not what the scenario measures and {} connections failed; the figures would be wrong",
        stats.unexpected,
        stats.requests,
        stats.errors
    );
}

/// A latency histogram in µs: 1 µs to 60 s, three significant digits (every latency the bench
/// records).
pub(crate) fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).unwrap()
}

/// What one connection of a closed loop measured.
pub(crate) type ConnectionStats = (Histogram<u64>, u64, u64, u64);

/// Sum the connections' figures into one [`Stats`].
pub(crate) async fn gather(tasks: Vec<tokio::task::JoinHandle<ConnectionStats>>, started: Instant) -> Stats {
    let mut stats = Stats {
        requests: 0,
        errors: 0,
        unexpected: 0,
        seconds: 0.0,
        latency: latency_histogram(),
    };
    for task in tasks {
        let (latency, requests, errors, unexpected) = task.await.unwrap();
        stats.latency.add(latency).unwrap();
        stats.requests += requests;
        stats.errors += errors;
        stats.unexpected += unexpected;
    }
    stats.seconds = started.elapsed().as_secs_f64();
    stats
}

pub(crate) fn body_1k() -> Bytes {
    sized_body(1024)
}

/// A JSON order of `bytes` bytes (padded note).
pub(crate) fn sized_body(bytes: usize) -> Bytes {
    let padding = "x".repeat(bytes.saturating_sub(40));
    Bytes::from(format!(r#"{{"customerId":"CUST-001","note":"{padding}"}}"#))
}

pub(crate) fn post_body(path: &'static str, key: Option<String>, body: Bytes) -> Request<Full<Bytes>> {
    let mut builder = Request::post(path)
        .header("host", "bench")
        .header("content-type", "application/json");
    if let Some(key) = key {
        builder = builder.header("idempotency-key", key);
    }
    builder.body(Full::new(body)).unwrap()
}

pub(crate) fn post(path: &'static str, key: Option<String>) -> Request<Full<Bytes>> {
    post_body(path, key, body_1k())
}

pub(crate) fn get(path: &'static str) -> Request<Full<Bytes>> {
    Request::get(path)
        .header("host", "bench")
        .body(Full::new(Bytes::new()))
        .unwrap()
}

/// One keep-alive HTTP/1.1 connection to `addr` (no Nagle delay), driven by its own task.
pub(crate) async fn keep_alive_connection(
    addr: SocketAddr,
) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let (sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    sender
}
