//! Embedded backend on `redb`: one file, no server, durable on acknowledged writes.
//!
//! All writes go through one writer thread that applies a batch of operations in one write
//! transaction and commits it with `Durability::Immediate` (fsync) before answering any of them:
//! group commit. The single writer also makes every rule in `record.rs` atomic without locks.
//! Reads use their own read transactions on the caller's blocking pool.

use std::path::Path;
use std::sync::Arc;
use std::thread;

use async_trait::async_trait;
use idempotency_wire::{
    AbandonRequest, AcquireRequest, AcquireResponse, CheckpointRequest, CompleteRequest,
    OutcomeUnknownRequest, RecordId, ReleaseRequest,
};
use redb::{Database, Durability, ReadableTable, ReadableTableMetadata, TableDefinition};
use tokio::sync::{mpsc, oneshot};

use super::{BackendName, Storage, StorageError};
use crate::record::{
    apply_abandon, apply_checkpoint, apply_complete, apply_outcome_unknown, apply_release, check_deadline,
    decide_acquire, identity_key, Record,
};

/// Records by identity key.
const RECORDS: TableDefinition<&str, &[u8]> = TableDefinition::new("records");
/// Expiry index: (expires_ms, identity key) → ().
const EXPIRY: TableDefinition<(u64, &str), ()> = TableDefinition::new("expiry");

/// Page cache of the embedded database unless configured: bounds the store's memory (redb's own
/// default is 1 GiB).
pub const DEFAULT_CACHE_BYTES: usize = 32 * 1024 * 1024;

/// Most operations committed together.
const MAX_BATCH: usize = 512;

fn unavailable(e: impl std::fmt::Display) -> StorageError {
    StorageError::Unavailable(e.to_string())
}

enum Op {
    /// The `Instant` is when the caller read the clock: the writer adds the time the operation
    /// spent queued before it checks the deadline.
    Acquire(
        AcquireRequest,
        u64,
        std::time::Instant,
        oneshot::Sender<Result<AcquireResponse, StorageError>>,
    ),
    Complete(CompleteRequest, u64, oneshot::Sender<Result<(), StorageError>>),
    Release(ReleaseRequest, u64, oneshot::Sender<Result<(), StorageError>>),
    Checkpoint(CheckpointRequest, u64, oneshot::Sender<Result<(), StorageError>>),
    OutcomeUnknown(
        OutcomeUnknownRequest,
        u64,
        oneshot::Sender<Result<(), StorageError>>,
    ),
    Abandon(AbandonRequest, u64, oneshot::Sender<Result<bool, StorageError>>),
    Purge(RecordId, oneshot::Sender<Result<bool, StorageError>>),
    Sweep(u64, u64, oneshot::Sender<Result<u64, StorageError>>),
}

/// The embedded store.
pub struct EmbeddedStorage {
    db: Arc<Database>,
    writer: mpsc::Sender<Op>,
}

impl std::fmt::Debug for EmbeddedStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStorage").finish_non_exhaustive()
    }
}

impl EmbeddedStorage {
    /// Open (or create) the database file with redb's default page cache and start the writer.
    pub fn open(path: &Path) -> Result<EmbeddedStorage, StorageError> {
        EmbeddedStorage::open_with_cache(path, DEFAULT_CACHE_BYTES)
    }

    /// Open (or create) the database file with a page cache of `cache_bytes` and start the
    /// writer thread.
    pub fn open_with_cache(path: &Path, cache_bytes: usize) -> Result<EmbeddedStorage, StorageError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(|e| unavailable(format!("cannot create {}: {e}", parent.display())))?;
        }
        let db = Database::builder()
            .set_cache_size(cache_bytes)
            .create(path)
            .map_err(|e| unavailable(format!("cannot open {}: {e}", path.display())))?;
        let txn = db.begin_write().map_err(unavailable)?;
        txn.open_table(RECORDS).map_err(unavailable)?;
        txn.open_table(EXPIRY).map_err(unavailable)?;
        txn.commit().map_err(unavailable)?;
        let db = Arc::new(db);
        let (writer, mut ops) = mpsc::channel(4 * MAX_BATCH);
        let writer_db = db.clone();
        thread::Builder::new()
            .name("redb-writer".into())
            .spawn(move || writer_loop(&writer_db, &mut ops))
            .map_err(unavailable)?;
        Ok(EmbeddedStorage { db, writer })
    }

    async fn submit<T>(
        &self,
        op: impl FnOnce(oneshot::Sender<Result<T, StorageError>>) -> Op,
    ) -> Result<T, StorageError> {
        let (tx, rx) = oneshot::channel();
        self.writer
            .send(op(tx))
            .await
            .map_err(|_| unavailable("writer thread stopped"))?;
        rx.await
            .map_err(|_| unavailable("writer thread dropped the operation"))?
    }

    fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, StorageError> + Send + 'static,
    ) -> impl std::future::Future<Output = Result<T, StorageError>> {
        let db = self.db.clone();
        async move {
            tokio::task::spawn_blocking(move || f(&db))
                .await
                .map_err(unavailable)?
        }
    }
}

/// The cursor itself, when paging resumes after it (not at the range's start).
fn cursor_key<'a>(start: &'a str, prefix: &str) -> Option<&'a str> {
    (start != prefix).then_some(start)
}

/// How to answer one operation once its batch has committed (or failed).
type Reply = Box<dyn FnOnce(Result<(), StorageError>) + Send>;

fn writer_loop(db: &Database, ops: &mut mpsc::Receiver<Op>) {
    while let Some(first) = ops.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match ops.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let (replies, committed) = apply_batch(db, batch);
        for reply in replies {
            reply(committed.clone().map_err(StorageError::Unavailable));
        }
    }
}

/// Apply a batch in one write transaction (tables opened once) and commit it durably.
fn apply_batch(db: &Database, batch: Vec<Op>) -> (Vec<Reply>, Result<(), String>) {
    let mut txn = match db.begin_write() {
        Ok(txn) => txn,
        Err(e) => return (batch.into_iter().map(fail).collect(), Err(e.to_string())),
    };
    txn.set_durability(Durability::Immediate);
    let replies = match (txn.open_table(RECORDS), txn.open_table(EXPIRY)) {
        (Ok(records), Ok(expiry)) => {
            let mut tables = Tables { records, expiry };
            batch.into_iter().map(|op| apply(&mut tables, op)).collect()
        }
        (Err(e), _) | (_, Err(e)) => {
            let message = e.to_string();
            return (batch.into_iter().map(fail).collect(), Err(message));
        }
    };
    (replies, txn.commit().map_err(|e| e.to_string()))
}

/// The two tables of one write transaction.
struct Tables<'txn> {
    records: redb::Table<'txn, &'static str, &'static [u8]>,
    expiry: redb::Table<'txn, (u64, &'static str), ()>,
}

fn fail(op: Op) -> Reply {
    fn reply_err<T: Send + 'static>(tx: oneshot::Sender<Result<T, StorageError>>) -> Reply {
        Box::new(move |commit: Result<(), StorageError>| {
            let err = commit.err().unwrap_or_else(|| unavailable("transaction failed"));
            let _ = tx.send(Err(err));
        })
    }
    match op {
        Op::Acquire(_, _, _, tx) => reply_err(tx),
        Op::Complete(_, _, tx)
        | Op::Release(_, _, tx)
        | Op::Checkpoint(_, _, tx)
        | Op::OutcomeUnknown(_, _, tx) => reply_err(tx),
        Op::Purge(_, tx) | Op::Abandon(_, _, tx) => reply_err(tx),
        Op::Sweep(_, _, tx) => reply_err(tx),
    }
}

/// Answer after commit: the result computed in the transaction, unless the commit failed.
fn after_commit<T: Send + 'static>(
    tx: oneshot::Sender<Result<T, StorageError>>,
    result: Result<T, StorageError>,
) -> Reply {
    Box::new(move |commit: Result<(), StorageError>| {
        let _ = tx.send(commit.and(result));
    })
}

fn decode(bytes: &[u8]) -> Result<Record, StorageError> {
    serde_json::from_slice::<Record>(bytes).map_err(|e| StorageError::Corrupt(e.to_string()))
}

fn load(tables: &Tables<'_>, key: &str) -> Result<Option<Record>, StorageError> {
    let bytes = tables.records.get(key).map_err(unavailable)?;
    bytes.map(|v| decode(v.value())).transpose()
}

fn save(
    tables: &mut Tables<'_>,
    key: &str,
    previous: Option<&Record>,
    record: &Record,
) -> Result<(), StorageError> {
    let bytes = serde_json::to_vec(record).map_err(|e| StorageError::Corrupt(e.to_string()))?;
    tables
        .records
        .insert(key, bytes.as_slice())
        .map_err(unavailable)?;
    if let Some(old) = previous {
        if old.expires_ms != record.expires_ms {
            tables.expiry.remove((old.expires_ms, key)).map_err(unavailable)?;
        }
    }
    tables
        .expiry
        .insert((record.expires_ms, key), ())
        .map_err(unavailable)?;
    Ok(())
}

fn remove(tables: &mut Tables<'_>, key: &str) -> Result<bool, StorageError> {
    let Some(old) = load(tables, key)? else {
        return Ok(false);
    };
    tables.records.remove(key).map_err(unavailable)?;
    tables.expiry.remove((old.expires_ms, key)).map_err(unavailable)?;
    Ok(true)
}

/// Apply a holder rule (complete/release/checkpoint) to the stored record.
fn update(
    tables: &mut Tables<'_>,
    id: &RecordId,
    rule: impl FnOnce(Option<Record>) -> Result<Record, StorageError>,
) -> Result<(), StorageError> {
    let key = identity_key(id);
    let previous = load(tables, &key)?;
    let updated = rule(previous.clone())?;
    save(tables, &key, previous.as_ref(), &updated)
}

fn apply(tables: &mut Tables<'_>, op: Op) -> Reply {
    match op {
        Op::Acquire(request, now_ms, submitted, tx) => {
            let key = identity_key(&request.id);
            // The deadline is checked here, where the decision is made: an acquire that queued
            // behind a slow commit past its deadline must not take the lock.
            let queued_ms = u64::try_from(submitted.elapsed().as_millis()).unwrap_or(u64::MAX);
            let result = check_deadline(&request, now_ms.saturating_add(queued_ms))
                .and_then(|()| load(tables, &key))
                .and_then(|previous| {
                    let decision = decide_acquire(previous.clone(), &request, now_ms, || {
                        uuid::Uuid::new_v4().to_string()
                    });
                    if let Some(record) = &decision.write {
                        save(tables, &key, previous.as_ref(), record)?;
                    }
                    Ok(decision.response)
                });
            after_commit(tx, result)
        }
        Op::Complete(request, now_ms, tx) => {
            let result = update(tables, &request.id, |r| apply_complete(r, &request, now_ms));
            after_commit(tx, result)
        }
        Op::Release(request, now_ms, tx) => {
            let result = update(tables, &request.id, |r| apply_release(r, &request, now_ms));
            after_commit(tx, result)
        }
        Op::Checkpoint(request, now_ms, tx) => {
            let result = update(tables, &request.id, |r| apply_checkpoint(r, &request, now_ms));
            after_commit(tx, result)
        }
        Op::OutcomeUnknown(request, now_ms, tx) => {
            let result = update(tables, &request.id, |r| {
                apply_outcome_unknown(r, &request, now_ms)
            });
            after_commit(tx, result)
        }
        Op::Abandon(request, now_ms, tx) => {
            let key = identity_key(&request.id);
            let result = load(tables, &key).and_then(|previous| {
                match apply_abandon(previous.clone(), &request, now_ms) {
                    Some(record) => save(tables, &key, previous.as_ref(), &record).map(|()| true),
                    None => Ok(false),
                }
            });
            after_commit(tx, result)
        }
        Op::Purge(id, tx) => after_commit(tx, remove(tables, &identity_key(&id))),
        Op::Sweep(now_ms, limit, tx) => after_commit(tx, sweep(tables, now_ms, limit)),
    }
}

fn sweep(tables: &mut Tables<'_>, now_ms: u64, limit: u64) -> Result<u64, StorageError> {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let expired: Vec<(u64, String)> = {
        let range = tables
            .expiry
            .range((0u64, "")..(now_ms.saturating_add(1), ""))
            .map_err(unavailable)?;
        let mut keys = Vec::new();
        for entry in range.take(limit) {
            let (k, _) = entry.map_err(unavailable)?;
            let (at, key) = k.value();
            keys.push((at, key.to_owned()));
        }
        keys
    };
    let mut removed = 0;
    for (at, key) in expired {
        tables.expiry.remove((at, key.as_str())).map_err(unavailable)?;
        let still_expired = match tables.records.get(key.as_str()).map_err(unavailable)? {
            Some(v) => decode(v.value()).map(|r| r.is_expired(now_ms)).unwrap_or(true),
            None => false,
        };
        if still_expired {
            tables.records.remove(key.as_str()).map_err(unavailable)?;
            removed += 1;
        }
    }
    Ok(removed)
}

#[async_trait]
impl Storage for EmbeddedStorage {
    fn name(&self) -> BackendName {
        "embedded"
    }

    async fn acquire(&self, request: &AcquireRequest, now_ms: u64) -> Result<AcquireResponse, StorageError> {
        let request = request.clone();
        let submitted = std::time::Instant::now();
        self.submit(|tx| Op::Acquire(request, now_ms, submitted, tx))
            .await
    }

    async fn complete(&self, request: &CompleteRequest, now_ms: u64) -> Result<(), StorageError> {
        let request = request.clone();
        self.submit(|tx| Op::Complete(request, now_ms, tx)).await
    }

    async fn release(&self, request: &ReleaseRequest, now_ms: u64) -> Result<(), StorageError> {
        let request = request.clone();
        self.submit(|tx| Op::Release(request, now_ms, tx)).await
    }

    async fn checkpoint(&self, request: &CheckpointRequest, now_ms: u64) -> Result<(), StorageError> {
        let request = request.clone();
        self.submit(|tx| Op::Checkpoint(request, now_ms, tx)).await
    }

    async fn get(&self, id: &RecordId, now_ms: u64) -> Result<Option<Record>, StorageError> {
        let key = identity_key(id);
        self.read(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let table = txn.open_table(RECORDS).map_err(unavailable)?;
            let value = table.get(key.as_str()).map_err(unavailable)?;
            let record = value
                .map(|v| {
                    serde_json::from_slice::<Record>(v.value())
                        .map_err(|e| StorageError::Corrupt(e.to_string()))
                })
                .transpose()?;
            Ok(record.filter(|r| !r.is_expired(now_ms)))
        })
        .await
    }

    async fn outcome_unknown(
        &self,
        request: &OutcomeUnknownRequest,
        now_ms: u64,
    ) -> Result<(), StorageError> {
        let request = request.clone();
        self.submit(|tx| Op::OutcomeUnknown(request, now_ms, tx)).await
    }

    async fn abandon(&self, request: &AbandonRequest, now_ms: u64) -> Result<bool, StorageError> {
        let request = request.clone();
        self.submit(|tx| Op::Abandon(request, now_ms, tx)).await
    }

    async fn list_in_progress(
        &self,
        service: &str,
        created_before_ms: u64,
        limit: usize,
        cursor: Option<&str>,
        now_ms: u64,
    ) -> Result<(Vec<Record>, Option<String>), StorageError> {
        // Identity keys start with the length-prefixed service, so one service is one key range.
        let prefix = format!("{}:{}|", service.len(), service);
        let start = cursor.map(str::to_owned).unwrap_or_else(|| prefix.clone());
        self.read(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let table = txn.open_table(RECORDS).map_err(unavailable)?;
            let mut page = Vec::new();
            let mut next = None;
            for entry in table.range(start.as_str()..).map_err(unavailable)? {
                let (key, value) = entry.map_err(unavailable)?;
                let key = key.value();
                if !key.starts_with(&prefix) {
                    break;
                }
                if Some(key) == cursor_key(&start, &prefix) {
                    continue; // the cursor is the last record of the previous page
                }
                let record = decode(value.value())?;
                if record.state != crate::record::RecordState::InProgress
                    || record.is_expired(now_ms)
                    || record.created_ms > created_before_ms
                {
                    continue;
                }
                if page.len() == limit {
                    next = page.last().map(|r: &Record| identity_key(&r.id));
                    break;
                }
                page.push(record);
            }
            Ok((page, next))
        })
        .await
    }

    async fn purge(&self, id: &RecordId) -> Result<bool, StorageError> {
        let id = id.clone();
        self.submit(|tx| Op::Purge(id, tx)).await
    }

    async fn sweep_expired(&self, now_ms: u64, limit: u64) -> Result<u64, StorageError> {
        self.submit(|tx| Op::Sweep(now_ms, limit, tx)).await
    }

    async fn record_count(&self) -> Result<u64, StorageError> {
        self.read(|db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let table = txn.open_table(RECORDS).map_err(unavailable)?;
            table.len().map_err(unavailable)
        })
        .await
    }

    async fn ready(&self) -> Result<(), StorageError> {
        self.read(|db| db.begin_read().map(|_| ()).map_err(unavailable))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn open() -> (tempfile::TempDir, EmbeddedStorage) {
        let dir = tempfile::tempdir().unwrap();
        let storage = EmbeddedStorage::open(&dir.path().join("store.redb")).unwrap();
        (dir, storage)
    }

    crate::storage_contract_tests!(open().await);

    #[tokio::test]
    async fn acknowledged_writes_survive_reopening_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        let request = crate::storage::contract::acquire_request("durable", 60_000);
        {
            let storage = EmbeddedStorage::open(&path).unwrap();
            storage.acquire(&request, 1_000).await.unwrap();
        }
        // The writer thread holds the database; wait for it to let go of the file lock.
        let mut reopened = None;
        for _ in 0..50 {
            match EmbeddedStorage::open(&path) {
                Ok(s) => {
                    reopened = Some(s);
                    break;
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            }
        }
        let storage = reopened.unwrap();
        let again = storage.acquire(&request, 2_000).await.unwrap();
        assert!(matches!(again, AcquireResponse::InProgress { .. }), "{again:?}");
    }
}
