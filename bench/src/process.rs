//! What the bench reads about its processes and machine — RSS, CPU time, Envoy's heap, idle
//! cost — and how it starts a pinned Envoy.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use e2e::envoy_config::Ports;
use e2e::{envoy_bin, free_port, Proc};
use serde_json::{json, Value};

pub(crate) fn rss_kib(pid: u32) -> u64 {
    proc_status_kib(pid, "VmRSS:")
}

/// The most RSS the process has held since it started (`VmHWM`), in KiB: catches the short
/// peaks (an LSM compaction, a burst of requests) that a reading now and then misses.
pub(crate) fn peak_rss_kib(pid: u32) -> u64 {
    proc_status_kib(pid, "VmHWM:")
}

/// Starts [`peak_rss_kib`] over from the RSS now (Linux: `5` to `/proc/PID/clear_refs`), so the
/// peak read later is of what happened in between. False when the kernel refused.
pub(crate) fn reset_peak_rss(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

fn proc_status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)
                .map(|v| v.trim().trim_end_matches(" kB").trim().parse().unwrap_or(0))
        })
        .unwrap_or(0)
}

/// One Envoy's memory: its RSS and, from its admin `/memory` (tcmalloc's counters), what its heap
/// holds live against what the allocator keeps after use (free pages and per-thread caches,
/// which count in RSS but are not Envoy's or the filter's data).
pub(crate) async fn envoy_memory(client: &reqwest::Client, pid: Option<u32>, admin_port: u16) -> Value {
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
pub(crate) async fn envoys_memory(envoys: &[(&str, Option<u32>, u16)]) -> Value {
    let client = reqwest::Client::new();
    let mut readings = serde_json::Map::new();
    for (name, pid, admin_port) in envoys {
        readings.insert((*name).to_owned(), envoy_memory(&client, *pid, *admin_port).await);
    }
    Value::Object(readings)
}

/// CPU time (user + system) of a process, in microseconds.
pub(crate) fn cpu_us(pid: u32) -> u64 {
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
pub(crate) async fn idle_cost(envoys: &[(&str, Option<u32>)], window: Duration) -> Value {
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

/// Free listener and admin ports for one more Envoy in front of the demo service and the store
/// (its API and its replay listener).
pub(crate) fn fresh_ports(demo_port: u16, store_port: u16, replay_port: u16) -> Ports {
    Ports {
        listener: free_port(),
        admin: free_port(),
        upstream: demo_port,
        stores: vec![store_port],
        replays: vec![replay_port],
    }
}

pub(crate) fn pinned_envoy(dir: &Path, config: &str, name: &str) -> Proc {
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

pub(crate) fn machine() -> Value {
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
