//! `decide`: what each store answer to an acquire means, without a host.

use std::time::Duration;

use idempotency_wire::{AcquireResponse, Lock, StoredResponse};

use crate::flow::acquire::{decide, AcquireStep};
use crate::host::CalloutReply;
use crate::metrics::Counter;
use crate::mock::succeeded;
use crate::reply::problem::{ErrorCode, Problem};

fn reply(status: u16, answer: &AcquireResponse) -> CalloutReply {
    CalloutReply {
        status: Some(status),
        body: succeeded(serde_json::to_vec(answer)),
    }
}

fn lock() -> Lock {
    Lock {
        record_id: "r1".to_owned(),
        fencing_token: 7,
        attempt_id: "a1".to_owned(),
        resumed: false,
        recovery_point: None,
        previous_attempt: None,
    }
}

fn completed(body_omitted: bool, ticket: Option<&str>) -> AcquireResponse {
    AcquireResponse::Completed {
        response: StoredResponse {
            status: 200,
            headers: vec![("grpc-status".to_owned(), "5".to_owned())],
            body: b"stored".to_vec(),
            body_omitted,
            trailers: Vec::new(),
        },
        expires_at_ms: Some(90_000),
        replay_ticket: ticket.map(str::to_owned),
        record_id: Some("r1".to_owned()),
    }
}

/// The refusal a step is, and its counter (`None`, after a failed assertion, for another step).
fn refusal(step: AcquireStep) -> (Option<Counter>, Problem) {
    match step {
        AcquireStep::Refuse { counter, problem } => (Some(counter), problem),
        other => {
            assert!(
                matches!(other, AcquireStep::Refuse { .. }),
                "expected a refusal, got {other:?}"
            );
            (None, Problem::new(ErrorCode::StorageUnavailable, "not a refusal"))
        }
    }
}

#[test]
fn a_store_error_may_have_taken_the_lock_unless_the_status_says_nothing_was_taken() {
    for (status, landed) in [
        (503, true),
        (504, true),
        (500, true),
        (400, false),
        (401, false),
        (403, false),
        (408, false),
    ] {
        let step = decide(
            CalloutReply {
                status: Some(status),
                body: b"no".to_vec(),
            },
            false,
            true,
        );
        assert!(
            matches!(&step, AcquireStep::StoreFailed { reason, may_have_landed }
                if *may_have_landed == landed && reason.contains(&status.to_string())),
            "status {status}: {step:?}"
        );
    }
    // No status at all (the host gave none), and a 200 that is not an acquire answer.
    for bad in [
        CalloutReply {
            status: None,
            body: Vec::new(),
        },
        CalloutReply {
            status: Some(200),
            body: b"{\"outcome\":\"maybe\"}".to_vec(),
        },
    ] {
        assert!(matches!(
            decide(bad, false, true),
            AcquireStep::StoreFailed {
                may_have_landed: true,
                ..
            }
        ));
    }
}

#[test]
fn acquired_forwards_with_the_lock() {
    let step = decide(reply(200, &AcquireResponse::Acquired(lock())), false, true);
    assert!(
        matches!(&step, AcquireStep::Forward(held) if *held == lock()),
        "{step:?}"
    );
}

#[test]
fn completed_replays_http_and_routes_grpc_to_the_store() {
    let step = decide(reply(200, &completed(false, Some("t1"))), false, true);
    assert!(
        matches!(&step, AcquireStep::Replay { response, record_expires_at }
            if response.body == b"stored" && *record_expires_at == Duration::from_millis(90_000)),
        "{step:?}"
    );
    assert!(matches!(
        decide(reply(200, &completed(false, Some("t1"))), true, true),
        AcquireStep::RouteReplayToStore { ticket } if ticket == "t1"
    ));
}

#[test]
fn a_grpc_call_whose_messages_were_not_stored_is_refused_never_run_again() {
    let (counter, problem) = refusal(decide(reply(200, &completed(true, Some("t1"))), true, true));
    assert_eq!(counter, Some(Counter::Hit));
    assert_eq!(problem.code, ErrorCode::ResponseNotReplayable);
    assert_eq!(problem.details["completedStatus"], "NOT_FOUND");
}

#[test]
fn in_progress_waits_once_then_refuses_with_a_retry_after() {
    let running = AcquireResponse::InProgress {
        lock_remaining_ms: 250_000,
        outcome_unknown: false,
    };
    assert!(matches!(
        decide(reply(200, &running), false, true),
        AcquireStep::WaitForFirstAttempt
    ));
    let (counter, problem) = refusal(decide(reply(200, &running), false, false));
    assert_eq!(counter, Some(Counter::ConcurrentCollision));
    assert_eq!(problem.code, ErrorCode::ConcurrentRequest);
    assert_eq!(problem.retry_after, Some(crate::flow::CONFLICT_RETRY_AFTER_SECS));

    // A lock of unknown outcome holds to its end: no wait, Retry-After is what remains of it.
    let unknown = AcquireResponse::InProgress {
        lock_remaining_ms: 250_000,
        outcome_unknown: true,
    };
    let (_, problem) = refusal(decide(reply(200, &unknown), false, true));
    assert_eq!(problem.retry_after, Some(250));
    assert_eq!(problem.details["outcomeUnknown"], true);
}

#[test]
fn another_request_under_the_key_is_refused_422() {
    let (counter, problem) = refusal(decide(reply(200, &AcquireResponse::Mismatch), false, true));
    assert_eq!(counter, Some(Counter::ParameterMismatch));
    assert_eq!(problem.status(), 422);
}
