//! Kafka consumer deduplication against a real Kafka-protocol broker (tansu): a producer's duplicate, a failed handler, and a group member killed after handling but before its offset commit, whose records go to another member after the rebalance — each event handled once.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)] // test code

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use e2e::{free_port, metric_sum, ready_store, Proc, STORE_TOKEN};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::Value;

const TOPIC: &str = "orders.received";
const GROUP: &str = "order-processor";
const SOURCE: &str = "/order-service";

/// The tansu broker: `TANSU_BIN`, `tansu` on the PATH, or `~/.cargo/bin/tansu` (`make kafka-broker`
/// and `.ci/run` install it there once per machine).
fn tansu_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("TANSU_BIN") {
        return PathBuf::from(path);
    }
    let on_path = Command::new("tansu")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if on_path {
        return PathBuf::from("tansu");
    }
    let home = PathBuf::from(std::env::var_os("HOME").unwrap_or_default());
    let installed = home.join(".cargo/bin/tansu");
    assert!(
        installed.exists(),
        "tansu (a Kafka-protocol broker) is missing: run `make kafka-broker` (cargo install, ~4 min once) or set TANSU_BIN"
    );
    installed
}

/// A tansu broker with in-memory storage on a free port.
struct Broker {
    _proc: Proc,
    address: String,
}

impl Broker {
    async fn start(dir: &Path) -> Broker {
        let port = free_port();
        let address = format!("127.0.0.1:{port}");
        let url = format!("tcp://{address}");
        let mut command = Command::new(tansu_bin());
        command
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "memory://tansu/"])
            .env("RUST_LOG", "warn,tansu_broker::coordinator=info");
        let proc = Proc::spawn("tansu", command, dir.join("tansu.log"));
        let broker = Broker { _proc: proc, address };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let probe: BaseConsumer = broker.config().create().unwrap();
            if probe.fetch_metadata(None, Duration::from_secs(2)).is_ok() {
                return broker;
            }
            assert!(
                Instant::now() < deadline,
                "tansu did not come up on {}",
                broker.address
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.address);
        config
    }

    async fn create_topic(&self, name: &str, partitions: i32) {
        let admin: AdminClient<DefaultClientContext> = self.config().create().unwrap();
        let results = admin
            .create_topics(
                &[NewTopic::new(name, partitions, TopicReplication::Fixed(1))],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
            )
            .await
            .unwrap();
        for result in results {
            result.unwrap();
        }
    }

    /// Publish a CloudEvent in Kafka binary mode (`ce_*` headers) to `partition`.
    async fn publish(&self, event_id: &str, partition: i32) {
        let producer: FutureProducer = self.config().set("message.timeout.ms", "10000").create().unwrap();
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "ce_specversion",
                value: Some("1.0"),
            })
            .insert(Header {
                key: "ce_id",
                value: Some(event_id),
            })
            .insert(Header {
                key: "ce_source",
                value: Some(SOURCE),
            })
            .insert(Header {
                key: "ce_type",
                value: Some("com.wms.OrderReceived"),
            })
            .insert(Header {
                key: "content-type",
                value: Some("application/json"),
            });
        let payload = serde_json::json!({ "orderId": event_id }).to_string();
        producer
            .send(
                FutureRecord::to(TOPIC)
                    .partition(partition)
                    .key(event_id)
                    .payload(&payload)
                    .headers(headers),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }

    /// The group's committed offsets per partition (absent: nothing committed).
    fn committed(&self, partitions: i32) -> BTreeMap<i32, i64> {
        let consumer: BaseConsumer = self.config().set("group.id", GROUP).create().unwrap();
        let mut list = TopicPartitionList::new();
        for p in 0..partitions {
            list.add_partition(TOPIC, p);
        }
        let committed = consumer.committed_offsets(list, Duration::from_secs(10)).unwrap();
        committed
            .elements()
            .iter()
            .filter_map(|e| match e.offset() {
                Offset::Offset(o) => Some((e.partition(), o)),
                _ => None,
            })
            .collect()
    }
}

/// One `kafka-dedup-consumer` process: a member of the group.
struct Member {
    proc: Proc,
}

impl Member {
    fn start(dir: &Path, name: &str, broker: &Broker, store_url: &str, extra: &[&str]) -> Member {
        let mut command = Command::new(env!("CARGO_BIN_EXE_kafka-dedup-consumer"));
        command
            .args([
                "--brokers",
                &broker.address,
                "--store",
                store_url,
                "--token",
                STORE_TOKEN,
            ])
            .args(["--group", GROUP, "--topic", TOPIC])
            .arg("--ledger")
            .arg(dir.join("ledger.txt"))
            .args(extra)
            .env("RUST_LOG", "warn,tansu_broker::coordinator=info");
        Member {
            proc: Proc::spawn(name, command, dir.join(format!("{name}.log"))),
        }
    }

    fn lines(&self) -> Vec<Value> {
        self.proc
            .output()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    fn assignment(&self) -> Option<Vec<i64>> {
        self.lines().iter().rev().find_map(|l| {
            l.get("assigned")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_i64).collect())
        })
    }

    /// (partition, offset) → what this member did last with that record.
    fn deliveries(&self) -> BTreeMap<(i64, i64), String> {
        self.lines()
            .iter()
            .filter_map(|l| {
                Some((
                    (l.get("partition")?.as_i64()?, l.get("offset")?.as_i64()?),
                    l.get("result")?.as_str()?.to_owned(),
                ))
            })
            .collect()
    }

    fn count(&self, result: &str) -> usize {
        self.lines()
            .iter()
            .filter(|l| l.get("result").and_then(Value::as_str) == Some(result))
            .count()
    }
}

async fn wait_until(
    what: &str,
    timeout: Duration,
    mut done: impl FnMut() -> bool,
    context: impl Fn() -> String,
) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            context()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn ledger(dir: &Path) -> BTreeMap<String, usize> {
    let text = std::fs::read_to_string(dir.join("ledger.txt")).unwrap_or_default();
    let mut runs = BTreeMap::new();
    for id in text.lines() {
        *runs.entry(id.to_owned()).or_insert(0) += 1;
    }
    runs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_event_is_handled_once_across_duplicates_failures_and_a_rebalance_after_a_kill() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path()).await;
    let (_store, store_url) = ready_store(dir.path()).await;
    broker.create_topic(TOPIC, 2).await;

    // Two members of one group, one partition each. A commits periodically with an interval far
    // longer than the test, so whatever it handles stays uncommitted until it is killed; B
    // commits every record. A's first run of e2 fails.
    let mut a = Member::start(
        dir.path(),
        "member-a",
        &broker,
        &store_url,
        &["--commit-interval-ms", "600000", "--fail-first", "e2"],
    );
    let b = Member::start(dir.path(), "member-b", &broker, &store_url, &["--commit-each"]);
    let context = || format!("A:\n{}\nB:\n{}", a.proc.output(), b.proc.output());
    wait_until(
        "both members to own one partition",
        Duration::from_secs(60),
        || a.assignment().is_some_and(|p| p.len() == 1) && b.assignment().is_some_and(|p| p.len() == 1),
        context,
    )
    .await;
    let a_partition = i32::try_from(a.assignment().unwrap()[0]).unwrap();
    let b_partition = 1 - a_partition;

    // e1..e3 to A's partition, e4..e6 to B's, and a producer's duplicate of e5 (same CloudEvent
    // source and id, a separate Kafka record) to A's partition.
    for (id, partition) in [
        ("e1", a_partition),
        ("e2", a_partition),
        ("e3", a_partition),
        ("e4", b_partition),
        ("e5", b_partition),
        ("e6", b_partition),
        ("e5", a_partition),
    ] {
        broker.publish(id, partition).await;
    }
    let context = || {
        format!(
            "A:\n{}\nB:\n{}\nledger: {:?}",
            a.proc.output(),
            b.proc.output(),
            ledger(dir.path())
        )
    };
    wait_until(
        "all six events handled",
        Duration::from_secs(60),
        || ledger(dir.path()).len() == 6 && a.deliveries().len() == 4 && b.deliveries().len() == 3,
        context,
    )
    .await;
    // Let B finish committing its last record, then check what is committed: B's partition in
    // full, nothing of A's (it handled its records but has not committed them).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let committed = broker.committed(2);
    assert_eq!(
        committed.get(&b_partition),
        Some(&3),
        "B commits each record: {committed:?}"
    );
    assert_eq!(
        committed.get(&a_partition),
        None,
        "A has committed nothing yet: {committed:?}"
    );
    let a_handled = a.deliveries();
    assert_eq!(
        a.count("HandlerFailed"),
        1,
        "e2 failed once and was retried: {a_handled:?}"
    );

    // A dies (SIGKILL) after handling, before any commit. The broker drops it when its session
    // times out; C joins, the group rebalances, and whoever gets A's partition reads it again
    // from the start (nothing of it was committed).
    //
    // tansu 0.6.0 drops a member whose session expired but does not start a rebalance by itself
    // (its Formed-state heartbeat removes the member and keeps the old assignment), so the
    // survivors would keep their partitions until a member joins. A joining member is the
    // rebalance this test relies on; with Apache Kafka the session timeout alone triggers it.
    a.proc.kill();
    let broker_log = || std::fs::read_to_string(dir.path().join("tansu.log")).unwrap_or_default();
    wait_until(
        "the broker to drop A after its session timeout",
        Duration::from_secs(30),
        || broker_log().contains("missed heartbeat"),
        broker_log,
    )
    .await;
    let c = Member::start(dir.path(), "member-c", &broker, &store_url, &["--commit-each"]);
    let context = || {
        format!(
            "B:\n{}\nC:\n{}\nbroker:\n{}",
            b.proc.output(),
            c.proc.output(),
            broker_log()
        )
    };
    // The member that owns A's old partition once B and C split both partitions between them.
    let owner_of_a_partition = || {
        let (on_b, on_c) = (b.assignment()?, c.assignment()?);
        let a_part = i64::from(a_partition);
        if on_b.len() + on_c.len() != 2 {
            None
        } else if on_b.contains(&a_part) {
            Some(&b)
        } else {
            on_c.contains(&a_part).then_some(&c)
        }
    };
    wait_until(
        "the rebalance to give A's partition to B or C and its records to be re-read",
        Duration::from_secs(60),
        || {
            owner_of_a_partition().is_some_and(|m| {
                let seen = m.deliveries();
                a_handled.keys().all(|key| seen.contains_key(key))
            })
        },
        context,
    )
    .await;
    let heir = owner_of_a_partition().unwrap();
    let heir_seen = heir.deliveries();
    for key in a_handled.keys() {
        assert_eq!(
            heir_seen[key], "Duplicate",
            "A's record {key:?} was skipped after the rebalance: {heir_seen:?}"
        );
    }

    // A new event after the takeover is handled once, and every offset ends up committed.
    broker.publish("e7", a_partition).await;
    wait_until(
        "e7 handled",
        Duration::from_secs(30),
        || ledger(dir.path()).contains_key("e7"),
        context,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let committed = broker.committed(2);
    assert_eq!(committed.get(&a_partition), Some(&5), "{committed:?}");
    assert_eq!(committed.get(&b_partition), Some(&3), "{committed:?}");

    // The client's view: each event ran exactly once (the ledger survives the kill).
    let runs = ledger(dir.path());
    let expected: BTreeMap<String, usize> = ["e1", "e2", "e3", "e4", "e5", "e6", "e7"]
        .iter()
        .map(|id| ((*id).to_owned(), 1))
        .collect();
    assert_eq!(runs, expected, "each event handled exactly once");

    // Every skip is counted in the store: e5's duplicate record, and A's four records re-read.
    let duplicates = a.count("Duplicate") + b.count("Duplicate") + c.count("Duplicate");
    assert_eq!(duplicates, 5, "A:\n{}\n{}", a.proc.output(), context());
    let metrics = reqwest::get(format!("{store_url}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let series = format!("message_deduplication_hits_total{{consumer_group=\"{GROUP}\",topic=\"{TOPIC}\"}}");
    assert!(metrics.lines().any(|l| l == format!("{series} 5")), "{metrics}");
    assert_eq!(metric_sum(&metrics, "message_deduplication_hits_total"), 5.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_outage_after_the_handler_ran_costs_time_not_a_second_run() {
    // The handler of e1 writes the ledger, then takes 1 s; the store goes down for 5 s right
    // after it ran. The consumer retries `complete` while its claim (30 s) holds: e1 runs once,
    // then e2, in order.
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path()).await;
    let store_port = free_port();
    let data = dir.path().join("store-data");
    let store_url = format!("http://127.0.0.1:{store_port}");
    let mut store = e2e::spawn_store(dir.path(), store_port, &data, &[], "store.log");
    e2e::wait_ready(
        &format!("{store_url}/readyz"),
        &mut store,
        Duration::from_secs(30),
    )
    .await;
    broker.create_topic(TOPIC, 1).await;
    let member = Member::start(
        dir.path(),
        "member",
        &broker,
        &store_url,
        &["--commit-each", "--pause-after-handling", "e1:1000"],
    );
    broker.publish("e1", 0).await;
    broker.publish("e2", 0).await;
    let context = || format!("{}\nledger: {:?}", member.proc.output(), ledger(dir.path()));
    wait_until(
        "e1's handler to run",
        Duration::from_secs(60),
        || ledger(dir.path()).contains_key("e1"),
        context,
    )
    .await;
    store.kill();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut store = e2e::spawn_store(dir.path(), store_port, &data, &[], "store-2.log");
    e2e::wait_ready(
        &format!("{store_url}/readyz"),
        &mut store,
        Duration::from_secs(30),
    )
    .await;
    wait_until(
        "e1 and e2 processed",
        Duration::from_secs(30),
        || member.count("Processed") == 2,
        context,
    )
    .await;
    let runs = ledger(dir.path());
    assert_eq!(runs.get("e1"), Some(&1), "e1 ran once: {runs:?}");
    assert_eq!(runs.get("e2"), Some(&1), "{runs:?}");
    assert_eq!(
        member.count("StoreFailed"),
        0,
        "the complete was retried, not given up"
    );
}

/// The records of `topic` (partition 0) with their headers.
fn read_topic(broker: &Broker, topic: &str, expected: usize) -> Vec<BTreeMap<String, String>> {
    use rdkafka::message::{Headers, Message};
    let consumer: BaseConsumer = broker
        .config()
        .set("group.id", "dead-letter-reader")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut list = TopicPartitionList::new();
    list.add_partition_offset(topic, 0, Offset::Beginning).unwrap();
    consumer.assign(&list).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut records = Vec::new();
    while records.len() < expected && Instant::now() < deadline {
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(500)) {
            let mut headers = BTreeMap::new();
            if let Some(h) = message.headers() {
                for header in h.iter() {
                    headers.insert(
                        header.key.to_owned(),
                        String::from_utf8_lossy(header.value.unwrap_or_default()).into_owned(),
                    );
                }
            }
            records.push(headers);
        }
    }
    records
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_record_is_dead_lettered_after_max_attempts_and_the_partition_moves_on() {
    const DEAD_LETTERS: &str = "orders.received.dlq";
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(dir.path()).await;
    let (_store, store_url) = ready_store(dir.path()).await;
    broker.create_topic(TOPIC, 1).await;
    broker.create_topic(DEAD_LETTERS, 1).await;
    let member = Member::start(
        dir.path(),
        "member",
        &broker,
        &store_url,
        &[
            "--commit-each",
            "--fail-always",
            "poison",
            "--dead-letter-topic",
            DEAD_LETTERS,
            "--max-attempts",
            "3",
        ],
    );
    broker.publish("poison", 0).await;
    broker.publish("after", 0).await;
    let context = || format!("{}\nledger: {:?}", member.proc.output(), ledger(dir.path()));
    wait_until(
        "the record after the poison one to be handled",
        Duration::from_secs(60),
        || ledger(dir.path()).contains_key("after"),
        context,
    )
    .await;
    assert_eq!(member.count("HandlerFailed"), 2, "{}", context());
    assert_eq!(member.count("DeadLettered"), 1, "{}", context());
    assert_eq!(member.deliveries()[&(0, 0)], "DeadLettered");

    // The dead-letter topic holds it, with where it came from and why.
    let dead = read_topic(&broker, DEAD_LETTERS, 1);
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["ce_id"], "poison");
    assert_eq!(dead[0]["dead-letter-topic"], TOPIC);
    assert_eq!(dead[0]["dead-letter-offset"], "0");
    assert_eq!(dead[0]["dead-letter-attempts"], "3");
    assert!(
        dead[0]["dead-letter-error"].contains("inventory service unavailable"),
        "{dead:?}"
    );

    // Committed past both; the store counts it and skips a producer's duplicate of it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(broker.committed(1).get(&0), Some(&2));
    let metrics = reqwest::get(format!("{store_url}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        metric_sum(&metrics, "idempotency_message_dead_letters_total"),
        1.0,
        "{metrics}"
    );
    broker.publish("poison", 0).await;
    wait_until(
        "the duplicate of the dead-lettered record to be skipped",
        Duration::from_secs(30),
        || member.count("Duplicate") == 1,
        context,
    )
    .await;
    assert!(!ledger(dir.path()).contains_key("poison"));
}
