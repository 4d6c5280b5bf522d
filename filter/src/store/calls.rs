//! The store calls a request makes, built in one place: the acquire, and the holder writes
//! (`complete`, `release`, `outcome-unknown`) and `abandon` that must reach the store even when
//! the stream ends first (they carry what the root context needs to retry them).

use std::time::Duration;

use idempotency_wire::{
    paths, AbandonRequest, AcquireRequest, CompleteRequest, OutcomeUnknownRequest, RecordId, ReleaseRequest,
    StoredResponse,
};

use crate::config::RecordMode;
use crate::reply::cache::RequestMatch;
use crate::reply::outcome::UnknownReason;
use crate::store::background::BackgroundCall;
use idempotency_wire::Lock;

/// A request that holds the lock.
#[derive(Debug, Clone)]
pub struct Held {
    pub(crate) id: RecordId,
    pub(crate) lock: Lock,
    /// The request, to cache the completed record under.
    pub(crate) request: RequestMatch,
    /// Host time when the lock expires; holder writes are not retried past it.
    pub(crate) lock_expires_at: Duration,
    /// A gRPC request: its `grpc-status` decides store vs release.
    pub(crate) grpc: bool,
    /// Whether the response waits for its record to be written.
    pub(crate) record_mode: RecordMode,
}

/// How long after an abandoned acquire's deadline a "nothing to release" answer is believed:
/// an acquire still queued inside the store is decided (and refused) by then.
pub const ABANDON_SETTLE: Duration = Duration::from_secs(5);
/// How long an abandon is retried while the store is unreachable.
pub const ABANDON_RETRY_WINDOW: Duration = Duration::from_secs(60);

/// A holder write: what to send, and until when it is worth retrying (the lock's expiry: after
/// it, the write would be refused anyway).
#[derive(Debug, Clone)]
pub struct HolderWrite {
    /// Store path.
    pub path: &'static str,
    /// For logs: `complete`, `release` or `outcome-unknown`.
    pub operation: &'static str,
    /// JSON body.
    pub body: Vec<u8>,
    /// Host time when the lock expires.
    pub retry_until: Duration,
    /// A `complete` the store refuses as too large (413) becomes this `outcome-unknown` body:
    /// the upstream ran, so the lock must stay, with the reason on the record.
    pub if_too_large: Option<Vec<u8>>,
}

impl HolderWrite {
    /// The same write, made from the root context with retries.
    pub fn in_background(self) -> BackgroundCall {
        let fallback = self
            .if_too_large
            .map(|body| BackgroundCall::retried(paths::OUTCOME_UNKNOWN, body, self.retry_until));
        BackgroundCall::retried(self.path, self.body, self.retry_until).if_too_large(fallback)
    }

    /// The same write, sent once from the root context (shadow: nothing is guaranteed, so
    /// nothing is retried and no fallback is sent).
    pub fn once(self) -> BackgroundCall {
        BackgroundCall::once(self.path, self.body)
    }

    /// What to send instead when the store refused this write as too large: the
    /// `outcome-unknown` that keeps the lock, retried until the lock expires.
    pub fn too_large_fallback(&self) -> Option<BackgroundCall> {
        self.if_too_large
            .clone()
            .map(|body| BackgroundCall::retried(paths::OUTCOME_UNKNOWN, body, self.retry_until))
    }
}

/// Milliseconds of a duration, saturating.
pub fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Everything an acquire needs beyond the record identity.
#[derive(Debug, Clone)]
pub struct AcquireParams<'a> {
    pub fingerprint: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub lock_timeout: Duration,
    pub retention: Duration,
    pub attempt_id: &'a str,
    /// Host time (since the Unix epoch) after which the proxy no longer waits.
    pub deadline: Duration,
    pub wait: Duration,
    /// gRPC: ask for a replay ticket, should the record be completed.
    pub replay_ticket: bool,
}

/// The acquire body.
pub fn acquire(id: &RecordId, params: &AcquireParams<'_>) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(&AcquireRequest {
        id: id.clone(),
        fingerprint: params.fingerprint.to_owned(),
        method: params.method.to_owned(),
        path: params.path.to_owned(),
        lock_timeout_ms: millis(params.lock_timeout),
        retention_ms: millis(params.retention),
        attempt_id: params.attempt_id.to_owned(),
        deadline_ms: Some(millis(params.deadline)),
        wait_ms: millis(params.wait),
        replay_ticket: params.replay_ticket,
    })
}

/// Store `response` as the record's result.
pub fn complete(
    held: &Held,
    response: StoredResponse,
    retention: Duration,
) -> Result<HolderWrite, serde_json::Error> {
    let body = serde_json::to_vec(&CompleteRequest {
        id: held.id.clone(),
        record_id: held.lock.record_id.clone(),
        fencing_token: held.lock.fencing_token,
        attempt_id: held.lock.attempt_id.clone(),
        response,
        retention_ms: millis(retention),
    })?;
    let if_too_large = outcome_unknown(held, UnknownReason::RecordRefusedByStore)?.body;
    Ok(HolderWrite {
        path: paths::COMPLETE,
        operation: "complete",
        body,
        retry_until: held.lock_expires_at,
        if_too_large: Some(if_too_large),
    })
}

/// Give the lock back: the upstream said "retry", or the request never left Envoy.
pub fn release(held: &Held) -> Result<HolderWrite, serde_json::Error> {
    let body = serde_json::to_vec(&ReleaseRequest {
        id: held.id.clone(),
        record_id: held.lock.record_id.clone(),
        fencing_token: held.lock.fencing_token,
        attempt_id: held.lock.attempt_id.clone(),
    })?;
    Ok(HolderWrite {
        path: paths::RELEASE,
        operation: "release",
        body,
        retry_until: held.lock_expires_at,
        if_too_large: None,
    })
}

/// Keep the lock until it expires and note why the outcome is unknown.
pub fn outcome_unknown(held: &Held, reason: UnknownReason) -> Result<HolderWrite, serde_json::Error> {
    let body = serde_json::to_vec(&OutcomeUnknownRequest {
        id: held.id.clone(),
        record_id: held.lock.record_id.clone(),
        fencing_token: held.lock.fencing_token,
        attempt_id: held.lock.attempt_id.clone(),
        reason: reason.as_str().to_owned(),
    })?;
    Ok(HolderWrite {
        path: paths::OUTCOME_UNKNOWN,
        operation: "outcome-unknown",
        body,
        retry_until: held.lock_expires_at,
        if_too_large: None,
    })
}

/// Abandon the acquire of `attempt_id`, whose answer the proxy stopped waiting for at `deadline`.
pub fn abandon(
    id: &RecordId,
    attempt_id: &str,
    deadline: Duration,
) -> Result<BackgroundCall, serde_json::Error> {
    let body = serde_json::to_vec(&AbandonRequest {
        id: id.clone(),
        attempt_id: attempt_id.to_owned(),
    })?;
    Ok(BackgroundCall::abandon(
        paths::ABANDON,
        body,
        deadline.saturating_add(ABANDON_SETTLE),
        deadline.saturating_add(ABANDON_RETRY_WINDOW),
    ))
}
