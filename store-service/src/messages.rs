//! Consumer deduplication (CloudEvents / Kafka / NATS): message claims are records too.
//!
//! A message maps onto a record identity — service; scope `message:<len>:<topic>:<group>` (the
//! length prefix keeps any topic/group pair distinct); key = message id — with a constant
//! fingerprint. Claim, complete and release are then exactly acquire, complete and release, with
//! the same atomicity, fencing, lock expiry (a crashed consumer's claim is taken over) and
//! retention on both backends.

use idempotency_wire::{
    AcquireRequest, AcquireResponse, ClaimRequest, ClaimResponse, CompleteRequest, MessageDoneRequest,
    MessageId, RecordId, ReleaseRequest, StoredResponse,
};

use crate::storage::StorageError;

/// Every message record's scope starts with this; the proxy API refuses such scopes (filters
/// never make one: theirs start with `header:`, `auth:`, `peer:` or `jwt:`, or are empty).
pub const SCOPE_PREFIX: &str = "message:";

/// Header on a message record's stored response that says how the message ended, when it did not
/// end by its handler succeeding (`dead_lettered`).
pub const OUTCOME_HEADER: &str = "idempotency-message-outcome";

/// Fingerprint of every message record (a message id has no parameters to compare).
pub const MESSAGE_FINGERPRINT: &str = "message";

/// The record identity of a message.
pub fn record_id(id: &MessageId) -> RecordId {
    RecordId {
        service: id.service.clone(),
        scope: format!(
            "{SCOPE_PREFIX}{}:{}:{}",
            id.topic.len(),
            id.topic,
            id.consumer_group
        ),
        key: id.message_id.clone(),
    }
}

/// The acquire behind a claim.
pub fn acquire_request(claim: &ClaimRequest) -> AcquireRequest {
    AcquireRequest {
        id: record_id(&claim.id),
        fingerprint: MESSAGE_FINGERPRINT.to_owned(),
        method: "CONSUME".to_owned(),
        path: claim.id.topic.clone(),
        lock_timeout_ms: claim.lock_timeout_ms,
        retention_ms: claim.retention_ms,
        // The claim's holder proof: random, returned only to this claimant.
        attempt_id: uuid::Uuid::new_v4().simple().to_string(),
        deadline_ms: None,
        wait_ms: 0,
        replay_ticket: false,
    }
}

/// The claim answer for an acquire answer.
pub fn claim_response(response: AcquireResponse) -> Result<ClaimResponse, StorageError> {
    match response {
        AcquireResponse::Acquired(lock) => Ok(ClaimResponse::Claimed {
            record_id: lock.record_id,
            fencing_token: lock.fencing_token,
            attempt_id: lock.attempt_id,
        }),
        AcquireResponse::Completed { .. } => Ok(ClaimResponse::Duplicate),
        AcquireResponse::InProgress {
            lock_remaining_ms, ..
        } => Ok(ClaimResponse::InProgress { lock_remaining_ms }),
        AcquireResponse::Mismatch => Err(StorageError::Corrupt(
            "a message record has a request fingerprint; the key space is shared with HTTP records".into(),
        )),
    }
}

/// The complete behind a message completion (no response to store). Without a
/// `retention_ms` the record keeps the retention its claim asked for: a completion that named
/// none must never make the dedup record expire at once.
pub fn complete_request(done: &MessageDoneRequest) -> CompleteRequest {
    // A dead-lettered message's record says where it went and why (admin API, `idempotencyctl`).
    let (headers, body) = match &done.dead_letter {
        None => (Vec::new(), Vec::new()),
        Some(note) => (
            vec![
                (OUTCOME_HEADER.to_owned(), "dead_lettered".to_owned()),
                ("content-type".to_owned(), "application/json".to_owned()),
            ],
            serde_json::to_vec(note).unwrap_or_default(),
        ),
    };
    CompleteRequest {
        id: record_id(&done.id),
        record_id: done.record_id.clone(),
        fencing_token: done.fencing_token,
        attempt_id: done.attempt_id.clone(),
        response: StoredResponse {
            status: 200,
            headers,
            body,
            body_omitted: false,
            trailers: Vec::new(),
        },
        retention_ms: done.retention_ms.unwrap_or(0),
    }
}

/// The release behind a failed handler.
pub fn release_request(done: &MessageDoneRequest) -> ReleaseRequest {
    ReleaseRequest {
        id: record_id(&done.id),
        record_id: done.record_id.clone(),
        fencing_token: done.fencing_token,
        attempt_id: done.attempt_id.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(topic: &str, group: &str) -> MessageId {
        MessageId {
            service: "orders".into(),
            topic: topic.into(),
            consumer_group: group.into(),
            message_id: "m1".into(),
        }
    }

    #[test]
    fn topic_and_group_cannot_be_confused() {
        assert_ne!(record_id(&id("a:b", "c")).scope, record_id(&id("a", "b:c")).scope);
        assert_ne!(record_id(&id("orders", "g1")), record_id(&id("orders", "g2")));
    }

    #[test]
    fn completed_claims_are_duplicates() {
        let response = AcquireResponse::Completed {
            response: complete_request(&MessageDoneRequest {
                id: id("t", "g"),
                record_id: "r".into(),
                fencing_token: 1,
                attempt_id: "a".into(),
                retention_ms: Some(1),
                dead_letter: None,
            })
            .response,
            expires_at_ms: None,
            replay_ticket: None,
            record_id: None,
        };
        assert_eq!(claim_response(response).unwrap(), ClaimResponse::Duplicate);
    }
}
