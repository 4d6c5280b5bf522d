//! `--body-cost`: where the Envoy CPU of a large execution goes. For each body size, pass-through
//! Envoy, the steps of an execution one at a time in a filter that does only them
//! (`bench/steps-filter`: hold and read both bodies, canonicalise the JSON, fingerprint it,
//! encode the `complete` body), and the idempotency filter executing; interleaved rounds, Envoy
//! CPU µs per request and the store's. Prints a table and writes `target/bench/body_cost.json`.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use e2e::envoy_config::{bootstrap_with, noop_wasm_bootstrap_with, passthrough_bootstrap};
use e2e::{free_port, plugin_config, spawn_demo, spawn_store, wait_ready};
use serde_json::{json, Value};

use crate::process::{cpu_us, fresh_ports, machine, pinned_envoy};
use crate::report::write_results;
use crate::traffic::{measure, post_body, sized_body, MakeRequest};
use crate::Scenario;

/// Every step of an execution in the VM (the floor of a large execution under this design).
pub(crate) const ALL_STEPS: &str = "buffer+canonical+sha256+record";
/// The steps of an execution whose response streams through (over `max_response_size`): the
/// request held, canonicalised and hashed; nothing of the response kept.
pub(crate) const STREAMING_STEPS: &str = "request+canonical+sha256";

/// The steps-filter rows, each adding one step to the one before (`+`-joined steps).
const STEPS: [(&str, &str); 6] = [
    ("hold and read both bodies", "buffer"),
    ("… canonicalise the request JSON", "buffer+canonical"),
    ("… and SHA-256 it (the fingerprint)", "buffer+canonical+sha256"),
    ("… and encode the complete body", "buffer+canonical+sha256+record"),
    ("hold, read and SHA-256 the raw bytes", "buffer+sha256"),
    (
        "hold, read, canonicalise and BLAKE3 (SIMD)",
        "buffer+canonical+blake3",
    ),
];

/// Run the body-cost rows: `sizes` in bytes, `connections` each, `rounds` interleaved rounds of
/// `duration` per row; `with_steps: false` leaves the steps out (an A/B of the filter or the
/// store).
pub(crate) async fn run(
    out_dir: &Path,
    sizes: &[usize],
    with_steps: bool,
    connections: usize,
    rounds: usize,
    duration: Duration,
) {
    let dir = tempfile::tempdir().unwrap();
    let (store_port, demo_port, replay_port) = (free_port(), free_port(), free_port());
    let mut store = spawn_store(
        dir.path(),
        store_port,
        &dir.path().join("bench-store"),
        &["--replay-listen".to_owned(), format!("127.0.0.1:{replay_port}")],
        "store.log",
    );
    let mut demo = spawn_demo(dir.path(), demo_port, store_port);
    let steps_wasm = e2e::repo_root().join("target/wasm32-wasip1/wasm-release/steps_filter.wasm");
    assert!(
        steps_wasm.exists(),
        "{} is missing: run `make build`",
        steps_wasm.display()
    );

    let plain_ports = fresh_ports(demo_port, store_port, replay_port);
    let mut envoys = vec![(
        "pass-through Envoy",
        pinned_envoy(
            dir.path(),
            &passthrough_bootstrap(&plain_ports),
            "envoy-passthrough",
        ),
        plain_ports,
    )];
    for (index, (label, steps)) in STEPS.iter().enumerate().filter(|_| with_steps) {
        let ports = fresh_ports(demo_port, store_port, replay_port);
        let config = noop_wasm_bootstrap_with(&ports, &steps_wasm, steps);
        envoys.push((
            label,
            pinned_envoy(dir.path(), &config, &format!("envoy-steps-{index}")),
            ports,
        ));
    }
    let filter_ports = fresh_ports(demo_port, store_port, replay_port);
    let filter_config = plugin_config(&json!({"lock_timeout": "5m", "max_request_body": 2_097_152}));
    envoys.push((
        "filter, keyed POST that executes",
        pinned_envoy(
            dir.path(),
            &bootstrap_with(&filter_ports, &filter_config, true),
            "envoy-filter",
        ),
        filter_ports,
    ));
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
    for (_, envoy, ports) in &mut envoys {
        wait_ready(
            &format!("http://127.0.0.1:{}/ready", ports.admin),
            envoy,
            Duration::from_secs(60),
        )
        .await;
    }

    let any_2xx: fn(u16, bool) -> bool = |s, _| (200..300).contains(&s);
    let executed: fn(u16, bool) -> bool = |s, r| s == 201 && !r;
    let mut results = Vec::new();
    for &size in sizes {
        let body = sized_body(size);
        for round in 1..=rounds {
            for (label, envoy, ports) in &envoys {
                let is_filter = label.starts_with("filter");
                let body_bytes = body.len();
                let body = body.clone();
                let make: MakeRequest = if is_filter {
                    Arc::new(move |c, i| {
                        let key = format!("body-{}-{size}-{round}-{c}-{i}", std::process::id());
                        post_body("/api/v1/orders", Some(key), body.clone())
                    })
                } else {
                    Arc::new(move |_, _| post_body("/api/v1/orders", None, body.clone()))
                };
                let scenario = Scenario {
                    name: label,
                    target: "",
                    baseline: None,
                    make,
                    expect: if is_filter { executed } else { any_2xx },
                };
                let store_before = store.pid().map(cpu_us).unwrap_or(0);
                let target = SocketAddr::from(([127, 0, 0, 1], ports.listener));
                let measured = measure(
                    &format!("{label}, {size} B, round {round}"),
                    &scenario,
                    (target, envoy.pid()),
                    connections,
                    duration,
                    None,
                )
                .await;
                let store_cpu = store.pid().map(cpu_us).unwrap_or(0).saturating_sub(store_before);
                let requests = measured.stats.requests.max(1) as f64;
                results.push(json!({
                    "body_bytes": body_bytes, "round": round, "row": label, "connections": connections,
                    "rps": measured.stats.rps(), "p50_us": measured.stats.p50_us(), "p99_us": measured.stats.p99_us(),
                    "envoy_cpu_us_per_request": measured.cpu_per_request,
                    "store_cpu_us_per_request": store_cpu as f64 / requests,
                    "host_stolen_percent": measured.stolen_percent,
                    "disturbed": crate::steal::disturbed(measured.stolen_percent),
                }));
            }
        }
    }
    let summary = summarize(
        &results,
        sizes,
        &envoys.iter().map(|(label, _, _)| *label).collect::<Vec<_>>(),
    );
    print(&summary);
    write_results(
        out_dir,
        "body_cost.json",
        &json!({"machine": machine(), "seconds": duration.as_secs_f64(), "rounds": rounds,
                "connections": connections, "rows": results, "summary": summary}),
    );
}

/// Per body size and row: the median over rounds of req/s, Envoy and store CPU µs per request,
/// and the Envoy µs against pass-through; over the undisturbed rounds when there are any.
fn summarize(results: &[Value], sizes: &[usize], labels: &[&str]) -> Vec<Value> {
    let median = |mut values: Vec<f64>| {
        values.sort_by(f64::total_cmp);
        match values.len() {
            0 => 0.0,
            n if n % 2 == 1 => values[n / 2],
            n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
        }
    };
    let mut summary = Vec::new();
    for &size in sizes {
        let of = |label: &str, field: &str| {
            median(
                results
                    .iter()
                    .filter(|r| {
                        r["row"] == label
                            && r["body_bytes"]
                                .as_u64()
                                .is_some_and(|b| b.abs_diff(size as u64) < 64)
                    })
                    .filter_map(|r| r[field].as_f64())
                    .collect(),
            )
        };
        let (base_rps, base_cpu) = (of(labels[0], "rps"), of(labels[0], "envoy_cpu_us_per_request"));
        for label in labels {
            let (rps, cpu) = (of(label, "rps"), of(label, "envoy_cpu_us_per_request"));
            summary.push(json!({
                "body_bytes": size, "row": label, "rps": rps,
                "ratio_to_passthrough": rps / base_rps.max(1.0),
                "envoy_cpu_us_per_request": cpu, "envoy_cpu_times_passthrough": cpu / base_cpu.max(1.0),
                "store_cpu_us_per_request": of(label, "store_cpu_us_per_request"),
            }));
        }
    }
    summary
}

fn print(summary: &[Value]) {
    println!("\nWhere a large execution's Envoy CPU goes (median over rounds)\n");
    println!(
        "| body | row | req/s | ratio | Envoy µs/req | × pass-through | store µs/req |\n|---|---|---|---|---|---|---|"
    );
    for row in summary {
        println!(
            "| {} KiB | {} | {:.0} | {:.2} | {:.0} | {:.2} | {:.0} |",
            row["body_bytes"].as_u64().unwrap_or(0) / 1024,
            row["row"].as_str().unwrap_or(""),
            row["rps"].as_f64().unwrap_or(0.0),
            row["ratio_to_passthrough"].as_f64().unwrap_or(0.0),
            row["envoy_cpu_us_per_request"].as_f64().unwrap_or(0.0),
            row["envoy_cpu_times_passthrough"].as_f64().unwrap_or(0.0),
            row["store_cpu_us_per_request"].as_f64().unwrap_or(0.0),
        );
    }
}
