//! The `fjall` engine: an LSM tree whose write-ahead journal is appended in memory per operation and written and fdatasync'd once per batch.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, OnceLock};

use fjall::{Database, Keyspace, KeyspaceCreateOptions, KvSeparationOptions, PersistMode};

use super::{unavailable, BatchTables, Commit, Engine, Visitor};
use crate::storage::StorageError;

/// A fjall database directory with two keyspaces: records by identity key, and the expiry
/// index keyed by big-endian expiry time then identity key (so a range scan finds what is due).
pub(super) struct FjallEngine {
    db: Database,
    records: Keyspace,
    expiry: Keyspace,
    /// Stored records, kept exact by the writer (fjall's own length is a full scan).
    live: Arc<LiveRecords>,
    /// Set when a journal sync failed: what is in memory may not be on disk, so the store stops
    /// answering until restarted (and recovered from the journal).
    failed: AtomicBool,
}

/// A store with at most about this many records is counted while it opens (a scan of
/// ~0.2 s); a larger one is counted in the background, so it serves at once.
const COUNT_WHILE_OPENING_UP_TO: u64 = 200_000;

/// How many records the store holds, without a scan on any request: the records present at
/// open (counted from a snapshot taken then) plus every insert and minus every delete since.
///
/// fjall's own length reads every record: 11.3–11.5 s of a restart at 10M records on the bench
/// machine (2 cores), ~100 s at the 86M records of 1,000 keyed writes a second kept 24 h — a
/// store that is not ready for that long after every restart or rollout. While the background
/// count runs, the `idempotency_store_live_records` gauge starts from fjall's estimate instead.
#[derive(Debug, Default)]
struct LiveRecords {
    /// Inserts minus deletes since the store opened (may be below zero while the count at open
    /// is not known yet).
    since_open: AtomicI64,
    /// The records present when the store opened, once counted.
    at_open: OnceLock<u64>,
    /// fjall's estimate of them (its item count, which counts overwritten and deleted entries
    /// not yet compacted away), until they are counted.
    about_at_open: u64,
}

impl LiveRecords {
    /// The records stored now: exact once the count at open is known.
    fn get(&self) -> u64 {
        let at_open = self.at_open.get().copied().unwrap_or(self.about_at_open);
        at_open.saturating_add_signed(self.since_open.load(Ordering::Acquire))
    }
}

/// When the records present at open are counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Counting {
    /// Before the store serves (a small store).
    WhileOpening,
    /// In a thread of its own while the store serves (a large one).
    InBackground,
    /// When the caller runs the job it gets back (tests: writes made before the count).
    #[cfg(test)]
    ByTheCaller,
}

/// Counting the records a snapshot taken at open holds.
type CountJob = Box<dyn FnOnce() + Send>;

/// Write buffer of the records keyspace before it is flushed to a table file.
const RECORDS_MEMTABLE_BYTES: u64 = 8 * 1024 * 1024;
/// Records at least this large (a completed record with a big response) are written to blob
/// files beside the tree instead of into it: compactions move a pointer instead of rewriting
/// the value at every level. Smaller records stay inline (most of them: a 1 KiB response).
/// Measured (`idempotency-bench --body-cost --without-steps`, 64 KiB bodies): the store's CPU
/// per execution 819–1,052 µs inline, 302–411 µs separated; executions per second about doubled.
/// fjall keeps a keyspace's options from its creation, so a data directory made before this
/// keeps the inline layout (a new one gets blob files).
const SEPARATED_VALUE_BYTES: u32 = 16 * 1024;
/// Write buffer of the expiry index (small entries).
const EXPIRY_MEMTABLE_BYTES: u64 = 4 * 1024 * 1024;

/// fjall's background threads (memtable flushes and compactions share them): fjall takes
/// min(CPUs, 4). The store takes at least three, for two measured reasons:
/// - with one (a pod with `cpu: 1`, or `taskset`), flushes waited behind compactions while
///   sealed memtables piled up in memory: 702 MB of memtables after 10 s of full-speed writes,
///   against ~8 MB with two workers;
/// - with two, fjall's worker 0 leaves compactions to the others by putting each `Compact`
///   message back on the queue; while worker 1 is busy, worker 0 takes the same message again at
///   once, in a loop: `perf` on the store under batched writes showed 12% of its CPU in that
///   loop (`worker_tick` and `flume` sends) with two workers and under 1% with three or four;
///   three gave ~10% more acquire+complete pairs/s than two on one CPU (four: within the noise
///   of three).
///
/// The threads mostly wait on the disk.
fn background_workers() -> usize {
    std::thread::available_parallelism()
        .map_or(3, std::num::NonZeroUsize::get)
        .clamp(3, 4)
}

fn expiry_key(at: u64, key: &str) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(8 + key.len());
    bytes.extend_from_slice(&at.to_be_bytes());
    bytes.extend_from_slice(key.as_bytes());
    bytes
}

impl FjallEngine {
    pub(super) fn open(path: &Path, cache_bytes: usize) -> Result<FjallEngine, StorageError> {
        let (engine, _) = FjallEngine::open_counting(path, cache_bytes, |about| {
            if about <= COUNT_WHILE_OPENING_UP_TO {
                Counting::WhileOpening
            } else {
                Counting::InBackground
            }
        })?;
        Ok(engine)
    }

    /// [`FjallEngine::open`], counting the records present when `when` (given fjall's estimate
    /// of them) says; with [`Counting::ByTheCaller`] the count is returned to be run.
    fn open_counting(
        path: &Path,
        cache_bytes: usize,
        when: impl FnOnce(u64) -> Counting,
    ) -> Result<(FjallEngine, Option<CountJob>), StorageError> {
        let db = Database::builder(path)
            .cache_size(u64::try_from(cache_bytes).unwrap_or(u64::MAX))
            // The writer decides when the journal reaches the disk: once per batch.
            .manual_journal_persist(true)
            .worker_threads(background_workers())
            .open()
            .map_err(|e| unavailable(format!("cannot open {}: {e}", path.display())))?;
        // Memtables bound the memory between flushes (fjall's default is 64 MiB each).
        let records = db
            .keyspace("records", || {
                KeyspaceCreateOptions::default()
                    .max_memtable_size(RECORDS_MEMTABLE_BYTES)
                    .with_kv_separation(Some(
                        KvSeparationOptions::default().separation_threshold(SEPARATED_VALUE_BYTES),
                    ))
            })
            .map_err(unavailable)?;
        let expiry = db
            .keyspace("expiry", || {
                KeyspaceCreateOptions::default().max_memtable_size(EXPIRY_MEMTABLE_BYTES)
            })
            .map_err(unavailable)?;
        let about = u64::try_from(records.approximate_len()).unwrap_or(u64::MAX);
        let live = Arc::new(LiveRecords {
            about_at_open: about,
            ..LiveRecords::default()
        });
        // Taken before the engine can write: what it counts plus `since_open` is exact.
        let snapshot = db.snapshot();
        let count: CountJob = {
            let (records, live) = (records.clone(), Arc::clone(&live));
            Box::new(move || {
                let started = std::time::Instant::now();
                match fjall::Readable::len(&snapshot, &records) {
                    Ok(n) => {
                        let n = u64::try_from(n).unwrap_or(u64::MAX);
                        let _ = live.at_open.set(n);
                        tracing::info!(
                            records = n,
                            seconds = started.elapsed().as_secs_f64(),
                            "counted the stored records"
                        );
                    }
                    Err(e) => tracing::error!(
                        error = %e,
                        "cannot count the stored records; the live-records gauge stays an estimate"
                    ),
                }
            })
        };
        let count = match when(about) {
            Counting::WhileOpening => {
                count();
                None
            }
            Counting::InBackground => {
                std::thread::Builder::new()
                    .name("count-records".into())
                    .spawn(count)
                    .map_err(|e| unavailable(format!("cannot start counting the records: {e}")))?;
                tracing::info!(about, "counting the stored records in the background");
                None
            }
            #[cfg(test)]
            Counting::ByTheCaller => Some(count),
        };
        let engine = FjallEngine {
            db,
            records,
            expiry,
            live,
            failed: AtomicBool::new(false),
        };
        Ok((engine, count))
    }

    fn check(&self) -> Result<(), StorageError> {
        if self.failed.load(Ordering::Acquire) {
            return Err(unavailable(
                "a journal sync failed earlier; restart the store to recover from the journal",
            ));
        }
        Ok(())
    }
}

/// One batch's view: writes are applied at once (later operations of the batch read them) and
/// reach the disk when the batch persists.
struct Tables<'e> {
    engine: &'e FjallEngine,
    wrote: bool,
}

impl BatchTables for Tables<'_> {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        let value = self.engine.records.get(key).map_err(unavailable)?;
        Ok(value.map(|v| v.to_vec()))
    }

    fn put(
        &mut self,
        key: &str,
        bytes: &[u8],
        expires_ms: u64,
        previous_expiry: Option<u64>,
    ) -> Result<(), StorageError> {
        self.wrote = true;
        let engine = self.engine;
        // Record and expiry entry in one atomic journal entry.
        let mut batch = engine.db.batch();
        batch.insert(&engine.records, key, bytes);
        if let Some(old) = previous_expiry.filter(|old| *old != expires_ms) {
            batch.remove(&engine.expiry, expiry_key(old, key));
        }
        batch.insert(&engine.expiry, expiry_key(expires_ms, key), b"".as_slice());
        batch.commit().map_err(unavailable)?;
        if previous_expiry.is_none() {
            engine.live.since_open.fetch_add(1, Ordering::AcqRel);
        }
        Ok(())
    }

    fn delete(&mut self, key: &str, expires_ms: u64) -> Result<(), StorageError> {
        self.wrote = true;
        let engine = self.engine;
        let mut batch = engine.db.batch();
        batch.remove(&engine.records, key);
        batch.remove(&engine.expiry, expiry_key(expires_ms, key));
        batch.commit().map_err(unavailable)?;
        engine.live.since_open.fetch_sub(1, Ordering::AcqRel);
        Ok(())
    }

    fn due(&self, now_ms: u64, limit: usize) -> Result<Vec<(u64, String)>, StorageError> {
        let end = now_ms.saturating_add(1).to_be_bytes();
        let mut keys = Vec::new();
        for entry in self.engine.expiry.range(..end.as_slice()).take(limit) {
            let key = entry.key().map_err(unavailable)?;
            let (at, identity) = key
                .split_at_checked(8)
                .ok_or_else(|| StorageError::Corrupt("short expiry key".into()))?;
            let at = u64::from_be_bytes(
                at.try_into()
                    .map_err(|_| StorageError::Corrupt("short expiry key".into()))?,
            );
            let identity = std::str::from_utf8(identity).map_err(|e| StorageError::Corrupt(e.to_string()))?;
            keys.push((at, identity.to_owned()));
        }
        Ok(keys)
    }

    fn forget_expiry(&mut self, at: u64, key: &str) -> Result<(), StorageError> {
        self.wrote = true;
        self.engine
            .expiry
            .remove(expiry_key(at, key))
            .map_err(unavailable)
    }
}

impl Engine for FjallEngine {
    fn write_batch(&self, apply: &mut dyn FnMut(&mut dyn BatchTables)) -> Result<Commit, String> {
        self.check().map_err(|e| e.to_string())?;
        let mut tables = Tables {
            engine: self,
            wrote: false,
        };
        apply(&mut tables);
        if !tables.wrote {
            return Ok(Commit::NothingWritten);
        }
        let started = std::time::Instant::now();
        self.db.persist(PersistMode::SyncData).map_err(|e| {
            self.failed.store(true, Ordering::Release);
            tracing::error!(error = %e, "journal sync failed; the store stops answering until restarted");
            e.to_string()
        })?;
        Ok(Commit::Synced {
            sync: started.elapsed(),
        })
    }

    fn read(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        self.check()?;
        let value = self.records.get(key).map_err(unavailable)?;
        Ok(value.map(|v| v.to_vec()))
    }

    fn scan(&self, start: &str, visit: &mut Visitor<'_>) -> Result<(), StorageError> {
        self.check()?;
        for entry in self.records.range(start..) {
            let (key, value) = entry.into_inner().map_err(unavailable)?;
            let key = std::str::from_utf8(&key).map_err(|e| StorageError::Corrupt(e.to_string()))?;
            if !visit(key, &value)? {
                break;
            }
        }
        Ok(())
    }

    fn count(&self) -> Result<u64, StorageError> {
        self.check()?;
        Ok(self.live.get())
    }

    fn ready(&self) -> Result<(), StorageError> {
        self.check()
    }

    fn live(&self) -> Result<(), StorageError> {
        self.check()
    }

    fn write_buffer_bytes(&self) -> Option<u64> {
        Some(self.db.write_buffer_size())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn after_a_failed_journal_sync_the_engine_is_neither_ready_nor_live() {
        let dir = tempfile::tempdir().unwrap();
        let engine = FjallEngine::open(&dir.path().join("store"), 1024 * 1024).unwrap();
        assert!(engine.ready().is_ok() && engine.live().is_ok());
        // What `write_batch` records when fdatasync fails.
        engine.failed.store(true, Ordering::Release);
        assert!(engine.ready().is_err(), "not ready: refuses every operation");
        let error = engine.live().unwrap_err().to_string();
        assert!(
            error.contains("restart"),
            "liveness fails, so it is restarted: {error}"
        );
    }

    fn put(engine: &FjallEngine, key: &str) {
        let mut tables = Tables { engine, wrote: false };
        tables.put(key, b"{}", u64::MAX, None).unwrap();
    }

    /// A closed store directory holding `records` records, and the engine that wrote them said
    /// how many there were.
    fn store_with(records: usize) -> (tempfile::TempDir, std::path::PathBuf, u64) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let engine = FjallEngine::open(&path, 1024 * 1024).unwrap();
        for i in 0..records {
            put(&engine, &format!("k{i:04}"));
        }
        let counted = engine.count().unwrap();
        (dir, path, counted)
    }

    #[test]
    fn a_store_counted_in_the_background_serves_meanwhile_and_ends_exact() {
        let (_dir, path, _) = store_with(300);
        let (engine, job) =
            FjallEngine::open_counting(&path, 1024 * 1024, |_| Counting::InBackground).unwrap();
        assert!(job.is_none());
        assert!(engine.ready().is_ok());
        let started = std::time::Instant::now();
        while engine.live.at_open.get().is_none() {
            assert!(started.elapsed().as_secs() < 30, "never counted");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(engine.count().unwrap(), 300);
    }

    #[test]
    fn records_counted_after_the_store_opened_are_counted_as_they_were_at_open() {
        let (_dir, path, counted) = store_with(500);
        assert_eq!(counted, 500, "a small store is counted while opening");
        // The count runs after the writes below: it must count what was there at open only.
        let (engine, count) =
            FjallEngine::open_counting(&path, 1024 * 1024, |_| Counting::ByTheCaller).unwrap();
        let count = count.unwrap();
        for i in 500..520 {
            put(&engine, &format!("k{i:04}"));
        }
        let mut tables = Tables {
            engine: &engine,
            wrote: false,
        };
        tables.delete("k0000", u64::MAX).unwrap();
        assert!(engine.ready().is_ok(), "serving before it counted");
        assert_eq!(
            engine.count().unwrap(),
            engine.live.about_at_open + 19,
            "meanwhile: the estimate and what changed since"
        );
        count();
        assert_eq!(
            engine.count().unwrap(),
            519,
            "500 at open, 20 written and 1 deleted before the count ran"
        );
    }
}
