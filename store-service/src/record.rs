//! The idempotency record and the pure rules that move it between states.
//!
//! Backends call these rules inside their own atomic step (the embedded writer thread) or
//! express the same rules as a server-side update (MongoDB), so both behave identically; the
//! shared contract tests in `storage::contract` hold them to it.

use idempotency_wire::{
    AbandonRequest, AcquireRequest, AcquireResponse, CheckpointRequest, CompleteRequest, Lock,
    OutcomeUnknownRequest, PreviousAttempt, RecordId, ReleaseRequest, StoredResponse,
};
use serde::{Deserialize, Serialize};

/// Lifecycle of a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordState {
    /// A holder is (or was, until `locked_until_ms`) executing the request.
    InProgress,
    /// The response is stored and replayed to every retry.
    Completed,
}

/// A finished phase of a multi-phase operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Phase name chosen by the service, e.g. `inventory_reserved`.
    pub phase: String,
    /// When it was recorded (ms since the Unix epoch).
    pub at_ms: u64,
    /// Fencing token of the holder that recorded it.
    pub fencing_token: u64,
}

/// Why the holder could not tell whether the upstream executed the request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutcomeUnknown {
    /// Reason reported by the proxy, e.g. `downstream_disconnect` or `route_timeout`.
    pub reason: String,
    /// When it was reported (ms since the Unix epoch).
    pub at_ms: u64,
    /// Fencing token of the attempt it concerns.
    pub fencing_token: u64,
}

/// One idempotency record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Opaque id, stable across takeovers.
    pub record_id: String,
    /// Identity.
    #[serde(flatten)]
    pub id: RecordId,
    /// Hex SHA-256 of the first request's parameters.
    pub fingerprint: String,
    /// Method of the first request.
    pub method: String,
    /// Path of the first request.
    pub path: String,
    /// Current state.
    pub state: RecordState,
    /// Increases on every acquire and takeover.
    pub fencing_token: u64,
    /// The lock is held until then (ms since the Unix epoch); 0 when released.
    pub locked_until_ms: u64,
    /// Random id of the attempt that holds (or last held) the lock.
    #[serde(default)]
    pub attempt_id: String,
    /// Set when the current holder forwarded the request but cannot know whether it ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome_unknown: Option<OutcomeUnknown>,
    /// Retention the first acquire asked for (used when a completion names none).
    #[serde(default)]
    pub retention_ms: u64,
    /// Phases finished so far, oldest first.
    #[serde(default)]
    pub checkpoints: Vec<Checkpoint>,
    /// Stored response once completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<StoredResponse>,
    /// Creation time.
    pub created_ms: u64,
    /// The record may be deleted after this time.
    pub expires_ms: u64,
}

/// A record identity as one string, length-prefixed so no service/scope/key can collide with
/// another (storage keys, per-key wake-ups).
pub fn identity_key(id: &RecordId) -> String {
    format!(
        "{}:{}|{}:{}|{}",
        id.service.len(),
        id.service,
        id.scope.len(),
        id.scope,
        id.key
    )
}

impl Record {
    /// Last finished phase, passed upstream as the recovery point.
    pub fn recovery_point(&self) -> Option<String> {
        self.checkpoints.last().map(|c| c.phase.clone())
    }

    /// True when retention has run out.
    pub fn is_expired(&self, now_ms: u64) -> bool {
        self.expires_ms <= now_ms
    }
}

/// Outcome of the acquire rule: what to answer, and the record to write (if anything changes).
#[derive(Debug)]
pub struct AcquireDecision {
    /// Answer for the caller.
    pub response: AcquireResponse,
    /// New state of the record, when it changes.
    pub write: Option<Record>,
}

/// Refuse an acquire that reached the store after the proxy stopped waiting for it: the proxy
/// has answered 503 and may already have sent `abandon`, which found nothing to release.
pub fn check_deadline(request: &AcquireRequest, now_ms: u64) -> Result<(), StorageError> {
    match request.deadline_ms {
        Some(deadline) if now_ms >= deadline => Err(StorageError::DeadlinePassed {
            late_by_ms: now_ms - deadline,
        }),
        _ => Ok(()),
    }
}

/// What a takeover knows of the attempt before it: a released lock says it did not run (or
/// failed retryably); an expired one says nothing.
pub fn previous_attempt(record: &Record) -> PreviousAttempt {
    if record.locked_until_ms == 0 {
        PreviousAttempt::Released
    } else {
        PreviousAttempt::Unknown
    }
}

/// The acquire rule: insert, take over a stale lock, or report completed / in progress / mismatch.
pub fn decide_acquire(
    existing: Option<Record>,
    request: &AcquireRequest,
    now_ms: u64,
    new_id: impl FnOnce() -> String,
) -> AcquireDecision {
    let expires_ms = now_ms.saturating_add(request.retention_ms.max(request.lock_timeout_ms));
    let locked_until_ms = now_ms.saturating_add(request.lock_timeout_ms);
    // A record whose retention ran out counts as absent, but its token still only goes up.
    let (existing, first_token) = match existing {
        Some(r) if r.is_expired(now_ms) => (None, r.fencing_token.saturating_add(1)),
        other => (other, 1),
    };
    let Some(mut record) = existing else {
        let record = Record {
            record_id: new_id(),
            id: request.id.clone(),
            fingerprint: request.fingerprint.clone(),
            method: request.method.clone(),
            path: request.path.clone(),
            state: RecordState::InProgress,
            fencing_token: first_token,
            locked_until_ms,
            attempt_id: request.attempt_id.clone(),
            outcome_unknown: None,
            retention_ms: request.retention_ms,
            checkpoints: Vec::new(),
            response: None,
            created_ms: now_ms,
            expires_ms,
        };
        return AcquireDecision {
            response: AcquireResponse::Acquired(Lock {
                record_id: record.record_id.clone(),
                fencing_token: record.fencing_token,
                attempt_id: record.attempt_id.clone(),
                resumed: false,
                recovery_point: None,
                previous_attempt: None,
            }),
            write: Some(record),
        };
    };
    if record.fingerprint != request.fingerprint {
        return AcquireDecision {
            response: AcquireResponse::Mismatch,
            write: None,
        };
    }
    match record.state {
        RecordState::Completed => AcquireDecision {
            response: AcquireResponse::Completed {
                response: record.response.clone().unwrap_or(StoredResponse {
                    status: 500,
                    headers: Vec::new(),
                    body: Vec::new(),
                    body_omitted: true,
                    trailers: Vec::new(),
                }),
                expires_at_ms: Some(record.expires_ms),
                replay_ticket: None,
                record_id: Some(record.record_id.clone()),
            },
            write: None,
        },
        RecordState::InProgress if record.locked_until_ms > now_ms => AcquireDecision {
            response: AcquireResponse::InProgress {
                lock_remaining_ms: record.locked_until_ms - now_ms,
                outcome_unknown: record.outcome_unknown.is_some(),
            },
            write: None,
        },
        RecordState::InProgress => {
            // Stale or released lock: take it over, fencing out the previous holder.
            let previous = previous_attempt(&record);
            record.fencing_token = record.fencing_token.saturating_add(1);
            record.locked_until_ms = locked_until_ms;
            record.expires_ms = record.expires_ms.max(expires_ms);
            record.attempt_id = request.attempt_id.clone();
            record.outcome_unknown = None;
            AcquireDecision {
                response: AcquireResponse::Acquired(Lock {
                    record_id: record.record_id.clone(),
                    fencing_token: record.fencing_token,
                    attempt_id: record.attempt_id.clone(),
                    resumed: true,
                    recovery_point: record.recovery_point(),
                    previous_attempt: Some(previous),
                }),
                write: Some(record),
            }
        }
    }
}

/// A write that only the lock's holder may make: it names the record and proves the holding.
pub trait HolderWrite {
    /// (identity, record id, fencing token, attempt id) as presented.
    fn holder(&self) -> (&RecordId, &str, u64, &str);
}

macro_rules! holder_write {
    ($($request:ty),*) => {$(
        impl HolderWrite for $request {
            fn holder(&self) -> (&RecordId, &str, u64, &str) {
                (&self.id, &self.record_id, self.fencing_token, &self.attempt_id)
            }
        }
    )*};
}

holder_write!(
    CompleteRequest,
    ReleaseRequest,
    OutcomeUnknownRequest,
    CheckpointRequest
);

/// Check that the request's (`record_id`, `token`) names the current holder and the record is
/// still in progress. The record id makes tokens unique per record incarnation: after a purge or
/// expiry the identity gets a new record id, so an abandoned attempt's token can never match it.
fn check_holder(
    record: Option<Record>,
    request: &impl HolderWrite,
    now_ms: u64,
) -> Result<Record, StorageError> {
    let (id, record_id, token, attempt_id) = request.holder();
    let record = record
        .filter(|r| !r.is_expired(now_ms))
        .ok_or_else(|| StorageError::NotFound(id.clone()))?;
    // The attempt id is random and only ever given to the attempt that acquired: record id and
    // token can be known or guessed (tokens are sequential), the attempt id cannot.
    if record.record_id != record_id
        || record.fencing_token != token
        || !bool::from(subtle::ConstantTimeEq::ct_eq(
            record.attempt_id.as_bytes(),
            attempt_id.as_bytes(),
        ))
        || record.state != RecordState::InProgress
    {
        return Err(StorageError::StaleToken {
            presented: token,
            current: record.fencing_token,
        });
    }
    Ok(record)
}

/// The complete rule: only the current holder may store the response.
pub fn apply_complete(
    record: Option<Record>,
    request: &CompleteRequest,
    now_ms: u64,
) -> Result<Record, StorageError> {
    let mut record = check_holder(record, request, now_ms)?;
    record.state = RecordState::Completed;
    record.locked_until_ms = 0;
    record.outcome_unknown = None;
    record.response = Some(request.response.clone());
    record.expires_ms = completed_expiry(&record, request.retention_ms, now_ms);
    Ok(record)
}

/// Expiry of a completed record: `retention_ms` from now, or the retention its acquire asked
/// for when the completion names none (never earlier than the record already lives).
pub fn completed_expiry(record: &Record, retention_ms: u64, now_ms: u64) -> u64 {
    match (retention_ms, record.retention_ms) {
        (0, 0) => record.expires_ms,
        (0, asked) => now_ms.saturating_add(asked),
        (given, _) => now_ms.saturating_add(given),
    }
}

/// The release rule: the holder gives the lock back; checkpoints stay for the next attempt.
///
/// The record is kept (not deleted) so the fencing token keeps increasing: a deleted record
/// would restart at token 1 and let the old holder's late write through.
pub fn apply_release(
    record: Option<Record>,
    request: &ReleaseRequest,
    now_ms: u64,
) -> Result<Record, StorageError> {
    let mut record = check_holder(record, request, now_ms)?;
    record.locked_until_ms = 0;
    Ok(record)
}

/// The outcome-unknown rule: the holder says it cannot know whether the upstream ran. The lock
/// stays until it expires; the record says why.
pub fn apply_outcome_unknown(
    record: Option<Record>,
    request: &OutcomeUnknownRequest,
    now_ms: u64,
) -> Result<Record, StorageError> {
    let mut record = check_holder(record, request, now_ms)?;
    record.outcome_unknown = Some(OutcomeUnknown {
        reason: request.reason.clone(),
        at_ms: now_ms,
        fencing_token: request.fencing_token,
    });
    Ok(record)
}

/// The abandon rule: release the lock only if the abandoned attempt holds it right now.
/// Returns the record to write, or `None` when that attempt holds nothing.
pub fn apply_abandon(record: Option<Record>, request: &AbandonRequest, now_ms: u64) -> Option<Record> {
    let mut record = record.filter(|r| {
        !r.is_expired(now_ms)
            && r.state == RecordState::InProgress
            && !request.attempt_id.is_empty()
            // Constant time, like every holder check: the attempt id is the holder's secret.
            && bool::from(subtle::ConstantTimeEq::ct_eq(
                r.attempt_id.as_bytes(),
                request.attempt_id.as_bytes(),
            ))
            && r.locked_until_ms > now_ms
    })?;
    record.locked_until_ms = 0;
    Some(record)
}

/// The checkpoint rule: the holder records a finished phase.
pub fn apply_checkpoint(
    record: Option<Record>,
    request: &CheckpointRequest,
    now_ms: u64,
) -> Result<Record, StorageError> {
    let mut record = check_holder(record, request, now_ms)?;
    record.checkpoints.push(Checkpoint {
        phase: request.phase.clone(),
        at_ms: now_ms,
        fencing_token: request.fencing_token,
    });
    Ok(record)
}

/// Why a storage operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// No live record with that identity.
    #[error("no live record for service {:?}, scope {:?}", .0.service, .0.scope)]
    NotFound(RecordId),
    /// The presented fencing token is not the current holder's (or the record is completed).
    #[error("stale fencing token {presented}; the record is at token {current} or no longer in progress")]
    StaleToken {
        /// Token the caller presented.
        presented: u64,
        /// Token of the record now.
        current: u64,
    },
    /// The acquire arrived after the proxy's deadline for it; the proxy no longer waits.
    #[error("acquire arrived {late_by_ms} ms after the proxy's deadline; refused")]
    DeadlinePassed {
        /// How late it was.
        late_by_ms: u64,
    },
    /// The backend could not be reached or failed; the caller may retry.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// Stored data could not be decoded.
    #[error("stored record is corrupt: {0}")]
    Corrupt(String),
}
