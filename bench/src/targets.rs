//! The performance issue's targets, each read from this run beside the floor this machine
//! charges for it (measured in the same run), printed as one table and kept in
//! `results.json` under `targets`.

use serde_json::{json, Value};

/// The store's default `--cache-mb`.
const DEFAULT_STORE_CACHE_MB: f64 = 32.0;

/// The store's cache in MB: a `--cache-mb` among `store_args` (as `--store-arg` passes it),
/// else the default.
fn store_cache_mb(store_args: &Value) -> f64 {
    let args: Vec<&str> = store_args
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    args.iter()
        .enumerate()
        .rev()
        .find_map(|(i, arg)| match arg.strip_prefix("--cache-mb") {
            Some(rest) if rest.starts_with('=') => rest[1..].parse().ok(),
            Some("") => args.get(i + 1).and_then(|v| v.parse().ok()),
            _ => None,
        })
        .unwrap_or(DEFAULT_STORE_CACHE_MB)
}

/// One target: what it is about, the figure, the floor (when one is measured), the target and
/// whether it is met.
fn row(
    name: &str,
    unit: &str,
    figure: Option<f64>,
    floor: Option<f64>,
    target: &str,
    met: Option<bool>,
) -> Value {
    json!({"row": name, "unit": unit, "figure": figure, "floor": floor, "target": target, "met": met})
}

/// A summary figure of `scenario`: over the undisturbed rounds when there were any.
fn scenario_figure(results: &Value, scenario: &str, field: &str) -> Option<f64> {
    let summary = &results["summary"][scenario];
    summary[format!("undisturbed_{field}")]
        .as_f64()
        .or_else(|| summary[field].as_f64())
}

fn one_connection_added(results: &Value, scenario: &str) -> Option<f64> {
    results["one_connection"]
        .as_array()?
        .iter()
        .find(|row| row["scenario"] == scenario)?["added_p50_us"]
        .as_f64()
}

fn growth(results: &Value, body_bytes: u64, connections: u64) -> Option<&Value> {
    results["growth"].as_array()?.iter().find(|row| {
        row["connections"].as_u64() == Some(connections)
            && row["body_bytes"]
                .as_u64()
                .is_some_and(|b| b.abs_diff(body_bytes) <= 128)
    })
}

/// Every target of the performance issue, from `results` (the run's `results.json` so far).
pub(crate) fn targets(results: &Value) -> Value {
    let mut rows = Vec::new();
    let store = &results["store_alone"];

    let per_op = store["one_connection_per_operation"]["p50_us"].as_f64();
    let op_floor = store["one_connection_per_operation"]["floor"]["sum_p50_us"].as_f64();
    let mut per_op_row = row(
        "store, per durable op at one connection (p50)",
        "µs",
        per_op,
        op_floor,
        "≤ floor + 50 µs",
        per_op.zip(op_floor).map(|(f, floor)| f <= floor + 50.0),
    );
    // The floor writes into blocks already allocated; an appending journal cannot.
    let disk = &store["one_connection_per_operation"]["floor"]["write_and_fdatasync"];
    if let (Some(written), Some(unallocated), Some(per_op), Some(op_floor)) = (
        disk["p50_us"].as_f64(),
        disk["into_unallocated_blocks"]["p50_us"].as_f64(),
        per_op,
        op_floor,
    ) {
        per_op_row["note"] = json!(format!(
            "a write + fdatasync appended into a sparse file (as fjall's journal is written) costs {:+.0} µs against the floor's {written:.0}; over that floor the \
             store adds {:+.0} µs",
            unallocated - written,
            per_op - (op_floor - written + unallocated)
        ));
    }
    rows.push(per_op_row);
    let batched = store["batched"]["pairs_per_second"].as_f64();
    rows.push(row(
        "store alone, acquire+complete pairs/s, batched",
        "pairs/s",
        batched,
        None,
        "≥ 20,000",
        batched.map(|f| f >= 20_000.0),
    ));

    let floor = &results["one_connection_execution_floor"];
    let write_ahead = one_connection_added(results, "filter, keyed POST that executes");
    let write_ahead_floor = floor["added_p50_us"].as_f64();
    rows.push(row(
        "execution at one connection, write-ahead (added p50)",
        "µs",
        write_ahead,
        write_ahead_floor,
        "≤ floor + 50 µs",
        write_ahead
            .zip(write_ahead_floor)
            .map(|(f, floor)| f <= floor + 50.0),
    ));
    // One durable call on the client's path: hold the bodies, one callout, one sync.
    let async_floor = floor["holding_both_bodies_us"].as_f64().and_then(|holding| {
        Some(holding + floor["one_callout_us"].as_f64()? + floor["write_and_fdatasync_us"].as_f64()?)
    });
    let async_added = one_connection_added(results, "filter, keyed POST that executes, record_mode async");
    rows.push(row(
        "execution at one connection, record_mode async (added p50)",
        "µs",
        async_added,
        async_floor,
        "≤ floor + 30 µs",
        async_added.zip(async_floor).map(|(f, floor)| f <= floor + 30.0),
    ));

    // Envoy CPU per execution against pass-through paced to the same rate; the floor: the
    // no-op filter holding both bodies and making an execution's two callouts.
    let cpu = |scenario: &str| scenario_figure(results, scenario, "median_envoy_cpu_us_per_request");
    let paced = cpu("pass-through Envoy (POST) at the executions' rate");
    let execution_cpu = cpu("filter, keyed POST that executes");
    let two_callouts = cpu("... and making one callout per request")
        .zip(cpu("Wasm filter holding and reading both bodies"))
        .map(|(one, holding)| one + (one - holding));
    let times = |value: Option<f64>| value.zip(paced).map(|(v, p)| v / p.max(1.0));
    rows.push(row(
        "Envoy CPU per execution, × pass-through paced to the same rate",
        "×",
        times(execution_cpu),
        times(two_callouts),
        "≤ 1.6×",
        times(execution_cpu).map(|f| f <= 1.6),
    ));

    let ratio_64 = growth(results, 1024, 64).and_then(|row| row["ratio"].as_f64());
    rows.push(row(
        "executes at 64 connections, ratio to pass-through",
        "ratio",
        ratio_64,
        None,
        "≥ 0.45",
        ratio_64.map(|f| f >= 0.45),
    ));

    for (bytes, name, ratio_target, cpu_target) in [
        (64 * 1024, "64 KiB body at 16 connections", Some(0.30), 3.0),
        (
            1024 * 1024,
            "1 MiB body (streams through) at 16 connections",
            None,
            2.0,
        ),
    ] {
        let Some(big) = growth(results, bytes, 16) else {
            continue;
        };
        let envoy = |label: &str| big[label]["envoy_cpu_us_per_request"].as_f64();
        let passthrough = envoy("passthrough");
        let per_pass = |v: Option<f64>| v.zip(passthrough).map(|(v, p)| v / p.max(1.0));
        if let Some(ratio_target) = ratio_target {
            let ratio = big["ratio"].as_f64();
            let floor_ratio = big["execution_steps_in_vm"]["rps"]
                .as_f64()
                .zip(big["passthrough"]["rps"].as_f64())
                .map(|(steps, pass)| steps / pass.max(1.0));
            rows.push(row(
                &format!("{name}: executes, ratio to pass-through"),
                "ratio",
                ratio,
                floor_ratio,
                &format!("≥ {ratio_target:.2}"),
                ratio.map(|f| f >= ratio_target),
            ));
        }
        rows.push(row(
            &format!("{name}: Envoy CPU per execution, × pass-through"),
            "×",
            per_pass(envoy("executes")),
            per_pass(envoy("execution_steps_in_vm")),
            &format!("≤ {cpu_target}×"),
            per_pass(envoy("executes")).map(|f| f <= cpu_target),
        ));
    }

    let rss = |who: &str| results["envoy_memory"]["after_1kib_rounds"][who]["rss_kib"].as_f64();
    let over_noop = rss("with_filter")
        .zip(rss("noop_wasm"))
        .map(|(f, n)| (f - n) / 1024.0);
    rows.push(row(
        "Envoy RSS with the filter, over the no-op Wasm floor",
        "MB",
        over_noop,
        Some(0.0),
        "≤ floor + 8 MB",
        over_noop.map(|f| f <= 8.0),
    ));

    let live = &results["store_rss_kib_at_live_records"];
    let cache_mb = store_cache_mb(&results["store_args"]);
    let store_rss = [
        &live["rss_kib"],
        &live["rss_kib_5s_idle"],
        &live["rss_kib_peak_while_writing"],
    ]
    .into_iter()
    .filter_map(Value::as_f64)
    .reduce(f64::max)
    .map(|kib| kib / 1024.0);
    rows.push(row(
        &format!(
            "store RSS at {} live 1 KiB records (the largest of: while writing them, right after, idle)",
            live["records"].as_u64().unwrap_or(0)
        ),
        "MB",
        store_rss,
        Some(cache_mb),
        "≤ cache + 96 MB",
        store_rss.map(|f| f <= cache_mb + 96.0),
    ));

    let grpc = results["grpc"]["ratio"].as_f64();
    rows.push(row(
        "gRPC unary replay, ratio to pass-through gRPC",
        "ratio",
        grpc,
        results["grpc"]["floor_ratio"].as_f64(),
        "≥ 0.80",
        grpc.map(|f| f >= 0.80),
    ));
    Value::Array(rows)
}

/// Print the targets table.
pub(crate) fn print_targets(targets: &Value) {
    let number = |value: &Value, unit: &str| match value.as_f64() {
        None => "—".to_owned(),
        Some(v) if unit == "ratio" || unit == "×" => format!("{v:.2}"),
        Some(v) => format!("{v:.0}"),
    };
    println!("\nTargets of the performance issue, against this machine's floors (this run)\n");
    println!("| row | unit | figure | floor | target | met |\n|---|---|---|---|---|---|");
    for row in targets.as_array().into_iter().flatten() {
        let unit = row["unit"].as_str().unwrap_or("");
        println!(
            "| {} | {unit} | {} | {} | {} | {} |",
            row["row"].as_str().unwrap_or(""),
            number(&row["figure"], unit),
            number(&row["floor"], unit),
            row["target"].as_str().unwrap_or(""),
            match row["met"].as_bool() {
                Some(true) => "yes",
                Some(false) => "no",
                None => "—",
            }
        );
    }
    for row in targets.as_array().into_iter().flatten() {
        if let Some(note) = row["note"].as_str() {
            println!("\n{}: {note}", row["row"].as_str().unwrap_or(""));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_store_cache_is_read_from_the_store_arguments() {
        assert_eq!(
            store_cache_mb(&json!(["--cache-mb=64", "--replay-listen", "x"])),
            64.0
        );
        assert_eq!(store_cache_mb(&json!(["--cache-mb", "16"])), 16.0);
        assert_eq!(
            store_cache_mb(&json!(["--replay-listen", "127.0.0.1:1"])),
            DEFAULT_STORE_CACHE_MB
        );
        assert_eq!(store_cache_mb(&Value::Null), DEFAULT_STORE_CACHE_MB);
    }
}
