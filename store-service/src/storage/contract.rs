//! The storage contract: one test suite every backend must pass (`storage_contract_tests!`).

use idempotency_wire::{
    AcquireRequest, CheckpointRequest, CompleteRequest, Lock, RecordId, ReleaseRequest, StoredResponse,
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
        attempt_id: String::new(),
        deadline_ms: None,
        wait_ms: 0,
        replay_ticket: false,
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

/// A complete for `key` by the holder of `lock`, with a small JSON body.
pub fn complete_request(key: &str, lock: &Lock) -> CompleteRequest {
    CompleteRequest {
        id: record_id(key),
        record_id: lock.record_id.clone(),
        fencing_token: lock.fencing_token,
        attempt_id: lock.attempt_id.clone(),
        response: StoredResponse {
            status: 201,
            headers: vec![("content-type".into(), "application/json".into())],
            body: br#"{"orderId":"1"}"#.to_vec(),
            body_omitted: false,
            // Trailers round-trip on every backend (gRPC status and trailing metadata).
            trailers: vec![
                ("grpc-status".into(), "0".into()),
                ("x-trace".into(), "t1".into()),
            ],
        },
        retention_ms: 60_000,
    }
}

/// A release for `key` by the holder of `lock`.
pub fn release_request(key: &str, lock: &Lock) -> ReleaseRequest {
    ReleaseRequest {
        id: record_id(key),
        record_id: lock.record_id.clone(),
        fencing_token: lock.fencing_token,
        attempt_id: lock.attempt_id.clone(),
    }
}

/// A checkpoint for `key` by the holder of `lock`.
pub fn checkpoint_request(key: &str, lock: &Lock, phase: &str) -> CheckpointRequest {
    CheckpointRequest {
        id: record_id(key),
        record_id: lock.record_id.clone(),
        fencing_token: lock.fencing_token,
        attempt_id: lock.attempt_id.clone(),
        phase: phase.into(),
    }
}

/// A lock as a holder that never held `key` would present it.
pub fn forged_lock(record_id: &str, fencing_token: u64) -> Lock {
    Lock {
        record_id: record_id.into(),
        fencing_token,
        attempt_id: String::new(),
        resumed: false,
        recovery_point: None,
        previous_attempt: None,
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
                        lock_remaining_ms: 9_000,
                        outcome_unknown: false,
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
                s.complete(&complete_request("k2", &lock), 1_500)
                    .await
                    .unwrap();
                match s
                    .acquire(&acquire_request("k2", 10_000), 2_000)
                    .await
                    .unwrap()
                {
                    AcquireResponse::Completed {
                        response,
                        expires_at_ms,
                        ..
                    } => {
                        assert_eq!(expires_at_ms, Some(1_500 + 60_000));
                        assert_eq!(response, complete_request("k2", &lock).response);
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
                s.checkpoint(&checkpoint_request("k4", &first, "validated"), 1_200)
                    .await
                    .unwrap();
                s.checkpoint(
                    &checkpoint_request("k4", &first, "inventory_reserved"),
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
                let stale = &first;
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
                s.complete(&complete_request("k5", &second), 2_700)
                    .await
                    .unwrap();
                // Completed records refuse every further holder write too.
                assert!(matches!(
                    s.complete(&complete_request("k5", &second), 2_800).await,
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
                s.checkpoint(&checkpoint_request("k6", &first, "validated"), 1_100)
                    .await
                    .unwrap();
                s.release(&release_request("k6", &first), 1_200)
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
                    s.complete(&complete_request("nope", &forged_lock("r", 1)), 1_000)
                        .await,
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
                s.complete(&complete_request("k7", &lock), 1_100)
                    .await
                    .unwrap();
                // Retention is 60 s from completion.
                let after = 1_100 + 60_000;
                assert!(s.get(&record_id("k7"), after).await.unwrap().is_none());
                assert!($crate::sweep_all(&s, after).await.unwrap() >= 1);
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
                $crate::sweep_all(&s, 2_000).await.unwrap();
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

            fn attempt(
                key: &str,
                lock_timeout_ms: u64,
                attempt_id: &str,
            ) -> idempotency_wire::AcquireRequest {
                let mut request = acquire_request(key, lock_timeout_ms);
                request.attempt_id = attempt_id.into();
                request
            }

            #[tokio::test]
            async fn outcome_unknown_keeps_the_lock_and_the_takeover_says_the_previous_attempt_may_have_run()
            {
                let (_guard, s) = $open;
                let first = lock_of(s.acquire(&attempt("u1", 1_000, "a1"), 1_000).await.unwrap());
                let report = idempotency_wire::OutcomeUnknownRequest {
                    id: record_id("u1"),
                    record_id: first.record_id.clone(),
                    fencing_token: first.fencing_token,
                    attempt_id: first.attempt_id.clone(),
                    reason: "downstream_disconnect".into(),
                };
                s.outcome_unknown(&report, 1_100).await.unwrap();
                assert_eq!(
                    s.acquire(&attempt("u1", 1_000, "a2"), 1_200).await.unwrap(),
                    AcquireResponse::InProgress {
                        lock_remaining_ms: 800,
                        outcome_unknown: true
                    }
                );
                let record = s.get(&record_id("u1"), 1_200).await.unwrap().unwrap();
                assert_eq!(
                    record.outcome_unknown.unwrap().reason,
                    "downstream_disconnect"
                );
                let second = lock_of(s.acquire(&attempt("u1", 1_000, "a3"), 2_100).await.unwrap());
                assert_eq!(
                    second.previous_attempt,
                    Some(idempotency_wire::PreviousAttempt::Unknown)
                );
                let record = s.get(&record_id("u1"), 2_100).await.unwrap().unwrap();
                assert!(record.outcome_unknown.is_none(), "{record:?}");
                assert_eq!(record.attempt_id, "a3");
            }

            #[tokio::test]
            async fn a_takeover_after_a_release_says_the_previous_attempt_was_released() {
                let (_guard, s) = $open;
                let first = lock_of(
                    s.acquire(&attempt("u2", 60_000, "a1"), 1_000)
                        .await
                        .unwrap(),
                );
                s.release(&release_request("u2", &first), 1_100)
                    .await
                    .unwrap();
                let second = lock_of(
                    s.acquire(&attempt("u2", 60_000, "a2"), 1_200)
                        .await
                        .unwrap(),
                );
                assert_eq!(
                    second.previous_attempt,
                    Some(idempotency_wire::PreviousAttempt::Released)
                );
            }

            #[tokio::test]
            async fn abandon_releases_only_the_lock_its_attempt_holds() {
                let (_guard, s) = $open;
                let abandon = |attempt_id: &str| idempotency_wire::AbandonRequest {
                    id: record_id("ab"),
                    attempt_id: attempt_id.into(),
                };
                assert!(
                    !s.abandon(&abandon("a1"), 900).await.unwrap(),
                    "nothing to abandon yet"
                );
                lock_of(
                    s.acquire(&attempt("ab", 60_000, "a1"), 1_000)
                        .await
                        .unwrap(),
                );
                assert!(!s.abandon(&abandon("other"), 1_100).await.unwrap());
                assert!(matches!(
                    s.acquire(&attempt("ab", 60_000, "a2"), 1_150)
                        .await
                        .unwrap(),
                    AcquireResponse::InProgress { .. }
                ));
                assert!(s.abandon(&abandon("a1"), 1_200).await.unwrap());
                assert!(
                    !s.abandon(&abandon("a1"), 1_250).await.unwrap(),
                    "already released"
                );
                let next = lock_of(
                    s.acquire(&attempt("ab", 60_000, "a2"), 1_300)
                        .await
                        .unwrap(),
                );
                assert_eq!(
                    next.previous_attempt,
                    Some(idempotency_wire::PreviousAttempt::Released)
                );
                assert!(
                    !s.abandon(&abandon("a1"), 1_400).await.unwrap(),
                    "a2 holds it now"
                );
            }

            #[tokio::test]
            async fn an_acquire_that_arrives_after_its_deadline_is_refused_and_takes_nothing() {
                let (_guard, s) = $open;
                let mut late = attempt("dl", 60_000, "a1");
                late.deadline_ms = Some(1_000);
                assert!(matches!(
                    s.acquire(&late, 1_000).await,
                    Err(StorageError::DeadlinePassed { .. })
                ));
                assert!(s.get(&record_id("dl"), 1_000).await.unwrap().is_none());
                let mut in_time = attempt("dl", 60_000, "a2");
                in_time.deadline_ms = Some(2_000);
                lock_of(s.acquire(&in_time, 1_500).await.unwrap());
            }

            #[tokio::test]
            async fn a_purged_and_recreated_record_refuses_the_old_holders_writes() {
                let (_guard, s) = $open;
                let old = lock_of(
                    s.acquire(&attempt("pr", 60_000, "a1"), 1_000)
                        .await
                        .unwrap(),
                );
                assert!(s.purge(&record_id("pr")).await.unwrap());
                let new = lock_of(
                    s.acquire(&attempt("pr", 60_000, "a2"), 1_100)
                        .await
                        .unwrap(),
                );
                assert_eq!(
                    new.fencing_token, old.fencing_token,
                    "same number, other record"
                );
                assert_ne!(new.record_id, old.record_id);
                assert!(matches!(
                    s.complete(&complete_request("pr", &old), 1_200).await,
                    Err(StorageError::StaleToken { .. })
                ));
                assert!(matches!(
                    s.checkpoint(&checkpoint_request("pr", &old, "x"), 1_200)
                        .await,
                    Err(StorageError::StaleToken { .. })
                ));
                s.complete(&complete_request("pr", &new), 1_300)
                    .await
                    .unwrap();
            }

            #[tokio::test]
            async fn a_writer_that_knows_the_record_and_token_but_not_the_attempt_is_refused() {
                let (_guard, s) = $open;
                let first = lock_of(
                    s.acquire(&attempt("ga", 1_000, "secret-attempt-1"), 1_000)
                        .await
                        .unwrap(),
                );
                let second = lock_of(
                    s.acquire(&attempt("ga", 1_000, "secret-attempt-2"), 2_100)
                        .await
                        .unwrap(),
                );
                assert_eq!(second.attempt_id, "secret-attempt-2");
                // The first holder guesses the takeover's token: record id and token match.
                let mut guess = complete_request("ga", &first);
                guess.fencing_token = second.fencing_token;
                assert!(matches!(
                    s.complete(&guess, 2_200).await,
                    Err(StorageError::StaleToken { .. })
                ));
                let mut checkpoint = checkpoint_request("ga", &first, "x");
                checkpoint.fencing_token = second.fencing_token;
                assert!(matches!(
                    s.checkpoint(&checkpoint, 2_200).await,
                    Err(StorageError::StaleToken { .. })
                ));
                s.complete(&complete_request("ga", &second), 2_300)
                    .await
                    .unwrap();
            }

            #[tokio::test]
            async fn in_progress_records_are_listed_per_service_in_pages() {
                let (_guard, s) = $open;
                for i in 0..5 {
                    s.acquire(&acquire_request(&format!("list-{i}"), 60_000), 1_000)
                        .await
                        .unwrap();
                }
                let done = lock_of(
                    s.acquire(&acquire_request("list-done", 60_000), 1_000)
                        .await
                        .unwrap(),
                );
                s.complete(&complete_request("list-done", &done), 1_100)
                    .await
                    .unwrap();
                let mut other = acquire_request("list-other", 60_000);
                other.id.service = "payments".into();
                s.acquire(&other, 1_000).await.unwrap();
                s.acquire(&acquire_request("list-young", 60_000), 5_000)
                    .await
                    .unwrap();

                let mut seen = Vec::new();
                let mut cursor: Option<String> = None;
                for _ in 0..10 {
                    let (page, next) = s
                        .list_in_progress("orders", 2_000, 2, cursor.as_deref(), 6_000)
                        .await
                        .unwrap();
                    assert!(page.len() <= 2);
                    seen.extend(page.into_iter().map(|r| r.id.key));
                    cursor = next;
                    if cursor.is_none() {
                        break;
                    }
                }
                seen.sort();
                assert_eq!(
                    seen,
                    (0..5).map(|i| format!("list-{i}")).collect::<Vec<_>>(),
                    "in progress, old enough, this service, each once"
                );
            }

            #[tokio::test]
            async fn a_completion_without_retention_keeps_the_retention_the_acquire_asked_for() {
                let (_guard, s) = $open;
                let lock = lock_of(
                    s.acquire(&acquire_request("rt", 1_000), 1_000)
                        .await
                        .unwrap(),
                );
                let mut done = complete_request("rt", &lock);
                done.retention_ms = 0;
                s.complete(&done, 2_000).await.unwrap();
                let record = s.get(&record_id("rt"), 2_000).await.unwrap().unwrap();
                assert_eq!(record.expires_ms, 2_000 + 60_000);
            }

            #[tokio::test]
            async fn the_sweep_deletes_in_bounded_chunks_until_done() {
                let (_guard, s) = $open;
                for i in 0..25 {
                    let mut request = acquire_request(&format!("sw{i}"), 1_000);
                    request.retention_ms = 1_000;
                    s.acquire(&request, 1_000).await.unwrap();
                }
                assert_eq!(s.sweep_expired(10_000, 10).await.unwrap(), 10);
                assert_eq!($crate::sweep_all(&s, 10_000).await.unwrap(), 15);
                assert_eq!(s.record_count().await.unwrap(), 0);
            }
        }
    };
}
