//! Kafka consumer deduplication: an `rdkafka` consumer loop that claims each record in the store, runs the handler, completes the claim, then commits the offset.
//!
//! The order of one record, and why:
//! 1. **claim** `(service, topic, consumer group, message id)` in the store;
//! 2. a **duplicate** (handled before, by any member of the group, before or after a rebalance)
//!    is skipped and its offset committed;
//! 3. a **claimed** record runs the handler; on success the claim is **completed**, and only
//!    then is the offset **committed**. A consumer killed between the two leaves an uncommitted
//!    offset: the record is redelivered (to this or another member) and skipped as a duplicate;
//! 4. a **failed** handler releases its claim and the partition is rewound to the record, so the
//!    record is redelivered after [`KafkaConsumerConfig::retry_pause`] and nothing after it is
//!    committed first (a Kafka offset commit covers every earlier record of the partition). With
//!    a [`DeadLetterPolicy`], the `max_attempts`-th failure instead produces the record to the
//!    dead-letter topic (the failure in its headers), completes the claim as dead-lettered and
//!    commits: one poison record cannot block its partition for ever;
//! 5. a record **in progress** elsewhere (a member that died inside its handler still holds the
//!    claim until `lock_timeout`) is rewound the same way and retried.
//!
//! After the handler succeeded, `complete` is retried for as long as the claim holds (the
//! partition waits anyway): a store outage shorter than `lock_timeout` costs time, never a second
//! run. A rewind that fails (the seek is refused) ends the loop with
//! [`KafkaLoopError::Rewind`] rather than read on: a later record's commit would cover the
//! unhandled one. Counters (through the `metrics` facade):
//! `idempotency_consumer_complete_retries_total`, `idempotency_consumer_complete_gave_up_total`,
//! `idempotency_consumer_dead_letters_total{topic}`, `idempotency_consumer_rewind_failures_total{topic}`.
//!
//! What is committed when: with [`CommitPolicy::EachRecord`] every handled or skipped record is
//! committed synchronously before the next one is read; with [`CommitPolicy::Periodic`] (the
//! default) its offset is stored locally and librdkafka commits stored offsets every interval and
//! when partitions are revoked. Either way an offset is committed only after the store knows the
//! record was handled, so the store — not the offset — is what makes handling exactly-once, and a
//! lost commit costs a skipped duplicate, never a second run.
//!
//! ```no_run
//! # async fn example(service_token: String) -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use idempotency_client::{CommitPolicy, KafkaConsumerConfig, KafkaDeduplicatingConsumer, MessageIdSource, StoreClient};
//! # async fn process_order(_: &idempotency_client::rdkafka::message::OwnedMessage) -> Result<(), String> { Ok(()) }
//! # async fn shutdown_signal() {}
//!
//! let mut config = KafkaConsumerConfig::new(
//!     "order-service",
//!     "kafka-0.kafka:9092",
//!     "order-processor",
//!     vec!["orders.received".into()],
//! );
//! config.message_id = MessageIdSource::CloudEvents;
//! config.lock_timeout = Duration::from_secs(300);
//! config.retention_period = Duration::from_secs(7 * 24 * 3600);
//! config.commit = CommitPolicy::Periodic(Duration::from_secs(1));
//! config.settings.push(("session.timeout.ms".into(), "10000".into()));
//! let consumer = KafkaDeduplicatingConsumer::new(
//!     StoreClient::new("http://idempotency-store:8081", Some(service_token))?,
//!     config,
//!     |record: idempotency_client::rdkafka::message::OwnedMessage| async move { process_order(&record).await },
//! )?;
//! consumer.run(shutdown_signal()).await?;
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use idempotency_wire::{DeadLetterNote, MessageId};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Offset;
use serde::Deserialize;

use crate::dedup::{claim, cloudevent_identity, Claim, ClaimLimits, CompletionsOwed};
use crate::StoreClient;

/// Where a record's identity comes from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum MessageIdSource {
    /// A CloudEvent's `source` + `id`: the `ce_source`/`ce_id` headers (Kafka binary mode) or the
    /// `source`/`id` members of an `application/cloudevents+json` value (structured mode). The
    /// same event has the same identity over NATS ([`crate::event_message_id`]).
    #[default]
    CloudEvents,
    /// The value of this record header (e.g. `message-id`).
    Header(String),
    /// The record key.
    Key,
}

/// When offsets are committed (always after the store completed or skipped the record).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitPolicy {
    /// A synchronous commit after every record: the fewest redeliveries after a crash, one broker
    /// round trip per record.
    EachRecord,
    /// Offsets stored after every record, committed by librdkafka every interval and on
    /// rebalance. A crash redelivers up to one interval of records, which the store skips.
    Periodic(Duration),
}

impl Default for CommitPolicy {
    fn default() -> CommitPolicy {
        CommitPolicy::Periodic(Duration::from_secs(1))
    }
}

/// What to do with a record whose handler keeps failing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterPolicy {
    /// Topic the record is produced to (same key, value and headers, plus `dead-letter-*`
    /// headers: original topic, partition, offset, message id, attempts, last error).
    pub topic: String,
    /// Handler runs before the record is dead-lettered (at least 1). Counted per record by this
    /// member: a restart or a rebalance starts the count again.
    pub max_attempts: u32,
}

/// A Kafka consumer group member that handles each record once.
#[derive(Debug, Clone)]
pub struct KafkaConsumerConfig {
    /// Logical service name (the store's `service`).
    pub service_name: String,
    /// `bootstrap.servers`.
    pub brokers: String,
    /// `group.id`; also the store's `consumer_group`.
    pub group_id: String,
    /// Topics to subscribe to; each record is claimed under its own topic.
    pub topics: Vec<String>,
    /// Where a record's identity comes from.
    pub message_id: MessageIdSource,
    /// How long a claim holds before another member may take it over (longer than the handler
    /// ever runs: a takeover of a live handler runs it twice).
    pub lock_timeout: Duration,
    /// How long a handled record is remembered (longer than any redelivery or producer retry).
    pub retention_period: Duration,
    /// When offsets are committed.
    pub commit: CommitPolicy,
    /// Pause before a failed or in-progress record is read again.
    pub retry_pause: Duration,
    /// Dead-letter a record after this many failed handler runs (none: retry for ever).
    pub dead_letter: Option<DeadLetterPolicy>,
    /// Further librdkafka settings (`session.timeout.ms`, security, …). The settings this loop
    /// depends on (`enable.auto.commit`, `enable.auto.offset.store`) are set by [`CommitPolicy`]
    /// and cannot be overridden here.
    pub settings: Vec<(String, String)>,
}

impl KafkaConsumerConfig {
    /// A configuration with the defaults: CloudEvents identity, 30 s claims, 24 h retention,
    /// periodic commits every second, 500 ms retry pause, earliest offset for a new group.
    pub fn new(
        service_name: impl Into<String>,
        brokers: impl Into<String>,
        group_id: impl Into<String>,
        topics: Vec<String>,
    ) -> KafkaConsumerConfig {
        KafkaConsumerConfig {
            service_name: service_name.into(),
            brokers: brokers.into(),
            group_id: group_id.into(),
            topics,
            message_id: MessageIdSource::CloudEvents,
            lock_timeout: Duration::from_secs(30),
            retention_period: Duration::from_secs(24 * 3600),
            commit: CommitPolicy::default(),
            retry_pause: Duration::from_millis(500),
            dead_letter: None,
            settings: vec![("auto.offset.reset".into(), "earliest".into())],
        }
    }

    fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        for (key, value) in &self.settings {
            config.set(key, value);
        }
        config
            .set("bootstrap.servers", &self.brokers)
            .set("group.id", &self.group_id)
            .set("enable.auto.offset.store", "false");
        match self.commit {
            CommitPolicy::EachRecord => config.set("enable.auto.commit", "false"),
            CommitPolicy::Periodic(interval) => config
                .set("enable.auto.commit", "true")
                .set("auto.commit.interval.ms", interval.as_millis().max(1).to_string()),
        };
        config
    }

    /// The dead-letter producer's configuration: the brokers and the connection settings
    /// (security, SASL, SSL, client id) of the consumer, no consumer-only ones.
    fn producer_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        let connection = ["security.", "sasl.", "ssl.", "client.id", "socket."];
        for (key, value) in &self.settings {
            if connection.iter().any(|prefix| key.starts_with(prefix)) {
                config.set(key, value);
            }
        }
        config
            .set("bootstrap.servers", &self.brokers)
            .set("enable.idempotence", "true")
            .set("message.timeout.ms", "10000");
        config
    }
}

/// What happened to one record, for logs and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// Topic of the record.
    pub topic: String,
    /// Partition of the record.
    pub partition: i32,
    /// Offset of the record.
    pub offset: i64,
    /// The identity the record was claimed under.
    pub message_id: String,
    /// What the loop did.
    pub result: DeliveryResult,
}

/// What the loop did with a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryResult {
    /// Handled now; the claim is complete and the offset committed (or stored for commit).
    Processed,
    /// Handled before; skipped, offset committed (or stored).
    Duplicate,
    /// Another member holds the claim; the partition was rewound to retry it.
    InProgress,
    /// The handler failed; its claim was released and the partition rewound to retry it.
    HandlerFailed,
    /// The handler failed `max_attempts` times: the record is on the dead-letter topic, its
    /// claim completed as dead-lettered, its offset committed.
    DeadLettered,
    /// The store failed; nothing is known to be handled, the partition was rewound.
    StoreFailed(String),
}

/// Why the loop could not go on.
#[derive(Debug, thiserror::Error)]
pub enum KafkaLoopError {
    /// The consumer could not be created or subscribed.
    #[error("kafka consumer setup failed: {0}")]
    Setup(#[source] KafkaError),
    /// Reading from the broker failed.
    #[error("kafka receive failed: {0}")]
    Receive(#[source] KafkaError),
    /// A record that was not handled could not be read again (the seek was refused): the loop
    /// stops rather than read on, since committing a later record would skip this one. Restart
    /// the consumer; it resumes from the last commit, before this record.
    #[error("cannot rewind {topic}/{partition} to offset {offset}, which is not handled: {source}")]
    Rewind {
        /// Topic of the record.
        topic: String,
        /// Partition of the record.
        partition: i32,
        /// Offset of the record.
        offset: i64,
        /// What the seek said.
        #[source]
        source: KafkaError,
    },
    /// An earlier rewind failed ([`KafkaLoopError::Rewind`]): this consumer reads no more.
    #[error("this consumer stopped after a failed rewind; create a new one")]
    Halted,
}

/// An `rdkafka` consumer whose handler runs once per record identity.
pub struct KafkaDeduplicatingConsumer<H> {
    consumer: StreamConsumer,
    store: StoreClient,
    config: KafkaConsumerConfig,
    handler: H,
    /// Produces dead letters (with a [`DeadLetterPolicy`]).
    dead_letters: Option<FutureProducer>,
    /// Failed handler runs per record (topic, partition, offset) not yet handled.
    failures: Mutex<HashMap<(String, i32, i64), u32>>,
    /// Records whose handler succeeded but whose claim could not be completed in time.
    owed: CompletionsOwed,
    /// Set when a rewind failed on a partition this member still owns: every later read
    /// refuses, so nothing after the unhandled record is read (and committed) by this consumer.
    halted: std::sync::atomic::AtomicBool,
}

impl<H> std::fmt::Debug for KafkaDeduplicatingConsumer<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaDeduplicatingConsumer")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<H, F, E> KafkaDeduplicatingConsumer<H>
where
    H: Fn(OwnedMessage) -> F,
    F: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    /// Create the consumer and subscribe to the configured topics.
    pub fn new(
        store: StoreClient,
        config: KafkaConsumerConfig,
        handler: H,
    ) -> Result<KafkaDeduplicatingConsumer<H>, KafkaLoopError> {
        let consumer: StreamConsumer = config.client_config().create().map_err(KafkaLoopError::Setup)?;
        let topics: Vec<&str> = config.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics).map_err(KafkaLoopError::Setup)?;
        let dead_letters = match &config.dead_letter {
            Some(_) => Some(config.producer_config().create().map_err(KafkaLoopError::Setup)?),
            None => None,
        };
        Ok(KafkaDeduplicatingConsumer {
            consumer,
            store,
            config,
            handler,
            dead_letters,
            failures: Mutex::new(HashMap::new()),
            owed: CompletionsOwed::default(),
            halted: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The underlying consumer (assignment, committed offsets, metrics).
    pub fn consumer(&self) -> &StreamConsumer {
        &self.consumer
    }

    /// Read and handle records until `shutdown` resolves. Shutdown is checked between records,
    /// never inside one. Errors of single records are logged and retried; only a broker receive
    /// error or a failed rewind ends the loop.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) -> Result<(), KafkaLoopError> {
        tokio::pin!(shutdown);
        loop {
            let message = tokio::select! {
                () = &mut shutdown => return Ok(()),
                message = self.recv() => message?,
            };
            let delivery = self.deliver(message).await?;
            tracing::debug!(?delivery, "kafka record");
        }
    }

    /// Read one record and deduplicate it ([`Self::recv`] then [`Self::deliver`]).
    pub async fn next_delivery(&self) -> Result<Delivery, KafkaLoopError> {
        let message = self.recv().await?;
        self.deliver(message).await
    }

    /// The next record from the broker. Cancel-safe: dropping the future loses no record.
    pub async fn recv(&self) -> Result<BorrowedMessage<'_>, KafkaLoopError> {
        if self.halted.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(KafkaLoopError::Halted);
        }
        self.consumer.recv().await.map_err(KafkaLoopError::Receive)
    }

    /// Deduplicate one record: claim, handle, complete, then commit (see the module docs for
    /// every outcome). Not cancel-safe: let it finish. Dropped half-way, the claim stays held
    /// until `lock_timeout` and the record is neither committed nor rewound. An error means the
    /// record could not be rewound: stop reading (see [`KafkaLoopError::Rewind`]).
    pub async fn deliver(&self, message: BorrowedMessage<'_>) -> Result<Delivery, KafkaLoopError> {
        let message_id = record_identity(&message, &self.config.message_id);
        let id = MessageId {
            service: self.config.service_name.clone(),
            topic: message.topic().to_owned(),
            consumer_group: self.config.group_id.clone(),
            message_id: message_id.clone(),
        };
        let limits = ClaimLimits::new(self.config.lock_timeout, self.config.retention_period);
        let result = match claim(&self.store, id.clone(), limits).await {
            Err(error) => store_failed(&message, &error),
            Ok(Claim::Duplicate) => {
                self.owed.paid(&id);
                DeliveryResult::Duplicate
            }
            Ok(Claim::InProgress) => DeliveryResult::InProgress,
            Ok(Claim::Held(held)) => {
                // Succeeded here before, its complete lost with the store: complete, don't rerun.
                let ran = if self.owed.is_owed(&id) {
                    Ok(())
                } else {
                    (self.handler)(message.detach()).await.map_err(|e| e.to_string())
                };
                match ran {
                    Ok(()) => match held.complete(&self.store).await {
                        Ok(()) => {
                            self.owed.paid(&id);
                            DeliveryResult::Processed
                        }
                        Err(error) => {
                            self.owed.owe(&id);
                            store_failed(&message, &error)
                        }
                    },
                    Err(error) => {
                        self.on_handler_failure(&message, &message_id, &held, &error)
                            .await
                    }
                }
            }
        };
        match result {
            DeliveryResult::Processed | DeliveryResult::Duplicate | DeliveryResult::DeadLettered => {
                self.forget_failures(&message);
                self.commit(&message);
            }
            _ => self.rewind(&message).await?,
        }
        Ok(Delivery {
            topic: message.topic().to_owned(),
            partition: message.partition(),
            offset: message.offset(),
            message_id,
            result,
        })
    }

    /// The handler failed on a record we hold: release it for a retry, or — its `max_attempts`-th
    /// failure under a [`DeadLetterPolicy`] — produce it to the dead-letter topic and complete the
    /// claim as dead-lettered. A dead letter that cannot be produced or recorded is retried like
    /// any failure (the dead-letter topic may then hold it twice; its headers identify it).
    async fn on_handler_failure(
        &self,
        message: &BorrowedMessage<'_>,
        message_id: &str,
        held: &crate::dedup::HeldClaim,
        error: &str,
    ) -> DeliveryResult {
        let attempts = self.count_failure(message);
        let (Some(policy), Some(producer)) = (&self.config.dead_letter, &self.dead_letters) else {
            return self.release_after_failure(message, held, error, attempts).await;
        };
        if attempts < policy.max_attempts.max(1) {
            return self.release_after_failure(message, held, error, attempts).await;
        }
        let headers = dead_letter_headers(message, message_id, attempts, error);
        let mut record = FutureRecord::to(&policy.topic).headers(headers);
        if let Some(key) = message.key() {
            record = record.key(key);
        }
        if let Some(payload) = message.payload() {
            record = record.payload(payload);
        }
        if let Err((produce_error, _)) = producer.send(record, Duration::from_secs(10)).await {
            tracing::error!(error = %produce_error, dead_letter_topic = %policy.topic,
                "cannot produce dead letter; the record will be retried");
            return self.release_after_failure(message, held, error, attempts).await;
        }
        let note = DeadLetterNote {
            topic: policy.topic.clone(),
            reason: error.chars().take(1024).collect(),
            attempts,
        };
        match held.complete_dead_lettered(&self.store, note).await {
            Ok(()) => {
                tracing::warn!(%error, attempts, topic = message.topic(), partition = message.partition(),
                    offset = message.offset(), dead_letter_topic = %policy.topic, "record dead-lettered");
                metrics::counter!("idempotency_consumer_dead_letters_total", "topic" => message.topic().to_owned())
                    .increment(1);
                DeliveryResult::DeadLettered
            }
            Err(store_error) => store_failed(message, &store_error),
        }
    }

    async fn release_after_failure(
        &self,
        message: &BorrowedMessage<'_>,
        held: &crate::dedup::HeldClaim,
        error: &str,
        attempts: u32,
    ) -> DeliveryResult {
        held.release(&self.store).await;
        tracing::warn!(%error, attempts, topic = message.topic(), partition = message.partition(),
            offset = message.offset(), "handler failed; claim released, record will be retried");
        DeliveryResult::HandlerFailed
    }

    fn count_failure(&self, message: &BorrowedMessage<'_>) -> u32 {
        let mut failures = self
            .failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let count = failures
            .entry((message.topic().to_owned(), message.partition(), message.offset()))
            .or_insert(0);
        *count = count.saturating_add(1);
        *count
    }

    fn forget_failures(&self, message: &BorrowedMessage<'_>) {
        let mut failures = self
            .failures
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        failures.remove(&(message.topic().to_owned(), message.partition(), message.offset()));
    }

    /// True when this member is assigned `topic`/`partition` now.
    fn owns(&self, topic: &str, partition: i32) -> bool {
        self.consumer.assignment().is_ok_and(|assigned| {
            assigned
                .elements()
                .iter()
                .any(|e| e.topic() == topic && e.partition() == partition)
        })
    }

    /// The record is handled (now or before): commit it, or store its offset for the next
    /// periodic commit. A failed commit only means a redelivery, which the store skips.
    fn commit(&self, message: &BorrowedMessage<'_>) {
        let committed = match self.config.commit {
            CommitPolicy::EachRecord => self.consumer.commit_message(message, CommitMode::Sync),
            CommitPolicy::Periodic(_) => self.consumer.store_offset_from_message(message),
        };
        if let Err(error) = committed {
            tracing::warn!(%error, topic = message.topic(), partition = message.partition(),
                offset = message.offset(), "offset commit failed; the record will be redelivered and skipped");
        }
    }

    /// Read this record again after the retry pause, and nothing after it first: seeking purges
    /// what librdkafka prefetched from the partition.
    async fn rewind(&self, message: &BorrowedMessage<'_>) -> Result<(), KafkaLoopError> {
        let seek = self.consumer.seek(
            message.topic(),
            message.partition(),
            Offset::Offset(message.offset()),
            Duration::from_secs(5),
        );
        if let Err(source) = seek {
            // Revoked meanwhile (a rebalance): its new owner resumes from the last commit, which
            // is before this record, and this member reads nothing more of it.
            if !self.owns(message.topic(), message.partition()) {
                tracing::info!(error = %source, topic = message.topic(), partition = message.partition(),
                    "partition revoked before its rewind; its new owner re-reads the record");
                tokio::time::sleep(self.config.retry_pause).await;
                return Ok(());
            }
            // Still ours: reading on would hand us later records of this partition, whose commits
            // would cover this unhandled one. Stop for good: a restarted consumer resumes from
            // the last commit.
            self.halted.store(true, std::sync::atomic::Ordering::SeqCst);
            metrics::counter!("idempotency_consumer_rewind_failures_total", "topic" => message.topic().to_owned())
                .increment(1);
            tracing::error!(error = %source, topic = message.topic(), partition = message.partition(),
                offset = message.offset(), "cannot rewind partition to an unhandled record; stopping");
            return Err(KafkaLoopError::Rewind {
                topic: message.topic().to_owned(),
                partition: message.partition(),
                offset: message.offset(),
                source,
            });
        }
        tokio::time::sleep(self.config.retry_pause).await;
        Ok(())
    }
}

/// A store failure: nothing is known to be handled; the record is rewound and retried.
fn store_failed(message: &BorrowedMessage<'_>, error: &crate::ClientError) -> DeliveryResult {
    tracing::warn!(%error, topic = message.topic(), partition = message.partition(),
        offset = message.offset(), "store failed; record will be retried");
    DeliveryResult::StoreFailed(error.to_string())
}

/// The record's own headers, then where it came from and why it failed.
fn dead_letter_headers(
    message: &BorrowedMessage<'_>,
    message_id: &str,
    attempts: u32,
    error: &str,
) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new();
    if let Some(original) = message.headers() {
        for header in original.iter() {
            headers = headers.insert(header);
        }
    }
    let facts = [
        ("dead-letter-topic", message.topic().to_owned()),
        ("dead-letter-partition", message.partition().to_string()),
        ("dead-letter-offset", message.offset().to_string()),
        ("dead-letter-message-id", message_id.to_owned()),
        ("dead-letter-attempts", attempts.to_string()),
        ("dead-letter-error", error.chars().take(1024).collect()),
    ];
    for (key, value) in &facts {
        headers = headers.insert(Header {
            key,
            value: Some(value.as_bytes()),
        });
    }
    headers
}

/// The identity a record is claimed under. A record without the configured identity falls back
/// to its position (`topic/partition/offset`): redeliveries of that record are still skipped, but
/// a producer's duplicate of it is not recognised (logged as a warning).
pub fn record_identity<M: Message>(message: &M, source: &MessageIdSource) -> String {
    let found = match source {
        MessageIdSource::CloudEvents => cloudevent_of(message),
        MessageIdSource::Header(name) => {
            header(message, name).map(|v| String::from_utf8_lossy(v).into_owned())
        }
        MessageIdSource::Key => message.key().map(|k| String::from_utf8_lossy(k).into_owned()),
    };
    found.unwrap_or_else(|| {
        tracing::warn!(
            topic = message.topic(),
            partition = message.partition(),
            offset = message.offset(),
            ?source,
            "record has no message id; deduplicating by its position only"
        );
        format!(
            "offset:{}/{}/{}",
            message.topic(),
            message.partition(),
            message.offset()
        )
    })
}

fn header<'m, M: Message>(message: &'m M, name: &str) -> Option<&'m [u8]> {
    message
        .headers()?
        .iter()
        .find(|h| h.key.eq_ignore_ascii_case(name))
        .and_then(|h| h.value)
}

/// The members of a structured-mode CloudEvent that make its identity.
#[derive(Deserialize)]
struct StructuredIdentity {
    id: String,
    source: String,
}

fn cloudevent_of<M: Message>(message: &M) -> Option<String> {
    let text = |name: &str| header(message, name).and_then(|v| std::str::from_utf8(v).ok());
    if let (Some(id), Some(source)) = (text("ce_id"), text("ce_source")) {
        return Some(cloudevent_identity(source, id));
    }
    let structured = text("content-type").is_some_and(|t| t.starts_with("application/cloudevents"));
    if structured {
        let event: StructuredIdentity = serde_json::from_slice(message.payload()?).ok()?;
        return Some(cloudevent_identity(&event.source, &event.id));
    }
    None
}

#[cfg(test)]
mod tests {
    use rdkafka::message::{Header, OwnedHeaders, Timestamp};

    use super::*;

    fn record(key: Option<&[u8]>, payload: &[u8], headers: &[(&str, &str)]) -> OwnedMessage {
        let mut owned = OwnedHeaders::new();
        for (key, value) in headers {
            owned = owned.insert(Header {
                key,
                value: Some(*value),
            });
        }
        OwnedMessage::new(
            Some(payload.to_vec()),
            key.map(<[u8]>::to_vec),
            "orders.received".into(),
            Timestamp::NotAvailable,
            3,
            42,
            Some(owned),
        )
    }

    #[test]
    fn binary_mode_cloudevents_use_source_and_id_like_every_other_transport() {
        let message = record(None, b"{}", &[("ce_id", "e1"), ("ce_source", "/order-service")]);
        use cloudevents::EventBuilder as _;
        let event = cloudevents::EventBuilderV10::new()
            .id("e1")
            .source("/order-service")
            .ty("t")
            .build()
            .unwrap();
        assert_eq!(
            record_identity(&message, &MessageIdSource::CloudEvents),
            crate::event_message_id(&event)
        );
    }

    #[test]
    fn structured_mode_cloudevents_are_read_from_the_value() {
        let payload = br#"{"specversion":"1.0","id":"e1","source":"/order-service","type":"t"}"#;
        let message = record(None, payload, &[("content-type", "application/cloudevents+json")]);
        assert_eq!(
            record_identity(&message, &MessageIdSource::CloudEvents),
            cloudevent_identity("/order-service", "e1")
        );
    }

    #[test]
    fn a_configured_header_or_the_key_can_be_the_identity() {
        let message = record(Some(b"order-7"), b"x", &[("Message-Id", "m-9")]);
        assert_eq!(
            record_identity(&message, &MessageIdSource::Header("message-id".into())),
            "m-9"
        );
        assert_eq!(record_identity(&message, &MessageIdSource::Key), "order-7");
    }

    #[test]
    fn a_record_without_an_identity_falls_back_to_its_position() {
        let message = record(
            None,
            b"not json",
            &[("content-type", "application/cloudevents+json")],
        );
        assert_eq!(
            record_identity(&message, &MessageIdSource::CloudEvents),
            "offset:orders.received/3/42"
        );
        assert_eq!(
            record_identity(&message, &MessageIdSource::Key),
            "offset:orders.received/3/42"
        );
    }

    #[test]
    fn commit_settings_cannot_be_overridden_by_extra_settings() {
        let mut config = KafkaConsumerConfig::new("orders", "127.0.0.1:9092", "g", vec!["t".into()]);
        config
            .settings
            .push(("enable.auto.offset.store".into(), "true".into()));
        config.settings.push(("enable.auto.commit".into(), "true".into()));
        config.commit = CommitPolicy::EachRecord;
        let built = config.client_config();
        assert_eq!(built.get("enable.auto.offset.store"), Some("false"));
        assert_eq!(built.get("enable.auto.commit"), Some("false"));
        assert_eq!(built.get("auto.offset.reset"), Some("earliest"));
        config.commit = CommitPolicy::Periodic(Duration::from_millis(250));
        let built = config.client_config();
        assert_eq!(built.get("enable.auto.commit"), Some("true"));
        assert_eq!(built.get("auto.commit.interval.ms"), Some("250"));
    }
}
