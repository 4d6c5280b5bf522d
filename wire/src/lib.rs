//! Wire types of the store API (`/v1/...`), shared by the filter and the store service.
//!
//! Every request names a record by its identity ([`RecordId`]: service, scope, key). Every write
//! after `acquire` carries the fencing token the acquire returned; the store refuses a stale one,
//! so a holder that lost its lock can never overwrite the new holder's result.
//!
//! Bodies are base64 inside JSON: compact enough for the 1 MiB default limit and safe for
//! arbitrary bytes.

use serde::{Deserialize, Serialize};

/// Largest request body the store accepts.
pub const MAX_STORE_REQUEST_BYTES: usize = 16 * 1024 * 1024;
/// Largest response body the filter may record (`max_response_size`): base64 makes it 4/3 as
/// large, and a `complete` also carries up to 64 KiB of headers and trailers, which all fits in
/// [`MAX_STORE_REQUEST_BYTES`].
pub const MAX_RECORDED_BODY: usize = 8 * 1024 * 1024;
const _: () = assert!(MAX_RECORDED_BODY / 3 * 4 + 4 + 2 * 64 * 1024 + 4096 < MAX_STORE_REQUEST_BYTES);

/// Paths of the store API, relative to the store's base URL.
pub mod paths {
    /// Take the lock for a record, or learn that it is completed, in progress or mismatched.
    pub const ACQUIRE: &str = "/v1/acquire";
    /// Store the response of a holder and mark the record completed.
    pub const COMPLETE: &str = "/v1/complete";
    /// Give up the lock without a stored response; a retry may run again.
    pub const RELEASE: &str = "/v1/release";
    /// The holder cannot know whether the upstream ran: keep the lock until it expires and say why.
    pub const OUTCOME_UNKNOWN: &str = "/v1/outcome-unknown";
    /// The proxy gave up on an acquire: release the lock only if that attempt holds it.
    pub const ABANDON: &str = "/v1/abandon";
    /// Serve a completed record's stored response (status, headers, body, trailers) to the
    /// holder of a replay ticket: how gRPC replays reach stock gRPC clients (Envoy's local
    /// replies cannot carry a gRPC message). Authenticated by the ticket, not a bearer token.
    pub const REPLAY: &str = "/v1/replay";
    /// Record that a phase of a multi-phase operation is done.
    pub const CHECKPOINT: &str = "/v1/checkpoint";
    /// Admin: the store's version, backend, durable-commit health, replay listener, credential
    /// names and clock (`idempotencyctl doctor`).
    pub const INFO: &str = "/v1/info";
    /// Admin: read or purge one record (`/v1/records?service=&scope=&key=`).
    pub const RECORDS: &str = "/v1/records";
    /// Admin: in-progress records of a service, in pages
    /// (`?service=&older_than_ms=&limit=&cursor=`), for finding stuck locks.
    pub const RECORDS_IN_PROGRESS: &str = "/v1/records/in-progress";
    /// Consumer deduplication: claim a message before handling it.
    pub const MESSAGE_CLAIM: &str = "/v1/messages/claim";
    /// Consumer deduplication: the handler succeeded; later claims are duplicates.
    pub const MESSAGE_COMPLETE: &str = "/v1/messages/complete";
    /// Consumer deduplication: the handler failed; a redelivery may run it again.
    pub const MESSAGE_RELEASE: &str = "/v1/messages/release";
    /// Several proxy calls in one round trip ([`crate::BatchRequest`]): each answered as if it
    /// had been made alone. The filter sends the calls that queue up while the store is busy
    /// this way (Envoy spends about as much CPU on one callout as on forwarding a request).
    pub const BATCH: &str = "/v1/batch";
    /// The calls a batch may carry: the proxy's own, never admin or consumer calls.
    pub const BATCHABLE: [&str; 5] = [ACQUIRE, COMPLETE, RELEASE, OUTCOME_UNKNOWN, ABANDON];
}

/// Internal headers the filter sets on a request it forwards upstream.
///
/// Client-sent copies of any header starting with [`headers::INTERNAL_PREFIX`] are removed first.
pub mod headers {
    /// Every internal header starts with this prefix; the filter strips client-sent ones.
    pub const INTERNAL_PREFIX: &str = "x-idempotency-";
    /// Opaque id of the record that holds this request's lock.
    pub const RECORD_ID: &str = "x-idempotency-record-id";
    /// Fencing token to present with checkpoints.
    pub const FENCING_TOKEN: &str = "x-idempotency-fencing-token";
    /// Last completed phase when this request resumes an earlier attempt.
    pub const RECOVERY_POINT: &str = "x-idempotency-recovery-point";
    /// The record identity, so services can checkpoint without re-deriving it.
    pub const SERVICE: &str = "x-idempotency-service";
    /// Scope of the record (caller isolation).
    pub const SCOPE: &str = "x-idempotency-scope";
    /// The validated, unquoted idempotency key.
    pub const KEY: &str = "x-idempotency-key";
    /// On a takeover: what is known of the earlier attempt (`unknown`: it may have executed;
    /// `released`: it did not execute, or failed in a way the upstream said is safe to retry).
    pub const PREVIOUS_ATTEMPT: &str = "x-idempotency-previous-attempt";
    /// The holder's attempt id: presented with checkpoints, it proves this request holds the lock
    /// (record id and fencing token alone are not secret enough: tokens are sequential).
    pub const ATTEMPT_ID: &str = "x-idempotency-attempt-id";
    /// Replay ticket the filter sets on a gRPC replay it routes to the store (`/v1/replay`);
    /// the route to the store matches on this header.
    pub const REPLAY_TICKET: &str = "x-idempotency-replay-ticket";
    /// Response header on every store answer: `api` from the API listener, `replay` from the
    /// replay listener. The filter checks it on a routed gRPC replay (and removes it); a
    /// client that sees it was answered by the store, which a shipped config never allows.
    pub const ANSWERED_BY: &str = "x-idempotency-store";
    /// Every internal header the filter sets.
    pub const ALL: [&str; 9] = [
        RECORD_ID,
        FENCING_TOKEN,
        RECOVERY_POINT,
        SERVICE,
        SCOPE,
        KEY,
        PREVIOUS_ATTEMPT,
        REPLAY_TICKET,
        ATTEMPT_ID,
    ];
}

/// Identity of an idempotency record: which service, which caller scope, which key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RecordId {
    /// Logical service name from the filter configuration.
    pub service: String,
    /// Caller scope (tenant, principal, or a hash of credentials); empty when unscoped.
    #[serde(default)]
    pub scope: String,
    /// The client's idempotency key.
    pub key: String,
}

/// `POST /v1/acquire`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcquireRequest {
    /// Which record.
    #[serde(flatten)]
    pub id: RecordId,
    /// Hex SHA-256 of the request's parameters; a different one for the same key is a mismatch.
    pub fingerprint: String,
    /// Request method, kept for operators reading records.
    pub method: String,
    /// Request path with query, kept for operators reading records.
    pub path: String,
    /// How long the lock is held before another attempt may take it over.
    pub lock_timeout_ms: u64,
    /// How long the record is kept.
    pub retention_ms: u64,
    /// Random id of this attempt, so the proxy can abandon exactly this acquire later.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub attempt_id: String,
    /// Unix ms after which the proxy no longer waits for the answer. The store refuses an acquire
    /// that arrives later (the proxy already answered 503 and may have abandoned it), and ends any
    /// wait before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
    /// While the record is in progress, hold the answer up to this long for it to complete (then
    /// answer `completed`) or be released (then take the lock). 0: answer at once.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub wait_ms: u64,
    /// Answer a completed record with a replay ticket too (gRPC requests: the replay is served
    /// by the store through a route, see [`paths::REPLAY`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub replay_ticket: bool,
}

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
fn is_zero(value: &u64) -> bool {
    *value == 0
}

/// Answer to `acquire`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum AcquireResponse {
    /// The caller holds the lock and must execute the request.
    Acquired(Lock),
    /// The request already completed; replay this response.
    Completed {
        /// The stored response.
        response: StoredResponse,
        /// When the record expires (Unix ms); a proxy cache must not keep it longer.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expires_at_ms: Option<u64>,
        /// A short-lived ticket for `/v1/replay`, when the acquire asked for one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        replay_ticket: Option<String>,
        /// The completed record's id (a replay ticket is bound to it).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        record_id: Option<String>,
    },
    /// Another attempt holds the lock right now.
    InProgress {
        /// Milliseconds until that lock expires.
        lock_remaining_ms: u64,
        /// The holder could not tell whether the upstream ran; the lock is kept until it expires.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        outcome_unknown: bool,
    },
    /// The key was used before with different parameters.
    Mismatch,
}

/// A held lock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lock {
    /// Opaque record id (stable across takeovers).
    pub record_id: String,
    /// Increases on every acquire or takeover; later writes must present it.
    pub fencing_token: u64,
    /// This attempt's random id (the acquire's, or one the store chose): later writes must
    /// present it too, so only this attempt can write, whatever else a caller knows.
    #[serde(default)]
    pub attempt_id: String,
    /// True when this attempt takes over an earlier one (expired or released lock).
    #[serde(default)]
    pub resumed: bool,
    /// Last checkpointed phase of an earlier attempt, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_point: Option<String>,
    /// On a takeover: what is known of the earlier attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_attempt: Option<PreviousAttempt>,
}

/// What a takeover knows of the attempt before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PreviousAttempt {
    /// Its lock expired without an answer (client gave up, proxy timed out or died): the
    /// upstream may have executed it, fully or in part. Reconcile before acting again.
    Unknown,
    /// It was released: the upstream answered with a retryable status, or the request provably
    /// never left the proxy.
    Released,
}

impl PreviousAttempt {
    /// The header value.
    pub fn as_str(self) -> &'static str {
        match self {
            PreviousAttempt::Unknown => "unknown",
            PreviousAttempt::Released => "released",
        }
    }
}

/// A response as stored and replayed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredResponse {
    /// HTTP status.
    pub status: u16,
    /// Headers to replay, already filtered of hop-by-hop and denied names.
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    /// Body bytes (base64 on the wire).
    #[serde(default, with = "base64_bytes")]
    pub body: Vec<u8>,
    /// True when the body was larger than `max_response_size` and was not stored.
    #[serde(default)]
    pub body_omitted: bool,
    /// Trailers (HTTP/2; gRPC's `grpc-status` and trailing metadata), replayed after the body.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trailers: Vec<(String, String)>,
}

/// `POST /v1/complete`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompleteRequest {
    /// Which record.
    #[serde(flatten)]
    pub id: RecordId,
    /// `record_id` from `acquire`.
    pub record_id: String,
    /// Token from `acquire`.
    pub fencing_token: u64,
    /// The attempt id from the acquire (or claim): proof of holding.
    #[serde(default)]
    pub attempt_id: String,
    /// The response to store.
    pub response: StoredResponse,
    /// How long the completed record is kept (from now); 0: the retention the acquire asked for.
    #[serde(default)]
    pub retention_ms: u64,
}

/// `POST /v1/release`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseRequest {
    /// Which record.
    #[serde(flatten)]
    pub id: RecordId,
    /// `record_id` from `acquire`.
    pub record_id: String,
    /// Token from `acquire`.
    pub fencing_token: u64,
    /// The attempt id from the acquire (or claim): proof of holding.
    #[serde(default)]
    pub attempt_id: String,
}

/// `POST /v1/outcome-unknown`: the holder forwarded the request but cannot know whether the
/// upstream ran. The lock is kept until it expires; the record says why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutcomeUnknownRequest {
    /// Which record.
    #[serde(flatten)]
    pub id: RecordId,
    /// `record_id` from `acquire`.
    pub record_id: String,
    /// Token from `acquire`.
    pub fencing_token: u64,
    /// The attempt id from the acquire (or claim): proof of holding.
    #[serde(default)]
    pub attempt_id: String,
    /// Why, e.g. `downstream_disconnect`, `route_timeout`, `upstream_reset`.
    pub reason: String,
}

/// `POST /v1/abandon`: the proxy gave up waiting for the acquire of `attempt_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AbandonRequest {
    /// Which record.
    #[serde(flatten)]
    pub id: RecordId,
    /// The attempt the proxy gave up on.
    pub attempt_id: String,
}

/// Answer to `abandon`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AbandonResponse {
    /// True when that attempt held the lock and it was released; false when it did not (never
    /// arrived, was refused after its deadline, or another attempt holds the record).
    pub released: bool,
}

/// `POST /v1/checkpoint`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointRequest {
    /// Which record.
    #[serde(flatten)]
    pub id: RecordId,
    /// `record_id` from `acquire` (the `x-idempotency-record-id` header).
    pub record_id: String,
    /// Token from `acquire` (the `x-idempotency-fencing-token` header).
    pub fencing_token: u64,
    /// The attempt id from the acquire (or claim): proof of holding.
    #[serde(default)]
    pub attempt_id: String,
    /// Name of the phase just completed.
    pub phase: String,
}

/// Identity of a consumed message: which service's consumer group read it from which topic.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MessageId {
    /// Logical service name.
    pub service: String,
    /// Topic (Kafka topic, NATS subject or stream).
    pub topic: String,
    /// Consumer group (Kafka group id, NATS durable consumer).
    pub consumer_group: String,
    /// Unique message id; for CloudEvents `source` and `id` together.
    pub message_id: String,
}

/// `POST /v1/messages/claim`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimRequest {
    /// Which message.
    #[serde(flatten)]
    pub id: MessageId,
    /// How long the claim holds before a redelivery may take it over (crashed consumer).
    pub lock_timeout_ms: u64,
    /// How long the dedup record is kept.
    pub retention_ms: u64,
}

/// Answer to a claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum ClaimResponse {
    /// Run the handler, then complete (or release on failure) with this token.
    Claimed {
        /// Record id for complete/release.
        record_id: String,
        /// Fencing token for complete/release.
        fencing_token: u64,
        /// Attempt id for complete/release.
        #[serde(default)]
        attempt_id: String,
    },
    /// Already handled: skip it (and acknowledge it to the broker).
    Duplicate,
    /// Another consumer is handling it right now: retry later (negative-acknowledge).
    InProgress {
        /// Milliseconds until that claim expires.
        lock_remaining_ms: u64,
    },
}

/// `POST /v1/messages/complete` and `/v1/messages/release`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageDoneRequest {
    /// Which message.
    #[serde(flatten)]
    pub id: MessageId,
    /// Record id from the claim.
    pub record_id: String,
    /// Token from the claim.
    pub fencing_token: u64,
    /// The attempt id from the acquire (or claim): proof of holding.
    #[serde(default)]
    pub attempt_id: String,
    /// How long the dedup record is kept (complete only); absent: the claim's `retention_ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_ms: Option<u64>,
    /// Complete only: the handler failed for good and the message went to a dead-letter topic
    /// (the record says so; later deliveries are still duplicates).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter: Option<DeadLetterNote>,
}

/// Where a message that failed `attempts` times went, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetterNote {
    /// The dead-letter topic it was produced to.
    pub topic: String,
    /// The handler's last error.
    pub reason: String,
    /// How many times the handler ran and failed.
    pub attempts: u32,
}

/// Error body of every non-2xx store answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreError {
    /// Machine-readable code, e.g. `stale_fencing_token`.
    pub error: String,
    /// Human-readable explanation.
    pub message: String,
}

/// `POST /v1/batch`: calls to [`paths::BATCHABLE`] paths, each with the JSON body it would have
/// on its own. Bodies travel as they are (no re-encoding on either side).
#[derive(Debug, Serialize, Deserialize)]
pub struct BatchRequest<'a> {
    /// The calls, answered in the same order.
    #[serde(borrow)]
    pub calls: Vec<BatchCall<'a>>,
}

/// One call of a batch.
#[derive(Debug, Serialize, Deserialize)]
pub struct BatchCall<'a> {
    /// Its path, e.g. `/v1/acquire`.
    pub path: String,
    /// Its JSON body.
    #[serde(borrow)]
    pub body: &'a serde_json::value::RawValue,
}

/// Answer to `/v1/batch`: one reply per call, in order.
#[derive(Debug, Serialize, Deserialize)]
pub struct BatchResponse<'a> {
    /// The replies.
    #[serde(borrow)]
    pub replies: Vec<BatchReply<'a>>,
}

/// What one call of a batch answered: the status and JSON body it would have had alone.
#[derive(Debug, Serialize, Deserialize)]
pub struct BatchReply<'a> {
    /// HTTP status of the call.
    pub status: u16,
    /// Its JSON body.
    #[serde(borrow)]
    pub body: &'a serde_json::value::RawValue,
}

/// Encode a batch from calls whose bodies are already JSON, copying each body once (the
/// filter's bodies come from `serde_json`, so they are valid; nothing is parsed again here).
pub fn encode_batch<'a>(calls: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"{\"calls\":[");
    for (index, (path, body)) in calls.into_iter().enumerate() {
        if index > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"path\":");
        // Paths are constants of `paths`; serde_json escapes whatever else might come.
        if serde_json::to_writer(&mut out, path).is_err() {
            out.extend_from_slice(b"\"\"");
        }
        out.extend_from_slice(b",\"body\":");
        out.extend_from_slice(body);
        out.push(b'}');
    }
    out.extend_from_slice(b"]}");
    out
}

/// Serde helper: `Vec<u8>` as a standard base64 string.
pub mod base64_bytes {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    /// Serialize bytes as base64.
    pub fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&STANDARD.encode(bytes))
    }

    /// Deserialize base64 into bytes.
    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        STANDARD.decode(text.as_bytes()).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_encoded_batch_reads_back_with_its_bodies_untouched() {
        let acquire = br#"{"service":"orders","key":"k1","fingerprint":"f"}"#;
        let release = br#"{"service":"orders","key":"k2"}"#;
        let bytes = encode_batch([(paths::ACQUIRE, &acquire[..]), (paths::RELEASE, &release[..])]);
        let batch: BatchRequest<'_> = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(batch.calls.len(), 2);
        assert_eq!(batch.calls[0].path, paths::ACQUIRE);
        assert_eq!(batch.calls[0].body.get().as_bytes(), acquire);
        assert_eq!(batch.calls[1].path, paths::RELEASE);
        assert_eq!(batch.calls[1].body.get().as_bytes(), release);
        assert_eq!(encode_batch(std::iter::empty()), br#"{"calls":[]}"#);
    }

    #[test]
    fn acquire_outcomes_round_trip_with_an_outcome_tag() {
        let completed = AcquireResponse::Completed {
            expires_at_ms: Some(5),
            replay_ticket: None,
            record_id: Some("r".into()),
            response: StoredResponse {
                status: 201,
                headers: vec![("content-type".into(), "application/json".into())],
                body: b"{\"orderId\":\"1\"}".to_vec(),
                body_omitted: false,
                trailers: Vec::new(),
            },
        };
        let text = serde_json::to_string(&completed).unwrap();
        assert!(text.contains("\"outcome\":\"completed\""), "{text}");
        assert_eq!(serde_json::from_str::<AcquireResponse>(&text).unwrap(), completed);

        let mismatch: AcquireResponse = serde_json::from_str(r#"{"outcome":"mismatch"}"#).unwrap();
        assert_eq!(mismatch, AcquireResponse::Mismatch);
    }

    #[test]
    fn invalid_base64_body_is_an_error_not_garbage() {
        let text = r#"{"outcome":"completed","response":{"status":200,"body":"!!"}}"#;
        assert!(serde_json::from_str::<AcquireResponse>(text).is_err());
    }
}

#[cfg(test)]
mod compatibility {
    use super::*;

    #[test]
    fn optional_acquire_fields_stay_off_the_wire_when_unset() {
        let request = AcquireRequest {
            id: RecordId {
                service: "s".into(),
                scope: String::new(),
                key: "k".into(),
            },
            fingerprint: "f".into(),
            method: "POST".into(),
            path: "/".into(),
            lock_timeout_ms: 1,
            retention_ms: 1,
            attempt_id: String::new(),
            deadline_ms: None,
            wait_ms: 0,
            replay_ticket: false,
        };
        let text = serde_json::to_string(&request).unwrap();
        assert!(
            !text.contains("attempt_id") && !text.contains("deadline") && !text.contains("wait"),
            "{text}"
        );
        assert_eq!(serde_json::from_str::<AcquireRequest>(&text).unwrap(), request);
    }

    #[test]
    fn in_progress_says_when_the_outcome_is_unknown() {
        let text = r#"{"outcome":"in_progress","lock_remaining_ms":5,"outcome_unknown":true}"#;
        assert_eq!(
            serde_json::from_str::<AcquireResponse>(text).unwrap(),
            AcquireResponse::InProgress {
                lock_remaining_ms: 5,
                outcome_unknown: true
            }
        );
    }
}
