//! Storage backends behind one trait: `embedded` (fjall or redb, the default) and `mongodb`.

use async_trait::async_trait;
use futures::future::BoxFuture;
use idempotency_wire::{
    AbandonRequest, AcquireRequest, AcquireResponse, CheckpointRequest, CompleteRequest,
    OutcomeUnknownRequest, RecordId, ReleaseRequest,
};

use crate::record::Record;

pub mod embedded;
pub mod mongo;

#[cfg(any(test, feature = "testing"))]
pub mod test_mongo;

#[cfg(test)]
pub mod contract;

pub use crate::record::StorageError;

/// Which backend, for metrics labels.
pub type BackendName = &'static str;

/// Operations every backend provides with identical semantics (see `record.rs` for the rules).
#[async_trait]
pub trait Storage: Send + Sync + 'static {
    /// Backend name for metrics and logs.
    fn name(&self) -> BackendName;
    /// Atomically insert, take over, or report the record's state.
    async fn acquire(&self, request: &AcquireRequest, now_ms: u64) -> Result<AcquireResponse, StorageError>;
    /// Store the holder's response.
    async fn complete(&self, request: &CompleteRequest, now_ms: u64) -> Result<(), StorageError>;
    /// Give the holder's lock back.
    async fn release(&self, request: &ReleaseRequest, now_ms: u64) -> Result<(), StorageError>;
    /// The holder cannot tell whether the upstream ran: keep the lock, note why.
    async fn outcome_unknown(&self, request: &OutcomeUnknownRequest, now_ms: u64)
        -> Result<(), StorageError>;
    /// Release the lock only if the named attempt holds it; true when it did.
    async fn abandon(&self, request: &AbandonRequest, now_ms: u64) -> Result<bool, StorageError>;
    /// Record a finished phase.
    async fn checkpoint(&self, request: &CheckpointRequest, now_ms: u64) -> Result<(), StorageError>;
    /// Read a live record (admin).
    async fn get(&self, id: &RecordId, now_ms: u64) -> Result<Option<Record>, StorageError>;
    /// Admin: live in-progress records of `service` created at or before `created_before_ms`,
    /// at most `limit`, after the opaque `cursor` of an earlier page; returns the page and the
    /// cursor of the next one (`None` at the end).
    async fn list_in_progress(
        &self,
        service: &str,
        created_before_ms: u64,
        limit: usize,
        cursor: Option<&str>,
        now_ms: u64,
    ) -> Result<(Vec<Record>, Option<String>), StorageError>;
    /// Delete a record (admin); true when one existed.
    async fn purge(&self, id: &RecordId) -> Result<bool, StorageError>;
    /// Delete records whose retention ran out, at most `limit` of them; returns how many.
    /// Callers repeat until fewer than `limit` are deleted, so no single step stalls the store.
    async fn sweep_expired(&self, now_ms: u64, limit: u64) -> Result<u64, StorageError>;
    /// Number of stored records (live or awaiting the sweep).
    async fn record_count(&self) -> Result<u64, StorageError>;
    /// Ok when the backend can serve requests.
    async fn ready(&self) -> Result<(), StorageError>;
    /// Ok while the process can go on serving: the liveness check (`/healthz`). An embedded
    /// store whose journal sync failed cannot (it refuses every write until restarted), so an
    /// orchestrator should restart it; a MongoDB outage is no reason to restart a replica.
    fn live(&self) -> Result<(), StorageError> {
        Ok(())
    }
    /// Bytes of written data the backend holds in memory until it flushes them (the embedded
    /// engine's memtables); `None` when it keeps none (MongoDB).
    fn write_buffer_bytes(&self) -> Option<u64> {
        None
    }
    /// Durable commits made so far and the operations they carried (the embedded engine's
    /// group commit); `None` when the backend commits each operation on its own (MongoDB).
    fn group_commits(&self) -> Option<GroupCommits> {
        None
    }
    /// Run `work`, operations started together (the calls of one `/v1/batch`), so that the
    /// writes it submits in one go share one durable commit where the backend commits in groups
    /// (the embedded writer). The default just runs it.
    async fn together<'a>(&'a self, work: BoxFuture<'a, ()>) {
        work.await;
    }
}

/// Totals of the embedded writer's durable commits since the store started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupCommits {
    /// Commits that synced written data to the disk.
    pub commits: u64,
    /// Operations those commits carried (reads that ride along included).
    pub operations: u64,
    /// Time spent making those commits durable (the engine's write and sync), in nanoseconds.
    pub sync_nanos: u64,
}
