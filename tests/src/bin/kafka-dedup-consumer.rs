//! A Kafka consumer group member for the end-to-end tests: `KafkaDeduplicatingConsumer` with a handler that appends each run to a ledger file, so a test can kill it with SIGKILL and still count executions.
//!
//! Prints one JSON line per record it read (topic, partition, offset, message id, what it did).

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use idempotency_client::{
    CommitPolicy, DeadLetterPolicy, DeliveryResult, KafkaConsumerConfig, KafkaDeduplicatingConsumer,
    StoreClient,
};
use rdkafka::consumer::Consumer;
use rdkafka::message::{Headers, Message, OwnedMessage};

#[derive(Debug, Parser)]
struct Args {
    /// Kafka bootstrap servers.
    #[arg(long)]
    brokers: String,
    /// Store base URL.
    #[arg(long)]
    store: String,
    /// Store bearer token (service role).
    #[arg(long)]
    token: String,
    /// Consumer group.
    #[arg(long)]
    group: String,
    /// Topic to consume.
    #[arg(long)]
    topic: String,
    /// File each handler run appends the event id to (fsynced before the handler returns).
    #[arg(long)]
    ledger: PathBuf,
    /// Commit every record synchronously instead of periodically.
    #[arg(long)]
    commit_each: bool,
    /// Periodic commit interval in milliseconds.
    #[arg(long, default_value_t = 1000)]
    commit_interval_ms: u64,
    /// The first handler run for this event id fails (the claim is released, the record retried).
    #[arg(long)]
    fail_first: Option<String>,
    /// Every handler run for this event id fails (a poison record).
    #[arg(long)]
    fail_always: Option<String>,
    /// After handling this event id (ledger written), wait this long before returning:
    /// `ID:MILLISECONDS` (lets a test stop the store between the handler and its `complete`).
    #[arg(long)]
    pause_after_handling: Option<String>,
    /// Dead-letter topic (with `--max-attempts`).
    #[arg(long)]
    dead_letter_topic: Option<String>,
    /// Handler runs before a record is dead-lettered.
    #[arg(long, default_value_t = 3)]
    max_attempts: u32,
    /// librdkafka `session.timeout.ms`.
    #[arg(long, default_value_t = 6000)]
    session_timeout_ms: u64,
}

fn event_id(message: &OwnedMessage) -> String {
    message
        .headers()
        .and_then(|headers| headers.iter().find(|h| h.key == "ce_id"))
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_default()
}

fn append_line(path: &PathBuf, line: &str) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    file.write_all(format!("{line}\n").as_bytes())?;
    file.sync_data()
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let mut config = KafkaConsumerConfig::new(
        "order-service",
        &args.brokers,
        &args.group,
        vec![args.topic.clone()],
    );
    config.commit = if args.commit_each {
        CommitPolicy::EachRecord
    } else {
        CommitPolicy::Periodic(Duration::from_millis(args.commit_interval_ms))
    };
    config.retry_pause = Duration::from_millis(200);
    config.dead_letter = args.dead_letter_topic.clone().map(|topic| DeadLetterPolicy {
        topic,
        max_attempts: args.max_attempts,
    });
    config
        .settings
        .push(("session.timeout.ms".into(), args.session_timeout_ms.to_string()));
    config
        .settings
        .push(("heartbeat.interval.ms".into(), "500".into()));

    let failed_once = Arc::new(AtomicBool::new(false));
    let ledger = args.ledger.clone();
    let fail_first = args.fail_first.clone();
    let fail_always = args.fail_always.clone();
    let pause_after = args
        .pause_after_handling
        .as_deref()
        .and_then(|spec| spec.split_once(':'))
        .map(|(id, ms)| (id.to_owned(), Duration::from_millis(ms.parse().unwrap_or(0))));
    let handler = move |message: OwnedMessage| {
        let id = event_id(&message);
        let fail = (fail_first.as_deref() == Some(id.as_str()) && !failed_once.swap(true, Ordering::SeqCst))
            || fail_always.as_deref() == Some(id.as_str());
        let pause = pause_after
            .as_ref()
            .filter(|(paused, _)| *paused == id)
            .map(|(_, pause)| *pause);
        let ledger = ledger.clone();
        async move {
            if fail {
                return Err(format!("{id}: inventory service unavailable"));
            }
            append_line(&ledger, &id).map_err(|e| e.to_string())?;
            if let Some(pause) = pause {
                tokio::time::sleep(pause).await;
            }
            Ok(())
        }
    };
    let store = StoreClient::new(args.store, Some(args.token))?;
    let consumer = KafkaDeduplicatingConsumer::new(store, config, handler)?;
    let mut assigned = String::new();
    let mut assignment_check = tokio::time::interval(Duration::from_millis(100));
    loop {
        // Only the receive races the assignment check: a delivery, once started, runs to its end.
        tokio::select! {
            message = consumer.recv() => {
                let delivery = consumer.deliver(message?).await?;
                let result = match &delivery.result {
                    DeliveryResult::StoreFailed(error) => format!("store_failed: {error}"),
                    other => format!("{other:?}"),
                };
                let line = serde_json::json!({
                    "topic": delivery.topic,
                    "partition": delivery.partition,
                    "offset": delivery.offset,
                    "message_id": delivery.message_id,
                    "result": result,
                });
                println!("{line}");
            }
            _ = assignment_check.tick() => {
                // Announce assignment changes (rebalances) so a test can wait for them.
                let mut partitions: Vec<i32> = consumer
                    .consumer()
                    .assignment()?
                    .elements()
                    .iter()
                    .map(|e| e.partition())
                    .collect();
                partitions.sort_unstable();
                let now = serde_json::json!({ "assigned": partitions }).to_string();
                if now != assigned {
                    println!("{now}");
                    assigned = now;
                }
            }
        }
    }
}
