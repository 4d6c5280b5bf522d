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
//! (`background.rs`); an acquire the proxy gives up on is abandoned there too.

use std::rc::Rc;
use std::time::Duration;

use idempotency_wire::{headers, paths, AcquireResponse, Lock, RecordId, StoredResponse};

use crate::config::{Config, FailureMode, RecordMode};
use crate::fingerprint::{fingerprint, fingerprint_body};
use crate::host::{debug, Callout, CalloutReply, Host, Level};
use crate::metadata::parse_route_overrides;
use crate::metrics::Counter;
use crate::problem::{ErrorCode, Problem};
use crate::replay::{replay_headers, storable_headers};

pub mod admission;
pub mod calls;
pub mod shadow;

use std::cell::RefCell;

use shadow::ShadowJob;

use crate::attempt::new_attempt_id;
use crate::background::WriteReply;
use crate::background::{Background, BackgroundCall};
use crate::cache::{CacheCandidate, ExactRequest, ReplayCache, RequestMatch};
use crate::outcome::{classify, ResponseOutcome, StatusVerdict, UnknownReason};
use admission::{admit, Decision, Pending};
use calls::{AcquireParams, HolderWrite};

/// `Retry-After` for 409: most requests finish well within this, whatever the lock timeout.
pub const CONFLICT_RETRY_AFTER_SECS: u64 = 2;
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

/// A request that holds the lock.
#[derive(Debug, Clone)]
pub struct Held {
    id: RecordId,
    lock: Lock,
    /// The request, to cache the completed record under.
    request: RequestMatch,
    /// Host time when the lock expires; holder writes are not retried past it.
    lock_expires_at: Duration,
    /// A gRPC request: its `grpc-status` decides store vs release.
    grpc: bool,
    /// Whether the response waits for its record to be written.
    record_mode: RecordMode,
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
        .acknowledged(host.now(), self.config.replay_cache_ttl);
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
                &self.config.route_metadata_namespace,
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
                self.grpc = crate::grpc::is_grpc(
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
        if body_size > self.config.max_request_body {
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

    /// Response trailers arrived: the response is complete. For gRPC they carry the final
    /// status, which decides store vs release; they are recorded with the response and held
    /// until the store acknowledged.
    pub fn on_response_trailers(&mut self, host: &dyn Host) -> Verdict {
        let (held, status, headers, streamed, body_size) = match &self.state {
            State::AwaitingResponseBody {
                held,
                status,
                headers,
                body_size,
            } => (held.clone(), *status, headers.clone(), false, *body_size),
            State::Streaming {
                held,
                status,
                headers,
            } => (held.clone(), *status, headers.clone(), true, 0),
            State::Recording { .. } => return Verdict::Pause,
            _ => return Verdict::Continue,
        };
        let trailers = match host.response_trailers() {
            Ok(trailers) => storable_headers(trailers, &self.config.replay_header_denylist),
            Err(e) => {
                host.log(
                    Level::Warn,
                    &format!("idempotency: cannot read response trailers: {e}"),
                );
                return self.outcome_unknown(host, &held, UnknownReason::ProxyFailure);
            }
        };
        if held.grpc {
            let Some(grpc_status) = crate::grpc::status_of(&trailers) else {
                // A gRPC response must end with a status; without one nothing is known.
                return self.outcome_unknown(host, &held, UnknownReason::ResponseIncomplete);
            };
            host.count(Counter::GrpcStatus(grpc_status));
            match self.config.judge_grpc_status(grpc_status) {
                StatusVerdict::Store => {}
                StatusVerdict::Release => return self.release(host, &held),
                StatusVerdict::Unknown => {
                    return self.outcome_unknown(host, &held, UnknownReason::UpstreamGrpcStatus)
                }
            }
        }
        if streamed {
            host.count(Counter::ResponseStreamed);
            return self.complete_with_trailers(host, &held, status, headers, Vec::new(), true, trailers);
        }
        match host.response_body(body_size) {
            Ok(body) => self.complete_with_trailers(host, &held, status, headers, body, false, trailers),
            Err(e) => {
                host.log(
                    Level::Warn,
                    &format!("idempotency: cannot read response body: {e}"),
                );
                self.outcome_unknown(host, &held, UnknownReason::ProxyFailure)
            }
        }
    }

    /// Response headers arrived from upstream (or from Envoy itself: a local reply).
    pub fn on_response_headers(&mut self, host: &dyn Host, end_of_stream: bool) -> Verdict {
        if let State::Shadow(job) = &self.state {
            let call = job
                .borrow_mut()
                .on_response_headers(host, &self.config, end_of_stream);
            self.in_background(host, call);
            return Verdict::Continue;
        }
        if let State::Replaying = &self.state {
            return self.on_replay_headers(host);
        }
        let State::Executing(held) = &self.state else {
            return Verdict::Continue;
        };
        let held = held.clone();
        let response_headers = match host.response_headers() {
            Ok(h) => h,
            Err(e) => {
                host.log(
                    Level::Warn,
                    &format!("idempotency: cannot read response headers: {e}"),
                );
                return self.outcome_unknown(host, &held, UnknownReason::ProxyFailure);
            }
        };
        let header = |wanted: &str| {
            response_headers
                .iter()
                .find(|(n, _)| n == wanted)
                .map(|(_, v)| v.as_str())
        };
        let Some(status) = header(":status").and_then(|v| v.parse::<u16>().ok()) else {
            return self.outcome_unknown(host, &held, UnknownReason::ProxyFailure);
        };
        let details = host
            .property(&["response", "code_details"])
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned());
        match classify(status, details.as_deref(), |s| self.config.judge_status(s)) {
            ResponseOutcome::Unknown(reason) => {
                host.log(
                    Level::Warn,
                    &format!(
                        "idempotency: key {}: Envoy answered {status} ({}) after forwarding; outcome unknown, keeping the lock",
                        key_hash(&held.id.key),
                        details.as_deref().unwrap_or("no details")
                    ),
                );
                self.outcome_unknown(host, &held, reason)
            }
            ResponseOutcome::Release => self.release(host, &held),
            ResponseOutcome::Store => {
                // Read what decides before the headers move into the record (no copy).
                let grpc_status = if held.grpc {
                    crate::grpc::status_of(&response_headers)
                } else {
                    None
                };
                let too_big = !held.grpc
                    && header("content-length")
                        .and_then(|v| v.trim().parse::<usize>().ok())
                        .is_some_and(|length| length > self.config.max_response_size);
                let stored_headers = storable_headers(response_headers, &self.config.replay_header_denylist);
                if let Some(grpc_status) = grpc_status {
                    // Trailers-only gRPC: the headers carry the final status.
                    host.count(Counter::GrpcStatus(grpc_status));
                    match self.config.judge_grpc_status(grpc_status) {
                        StatusVerdict::Store => {}
                        StatusVerdict::Release => return self.release(host, &held),
                        StatusVerdict::Unknown => {
                            return self.outcome_unknown(host, &held, UnknownReason::UpstreamGrpcStatus)
                        }
                    }
                    return self.complete(host, &held, status, stored_headers, Vec::new(), false);
                }
                if too_big {
                    return self.stream_through(host, held, status, stored_headers, end_of_stream);
                }
                if end_of_stream && !held.grpc {
                    return self.complete(host, &held, status, stored_headers, Vec::new(), false);
                }
                // The body follows (for gRPC: messages, then trailers with the status).
                self.state = State::AwaitingResponseBody {
                    held,
                    status,
                    headers: stored_headers,
                    body_size: 0,
                };
                Verdict::Pause
            }
        }
    }

    /// The store's answer to a routed gRPC replay: pass it on (it carries `Idempotent-Replayed`),
    /// without the store's `x-idempotency-store` mark, which says which listener answered: a
    /// replay must come from the replay listener; anything else is a routing mistake, logged
    /// with its fix.
    fn on_replay_headers(&mut self, host: &dyn Host) -> Verdict {
        let answered_by = host
            .response_headers()
            .ok()
            .and_then(|h| h.into_iter().find(|(n, _)| n == headers::ANSWERED_BY))
            .map(|(_, v)| v);
        match answered_by.as_deref() {
            Some(REPLAY_LISTENER) => {}
            Some(_) => host.log(
                Level::Error,
                "idempotency: a gRPC replay was answered by the store's API listener: point the replay route (path /v1/replay with x-idempotency-replay-ticket) at a cluster for the store's --replay-listen port, never at the API (see README, gRPC)",
            ),
            None => host.log(
                Level::Error,
                "idempotency: a gRPC replay was not answered by the store: add the replay route (path /v1/replay with x-idempotency-replay-ticket, first in the route table) to a cluster for the store's --replay-listen port (see README, gRPC)",
            ),
        }
        if answered_by.is_some() {
            if let Err(e) = host.set_response_header(headers::ANSWERED_BY, None) {
                host.log(
                    Level::Warn,
                    &format!("idempotency: cannot remove {}: {e}", headers::ANSWERED_BY),
                );
            }
        }
        self.state = State::Finished;
        Verdict::Continue
    }

    /// Response body data arrived (`body_size`: everything buffered so far while paused, or this
    /// chunk while streaming).
    pub fn on_response_body(&mut self, host: &dyn Host, body_size: usize, end_of_stream: bool) -> Verdict {
        match &self.state {
            State::AwaitingResponseBody {
                held,
                status,
                headers,
                ..
            } => {
                let (held, status, headers) = (held.clone(), *status, headers.clone());
                if body_size > self.config.max_response_size {
                    return self.stream_through(host, held, status, headers, end_of_stream);
                }
                if !end_of_stream {
                    self.state = State::AwaitingResponseBody {
                        held,
                        status,
                        headers,
                        body_size,
                    };
                    return Verdict::Pause;
                }
                if held.grpc {
                    // The body ended without trailers: no final gRPC status was sent.
                    return self.outcome_unknown(host, &held, UnknownReason::ResponseIncomplete);
                }
                match host.response_body(body_size) {
                    Ok(body) => self.complete(host, &held, status, headers, body, false),
                    Err(e) => {
                        host.log(
                            Level::Warn,
                            &format!("idempotency: cannot read response body: {e}"),
                        );
                        self.outcome_unknown(host, &held, UnknownReason::ProxyFailure)
                    }
                }
            }
            State::Streaming {
                held,
                status,
                headers,
            } if end_of_stream => {
                // Write-ahead still holds for the end of the response: its last chunk waits
                // until the store has recorded the (body-less) result.
                let (held, status, headers) = (held.clone(), *status, headers.clone());
                if held.grpc {
                    return self.outcome_unknown(host, &held, UnknownReason::ResponseIncomplete);
                }
                host.count(Counter::ResponseStreamed);
                self.complete(host, &held, status, headers, Vec::new(), true)
            }
            // Keep holding everything until the store acknowledged the record.
            State::Recording { .. } => Verdict::Pause,
            State::Shadow(job) => {
                let call = job
                    .borrow_mut()
                    .on_response_body(host, &self.config, body_size, end_of_stream);
                self.in_background(host, call);
                Verdict::Continue
            }
            _ => Verdict::Continue,
        }
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
                            candidate.acknowledged(host.now(), self.config.replay_cache_ttl);
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

    #[allow(clippy::too_many_arguments)] // one acquire's parts
    fn on_acquire_reply(
        &mut self,
        host: &dyn Host,
        now: Duration,
        pending: Pending,
        request: RequestMatch,
        attempt: AcquireAttempt,
        reply: CalloutReply,
    ) {
        let parsed = match reply.status {
            Some(200) => serde_json::from_slice::<AcquireResponse>(&reply.body).map_err(|e| e.to_string()),
            other => Err(format!(
                "status {other:?}: {}",
                String::from_utf8_lossy(reply.body.get(..200).unwrap_or(&reply.body))
            )),
        };
        let verdict = match parsed {
            Err(reason) => {
                // The acquire may still have landed (a timeout, a reply lost on the way): make
                // sure no lock is left behind for an attempt we are refusing now. 400/401/403
                // and 408 (arrived after its deadline) are definite: nothing was taken.
                if !matches!(reply.status, Some(400 | 401 | 403 | 408)) {
                    self.abandon(host, &pending.id, &attempt.attempt_id, attempt.deadline.max(now));
                }
                self.storage_failure(host, &format!("acquire failed: {reason}"))
            }
            Ok(AcquireResponse::Acquired(lock)) => {
                host.count(Counter::Miss);
                let held = Held {
                    id: pending.id,
                    lock,
                    request,
                    lock_expires_at: now.saturating_add(self.config.lock_timeout),
                    grpc: self.grpc,
                    record_mode: pending.record_mode,
                };
                let block = RouterRetries {
                    block: self.config.block_router_retries,
                    remove_caller_headers: pending.caller_retry_headers,
                };
                if let Err(e) = set_internal_headers(host, &held, block) {
                    // We hold the lock but cannot tell the upstream; the request never left.
                    if let Ok(write) = calls::release(&held) {
                        host.count(Counter::LockReleased);
                        self.in_background(host, Some(write.in_background()));
                    }
                    let verdict = self.storage_failure(host, &e.to_string());
                    if verdict == Verdict::Continue {
                        if let Err(e) = host.resume_request() {
                            host.log(Level::Warn, &format!("idempotency: cannot resume request: {e}"));
                        }
                    }
                    return;
                }
                debug(host, || {
                    format!(
                        "idempotency: key {} acquired (token {}, resumed {}, previous attempt {:?})",
                        key_hash(&held.id.key),
                        held.lock.fencing_token,
                        held.lock.resumed,
                        held.lock.previous_attempt
                    )
                });
                self.state = State::Executing(held);
                Verdict::Continue
            }
            // Completed, but streamed through without its messages (over `max_response_size`):
            // a gRPC client cannot use a replay without them, and it must not run again.
            Ok(AcquireResponse::Completed { response, .. }) if self.grpc && response.body_omitted => {
                host.count(Counter::Hit);
                let status = crate::grpc::status_of(&response.trailers)
                    .or_else(|| crate::grpc::status_of(&response.headers))
                    .and_then(|code| crate::grpc::CODE_NAMES.get(usize::try_from(code).ok()?).copied())
                    .unwrap_or("unknown");
                self.answer(
                    host,
                    &Problem::new(
                        ErrorCode::ResponseNotReplayable,
                        format!("This call already completed with status {status}; its response was larger than max_response_size and cannot be replayed. It will not run again with this Idempotency-Key"),
                    )
                    .detail("completedStatus", status),
                )
            }
            Ok(AcquireResponse::Completed {
                replay_ticket: Some(ticket),
                ..
            }) if self.grpc => self.route_replay_to_store(host, &pending, &ticket),
            Ok(AcquireResponse::Completed {
                response,
                expires_at_ms,
                ..
            }) => {
                host.count(Counter::Hit);
                debug(host, || {
                    format!(
                        "idempotency: key {} replayed (status {})",
                        key_hash(&pending.id.key),
                        response.status
                    )
                });
                let headers = replay_headers(&response, &self.config.replay_header_denylist);
                if let Err(e) = host.send_response(response.status, &headers, &response.body) {
                    host.log(Level::Warn, &format!("idempotency: cannot send replay: {e}"));
                }
                let record_expires_at = expires_at_ms.map_or(Duration::MAX, Duration::from_millis);
                self.remember(host, &pending.id, request, Rc::new(response), record_expires_at);
                self.state = State::Finished;
                Verdict::Pause
            }
            // A double submit: ask again, waiting in the store for the first attempt's answer.
            // Not for a lock kept because its outcome is unknown: it holds to its end.
            Ok(AcquireResponse::InProgress {
                outcome_unknown: false,
                ..
            }) if !attempt.waited && !pending.in_progress_wait.is_zero() => {
                let wait = pending.in_progress_wait;
                self.send_acquire(host, now, pending, request, attempt.attempt_id, wait)
            }
            Ok(AcquireResponse::InProgress {
                lock_remaining_ms,
                outcome_unknown,
            }) => {
                host.count(Counter::ConcurrentCollision);
                let remaining_secs = lock_remaining_ms.div_ceil(1000).max(1);
                // An attempt of unknown outcome holds its lock to the end: nothing can change
                // before then. A running one usually finishes soon: ask for a quick retry.
                let retry_after = if outcome_unknown {
                    remaining_secs
                } else {
                    CONFLICT_RETRY_AFTER_SECS.min(remaining_secs)
                };
                debug(host, || {
                    format!(
                        "idempotency: key {} in progress (outcome unknown: {outcome_unknown}): 409",
                        key_hash(&pending.id.key)
                    )
                });
                let message = if outcome_unknown {
                    "An earlier request with this Idempotency-Key may still be running or may have run; its result is unknown until its lock expires. Retry with the same key after Retry-After"
                } else {
                    "A request with this Idempotency-Key is being processed; retry with the same key later"
                };
                self.answer(
                    host,
                    &Problem::new(ErrorCode::ConcurrentRequest, message)
                        .retry_after(retry_after)
                        .detail("lockRemainingMs", lock_remaining_ms)
                        .detail("outcomeUnknown", outcome_unknown),
                )
            }
            Ok(AcquireResponse::Mismatch) => {
                host.count(Counter::ParameterMismatch);
                debug(host, || {
                    format!(
                        "idempotency: key {} reused with other parameters: 422",
                        key_hash(&pending.id.key)
                    )
                });
                self.answer(
                    host,
                    &Problem::new(
                        ErrorCode::ParameterMismatch,
                        "This Idempotency-Key was used with different request parameters; use a new key for a different request",
                    ),
                )
            }
        };
        if verdict == Verdict::Continue {
            if let Err(e) = host.resume_request() {
                host.log(Level::Warn, &format!("idempotency: cannot resume request: {e}"));
            }
        }
    }

    /// A completed gRPC call: Envoy's local replies cannot carry its message, so the request is
    /// routed to the store's `/v1/replay` (by the `x-idempotency-replay-ticket` route), which
    /// answers with the stored headers, messages and trailers. The ticket is short-lived, bound
    /// to this record, and the only credential the store accepts there: no store token travels.
    fn route_replay_to_store(&mut self, host: &dyn Host, pending: &Pending, ticket: &str) -> Verdict {
        host.count(Counter::Hit);
        host.count(Counter::GrpcReplayRouted);
        debug(host, || {
            format!(
                "idempotency: key {} replayed through the store (gRPC)",
                key_hash(&pending.id.key)
            )
        });
        let routed = host
            .set_request_header(headers::REPLAY_TICKET, Some(ticket))
            .and_then(|()| host.set_request_header(":path", Some(paths::REPLAY)))
            // The replay route matches POST only: a gRPC-typed PUT/PATCH/DELETE is a replay too.
            .and_then(|()| host.set_request_header(":method", Some("POST")))
            .and_then(|()| host.set_request_header(":authority", Some(&self.config.store_authority)))
            .and_then(|()| host.clear_route_cache());
        if let Err(e) = routed {
            return self.storage_failure(host, &format!("cannot route the gRPC replay: {e}"));
        }
        self.state = State::Replaying;
        Verdict::Continue
    }

    /// Answer from the proxy-local cache of completed records: replay, or 422 when the key was
    /// completed with other parameters. No callout, no upstream.
    fn answer_from_cache(
        &mut self,
        host: &dyn Host,
        pending: &Pending,
        same_request: bool,
        response: &StoredResponse,
    ) -> Verdict {
        if !same_request {
            host.count(Counter::ParameterMismatch);
            return self.answer(
                host,
                &Problem::new(
                    ErrorCode::ParameterMismatch,
                    "This Idempotency-Key was used with different request parameters; use a new key for a different request",
                ),
            );
        }
        host.count(Counter::Hit);
        host.count(Counter::ReplayCacheHit);
        debug(host, || {
            format!(
                "idempotency: key {} replayed from the proxy cache",
                key_hash(&pending.id.key)
            )
        });
        let headers = replay_headers(response, &self.config.replay_header_denylist);
        if let Err(e) = host.send_response(response.status, &headers, &response.body) {
            host.log(Level::Warn, &format!("idempotency: cannot send replay: {e}"));
        }
        self.state = State::Finished;
        Verdict::Pause
    }

    /// Answer the client with an error; the upstream is never called.
    fn answer(&mut self, host: &dyn Host, problem: &Problem) -> Verdict {
        self.state = State::Finished;
        if self.grpc {
            let refusal = crate::grpc::refusal(problem);
            host.count(Counter::GrpcStatus(refusal.status));
            if let Err(e) = host.send_grpc_response(refusal.status, &refusal.message, &refusal.metadata) {
                host.log(
                    Level::Warn,
                    &format!("idempotency: cannot send {}: {e}", problem.code.code()),
                );
            }
            return Verdict::Pause;
        }
        if let Err(e) = host.send_response(problem.status(), &problem.headers(), &problem.body()) {
            host.log(
                Level::Warn,
                &format!("idempotency: cannot send {}: {e}", problem.code.code()),
            );
        }
        Verdict::Pause
    }

    fn too_large(&mut self, host: &dyn Host) -> Verdict {
        host.count(Counter::RequestTooLarge);
        self.answer(host, &admission::too_large(self.config.max_request_body))
    }

    /// The store (or the host) failed before we held a lock: refuse (closed) or forward
    /// untracked (open). Never forwards while pretending to be tracked.
    fn storage_failure(&mut self, host: &dyn Host, reason: &str) -> Verdict {
        host.count(Counter::StorageError);
        match self.config.failure_mode {
            FailureMode::Closed => {
                host.log(
                    Level::Warn,
                    &format!("idempotency: store unavailable, refusing with 503: {reason}"),
                );
                self.answer(
                    host,
                    &Problem::new(
                        ErrorCode::StorageUnavailable,
                        "Idempotency storage is unavailable; retry with the same key later",
                    )
                    .retry_after(UNAVAILABLE_RETRY_AFTER_SECS),
                )
            }
            FailureMode::Open => {
                host.count(Counter::FailOpen);
                host.log(
                    Level::Warn,
                    &format!("idempotency: store unavailable, forwarding untracked: {reason}"),
                );
                self.state = State::PassThrough;
                Verdict::Continue
            }
        }
    }

    fn acquire(&mut self, host: &dyn Host, pending: Pending, body: &[u8]) -> Verdict {
        let now = host.now();
        let parts = pending.parts(body);
        let cacheable = !pending.shadow && !pending.grpc;
        let cached = if cacheable {
            self.cache
                .borrow_mut()
                .get(&pending.id.scope, &pending.id.key, now)
        } else {
            None
        };
        // The same bytes as the request that completed the record: replay without hashing.
        if let Some(record) = &cached {
            if record
                .request
                .exact
                .as_deref()
                .is_some_and(|exact| exact.matches(&parts))
            {
                return self.answer_from_cache(host, &pending, true, &record.response);
            }
        }
        // One hash, of the canonical body: in the VM a SHA-256 of 1 KiB costs ~5 µs and
        // canonicalising it ~1.5 µs, so hashing the raw body too would cost every execution
        // more than it saves a replay; identical retries are matched by their bytes instead.
        let exclude: Vec<&str> = pending.exclude_fields.iter().map(String::as_str).collect();
        let canonical = fingerprint_body(body, pending.json, &exclude);
        let fingerprint = fingerprint(
            &pending.method,
            &pending.path,
            &pending.fingerprint_headers,
            &canonical,
        );
        if let Some(record) = cached {
            let same_request = fingerprint == record.request.fingerprint;
            return self.answer_from_cache(host, &pending, same_request, &record.response);
        }
        let exact = if cacheable && self.cache.borrow().enabled() {
            ExactRequest::keep(&parts)
        } else {
            None
        };
        let request = RequestMatch { fingerprint, exact };
        let attempt_id = match new_attempt_id() {
            Ok(id) => id,
            // A guessable attempt id would let anyone who can guess it checkpoint or abandon
            // this lock: refuse to track the request instead (as a store failure would).
            Err(e) => return self.storage_failure(host, &e.to_string()),
        };
        if pending.shadow {
            // Shadow never waits for the store: the root context asks it on the side.
            match self.acquire_body(&pending, &request, &attempt_id, now, Duration::ZERO) {
                Ok((body, _, _)) => {
                    let job = Rc::new(RefCell::new(ShadowJob::new(
                        pending.id,
                        &self.config,
                        pending.grpc,
                    )));
                    self.in_background(
                        host,
                        Some(BackgroundCall::shadow_acquire(paths::ACQUIRE, body, job.clone())),
                    );
                    self.state = State::Shadow(job);
                }
                Err(e) => {
                    host.log(Level::Warn, &format!("idempotency shadow: {e}"));
                    self.state = State::PassThrough;
                }
            }
            return Verdict::Continue;
        }
        // The first acquire never waits, so it may share a batch with other streams' calls and
        // a store that hangs costs the client `store_timeout` only; a key found in progress is
        // asked again, this time waiting (`send_waiting_acquire`).
        self.send_acquire(host, now, pending, request, attempt_id, Duration::ZERO)
    }

    /// The acquire body for `wait`, with the callout's timeout and the deadline after which the
    /// store refuses it: the callout waits for the store's wait too, and the store ends its wait
    /// before the deadline.
    fn acquire_body(
        &self,
        pending: &Pending,
        request: &RequestMatch,
        attempt_id: &str,
        now: Duration,
        wait: Duration,
    ) -> Result<(Vec<u8>, Duration, Duration), String> {
        let timeout = self.config.store_timeout.saturating_add(wait);
        let deadline = now.saturating_add(timeout);
        let body = calls::acquire(
            &pending.id,
            &AcquireParams {
                fingerprint: &request.fingerprint,
                method: &pending.method,
                path: &pending.path,
                lock_timeout: self.config.lock_timeout,
                retention: self.config.retention_period,
                attempt_id,
                deadline,
                wait,
                replay_ticket: pending.grpc,
            },
        )
        .map_err(|e| format!("cannot encode acquire: {e}"))?;
        Ok((body, timeout, deadline))
    }

    /// Send an acquire (waiting up to `wait` in the store while the key is in progress) and
    /// pause the request until it answers.
    fn send_acquire(
        &mut self,
        host: &dyn Host,
        now: Duration,
        pending: Pending,
        request: RequestMatch,
        attempt_id: String,
        wait: Duration,
    ) -> Verdict {
        let dispatched = self
            .acquire_body(&pending, &request, &attempt_id, now, wait)
            .and_then(|(body, timeout, deadline)| {
                host.dispatch(&Callout {
                    path: paths::ACQUIRE,
                    body: &body,
                    timeout,
                    may_batch: wait.is_zero(),
                })
                .map(|token| (token, deadline))
                .map_err(|e| e.to_string())
            });
        match dispatched {
            Ok((token, deadline)) => {
                self.state = State::Acquiring {
                    token,
                    started: now,
                    pending,
                    request,
                    attempt_id,
                    deadline,
                    waited: !wait.is_zero(),
                };
                Verdict::Pause
            }
            Err(e) => self.storage_failure(host, &e),
        }
    }

    /// Store the response, holding it until the store acknowledged (write-ahead).
    fn complete(
        &mut self,
        host: &dyn Host,
        held: &Held,
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
        body_omitted: bool,
    ) -> Verdict {
        self.complete_with_trailers(host, held, status, headers, body, body_omitted, Vec::new())
    }

    /// [`Self::complete`] for a response that ended with trailers.
    #[allow(clippy::too_many_arguments)] // one record's parts
    fn complete_with_trailers(
        &mut self,
        host: &dyn Host,
        held: &Held,
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
        body_omitted: bool,
        trailers: Vec<(String, String)>,
    ) -> Verdict {
        host.count(Counter::ResponseRecorded);
        let response = StoredResponse {
            status,
            headers,
            body,
            body_omitted,
            trailers,
        };
        let cache = CacheCandidate {
            cache: self.cache.clone(),
            id: held.id.clone(),
            request: held.request.clone(),
            response: Rc::new(response.clone()),
            record_expires_at: host.now().saturating_add(self.config.retention_period),
        };
        match calls::complete(held, response, self.config.retention_period) {
            Ok(write) => self.record(host, held.record_mode, write, Some(cache)),
            Err(e) => self.cannot_encode(host, "complete", &e),
        }
    }

    /// The response outgrew `max_response_size`: let it flow to the client as it arrives (never
    /// into Envoy's buffer limit) and record it without its body once it has ended (holding only
    /// its last chunk until the store acknowledged).
    fn stream_through(
        &mut self,
        host: &dyn Host,
        held: Held,
        status: u16,
        headers: Vec<(String, String)>,
        end_of_stream: bool,
    ) -> Verdict {
        debug(host, || {
            format!(
                "idempotency: response of {} over max_response_size ({} bytes); streaming it through, recording it without body",
                key_hash(&held.id.key),
                self.config.max_response_size
            )
        });
        if end_of_stream && held.grpc {
            // A gRPC body that ends without trailers sent no final status: nothing is known.
            return self.outcome_unknown(host, &held, UnknownReason::ResponseIncomplete);
        }
        if end_of_stream {
            self.record_streamed(host, &held, status, headers);
        } else {
            self.state = State::Streaming {
                held,
                status,
                headers,
            };
        }
        Verdict::Continue
    }

    /// A streamed response ended: record it as completed without its body (from the root context,
    /// since the stream is about to end).
    fn record_streamed(&mut self, host: &dyn Host, held: &Held, status: u16, headers: Vec<(String, String)>) {
        host.count(Counter::ResponseRecorded);
        host.count(Counter::ResponseStreamed);
        let response = StoredResponse {
            status,
            headers,
            body: Vec::new(),
            body_omitted: true,
            trailers: Vec::new(),
        };
        match calls::complete(held, response, self.config.retention_period) {
            Ok(write) => self.in_background(host, Some(write.in_background())),
            Err(e) => {
                self.cannot_encode(host, "complete", &e);
            }
        }
        self.state = State::Finished;
    }

    /// Give the lock back (the upstream's own retryable answer, or a request that provably never
    /// left Envoy), holding the response until the store acknowledged.
    fn release(&mut self, host: &dyn Host, held: &Held) -> Verdict {
        // The response describes the router's last try only. When it made several (a retry the
        // filter could not stop, or an internal redirect), an earlier try may have run the
        // request: only one try proves anything, so several keep the lock.
        let attempts = router_attempts(host);
        if attempts > 1 {
            host.log(
                Level::Warn,
                &format!(
                    "idempotency: key {}: Envoy's router made {attempts} attempts; an earlier one may have reached the upstream, so the lock is kept instead of released",
                    key_hash(&held.id.key)
                ),
            );
            return self.outcome_unknown(host, held, UnknownReason::SeveralAttempts);
        }
        host.count(Counter::LockReleased);
        match calls::release(held) {
            Ok(write) => self.record(host, held.record_mode, write, None),
            Err(e) => self.cannot_encode(host, "release", &e),
        }
    }

    /// The upstream may or may not have run the request: keep the lock until it expires and tell
    /// the store why (from the root context, retried). The response, if any, flows on.
    fn outcome_unknown(&mut self, host: &dyn Host, held: &Held, reason: UnknownReason) -> Verdict {
        host.count(Counter::OutcomeUnknown);
        host.log(
            Level::Warn,
            &format!(
                "idempotency: key {} outcome unknown ({}); its lock is kept for up to {}",
                key_hash(&held.id.key),
                reason.as_str(),
                humantime_secs(self.config.lock_timeout)
            ),
        );
        match calls::outcome_unknown(held, reason) {
            Ok(write) => self.in_background(host, Some(write.in_background())),
            Err(e) => {
                self.cannot_encode(host, "outcome-unknown", &e);
            }
        }
        self.state = State::Finished;
        Verdict::Continue
    }

    /// Ask the store (from the root context, retried) to release the lock of an acquire we gave
    /// up on, if that attempt got it.
    fn abandon(&self, host: &dyn Host, id: &RecordId, attempt_id: &str, deadline: Duration) {
        match calls::abandon(id, attempt_id, deadline) {
            Ok(call) => self.in_background(host, Some(call)),
            Err(e) => host.log(Level::Warn, &format!("idempotency: cannot encode abandon: {e}")),
        }
    }

    /// Hand a holder write to the root context to retry.
    fn retry_write(&self, host: &dyn Host, write: HolderWrite) {
        host.count(Counter::WriteRetried);
        self.in_background(host, Some(write.in_background()));
    }

    fn cannot_encode(&mut self, host: &dyn Host, operation: &str, error: &serde_json::Error) -> Verdict {
        host.count(Counter::StorageError);
        host.log(
            Level::Warn,
            &format!("idempotency: cannot encode {operation}: {error}"),
        );
        self.state = State::Finished;
        Verdict::Continue
    }

    /// Send `complete`/`release`. Write-ahead: hold the response until it is acknowledged;
    /// should the store fail, the upstream response is delivered anyway and the write retried in
    /// the background: the effect has happened, and replacing its answer with a 503 would only
    /// invite a retry. Async: the response goes on at once and the root context makes the write
    /// (batched like any other call, retried until the lock expires, cached once acknowledged).
    fn record(
        &mut self,
        host: &dyn Host,
        mode: RecordMode,
        write: HolderWrite,
        cache: Option<CacheCandidate>,
    ) -> Verdict {
        if mode == RecordMode::Async {
            host.count(Counter::RecordedAsync);
            self.in_background(host, Some(write.in_background().batched().caching(cache)));
            self.state = State::Finished;
            return Verdict::Continue;
        }
        let dispatched = host.dispatch(&Callout {
            path: write.path,
            body: &write.body,
            timeout: self.config.store_timeout,
            may_batch: true,
        });
        match dispatched {
            Ok(token) => {
                self.state = State::Recording { token, write, cache };
                Verdict::Pause
            }
            Err(e) => {
                host.count(Counter::StorageError);
                host.log(
                    Level::Warn,
                    &format!(
                        "idempotency: cannot {} record now ({e}); retrying in the background",
                        write.operation
                    ),
                );
                self.retry_write(host, write);
                self.state = State::Finished;
                Verdict::Continue
            }
        }
    }
}

fn humantime_secs(duration: Duration) -> String {
    format!("{}s", duration.as_secs())
}

/// Envoy's router reads this request header (from a filter as from an internal caller) over
/// the route's `num_retries`, and a caller's `x-envoy-retry-on`/`-retriable-status-codes`/
/// `-hedge-on-per-try-timeout` all spend those retries: `0` leaves none, so one tracked request
/// reaches the upstream at most once. (Envoy cannot narrow a route's `retry_on` per request, so
/// even `connect-failure` retries go: such a request never left Envoy, its lock is released and
/// the client's own retry runs it.)
pub const MAX_RETRIES_HEADER: &str = "x-envoy-max-retries";

/// A caller's requests for retries and hedging, removed from a tracked request with
/// `block_router_retries` (Envoy honours them from callers it treats as internal): with
/// `x-envoy-max-retries: 0` the router would not act on them, and the upstream should not see
/// a retry policy that does not apply.
pub const CALLER_RETRY_HEADERS: [&str; 5] = [
    "x-envoy-retry-on",
    "x-envoy-retry-grpc-on",
    "x-envoy-retriable-status-codes",
    "x-envoy-retriable-header-names",
    "x-envoy-hedge-on-per-try-timeout",
];

/// Tell the upstream which record it runs under (and where to resume), and, with
/// `block_router_retries`, tell Envoy's router to send it once.
fn set_internal_headers(
    host: &dyn Host,
    held: &Held,
    retries: RouterRetries,
) -> Result<(), crate::host::HostError> {
    if retries.block {
        host.set_request_header(MAX_RETRIES_HEADER, Some("0"))?;
        if retries.remove_caller_headers {
            for name in CALLER_RETRY_HEADERS {
                host.set_request_header(name, None)?;
            }
        }
    }
    host.set_request_header(headers::RECORD_ID, Some(&held.lock.record_id))?;
    host.set_request_header(headers::FENCING_TOKEN, Some(&held.lock.fencing_token.to_string()))?;
    host.set_request_header(headers::ATTEMPT_ID, Some(&held.lock.attempt_id))?;
    host.set_request_header(headers::SERVICE, Some(&held.id.service))?;
    host.set_request_header(headers::SCOPE, Some(&held.id.scope))?;
    host.set_request_header(headers::KEY, Some(&held.id.key))?;
    if let Some(point) = &held.lock.recovery_point {
        host.set_request_header(headers::RECOVERY_POINT, Some(point))?;
    }
    if let Some(previous) = held.lock.previous_attempt {
        host.set_request_header(headers::PREVIOUS_ATTEMPT, Some(previous.as_str()))?;
    }
    Ok(())
}

pub(crate) use calls::millis;

/// What a tracked request tells Envoy's router about retries.
#[derive(Clone, Copy)]
struct RouterRetries {
    /// `block_router_retries`: send it once.
    block: bool,
    /// The caller sent retry or hedging headers, to remove (only read when blocking; removing
    /// absent ones would cost five host calls per execution).
    remove_caller_headers: bool,
}

/// The acquire a reply answers: its attempt id and deadline (to abandon it if the answer is
/// lost), and whether it already waited in the store.
struct AcquireAttempt {
    attempt_id: String,
    deadline: Duration,
    waited: bool,
}

/// How many upstream attempts Envoy's router made for this stream (`upstream.request_attempt_count`,
/// which the router sets as each try starts); 1 when Envoy does not say.
fn router_attempts(host: &dyn Host) -> u64 {
    host.property(&["upstream", "request_attempt_count"])
        .and_then(|bytes| <[u8; 8]>::try_from(bytes.as_slice()).ok())
        .map_or(1, u64::from_le_bytes)
}

/// The store's `x-idempotency-store` value on answers from its replay listener.
const REPLAY_LISTENER: &str = "replay";

/// Short, stable, non-reversible name for a key in logs (never log the raw key).
pub fn key_hash(key: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(key.as_bytes());
    hex::encode(digest.get(..6).unwrap_or_default())
}

#[cfg(test)]
mod tests;
