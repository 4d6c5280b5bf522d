//! How records look in MongoDB: the BSON documents (responses as binary, times as dates,
//! tokens as signed 64-bit), conversions both ways, and the small helpers the operations share.

use idempotency_wire::{AcquireResponse, Lock, RecordId, StoredResponse};
use mongodb::bson::{doc, spec::BinarySubtype, Binary, DateTime, Document};
use mongodb::error::{ErrorKind, WriteFailure};
use serde::{Deserialize, Serialize};

use super::StorageError;
use crate::record::{Checkpoint, OutcomeUnknown, Record, RecordState};

pub(super) fn unavailable(e: impl std::fmt::Display) -> StorageError {
    StorageError::Unavailable(e.to_string())
}

pub(super) fn corrupt(e: impl std::fmt::Display) -> StorageError {
    StorageError::Corrupt(e.to_string())
}

pub(super) fn datetime(ms: u64) -> DateTime {
    DateTime::from_millis(i64::try_from(ms).unwrap_or(i64::MAX))
}

pub(super) fn millis(at: DateTime) -> u64 {
    u64::try_from(at.timestamp_millis()).unwrap_or(0)
}

pub(super) fn token(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// A stored response as BSON: the body is BSON binary, not base64.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct ResponseDoc {
    pub(super) status: i32,
    pub(super) headers: Vec<(String, String)>,
    pub(super) body: Binary,
    pub(super) body_omitted: bool,
    #[serde(default)]
    pub(super) trailers: Vec<(String, String)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct OutcomeUnknownDoc {
    pub(super) reason: String,
    pub(super) at: DateTime,
    pub(super) fencing_token: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct CheckpointDoc {
    pub(super) phase: String,
    pub(super) at: DateTime,
    pub(super) fencing_token: i64,
}

/// The document shape of one record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct RecordDoc {
    pub(super) record_id: String,
    pub(super) service: String,
    pub(super) scope: String,
    pub(super) key: String,
    pub(super) fingerprint: String,
    pub(super) method: String,
    pub(super) path: String,
    pub(super) state: RecordState,
    pub(super) fencing_token: i64,
    pub(super) locked_until: DateTime,
    #[serde(default)]
    pub(super) attempt_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) outcome_unknown: Option<OutcomeUnknownDoc>,
    #[serde(default)]
    pub(super) retention_ms: i64,
    #[serde(default)]
    pub(super) checkpoints: Vec<CheckpointDoc>,
    #[serde(default)]
    pub(super) response: Option<ResponseDoc>,
    pub(super) created_at: DateTime,
    pub(super) expires_at: DateTime,
}

impl From<&StoredResponse> for ResponseDoc {
    fn from(r: &StoredResponse) -> ResponseDoc {
        ResponseDoc {
            status: i32::from(r.status),
            headers: r.headers.clone(),
            body: Binary {
                subtype: BinarySubtype::Generic,
                bytes: r.body.clone(),
            },
            body_omitted: r.body_omitted,
            trailers: r.trailers.clone(),
        }
    }
}

impl From<&Record> for RecordDoc {
    fn from(r: &Record) -> RecordDoc {
        RecordDoc {
            record_id: r.record_id.clone(),
            service: r.id.service.clone(),
            scope: r.id.scope.clone(),
            key: r.id.key.clone(),
            fingerprint: r.fingerprint.clone(),
            method: r.method.clone(),
            path: r.path.clone(),
            state: r.state,
            fencing_token: token(r.fencing_token),
            locked_until: datetime(r.locked_until_ms),
            attempt_id: r.attempt_id.clone(),
            outcome_unknown: r.outcome_unknown.as_ref().map(|o| OutcomeUnknownDoc {
                reason: o.reason.clone(),
                at: datetime(o.at_ms),
                fencing_token: token(o.fencing_token),
            }),
            retention_ms: token(r.retention_ms),
            checkpoints: r
                .checkpoints
                .iter()
                .map(|c| CheckpointDoc {
                    phase: c.phase.clone(),
                    at: datetime(c.at_ms),
                    fencing_token: token(c.fencing_token),
                })
                .collect(),
            response: r.response.as_ref().map(ResponseDoc::from),
            created_at: datetime(r.created_ms),
            expires_at: datetime(r.expires_ms),
        }
    }
}

impl TryFrom<RecordDoc> for Record {
    type Error = StorageError;

    fn try_from(d: RecordDoc) -> Result<Record, StorageError> {
        let response = d
            .response
            .map(|r| -> Result<StoredResponse, StorageError> {
                Ok(StoredResponse {
                    status: u16::try_from(r.status).map_err(corrupt)?,
                    headers: r.headers,
                    body: r.body.bytes,
                    body_omitted: r.body_omitted,
                    trailers: r.trailers,
                })
            })
            .transpose()?;
        Ok(Record {
            record_id: d.record_id,
            id: RecordId {
                service: d.service,
                scope: d.scope,
                key: d.key,
            },
            fingerprint: d.fingerprint,
            method: d.method,
            path: d.path,
            state: d.state,
            fencing_token: u64::try_from(d.fencing_token).map_err(corrupt)?,
            locked_until_ms: millis(d.locked_until),
            attempt_id: d.attempt_id,
            outcome_unknown: d.outcome_unknown.map(|o| OutcomeUnknown {
                reason: o.reason,
                at_ms: millis(o.at),
                fencing_token: u64::try_from(o.fencing_token).unwrap_or(0),
            }),
            retention_ms: u64::try_from(d.retention_ms).unwrap_or(0),
            checkpoints: d
                .checkpoints
                .into_iter()
                .map(|c| Checkpoint {
                    phase: c.phase,
                    at_ms: millis(c.at),
                    fencing_token: u64::try_from(c.fencing_token).unwrap_or(0),
                })
                .collect(),
            response,
            created_ms: millis(d.created_at),
            expires_ms: millis(d.expires_at),
        })
    }
}

pub(super) fn identity(id: &RecordId) -> Document {
    doc! { "service": &id.service, "scope": &id.scope, "key": &id.key }
}

pub(super) fn is_duplicate_key(error: &mongodb::error::Error) -> bool {
    match error.kind.as_ref() {
        ErrorKind::Write(WriteFailure::WriteError(e)) => e.code == 11000,
        ErrorKind::Command(e) => e.code == 11000,
        _ => false,
    }
}

pub(super) fn acquired(
    record: &Record,
    previous: Option<idempotency_wire::PreviousAttempt>,
) -> AcquireResponse {
    AcquireResponse::Acquired(Lock {
        record_id: record.record_id.clone(),
        fencing_token: record.fencing_token,
        attempt_id: record.attempt_id.clone(),
        resumed: previous.is_some(),
        recovery_point: record.recovery_point(),
        previous_attempt: previous,
    })
}
