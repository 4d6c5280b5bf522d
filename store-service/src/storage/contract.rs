//! The storage contract: one test suite every backend must pass (`storage_contract_tests!`).

use idempotency_wire::{
    AcquireRequest, CheckpointRequest, CompleteRequest, RecordId, ReleaseRequest, StoredResponse,
};

/// An acquire for `key` with a 60 s retention.
pub fn acquire_request(key: &str, lock_timeout_ms: u64) -> AcquireRequest {
    AcquireRequest {
        id: record_id(key),
        fingerprint: "f".repeat(64),
        method: "POST".into(),
        path: "/api/v1/orders".into(),
        lock_timeout_ms,
        retention_ms: 60_000,
    }
}

/// Identity used by the contract tests.
pub fn record_id(key: &str) -> RecordId {
    RecordId {
        service: "orders".into(),
        scope: "tenant-a".into(),
        key: key.into(),
    }
}

/// A complete for `key` with a small JSON body.
pub fn complete_request(key: &str, fencing_token: u64) -> CompleteRequest {
    CompleteRequest {
        id: record_id(key),
        fencing_token,
        response: StoredResponse {
            status: 201,
            headers: vec![("content-type".into(), "application/json".into())],
            body: br#"{"orderId":"1"}"#.to_vec(),
            body_omitted: false,
        },
        retention_ms: 60_000,
    }
}

/// A release for `key`.
pub fn release_request(key: &str, fencing_token: u64) -> ReleaseRequest {
    ReleaseRequest {
        id: record_id(key),
        fencing_token,
    }
}

/// A checkpoint for `key`.
pub fn checkpoint_request(key: &str, fencing_token: u64, phase: &str) -> CheckpointRequest {
    CheckpointRequest {
        id: record_id(key),
        fencing_token,
        phase: phase.into(),
    }
}

/// Generates the contract tests for a backend. `$open` is an async expression returning
/// `(guard, storage)`; the guard keeps the backend alive for the test.
#[macro_export]
macro_rules! storage_contract_tests {
    ($open:expr) => {
        mod contract {
            #[allow(unused_imports)]
            use super::*;
            use std::sync::Arc;

            use idempotency_wire::{AcquireResponse, Lock};
            use $crate::record::RecordState;
            use $crate::storage::contract::*;
            use $crate::storage::{Storage, StorageError};

            fn lock_of(response: AcquireResponse) -> Lock {
                match response {
                    AcquireResponse::Acquired(lock) => lock,
                    other => panic!("expected acquired, got {other:?}"),
                }
            }

            #[tokio::test]
            async fn first_acquire_takes_the_lock_and_a_second_sees_it_in_progress() {
                let (_guard, s) = $open;
                let lock = lock_of(
                    s.acquire(&acquire_request("k1", 10_000), 1_000)
                        .await
                        .unwrap(),
                );
                assert_eq!(lock.fencing_token, 1);
                assert!(!lock.resumed);
                let again = s
                    .acquire(&acquire_request("k1", 10_000), 2_000)
                    .await
                    .unwrap();
                assert_eq!(
                    again,
                    AcquireResponse::InProgress {
                        lock_remaining_ms: 9_000
                    }
                );
            }

            #[tokio::test]
            async fn completed_record_returns_the_stored_response() {
                let (_guard, s) = $open;
                let lock = lock_of(
                    s.acquire(&acquire_request("k2", 10_000), 1_000)
                        .await
                        .unwrap(),
                );
                s.complete(&complete_request("k2", lock.fencing_token), 1_500)
                    .await
                    .unwrap();
                match s
                    .acquire(&acquire_request("k2", 10_000), 2_000)
                    .await
                    .unwrap()
                {
                    AcquireResponse::Completed { response } => {
                        assert_eq!(response, complete_request("k2", 1).response);
                    }
                    other => panic!("expected completed, got {other:?}"),
                }
                let record = s.get(&record_id("k2"), 2_000).await.unwrap().unwrap();
                assert_eq!(record.state, RecordState::Completed);
            }

            #[tokio::test]
            async fn same_key_with_other_parameters_is_a_mismatch() {
                let (_guard, s) = $open;
                s.acquire(&acquire_request("k3", 10_000), 1_000)
                    .await
                    .unwrap();
                let mut other = acquire_request("k3", 10_000);
                other.fingerprint = "0".repeat(64);
                assert_eq!(
                    s.acquire(&other, 1_100).await.unwrap(),
                    AcquireResponse::Mismatch
                );
            }

            #[tokio::test]
            async fn expired_lock_is_taken_over_with_a_higher_token_and_the_recovery_point() {
                let (_guard, s) = $open;
                let first = lock_of(
                    s.acquire(&acquire_request("k4", 1_000), 1_000)
                        .await
                        .unwrap(),
                );
                s.checkpoint(
                    &checkpoint_request("k4", first.fencing_token, "validated"),
                    1_200,
                )
                .await
                .unwrap();
                s.checkpoint(
                    &checkpoint_request("k4", first.fencing_token, "inventory_reserved"),
                    1_300,
                )
                .await
                .unwrap();
                let second = lock_of(
                    s.acquire(&acquire_request("k4", 1_000), 2_500)
                        .await
                        .unwrap(),
                );
                assert_eq!(second.fencing_token, first.fencing_token + 1);
                assert!(second.resumed);
                assert_eq!(second.recovery_point.as_deref(), Some("inventory_reserved"));
                assert_eq!(second.record_id, first.record_id);
            }

            #[tokio::test]
            async fn stale_token_cannot_complete_release_or_checkpoint() {
                let (_guard, s) = $open;
                let first = lock_of(
                    s.acquire(&acquire_request("k5", 1_000), 1_000)
                        .await
                        .unwrap(),
                );
                let second = lock_of(
                    s.acquire(&acquire_request("k5", 1_000), 2_500)
                        .await
                        .unwrap(),
                );
                let stale = first.fencing_token;
                assert!(matches!(
                    s.complete(&complete_request("k5", stale), 2_600).await,
                    Err(StorageError::StaleToken { .. })
                ));
                assert!(matches!(
                    s.release(&release_request("k5", stale), 2_600).await,
                    Err(StorageError::StaleToken { .. })
                ));
                assert!(matches!(
                    s.checkpoint(&checkpoint_request("k5", stale, "x"), 2_600)
                        .await,
                    Err(StorageError::StaleToken { .. })
                ));
                s.complete(&complete_request("k5", second.fencing_token), 2_700)
                    .await
                    .unwrap();
                // Completed records refuse every further holder write too.
                assert!(matches!(
                    s.complete(&complete_request("k5", second.fencing_token), 2_800)
                        .await,
                    Err(StorageError::StaleToken { .. })
                ));
            }

            #[tokio::test]
            async fn release_lets_the_next_attempt_run_and_keeps_checkpoints() {
                let (_guard, s) = $open;
                let first = lock_of(
                    s.acquire(&acquire_request("k6", 60_000), 1_000)
                        .await
                        .unwrap(),
                );
                s.checkpoint(
                    &checkpoint_request("k6", first.fencing_token, "validated"),
                    1_100,
                )
                .await
                .unwrap();
                s.release(&release_request("k6", first.fencing_token), 1_200)
                    .await
                    .unwrap();
                let second = lock_of(
                    s.acquire(&acquire_request("k6", 60_000), 1_300)
                        .await
                        .unwrap(),
                );
                assert_eq!(second.fencing_token, 2);
                assert_eq!(second.recovery_point.as_deref(), Some("validated"));
            }

            #[tokio::test]
            async fn writes_to_unknown_records_are_not_found() {
                let (_guard, s) = $open;
                assert!(matches!(
                    s.complete(&complete_request("nope", 1), 1_000).await,
                    Err(StorageError::NotFound(_))
                ));
            }

            #[tokio::test]
            async fn expired_records_are_new_again_and_swept() {
                let (_guard, s) = $open;
                let lock = lock_of(
                    s.acquire(&acquire_request("k7", 1_000), 1_000)
                        .await
                        .unwrap(),
                );
                s.complete(&complete_request("k7", lock.fencing_token), 1_100)
                    .await
                    .unwrap();
                // Retention is 60 s from completion.
                let after = 1_100 + 60_000;
                assert!(s.get(&record_id("k7"), after).await.unwrap().is_none());
                assert!(s.sweep_expired(after).await.unwrap() >= 1);
                assert!(s.get(&record_id("k7"), after).await.unwrap().is_none());
                let fresh = lock_of(
                    s.acquire(&acquire_request("k7", 1_000), after + 1)
                        .await
                        .unwrap(),
                );
                assert!(!fresh.resumed);
            }

            #[tokio::test]
            async fn sweep_keeps_live_records() {
                let (_guard, s) = $open;
                s.acquire(&acquire_request("k8", 1_000), 1_000)
                    .await
                    .unwrap();
                s.sweep_expired(2_000).await.unwrap();
                assert!(s.get(&record_id("k8"), 2_000).await.unwrap().is_some());
            }

            #[tokio::test]
            async fn purge_deletes_a_record() {
                let (_guard, s) = $open;
                s.acquire(&acquire_request("k9", 1_000), 1_000)
                    .await
                    .unwrap();
                assert!(s.purge(&record_id("k9")).await.unwrap());
                assert!(!s.purge(&record_id("k9")).await.unwrap());
                assert!(s.get(&record_id("k9"), 1_000).await.unwrap().is_none());
            }

            #[tokio::test]
            async fn fifty_racing_acquires_have_exactly_one_winner() {
                let (_guard, s) = $open;
                let s = Arc::new(s);
                let tasks: Vec<_> = (0..50)
                    .map(|_| {
                        let s = s.clone();
                        tokio::spawn(async move { s.acquire(&acquire_request("race", 60_000), 5_000).await })
                    })
                    .collect();
                let mut winners = 0;
                for task in tasks {
                    match task.await.unwrap().unwrap() {
                        AcquireResponse::Acquired(_) => winners += 1,
                        AcquireResponse::InProgress { .. } => {}
                        other => panic!("unexpected {other:?}"),
                    }
                }
                assert_eq!(winners, 1);
            }
        }
    };
}
