//! Consumer deduplication: the seed's `DeduplicatingHandler` for CloudEvents.
//!
//! The identity of an event is its `source` plus its `id` (CloudEvents 1.0: "Producers MUST
//! ensure that source + id is unique for each distinct event"). The handler runs only for a
//! successful claim; success completes the claim (later deliveries are duplicates), failure
//! releases it (a redelivery runs the handler again), and a consumer that crashes mid-handler
//! leaves a claim that expires after `lock_timeout`.

use std::future::Future;
use std::time::{Duration, Instant};

use cloudevents::{AttributesReader, Event};
use idempotency_wire::{ClaimRequest, ClaimResponse, MessageDoneRequest, MessageId};

use crate::{ClientError, StoreClient};

/// Where the consumer reads from (the seed's `ConsumerConfig`).
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// Logical service name.
    pub service_name: String,
    /// Topic (Kafka topic, NATS stream/subject).
    pub topic: String,
    /// Consumer group (Kafka group id, NATS durable name).
    pub consumer_group: String,
    /// How long a claim holds before another delivery may take it over.
    pub lock_timeout: Duration,
    /// How long a handled event is remembered.
    pub retention_period: Duration,
}

/// What happened to one delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The handler ran and succeeded: acknowledge the message.
    Processed,
    /// Already handled before: acknowledge without running the handler.
    Duplicate,
    /// Another consumer is handling it right now: negative-acknowledge / redeliver later.
    InProgress,
}

/// Wraps an async CloudEvent handler so it runs once per event.
#[derive(Debug, Clone)]
pub struct DeduplicatingHandler<H> {
    store: StoreClient,
    config: ConsumerConfig,
    handler: H,
    owed: std::sync::Arc<CompletionsOwed>,
}

/// First pause before a failed `complete` is tried again; it doubles up to
/// [`COMPLETE_RETRY_MAX_PAUSE`]. The handler's effect exists: if the completion is lost, the claim
/// expires and a redelivery runs the handler again, so a `complete` is retried for as long as
/// the claim holds (its `lock_timeout`, counted from before the claim was sent), not a fixed
/// few seconds.
pub const COMPLETE_RETRY_FIRST_PAUSE: Duration = Duration::from_millis(100);
/// Longest pause between two tries of a `complete`.
pub const COMPLETE_RETRY_MAX_PAUSE: Duration = Duration::from_secs(2);

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The message id of an event: `source` and `id`, length-prefixed so no pair collides.
pub fn event_message_id(event: &Event) -> String {
    cloudevent_identity(&event.source().to_string(), event.id())
}

/// The store's message id for a CloudEvent's `source` and `id` (whatever carried them: NATS,
/// Kafka binary or structured mode), so one event has one identity on every transport.
pub(crate) fn cloudevent_identity(source: &str, id: &str) -> String {
    format!("{}:{}{}", source.len(), source, id)
}

impl<H, F, E> DeduplicatingHandler<H>
where
    H: Fn(Event) -> F,
    F: Future<Output = Result<(), E>>,
{
    /// Wrap `handler`.
    pub fn new(store: StoreClient, config: ConsumerConfig, handler: H) -> DeduplicatingHandler<H> {
        DeduplicatingHandler {
            store,
            config,
            handler,
            owed: std::sync::Arc::default(),
        }
    }

    fn message(&self, event: &Event) -> MessageId {
        MessageId {
            service: self.config.service_name.clone(),
            topic: self.config.topic.clone(),
            consumer_group: self.config.consumer_group.clone(),
            message_id: event_message_id(event),
        }
    }

    /// Handle one delivery. Acknowledge the message to the broker on `Ok(Processed | Duplicate)`;
    /// redeliver it on `Ok(InProgress)` and on any error (handler or store failure).
    pub async fn handle(&self, event: Event) -> Result<Outcome, HandleError<E>> {
        let id = self.message(&event);
        let limits = ClaimLimits::new(self.config.lock_timeout, self.config.retention_period);
        handle_once(&self.store, id, limits, &self.owed, || (self.handler)(event)).await
    }
}

/// How long a claim holds and how long a handled message is remembered, in the store's units.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClaimLimits {
    pub(crate) lock_timeout_ms: u64,
    pub(crate) retention_ms: u64,
}

impl ClaimLimits {
    pub(crate) fn new(lock_timeout: Duration, retention_period: Duration) -> ClaimLimits {
        ClaimLimits {
            lock_timeout_ms: millis(lock_timeout),
            retention_ms: millis(retention_period),
        }
    }
}

/// What a claim found.
pub(crate) enum Claim {
    /// Handled before: skip it.
    Duplicate,
    /// Another consumer holds it: retry later.
    InProgress,
    /// Ours: run the handler, then finish the claim.
    Held(Box<HeldClaim>),
}

/// A claim this consumer holds: the proof of holding, and until when the claim is ours.
pub(crate) struct HeldClaim {
    done: MessageDoneRequest,
    /// The claim's lock expires no earlier than this (its `lock_timeout` counted from before the
    /// claim was sent): past it, another consumer may hold the message.
    expires_no_earlier_than: Instant,
}

/// Claim `id` in the store.
pub(crate) async fn claim(
    store: &StoreClient,
    id: MessageId,
    limits: ClaimLimits,
) -> Result<Claim, ClientError> {
    let sent_at = Instant::now();
    let claim = store
        .claim(&ClaimRequest {
            id: id.clone(),
            lock_timeout_ms: limits.lock_timeout_ms,
            retention_ms: limits.retention_ms,
        })
        .await?;
    Ok(match claim {
        ClaimResponse::Duplicate => {
            tracing::debug!(topic = %id.topic, "duplicate message skipped");
            Claim::Duplicate
        }
        ClaimResponse::InProgress { .. } => Claim::InProgress,
        ClaimResponse::Claimed {
            record_id,
            fencing_token,
            attempt_id,
        } => Claim::Held(Box::new(HeldClaim {
            done: MessageDoneRequest {
                id,
                record_id,
                fencing_token,
                attempt_id,
                retention_ms: Some(limits.retention_ms),
                dead_letter: None,
            },
            expires_no_earlier_than: sent_at
                .checked_add(Duration::from_millis(limits.lock_timeout_ms))
                .unwrap_or(sent_at + Duration::from_secs(365 * 24 * 3600)),
        })),
    })
}

impl HeldClaim {
    /// The handler succeeded: complete the claim (retried while it holds).
    pub(crate) async fn complete(&self, store: &StoreClient) -> Result<(), ClientError> {
        self.complete_until_expiry(store, &self.done).await
    }

    /// The handler failed for good and the message went to a dead-letter topic: complete the
    /// claim saying so (retried while it holds), so redeliveries are skipped as duplicates.
    #[cfg(feature = "kafka")]
    pub(crate) async fn complete_dead_lettered(
        &self,
        store: &StoreClient,
        note: idempotency_wire::DeadLetterNote,
    ) -> Result<(), ClientError> {
        let done = MessageDoneRequest {
            dead_letter: Some(note),
            ..self.done.clone()
        };
        self.complete_until_expiry(store, &done).await
    }

    /// The handler failed: release the claim so a redelivery runs it again (a failed release
    /// only delays that until the claim expires).
    pub(crate) async fn release(&self, store: &StoreClient) {
        if let Err(error) = store.release_message(&self.done).await {
            tracing::warn!(%error, "cannot release claim; it expires after the lock timeout");
        }
    }

    /// Send `done` to `/v1/messages/complete`, retrying transient store failures with backoff
    /// while the claim holds. A lost claim (another consumer took it over after it expired) is
    /// final: retrying cannot help.
    async fn complete_until_expiry(
        &self,
        store: &StoreClient,
        done: &MessageDoneRequest,
    ) -> Result<(), ClientError> {
        let mut pause = COMPLETE_RETRY_FIRST_PAUSE;
        loop {
            let error = match store.complete_message(done).await {
                Ok(()) => return Ok(()),
                Err(ClientError::LostLock) => return Err(ClientError::LostLock),
                Err(error) => error,
            };
            if Instant::now() + pause >= self.expires_no_earlier_than {
                tracing::error!(%error, "cannot complete claim before it expires; a redelivery may run the handler again");
                metrics::counter!("idempotency_consumer_complete_gave_up_total").increment(1);
                return Err(error);
            }
            tracing::warn!(%error, retry_in_ms = pause.as_millis(), "cannot complete claim; retrying while it holds");
            metrics::counter!("idempotency_consumer_complete_retries_total").increment(1);
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(COMPLETE_RETRY_MAX_PAUSE);
        }
    }
}

/// Messages whose handler succeeded but whose `complete` could not reach the store before the
/// claim expired: a redelivery to this consumer completes its new claim without running the
/// handler again (another consumer, which cannot know, would run it: the remaining window).
#[derive(Debug, Default)]
pub(crate) struct CompletionsOwed(std::sync::Mutex<std::collections::HashSet<String>>);

impl CompletionsOwed {
    fn key(id: &MessageId) -> String {
        format!(
            "{}\u{0}{}\u{0}{}\u{0}{}",
            id.service, id.topic, id.consumer_group, id.message_id
        )
    }

    fn set(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The handler of `id` succeeded; its completion is owed.
    pub(crate) fn owe(&self, id: &MessageId) {
        self.set().insert(Self::key(id));
    }

    /// True when `id`'s handler already succeeded here.
    pub(crate) fn is_owed(&self, id: &MessageId) -> bool {
        self.set().contains(&Self::key(id))
    }

    /// `id` is completed.
    pub(crate) fn paid(&self, id: &MessageId) {
        self.set().remove(&Self::key(id));
    }
}

/// The deduplication step every consumer integration shares: claim `id`, run the handler only
/// for a successful claim, complete the claim on success (retried while it holds), release it
/// on failure.
pub(crate) async fn handle_once<R, F, E>(
    store: &StoreClient,
    id: MessageId,
    limits: ClaimLimits,
    owed: &CompletionsOwed,
    run: R,
) -> Result<Outcome, HandleError<E>>
where
    R: FnOnce() -> F,
    F: Future<Output = Result<(), E>>,
{
    let held = match claim(store, id.clone(), limits)
        .await
        .map_err(HandleError::Store)?
    {
        Claim::Duplicate => {
            owed.paid(&id);
            return Ok(Outcome::Duplicate);
        }
        Claim::InProgress => return Ok(Outcome::InProgress),
        Claim::Held(held) => held,
    };
    let result = if owed.is_owed(&id) {
        tracing::info!(topic = %id.topic, "handler already succeeded here; completing the new claim without running it again");
        Ok(())
    } else {
        run().await
    };
    match result {
        Ok(()) => {
            if let Err(error) = held.complete(store).await {
                owed.owe(&id);
                return Err(HandleError::Store(error));
            }
            owed.paid(&id);
            Ok(Outcome::Processed)
        }
        Err(error) => {
            held.release(store).await;
            Err(HandleError::HandlerFailed(error))
        }
    }
}

/// Why a delivery was not handled.
#[derive(Debug, thiserror::Error)]
pub enum HandleError<E> {
    /// The wrapped handler failed; the claim was released so a redelivery retries.
    #[error("handler failed")]
    HandlerFailed(E),
    /// The store failed; nothing is known to be handled. Redeliver.
    #[error(transparent)]
    Store(ClientError),
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use axum::http::StatusCode;
    use axum::routing::post;
    use axum::{Json, Router};
    use cloudevents::EventBuilder as _;
    use serde_json::{json, Value};

    use super::*;

    /// A store that grants every claim and fails the first `failures` completions with 503.
    async fn flaky_store(failures: usize) -> (String, Arc<AtomicUsize>) {
        let completes = Arc::new(AtomicUsize::new(0));
        let seen = completes.clone();
        let app = Router::new()
            .route(
                "/v1/messages/claim",
                post(|| async {
                    Json(json!({"outcome": "claimed", "record_id": "r1", "fencing_token": 1, "attempt_id": "a1"}))
                }),
            )
            .route(
                "/v1/messages/complete",
                post(move |Json(_): Json<Value>| {
                    let n = seen.fetch_add(1, Ordering::SeqCst);
                    async move {
                        if n < failures {
                            (
                                StatusCode::SERVICE_UNAVAILABLE,
                                Json(json!({"error": "storage_unavailable"})),
                            )
                        } else {
                            (StatusCode::OK, Json(json!({"ok": true})))
                        }
                    }
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (url, completes)
    }

    fn handler(
        url: String,
        lock_timeout: Duration,
    ) -> DeduplicatingHandler<impl Fn(Event) -> std::future::Ready<Result<(), ()>>> {
        let config = ConsumerConfig {
            service_name: "orders".into(),
            topic: "t".into(),
            consumer_group: "g".into(),
            lock_timeout,
            retention_period: Duration::from_secs(600),
        };
        DeduplicatingHandler::new(StoreClient::new(url, None).unwrap(), config, |_| {
            std::future::ready(Ok(()))
        })
    }

    fn event() -> Event {
        cloudevents::EventBuilderV10::new()
            .id("e1")
            .source("urn:test")
            .ty("t")
            .build()
            .unwrap()
    }

    #[tokio::test]
    async fn a_store_outage_during_completion_is_ridden_out_while_the_claim_holds() {
        // Six failures: 100+200+400+800+1600+2000 ms of pauses, longer than the ~3 s a fixed
        // backoff gave, well inside the 60 s claim.
        let (url, completes) = flaky_store(6).await;
        let started = Instant::now();
        let outcome = handler(url, Duration::from_secs(60))
            .handle(event())
            .await
            .unwrap();
        assert_eq!(outcome, Outcome::Processed);
        assert_eq!(completes.load(Ordering::SeqCst), 7, "six failures, then success");
        assert!(
            started.elapsed() >= Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn an_outage_longer_than_the_claim_gives_up_before_it_expires_and_says_so() {
        let (url, completes) = flaky_store(usize::MAX).await;
        let started = Instant::now();
        let result = handler(url, Duration::from_secs(2)).handle(event()).await;
        assert!(matches!(result, Err(HandleError::Store(_))), "{result:?}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "gave up before the claim expired"
        );
        // 0, 100, 300, 700, 1500 ms: the next pause (800 ms) would end past the claim.
        assert_eq!(completes.load(Ordering::SeqCst), 5);
    }

    #[tokio::test]
    async fn a_redelivery_after_a_lost_complete_completes_without_running_the_handler_again() {
        // Five failed completes: the first delivery gives up before its 1 s claim expires; the
        // redelivery claims again and only completes.
        let (url, completes) = flaky_store(5).await;
        let runs = Arc::new(AtomicUsize::new(0));
        let counted = runs.clone();
        let config = ConsumerConfig {
            service_name: "orders".into(),
            topic: "t".into(),
            consumer_group: "g".into(),
            lock_timeout: Duration::from_secs(1),
            retention_period: Duration::from_secs(600),
        };
        let handler = DeduplicatingHandler::new(StoreClient::new(url, None).unwrap(), config, move |_| {
            counted.fetch_add(1, Ordering::SeqCst);
            std::future::ready(Ok::<(), ()>(()))
        });
        assert!(matches!(
            handler.handle(event()).await,
            Err(HandleError::Store(_))
        ));
        assert_eq!(handler.handle(event()).await.unwrap(), Outcome::Processed);
        assert_eq!(runs.load(Ordering::SeqCst), 1, "the handler ran once");
        assert_eq!(completes.load(Ordering::SeqCst), 6);
    }
}
