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
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use e2e::envoy_config::{
    bootstrap_with, noop_wasm_bootstrap, noop_wasm_bootstrap_with, passthrough_bootstrap, Ports,
};
use e2e::{free_port, plugin_config, spawn_demo, spawn_store, wait_ready, wasm_path};
use serde_json::{json, Value};

mod body_cost;
mod floor;
mod process;
mod report;
mod retries;
mod steal;
mod store_alone;
mod targets;
mod traffic;

use process::{envoys_memory, fresh_ports, idle_cost, machine, pinned_envoy, rss_kib};
use report::{metric_containing, print_rounds, print_store_alone, print_table, summarize, write_results};
use retries::{grpc_load, hold_waiters, in_flight_retries};
use store_alone::measure_store_alone;
use traffic::{body_1k, get, load, measure, post, post_body, sized_body, MakeRequest, Measured};

/// The CPU `make bench` pins the bench to (`taskset -c 1`), and with it the store, the demo
/// service and the load generator; Envoy gets CPU 0.
const STORE_CPU_IN_ROUNDS: usize = 1;

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
    /// Only the interleaved rounds (the main table) and the same rows at one connection, then
    /// stop: for comparing filter settings or builds quickly. Writes `target/bench/rounds.json`.
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
    /// Only where a large execution's Envoy CPU goes (`body_cost.rs`): each step of an
    /// execution apart, at `--body-sizes`; writes `target/bench/body_cost.json`.
    #[arg(long)]
    body_cost: bool,
    /// Body sizes (bytes) of `--body-cost`.
    #[arg(long, value_delimiter = ',', default_value = "65536,1048512")]
    body_sizes: Vec<usize>,
    /// With `--body-cost`: only pass-through and the filter (an A/B of the filter or the store).
    #[arg(long)]
    without_steps: bool,
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
        body_cost,
        body_sizes,
        without_steps,
    } = settings;
    let out_dir = out_dir.unwrap_or_else(|| e2e::repo_root().join("target/bench"));
    if body_cost {
        body_cost::run(
            &out_dir,
            &body_sizes,
            !without_steps,
            connections,
            rounds,
            Duration::from_secs_f64(seconds),
        )
        .await;
        return;
    }
    let filter_config: Value = serde_json::from_str(&filter_config)
        .unwrap_or_else(|e| panic!("--filter-config is not a JSON object: {e}"));
    let duration = Duration::from_secs_f64(seconds);
    let dir = tempfile::tempdir().unwrap();

    let (store_port, demo_port, replay_port) = (free_port(), free_port(), free_port());
    let mut store_args = store_args;
    store_args.extend(["--replay-listen".to_owned(), format!("127.0.0.1:{replay_port}")]);
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
        let alone = measure_store_alone(
            &store,
            dir.path(),
            store_port,
            store_connections,
            duration,
            store_records,
        )
        .await;
        let result =
            json!({"machine": machine(), "store_args": store_args, "seconds": seconds, "store": alone});
        print_store_alone(&alone);
        write_results(&out_dir, "store.json", &result);
        return;
    }
    let mut demo = spawn_demo(dir.path(), demo_port, store_port);
    let plain_ports = fresh_ports(demo_port, store_port, replay_port);
    let filter_ports = fresh_ports(demo_port, store_port, replay_port);
    let unbatched_ports = fresh_ports(demo_port, store_port, replay_port);
    let async_ports = fresh_ports(demo_port, store_port, replay_port);
    let mut plain = pinned_envoy(
        dir.path(),
        &passthrough_bootstrap(&plain_ports),
        "envoy-passthrough",
    );
    let noop_ports = fresh_ports(demo_port, store_port, replay_port);
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
    let buffer_ports = fresh_ports(demo_port, store_port, replay_port);
    let mut buffering = pinned_envoy(
        dir.path(),
        &noop_wasm_bootstrap_with(&buffer_ports, &noop_wasm, "buffer"),
        "envoy-noop-buffer",
    );
    let callout_ports = fresh_ports(demo_port, store_port, replay_port);
    let mut calling = pinned_envoy(
        dir.path(),
        &noop_wasm_bootstrap_with(&callout_ports, &noop_wasm, "buffer+callout"),
        "envoy-noop-callout",
    );
    // A large execution's work in the VM without the store (`bench/steps-filter`: hold and read
    // both bodies, canonicalise, SHA-256, encode the complete body): the floor of the 64 KiB
    // and 1 MiB rows under this design.
    let steps_ports = fresh_ports(demo_port, store_port, replay_port);
    let steps_wasm = e2e::repo_root().join("target/wasm32-wasip1/wasm-release/steps_filter.wasm");
    let mut steps = pinned_envoy(
        dir.path(),
        &noop_wasm_bootstrap_with(&steps_ports, &steps_wasm, body_cost::ALL_STEPS),
        "envoy-steps",
    );
    let streaming_steps_ports = fresh_ports(demo_port, store_port, replay_port);
    let mut streaming_steps = pinned_envoy(
        dir.path(),
        &noop_wasm_bootstrap_with(&streaming_steps_ports, &steps_wasm, body_cost::STREAMING_STEPS),
        "envoy-steps-streaming",
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
        (&steps_ports, &mut steps),
        (&streaming_steps_ports, &mut streaming_steps),
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
            name: floor::HOLDING,
            target: "noop-buffer",
            baseline: Some(PASSTHROUGH_POST),
            make: Arc::new(|_, _| post("/api/v1/orders", None)),
            expect: any_2xx,
        },
        Scenario {
            name: floor::ONE_CALLOUT,
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
        "steps" => steps.pid(),
        "steps-streaming" => streaming_steps.pid(),
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
        "steps" => steps_ports.listener,
        "steps-streaming" => streaming_steps_ports.listener,
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
    // Added latency at one connection.
    let mut single = Vec::new();
    for scenario in scenarios
        .iter()
        .filter(|s| s.target != "demo" && !s.name.contains("GET"))
    {
        let row = measure(
            scenario.name,
            scenario,
            (addr(port(scenario.target)), pids(scenario.target)),
            1,
            duration,
            None,
        )
        .await;
        single.push((
            scenario.name,
            row.stats.p50_us(),
            row.stats.p99_us(),
            row.stolen_percent,
        ));
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
    if rounds_only {
        // The chosen rows at one connection too: an A/B of the executed path reads both.
        let rounds = json!({"summary": summarize(&results), "rounds": results, "filter_config": filter_config,
            "store_batching": batching, "acquire_times": acquire_times, "one_connection": added});
        print_rounds(&rounds);
        for row in &added {
            println!(
                "one connection: {:<55} p50 {} µs, added {} µs{}",
                row["scenario"].as_str().unwrap_or(""),
                row["p50_us"],
                row["added_p50_us"],
                if row["disturbed"] == true {
                    " (disturbed)"
                } else {
                    ""
                }
            );
        }
        write_results(&out_dir, "rounds.json", &rounds);
        return;
    }
    // The disk under those rows, probed where the store ran them (`make bench` pins the bench,
    // and so the store, to CPU 1): an execution's two syncs cost at least this much each.
    let execution_floor = floor::execution_floor_at_one_connection(
        &json!(added),
        &floor::measure(dir.path(), addr(store_port), STORE_CPU_IN_ROUNDS).await,
    );

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
        // Big bodies also through the steps of an execution in the VM alone: their floor.
        let targets: &[(&str, &str)] = if body_bytes >= 64 * 1024 {
            &[
                ("plain", "passthrough"),
                ("steps", "execution_steps_in_vm"),
                ("filter", "executes"),
            ]
        } else {
            &[("plain", "passthrough"), ("filter", "executes")]
        };
        for &(target, label) in targets {
            let body = body.clone();
            let make: MakeRequest = if target != "filter" {
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
            let scenario = Scenario {
                name: label,
                target,
                baseline: None,
                make,
                expect: if target == "filter" { executed } else { any_2xx },
            };
            let measured = measure(
                &format!("growth, {label}, {body_bytes} B, {conns} connections"),
                &scenario,
                (addr(port(target)), pids(target)),
                conns,
                duration,
                None,
            )
            .await;
            let (stats, stolen) = (&measured.stats, measured.stolen_percent);
            row[label] = json!({"rps": stats.rps(), "p50_us": stats.p50_us(), "p99_us": stats.p99_us(),
                "envoy_cpu_us_per_request": measured.cpu_per_request,
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
    let wait_ports = fresh_ports(demo_port, store_port, replay_port);
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
        "keys": in_flight.keys, "keys_run_once": in_flight.keys_run_once,
        "retries": in_flight.retries, "replayed": in_flight.replayed, "ran_the_key": in_flight.ran_the_key,
        "other_answers": in_flight.other_answers,
        "retry_p50_ms": in_flight.retry_p50_ms, "retry_p99_ms": in_flight.retry_p99_ms,
        "first_attempt_ms": 200,
        "executes_rps_alone": alone.rps(), "executes_rps_beside_64_waiters": beside.rps(),
        "ratio": beside.rps() / alone.rps().max(1.0), "waiting_retries_served": held,
    });
    drop(waiting_envoy);

    store_rss_along.push(json!({"after": "in-flight retries", "rss_kib": store.pid().map(rss_kib)}));
    // gRPC: a replayed unary call (routed through the store's /v1/replay) against the same call
    // executed through pass-through Envoy, with a stock tonic client and server.
    let grpc_port = e2e::grpc::start_server(e2e::grpc::OrdersService::default()).await;
    let (grpc_plain_ports, grpc_filter_ports, grpc_callout_ports) = (
        fresh_ports(demo_port, store_port, replay_port),
        fresh_ports(demo_port, store_port, replay_port),
        fresh_ports(demo_port, store_port, replay_port),
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
    // The floor of a replay under this design: a replay asks the store (the acquire, which
    // issues the replay ticket) and is then proxied once (to the store's replay listener).
    // Pass-through plus one callout per call in the no-op filter costs Envoy the same, less
    // the idempotency logic.
    let mut grpc_callout = pinned_envoy(
        dir.path(),
        &e2e::grpc::grpc_noop_wasm_bootstrap(&grpc_callout_ports, grpc_port, &noop_wasm, "buffer+callout"),
        "envoy-grpc-noop-callout",
    );
    for (ports, envoy) in [
        (&grpc_plain_ports, &mut grpc_plain),
        (&grpc_filter_ports, &mut grpc_filtered),
        (&grpc_callout_ports, &mut grpc_callout),
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
    let grpc_floor = grpc_load(grpc_callout_ports.listener, connections, duration, false).await;
    let grpc = json!({
        "passthrough_unary": {"rps": grpc_pass.rps(), "p50_us": grpc_pass.p50_us(), "p99_us": grpc_pass.p99_us(), "errors": grpc_pass.errors},
        "one_callout_unary": {"rps": grpc_floor.rps(), "p50_us": grpc_floor.p50_us(), "errors": grpc_floor.errors},
        "floor_ratio": grpc_floor.rps() / grpc_pass.rps().max(1.0),
        "replay_unary": {"rps": grpc_replay.rps(), "p50_us": grpc_replay.p50_us(), "p99_us": grpc_replay.p99_us(),
                         "errors": grpc_replay.errors, "not_replayed": grpc_replay.unexpected},
        "ratio": grpc_replay.rps() / grpc_pass.rps().max(1.0),
    });
    drop(grpc_plain);
    drop(grpc_filtered);
    drop(grpc_callout);

    store_rss_along.push(json!({"after": "gRPC replays", "rss_kib": store.pid().map(rss_kib)}));
    let envoy_memory = json!({
        "before_any_request": envoy_memory_at_start,
        "after_1kib_rounds": envoy_memory_after_rounds,
        "at_the_end": envoys_memory(&measured_envoys).await,
    });

    let store_alone = measure_store_alone(
        &store,
        dir.path(),
        store_port,
        store_connections,
        duration,
        store_records,
    )
    .await;
    let wasm_bytes = std::fs::metadata(wasm_path()).map(|m| m.len()).unwrap_or(0);

    let per_scenario = summarize(&results);
    let summary = json!({
        "summary": per_scenario,
        "machine": machine(),
        "settings": {"seconds_per_scenario": seconds, "rounds": rounds, "connections": connections,
                     "body_bytes": 1024, "envoy_concurrency": 1},
        "rounds": results,
        "one_connection_execution_floor": execution_floor,
        "one_connection": added,
        "growth": growth,
        "envoy_memory": envoy_memory,
        "envoy_idle": envoy_idle,
        "store_alone": store_alone["store_alone"],
        "store_rss_kib_at_live_records": store_alone["store_rss_kib_at_live_records"],
        "store_rss_along_the_run": store_rss_along,
        "wasm_bytes": wasm_bytes,
        "store_args": store_args,
        "in_flight_retries": in_flight_retries,
        "grpc": grpc,
        "consumer_dedup": store_alone["consumer_dedup"],
        "store_batching": batching,
        "acquire_times": acquire_times,
    });
    let mut summary = summary;
    summary["targets"] = targets::targets(&summary);
    print_table(&summary);
    targets::print_targets(&summary["targets"]);
    write_results(&out_dir, "results.json", &summary);
}
