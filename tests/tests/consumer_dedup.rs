//! Event-consumer deduplication with a real broker: CloudEvents over NATS JetStream, redelivered
//! by the broker, handled exactly once per event through the store.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)] // test code

use std::collections::HashMap;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull, AckKind};
use cloudevents::{AttributesReader, Event, EventBuilder, EventBuilderV10};
use e2e::{free_port, metric_sum, ready_store, Proc, STORE_TOKEN};
use futures::StreamExt;
use idempotency_client::{ConsumerConfig, DeduplicatingHandler, HandleError, Outcome, StoreClient};

const TOPIC: &str = "orders.received";
const GROUP: &str = "order-processor";

/// `nats-server` (Debian package `nats-server`; `.ci/run` installs it), or `NATS_SERVER_BIN`.
fn nats_server_bin() -> String {
    e2e::debian_tool("NATS_SERVER_BIN", "nats-server", "nats-server")
}

fn order_event(id: &str) -> Event {
    EventBuilderV10::new()
        .id(id)
        .source("/order-service")
        .ty("com.wms.OrderReceived")
        .data("application/json", serde_json::json!({"orderId": id}))
        .build()
        .unwrap()
}

#[tokio::test]
async fn each_cloudevent_is_handled_once_despite_duplicates_redeliveries_and_failures() {
    let dir = tempfile::tempdir().unwrap();
    let nats_port = free_port();
    let mut nats = Command::new(nats_server_bin());
    nats.args(["-js", "-a", "127.0.0.1", "-p", &nats_port.to_string(), "-sd"])
        .arg(dir.path().join("jetstream"));
    let _nats = Proc::spawn("nats-server", nats, dir.path().join("nats.log"));
    let (_store, store_url) = ready_store(dir.path()).await;

    let client = {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match async_nats::connect(format!("127.0.0.1:{nats_port}")).await {
                Ok(c) => break c,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("nats-server did not come up: {e}"),
            }
        }
    };
    let js = jetstream::new(client);
    let stream = js
        .get_or_create_stream(jetstream::stream::Config {
            name: "ORDERS".into(),
            subjects: vec![TOPIC.into()],
            ..Default::default()
        })
        .await
        .unwrap();

    // e2 is published twice (a producer retry): same CloudEvent id, two broker messages.
    for id in ["e1", "e2", "e2", "e3"] {
        let payload = serde_json::to_vec(&order_event(id)).unwrap();
        js.publish(TOPIC, payload.into()).await.unwrap().await.unwrap();
    }

    // The handler: e3 fails on its first run (the claim is released, the broker redelivers).
    let runs: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let successes: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
    let handler = {
        let (runs, successes) = (runs.clone(), successes.clone());
        move |event: Event| {
            let (runs, successes) = (runs.clone(), successes.clone());
            async move {
                let id = event.id().to_owned();
                let run = {
                    let mut runs = runs.lock().unwrap();
                    let n = runs.entry(id.clone()).or_insert(0);
                    *n += 1;
                    *n
                };
                if id == "e3" && run == 1 {
                    return Err("inventory service unavailable");
                }
                *successes.lock().unwrap().entry(id).or_insert(0) += 1;
                Ok(())
            }
        }
    };
    let dedup = DeduplicatingHandler::new(
        StoreClient::new(store_url.clone(), Some(STORE_TOKEN.to_owned())).unwrap(),
        ConsumerConfig {
            service_name: "order-service".into(),
            topic: TOPIC.into(),
            consumer_group: GROUP.into(),
            lock_timeout: Duration::from_secs(30),
            retention_period: Duration::from_secs(3600),
        },
        handler,
    );

    let consumer = stream
        .get_or_create_consumer(
            GROUP,
            pull::Config {
                durable_name: Some(GROUP.into()),
                ack_wait: Duration::from_secs(1),
                max_deliver: 10,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let mut outcomes: Vec<(String, String)> = Vec::new();
    let mut crashed_before_ack_once = false;
    // Consume until the broker has had nothing to redeliver for 3 s (ack_wait is 1 s).
    while let Ok(Some(message)) = tokio::time::timeout(Duration::from_secs(3), messages.next()).await {
        let message = message.unwrap();
        let event: Event = serde_json::from_slice(&message.payload).unwrap();
        let id = event.id().to_owned();
        match dedup.handle(event).await {
            Ok(Outcome::Processed) if id == "e1" && !crashed_before_ack_once => {
                // The consumer "crashes" after handling e1 but before acknowledging it: the
                // broker redelivers e1 after ack_wait.
                crashed_before_ack_once = true;
                outcomes.push((id, "processed, not acked".into()));
            }
            Ok(outcome @ (Outcome::Processed | Outcome::Duplicate)) => {
                message.ack().await.unwrap();
                outcomes.push((id, format!("{outcome:?}")));
            }
            Ok(Outcome::InProgress) => {
                message.ack_with(AckKind::Nak(None)).await.unwrap();
                outcomes.push((id, "in progress".into()));
            }
            Err(HandleError::HandlerFailed(_)) => {
                message.ack_with(AckKind::Nak(None)).await.unwrap();
                outcomes.push((id, "handler failed".into()));
            }
            Err(HandleError::Store(e)) => panic!("store failed: {e}"),
        }
    }

    let successes = successes.lock().unwrap().clone();
    for id in ["e1", "e2", "e3"] {
        assert_eq!(
            successes.get(id),
            Some(&1),
            "{id} handled exactly once: {outcomes:?}"
        );
    }
    assert_eq!(
        runs.lock().unwrap()["e3"],
        2,
        "the failed run released the claim and was retried"
    );
    let duplicates = outcomes.iter().filter(|(_, o)| o == "Duplicate").count();
    assert_eq!(
        duplicates, 2,
        "e2's second publish and e1's redelivery were skipped: {outcomes:?}"
    );
    assert!(crashed_before_ack_once);

    let metrics = reqwest::get(format!("{store_url}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let series = format!("message_deduplication_hits_total{{consumer_group=\"{GROUP}\",topic=\"{TOPIC}\"}}");
    assert!(metrics.lines().any(|l| l == format!("{series} 2")), "{metrics}");
    assert_eq!(metric_sum(&metrics, "message_deduplication_hits_total"), 2.0);
}

#[tokio::test]
async fn a_claim_held_by_a_crashed_consumer_expires_after_its_lock_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, store_url) = ready_store(dir.path()).await;
    let config = ConsumerConfig {
        service_name: "order-service".into(),
        topic: TOPIC.into(),
        consumer_group: GROUP.into(),
        lock_timeout: Duration::from_millis(500),
        retention_period: Duration::from_secs(3600),
    };
    let store_client = StoreClient::new(store_url, Some(STORE_TOKEN.to_owned())).unwrap();

    // A consumer claims the event and dies inside its handler (the future never completes).
    let hung = DeduplicatingHandler::new(store_client.clone(), config.clone(), |_event: Event| async {
        std::future::pending::<Result<(), &'static str>>().await
    });
    let crashed = tokio::time::timeout(Duration::from_millis(200), hung.handle(order_event("e9"))).await;
    assert!(crashed.is_err(), "the handler hung");

    let healthy = DeduplicatingHandler::new(store_client, config, |_event: Event| async {
        Ok::<(), &'static str>(())
    });
    assert_eq!(
        healthy.handle(order_event("e9")).await.unwrap(),
        Outcome::InProgress,
        "claim still held"
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        healthy.handle(order_event("e9")).await.unwrap(),
        Outcome::Processed,
        "expired claim taken over"
    );
    assert_eq!(
        healthy.handle(order_event("e9")).await.unwrap(),
        Outcome::Duplicate
    );
}
