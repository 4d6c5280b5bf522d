//! Store calls that must outlive their HTTP stream, made (and retried) from the root context.
//!
//! A stream's own store calls (`store/batch.rs`) answer to the stream's flow, which ends with the
//! stream: a call whose outcome matters after that, or that must be retried, is queued here
//! instead: shadow acquires and records, `complete`/`release`/`outcome-unknown` writes whose
//! stream ended or whose first try failed, and `abandon` of an acquire the proxy gave up on. The
//! root context, which lives as long as the VM, dispatches them on its tick and reads their
//! replies. A call with a retry
//! window is retried with backoff after a transient failure (no reply, 5xx, 408, 429) until it
//! succeeds, the store refuses it for good (fencing: 409; gone: 404; 4xx), or the window ends
//! (for holder writes: when the lock expires, after which the write could not succeed anyway).
//! Everything stays on one worker thread (one Wasm instance), so `Rc`/`RefCell` sharing is enough.
//!
//! A `batched` call (`record_mode: async` writes, made for every execution) goes through the
//! worker's batcher like a stream's calls, so it shares a callout with them; its reply comes back
//! here by the batcher's token ([`Background::on_batched_reply`]). The others are dispatched alone.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::time::Duration;

use idempotency_wire::AbandonResponse;

use crate::config::Config;
use crate::host::{debug, Callout, CalloutReply, Host, Level};
use crate::metrics::Counter;
use crate::reply::cache::CacheCandidate;

/// A call's owner that acts on its reply (a shadow job on its acquire's answer), perhaps with a
/// call of its own. Background calls know their owners only by this, so the store calls do not
/// depend on the request flow.
pub trait AwaitsReply: std::fmt::Debug {
    /// The reply arrived; the follow-up call, if any.
    fn on_reply(&mut self, host: &dyn Host, config: &Config, reply: CalloutReply) -> Option<BackgroundCall>;
}

/// First pause before a retry; doubled per try up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_millis(50);
/// Longest pause between retries.
pub const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// How a call's successful (200) reply is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// Any 200 is the end.
    OnSuccess,
    /// `abandon`: a reply of "released: false" is final only once this time has passed, because
    /// the abandoned acquire may still be on its way to storage (it is refused after its
    /// deadline, which lies before this).
    AbandonAfter(Duration),
}

/// One queued store call.
#[derive(Debug)]
pub struct BackgroundCall {
    /// Store path, e.g. `/v1/release`.
    pub path: &'static str,
    /// JSON body.
    pub body: Vec<u8>,
    /// Who waits for this call's reply (shadow acquires only).
    pub job: Option<Rc<RefCell<dyn AwaitsReply>>>,
    /// Retry transient failures until this host time; `None`: one try only.
    pub retry_until: Option<Duration>,
    /// How a 200 reply is read.
    pub settle: Settle,
    /// Sent through the batcher (with the streams' calls) instead of alone.
    pub batched: bool,
    /// Cached once the store acknowledged it (an async `complete`).
    pub cache: Option<CacheCandidate>,
    /// Made instead when the store refuses this call as too large (413): a `complete` becomes
    /// the `outcome-unknown` that keeps its lock.
    pub if_too_large: Option<Box<BackgroundCall>>,
    tries: u32,
    not_before: Duration,
}

impl BackgroundCall {
    /// A call tried once (shadow tracking: best effort by design).
    pub fn once(path: &'static str, body: Vec<u8>) -> BackgroundCall {
        BackgroundCall {
            path,
            body,
            job: None,
            retry_until: None,
            settle: Settle::OnSuccess,
            batched: false,
            cache: None,
            if_too_large: None,
            tries: 0,
            not_before: Duration::ZERO,
        }
    }

    /// A shadow acquire whose reply goes to `job`.
    pub fn shadow_acquire(
        path: &'static str,
        body: Vec<u8>,
        job: Rc<RefCell<dyn AwaitsReply>>,
    ) -> BackgroundCall {
        BackgroundCall {
            job: Some(job),
            ..BackgroundCall::once(path, body)
        }
    }

    /// A call that must happen: retried until it succeeds, is refused, or `until` passes.
    pub fn retried(path: &'static str, body: Vec<u8>, until: Duration) -> BackgroundCall {
        BackgroundCall {
            retry_until: Some(until),
            ..BackgroundCall::once(path, body)
        }
    }

    /// An `abandon`, retried until it releases, or until `settle_after` has passed with the store
    /// saying the attempt holds nothing.
    pub fn abandon(
        path: &'static str,
        body: Vec<u8>,
        settle_after: Duration,
        until: Duration,
    ) -> BackgroundCall {
        BackgroundCall {
            settle: Settle::AbandonAfter(settle_after),
            ..BackgroundCall::retried(path, body, until)
        }
    }

    /// The same call, sent through the batcher.
    pub fn batched(self) -> BackgroundCall {
        BackgroundCall {
            batched: true,
            ..self
        }
    }

    /// The same call, whose acknowledgement puts `cache` into the replay cache.
    pub fn caching(self, cache: Option<CacheCandidate>) -> BackgroundCall {
        BackgroundCall { cache, ..self }
    }

    /// The same call, replaced by `fallback` should the store refuse it as too large.
    pub fn if_too_large(self, fallback: Option<BackgroundCall>) -> BackgroundCall {
        BackgroundCall {
            if_too_large: fallback.map(Box::new),
            ..self
        }
    }

    /// Number of tries so far.
    pub fn tries(&self) -> u32 {
        self.tries
    }
}

/// Pause before try number `tries + 1`.
pub fn backoff(tries: u32) -> Duration {
    FIRST_BACKOFF
        .saturating_mul(1u32 << tries.min(16))
        .min(MAX_BACKOFF)
}

/// Most calls kept queued; beyond this new ones are dropped (and counted as storage errors)
/// rather than growing without bound while the store is unreachable.
pub const MAX_QUEUED: usize = 10_000;

/// The per-VM queue of background calls and their in-flight replies.
#[derive(Debug, Default)]
pub struct Background {
    queue: RefCell<VecDeque<BackgroundCall>>,
    /// Calls dispatched alone, by callout token.
    in_flight: RefCell<HashMap<u32, BackgroundCall>>,
    /// Calls handed to the batcher, by its token.
    in_batcher: RefCell<HashMap<u32, BackgroundCall>>,
}

/// How one reply ends a call.
enum Verdict {
    Done,
    Refused,
    TooLarge,
    Retry,
}

/// How a holder write's reply status is read, in the stream and here alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteReply {
    /// Acknowledged.
    Done,
    /// Refused for good (fenced out, record gone, malformed): nothing to retry.
    Refused,
    /// 413: the store does not take a request this large; a `complete` keeps its lock instead.
    TooLarge,
    /// Worth another try: no reply, 5xx, 408, 429, and 401/403 (credentials being rotated, or a
    /// binding being fixed: the write is retried until the lock expires rather than lost).
    Retry,
}

impl WriteReply {
    /// Read a reply status.
    pub fn of(status: Option<u16>) -> WriteReply {
        match status {
            Some(200) => WriteReply::Done,
            Some(413) => WriteReply::TooLarge,
            Some(401 | 403 | 408 | 429) | None => WriteReply::Retry,
            Some(400..=499) => WriteReply::Refused,
            Some(_) => WriteReply::Retry,
        }
    }
}

impl Background {
    /// Queue a call for the root context to make.
    pub fn enqueue(&self, host: &dyn Host, call: BackgroundCall) {
        let mut queue = self.queue.borrow_mut();
        if queue.len() >= MAX_QUEUED {
            host.count(Counter::StorageError);
            host.log(
                Level::Warn,
                &format!("idempotency: background queue full, dropping {}", call.path),
            );
            return;
        }
        queue.push_back(call);
    }

    /// Calls waiting to be dispatched (including those waiting for a retry).
    pub fn queued(&self) -> usize {
        self.queue.borrow().len()
    }

    /// Calls dispatched and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.in_flight.borrow().len() + self.in_batcher.borrow().len()
    }

    /// Root context: dispatch every queued call that is due.
    pub fn drain(&self, host: &dyn Host, config: &Config) {
        let now = host.now();
        let due: Vec<BackgroundCall> = {
            let mut queue = self.queue.borrow_mut();
            let (due, later): (VecDeque<_>, VecDeque<_>) = queue.drain(..).partition(|c| c.not_before <= now);
            *queue = later;
            due.into()
        };
        for mut call in due {
            call.tries = call.tries.saturating_add(1);
            let dispatched = host.dispatch(&Callout {
                path: call.path,
                body: &call.body,
                timeout: config.store.timeout,
                // The root context's own calls are dispatched as they are, unless batched.
                may_batch: call.batched,
            });
            match dispatched {
                Ok(token) if call.batched => {
                    self.in_batcher.borrow_mut().insert(token, call);
                }
                Ok(token) => {
                    self.in_flight.borrow_mut().insert(token, call);
                }
                Err(e) => {
                    host.log(
                        Level::Warn,
                        &format!("idempotency: background {} failed: {e}", call.path),
                    );
                    self.retry_or_give_up(host, call, &e.to_string());
                }
            }
        }
    }

    fn retry_or_give_up(&self, host: &dyn Host, mut call: BackgroundCall, reason: &str) {
        let now = host.now();
        match call.retry_until {
            Some(until) if now < until => {
                call.not_before = now.saturating_add(backoff(call.tries));
                self.enqueue(host, call);
            }
            _ => {
                host.count(Counter::StorageError);
                host.log(
                    Level::Warn,
                    &format!(
                        "idempotency: background {} gave up after {} tries: {reason}",
                        call.path, call.tries
                    ),
                );
            }
        }
    }

    /// Root context: a background call dispatched alone answered (callout `token`).
    pub fn on_reply(&self, host: &dyn Host, config: &Config, token: u32, reply: CalloutReply) {
        let Some(call) = self.in_flight.borrow_mut().remove(&token) else {
            return;
        };
        self.settle(host, config, call, reply);
    }

    /// Root context: a batched background call answered (the batcher's `token`).
    pub fn on_batched_reply(&self, host: &dyn Host, config: &Config, token: u32, reply: CalloutReply) {
        let Some(call) = self.in_batcher.borrow_mut().remove(&token) else {
            return;
        };
        self.settle(host, config, call, reply);
    }

    fn settle(&self, host: &dyn Host, config: &Config, mut call: BackgroundCall, reply: CalloutReply) {
        if let Some(job) = &call.job {
            let record = job.borrow_mut().on_reply(host, config, reply);
            if let Some(next) = record {
                self.enqueue(host, next);
                self.drain(host, config);
            }
            return;
        }
        let verdict = match WriteReply::of(reply.status) {
            WriteReply::Done => match call.settle {
                Settle::OnSuccess => Verdict::Done,
                Settle::AbandonAfter(settle_after) => {
                    match serde_json::from_slice::<AbandonResponse>(&reply.body) {
                        Ok(AbandonResponse { released: true }) => {
                            host.count(Counter::AbandonReleased);
                            Verdict::Done
                        }
                        Ok(AbandonResponse { released: false }) if host.now() >= settle_after => {
                            Verdict::Done
                        }
                        _ => Verdict::Retry,
                    }
                }
            },
            WriteReply::Refused => Verdict::Refused,
            WriteReply::TooLarge => Verdict::TooLarge,
            WriteReply::Retry => Verdict::Retry,
        };
        match verdict {
            Verdict::Done => {
                if let Some(candidate) = call.cache.take() {
                    candidate.acknowledged(host.now(), config.replay.cache_ttl);
                }
                if call.tries > 1 {
                    debug(host, || {
                        format!(
                            "idempotency: background {} succeeded on try {}",
                            call.path, call.tries
                        )
                    });
                }
            }
            Verdict::Refused => host.log(
                Level::Warn,
                &format!(
                    "idempotency: store refused background {} (status {:?}): {}",
                    call.path,
                    reply.status,
                    String::from_utf8_lossy(reply.body.get(..200).unwrap_or(&reply.body))
                ),
            ),
            Verdict::TooLarge => {
                host.count(Counter::StorageError);
                host.log(
                    Level::Error,
                    &format!(
                        "idempotency: store refused background {} as too large (413){}",
                        call.path,
                        if call.if_too_large.is_some() {
                            "; keeping the lock as outcome unknown (record_refused_by_store)"
                        } else {
                            ""
                        }
                    ),
                );
                if let Some(fallback) = call.if_too_large.take() {
                    self.enqueue(host, *fallback);
                }
            }
            Verdict::Retry => {
                let reason = format!("status {:?}", reply.status);
                self.retry_or_give_up(host, call, &reason);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_replies_retry_auth_failures_and_keep_the_lock_on_too_large() {
        assert_eq!(WriteReply::of(Some(200)), WriteReply::Done);
        for status in [
            None,
            Some(401),
            Some(403),
            Some(408),
            Some(429),
            Some(500),
            Some(503),
        ] {
            assert_eq!(WriteReply::of(status), WriteReply::Retry, "{status:?}");
        }
        assert_eq!(WriteReply::of(Some(413)), WriteReply::TooLarge);
        for status in [400, 404, 409, 422] {
            assert_eq!(WriteReply::of(Some(status)), WriteReply::Refused, "{status}");
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        assert_eq!(backoff(0), Duration::from_millis(50));
        assert_eq!(backoff(1), Duration::from_millis(100));
        assert_eq!(backoff(3), Duration::from_millis(400));
        assert_eq!(backoff(30), MAX_BACKOFF);
    }
}
