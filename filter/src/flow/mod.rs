//! Per-request state machine: decide, fingerprint, acquire, forward or answer, record.
//!
//! Host callbacks call into [`RequestFlow`]; it returns a [`Verdict`] for the callback and never
//! touches proxy-wasm directly. Callout replies resume or answer the paused stream themselves.
//! Shadow requests (mode `shadow`, or keys outside a rule's enforced percentage) take the same
//! store path but never pause for the store or change a response: they only count and record
//! what enforcement would have done (`shadow.rs`).

use std::rc::Rc;
use std::time::Duration;

use idempotency_wire::{
    headers, paths, AcquireRequest, AcquireResponse, CompleteRequest, Lock, RecordId, ReleaseRequest,
    StoredResponse,
};

use crate::config::{Config, FailureMode, Mode};
use crate::fingerprint::{fingerprint, fingerprint_body, is_json_content_type};
use crate::host::{Callout, CalloutReply, Host, Level};
use crate::key::{parse_key, KeyError};
use crate::metadata::parse_route_overrides;
use crate::metrics::Counter;
use crate::policy::{key_is_enforced, route_policy};
use crate::problem::{ErrorCode, Problem};
use crate::replay::{replay_headers, storable_headers};
use crate::scope::resolve_scope;

pub mod shadow;

use std::cell::RefCell;

use shadow::ShadowJob;

use crate::background::{Background, BackgroundCall};
use crate::cache::ReplayCache;

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

/// A request waiting for its body or its acquire.
#[derive(Debug, Clone)]
struct Pending {
    id: RecordId,
    method: String,
    path: String,
    fingerprint_headers: Vec<(String, String)>,
    /// Canonicalise the body as JSON before hashing.
    json: bool,
    /// JSON pointers removed before hashing.
    exclude_fields: Vec<String>,
    /// Shadow: record and count, never block or answer.
    shadow: bool,
}

/// A request that holds the lock.
#[derive(Debug, Clone)]
struct Held {
    id: RecordId,
    lock: Lock,
    /// The request's fingerprint, to cache the completed record under.
    fingerprint: String,
}

/// A completed record to cache once the store acknowledged it.
#[derive(Debug)]
struct CacheCandidate {
    id: RecordId,
    fingerprint: String,
    response: Rc<StoredResponse>,
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
        fingerprint: String,
    },
    /// Forwarded upstream while holding the lock.
    Executing(Held),
    /// Upstream answered with a status to store; collecting its body.
    AwaitingResponseBody {
        held: Held,
        status: u16,
        headers: Vec<(String, String)>,
    },
    /// `complete` or `release` in flight; the response is held until it is acknowledged.
    Recording {
        token: u32,
        operation: &'static str,
        cache: Option<CacheCandidate>,
    },
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
        }
    }

    fn remember(&self, host: &dyn Host, id: &RecordId, fingerprint: &str, response: Rc<StoredResponse>) {
        let expires_at = host.now().saturating_add(self.config.replay_cache_ttl);
        self.cache
            .borrow_mut()
            .insert(&id.scope, &id.key, fingerprint, response, expires_at);
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

        let header = |wanted: &str| {
            request_headers
                .iter()
                .find(|(n, _)| n == wanted)
                .map(|(_, v)| v.as_str())
        };
        let method = header(":method").unwrap_or_default().to_owned();
        let path = header(":path").unwrap_or_default().to_owned();
        let config = self.config.clone();
        let candidate = config.acts_on_method(&method)
            || config
                .routes
                .iter()
                .any(|r| r.methods.as_ref().is_some_and(|m| m.contains(&method)));
        if !candidate {
            return Verdict::Continue;
        }
        let overrides = host
            .property(&[
                "xds",
                "route_metadata",
                "filter_metadata",
                &config.route_metadata_namespace,
            ])
            .and_then(|bytes| match parse_route_overrides(&bytes) {
                Ok(o) => Some(o),
                Err(e) => {
                    host.log(Level::Warn, &format!("idempotency: ignoring route metadata: {e}"));
                    None
                }
            });
        let Some(policy) = route_policy(&config, &method, &path, overrides.as_ref()) else {
            return Verdict::Continue;
        };

        let mut keys = request_headers
            .iter()
            .filter(|(n, _)| n == "idempotency-key")
            .map(|(_, v)| v);
        let raw_key = match (keys.next(), keys.next()) {
            (None, _) => {
                host.count(Counter::KeyMissing);
                if policy.mode == Mode::Required {
                    if policy.percentage < 100.0 {
                        host.count(Counter::ShadowWouldReject);
                        return Verdict::Continue;
                    }
                    host.log(
                        Level::Debug,
                        &format!(
                            "idempotency: {method} {path}: key required but missing (rule {})",
                            policy.rule
                        ),
                    );
                    return self.answer(
                        host,
                        &Problem::new(
                            ErrorCode::KeyRequired,
                            format!("{method} requests to this endpoint require an Idempotency-Key header"),
                        )
                        .detail("header", "Idempotency-Key"),
                    );
                }
                return Verdict::Continue;
            }
            (Some(raw), Some(_)) => Err((KeyError::Repeated, raw.as_str())),
            (Some(raw), None) => parse_key(raw, config.max_key_length)
                .map(str::to_owned)
                .map_err(|e| (e, raw.as_str())),
        };
        let key = match raw_key {
            Ok(key) => key,
            Err((error, raw)) => {
                host.count(Counter::KeyInvalid);
                if policy.mode == Mode::Shadow || !key_is_enforced(raw, policy.percentage) {
                    host.count(Counter::ShadowWouldReject);
                    return Verdict::Continue;
                }
                host.log(
                    Level::Debug,
                    &format!("idempotency: {method} {path}: invalid key: {error}"),
                );
                return self.answer(
                    host,
                    &Problem::new(ErrorCode::KeyInvalid, error.to_string())
                        .detail("reason", error.reason())
                        .detail("maxLength", config.max_key_length),
                );
            }
        };
        let shadow = policy.mode == Mode::Shadow || !key_is_enforced(&key, policy.percentage);

        if let Some(length) = header("content-length").and_then(|v| v.trim().parse::<usize>().ok()) {
            if length > config.max_request_body {
                if shadow {
                    host.count(Counter::ShadowWouldReject);
                    return Verdict::Continue;
                }
                return self.too_large(host);
            }
        }

        let scope = resolve_scope(
            &config.scope_from,
            &config.jwt_payload_metadata_key,
            |name| header(name).map(str::to_owned),
            |path| host.property(path),
        );
        let fingerprint_headers = config
            .fingerprint_headers
            .iter()
            .filter_map(|name| header(name).map(|v| (name.clone(), v.to_owned())))
            .collect();
        let json = config.json_canonical && header("content-type").is_some_and(is_json_content_type);
        let exclude_fields = config
            .exclude_fields
            .iter()
            .chain(policy.exclude_fields.iter())
            .cloned()
            .collect();
        let pending = Pending {
            id: RecordId {
                service: config.service_name.clone(),
                scope,
                key,
            },
            method,
            path,
            fingerprint_headers,
            json,
            exclude_fields,
            shadow,
        };
        if end_of_stream {
            return self.acquire(host, pending, &[]);
        }
        self.state = State::AwaitingRequestBody(pending);
        Verdict::Pause
    }

    /// Request body data arrived (`body_size` is everything buffered so far).
    pub fn on_request_body(&mut self, host: &dyn Host, body_size: usize, end_of_stream: bool) -> Verdict {
        let State::AwaitingRequestBody(pending) = &self.state else {
            return Verdict::Continue;
        };
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

    /// Response headers arrived from upstream (or from Envoy on upstream failure).
    pub fn on_response_headers(&mut self, host: &dyn Host, end_of_stream: bool) -> Verdict {
        if let State::Shadow(job) = &self.state {
            let call = job
                .borrow_mut()
                .on_response_headers(host, &self.config, end_of_stream);
            self.in_background(host, call);
            return Verdict::Continue;
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
                return self.release(host, &held);
            }
        };
        let status = response_headers
            .iter()
            .find(|(n, _)| n == ":status")
            .and_then(|(_, v)| v.parse::<u16>().ok());
        let Some(status) = status.filter(|s| self.config.stores_status(*s)) else {
            return self.release(host, &held);
        };
        let stored_headers = storable_headers(response_headers, &self.config.replay_header_denylist);
        if end_of_stream {
            return self.complete(host, &held, status, stored_headers, Vec::new(), false);
        }
        self.state = State::AwaitingResponseBody {
            held,
            status,
            headers: stored_headers,
        };
        Verdict::Pause
    }

    /// Response body data arrived (`body_size` is everything buffered so far).
    pub fn on_response_body(&mut self, host: &dyn Host, body_size: usize, end_of_stream: bool) -> Verdict {
        match &self.state {
            State::AwaitingResponseBody {
                held,
                status,
                headers,
            } => {
                let (held, status, headers) = (held.clone(), *status, headers.clone());
                if body_size > self.config.max_response_size {
                    host.log(
                        Level::Warn,
                        &format!(
                            "idempotency: response of {} over max_response_size ({} bytes); recording it without body",
                            key_hash(&held.id.key),
                            self.config.max_response_size
                        ),
                    );
                    return self.complete(host, &held, status, headers, Vec::new(), true);
                }
                if !end_of_stream {
                    return Verdict::Pause;
                }
                match host.response_body(body_size) {
                    Ok(body) => self.complete(host, &held, status, headers, body, false),
                    Err(e) => {
                        host.log(
                            Level::Warn,
                            &format!("idempotency: cannot read response body: {e}"),
                        );
                        self.release(host, &held)
                    }
                }
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
                fingerprint,
            } if expected == token => {
                host.record_acquire_duration(host.now().saturating_sub(started));
                self.on_acquire_reply(host, pending, fingerprint, reply);
            }
            State::Recording {
                token: expected,
                operation,
                cache,
            } if expected == token => {
                if let (Some(200), Some(candidate)) = (reply.status, cache) {
                    self.remember(host, &candidate.id, &candidate.fingerprint, candidate.response);
                }
                if reply.status != Some(200) {
                    host.count(Counter::StorageError);
                    host.log(
                        Level::Warn,
                        &format!(
                            "idempotency: store {operation} failed (status {:?}: {}); delivering the upstream response anyway",
                            reply.status,
                            String::from_utf8_lossy(reply.body.get(..200).unwrap_or(&reply.body))
                        ),
                    );
                }
                self.state = State::Finished;
                if let Err(e) = host.resume_response() {
                    host.log(Level::Warn, &format!("idempotency: cannot resume response: {e}"));
                }
            }
            other => {
                // A reply for a call we no longer wait for (e.g. a release sent at stream end).
                self.state = other;
            }
        }
    }

    /// The stream is ending. If we still hold a lock, the upstream never completed: release it
    /// (from the root context, since this stream's own callouts die with it).
    pub fn on_stream_done(&mut self, host: &dyn Host) {
        let held = match std::mem::replace(&mut self.state, State::Finished) {
            State::Executing(held) | State::AwaitingResponseBody { held, .. } => held,
            State::Shadow(job) => {
                let call = job.borrow_mut().on_stream_done();
                self.in_background(host, call);
                return;
            }
            _ => return,
        };
        host.log(
            Level::Warn,
            &format!(
                "idempotency: key {} abandoned before the upstream answered; releasing its lock",
                key_hash(&held.id.key)
            ),
        );
        self.release_detached(host, &held);
    }

    fn on_acquire_reply(
        &mut self,
        host: &dyn Host,
        pending: Pending,
        fingerprint: String,
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
            Err(reason) => self.storage_failure(host, &format!("acquire failed: {reason}")),
            Ok(AcquireResponse::Acquired(lock)) => {
                host.count(Counter::Miss);
                let held = Held {
                    id: pending.id,
                    lock,
                    fingerprint,
                };
                if let Err(e) = set_internal_headers(host, &held) {
                    // We hold the lock but cannot tell the upstream: give it back and fail.
                    self.release_detached(host, &held);
                    let verdict = self.storage_failure(host, &e.to_string());
                    if verdict == Verdict::Continue {
                        if let Err(e) = host.resume_request() {
                            host.log(Level::Warn, &format!("idempotency: cannot resume request: {e}"));
                        }
                    }
                    return;
                }
                host.log(
                    Level::Debug,
                    &format!(
                        "idempotency: key {} acquired (token {}, resumed {})",
                        key_hash(&held.id.key),
                        held.lock.fencing_token,
                        held.lock.resumed
                    ),
                );
                self.state = State::Executing(held);
                Verdict::Continue
            }
            Ok(AcquireResponse::Completed { response }) => {
                host.count(Counter::Hit);
                host.log(
                    Level::Debug,
                    &format!(
                        "idempotency: key {} replayed (status {})",
                        key_hash(&pending.id.key),
                        response.status
                    ),
                );
                let headers = replay_headers(&response, &self.config.replay_header_denylist);
                if let Err(e) = host.send_response(response.status, &headers, &response.body) {
                    host.log(Level::Warn, &format!("idempotency: cannot send replay: {e}"));
                }
                self.remember(host, &pending.id, &fingerprint, Rc::new(response));
                self.state = State::Finished;
                Verdict::Pause
            }
            Ok(AcquireResponse::InProgress { lock_remaining_ms }) => {
                host.count(Counter::ConcurrentCollision);
                host.log(
                    Level::Debug,
                    &format!("idempotency: key {} in progress: 409", key_hash(&pending.id.key)),
                );
                let retry_after = CONFLICT_RETRY_AFTER_SECS.min(lock_remaining_ms.div_ceil(1000));
                self.answer(
                    host,
                    &Problem::new(
                        ErrorCode::ConcurrentRequest,
                        "A request with this Idempotency-Key is being processed; retry with the same key later",
                    )
                    .retry_after(retry_after),
                )
            }
            Ok(AcquireResponse::Mismatch) => {
                host.count(Counter::ParameterMismatch);
                host.log(
                    Level::Debug,
                    &format!(
                        "idempotency: key {} reused with other parameters: 422",
                        key_hash(&pending.id.key)
                    ),
                );
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

    /// Answer from the proxy-local cache of completed records: replay, or 422 when the key was
    /// completed with other parameters. No callout, no upstream.
    fn answer_from_cache(
        &mut self,
        host: &dyn Host,
        pending: &Pending,
        fingerprint: &str,
        cached_fingerprint: &str,
        response: &StoredResponse,
    ) -> Verdict {
        if fingerprint != cached_fingerprint {
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
        host.log(
            Level::Debug,
            &format!(
                "idempotency: key {} replayed from the proxy cache",
                key_hash(&pending.id.key)
            ),
        );
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
        let limit = self.config.max_request_body;
        self.answer(
            host,
            &Problem::new(
                ErrorCode::RequestTooLarge,
                format!("The request body is larger than {limit} bytes, the most this endpoint fingerprints"),
            )
            .detail("maxBytes", limit),
        )
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
        let exclude: Vec<&str> = pending.exclude_fields.iter().map(String::as_str).collect();
        let body = fingerprint_body(body, pending.json, &exclude);
        let fingerprint = fingerprint(
            &pending.method,
            &pending.path,
            &pending.fingerprint_headers,
            &body,
        );
        if !pending.shadow {
            let cached = self
                .cache
                .borrow_mut()
                .get(&pending.id.scope, &pending.id.key, host.now());
            if let Some(record) = cached {
                return self.answer_from_cache(
                    host,
                    &pending,
                    &fingerprint,
                    &record.fingerprint,
                    &record.response,
                );
            }
        }
        let request = AcquireRequest {
            id: pending.id.clone(),
            fingerprint: fingerprint.clone(),
            method: pending.method.clone(),
            path: pending.path.clone(),
            lock_timeout_ms: millis(self.config.lock_timeout),
            retention_ms: millis(self.config.retention_period),
        };
        let payload = serde_json::to_vec(&request).map_err(|e| format!("cannot encode acquire: {e}"));
        if pending.shadow {
            // Shadow never waits for the store: the root context asks it on the side.
            match payload {
                Ok(body) => {
                    let job = Rc::new(RefCell::new(ShadowJob::new(pending.id, &self.config)));
                    self.in_background(
                        host,
                        Some(BackgroundCall {
                            path: paths::ACQUIRE,
                            body,
                            job: Some(job.clone()),
                        }),
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
        let dispatched = payload.and_then(|payload| {
            host.dispatch(&Callout {
                path: paths::ACQUIRE,
                body: &payload,
            })
            .map_err(|e| e.to_string())
        });
        match dispatched {
            Ok(token) => {
                self.state = State::Acquiring {
                    token,
                    started: host.now(),
                    pending,
                    fingerprint,
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
        host.count(Counter::ResponseRecorded);
        let request = CompleteRequest {
            id: held.id.clone(),
            fencing_token: held.lock.fencing_token,
            response: StoredResponse {
                status,
                headers,
                body,
                body_omitted,
            },
            retention_ms: millis(self.config.retention_period),
        };
        let payload = serde_json::to_vec(&request);
        let cache = CacheCandidate {
            id: request.id,
            fingerprint: held.fingerprint.clone(),
            response: Rc::new(request.response),
        };
        self.record(host, paths::COMPLETE, "complete", payload, Some(cache))
    }

    /// Give the lock back (retryable status or upstream failure), holding the response until done.
    fn release(&mut self, host: &dyn Host, held: &Held) -> Verdict {
        host.count(Counter::LockReleased);
        let request = ReleaseRequest {
            id: held.id.clone(),
            fencing_token: held.lock.fencing_token,
        };
        self.record(
            host,
            paths::RELEASE,
            "release",
            serde_json::to_vec(&request),
            None,
        )
    }

    /// Release without waiting for the answer (nothing is held for it).
    fn release_detached(&self, host: &dyn Host, held: &Held) {
        host.count(Counter::LockReleased);
        let request = ReleaseRequest {
            id: held.id.clone(),
            fencing_token: held.lock.fencing_token,
        };
        match serde_json::to_vec(&request) {
            Ok(body) => self.in_background(
                host,
                Some(BackgroundCall {
                    path: paths::RELEASE,
                    body,
                    job: None,
                }),
            ),
            Err(e) => host.log(Level::Warn, &format!("idempotency: cannot encode release: {e}")),
        }
    }

    /// Send `complete`/`release`; on failure deliver the upstream response anyway.
    ///
    /// Deliberate: the upstream effect has happened. Replacing its answer with a 503 would invite
    /// the client to retry, and once the lock expires that retry would execute a second time.
    /// Delivering it (and counting the storage error) is never worse for exactly-once.
    fn record(
        &mut self,
        host: &dyn Host,
        path: &str,
        operation: &'static str,
        payload: Result<Vec<u8>, serde_json::Error>,
        cache: Option<CacheCandidate>,
    ) -> Verdict {
        let dispatched = payload.map_err(|e| e.to_string()).and_then(|body| {
            host.dispatch(&Callout { path, body: &body })
                .map_err(|e| e.to_string())
        });
        match dispatched {
            Ok(token) => {
                self.state = State::Recording {
                    token,
                    operation,
                    cache,
                };
                Verdict::Pause
            }
            Err(e) => {
                host.count(Counter::StorageError);
                host.log(
                    Level::Warn,
                    &format!("idempotency: cannot {operation} record: {e}"),
                );
                self.state = State::Finished;
                Verdict::Continue
            }
        }
    }
}

/// Tell the upstream which record it runs under (and where to resume).
fn set_internal_headers(host: &dyn Host, held: &Held) -> Result<(), crate::host::HostError> {
    host.set_request_header(headers::RECORD_ID, Some(&held.lock.record_id))?;
    host.set_request_header(headers::FENCING_TOKEN, Some(&held.lock.fencing_token.to_string()))?;
    host.set_request_header(headers::SERVICE, Some(&held.id.service))?;
    host.set_request_header(headers::SCOPE, Some(&held.id.scope))?;
    host.set_request_header(headers::KEY, Some(&held.id.key))?;
    if let Some(point) = &held.lock.recovery_point {
        host.set_request_header(headers::RECOVERY_POINT, Some(point))?;
    }
    Ok(())
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Short, stable, non-reversible name for a key in logs (never log the raw key).
pub fn key_hash(key: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(key.as_bytes());
    hex::encode(digest.get(..6).unwrap_or_default())
}

#[cfg(test)]
mod tests;
