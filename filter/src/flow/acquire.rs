//! Taking the lock: fingerprint the buffered request, ask the store (a second time, waiting,
//! for a key in progress), and act on its answer — forward holding the lock, replay, or refuse.

#[allow(clippy::wildcard_imports)] // the flow module's own types and imports
use super::*;

impl RequestFlow {
    pub(super) fn acquire(&mut self, host: &dyn Host, pending: Pending, body: &[u8]) -> Verdict {
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
    pub(super) fn acquire_body(
        &self,
        pending: &Pending,
        request: &RequestMatch,
        attempt_id: &str,
        now: Duration,
        wait: Duration,
    ) -> Result<(Vec<u8>, Duration, Duration), String> {
        let timeout = self.config.store.timeout.saturating_add(wait);
        let deadline = now.saturating_add(timeout);
        let body = calls::acquire(
            &pending.id,
            &AcquireParams {
                fingerprint: &request.fingerprint,
                method: &pending.method,
                path: &pending.path,
                lock_timeout: self.config.records.lock_timeout,
                retention: self.config.records.retention_period,
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
    pub(super) fn send_acquire(
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

    /// The store answered an acquire: decide what it means ([`decide`], pure), then act on it.
    #[allow(clippy::too_many_arguments)] // one acquire's parts
    pub(super) fn on_acquire_reply(
        &mut self,
        host: &dyn Host,
        now: Duration,
        pending: Pending,
        request: RequestMatch,
        attempt: AcquireAttempt,
        reply: CalloutReply,
    ) {
        let may_wait = !attempt.waited && !pending.in_progress_wait.is_zero();
        let verdict = match decide(reply, self.grpc, may_wait) {
            AcquireStep::StoreFailed {
                reason,
                may_have_landed,
            } => {
                // The acquire may still have landed (a timeout, a reply lost on the way): make
                // sure no lock is left behind for an attempt we are refusing now.
                if may_have_landed {
                    self.abandon(host, &pending.id, &attempt.attempt_id, attempt.deadline.max(now));
                }
                self.storage_failure(host, &format!("acquire failed: {reason}"))
            }
            AcquireStep::Forward(lock) => {
                host.count(Counter::Miss);
                self.forward_holding(host, now, pending, request, lock)
            }
            AcquireStep::Replay {
                response,
                record_expires_at,
            } => {
                host.count(Counter::Hit);
                debug(host, || {
                    format!(
                        "idempotency: key {} replayed (status {})",
                        key_hash(&pending.id.key),
                        response.status
                    )
                });
                let response = Rc::new(response);
                self.send_replay(host, &response);
                self.remember(host, &pending.id, request, response, record_expires_at);
                Verdict::Pause
            }
            AcquireStep::RouteReplayToStore { ticket } => self.route_replay_to_store(host, &pending, &ticket),
            AcquireStep::WaitForFirstAttempt => {
                let wait = pending.in_progress_wait;
                self.send_acquire(host, now, pending, request, attempt.attempt_id, wait)
            }
            AcquireStep::Refuse { counter, problem } => {
                host.count(counter);
                debug(host, || {
                    format!(
                        "idempotency: key {} refused: {} {}",
                        key_hash(&pending.id.key),
                        problem.status(),
                        problem.code.code()
                    )
                });
                self.answer(host, &problem)
            }
        };
        if verdict == Verdict::Continue {
            if let Err(e) = host.resume_request() {
                host.log(Level::Warn, &format!("idempotency: cannot resume request: {e}"));
            }
        }
    }

    /// The lock is ours: tell the upstream which record it runs under and let the request go.
    fn forward_holding(
        &mut self,
        host: &dyn Host,
        now: Duration,
        pending: Pending,
        request: RequestMatch,
        lock: Lock,
    ) -> Verdict {
        let held = Held {
            id: pending.id,
            lock,
            request,
            lock_expires_at: now.saturating_add(self.config.records.lock_timeout),
            grpc: self.grpc,
            record_mode: pending.record_mode,
        };
        let block = RouterRetries {
            block: self.config.policy.block_router_retries,
            remove_caller_headers: pending.caller_retry_headers,
        };
        if let Err(e) = set_internal_headers(host, &held, block) {
            // We hold the lock but cannot tell the upstream; the request never left.
            if let Ok(write) = calls::release(&held) {
                host.count(Counter::LockReleased);
                self.in_background(host, Some(write.in_background()));
            }
            return self.storage_failure(host, &e.to_string());
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

    /// A completed gRPC call: Envoy's local replies cannot carry its message, so the request is
    /// routed to the store's `/v1/replay` (by the `x-idempotency-replay-ticket` route), which
    /// answers with the stored headers, messages and trailers. The ticket is short-lived, bound
    /// to this record, and the only credential the store accepts there: no store token travels.
    pub(super) fn route_replay_to_store(
        &mut self,
        host: &dyn Host,
        pending: &Pending,
        ticket: &str,
    ) -> Verdict {
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
            .and_then(|()| host.set_request_header(":authority", Some(&self.config.store.authority)))
            .and_then(|()| host.clear_route_cache());
        if let Err(e) = routed {
            return self.storage_failure(host, &format!("cannot route the gRPC replay: {e}"));
        }
        self.state = State::Replaying;
        Verdict::Continue
    }

    /// Answer from the proxy-local cache of completed records: replay, or 422 when the key was
    /// completed with other parameters. No callout, no upstream.
    pub(super) fn answer_from_cache(
        &mut self,
        host: &dyn Host,
        pending: &Pending,
        same_request: bool,
        response: &StoredResponse,
    ) -> Verdict {
        if !same_request {
            host.count(Counter::ParameterMismatch);
            return self.answer(host, &Problem::parameter_mismatch());
        }
        host.count(Counter::Hit);
        host.count(Counter::ReplayCacheHit);
        debug(host, || {
            format!(
                "idempotency: key {} replayed from the proxy cache",
                key_hash(&pending.id.key)
            )
        });
        self.send_replay(host, response);
        Verdict::Pause
    }
}

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
pub(super) struct AcquireAttempt {
    pub(super) attempt_id: String,
    pub(super) deadline: Duration,
    pub(super) waited: bool,
}

/// What the store's answer to an acquire means for this request (decided without the host).
#[derive(Debug)]
pub(super) enum AcquireStep {
    /// The answer is unusable: a store failure (`failure_mode` decides). `may_have_landed`:
    /// the lock may have been taken anyway (a timeout, a lost reply), so it is abandoned.
    StoreFailed { reason: String, may_have_landed: bool },
    /// The lock is ours: forward the request.
    Forward(Lock),
    /// Completed: answer with the stored response, and cache it until `record_expires_at`.
    Replay {
        response: StoredResponse,
        record_expires_at: Duration,
    },
    /// A completed gRPC call: route the request to the store's replay listener.
    RouteReplayToStore { ticket: String },
    /// In progress, and this request may wait: ask again, waiting in the store.
    WaitForFirstAttempt,
    /// Refuse with this problem (409 in progress, 422 other parameters, gRPC not replayable),
    /// counted under `counter`.
    Refuse { counter: Counter, problem: Problem },
}

/// Decide what an acquire's reply means: `grpc` for a gRPC call (replays are routed, bodies
/// without messages cannot be replayed), `may_wait` when a key in progress may be asked again
/// with a wait.
pub(super) fn decide(reply: CalloutReply, grpc: bool, may_wait: bool) -> AcquireStep {
    let answer = match reply.status {
        Some(200) => serde_json::from_slice::<AcquireResponse>(&reply.body).map_err(|e| e.to_string()),
        other => Err(format!(
            "status {other:?}: {}",
            String::from_utf8_lossy(reply.body.get(..200).unwrap_or(&reply.body))
        )),
    };
    match answer {
        Err(reason) => AcquireStep::StoreFailed {
            reason,
            // 400/401/403, and 408 (arrived after its deadline) are definite: nothing was taken.
            may_have_landed: !matches!(reply.status, Some(400 | 401 | 403 | 408)),
        },
        Ok(AcquireResponse::Acquired(lock)) => AcquireStep::Forward(lock),
        // Completed, but streamed through without its messages (over `max_response_size`):
        // a gRPC client cannot use a replay without them, and it must not run again.
        Ok(AcquireResponse::Completed { response, .. }) if grpc && response.body_omitted => {
            let status = crate::reply::grpc::status_of(&response.trailers)
                .or_else(|| crate::reply::grpc::status_of(&response.headers))
                .and_then(|code| {
                    crate::reply::grpc::CODE_NAMES
                        .get(usize::try_from(code).ok()?)
                        .copied()
                })
                .unwrap_or("unknown");
            AcquireStep::Refuse {
                counter: Counter::Hit,
                problem: Problem::new(
                    ErrorCode::ResponseNotReplayable,
                    format!("This call already completed with status {status}; its response was larger than max_response_size and cannot be replayed. It will not run again with this Idempotency-Key"),
                )
                .detail("completedStatus", status),
            }
        }
        Ok(AcquireResponse::Completed {
            replay_ticket: Some(ticket),
            ..
        }) if grpc => AcquireStep::RouteReplayToStore { ticket },
        Ok(AcquireResponse::Completed {
            response,
            expires_at_ms,
            ..
        }) => AcquireStep::Replay {
            response,
            record_expires_at: expires_at_ms.map_or(Duration::MAX, Duration::from_millis),
        },
        // A double submit: ask again, waiting in the store for the first attempt's answer.
        // Not for a lock kept because its outcome is unknown: it holds to its end.
        Ok(AcquireResponse::InProgress {
            outcome_unknown: false,
            ..
        }) if may_wait => AcquireStep::WaitForFirstAttempt,
        Ok(AcquireResponse::InProgress {
            lock_remaining_ms,
            outcome_unknown,
        }) => AcquireStep::Refuse {
            counter: Counter::ConcurrentCollision,
            problem: Problem::in_progress(lock_remaining_ms, outcome_unknown),
        },
        Ok(AcquireResponse::Mismatch) => AcquireStep::Refuse {
            counter: Counter::ParameterMismatch,
            problem: Problem::parameter_mismatch(),
        },
    }
}
