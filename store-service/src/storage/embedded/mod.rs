//! Embedded backend: one local directory or file, no server, durable on acknowledged writes.
//!
//! All writes go through one writer thread that applies a batch of operations and makes the
//! batch durable with one fsync before answering any of them: group commit. The single writer
//! also makes every rule in `record.rs` atomic without locks. Two engines sit under the writer
//! (`--embedded-engine`): `fjall` (default; an LSM tree whose journal is appended and fdatasync'd
//! once per batch) and `redb` (a copy-on-write B-tree, one durable transaction per batch). The
//! docs/performance.md has the measurements that chose the default.
//!
//! A batch that wrote nothing (replays, duplicates, "in progress" answers) is not synced: it
//! changed nothing that a crash could lose.
//!
//! The operations of one `/v1/batch` reach the writer as one submission ([`Storage::together`]),
//! so they always share a commit: sent one by one, the writer often woke on the first and synced
//! it alone while the others were still on their way, and the batch waited for two syncs.

use std::cell::RefCell;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;

use async_trait::async_trait;
use futures::future::BoxFuture;
use idempotency_wire::{
    AbandonRequest, AcquireRequest, AcquireResponse, CheckpointRequest, CompleteRequest,
    OutcomeUnknownRequest, RecordId, ReleaseRequest,
};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot};

use super::{BackendName, GroupCommits, Storage, StorageError};
use crate::record::{
    apply_abandon, apply_checkpoint, apply_complete, apply_outcome_unknown, apply_release, check_deadline,
    decide_acquire, identity_key, Record,
};

mod fjall_engine;
mod redb_engine;

/// Cache of the embedded engine unless configured: bounds the store's memory.
pub const DEFAULT_CACHE_BYTES: usize = 32 * 1024 * 1024;

/// Most operations committed together.
const MAX_BATCH: usize = 512;

/// Which engine stores the records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum EngineKind {
    /// LSM tree with a write-ahead journal (`fjall`); `--data-path` is a directory.
    #[default]
    Fjall,
    /// Copy-on-write B-tree (`redb`); `--data-path` is a file.
    Redb,
}

fn unavailable(e: impl std::fmt::Display) -> StorageError {
    StorageError::Unavailable(e.to_string())
}

/// The tables of one batch, as the writer sees them: records by identity key, and the expiry
/// index. Reads see the batch's own earlier writes.
pub(crate) trait BatchTables {
    /// The stored bytes of a record.
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError>;
    /// Store a record and move its expiry entry (`previous_expiry`: where it was, if stored).
    fn put(
        &mut self,
        key: &str,
        bytes: &[u8],
        expires_ms: u64,
        previous_expiry: Option<u64>,
    ) -> Result<(), StorageError>;
    /// Delete a record and its expiry entry.
    fn delete(&mut self, key: &str, expires_ms: u64) -> Result<(), StorageError>;
    /// Up to `limit` expiry entries due at or before `now_ms`, oldest first.
    fn due(&self, now_ms: u64, limit: usize) -> Result<Vec<(u64, String)>, StorageError>;
    /// Delete one expiry entry (the record may live on with a later expiry).
    fn forget_expiry(&mut self, at: u64, key: &str) -> Result<(), StorageError>;
}

/// Called for each record of a scan with its key and bytes; returns whether to go on.
pub(crate) type Visitor<'a> = dyn FnMut(&str, &[u8]) -> Result<bool, StorageError> + 'a;

/// A storage engine under the writer thread.
pub(crate) trait Engine: Send + Sync + 'static {
    /// Run `apply` over one batch and make what it wrote durable before returning; a batch
    /// that wrote nothing is not synced.
    fn write_batch(&self, apply: &mut dyn FnMut(&mut dyn BatchTables)) -> Result<Commit, String>;
    /// Read one record's bytes (outside the writer).
    fn read(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError>;
    /// Visit records in key order from `start` until `visit` returns false.
    fn scan(&self, start: &str, visit: &mut Visitor<'_>) -> Result<(), StorageError>;
    /// Number of stored records.
    fn count(&self) -> Result<u64, StorageError>;
    /// Ok when the engine can serve requests.
    fn ready(&self) -> Result<(), StorageError>;
    /// Ok unless the engine can never serve writes again without a restart (a failed sync).
    fn live(&self) -> Result<(), StorageError> {
        Ok(())
    }
    /// Bytes of written data held in memory until flushed to table files (fjall's memtables,
    /// active and sealed); `None` when the engine has no such buffer.
    fn write_buffer_bytes(&self) -> Option<u64> {
        None
    }
}

/// What a batch's commit did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Commit {
    /// The batch wrote, and its writes reached the disk (one sync), which took `sync`.
    Synced { sync: std::time::Duration },
    /// The batch only read: nothing to make durable, no sync.
    NothingWritten,
}

/// Durable commits the writer made, and the operations they carried: their ratio is how well
/// group commit shares a sync.
#[derive(Debug, Default)]
struct CommitTally {
    commits: AtomicU64,
    operations: AtomicU64,
    /// Time spent making those commits durable (the engine's write and sync), in nanoseconds.
    sync_nanos: AtomicU64,
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

/// What the writer receives: one operation, or the operations started together in one poll of
/// [`Storage::together`]'s work, which go into the same commit.
#[allow(clippy::large_enum_variant)] // `One` is the common case; boxing it would allocate per operation
enum Submission {
    One(Op),
    Together(Vec<Op>),
}

impl Submission {
    fn add_to(self, batch: &mut Vec<Op>) {
        match self {
            Submission::One(op) => batch.push(op),
            Submission::Together(ops) => batch.extend(ops),
        }
    }
}

tokio::task_local! {
    /// Operations submitted while [`Storage::together`] polls its work: they leave for the
    /// writer as one [`Submission::Together`] when the poll returns.
    static GATHERING: RefCell<Vec<Op>>;
}

/// The embedded store.
pub struct EmbeddedStorage {
    engine: Arc<dyn Engine>,
    kind: EngineKind,
    writer: mpsc::Sender<Submission>,
    tally: Arc<CommitTally>,
}

impl std::fmt::Debug for EmbeddedStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStorage")
            .field("engine", &self.kind)
            .finish_non_exhaustive()
    }
}

impl EmbeddedStorage {
    /// Open (or create) the default engine's data at `path` with the default cache.
    pub fn open(path: &Path) -> Result<EmbeddedStorage, StorageError> {
        EmbeddedStorage::open_engine(EngineKind::default(), path, DEFAULT_CACHE_BYTES)
    }

    /// Open (or create) `kind`'s data at `path` with a cache of `cache_bytes`, and start the
    /// writer thread.
    pub fn open_engine(
        kind: EngineKind,
        path: &Path,
        cache_bytes: usize,
    ) -> Result<EmbeddedStorage, StorageError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(|e| unavailable(format!("cannot create {}: {e}", parent.display())))?;
        }
        let engine: Arc<dyn Engine> = match kind {
            EngineKind::Fjall => Arc::new(fjall_engine::FjallEngine::open(path, cache_bytes)?),
            EngineKind::Redb => Arc::new(redb_engine::RedbEngine::open(path, cache_bytes)?),
        };
        let (writer, mut submissions) = mpsc::channel(4 * MAX_BATCH);
        let writer_engine = engine.clone();
        let tally = Arc::new(CommitTally::default());
        let writer_tally = tally.clone();
        thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer_loop(writer_engine.as_ref(), &writer_tally, &mut submissions))
            .map_err(unavailable)?;
        Ok(EmbeddedStorage {
            engine,
            kind,
            writer,
            tally,
        })
    }

    async fn submit<T>(
        &self,
        op: impl FnOnce(oneshot::Sender<Result<T, StorageError>>) -> Op,
    ) -> Result<T, StorageError> {
        let (tx, rx) = oneshot::channel();
        let mut op = Some(op(tx));
        // Inside `together`, the operation waits to leave with the others of its poll.
        let _ = GATHERING.try_with(|gathered| gathered.borrow_mut().extend(op.take()));
        if let Some(op) = op {
            self.writer
                .send(Submission::One(op))
                .await
                .map_err(|_| unavailable("writer thread stopped"))?;
        }
        rx.await
            .map_err(|_| unavailable("writer thread dropped the operation"))?
    }

    fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Engine) -> Result<T, StorageError> + Send + 'static,
    ) -> impl std::future::Future<Output = Result<T, StorageError>> {
        let engine = self.engine.clone();
        async move {
            tokio::task::spawn_blocking(move || f(engine.as_ref()))
                .await
                .map_err(unavailable)?
        }
    }

    /// Hand the operations gathered in one poll to the writer as one submission.
    fn send_together(&self, ops: Vec<Op>) {
        match self.writer.try_send(Submission::Together(ops)) {
            Ok(()) => {}
            // The queue is full (the writer is far behind): wait for room off this poll. Each
            // operation's caller waits for its own answer, so nothing else depends on the order.
            Err(TrySendError::Full(submission)) => {
                let writer = self.writer.clone();
                tokio::spawn(async move { writer.send(submission).await });
            }
            // The writer is gone: dropping the operations answers each caller "unavailable".
            Err(TrySendError::Closed(_)) => {}
        }
    }
}

/// How to answer one operation once its batch has committed (or failed).
type Reply = Box<dyn FnOnce(Result<(), StorageError>) + Send>;

fn writer_loop(engine: &dyn Engine, tally: &CommitTally, submissions: &mut mpsc::Receiver<Submission>) {
    while let Some(first) = submissions.blocking_recv() {
        let mut batch = Vec::new();
        first.add_to(&mut batch);
        while batch.len() < MAX_BATCH {
            match submissions.try_recv() {
                Ok(submission) => submission.add_to(&mut batch),
                Err(_) => break,
            }
        }
        let operations = batch.len() as u64;
        let mut pending = batch.into_iter();
        let mut replies: Vec<Reply> = Vec::with_capacity(pending.len());
        let committed = engine.write_batch(&mut |tables| {
            replies.extend(pending.by_ref().map(|op| apply(tables, op)));
        });
        if let Ok(Commit::Synced { sync }) = committed {
            tally.commits.fetch_add(1, Ordering::Relaxed);
            tally.operations.fetch_add(operations, Ordering::Relaxed);
            let nanos = u64::try_from(sync.as_nanos()).unwrap_or(u64::MAX);
            tally.sync_nanos.fetch_add(nanos, Ordering::Relaxed);
        }
        // Operations the engine never reached (it failed to begin the batch) fail too.
        replies.extend(pending.map(fail));
        for reply in replies {
            reply(committed.clone().map(drop).map_err(StorageError::Unavailable));
        }
    }
}

fn fail(op: Op) -> Reply {
    fn reply_err<T: Send + 'static>(tx: oneshot::Sender<Result<T, StorageError>>) -> Reply {
        Box::new(move |commit: Result<(), StorageError>| {
            let err = commit.err().unwrap_or_else(|| unavailable("batch failed"));
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

/// Answer after commit: the result computed in the batch, unless the commit failed.
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

fn load(tables: &dyn BatchTables, key: &str) -> Result<Option<Record>, StorageError> {
    tables.get(key)?.map(|bytes| decode(&bytes)).transpose()
}

fn save(
    tables: &mut dyn BatchTables,
    key: &str,
    previous: Option<&Record>,
    record: &Record,
) -> Result<(), StorageError> {
    let bytes = serde_json::to_vec(record).map_err(|e| StorageError::Corrupt(e.to_string()))?;
    tables.put(key, &bytes, record.expires_ms, previous.map(|r| r.expires_ms))
}

fn remove(tables: &mut dyn BatchTables, key: &str) -> Result<bool, StorageError> {
    let Some(old) = load(tables, key)? else {
        return Ok(false);
    };
    tables.delete(key, old.expires_ms)?;
    Ok(true)
}

/// Apply a holder rule (complete/release/checkpoint) to the stored record.
fn update(
    tables: &mut dyn BatchTables,
    id: &RecordId,
    rule: impl FnOnce(Option<Record>) -> Result<Record, StorageError>,
) -> Result<(), StorageError> {
    let key = identity_key(id);
    let previous = load(tables, &key)?;
    let updated = rule(previous.clone())?;
    save(tables, &key, previous.as_ref(), &updated)
}

fn apply(tables: &mut dyn BatchTables, op: Op) -> Reply {
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

fn sweep(tables: &mut dyn BatchTables, now_ms: u64, limit: u64) -> Result<u64, StorageError> {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let mut removed = 0;
    for (at, key) in tables.due(now_ms, limit)? {
        tables.forget_expiry(at, &key)?;
        let still_expired = match tables.get(&key)? {
            Some(bytes) => decode(&bytes).map(|r| r.is_expired(now_ms)).unwrap_or(true),
            None => false,
        };
        if still_expired {
            // The expiry entry is gone already; delete the record under the same key.
            tables.delete(&key, at)?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// The cursor itself, when paging resumes after it (not at the range's start).
fn cursor_key<'a>(start: &'a str, prefix: &str) -> Option<&'a str> {
    (start != prefix).then_some(start)
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
        self.read(move |engine| {
            let record = engine.read(&key)?.map(|bytes| decode(&bytes)).transpose()?;
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
        self.read(move |engine| {
            let mut page = Vec::new();
            let mut next = None;
            engine.scan(&start, &mut |key, value| {
                if !key.starts_with(&prefix) {
                    return Ok(false);
                }
                if Some(key) == cursor_key(&start, &prefix) {
                    return Ok(true); // the cursor is the last record of the previous page
                }
                let record = decode(value)?;
                if record.state != crate::record::RecordState::InProgress
                    || record.is_expired(now_ms)
                    || record.created_ms > created_before_ms
                {
                    return Ok(true);
                }
                if page.len() == limit {
                    next = page.last().map(|r: &Record| identity_key(&r.id));
                    return Ok(false);
                }
                page.push(record);
                Ok(true)
            })?;
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
        self.read(|engine| engine.count()).await
    }

    async fn ready(&self) -> Result<(), StorageError> {
        self.read(|engine| engine.ready()).await
    }

    fn live(&self) -> Result<(), StorageError> {
        self.engine.live()
    }

    fn write_buffer_bytes(&self) -> Option<u64> {
        self.engine.write_buffer_bytes()
    }

    fn group_commits(&self) -> Option<GroupCommits> {
        Some(GroupCommits {
            commits: self.tally.commits.load(Ordering::Relaxed),
            operations: self.tally.operations.load(Ordering::Relaxed),
            sync_nanos: self.tally.sync_nanos.load(Ordering::Relaxed),
        })
    }

    async fn together<'a>(&'a self, work: BoxFuture<'a, ()>) {
        let mut work = work;
        std::future::poll_fn(|cx| {
            let (poll, gathered) = GATHERING.sync_scope(RefCell::default(), || {
                let poll = work.as_mut().poll(cx);
                (poll, GATHERING.with(RefCell::take))
            });
            if !gathered.is_empty() {
                self.send_together(gathered);
            }
            poll
        })
        .await;
    }
}

#[cfg(test)]
mod tests;
