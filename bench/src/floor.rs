//! This machine's floor under one durable store operation (the disk's own write + `fdatasync`
//! and an HTTP round trip to the store) and, from it, under an execution at one connection.
//!
//! A durable operation cannot cost less than one sync of its write plus one round trip to the
//! store's HTTP stack, whatever the engine. Printing both beside the store's figure tells an
//! operator whether the store or the machine sets the pace.
//!
//! Two things make a virtual disk's sync dearer than a tight loop shows, and the probe keeps
//! both (measured on the Intel VM used for the README): a sync costs more after the device has
//! been idle (p50 127–132 µs back to back, 207–210 µs with 300 µs between syncs, 239–264 µs with
//! 1 ms), and more on a CPU other than the one the disk's interrupts reach. So the probe runs on
//! the store's CPU and leaves one HTTP round trip between syncs — at one connection the store
//! cannot sync more often than that; the back-to-back figure is reported beside it.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use serde_json::{json, Value};

use crate::steal;
use crate::traffic::{keep_alive_connection, latency_histogram, stolen_since};
use crate::PASSTHROUGH_POST;

/// Bytes of one probe write: about one `complete` of a 1 KiB response as the journal holds it.
const WRITE_BYTES: usize = 1536;
/// Size of the probe file.
const FILE_BYTES: u64 = 4 << 20;

/// Where the probe's writes land.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Blocks {
    /// Blocks the filesystem has already allocated and written (the file is written and synced
    /// in full first): no metadata to commit, only the data and the device's cache flush — the
    /// least any durable write can cost on this disk. The floor.
    Written,
    /// Appending into a sparse file (sized with `set_len`, as fjall sizes each journal file):
    /// the writes go one after another, so about one in three of these 1,536-byte writes starts
    /// a 4 KiB block the filesystem must allocate (and commit to its own journal on `fdatasync`);
    /// the others land in the block the write before began — as an appending journal writes.
    Unallocated,
}

/// Writes and syncs `writes` blocks of [`WRITE_BYTES`] one after another in a file under `dir`
/// (the store's filesystem), `gap` apart (spent awake, as a store parsing the next request
/// would); returns the latency of each write + `fdatasync`, in µs.
pub(crate) fn disk_write_and_sync(
    dir: &Path,
    writes: usize,
    gap: Duration,
    blocks: Blocks,
) -> std::io::Result<Histogram<u64>> {
    let path = dir.join("floor-probe");
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)?;
    match blocks {
        Blocks::Written => preallocate(&mut file)?,
        Blocks::Unallocated => {
            file.set_len(FILE_BYTES)?;
            file.sync_all()?;
        }
    }
    let block = vec![0x5a_u8; WRITE_BYTES];
    let mut latency = latency_histogram();
    let slots = FILE_BYTES / WRITE_BYTES as u64;
    for i in 0..writes as u64 {
        let idle_until = Instant::now() + gap;
        while Instant::now() < idle_until {
            std::hint::spin_loop();
        }
        if blocks == Blocks::Unallocated && i > 0 && i % slots == 0 {
            // The file is full: a fresh sparse one, as a journal rotates.
            file.set_len(0)?;
            file.set_len(FILE_BYTES)?;
            file.sync_all()?;
        }
        file.seek(SeekFrom::Start((i % slots) * WRITE_BYTES as u64))?;
        let started = Instant::now();
        file.write_all(&block)?;
        file.sync_data()?;
        let _ = latency.record(started.elapsed().as_micros().max(1) as u64);
    }
    drop(file);
    std::fs::remove_file(&path)?;
    Ok(latency)
}

fn preallocate(file: &mut File) -> std::io::Result<()> {
    let chunk = vec![0_u8; 64 << 10];
    let mut written = 0;
    while written < FILE_BYTES {
        file.write_all(&chunk)?;
        written += chunk.len() as u64;
    }
    file.sync_all()
}

/// `GET /healthz` on one keep-alive connection, `requests` times: the store's HTTP stack with
/// no storage behind it. Returns the latency of each round trip, in µs.
pub(crate) async fn http_round_trip(addr: SocketAddr, requests: usize) -> Histogram<u64> {
    let mut sender = keep_alive_connection(addr).await;
    let mut latency = latency_histogram();
    for _ in 0..requests {
        let request = Request::get("/healthz")
            .header("host", "store")
            .body(Full::new(Bytes::new()))
            .unwrap();
        // The connection takes the next request once it has finished the last response.
        sender.ready().await.unwrap();
        let started = Instant::now();
        let response = sender.send_request(request).await.unwrap();
        assert!(
            response.status().is_success(),
            "/healthz answered {}",
            response.status()
        );
        let _ = response.into_body().collect().await;
        let _ = latency.record(started.elapsed().as_micros().max(1) as u64);
    }
    latency
}

/// The probes, as the JSON `store_alone.one_connection_per_operation.floor`: the HTTP round
/// trip first, then the disk probes on `cpu` (the store's): into written blocks paced by that
/// round trip and back to back, then appended into a sparse file, paced.
pub(crate) async fn measure(dir: &Path, store: SocketAddr, cpu: usize) -> Value {
    let host_before = steal::Snapshot::take();
    let http = http_round_trip(store, 2000).await;
    let http_p50 = http.value_at_quantile(0.5);
    let probe = |gap: Duration, blocks: Blocks| {
        let dir = dir.to_path_buf();
        async move {
            // A thread of its own: pinning one of tokio's pooled threads would leave it pinned
            // for whatever blocking work reuses it.
            let probe = std::thread::spawn(move || {
                let pinned = core_affinity::set_for_current(core_affinity::CoreId { id: cpu });
                disk_write_and_sync(&dir, 500, gap, blocks).map(|latency| (latency, pinned))
            });
            tokio::task::spawn_blocking(move || probe.join())
                .await
                .unwrap()
                .unwrap()
                .unwrap_or_else(|e| panic!("the disk probe failed: {e}"))
        }
    };
    let (paced, pinned) = probe(Duration::from_micros(http_p50), Blocks::Written).await;
    let (back_to_back, _) = probe(Duration::ZERO, Blocks::Written).await;
    let (unallocated, _) = probe(Duration::from_micros(http_p50), Blocks::Unallocated).await;
    let disk_p50 = paced.value_at_quantile(0.5);
    let stolen = stolen_since(host_before);
    json!({
        "write_and_fdatasync": {"bytes": WRITE_BYTES, "writes": paced.len(), "cpu": cpu, "on_the_store_cpu": pinned,
                                "gap_us": http_p50, "p50_us": disk_p50, "p99_us": paced.value_at_quantile(0.99),
                                "mean_us": paced.mean().round(),
                                "back_to_back": {"p50_us": back_to_back.value_at_quantile(0.5),
                                                 "p99_us": back_to_back.value_at_quantile(0.99)},
                                "into_unallocated_blocks": {"p50_us": unallocated.value_at_quantile(0.5),
                                                            "p99_us": unallocated.value_at_quantile(0.99)}},
        "http_round_trip": {"requests": http.len(), "p50_us": http_p50, "p99_us": http.value_at_quantile(0.99)},
        "sum_p50_us": disk_p50 + http_p50,
        "host_stolen_percent": stolen,
        "disturbed": steal::disturbed(stolen),
    })
}

/// What an execution must add at one connection on this machine, whatever the store engine:
/// it holds both bodies (the "holding" row) and makes two callouts in turn (each as the
/// "one callout" row's, over the holding), each of which waits for one write + `fdatasync`.
/// Medians added together, so an estimate, not a bound to the microsecond.
pub(crate) fn execution_floor_at_one_connection(one_connection: &Value, store_floor: &Value) -> Value {
    let row = |name: &str| {
        one_connection
            .as_array()
            .into_iter()
            .flatten()
            .find(|row| row["scenario"] == name)
    };
    let added = |name: &str| row(name).and_then(|row| row["added_p50_us"].as_u64());
    // Rows the host disturbed (the baseline's included) make the estimate say little.
    let disturbed = store_floor["disturbed"] == true
        || [HOLDING, ONE_CALLOUT, PASSTHROUGH_POST]
            .iter()
            .any(|name| row(name).is_none_or(|row| row["disturbed"] == true));
    let (Some(holding), Some(callout), Some(sync)) = (
        added(HOLDING),
        added(ONE_CALLOUT),
        store_floor["write_and_fdatasync"]["p50_us"].as_u64(),
    ) else {
        return Value::Null;
    };
    let callout_alone = callout.saturating_sub(holding);
    json!({
        "holding_both_bodies_us": holding,
        "one_callout_us": callout_alone,
        "write_and_fdatasync_us": sync,
        "probed_on_cpu": store_floor["write_and_fdatasync"]["cpu"],
        "added_p50_us": holding + 2 * (callout_alone + sync),
        "disturbed": disturbed,
    })
}

/// The one-connection rows the execution floor is built from.
pub(crate) const HOLDING: &str = "Wasm filter holding and reading both bodies";
/// See [`HOLDING`].
pub(crate) const ONE_CALLOUT: &str = "... and making one callout per request";
