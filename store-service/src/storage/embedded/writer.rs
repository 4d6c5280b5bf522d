//! The writer thread: batches of operations applied to the engine and made durable with one
//! sync (group commit), each answered after its batch committed; the record rules applied to
//! the tables.

use std::sync::atomic::{AtomicU64, Ordering};

use idempotency_wire::{
    AbandonRequest, AcquireRequest, AcquireResponse, CheckpointRequest, CompleteRequest,
    OutcomeUnknownRequest, RecordId, ReleaseRequest,
};

use super::StorageError;
use crate::record::{
    apply_abandon, apply_checkpoint, apply_complete, apply_outcome_unknown, apply_release, check_deadline,
    decide_acquire, identity_key, Record,
};
use tokio::sync::{mpsc, oneshot};

#[allow(clippy::wildcard_imports)] // the engine seam and the embedded store's types
use super::*;

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
pub(super) struct CommitTally {
    pub(super) commits: AtomicU64,
    pub(super) operations: AtomicU64,
    /// Time spent making those commits durable (the engine's write and sync), in nanoseconds.
    pub(super) sync_nanos: AtomicU64,
}

pub(super) enum Op {
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
/// [`super::Storage::together`]'s work, which go into the same commit.
#[allow(clippy::large_enum_variant)] // `One` is the common case; boxing it would allocate per operation
pub(super) enum Submission {
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

/// How to answer one operation once its batch has committed (or failed).
pub(super) type Reply = Box<dyn FnOnce(Result<(), StorageError>) + Send>;

pub(super) fn writer_loop(
    engine: &dyn Engine,
    tally: &CommitTally,
    submissions: &mut mpsc::Receiver<Submission>,
) {
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

pub(super) fn fail(op: Op) -> Reply {
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
pub(super) fn after_commit<T: Send + 'static>(
    tx: oneshot::Sender<Result<T, StorageError>>,
    result: Result<T, StorageError>,
) -> Reply {
    Box::new(move |commit: Result<(), StorageError>| {
        let _ = tx.send(commit.and(result));
    })
}

pub(super) fn decode(bytes: &[u8]) -> Result<Record, StorageError> {
    serde_json::from_slice::<Record>(bytes).map_err(|e| StorageError::Corrupt(e.to_string()))
}

pub(super) fn load(tables: &dyn BatchTables, key: &str) -> Result<Option<Record>, StorageError> {
    tables.get(key)?.map(|bytes| decode(&bytes)).transpose()
}

pub(super) fn save(
    tables: &mut dyn BatchTables,
    key: &str,
    previous: Option<&Record>,
    record: &Record,
) -> Result<(), StorageError> {
    let bytes = serde_json::to_vec(record).map_err(|e| StorageError::Corrupt(e.to_string()))?;
    tables.put(key, &bytes, record.expires_ms, previous.map(|r| r.expires_ms))
}

pub(super) fn remove(tables: &mut dyn BatchTables, key: &str) -> Result<bool, StorageError> {
    let Some(old) = load(tables, key)? else {
        return Ok(false);
    };
    tables.delete(key, old.expires_ms)?;
    Ok(true)
}

/// Apply a holder rule (complete/release/checkpoint) to the stored record.
pub(super) fn update(
    tables: &mut dyn BatchTables,
    id: &RecordId,
    rule: impl FnOnce(Option<Record>) -> Result<Record, StorageError>,
) -> Result<(), StorageError> {
    let key = identity_key(id);
    let previous = load(tables, &key)?;
    let updated = rule(previous.clone())?;
    save(tables, &key, previous.as_ref(), &updated)
}

pub(super) fn apply(tables: &mut dyn BatchTables, op: Op) -> Reply {
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

pub(super) fn sweep(tables: &mut dyn BatchTables, now_ms: u64, limit: u64) -> Result<u64, StorageError> {
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
pub(super) fn cursor_key<'a>(start: &'a str, prefix: &str) -> Option<&'a str> {
    (start != prefix).then_some(start)
}
