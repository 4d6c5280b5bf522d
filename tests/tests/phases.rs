//! Multi-phase operations: a retried request resumes after its last checkpointed phase.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)] // test code

use std::time::Duration;

use e2e::{metric_sum, Stack, StackOptions};
use serde_json::{json, Value};

fn phased(stack: &Stack, key: &str) -> reqwest::RequestBuilder {
    stack
        .client
        .post(format!("{}/api/v1/orders/phased", stack.url))
        .header("Idempotency-Key", key)
        .json(&json!({"customerId": "CUST-001", "items": [{"sku": "SKU-001", "quantity": 2}]}))
}

async fn phase_counts(stack: &Stack) -> Value {
    stack.executions().await["phases"].clone()
}

#[tokio::test]
async fn a_retry_after_a_failure_after_phase_2_resumes_at_phase_3_and_phases_1_and_2_run_once() {
    let stack = Stack::start().await;
    let failed = phased(&stack, "phased-1")
        .header("x-demo-fail-after-phase", "2")
        .send()
        .await
        .unwrap();
    assert_eq!(failed.status(), 500);
    assert_eq!(
        phase_counts(&stack).await,
        json!({"validated": 1, "inventory_reserved": 1}),
        "phases 1-2 ran and were checkpointed"
    );

    let retry = phased(&stack, "phased-1").send().await.unwrap();
    assert_eq!(retry.status(), 201);
    let body: Value = retry.json().await.unwrap();
    assert_eq!(body["resumedFrom"], "inventory_reserved");
    assert_eq!(body["phasesSkipped"], json!(["validated", "inventory_reserved"]));
    assert_eq!(body["phasesRun"], json!(["order_created", "notification_sent"]));
    assert_eq!(
        phase_counts(&stack).await,
        json!({"validated": 1, "inventory_reserved": 1, "order_created": 1, "notification_sent": 1}),
        "no phase ran twice"
    );

    // The final response is stored and replayed.
    let replay = phased(&stack, "phased-1").send().await.unwrap();
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    let replayed: Value = replay.json().await.unwrap();
    assert_eq!(replayed["orderId"], body["orderId"]);
    let record = stack.record("phased-1").await.unwrap();
    let phases: Vec<&str> = record["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["phase"].as_str().unwrap())
        .collect();
    assert_eq!(
        phases,
        [
            "validated",
            "inventory_reserved",
            "order_created",
            "notification_sent"
        ]
    );
}

#[tokio::test]
async fn a_takeover_after_lock_timeout_resumes_at_the_recovery_point_and_fences_out_the_old_holder() {
    let stack = Stack::start_with(StackOptions::plugin(json!({"lock_timeout": "1s"}))).await;
    // The first attempt stalls after phase 2, longer than the lock timeout.
    let stalled = {
        let request = phased(&stack, "phased-2")
            .header("x-demo-pause-after-phase", "2")
            .header("x-demo-pause-ms", "2500");
        tokio::spawn(async move { request.send().await })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let takeover = phased(&stack, "phased-2").send().await.unwrap();
    assert_eq!(takeover.status(), 201);
    let body: Value = takeover.json().await.unwrap();
    assert_eq!(
        body["resumedFrom"], "inventory_reserved",
        "the takeover carries the recovery point"
    );
    assert_eq!(body["phasesRun"], json!(["order_created", "notification_sent"]));

    // The stalled holder wakes up, and its next checkpoint is refused: it lost the lock.
    let late = stalled.await.unwrap().unwrap();
    assert_eq!(late.status(), 409);
    let counts = stack.executions().await;
    assert_eq!(counts["lostLocks"], 1);
    assert_eq!(counts["phases"]["validated"], 1);
    assert_eq!(counts["phases"]["inventory_reserved"], 1);
    assert!(
        metric_sum(
            &stack.store_metrics().await,
            "idempotency_stale_fencing_tokens_total"
        ) >= 1.0
    );

    // Its late completion did not overwrite the takeover's result.
    let replay: Value = phased(&stack, "phased-2")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(replay["orderId"], body["orderId"]);
}
