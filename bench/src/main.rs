//! `make bench`: what the filter costs, measured side by side with pass-through Envoy in
//! interleaved rounds, plus the store alone. Prints a table and writes
//! `target/bench/results.json`.
//!
//! Layout on a 2-core machine: Envoy (`--concurrency 1`) pinned to CPU 0; the load generator
//! (this process), the demo service and the store on CPU 1 (`make bench` starts this binary with
//! `taskset -c 1`; children inherit it). Each scenario: HTTP/1.1 keep-alive connections, 1 KiB
//! JSON bodies, closed loop.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)] // a benchmark harness

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use e2e::envoy_config::{
    bootstrap_with, noop_wasm_bootstrap, noop_wasm_bootstrap_with, passthrough_bootstrap, Ports,
};
use e2e::{
    envoy_bin, free_port, plugin_config, spawn_demo, spawn_store, wait_ready, wasm_path, Proc, STORE_TOKEN,
};
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use serde_json::{json, Value};

mod steal;

type MakeRequest = Arc<dyn Fn(usize, u64) -> Request<Full<Bytes>> + Send + Sync>;

#[derive(Debug, Clone)]
struct Stats {
    requests: u64,
    errors: u64,
    unexpected: u64,
    seconds: f64,
    latency: Histogram<u64>,
}

impl Stats {
    fn rps(&self) -> f64 {
        self.requests as f64 / self.seconds
    }
    fn p50_us(&self) -> u64 {
        self.latency.value_at_quantile(0.5)
    }
    fn p99_us(&self) -> u64 {
        self.latency.value_at_quantile(0.99)
    }
}

/// Closed-loop load: `connections` keep-alive connections for `duration`; `expect` checks
/// each response (status, replayed header).
async fn load(
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
async fn paced_load(
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
                let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
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
struct Measured {
    stats: Stats,
    /// The Envoy's CPU per request, µs.
    cpu_per_request: f64,
    /// The largest share of one CPU's time the hypervisor took meanwhile ([`steal`]).
    stolen_percent: Option<f64>,
}

/// One row: `scenario`'s load against `target` (an address and the Envoy process serving it),
/// paced when `interval` is given, that Envoy's CPU per request and the CPU time the host took
/// meanwhile. A response the scenario does not expect fails the benchmark ([`assert_clean`]);
/// the row is reported as `name`.
async fn measure(
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
fn stolen_since(before: Option<steal::Snapshot>) -> Option<f64> {
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

/// What one connection of a closed loop measured.
type ConnectionStats = (Histogram<u64>, u64, u64, u64);

/// Sum the connections' figures into one [`Stats`].
async fn gather(tasks: Vec<tokio::task::JoinHandle<ConnectionStats>>, started: Instant) -> Stats {
    let mut stats = Stats {
        requests: 0,
        errors: 0,
        unexpected: 0,
        seconds: 0.0,
        latency: Histogram::new_with_bounds(1, 60_000_000, 3).unwrap(),
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

fn body_1k() -> Bytes {
    sized_body(1024)
}

/// A JSON order of `bytes` bytes (padded note).
fn sized_body(bytes: usize) -> Bytes {
    let padding = "x".repeat(bytes.saturating_sub(40));
    Bytes::from(format!(r#"{{"customerId":"CUST-001","note":"{padding}"}}"#))
}

fn post_body(path: &'static str, key: Option<String>, body: Bytes) -> Request<Full<Bytes>> {
    let mut builder = Request::post(path)
        .header("host", "bench")
        .header("content-type", "application/json");
    if let Some(key) = key {
        builder = builder.header("idempotency-key", key);
    }
    builder.body(Full::new(body)).unwrap()
}

fn post(path: &'static str, key: Option<String>) -> Request<Full<Bytes>> {
    post_body(path, key, body_1k())
}

fn get(path: &'static str) -> Request<Full<Bytes>> {
    Request::get(path)
        .header("host", "bench")
        .body(Full::new(Bytes::new()))
        .unwrap()
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmRSS:")
                .map(|v| v.trim().trim_end_matches(" kB").trim().parse().unwrap_or(0))
        })
        .unwrap_or(0)
}

/// One Envoy's memory: its RSS and, from its admin `/memory` (tcmalloc's counters), what its heap
/// holds live against what the allocator keeps after use (free pages and per-thread caches,
/// which count in RSS but are not Envoy's or the filter's data).
async fn envoy_memory(client: &reqwest::Client, pid: Option<u32>, admin_port: u16) -> Value {
    let heap: Value = match client
        .get(format!("http://127.0.0.1:{admin_port}/memory"))
        .send()
        .await
    {
        Ok(reply) => reply.json().await.unwrap_or_default(),
        Err(_) => Value::Null,
    };
    // The admin API prints these 64-bit counters as strings.
    let kib = |field: &str| {
        heap[field]
            .as_str()
            .and_then(|bytes| bytes.parse::<u64>().ok())
            .map(|bytes| bytes / 1024)
    };
    json!({
        "rss_kib": pid.map(rss_kib),
        "heap_allocated_kib": kib("allocated"),
        "heap_free_kib": kib("pageheap_free"),
        "thread_caches_kib": kib("total_thread_cache"),
    })
}

/// [`envoy_memory`] of each named Envoy, as one object keyed by name.
async fn envoys_memory(envoys: &[(&str, Option<u32>, u16)]) -> Value {
    let client = reqwest::Client::new();
    let mut readings = serde_json::Map::new();
    for (name, pid, admin_port) in envoys {
        readings.insert((*name).to_owned(), envoy_memory(&client, *pid, *admin_port).await);
    }
    Value::Object(readings)
}

/// CPU time (user + system) of a process, in microseconds.
fn cpu_us(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    ticks * 10_000 // USER_HZ = 100
}

/// What each Envoy costs while nothing is sent to it: CPU µs and wake-ups per second over
/// `window`, after a second to settle.
async fn idle_cost(envoys: &[(&str, Option<u32>)], window: Duration) -> Value {
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before: Vec<Option<(u64, u64)>> = envoys.iter().map(|(_, pid)| pid.map(e2e::scheduled)).collect();
    let started = Instant::now();
    tokio::time::sleep(window).await;
    let seconds = started.elapsed().as_secs_f64();
    let mut cost = serde_json::Map::new();
    for ((name, pid), before) in envoys.iter().zip(before) {
        if let (Some(pid), Some((run, woke))) = (pid, before) {
            let (run_now, woke_now) = e2e::scheduled(*pid);
            cost.insert(
                (*name).to_owned(),
                json!({"cpu_us_per_s": run_now.saturating_sub(run) as f64 / 1e3 / seconds,
                       "wakeups_per_s": woke_now.saturating_sub(woke) as f64 / seconds}),
            );
        }
    }
    Value::Object(cost)
}

/// A JSON POST to the store API, with the bench's token.
fn store_request(path: &str, body: &Value) -> Request<Full<Bytes>> {
    Request::post(path)
        .header("host", "store")
        .header("authorization", format!("Bearer {STORE_TOKEN}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

/// Write `results` to `<out_dir>/<name>` (`target/bench` unless `--out-dir`) and say so.
fn write_results(out_dir: &Path, name: &str, results: &Value) {
    std::fs::create_dir_all(out_dir).unwrap();
    let path = out_dir.join(name);
    std::fs::write(&path, serde_json::to_string_pretty(results).unwrap()).unwrap();
    eprintln!("\nwritten to {}", path.display());
}

/// Free listener and admin ports for one more Envoy in front of the demo service and the store.
fn fresh_ports(demo_port: u16, store_port: u16) -> Ports {
    Ports {
        listener: free_port(),
        admin: free_port(),
        upstream: demo_port,
        stores: vec![store_port],
    }
}

fn pinned_envoy(dir: &Path, config: &str, name: &str) -> Proc {
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, config).unwrap();
    let mut command = Command::new("taskset");
    command
        .arg("-c")
        .arg("0")
        .arg(envoy_bin())
        .arg("-c")
        .arg(&path)
        .args([
            "--concurrency",
            "1",
            "--disable-hot-restart",
            "--log-level",
            "error",
        ])
        .arg("--base-id")
        .arg(free_port().to_string());
    Proc::spawn(name, command, dir.join(format!("{name}.log")))
}

/// The baseline row: pass-through Envoy, 1 KiB POST, closed loop.
const PASSTHROUGH_POST: &str = "pass-through Envoy (POST)";
/// The row the execution targets are about.
const EXECUTES: &str = "filter, keyed POST that executes";
/// Pass-through paced to the same round's execution rate (see the rounds).
const PASSTHROUGH_AT_EXECUTION_RATE: &str = "pass-through Envoy (POST) at the executions' rate";

struct Scenario {
    name: &'static str,
    target: &'static str,
    baseline: Option<&'static str>,
    make: MakeRequest,
    expect: fn(u16, bool) -> bool,
}

/// `make bench`: the filter's cost next to pass-through Envoy (interleaved rounds, closed loop),
/// retries of in-flight keys, gRPC replays, consumer deduplication per message, and the store alone (throughput, per-operation
/// latency at one connection, memory at 100k records). Prints a table and writes
/// `target/bench/results.json` (every round, plus a `summary` per scenario). Needs `make build`
/// first; run it through `make bench`, which pins it with `taskset`.
#[derive(Debug, clap::Parser)]
#[command(name = "idempotency-bench", about, long_about = None)]
struct Settings {
    /// Seconds per scenario and round.
    #[arg(long, env = "BENCH_SECONDS", default_value_t = 4.0)]
    seconds: f64,
    /// Interleaved rounds (filter and pass-through alternate within each).
    #[arg(long, env = "BENCH_ROUNDS", default_value_t = 2)]
    rounds: usize,
    /// Keep-alive connections of the load generator.
    #[arg(long, env = "BENCH_CONNECTIONS", default_value_t = 16)]
    connections: usize,
    /// Connections for the store-alone throughput run.
    #[arg(long, env = "BENCH_STORE_CONNECTIONS", default_value_t = 64)]
    store_connections: usize,
    /// Measure only the store alone (no Envoy, no demo service); writes
    /// `target/bench/store.json`. For comparing storage settings.
    #[arg(long)]
    store_only: bool,
    /// Extra arguments for the store service (e.g. `--store-arg=--embedded-engine=redb`).
    #[arg(long = "store-arg", allow_hyphen_values = true)]
    store_args: Vec<String>,
    /// Only the interleaved rounds (the main table), then stop: for comparing filter settings
    /// quickly. Writes `target/bench/rounds.json`.
    #[arg(long)]
    rounds_only: bool,
    /// JSON fields merged into the filter's plugin configuration for the "filter" rows (e.g.
    /// `--filter-config='{"store_max_calls_in_flight":8}'`).
    #[arg(long, default_value = "{}")]
    filter_config: String,
    /// With `--rounds-only`: run only the scenarios named by these (`;`-separated; an exact
    /// name picks that row, anything else every row whose name contains it), with the rows they
    /// are compared to (e.g. `--scenarios=executes` for an A/B of the executed path).
    #[arg(
        long,
        env = "BENCH_SCENARIOS",
        value_delimiter = ';',
        requires = "rounds_only"
    )]
    scenarios: Vec<String>,
    /// Where the JSON results go [default: target/bench in the repository].
    #[arg(long, env = "BENCH_OUT_DIR")]
    out_dir: Option<PathBuf>,
    /// Live records the store is filled to before its memory is read.
    #[arg(long, env = "BENCH_STORE_RECORDS", default_value_t = 100_000)]
    store_records: u64,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() {
    let settings = <Settings as clap::Parser>::parse();
    // Ctrl-C or SIGTERM ends the run by dropping it, so every process it started is killed
    // (they are killed on drop) instead of being left running.
    tokio::select! {
        () = run(settings) => {}
        () = interrupted() => eprintln!("interrupted: stopping the processes the benchmark started"),
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn interrupted() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

async fn run(settings: Settings) {
    let Settings {
        seconds,
        rounds,
        connections,
        store_connections,
        store_only,
        store_args,
        rounds_only,
        filter_config,
        scenarios: chosen,
        out_dir,
        store_records,
    } = settings;
    let out_dir = out_dir.unwrap_or_else(|| e2e::repo_root().join("target/bench"));
    let filter_config: Value = serde_json::from_str(&filter_config)
        .unwrap_or_else(|e| panic!("--filter-config is not a JSON object: {e}"));
    let duration = Duration::from_secs_f64(seconds);
    let dir = tempfile::tempdir().unwrap();

    let (store_port, demo_port) = (free_port(), free_port());
    let mut store = spawn_store(
        dir.path(),
        store_port,
        &dir.path().join("bench-store"),
        &store_args,
        "store.log",
    );
    if store_only {
        wait_ready(
            &format!("http://127.0.0.1:{store_port}/readyz"),
            &mut store,
            Duration::from_secs(30),
        )
        .await;
        let alone = measure_store_alone(&store, store_port, store_connections, duration, store_records).await;
        let result =
            json!({"machine": machine(), "store_args": store_args, "seconds": seconds, "store": alone});
        print_store_alone(&alone);
        write_results(&out_dir, "store.json", &result);
        return;
    }
    let mut demo = spawn_demo(dir.path(), demo_port, store_port);
    let plain_ports = fresh_ports(demo_port, store_port);
    let filter_ports = fresh_ports(demo_port, store_port);
    let unbatched_ports = fresh_ports(demo_port, store_port);
    let async_ports = fresh_ports(demo_port, store_port);
    let mut plain = pinned_envoy(
        dir.path(),
        &passthrough_bootstrap(&plain_ports),
        "envoy-passthrough",
    );
    let noop_ports = fresh_ports(demo_port, store_port);
    let noop_wasm = e2e::repo_root().join("target/wasm32-wasip1/wasm-release/noop_filter.wasm");
    assert!(
        noop_wasm.exists(),
        "{} is missing: run `make bench`",
        noop_wasm.display()
    );
    let mut noop = pinned_envoy(
        dir.path(),
        &noop_wasm_bootstrap(&noop_ports, &noop_wasm),
        "envoy-noop-wasm",
    );
    // The mechanics of an execution without the idempotency logic: both bodies held and read
    // into the VM, then also one callout per request. Together with the floor they show where
    // an execution's Envoy CPU goes.
    let buffer_ports = fresh_ports(demo_port, store_port);
    let mut buffering = pinned_envoy(
        dir.path(),
        &noop_wasm_bootstrap_with(&buffer_ports, &noop_wasm, "buffer"),
        "envoy-noop-buffer",
    );
    let callout_ports = fresh_ports(demo_port, store_port);
    let mut calling = pinned_envoy(
        dir.path(),
        &noop_wasm_bootstrap_with(&callout_ports, &noop_wasm, "buffer+callout"),
        "envoy-noop-callout",
    );
    let mut filtered = pinned_envoy(
        dir.path(),
        // As shipped in envoy/envoy.yaml: the replay cache on, keyless and non-mutating requests
        // kept out of the Wasm VM by the Envoy matcher.
        &bootstrap_with(
            &filter_ports,
            &plugin_config(&{
                let mut config = json!({"lock_timeout": "5m", "replay_cache_max_entries": 10_000, "replay_cache_max_bytes": 4_194_304});
                if let (Some(config), Some(extra)) = (config.as_object_mut(), filter_config.as_object()) {
                    config.extend(extra.clone());
                }
                config
            }),
            true,
        ),
        "envoy-filter",
    );
    // The filter with other settings beside the shipped ones, each in its own Envoy.
    let variant = |ports: &Ports, settings: Value, name: &str| {
        pinned_envoy(
            dir.path(),
            &bootstrap_with(ports, &plugin_config(&settings), true),
            name,
        )
    };
    // Every store call sent alone: what batching saves under load.
    let mut unbatched = variant(
        &unbatched_ports,
        json!({"lock_timeout": "5m", "store_batch_max_calls": 1}),
        "envoy-filter-unbatched",
    );
    // Answering before the record is written (`record_mode: async`): one store round trip less
    // on each execution's latency.
    let mut async_record = variant(
        &async_ports,
        json!({"lock_timeout": "5m", "record_mode": "async"}),
        "envoy-filter-async",
    );
    wait_ready(
        &format!("http://127.0.0.1:{store_port}/readyz"),
        &mut store,
        Duration::from_secs(30),
    )
    .await;
    wait_ready(
        &format!("http://127.0.0.1:{demo_port}/healthz"),
        &mut demo,
        Duration::from_secs(30),
    )
    .await;
    wait_ready(
        &format!("http://127.0.0.1:{}/ready", plain_ports.admin),
        &mut plain,
        Duration::from_secs(60),
    )
    .await;
    wait_ready(
        &format!("http://127.0.0.1:{}/ready", filter_ports.admin),
        &mut filtered,
        Duration::from_secs(60),
    )
    .await;
    wait_ready(
        &format!("http://127.0.0.1:{}/ready", noop_ports.admin),
        &mut noop,
        Duration::from_secs(60),
    )
    .await;
    for (ports, envoy) in [
        (&unbatched_ports, &mut unbatched),
        (&buffer_ports, &mut buffering),
        (&callout_ports, &mut calling),
        (&async_ports, &mut async_record),
    ] {
        wait_ready(
            &format!("http://127.0.0.1:{}/ready", ports.admin),
            envoy,
            Duration::from_secs(60),
        )
        .await;
    }

    // Memory before any request: the Wasm VMs are loaded and their modules compiled.
    let measured_envoys = [
        ("passthrough", plain.pid(), plain_ports.admin),
        ("noop_wasm", noop.pid(), noop_ports.admin),
        ("with_filter", filtered.pid(), filter_ports.admin),
    ];
    let envoy_memory_at_start = envoys_memory(&measured_envoys).await;

    let addr = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
    let any_2xx: fn(u16, bool) -> bool = |s, _| (200..300).contains(&s);
    let executed: fn(u16, bool) -> bool = |s, r| s == 201 && !r;
    let replayed: fn(u16, bool) -> bool = |s, r| s == 201 && r;
    let mut scenarios = vec![
        Scenario {
            name: "demo service directly (POST)",
            target: "demo",
            baseline: None,
            make: Arc::new(|_, _| post("/api/v1/orders", None)),
            expect: any_2xx,
        },
        Scenario {
            name: PASSTHROUGH_POST,
            target: "plain",
            baseline: None,
            make: Arc::new(|_, _| post("/api/v1/orders", None)),
            expect: any_2xx,
        },
        Scenario {
            name: "pass-through Envoy (GET)",
            target: "plain",
            baseline: None,
            make: Arc::new(|_, _| get("/api/v1/orders")),
            expect: any_2xx,
        },
        Scenario {
            name: "no-op Wasm filter (POST), the floor",
            target: "noop",
            baseline: Some(PASSTHROUGH_POST),
            make: Arc::new(|_, _| post("/api/v1/orders", None)),
            expect: any_2xx,
        },
        Scenario {
            name: "Wasm filter holding and reading both bodies",
            target: "noop-buffer",
            baseline: Some(PASSTHROUGH_POST),
            make: Arc::new(|_, _| post("/api/v1/orders", None)),
            expect: any_2xx,
        },
        Scenario {
            name: "... and making one callout per request",
            target: "noop-callout",
            baseline: Some(PASSTHROUGH_POST),
            make: Arc::new(|_, _| post("/api/v1/orders", None)),
            expect: any_2xx,
        },
        Scenario {
            name: "filter, untouched GET",
            target: "filter",
            baseline: Some("pass-through Envoy (GET)"),
            make: Arc::new(|_, _| get("/api/v1/orders")),
            expect: any_2xx,
        },
        Scenario {
            name: "filter, untouched POST without key",
            target: "filter",
            baseline: Some(PASSTHROUGH_POST),
            make: Arc::new(|_, _| post("/api/v1/orders", None)),
            expect: any_2xx,
        },
        Scenario {
            name: EXECUTES,
            target: "filter",
            baseline: Some(PASSTHROUGH_POST),
            make: Arc::new(|c, i| {
                post(
                    "/api/v1/orders",
                    Some(format!("exec-{}-{c}-{i}", std::process::id())),
                )
            }),
            expect: executed,
        },
        Scenario {
            name: "filter, keyed POST that executes, store calls unbatched",
            target: "unbatched",
            baseline: Some(PASSTHROUGH_POST),
            make: Arc::new(|c, i| {
                post(
                    "/api/v1/orders",
                    Some(format!("unbatched-{}-{c}-{i}", std::process::id())),
                )
            }),
            expect: executed,
        },
        Scenario {
            name: "filter, keyed POST that executes, record_mode async",
            target: "async",
            baseline: Some(PASSTHROUGH_POST),
            make: Arc::new(|c, i| {
                post(
                    "/api/v1/orders",
                    Some(format!("async-{}-{c}-{i}", std::process::id())),
                )
            }),
            expect: executed,
        },
        Scenario {
            name: "filter, keyed POST that replays",
            target: "filter",
            baseline: Some(PASSTHROUGH_POST),
            make: Arc::new(|c, _| {
                post(
                    "/api/v1/orders",
                    Some(format!("replay-{}-{c}", std::process::id())),
                )
            }),
            expect: replayed,
        },
    ];
    if !chosen.is_empty() {
        // An entry naming a scenario exactly picks only it; otherwise every name containing it.
        let exact: Vec<&String> = chosen
            .iter()
            .filter(|c| scenarios.iter().any(|s| s.name == c.as_str()))
            .collect();
        let picked = |s: &Scenario| {
            chosen.iter().any(|c| {
                if exact.contains(&c) {
                    s.name == c.as_str()
                } else {
                    s.name.contains(c.as_str())
                }
            })
        };
        let baselines: Vec<&str> = scenarios
            .iter()
            .filter(|s| picked(s))
            .filter_map(|s| s.baseline)
            .collect();
        scenarios.retain(|s| picked(s) || baselines.contains(&s.name));
    }
    // Seed the replay keys (one per connection) so the replay scenario only replays.
    let client = reqwest::Client::new();
    for c in 0..connections.max(1) {
        client
            .post(format!(
                "http://127.0.0.1:{}/api/v1/orders",
                filter_ports.listener
            ))
            .header("idempotency-key", format!("replay-{}-{c}", std::process::id()))
            .header("content-type", "application/json")
            .body(body_1k())
            .send()
            .await
            .unwrap();
    }

    let pids = |target: &str| match target {
        "plain" => plain.pid(),
        "filter" => filtered.pid(),
        "noop" => noop.pid(),
        "unbatched" => unbatched.pid(),
        "async" => async_record.pid(),
        "noop-buffer" => buffering.pid(),
        "noop-callout" => calling.pid(),
        _ => None,
    };
    let port = |target: &str| match target {
        "plain" => plain_ports.listener,
        "filter" => filter_ports.listener,
        "noop" => noop_ports.listener,
        "unbatched" => unbatched_ports.listener,
        "async" => async_ports.listener,
        "noop-buffer" => buffer_ports.listener,
        "noop-callout" => callout_ports.listener,
        _ => demo_port,
    };
    let mut results: Vec<Value> = Vec::new();
    eprintln!("{rounds} interleaved rounds, {seconds}s per scenario, {connections} connections");
    for round in 1..=rounds {
        let mut round_stats: Vec<(&str, Measured)> = Vec::new();
        for scenario in &scenarios {
            let measured = measure(
                scenario.name,
                scenario,
                (addr(port(scenario.target)), pids(scenario.target)),
                connections,
                duration,
                None,
            )
            .await;
            round_stats.push((scenario.name, measured));
        }
        // Envoy's CPU per request falls as its load rises (each wake-up of its event loop and
        // each syscall serves more requests), and executions run at a fifth of pass-through's
        // rate. So pass-through is also measured at this round's execution rate, same
        // connections: the fair baseline for an execution's Envoy CPU.
        let execution_rate = round_stats
            .iter()
            .find(|(name, _)| *name == EXECUTES)
            .map(|(_, row)| row.stats.rps());
        if let (Some(rate), Some(passthrough)) = (
            execution_rate,
            scenarios.iter().find(|s| s.name == PASSTHROUGH_POST),
        ) {
            let measured = measure(
                PASSTHROUGH_AT_EXECUTION_RATE,
                passthrough,
                (addr(port(passthrough.target)), pids(passthrough.target)),
                connections,
                duration,
                Some(Duration::from_secs_f64(connections as f64 / rate.max(1.0))),
            )
            .await;
            round_stats.push((PASSTHROUGH_AT_EXECUTION_RATE, measured));
        }
        for (name, row) in &round_stats {
            let baseline_name = scenarios
                .iter()
                .find(|s| s.name == *name)
                .and_then(|scenario| scenario.baseline);
            let baseline = baseline_name
                .and_then(|b| round_stats.iter().find(|(n, _)| *n == b))
                .map(|(_, baseline)| baseline.stats.rps());
            let stats = &row.stats;
            let ratio = baseline.map(|b| stats.rps() / b);
            results.push(json!({
                "round": round, "scenario": name, "baseline": baseline_name, "connections": connections,
                "rps": stats.rps(), "p50_us": stats.p50_us(), "p99_us": stats.p99_us(),
                "ratio_to_passthrough": ratio, "envoy_cpu_us_per_request": row.cpu_per_request,
                "host_stolen_percent": row.stolen_percent,
                "disturbed": steal::disturbed(row.stolen_percent),
                "errors": stats.errors, "unexpected_responses": stats.unexpected,
            }));
        }
    }

    // How many store calls each batch carried (both filtered Envoys share the store; the
    // unbatched one sends none).
    let store_metrics = e2e::get_text(
        &reqwest::Client::new(),
        &format!("http://127.0.0.1:{store_port}/metrics"),
    )
    .await;
    let batches = e2e::metric_sum(&store_metrics, "idempotency_batch_calls_count");
    let batched_calls = e2e::metric_sum(&store_metrics, "idempotency_batch_calls_sum");
    let commits = e2e::metric_sum(&store_metrics, "idempotency_store_durable_commits_total");
    let committed = e2e::metric_sum(
        &store_metrics,
        "idempotency_store_durable_commit_operations_total",
    );
    let synced = e2e::metric_sum(
        &store_metrics,
        "idempotency_store_durable_commit_sync_seconds_total",
    );
    let batching = json!({"batches": batches, "calls_in_batches": batched_calls,
        "mean_calls_per_batch": if batches > 0.0 { batched_calls / batches } else { 0.0 },
        "durable_commits": commits, "operations_in_durable_commits": committed,
        "mean_operations_per_commit": if commits > 0.0 { committed / commits } else { 0.0 },
        "mean_sync_us_per_commit": if commits > 0.0 { synced * 1e6 / commits } else { 0.0 }});
    eprintln!(
        "store calls sent in batches: {batched_calls} in {batches} batches ({:.1} per batch); \
         the store made {commits} durable commits carrying {committed} operations ({:.1} per commit), \
         {:.0} µs each reaching the disk",
        batching["mean_calls_per_batch"].as_f64().unwrap_or(0.0),
        batching["mean_operations_per_commit"].as_f64().unwrap_or(0.0),
        batching["mean_sync_us_per_commit"].as_f64().unwrap_or(0.0)
    );
    // An acquire's time as the filter sees it (queued → answered) against the store's own
    // (request parsed → decided, durable): the difference is transport, batching and queueing.
    // Envoy flushes histograms every 5 s: wait for the last rounds to be in.
    tokio::time::sleep(Duration::from_millis(5_500)).await;
    let envoy_metrics = e2e::get_text(
        &reqwest::Client::new(),
        &format!("http://127.0.0.1:{}/stats/prometheus", filter_ports.admin),
    )
    .await;
    let mean = |text: &str, name: &str, scale: f64| {
        let count = metric_containing(text, &format!("{name}_count"));
        (count > 0.0).then(|| metric_containing(text, &format!("{name}_sum")) * scale / count)
    };
    let acquire_times = json!({
        "at_proxy_mean_ms": mean(&envoy_metrics, "idempotency_lock_acquisition_duration_milliseconds", 1.0),
        "in_store_mean_ms": mean(&store_metrics, "idempotency_lock_acquisition_duration_seconds", 1000.0),
    });
    eprintln!(
        "acquire, mean: {:.2} ms at the filter, queued to answered (whole ms rounded up; Envoy flushes \
         histograms every 5 s), {:.2} ms inside the store",
        acquire_times["at_proxy_mean_ms"].as_f64().unwrap_or(f64::NAN),
        acquire_times["in_store_mean_ms"].as_f64().unwrap_or(f64::NAN)
    );
    if rounds_only {
        let rounds = json!({"summary": summarize(&results), "rounds": results, "filter_config": filter_config,
            "store_batching": batching, "acquire_times": acquire_times});
        print_rounds(&rounds);
        write_results(&out_dir, "rounds.json", &rounds);
        return;
    }

    // Added latency at one connection.
    let mut single = Vec::new();
    for scenario in scenarios
        .iter()
        .filter(|s| s.target != "demo" && !s.name.contains("GET"))
    {
        let host_before = steal::Snapshot::take();
        let stats = load(
            addr(port(scenario.target)),
            1,
            duration,
            scenario.make.clone(),
            scenario.expect,
        )
        .await;
        let stolen = stolen_since(host_before);
        assert_clean(scenario.name, &stats);
        single.push((scenario.name, stats.p50_us(), stats.p99_us(), stolen));
    }
    let base_p50 = single
        .iter()
        .find(|(n, ..)| *n == PASSTHROUGH_POST)
        .map(|x| x.1)
        .unwrap_or(0);
    let added: Vec<Value> = single
        .iter()
        .map(|(n, p50, p99, stolen)| {
            json!({"scenario": n, "p50_us": p50, "p99_us": p99, "added_p50_us": p50.saturating_sub(base_p50),
                "host_stolen_percent": stolen, "disturbed": steal::disturbed(*stolen)})
        })
        .collect();

    // Envoy's memory after the 1 KiB rounds, before the growth rows buffer 64 KiB and 1 MiB
    // bodies (the module's linear memory keeps its high-water mark, so the final reading has it).
    // The store's memory along the run, to tell which scenario grows it.
    let mut store_rss_along = vec![json!({"after": "1 KiB rounds", "rss_kib": store.pid().map(rss_kib)})];
    let envoy_memory_after_rounds = envoys_memory(&measured_envoys).await;
    // What an idle proxy pays for a Wasm filter (its VMs' timers), after serving the rounds.
    let envoy_idle = idle_cost(
        &[
            ("passthrough", plain.pid()),
            ("noop_wasm", noop.pid()),
            ("with_filter", filtered.pid()),
        ],
        Duration::from_secs(3),
    )
    .await;

    // How the cost of an execution grows with the body size and with connections: pass-through
    // POST against a keyed POST that executes, once each (not per round).
    let mut growth = Vec::new();
    for (body_bytes, conns) in [
        (1024, 16),
        (64 * 1024, 16),
        (1024 * 1024 - 64, 16),
        (1024, 1),
        (1024, 64),
    ] {
        let body = sized_body(body_bytes);
        let mut row = json!({"body_bytes": body.len(), "connections": conns});
        for (target, label) in [("plain", "passthrough"), ("filter", "executes")] {
            let body = body.clone();
            let make: MakeRequest = if target == "plain" {
                Arc::new(move |_, _| post_body("/api/v1/orders", None, body.clone()))
            } else {
                Arc::new(move |c, i| {
                    post_body(
                        "/api/v1/orders",
                        Some(format!(
                            "grow-{}-{body_bytes}-{conns}-{c}-{i}",
                            std::process::id()
                        )),
                        body.clone(),
                    )
                })
            };
            let expect = if target == "plain" { any_2xx } else { executed };
            let envoy_pid = pids(target);
            let host_before = steal::Snapshot::take();
            let cpu_before = envoy_pid.map(cpu_us).unwrap_or(0);
            let stats = load(addr(port(target)), conns, duration, make, expect).await;
            let stolen = stolen_since(host_before);
            assert_clean(
                &format!("growth, {label}, {body_bytes} B, {conns} connections"),
                &stats,
            );
            let cpu = envoy_pid
                .map(|p| cpu_us(p).saturating_sub(cpu_before))
                .unwrap_or(0);
            row[label] = json!({"rps": stats.rps(), "p50_us": stats.p50_us(), "p99_us": stats.p99_us(),
                "envoy_cpu_us_per_request": cpu as f64 / stats.requests.max(1) as f64,
                "host_stolen_percent": stolen, "disturbed": steal::disturbed(stolen),
                "errors": stats.errors, "unexpected_responses": stats.unexpected});
        }
        row["ratio"] = json!(
            row["executes"]["rps"].as_f64().unwrap_or(0.0)
                / row["passthrough"]["rps"].as_f64().unwrap_or(1.0).max(1.0)
        );
        growth.push(row);
    }

    store_rss_along
        .push(json!({"after": "growth rows (64 KiB, 1 MiB bodies)", "rss_kib": store.pid().map(rss_kib)}));
    // Retries of in-flight keys (`in_progress_wait`): the store holds a retry's acquire until the
    // first attempt completes, then answers with the replay. Measured on its own Envoy: how long a
    // waiting retry takes, and whether held waiters slow everything else down.
    let wait_ports = fresh_ports(demo_port, store_port);
    let mut waiting_envoy = pinned_envoy(
        dir.path(),
        &bootstrap_with(
            &wait_ports,
            &plugin_config(&json!({"lock_timeout": "5m", "in_progress_wait": "5s"})),
            true,
        ),
        "envoy-wait",
    );
    wait_ready(
        &format!("http://127.0.0.1:{}/ready", wait_ports.admin),
        &mut waiting_envoy,
        Duration::from_secs(60),
    )
    .await;
    let in_flight = in_flight_retries(addr(wait_ports.listener), connections, duration).await;
    let exec = |c: usize, i: u64| {
        post(
            "/api/v1/orders",
            Some(format!("wexec-{}-{c}-{i}", std::process::id())),
        )
    };
    let alone = load(
        addr(wait_ports.listener),
        connections,
        duration,
        Arc::new(exec),
        executed,
    )
    .await;
    let holder = tokio::spawn(hold_waiters(
        addr(wait_ports.listener),
        16,
        4,
        duration + Duration::from_secs(2),
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let beside = load(
        addr(wait_ports.listener),
        connections,
        duration,
        Arc::new(exec),
        executed,
    )
    .await;
    let held = holder.await.unwrap();
    let in_flight_retries = json!({
        "retries": in_flight.0, "replayed": in_flight.1, "retry_p50_ms": in_flight.2, "retry_p99_ms": in_flight.3,
        "first_attempt_ms": 200,
        "executes_rps_alone": alone.rps(), "executes_rps_beside_64_waiters": beside.rps(),
        "ratio": beside.rps() / alone.rps().max(1.0), "waiting_retries_served": held,
    });
    drop(waiting_envoy);

    store_rss_along.push(json!({"after": "in-flight retries", "rss_kib": store.pid().map(rss_kib)}));
    // gRPC: a replayed unary call (routed through the store's /v1/replay) against the same call
    // executed through pass-through Envoy, with a stock tonic client and server.
    let grpc_port = e2e::grpc::start_server(e2e::grpc::OrdersService::default()).await;
    let (grpc_plain_ports, grpc_filter_ports) = (
        fresh_ports(demo_port, store_port),
        fresh_ports(demo_port, store_port),
    );
    let mut grpc_plain = pinned_envoy(
        dir.path(),
        &e2e::grpc::grpc_passthrough_bootstrap(&grpc_plain_ports, grpc_port),
        "envoy-grpc-passthrough",
    );
    let mut grpc_filtered = pinned_envoy(
        dir.path(),
        &e2e::grpc::grpc_bootstrap(
            &grpc_filter_ports,
            grpc_port,
            &plugin_config(&json!({"lock_timeout": "5m"})),
        ),
        "envoy-grpc-filter",
    );
    for (ports, envoy) in [
        (&grpc_plain_ports, &mut grpc_plain),
        (&grpc_filter_ports, &mut grpc_filtered),
    ] {
        wait_ready(
            &format!("http://127.0.0.1:{}/ready", ports.admin),
            envoy,
            Duration::from_secs(60),
        )
        .await;
    }
    let grpc_pass = grpc_load(grpc_plain_ports.listener, connections, duration, false).await;
    let grpc_replay = grpc_load(grpc_filter_ports.listener, connections, duration, true).await;
    let grpc = json!({
        "passthrough_unary": {"rps": grpc_pass.rps(), "p50_us": grpc_pass.p50_us(), "p99_us": grpc_pass.p99_us(), "errors": grpc_pass.errors},
        "replay_unary": {"rps": grpc_replay.rps(), "p50_us": grpc_replay.p50_us(), "p99_us": grpc_replay.p99_us(),
                         "errors": grpc_replay.errors, "not_replayed": grpc_replay.unexpected},
        "ratio": grpc_replay.rps() / grpc_pass.rps().max(1.0),
    });
    drop(grpc_plain);
    drop(grpc_filtered);

    store_rss_along.push(json!({"after": "gRPC replays", "rss_kib": store.pid().map(rss_kib)}));
    let envoy_memory = json!({
        "before_any_request": envoy_memory_at_start,
        "after_1kib_rounds": envoy_memory_after_rounds,
        "at_the_end": envoys_memory(&measured_envoys).await,
    });

    let store_alone =
        measure_store_alone(&store, store_port, store_connections, duration, store_records).await;
    let wasm_bytes = std::fs::metadata(wasm_path()).map(|m| m.len()).unwrap_or(0);

    let per_scenario = summarize(&results);
    let summary = json!({
        "summary": per_scenario,
        "machine": machine(),
        "settings": {"seconds_per_scenario": seconds, "rounds": rounds, "connections": connections,
                     "body_bytes": 1024, "envoy_concurrency": 1},
        "rounds": results,
        "one_connection": added,
        "growth": growth,
        "envoy_memory": envoy_memory,
        "envoy_idle": envoy_idle,
        "store_alone": store_alone["store_alone"],
        "store_rss_kib_at_live_records": store_alone["store_rss_kib_at_live_records"],
        "store_rss_along_the_run": store_rss_along,
        "wasm_bytes": wasm_bytes,
        "in_flight_retries": in_flight_retries,
        "grpc": grpc,
        "consumer_dedup": store_alone["consumer_dedup"],
        "store_batching": batching,
        "acquire_times": acquire_times,
    });
    print_table(&summary);
    write_results(&out_dir, "results.json", &summary);
}

/// The main table: every scenario of every round.
fn print_rounds(summary: &Value) {
    println!(
        "\n{:<40} {:>10} {:>10} {:>10} {:>8} {:>12} {:>9}",
        "scenario (round)", "req/s", "p50 µs", "p99 µs", "ratio", "Envoy µs/req", "stolen %"
    );
    for row in summary["rounds"].as_array().unwrap() {
        let ratio = row["ratio_to_passthrough"]
            .as_f64()
            .map(|r| format!("{r:.2}"))
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<40} {:>10.0} {:>10} {:>10} {:>8} {:>12.1} {:>9}{}",
            format!("{} ({})", row["scenario"].as_str().unwrap(), row["round"]),
            row["rps"].as_f64().unwrap(),
            row["p50_us"],
            row["p99_us"],
            ratio,
            row["envoy_cpu_us_per_request"].as_f64().unwrap_or(0.0),
            stolen_column(&row["host_stolen_percent"]),
            disturbed_marker(row["disturbed"] == true)
        );
    }
    let disturbed_rows = summary["rounds"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|row| row["disturbed"] == true)
        .count();
    if disturbed_rows > 0 {
        println!(
            "{disturbed_rows} rows ran while the host took more than {}% of a CPU (\"disturbed\"); \
             the summary in the JSON also gives the medians over the rounds without them",
            steal::DISTURBED_PERCENT
        );
    }
    // Per round, since a disturbed round moves both rows of that round together.
    let rounds = summary["rounds"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let cpu_in = |round: &Value, name: &str| {
        rounds
            .iter()
            .find(|row| row["round"] == *round && row["scenario"] == name)
            .and_then(|row| row["envoy_cpu_us_per_request"].as_f64())
            .filter(|cpu| *cpu > 0.0)
    };
    let mut round_numbers: Vec<&Value> = rounds.iter().map(|row| &row["round"]).collect();
    round_numbers.dedup();
    let disturbed_in = |round: &Value| {
        rounds.iter().any(|row| {
            row["round"] == *round
                && [EXECUTES, PASSTHROUGH_AT_EXECUTION_RATE, PASSTHROUGH_POST]
                    .contains(&row["scenario"].as_str().unwrap_or(""))
                && row["disturbed"] == true
        })
    };
    for round in round_numbers {
        if let (Some(execution), Some(same_rate), Some(closed_loop)) = (
            cpu_in(round, EXECUTES),
            cpu_in(round, PASSTHROUGH_AT_EXECUTION_RATE),
            cpu_in(round, PASSTHROUGH_POST),
        ) {
            println!(
                "round {round}: Envoy CPU per execution {execution:.0} µs = {:.1}× pass-through at the same rate \
                 ({same_rate:.0} µs), {:.1}× pass-through at its own closed-loop rate ({closed_loop:.0} µs){}",
                execution / same_rate,
                execution / closed_loop,
                if disturbed_in(round) { " (disturbed)" } else { "" }
            );
        }
    }
}

/// What the tables print after a disturbed row.
fn disturbed_marker(disturbed: bool) -> &'static str {
    if disturbed {
        "  disturbed"
    } else {
        ""
    }
}

/// A row's stolen share of a CPU, for the tables ("-" where `/proc/stat` could not say).
fn stolen_column(percent: &Value) -> String {
    percent
        .as_f64()
        .map(|p| format!("{p:.1}"))
        .unwrap_or_else(|| "-".into())
}

/// The store alone (Envoy idle or absent): per-operation latency at one connection, acquire +
/// complete pairs per second at `connections`, consumer dedup per message, memory at `records`
/// live records (100k unless `--store-records`).
async fn measure_store_alone(
    store: &Proc,
    store_port: u16,
    store_connections: usize,
    duration: Duration,
    records: u64,
) -> Value {
    // The store alone: acquire + complete pairs per second, embedded backend, durable commits.
    // Envoy is idle now: give the store CPU 0 and keep the load generator on CPU 1.
    if let Some(pid) = store.pid() {
        let _ = Command::new("taskset")
            .args(["-a", "-p", "-c", "0", &pid.to_string()])
            .output();
    }
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
                                          "write_buffer_kib": write_buffer_kib, "rss_kib_5s_idle": store_rss_idle},
        "consumer_dedup": consumer_dedup,
    })
}

/// Closed-loop unary gRPC calls through Envoy on `port`: `replay` sends one seeded key per
/// connection (every call after the first is a replay), otherwise keyless calls that execute.
async fn grpc_load(port: u16, connections: usize, duration: Duration, replay: bool) -> Stats {
    use e2e::grpc::pb::{orders_client::OrdersClient, CreateRequest};
    let url = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    let deadline = started + duration;
    let tasks: Vec<_> = (0..connections)
        .map(|c| {
            let url = url.clone();
            tokio::spawn(async move {
                let mut client = OrdersClient::connect(url).await.unwrap();
                let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
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
async fn keyed(client: &reqwest::Client, addr: SocketAddr, key: &str, delay_ms: u64) -> (u16, bool, f64) {
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
async fn retries_of_in_flight_keys(
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
async fn in_flight_retries(addr: SocketAddr, workers: usize, duration: Duration) -> (u64, u64, f64, f64) {
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
async fn hold_waiters(addr: SocketAddr, firsts: usize, retries: usize, duration: Duration) -> u64 {
    let answers = retries_of_in_flight_keys(addr, "held", firsts, 1_000, retries, duration).await;
    answers.iter().filter(|(replayed, _)| *replayed).count() as u64
}

/// One keep-alive HTTP/1.1 connection to `addr` (no Nagle delay), driven by its own task.
async fn keep_alive_connection(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let (sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    sender
}

/// Acquire + complete pairs against the store API; returns (pairs, seconds, latency of each
/// operation in µs).
async fn store_pairs(addr: SocketAddr, connections: usize, duration: Duration) -> (u64, f64, Histogram<u64>) {
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
                let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
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
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
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
async fn store_pairs_batched(
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
async fn consumer_dedup_cost(store_url: &str, duration: Duration) -> Value {
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
    let mut new_message = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
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
    let mut duplicate = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
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

/// Per scenario over the rounds: the median ratio to pass-through, median Envoy µs/request and
/// median p50/p99 — the figures the README's table quotes; and how many rounds the host
/// disturbed (the row or its baseline, see [`steal`]), with the median ratio and Envoy
/// µs/request over the other rounds.
fn summarize(rounds: &[Value]) -> Value {
    fn median(mut values: Vec<f64>) -> Option<f64> {
        values.retain(|v| v.is_finite());
        values.sort_by(f64::total_cmp);
        let n = values.len();
        match n {
            0 => None,
            _ if n % 2 == 1 => values.get(n / 2).copied(),
            _ => Some((values[n / 2 - 1] + values[n / 2]) / 2.0),
        }
    }
    let mut names: Vec<&str> = rounds.iter().filter_map(|r| r["scenario"].as_str()).collect();
    names.dedup();
    let mut summary = serde_json::Map::new();
    let disturbed = |row: &Value| {
        let baseline_disturbed = rounds.iter().any(|other| {
            other["round"] == row["round"]
                && other["scenario"] == row["baseline"]
                && other["disturbed"] == true
        });
        row["disturbed"] == true || baseline_disturbed
    };
    for name in names {
        let rows = || rounds.iter().filter(|r| r["scenario"] == name);
        let of = |field: &str| -> Vec<f64> { rows().filter_map(|r| r[field].as_f64()).collect() };
        let undisturbed = |field: &str| -> Vec<f64> {
            rows()
                .filter(|r| !disturbed(r))
                .filter_map(|r| r[field].as_f64())
                .collect()
        };
        summary.insert(
            name.to_owned(),
            json!({
                "median_ratio_to_passthrough": median(of("ratio_to_passthrough")),
                "median_envoy_cpu_us_per_request": median(of("envoy_cpu_us_per_request")),
                "median_rps": median(of("rps")),
                "median_p50_us": median(of("p50_us")),
                "median_p99_us": median(of("p99_us")),
                "rounds_disturbed": rows().filter(|r| disturbed(r)).count(),
                "undisturbed_median_ratio_to_passthrough": median(undisturbed("ratio_to_passthrough")),
                "undisturbed_median_envoy_cpu_us_per_request": median(undisturbed("envoy_cpu_us_per_request")),
            }),
        );
    }
    Value::Object(summary)
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    let cores = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let envoy = Command::new(envoy_bin())
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    json!({"cpu": cpu, "cores": cores, "envoy": envoy})
}

fn print_table(summary: &Value) {
    print_rounds(summary);
    println!("\nOne connection:");
    for row in summary["one_connection"].as_array().unwrap() {
        println!(
            "  {:<40} p50 {:>6} µs  p99 {:>6} µs  added p50 {:>6} µs  stolen {:>5} %{}",
            row["scenario"].as_str().unwrap(),
            row["p50_us"],
            row["p99_us"],
            row["added_p50_us"],
            stolen_column(&row["host_stolen_percent"]),
            disturbed_marker(row["disturbed"] == true)
        );
    }
    println!("\nCost by body size and connections (keyed POST that executes vs pass-through POST):");
    for row in summary["growth"].as_array().into_iter().flatten() {
        let disturbed = row["passthrough"]["disturbed"] == true || row["executes"]["disturbed"] == true;
        println!(
            "  {:>8} B, {:>2} conns: pass-through {:>6.0}/s p50 {:>6} µs, Envoy {:>5.0} µs/req; executes {:>6.0}/s p50 {:>6} µs, Envoy {:>6.0} µs/req; ratio {:.2}{}",
            row["body_bytes"], row["connections"],
            row["passthrough"]["rps"].as_f64().unwrap_or(0.0), row["passthrough"]["p50_us"],
            row["passthrough"]["envoy_cpu_us_per_request"].as_f64().unwrap_or(0.0),
            row["executes"]["rps"].as_f64().unwrap_or(0.0), row["executes"]["p50_us"],
            row["executes"]["envoy_cpu_us_per_request"].as_f64().unwrap_or(0.0),
            row["ratio"].as_f64().unwrap_or(0.0),
            disturbed_marker(disturbed)
        );
    }
    print_envoy_memory(&summary["envoy_memory"]);
    let idle = &summary["envoy_idle"];
    println!(
        "Envoy idle (3 s after the rounds), CPU µs/s and wake-ups/s: pass-through {:.0} / {:.1}, no-op Wasm filter {:.0} / {:.1}, with filter {:.0} / {:.1}",
        idle["passthrough"]["cpu_us_per_s"].as_f64().unwrap_or(f64::NAN),
        idle["passthrough"]["wakeups_per_s"].as_f64().unwrap_or(f64::NAN),
        idle["noop_wasm"]["cpu_us_per_s"].as_f64().unwrap_or(f64::NAN),
        idle["noop_wasm"]["wakeups_per_s"].as_f64().unwrap_or(f64::NAN),
        idle["with_filter"]["cpu_us_per_s"].as_f64().unwrap_or(f64::NAN),
        idle["with_filter"]["wakeups_per_s"].as_f64().unwrap_or(f64::NAN),
    );
    print_store_alone(summary);
    println!(".wasm size: {} bytes", summary["wasm_bytes"]);
    let waits = &summary["in_flight_retries"];
    println!(
        "Retries of in-flight keys (in_progress_wait): {} retries, {} replayed after waiting, p50 {:.0} ms / p99 {:.0} ms (first attempt takes {} ms)",
        waits["retries"], waits["replayed"], waits["retry_p50_ms"].as_f64().unwrap_or(0.0),
        waits["retry_p99_ms"].as_f64().unwrap_or(0.0), waits["first_attempt_ms"]
    );
    println!(
        "  executing keyed POSTs: {:.0}/s alone, {:.0}/s beside 64 waiting retries (ratio {:.2})",
        waits["executes_rps_alone"].as_f64().unwrap_or(0.0),
        waits["executes_rps_beside_64_waiters"].as_f64().unwrap_or(0.0),
        waits["ratio"].as_f64().unwrap_or(0.0)
    );
    let grpc = &summary["grpc"];
    println!(
        "gRPC unary: pass-through {:.0}/s (p50 {} µs); replay via the store route {:.0}/s (p50 {} µs, p99 {} µs), ratio {:.2}; not replayed: {}",
        grpc["passthrough_unary"]["rps"].as_f64().unwrap_or(0.0), grpc["passthrough_unary"]["p50_us"],
        grpc["replay_unary"]["rps"].as_f64().unwrap_or(0.0), grpc["replay_unary"]["p50_us"],
        grpc["replay_unary"]["p99_us"], grpc["ratio"].as_f64().unwrap_or(0.0), grpc["replay_unary"]["not_replayed"]
    );
    println!("Machine: {}", summary["machine"]);
}

/// Sum of every series whose name ends with `name` (Envoy prefixes its stats' names).
fn metric_containing(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let metric = series.split('{').next()?;
            metric
                .ends_with(name)
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

/// Envoy's memory at the three readings, pass-through against the no-op Wasm filter and the
/// filter: RSS, and the heap's live bytes against what tcmalloc keeps after use.
fn print_envoy_memory(memory: &Value) {
    println!("\nEnvoy memory, KiB: RSS = heap live + heap free + thread caches + the rest (code, Wasm memories, V8)");
    for (reading, label) in [
        ("before_any_request", "before any request"),
        ("after_1kib_rounds", "after the 1 KiB rounds"),
        ("at_the_end", "at the end (after 64 KiB and 1 MiB bodies)"),
    ] {
        println!("  {label}:");
        for (envoy, name) in [
            ("passthrough", "pass-through"),
            ("noop_wasm", "no-op Wasm filter"),
            ("with_filter", "with filter"),
        ] {
            let row = &memory[reading][envoy];
            let kib = |field: &str| {
                row[field]
                    .as_u64()
                    .map_or_else(|| "?".to_owned(), |v| v.to_string())
            };
            println!(
                "    {name:<18} RSS {:>7}  heap live {:>6}  heap free {:>6}  thread caches {:>6}",
                kib("rss_kib"),
                kib("heap_allocated_kib"),
                kib("heap_free_kib"),
                kib("thread_caches_kib")
            );
        }
    }
}

/// The store-alone lines of the table (also the whole output of `--store-only`).
fn print_store_alone(summary: &Value) {
    let alone = &summary["store_alone"];
    let single = &alone["one_connection_per_operation"];
    let stolen = |phase: &Value| {
        format!(
            " (stolen {} %{})",
            stolen_column(&phase["host_stolen_percent"]),
            if phase["disturbed"] == true {
                ", disturbed"
            } else {
                ""
            }
        )
    };
    println!(
        "Store alone: {:.0} acquire+complete pairs/s (embedded, durable){}; one connection: p50 {} µs, p99 {} µs per durable operation, of which the commit's write and sync {:.0} µs (mean){}",
        alone["pairs_per_second"].as_f64().unwrap_or(0.0),
        stolen(alone),
        single["p50_us"],
        single["p99_us"],
        single["mean_sync_us_per_commit"].as_f64().unwrap_or(0.0),
        stolen(single)
    );
    println!(
        "Store alone, batched as the filter sends under load ({} callers, {} calls per /v1/batch): {:.0} pairs/s{}",
        alone["batched"]["connections"],
        alone["batched"]["calls_per_batch"],
        alone["batched"]["pairs_per_second"].as_f64().unwrap_or(0.0),
        stolen(&alone["batched"])
    );
    let at_records = &summary["store_rss_kib_at_live_records"];
    println!(
        "Store RSS with {} live records: {} KiB right after writing them (memtables {:.0} KiB), {} KiB after 5 s idle",
        at_records["records"],
        at_records["rss_kib"],
        at_records["write_buffer_kib"].as_f64().unwrap_or(0.0),
        at_records["rss_kib_5s_idle"]
    );
    if let Some(along) = summary["store_rss_along_the_run"].as_array() {
        let steps: Vec<String> = along
            .iter()
            .map(|step| {
                format!(
                    "after {} {} KiB",
                    step["after"].as_str().unwrap_or("?"),
                    step["rss_kib"]
                )
            })
            .collect();
        println!(
            "Store RSS along the run (one store serves every Envoy): {}",
            steps.join("; ")
        );
    }
    let dedup = &summary["consumer_dedup"];
    println!(
        "Consumer dedup (claim + complete per new message, one consumer): {:.0} msg/s, p50 {} µs, p99 {} µs; duplicate skipped (one claim): p50 {} µs",
        dedup["new_messages_per_second"].as_f64().unwrap_or(0.0), dedup["new_message"]["p50_us"],
        dedup["new_message"]["p99_us"], dedup["duplicate"]["p50_us"]
    );
}
