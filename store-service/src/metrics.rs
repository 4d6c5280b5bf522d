//! Prometheus metrics of the store (`/metrics`), including the seed's series as the store sees them.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

/// All store metrics, registered in one registry.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// API requests by operation and outcome.
    pub requests: IntCounterVec,
    /// Storage operation latency by operation and backend.
    pub operation_seconds: HistogramVec,
    /// Seed: acquire answered with a stored response.
    pub hits: IntCounterVec,
    /// Seed: acquire granted a lock (new execution).
    pub misses: IntCounterVec,
    /// Seed: key reused with different parameters.
    pub mismatches: IntCounterVec,
    /// Seed: lock held by another attempt.
    pub collisions: IntCounterVec,
    /// Seed: storage failures.
    pub storage_errors: IntCounterVec,
    /// Seed: acquire latency.
    pub lock_acquisition_seconds: HistogramVec,
    /// Writes refused because of a stale fencing token.
    pub stale_tokens: IntCounterVec,
    /// Records removed by the expiry sweep.
    pub expired: IntCounterVec,
    /// Records currently stored.
    pub live_records: IntGauge,
    /// Written data held in memory until flushed (embedded engine).
    pub write_buffer_bytes: IntGauge,
    /// Durable commits of the embedded writer (one sync each).
    pub durable_commits: IntCounter,
    /// Operations those commits carried (group commit: several per sync).
    pub durable_commit_operations: IntCounter,
    /// Time those commits spent reaching the disk (the journal write and its sync).
    pub durable_commit_sync_seconds: prometheus::Counter,
    /// Held while a scrape brings the counters above up to the storage's totals, so two
    /// scrapes at once cannot both add the same difference.
    pub catch_up: std::sync::Arc<std::sync::Mutex<()>>,
    /// Seed: duplicate messages skipped by consumers.
    pub message_dedup_hits: IntCounterVec,
    /// Message claims by outcome.
    pub message_claims: IntCounterVec,
    /// Messages completed as dead-lettered (their handler failed `max_attempts` times).
    pub message_dead_letters: IntCounterVec,
    /// Attempts whose outcome the proxy could not know (lock kept until it expires), by reason.
    pub outcome_unknown: IntCounterVec,
    /// Acquires the proxy gave up on, by whether the abandon released a lock.
    pub abandoned: IntCounterVec,
    /// Acquires held for an in-progress record (`in_progress_wait`), by how the wait ended.
    pub acquire_waits: IntCounterVec,
    /// Acquires waiting right now.
    pub acquire_waiters: IntGauge,
    /// `/v1/replay` answers by outcome (served, refused, gone, not_completed, error).
    pub replays_served: IntCounterVec,
    /// Calls carried by each `/v1/batch` request.
    pub batch_calls: prometheus::Histogram,
}

fn counter(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<IntCounterVec, prometheus::Error> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(c.clone()))?;
    Ok(c)
}

/// Register one unlabelled metric and hand it back.
fn registered<M: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    metric: M,
) -> Result<M, prometheus::Error> {
    registry.register(Box::new(metric.clone()))?;
    Ok(metric)
}

fn histogram(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<HistogramVec, prometheus::Error> {
    let buckets = vec![
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    ];
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)?;
    registry.register(Box::new(h.clone()))?;
    Ok(h)
}

impl Metrics {
    /// Create and register every metric.
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let live_records = registered(
            &registry,
            IntGauge::new("idempotency_store_live_records", "Records currently stored")?,
        )?;
        let write_buffer_bytes = registered(
            &registry,
            IntGauge::new(
                "idempotency_store_write_buffer_bytes",
                "Written data the embedded engine holds in memory until flushed to table files (memtables)",
            )?,
        )?;
        let durable_commits = registered(
            &registry,
            IntCounter::new(
                "idempotency_store_durable_commits_total",
                "Durable commits of the embedded store's writer, one disk sync each",
            )?,
        )?;
        let durable_commit_operations = registered(
            &registry,
            IntCounter::new(
                "idempotency_store_durable_commit_operations_total",
                "Operations carried by the embedded store's durable commits (group commit: several share one sync)",
            )?,
        )?;
        let durable_commit_sync_seconds = registered(
            &registry,
            prometheus::Counter::new(
                "idempotency_store_durable_commit_sync_seconds_total",
                "Time the embedded store's durable commits spent reaching the disk (the journal write and its sync); per commit: the disk's share of every durable operation",
            )?,
        )?;
        let acquire_waiters = registered(
            &registry,
            IntGauge::new(
                "idempotency_acquire_waiters",
                "Acquires waiting for an in-progress record right now",
            )?,
        )?;
        Ok(Metrics {
            outcome_unknown: counter(
                &registry,
                "idempotency_outcome_unknown_total",
                "Forwarded attempts whose outcome the proxy could not know; their lock is kept until it expires",
                &["service", "reason"],
            )?,
            abandoned: counter(
                &registry,
                "idempotency_abandoned_acquires_total",
                "Acquires the proxy gave up on, by whether a lock was released",
                &["service", "released"],
            )?,
            acquire_waits: counter(
                &registry,
                "idempotency_acquire_waits_total",
                "Acquires held for an in-progress record, by how the wait ended",
                &["service", "outcome"],
            )?,
            acquire_waiters,
            replays_served: counter(
                &registry,
                "idempotency_replays_served_total",
                "Stored responses served to replay tickets (gRPC replays), by outcome",
                &["outcome"],
            )?,
            requests: counter(
                &registry,
                "idempotency_store_requests_total",
                "Store API requests by operation and outcome",
                &["operation", "outcome"],
            )?,
            operation_seconds: histogram(
                &registry,
                "idempotency_store_operation_duration_seconds",
                "Storage operation latency",
                &["operation", "backend"],
            )?,
            hits: counter(
                &registry,
                "idempotency_hits_total",
                "Acquires answered with a stored response",
                &["service"],
            )?,
            misses: counter(
                &registry,
                "idempotency_misses_total",
                "Acquires that granted a new lock",
                &["service"],
            )?,
            mismatches: counter(
                &registry,
                "idempotency_parameter_mismatches_total",
                "Keys reused with different parameters",
                &["service"],
            )?,
            collisions: counter(
                &registry,
                "idempotency_concurrent_collisions_total",
                "Acquires refused because another attempt holds the lock",
                &["service"],
            )?,
            storage_errors: counter(
                &registry,
                "idempotency_storage_errors_total",
                "Storage operations that failed",
                &["service", "operation"],
            )?,
            lock_acquisition_seconds: histogram(
                &registry,
                "idempotency_lock_acquisition_duration_seconds",
                "Time to acquire (or be refused) a lock in storage",
                &["service"],
            )?,
            stale_tokens: counter(
                &registry,
                "idempotency_stale_fencing_tokens_total",
                "Writes refused because the writer lost its lock",
                &["operation"],
            )?,
            expired: counter(
                &registry,
                "idempotency_expired_records_total",
                "Records removed by the expiry sweep",
                &["backend"],
            )?,
            message_dedup_hits: counter(
                &registry,
                "message_deduplication_hits_total",
                "Duplicate messages skipped by consumers",
                &["topic", "consumer_group"],
            )?,
            message_claims: counter(
                &registry,
                "idempotency_message_claims_total",
                "Message claims by outcome",
                &["topic", "consumer_group", "outcome"],
            )?,
            message_dead_letters: counter(
                &registry,
                "idempotency_message_dead_letters_total",
                "Messages a consumer gave up on after max_attempts and produced to its dead-letter topic",
                &["topic", "consumer_group"],
            )?,
            batch_calls: registered(
                &registry,
                prometheus::Histogram::with_opts(
                    HistogramOpts::new(
                        "idempotency_batch_calls",
                        "Proxy calls carried by each /v1/batch request",
                    )
                    .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0]),
                )?,
            )?,
            live_records,
            write_buffer_bytes,
            durable_commits,
            durable_commit_operations,
            durable_commit_sync_seconds,
            catch_up: std::sync::Arc::default(),
            registry,
        })
    }

    /// Start the counters whose labels are known up front at zero, so their series exist (and
    /// `rate()` works) before the first event.
    pub fn initialize(&self, backend: &str) {
        self.expired.with_label_values(&[backend]).inc_by(0);
        for operation in [
            "complete",
            "release",
            "outcome_unknown",
            "checkpoint",
            "message_complete",
            "message_release",
        ] {
            self.stale_tokens.with_label_values(&[operation]).inc_by(0);
        }
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buffer) {
            return format!("# encoding failed: {e}\n");
        }
        String::from_utf8_lossy(&buffer).into_owned()
    }
}
