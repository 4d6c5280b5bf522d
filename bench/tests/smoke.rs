//! `make bench` in short, inside `make test`: every scenario runs against the real stack and is
//! answered as it should be (the benchmark fails on any wrong answer), and the results file holds
//! every figure the docs/performance.md is read from.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)] // test code

use std::process::Command;

use serde_json::Value;

/// Rows of the main table; each must have been measured.
const SCENARIOS: [&str; 12] = [
    "demo service directly (POST)",
    "pass-through Envoy (POST)",
    "pass-through Envoy (GET)",
    "no-op Wasm filter (POST), the floor",
    "Wasm filter holding and reading both bodies",
    "... and making one callout per request",
    "filter, untouched GET",
    "filter, untouched POST without key",
    "filter, keyed POST that executes",
    "filter, keyed POST that executes, store calls unbatched",
    "filter, keyed POST that executes, record_mode async",
    "filter, keyed POST that replays",
];

/// The runs take both CPUs and pick their ports in the same way: one at a time.
static ONE_RUN_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn positive(value: &Value, what: &str) -> f64 {
    let number = value.as_f64().unwrap_or(0.0);
    assert!(number > 0.0, "{what}: expected a positive number, got {value}");
    number
}

#[test]
fn a_short_benchmark_measures_every_scenario_and_writes_every_figure() {
    let _alone = ONE_RUN_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let out = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_idempotency-bench"))
        .args(["--seconds", "0.3", "--rounds", "1", "--store-records", "1000"])
        .arg("--out-dir")
        .arg(out.path())
        // The caller's `make bench` settings must not stretch the short form.
        .env_remove("BENCH_SECONDS")
        .env_remove("BENCH_ROUNDS")
        .env_remove("BENCH_CONNECTIONS")
        .env_remove("BENCH_STORE_CONNECTIONS")
        .env_remove("BENCH_SCENARIOS")
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the benchmark failed:\n{printed}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        printed.contains("Envoy memory, KiB"),
        "no memory table:\n{printed}"
    );
    for floor in ["an execution's floor here", "floor under a durable operation"] {
        assert!(printed.contains(floor), "no line for {floor:?}:\n{printed}");
    }
    let results: Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("results.json")).unwrap()).unwrap();

    let summary = &results["summary"];
    for name in SCENARIOS {
        positive(&summary[name]["median_rps"], name);
        if name.starts_with("filter") || name.contains("Wasm") || name.starts_with("...") {
            positive(&summary[name]["median_ratio_to_passthrough"], name);
            positive(&summary[name]["median_envoy_cpu_us_per_request"], name);
        }
    }
    // Pass-through paced to the executions' rate: the fair baseline for an execution's Envoy CPU.
    let same_rate = &summary["pass-through Envoy (POST) at the executions' rate"];
    let paced = positive(&same_rate["median_rps"], "pass-through at the executions' rate");
    let executions = positive(
        &summary["filter, keyed POST that executes"]["median_rps"],
        "executions",
    );
    assert!(
        paced < executions * 1.5,
        "pass-through was not paced to the executions' rate: {paced:.0}/s against {executions:.0}/s"
    );
    positive(&same_rate["median_envoy_cpu_us_per_request"], "its Envoy CPU");
    assert!(
        printed.contains("pass-through at the same rate"),
        "no CPU comparison:\n{printed}"
    );

    // The host's interference, per row: the share of a CPU the hypervisor took (read from
    // `/proc/stat`), whether that made the row "disturbed", and the summary's count of such rounds.
    let stolen_of = |row: &Value, what: &str| {
        let stolen = row["host_stolen_percent"].as_f64();
        assert!(
            stolen.is_some_and(|p| (0.0..=100.0).contains(&p)),
            "{what}: no share of CPU stolen by the host: {row}"
        );
        assert_eq!(
            row["disturbed"].as_bool(),
            stolen.map(|p| p > 2.0),
            "{what}: disturbed must follow the stolen share: {row}"
        );
    };
    for row in results["rounds"].as_array().unwrap() {
        stolen_of(row, "a round's row");
    }
    for name in SCENARIOS {
        let disturbed = summary[name]["rounds_disturbed"].as_u64();
        assert!(
            disturbed.is_some_and(|n| n <= 1),
            "{name}: rounds_disturbed {disturbed:?}"
        );
        if disturbed == Some(0) && !summary[name]["median_ratio_to_passthrough"].is_null() {
            assert_eq!(
                summary[name]["undisturbed_median_ratio_to_passthrough"],
                summary[name]["median_ratio_to_passthrough"],
                "{name}: with no round disturbed, both medians are over the same rounds"
            );
        }
    }

    let one_connection = results["one_connection"].as_array().unwrap();
    for row in one_connection {
        stolen_of(row, "a one-connection row");
    }
    for row in results["growth"].as_array().unwrap() {
        stolen_of(&row["passthrough"], "a growth row");
        stolen_of(&row["executes"], "a growth row");
    }
    assert!(
        one_connection
            .iter()
            .any(|row| row["scenario"] == "filter, keyed POST that executes"
                && row["p50_us"].as_u64() > Some(0)),
        "no one-connection execution: {one_connection:?}"
    );
    assert_eq!(
        results["growth"].as_array().map(Vec::len),
        Some(5),
        "body and connection rows"
    );

    // Memory: the three readings of the three Envoys, read from their admin `/memory`.
    for reading in ["before_any_request", "after_1kib_rounds", "at_the_end"] {
        let memory = &results["envoy_memory"][reading];
        for envoy in ["passthrough", "noop_wasm", "with_filter"] {
            let row = &memory[envoy];
            let what = format!("{reading}, {envoy}");
            let rss = positive(&row["rss_kib"], &what);
            let live = positive(&row["heap_allocated_kib"], &what);
            assert!(live < rss, "{what}: live heap {live} KiB above RSS {rss} KiB");
            assert!(
                row["heap_free_kib"].is_u64() && row["thread_caches_kib"].is_u64(),
                "{what}: {row}"
            );
        }
        let rss = |envoy: &str| memory[envoy]["rss_kib"].as_f64().unwrap_or(0.0);
        assert!(
            rss("passthrough") < rss("with_filter"),
            "{reading}: the filter's Envoy is not the larger: {memory}"
        );
    }
    for envoy in ["passthrough", "noop_wasm", "with_filter"] {
        positive(&results["envoy_idle"][envoy]["wakeups_per_s"], envoy);
    }

    // The store alone, retries of in-flight keys, gRPC replays, consumer dedup.
    let store = &results["store_alone"];
    positive(&store["pairs_per_second"], "store pairs/s");
    positive(&store["batched"]["pairs_per_second"], "store batched pairs/s");
    positive(
        &store["one_connection_per_operation"]["p50_us"],
        "store p50 per operation",
    );
    positive(
        &store["one_connection_per_operation"]["mean_sync_us_per_commit"],
        "sync per commit",
    );
    let floor = &store["one_connection_per_operation"]["floor"];
    let disk = positive(&floor["write_and_fdatasync"]["p50_us"], "the disk's write + sync");
    positive(
        &floor["write_and_fdatasync"]["back_to_back"]["p50_us"],
        "the disk's write + sync, back to back",
    );
    assert_eq!(
        floor["write_and_fdatasync"]["on_the_store_cpu"], true,
        "the disk probe ran on the store's CPU: {floor}"
    );
    let http = positive(
        &floor["http_round_trip"]["p50_us"],
        "an HTTP round trip to the store",
    );
    assert_eq!(
        floor["sum_p50_us"].as_f64(),
        Some(disk + http),
        "the floor is the sum of its parts: {floor}"
    );
    stolen_of(floor, "the floor probes");
    let execution_floor = &results["one_connection_execution_floor"];
    let part = |name: &str| execution_floor[name].as_f64().unwrap_or(-1.0);
    assert!(
        part("holding_both_bodies_us") >= 0.0 && part("one_callout_us") >= 0.0,
        "the execution floor's parts: {execution_floor}"
    );
    assert!(
        execution_floor["disturbed"].is_boolean(),
        "the execution floor says whether its rows were disturbed: {execution_floor}"
    );
    let sync = positive(
        &execution_floor["write_and_fdatasync_us"],
        "a sync under the one-connection rows",
    );
    assert_eq!(
        positive(
            &execution_floor["added_p50_us"],
            "an execution's floor at one connection"
        ),
        part("holding_both_bodies_us") + 2.0 * (part("one_callout_us") + sync),
        "an execution's floor holds both bodies and makes two callouts, each with a sync: {execution_floor}"
    );
    stolen_of(store, "the store alone");
    stolen_of(&store["batched"], "the store alone, batched");
    stolen_of(
        &store["one_connection_per_operation"],
        "the store alone, one connection",
    );
    let records = &results["store_rss_kib_at_live_records"];
    assert!(
        records["records"].as_u64() >= Some(1000),
        "filled records: {records}"
    );
    let retries = &results["in_flight_retries"];
    positive(&retries["retries"], "in-flight retries");
    // What the clients saw: every key ran once and every answer was a 201. A retry may reach the
    // store before its first attempt on a loaded machine and run the key itself; then the first
    // attempt is the one that waits and is replayed.
    positive(&retries["keys"], "keys with in-flight retries");
    assert_eq!(
        retries["keys_run_once"], retries["keys"],
        "every key ran once: {retries}"
    );
    assert_eq!(
        retries["other_answers"],
        Value::Array(Vec::new()),
        "only 201s: {retries}"
    );
    assert_eq!(
        results["grpc"]["replay_unary"]["not_replayed"], 0,
        "{}",
        results["grpc"]
    );
    positive(&results["grpc"]["replay_unary"]["rps"], "gRPC replays");
    positive(
        &results["consumer_dedup"]["new_messages_per_second"],
        "consumer dedup",
    );
    positive(
        &results["store_batching"]["mean_calls_per_batch"],
        "calls per batch",
    );

    // The big-body growth rows carry their floor: the execution's steps in the VM alone.
    for row in results["growth"].as_array().unwrap() {
        if row["body_bytes"].as_u64() >= Some(64 * 1024) {
            stolen_of(&row["execution_steps_in_vm"], "a big-body floor row");
            positive(
                &row["execution_steps_in_vm"]["envoy_cpu_us_per_request"],
                "a big body's floor",
            );
        }
    }
    // The gRPC replay's floor: pass-through plus one callout per call, every call answered.
    let grpc = &results["grpc"];
    positive(&grpc["one_callout_unary"]["rps"], "the gRPC replay's floor");
    assert_eq!(grpc["one_callout_unary"]["errors"], 0, "{grpc}");
    let floor_ratio = grpc["floor_ratio"].as_f64().unwrap();
    assert!(floor_ratio > 0.0 && floor_ratio < 2.0, "{grpc}");
    // Every target of the performance issue is read from the run: a figure, and a floor where
    // one is measured, in one table.
    let targets = results["targets"].as_array().unwrap();
    assert_eq!(targets.len(), 12, "{targets:?}");
    for target in targets {
        assert!(target["figure"].is_number(), "no figure: {target}");
        assert!(target["met"].is_boolean(), "no verdict: {target}");
        assert!(
            target["target"].as_str().is_some_and(|t| !t.is_empty()),
            "{target}"
        );
        if target["target"].as_str().is_some_and(|t| t.contains("floor")) {
            assert!(
                target["floor"].is_number(),
                "a target set against a floor has it: {target}"
            );
        }
    }
    assert!(
        printed.contains("against this machine's floors"),
        "no targets table:\n{printed}"
    );
}

/// `--body-cost` in short: every step row and the filter measured at 64 KiB, with the store's
/// CPU per execution.
#[test]
fn a_short_body_cost_run_measures_every_step() {
    let _alone = ONE_RUN_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let out = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_idempotency-bench"))
        .args([
            "--body-cost",
            "--seconds",
            "0.3",
            "--rounds",
            "1",
            "--body-sizes",
            "65536",
        ])
        .arg("--out-dir")
        .arg(out.path())
        .env_remove("BENCH_SECONDS")
        .env_remove("BENCH_ROUNDS")
        .env_remove("BENCH_CONNECTIONS")
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the body-cost run failed:\n{printed}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let results: Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("body_cost.json")).unwrap()).unwrap();
    let summary = results["summary"].as_array().unwrap();
    // Pass-through, six steps, the filter.
    assert_eq!(summary.len(), 8, "{summary:?}");
    for row in summary {
        let what = row["row"].as_str().unwrap_or("?");
        positive(&row["rps"], what);
        positive(&row["envoy_cpu_us_per_request"], what);
    }
    let filter = summary
        .iter()
        .find(|r| r["row"] == "filter, keyed POST that executes")
        .unwrap();
    positive(
        &filter["store_cpu_us_per_request"],
        "the store's CPU per execution",
    );
}
