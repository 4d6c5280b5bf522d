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
use std::sync::atomic::Ordering;
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
use crate::record::{identity_key, Record};

mod fjall_engine;
mod redb_engine;
mod writer;

#[allow(clippy::wildcard_imports)] // the writer's operations and batch types
use writer::*;

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
