//! Per-request state machine: decide, fingerprint, acquire, forward or answer, record.
//!
//! Host callbacks call into [`RequestFlow`]; it returns a [`Verdict`] for the callback and never
//! touches proxy-wasm directly. Callout replies resume or answer the paused stream themselves.
//! Shadow requests (mode `shadow`, or keys outside a rule's enforced percentage) take the same
//! store path but never pause for the store or change a response: they only count and record
//! what enforcement would have done (`shadow.rs`).
//!
//! Once a request is forwarded, its lock is released only when the upstream's own answer says
//! so (a status in `release_statuses`) or when Envoy proves the request never left
//! (`outcome.rs`). Every other ending — the client gone, a route timeout, a reset, a proxy
//! failure — keeps the lock until `lock_timeout` and tells the store why (`outcome-unknown`).
//! Holder writes that fail or whose stream ends are retried from the root context
//! (`store/background.rs`); an acquire the proxy gives up on is abandoned there too.
//!
//! This file holds the state and the host callbacks in call order; each callback matches its
//! state, takes a pure step and applies it. The steps live with their concern: `acquire.rs`
//! (`decide`: what the store's answer means, then forward, replay or refuse), `response.rs`
//! (`response_step`: what the upstream's answer proves), `record.rs` (write the outcome, retry
//! it), `answer.rs` (the only code that sends local replies), `shadow.rs`. What a request *is*
//! (admission, key, scope, fingerprint) is in `request/`; the store call bodies in `store/calls.rs`.

use std::rc::Rc;
use std::time::Duration;

use idempotency_wire::{headers, paths, AcquireResponse, Lock, RecordId, StoredResponse};

use crate::config::{Config, FailureMode, RecordMode};
use crate::host::{debug, Callout, CalloutReply, Host, Level};
use crate::metrics::Counter;
use crate::reply::problem::{ErrorCode, Problem};
use crate::reply::replay::{replay_headers, storable_headers};
use crate::request::fingerprint::{fingerprint, fingerprint_body};
use crate::request::metadata::parse_route_overrides;

mod acquire;
mod answer;
mod record;
mod response;
pub mod shadow;

use std::cell::RefCell;

use shadow::ShadowJob;

use crate::reply::cache::{CacheCandidate, ExactRequest, ReplayCache, RequestMatch};
use crate::reply::outcome::{classify, ResponseOutcome, StatusVerdict, UnknownReason};
use crate::request::admission::{self, admit, Decision, Pending};
use crate::request::attempt::new_attempt_id;
use crate::request::retry_headers::{CALLER_RETRY_HEADERS, MAX_RETRIES_HEADER};
use crate::store::background::WriteReply;
use crate::store::background::{Background, BackgroundCall};
pub use crate::store::calls::Held;
use crate::store::calls::{self, AcquireParams, HolderWrite};

pub use crate::reply::problem::CONFLICT_RETRY_AFTER_SECS;
/// `Retry-After` for 503, as in the seed's client examples.
pub const UNAVAILABLE_RETRY_AFTER_SECS: u64 = 5;

/// What a host callback should do with the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Let the stream continue.
    Continue,
    /// Hold the stream (and buffer its body) until the flow resumes or answers it.
    Pause,
}

#[derive(Debug)]
enum State {
    /// Not ours (off, not mutating, no key on an optional route, fail-open, or finished).
    PassThrough,
    /// Keyed request; collecting the body to fingerprint it.
    AwaitingRequestBody(Pending),
    /// `acquire` in flight.
    Acquiring {
        token: u32,
        started: Duration,
        pending: Pending,
        request: RequestMatch,
        attempt_id: String,
        /// Host time after which the acquire's answer is no longer awaited.
        deadline: Duration,
        /// This acquire asked the store to wait while the key is in progress.
        waited: bool,
    },
    /// Forwarded upstream while holding the lock.
    Executing(Held),
    /// Upstream answered with a status to store; collecting its body (and trailers).
    AwaitingResponseBody {
        held: Held,
        status: u16,
        headers: Vec<(String, String)>,
        /// Bytes buffered so far.
        body_size: usize,
    },
    /// The response is larger than `max_response_size`: it flows to the client as it arrives,
    /// and is recorded without its body once it has ended.
    Streaming {
        held: Held,
        status: u16,
        headers: Vec<(String, String)>,
    },
    /// `complete` or `release` in flight; the response is held until it is acknowledged.
    Recording {
        token: u32,
        write: HolderWrite,
        cache: Option<CacheCandidate>,
    },
    /// A gRPC replay routed to the store's `/v1/replay`; its answer flows to the client.
    Replaying,
    /// Shadow tracking: the request flows untouched while the store is consulted on the side.
    Shadow(Rc<RefCell<ShadowJob>>),
    /// We answered the client ourselves, or everything is done.
    Finished,
}

/// The idempotency logic of one HTTP stream.
#[derive(Debug)]
pub struct RequestFlow {
    config: Rc<Config>,
    background: Rc<Background>,
    cache: Rc<RefCell<ReplayCache>>,
    state: State,
    /// A gRPC request: refusals are gRPC statuses, replays go through the store's route.
    grpc: bool,
    /// Request body bytes buffered so far (read again when request trailers end the body).
    request_body_size: usize,
}

impl RequestFlow {
    /// A flow for a new stream; calls that must outlive it go to `background`.
    pub fn new(
        config: Rc<Config>,
        background: Rc<Background>,
        cache: Rc<RefCell<ReplayCache>>,
    ) -> RequestFlow {
        RequestFlow {
            config,
            background,
            cache,
            state: State::PassThrough,
            grpc: false,
            request_body_size: 0,
        }
    }

    /// Cache a completed record until the earlier of the cache TTL and the record's own expiry.
    fn remember(
        &self,
        host: &dyn Host,
        id: &RecordId,
        request: RequestMatch,
        response: Rc<StoredResponse>,
        record_expires_at: Duration,
    ) {
        CacheCandidate {
            cache: self.cache.clone(),
            id: id.clone(),
            request,
            response,
            record_expires_at,
        }
        .acknowledged(host.now(), self.config.replay.cache_ttl);
    }

    /// Queue a call for the root context (it outlives this stream).
    fn in_background(&self, host: &dyn Host, call: Option<BackgroundCall>) {
        if let Some(call) = call {
            self.background.enqueue(host, call);
            host.wake_background();
        }
    }

    /// Request headers arrived.
    pub fn on_request_headers(&mut self, host: &dyn Host, end_of_stream: bool) -> Verdict {
        // No shortcut for `mode: off`: Envoy route metadata may still turn a route on.
        let request_headers = match host.request_headers() {
            Ok(h) => h,
            Err(e) => return self.storage_failure(host, &e.to_string()),
        };
        // Internal headers come only from us: drop whatever the client sent, on every request.
        for (name, _) in &request_headers {
            if name.starts_with(headers::INTERNAL_PREFIX) {
                if let Err(e) = host.set_request_header(name, None) {
                    return self.storage_failure(host, &e.to_string());
                }
            }
        }

        let overrides = || {
            host.property(&[
                "xds",
                "route_metadata",
                "filter_metadata",
                &self.config.policy.route_metadata_namespace,
            ])
            .and_then(|bytes| match parse_route_overrides(&bytes) {
                Ok(o) => Some(o),
                Err(e) => {
                    host.log(Level::Warn, &format!("idempotency: ignoring route metadata: {e}"));
                    None
                }
            })
        };
        let config = self.config.clone();
        let header_bytes = |name: &str| match host.request_header_bytes(name) {
            Ok(values) => Some(values),
            Err(e) => {
                host.log(
                    Level::Warn,
                    &format!("idempotency: {e}; header {name} is read as text"),
                );
                None
            }
        };
        let admission = admit(
            &config,
            &request_headers,
            overrides,
            |path| host.property(path),
            header_bytes,
        );
        for counter in &admission.counters {
            host.count(*counter);
        }
        match admission.decision {
            Decision::PassThrough => Verdict::Continue,
            Decision::Refuse(problem) => {
                self.grpc = crate::reply::grpc::is_grpc(
                    request_headers
                        .iter()
                        .find(|(n, _)| n == "content-type")
                        .map(|(_, v)| v.as_str()),
                );
                debug(host, || {
                    format!(
                        "idempotency: refused with {}: {}",
                        problem.status(),
                        problem.message
                    )
                });
                if problem.code == ErrorCode::RequestTooLarge {
                    host.count(Counter::RequestTooLarge);
                }
                self.answer(host, &problem)
            }
            Decision::Track(pending) if end_of_stream => {
                self.grpc = pending.grpc;
                self.acquire(host, pending, &[])
            }
            Decision::Track(pending) => {
                self.grpc = pending.grpc;
                self.state = State::AwaitingRequestBody(pending);
                Verdict::Pause
            }
        }
    }

    /// Request body data arrived (`body_size` is everything buffered so far).
    pub fn on_request_body(&mut self, host: &dyn Host, body_size: usize, end_of_stream: bool) -> Verdict {
        let State::AwaitingRequestBody(pending) = &self.state else {
            return Verdict::Continue;
        };
        self.request_body_size = body_size;
        if body_size > self.config.limits.max_request_body {
            if pending.shadow {
                host.count(Counter::ShadowWouldReject);
                self.state = State::PassThrough;
                return Verdict::Continue;
            }
            return self.too_large(host);
        }
        if !end_of_stream {
            return Verdict::Pause;
        }
        let pending = pending.clone();
        self.acquire_with_body(host, pending, body_size)
    }

    /// The whole request body is in: read it, fingerprint it and acquire.
    fn acquire_with_body(&mut self, host: &dyn Host, pending: Pending, body_size: usize) -> Verdict {
        match host.request_body(body_size) {
            Ok(body) => self.acquire(host, pending, &body),
            Err(e) if pending.shadow => {
                host.log(
                    Level::Warn,
                    &format!("idempotency shadow: cannot read request body: {e}"),
                );
                self.state = State::PassThrough;
                Verdict::Continue
            }
            Err(e) => self.storage_failure(host, &e.to_string()),
        }
    }

    /// Request trailers arrived (HTTP/2): they end the request body, so acquire now and hold the
    /// trailers until the lock is taken (or the request answered).
    pub fn on_request_trailers(&mut self, host: &dyn Host) -> Verdict {
        let State::AwaitingRequestBody(pending) = &self.state else {
            return Verdict::Continue;
        };
        let pending = pending.clone();
        self.acquire_with_body(host, pending, self.request_body_size)
    }

    /// A store callout answered (or failed: Envoy reports timeouts and refusals as 5xx replies).
    pub fn on_callout_reply(&mut self, host: &dyn Host, token: u32, reply: CalloutReply) {
        match std::mem::replace(&mut self.state, State::Finished) {
            State::Acquiring {
                token: expected,
                started,
                pending,
                request,
                attempt_id,
                deadline,
                waited,
            } if expected == token => {
                let now = host.now();
                host.record_acquire_duration(now.saturating_sub(started));
                let attempt = AcquireAttempt {
                    attempt_id,
                    deadline,
                    waited,
                };
                self.on_acquire_reply(host, now, pending, request, attempt, reply);
            }
            State::Recording {
                token: expected,
                write,
                cache,
            } if expected == token => {
                let body =
                    || String::from_utf8_lossy(reply.body.get(..200).unwrap_or(&reply.body)).into_owned();
                match WriteReply::of(reply.status) {
                    WriteReply::Done => {
                        if let Some(candidate) = cache {
                            candidate.acknowledged(host.now(), self.config.replay.cache_ttl);
                        }
                    }
                    // Fenced out, record gone: nothing to retry.
                    WriteReply::Refused => {
                        host.count(Counter::StorageError);
                        host.log(
                            Level::Warn,
                            &format!(
                                "idempotency: store refused {} (status {:?}: {}); delivering the upstream response",
                                write.operation,
                                reply.status,
                                body()
                            ),
                        );
                    }
                    // The upstream ran and its response cannot be recorded: keep the lock, with
                    // the reason on the record, rather than leave a silent in-progress record.
                    WriteReply::TooLarge => {
                        host.count(Counter::StorageError);
                        host.count(Counter::OutcomeUnknown);
                        host.log(
                            Level::Error,
                            &format!(
                                "idempotency: store refused {} as too large (413: {}); the lock is kept as outcome unknown (record_refused_by_store): lower max_response_size",
                                write.operation,
                                body()
                            ),
                        );
                        self.in_background(host, write.too_large_fallback());
                    }
                    // Transient (401/403 included: credentials rotating): deliver the upstream's
                    // answer now, keep trying in the background until the lock expires.
                    WriteReply::Retry => {
                        host.count(Counter::StorageError);
                        host.log(
                            Level::Warn,
                            &format!(
                                "idempotency: store {} failed (status {:?}{}); retrying in the background, delivering the upstream response",
                                write.operation,
                                reply.status,
                                if matches!(reply.status, Some(401 | 403)) {
                                    ": check store_token and that its credential is bound to this service"
                                } else {
                                    ""
                                }
                            ),
                        );
                        self.retry_write(host, write);
                    }
                }
                self.state = State::Finished;
                if let Err(e) = host.resume_response() {
                    host.log(Level::Warn, &format!("idempotency: cannot resume response: {e}"));
                }
            }
            other => {
                // A reply for a call we no longer wait for.
                self.state = other;
            }
        }
    }

    /// The stream is ending. Whatever was still owed to the store is handed to the root context
    /// (this stream's own callouts die with it): an acquire we no longer wait for is abandoned,
    /// a forwarded request without a complete answer keeps its lock as outcome unknown, and a
    /// write whose reply had not arrived is sent again.
    pub fn on_stream_done(&mut self, host: &dyn Host) {
        match std::mem::replace(&mut self.state, State::Finished) {
            State::Shadow(job) => {
                let call = job.borrow_mut().on_stream_done();
                self.in_background(host, call);
            }
            State::Acquiring {
                pending,
                attempt_id,
                deadline,
                ..
            } => {
                debug(host, || {
                    format!(
                        "idempotency: key {} abandoned while its acquire was pending",
                        key_hash(&pending.id.key)
                    )
                });
                // The acquire may still land until its deadline (a waiting one, long after the
                // stream ended): "nothing to release" is believed only after it.
                self.abandon(host, &pending.id, &attempt_id, deadline.max(host.now()));
            }
            State::Executing(held) => {
                self.outcome_unknown(host, &held, UnknownReason::DownstreamDisconnect);
            }
            State::AwaitingResponseBody { held, .. } | State::Streaming { held, .. } => {
                self.outcome_unknown(host, &held, UnknownReason::ResponseIncomplete);
            }
            State::Recording { write, .. } => self.retry_write(host, write),
            _ => {}
        }
    }
}

fn humantime_secs(duration: Duration) -> String {
    format!("{}s", duration.as_secs())
}

use acquire::AcquireAttempt;

/// Short, stable, non-reversible name for a key in logs (never log the raw key).
pub fn key_hash(key: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(key.as_bytes());
    hex::encode(digest.get(..6).unwrap_or_default())
}

#[cfg(test)]
mod tests;
