//! What the bench prints and writes: the tables, the per-scenario summary, `results.json`.

use std::path::Path;

use serde_json::{json, Value};

use crate::steal;
use crate::{EXECUTES, PASSTHROUGH_AT_EXECUTION_RATE, PASSTHROUGH_POST};

/// Write `results` to `<out_dir>/<name>` (`target/bench` unless `--out-dir`) and say so.
pub(crate) fn write_results(out_dir: &Path, name: &str, results: &Value) {
    std::fs::create_dir_all(out_dir).unwrap();
    let path = out_dir.join(name);
    std::fs::write(&path, serde_json::to_string_pretty(results).unwrap()).unwrap();
    eprintln!("\nwritten to {}", path.display());
}

/// The main table: every scenario of every round.
pub(crate) fn print_rounds(summary: &Value) {
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
pub(crate) fn disturbed_marker(disturbed: bool) -> &'static str {
    if disturbed {
        "  disturbed"
    } else {
        ""
    }
}

/// A row's stolen share of a CPU, for the tables ("-" where `/proc/stat` could not say).
pub(crate) fn stolen_column(percent: &Value) -> String {
    percent
        .as_f64()
        .map(|p| format!("{p:.1}"))
        .unwrap_or_else(|| "-".into())
}

/// Per scenario over the rounds: the median ratio to pass-through, median Envoy µs/request and
/// median p50/p99 — the figures the README's table quotes; and how many rounds the host
/// disturbed (the row or its baseline, see [`steal`]), with the median ratio and Envoy
/// µs/request over the other rounds.
pub(crate) fn summarize(rounds: &[Value]) -> Value {
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

pub(crate) fn print_table(summary: &Value) {
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
    let floor = &summary["one_connection_execution_floor"];
    println!(
        "  an execution's floor here, estimated: holding both bodies {} µs + 2 × (a callout {} µs + a write and fdatasync {} µs) = {} µs added{}",
        floor["holding_both_bodies_us"],
        floor["one_callout_us"],
        floor["write_and_fdatasync_us"],
        floor["added_p50_us"],
        disturbed_marker(floor["disturbed"] == true)
    );
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
        "  {} of {} keys ran once with every answer a 201; {} retries reached the store before their first attempt and ran the key; answers other than 201: {}",
        waits["keys_run_once"], waits["keys"], waits["ran_the_key"], waits["other_answers"]
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
    println!(
        "  the floor of a replay (pass-through plus one callout per call in the no-op Wasm filter): {:.0}/s (p50 {} µs), ratio {:.2}",
        grpc["one_callout_unary"]["rps"].as_f64().unwrap_or(0.0),
        grpc["one_callout_unary"]["p50_us"],
        grpc["floor_ratio"].as_f64().unwrap_or(0.0)
    );
    println!("Machine: {}", summary["machine"]);
}

/// Sum of every series whose name ends with `name` (Envoy prefixes its stats' names).
pub(crate) fn metric_containing(text: &str, name: &str) -> f64 {
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
pub(crate) fn print_envoy_memory(memory: &Value) {
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
pub(crate) fn print_store_alone(summary: &Value) {
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
    let floor = &single["floor"];
    let disk = &floor["write_and_fdatasync"];
    println!(
        "  this machine's floor under a durable operation: a {} B write + fdatasync on the store's CPU, one round trip apart, p50 {} µs (p99 {}, mean {}; back to back p50 {}; appended into a sparse file, as a journal is written, p50 {}), an HTTP round trip to the store p50 {} µs (p99 {}): {} µs{}",
        disk["bytes"],
        disk["p50_us"],
        disk["p99_us"],
        disk["mean_us"],
        disk["back_to_back"]["p50_us"],
        disk["into_unallocated_blocks"]["p50_us"],
        floor["http_round_trip"]["p50_us"],
        floor["http_round_trip"]["p99_us"],
        floor["sum_p50_us"],
        stolen(floor)
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
        "Store RSS with {} live records: {} KiB right after writing them (memtables {:.0} KiB), {} KiB after 5 s idle, {} KiB at the peak while writing them",
        at_records["records"],
        at_records["rss_kib"],
        at_records["write_buffer_kib"].as_f64().unwrap_or(0.0),
        at_records["rss_kib_5s_idle"],
        at_records["rss_kib_peak_while_writing"]
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
