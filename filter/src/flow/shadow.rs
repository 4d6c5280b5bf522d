//! Shadow tracking: the store is consulted on the side while the request flows untouched.
//!
//! The outcome enforcement would have had is counted (`idempotency_shadow_*`) and logged. When
//! the store granted the lock, the response is copied chunk by chunk as it streams past (never
//! held) and recorded afterwards, so switching the route to `optional` later replays it. All store
//! calls go through [`Background`](crate::store::background::Background): they outlive the stream.

use idempotency_wire::{AcquireResponse, RecordId, StoredResponse};

use super::{key_hash, Held};
use crate::config::{Config, RecordMode};
use crate::host::{debug, CalloutReply, Host, Level};
use crate::metrics::Counter;
use crate::reply::cache::RequestMatch;
use crate::reply::outcome::StatusVerdict;
use crate::reply::replay::storable_headers;
use crate::store::background::{AwaitsReply, BackgroundCall};
use crate::store::calls;

/// The upstream response as seen streaming past.
#[derive(Debug, Default)]
struct Captured {
    /// `None` when the status releases the lock instead of being stored.
    status: Option<u16>,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    body_omitted: bool,
    complete: bool,
}

/// Where a shadow job stands with the store.
#[derive(Debug)]
enum Stage {
    /// The acquire is out; the response is captured meanwhile in case the lock is granted.
    Acquiring,
    /// The lock is ours: record (or release) once the response or the stream has ended.
    Holding(Box<Held>),
    /// Nothing (more) to write: the lock was not granted, or its write is queued.
    Done,
}

/// Shadow state of one request, shared by its stream and the root context.
#[derive(Debug)]
pub struct ShadowJob {
    id: RecordId,
    stage: Stage,
    response: Option<Captured>,
    /// The stream ended.
    stream_done: bool,
    retention: std::time::Duration,
    /// A gRPC call: shadow does not read trailers, so it never records one (a record without
    /// its final status would be replayed wrongly once the route is enforced); it releases.
    grpc: bool,
}

impl ShadowJob {
    /// A job whose acquire is about to be queued.
    pub(super) fn new(id: RecordId, config: &Config, grpc: bool) -> ShadowJob {
        ShadowJob {
            id,
            stage: Stage::Acquiring,
            response: None,
            stream_done: false,
            retention: config.records.retention_period,
            grpc,
        }
    }

    /// Worth capturing the response: the lock is granted or may still be.
    fn capturing(&self) -> bool {
        matches!(self.stage, Stage::Acquiring | Stage::Holding(_))
    }

    /// Root context: the acquire answered. Returns a record/release call to queue, if ready.
    pub fn on_acquire_reply(
        &mut self,
        host: &dyn Host,
        config: &Config,
        reply: CalloutReply,
    ) -> Option<BackgroundCall> {
        self.stage = Stage::Done;
        let key = key_hash(&self.id.key);
        let parsed = match reply.status {
            Some(200) => serde_json::from_slice::<AcquireResponse>(&reply.body).ok(),
            _ => None,
        };
        let (counter, outcome) = match parsed {
            None => {
                host.count(Counter::StorageError);
                host.log(
                    Level::Warn,
                    &format!(
                        "idempotency shadow: key {key}: store failed (status {:?})",
                        reply.status
                    ),
                );
                return None;
            }
            Some(AcquireResponse::Acquired(lock)) => {
                self.stage = Stage::Holding(Box::new(Held {
                    id: self.id.clone(),
                    lock,
                    request: RequestMatch::default(),
                    lock_expires_at: host.now().saturating_add(config.records.lock_timeout),
                    grpc: false,
                    // Shadow writes are background calls anyway; the response never waits.
                    record_mode: RecordMode::Async,
                }));
                (Counter::ShadowExecuted, "executes (no earlier attempt)")
            }
            Some(AcquireResponse::Completed { .. }) => (Counter::ShadowWouldReplay, "would replay"),
            Some(AcquireResponse::InProgress { .. }) => (Counter::ShadowWouldConflict, "would answer 409"),
            Some(AcquireResponse::Mismatch) => (Counter::ShadowWouldMismatch, "would answer 422"),
        };
        host.count(counter);
        debug(host, || format!("idempotency shadow: key {key} {outcome}"));
        self.record_if_ready()
    }

    /// Stream: response headers passed.
    pub(super) fn on_response_headers(
        &mut self,
        host: &dyn Host,
        config: &Config,
        end_of_stream: bool,
    ) -> Option<BackgroundCall> {
        if !self.capturing() {
            return None;
        }
        let headers = host.response_headers().ok()?;
        let status = headers
            .iter()
            .find(|(n, _)| n == ":status")
            .and_then(|(_, v)| v.parse::<u16>().ok())
            .filter(|s| config.statuses.judge(*s) == StatusVerdict::Store);
        self.response = Some(Captured {
            status,
            headers: storable_headers(headers, &config.replay.header_denylist),
            complete: end_of_stream,
            ..Captured::default()
        });
        self.record_if_ready()
    }

    /// Stream: a body chunk of `chunk_size` bytes passed (shadow never buffers).
    pub(super) fn on_response_body(
        &mut self,
        host: &dyn Host,
        config: &Config,
        chunk_size: usize,
        end_of_stream: bool,
    ) -> Option<BackgroundCall> {
        let captured = self.response.as_mut().filter(|c| !c.complete)?;
        if captured.status.is_some() && !captured.body_omitted {
            if captured.body.len() + chunk_size > config.limits.max_response_size {
                captured.body_omitted = true;
                captured.body = Vec::new();
            } else if let Ok(chunk) = host.response_body(chunk_size) {
                captured.body.extend(chunk);
            }
        }
        captured.complete = end_of_stream;
        self.record_if_ready()
    }

    /// Stream: it ended (possibly without a complete response).
    pub(super) fn on_stream_done(&mut self) -> Option<BackgroundCall> {
        self.stream_done = true;
        self.record_if_ready()
    }

    /// Once both the lock and the outcome of the stream are known, record or release (with
    /// the same call builders as enforcement, sent once: shadow guarantees nothing).
    fn record_if_ready(&mut self) -> Option<BackgroundCall> {
        let Stage::Holding(held) = &self.stage else {
            return None;
        };
        let complete = self.response.as_ref().filter(|c| c.complete);
        let write = match (complete, self.stream_done) {
            (Some(_), _) if self.grpc => calls::release(held),
            (Some(captured), _) => match captured.status {
                Some(status) => {
                    let response = StoredResponse {
                        status,
                        headers: captured.headers.clone(),
                        body: captured.body.clone(),
                        body_omitted: captured.body_omitted,
                        trailers: Vec::new(),
                    };
                    calls::complete(held, response, self.retention)
                }
                None => calls::release(held),
            },
            // The stream ended without a whole response: give the lock back. Shadow mode
            // guarantees nothing (requests flow untracked), so it does not keep locks of
            // unknown outcome; enforced modes do.
            (None, true) => calls::release(held),
            (None, false) => return None,
        };
        self.stage = Stage::Done;
        Some(write.ok()?.once())
    }
}

impl AwaitsReply for ShadowJob {
    fn on_reply(&mut self, host: &dyn Host, config: &Config, reply: CalloutReply) -> Option<BackgroundCall> {
        self.on_acquire_reply(host, config, reply)
    }
}
