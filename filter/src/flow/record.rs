//! Writing the outcome: complete, release or outcome-unknown, held until acknowledged
//! (write-ahead) or sent from the root context (async, retries, abandons).

#[allow(clippy::wildcard_imports)] // the flow module's own types and imports
use super::*;

impl RequestFlow {
    /// Store the response, holding it until the store acknowledged (write-ahead).
    pub(super) fn complete(
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
    pub(super) fn complete_with_trailers(
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
            record_expires_at: host.now().saturating_add(self.config.records.retention_period),
        };
        match calls::complete(held, response, self.config.records.retention_period) {
            Ok(write) => self.record(host, held.record_mode, write, Some(cache)),
            Err(e) => self.cannot_encode(host, "complete", &e),
        }
    }

    /// A streamed response ended: record it as completed without its body (from the root context,
    /// since the stream is about to end).
    pub(super) fn record_streamed(
        &mut self,
        host: &dyn Host,
        held: &Held,
        status: u16,
        headers: Vec<(String, String)>,
    ) {
        host.count(Counter::ResponseRecorded);
        host.count(Counter::ResponseStreamed);
        let response = StoredResponse {
            status,
            headers,
            body: Vec::new(),
            body_omitted: true,
            trailers: Vec::new(),
        };
        match calls::complete(held, response, self.config.records.retention_period) {
            Ok(write) => self.in_background(host, Some(write.in_background())),
            Err(e) => {
                self.cannot_encode(host, "complete", &e);
            }
        }
        self.state = State::Finished;
    }

    /// Give the lock back (the upstream's own retryable answer, or a request that provably never
    /// left Envoy), holding the response until the store acknowledged.
    pub(super) fn release(&mut self, host: &dyn Host, held: &Held) -> Verdict {
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
    pub(super) fn outcome_unknown(&mut self, host: &dyn Host, held: &Held, reason: UnknownReason) -> Verdict {
        host.count(Counter::OutcomeUnknown);
        host.log(
            Level::Warn,
            &format!(
                "idempotency: key {} outcome unknown ({}); its lock is kept for up to {}",
                key_hash(&held.id.key),
                reason.as_str(),
                humantime_secs(self.config.records.lock_timeout)
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
    pub(super) fn abandon(&self, host: &dyn Host, id: &RecordId, attempt_id: &str, deadline: Duration) {
        match calls::abandon(id, attempt_id, deadline) {
            Ok(call) => self.in_background(host, Some(call)),
            Err(e) => host.log(Level::Warn, &format!("idempotency: cannot encode abandon: {e}")),
        }
    }

    /// Hand a holder write to the root context to retry.
    pub(super) fn retry_write(&self, host: &dyn Host, write: HolderWrite) {
        host.count(Counter::WriteRetried);
        self.in_background(host, Some(write.in_background()));
    }

    pub(super) fn cannot_encode(
        &mut self,
        host: &dyn Host,
        operation: &str,
        error: &serde_json::Error,
    ) -> Verdict {
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
    pub(super) fn record(
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
            timeout: self.config.store.timeout,
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

/// How many upstream attempts Envoy's router made for this stream (`upstream.request_attempt_count`,
/// which the router sets as each try starts); 1 when Envoy does not say.
fn router_attempts(host: &dyn Host) -> u64 {
    host.property(&["upstream", "request_attempt_count"])
        .and_then(|bytes| <[u8; 8]>::try_from(bytes.as_slice()).ok())
        .map_or(1, u64::from_le_bytes)
}
