//! Unit tests of the per-request state machine against the mock host.
#![cfg(test)]

use std::rc::Rc;

use idempotency_wire::{AcquireResponse, Lock, StoredResponse};
use serde_json::Value;

use super::{RequestFlow, Verdict};
use crate::config::Config;
use crate::host::CalloutReply;
use crate::metrics::Counter;
use crate::mock::{present, Call, MockHost};
use crate::store::background::Background;

/// Shared set-up of the tests below: hosts, flows, store replies.
mod support;

/// `record_mode: async`: the response does not wait for its record.
mod record_mode;

/// `decide`: the acquire reply's meaning, pure.
mod acquire_decide;

/// `response_step`: the response headers' meaning, pure.
mod response_step;

/// The store refuses a holder write (too large, credentials), and where a gRPC replay came from.
mod store_refusals;

use support::*;

#[test]
fn get_requests_pass_untouched_without_store_calls() {
    let mut flow = flow("");
    let host = MockHost::with_request("GET", "/api/v1/orders", &[("idempotency-key", "k1")], b"");
    assert_eq!(flow.on_request_headers(&host, true), Verdict::Continue);
    assert!(host.dispatches().is_empty());
}

#[test]
fn acquired_request_is_forwarded_with_internal_headers() {
    let mut flow = flow("");
    let host = post("k1", br#"{"sku":"A"}"#);
    let token = start_keyed_post(&mut flow, &host);
    let (path, acquire, _) = host.dispatches().remove(0);
    assert_eq!(path, "/v1/acquire");
    assert_eq!(acquire["key"], "k1");
    assert_eq!(acquire["service"], "orders");
    assert_eq!(present(acquire["fingerprint"].as_str()).len(), 64);
    assert_eq!(acquire["lock_timeout_ms"], 300_000);

    flow.on_callout_reply(&host, token, reply(200, &acquired(7, Some("inventory_reserved"))));
    let calls = host.calls();
    assert!(calls.contains(&Call::SetRequestHeader(
        "x-idempotency-fencing-token".into(),
        Some("7".into())
    )));
    assert!(calls.contains(&Call::SetRequestHeader(
        "x-idempotency-recovery-point".into(),
        Some("inventory_reserved".into())
    )));
    assert_eq!(calls.last(), Some(&Call::ResumeRequest));
    assert_eq!(host.counted(Counter::Miss), 1);
}

#[test]
fn response_is_recorded_before_it_is_released() {
    let mut flow = flow("");
    let host = post("k1", b"{}");
    let token = start_keyed_post(&mut flow, &host);
    flow.on_callout_reply(&host, token, reply(200, &acquired(3, None)));

    host.set_response(
        201,
        &[("content-type", "application/json"), ("date", "x")],
        br#"{"orderId":"1"}"#,
    );
    assert_eq!(flow.on_response_headers(&host, false), Verdict::Pause);
    assert_eq!(flow.on_response_body(&host, 15, true), Verdict::Pause);
    let (path, complete, token) = last_dispatch(&host);
    assert_eq!(path, "/v1/complete");
    assert_eq!(complete["fencing_token"], 3);
    assert_eq!(complete["response"]["status"], 201);
    assert_eq!(
        complete["response"]["headers"],
        serde_json::json!([["content-type", "application/json"]])
    );
    assert!(
        !host.calls().contains(&Call::ResumeResponse),
        "held until the store acknowledges"
    );

    flow.on_callout_reply(
        &host,
        token,
        CalloutReply {
            status: Some(200),
            body: b"{}".to_vec(),
        },
    );
    assert_eq!(host.calls().last(), Some(&Call::ResumeResponse));
}

#[test]
fn server_errors_release_the_lock_instead_of_storing() {
    let mut flow = flow("");
    let host = post("k1", b"{}");
    let token = start_keyed_post(&mut flow, &host);
    flow.on_callout_reply(&host, token, reply(200, &acquired(3, None)));
    host.set_response(503, &[], b"down");
    host.set_property(&["response", "code_details"], b"via_upstream");
    assert_eq!(flow.on_response_headers(&host, false), Verdict::Pause);
    let (path, release, _) = last_dispatch(&host);
    assert_eq!(path, "/v1/release");
    assert_eq!(release["fencing_token"], 3);
    assert_eq!(release["record_id"], "rec-1");
}

#[test]
fn envoy_timeouts_and_resets_after_forwarding_keep_the_lock() {
    for (status, details, reason) in [
        (504, Some("response_timeout"), "upstream_timeout"),
        (
            503,
            Some("upstream_reset_before_response_started{remote_reset}"),
            "upstream_reset",
        ),
        (503, None, "local_reply"),
    ] {
        let (_flow, background, config, host, verdict) = answered(status, details);
        assert_eq!(verdict, Verdict::Continue, "the client gets Envoy's answer");
        background.drain(&host, &config);
        let (path, report, _) = last_dispatch(&host);
        assert_eq!(path, "/v1/outcome-unknown", "{details:?}");
        assert_eq!(report["reason"], reason);
        assert_eq!(host.counted(Counter::LockReleased), 0);
    }
}

#[test]
fn a_request_that_never_left_envoy_releases_its_lock() {
    let (_flow, _background, _config, host, verdict) = answered(
        503,
        Some("upstream_reset_before_response_started{remote_connection_failure}"),
    );
    assert_eq!(verdict, Verdict::Pause, "held until the release is acknowledged");
    assert_eq!(last_dispatch(&host).0, "/v1/release");
}

#[test]
fn a_release_after_several_router_attempts_keeps_the_lock() {
    // A router retry the filter could not stop (or an internal redirect): the 503 describes the
    // last try only; an earlier one may have run the request.
    let (mut flow, background, config) = flow_with_background("");
    let host = post("k1", b"{}");
    let token = start_keyed_post(&mut flow, &host);
    flow.on_callout_reply(&host, token, reply(200, &acquired(3, None)));
    host.set_response(503, &[], b"down");
    host.set_property(&["response", "code_details"], b"via_upstream");
    host.set_property(&["upstream", "request_attempt_count"], &2u64.to_le_bytes());
    assert_eq!(flow.on_response_headers(&host, false), Verdict::Continue);
    background.drain(&host, &config);
    let (path, report, _) = last_dispatch(&host);
    assert_eq!(path, "/v1/outcome-unknown");
    assert_eq!(report["reason"], "several_attempts");
    assert_eq!(host.counted(Counter::LockReleased), 0);
}

#[test]
fn a_gateways_504_or_502_from_upstream_keeps_the_lock() {
    for status in [502, 504] {
        let (_flow, background, config, host, verdict) = answered(status, Some("via_upstream"));
        assert_eq!(verdict, Verdict::Continue, "the client gets the gateway's answer");
        background.drain(&host, &config);
        let (path, report, _) = last_dispatch(&host);
        assert_eq!(path, "/v1/outcome-unknown", "{status}");
        assert_eq!(report["reason"], "upstream_status");
        assert_eq!(host.counted(Counter::LockReleased), 0);
    }
}

#[test]
fn a_failed_complete_delivers_the_response_and_is_retried_in_the_background() {
    let (mut flow, background, config) = flow_with_background("");
    let host = post("k1", b"{}");
    let token = start_keyed_post(&mut flow, &host);
    flow.on_callout_reply(&host, token, reply(200, &acquired(3, None)));
    host.set_response(201, &[], b"{}");
    host.set_property(&["response", "code_details"], b"via_upstream");
    assert_eq!(flow.on_response_headers(&host, false), Verdict::Pause);
    assert_eq!(flow.on_response_body(&host, 2, true), Verdict::Pause);
    let complete_token = host.last_token();
    flow.on_callout_reply(
        &host,
        complete_token,
        CalloutReply {
            status: Some(503),
            body: vec![],
        },
    );
    assert_eq!(host.calls().last(), Some(&Call::ResumeResponse));
    assert_eq!(background.queued(), 1);
    background.drain(&host, &config);
    let (path, _, retry_token) = last_dispatch(&host);
    assert_eq!(path, "/v1/complete");
    // Still failing: retried again after a backoff, not at once.
    background.on_reply(
        &host,
        &config,
        retry_token,
        CalloutReply {
            status: None,
            body: vec![],
        },
    );
    assert_eq!(background.queued(), 1);
    let before = host.dispatches().len();
    background.drain(&host, &config);
    assert_eq!(host.dispatches().len(), before, "waits for its backoff");
    *host.clock_advance.borrow_mut() = std::time::Duration::from_secs(1);
    background.drain(&host, &config);
    let (_, _, third) = last_dispatch(&host);
    // Fenced out (another attempt took over): final, no more tries.
    background.on_reply(
        &host,
        &config,
        third,
        CalloutReply {
            status: Some(409),
            body: vec![],
        },
    );
    assert_eq!(background.queued(), 0);
}

#[test]
fn a_complete_cut_off_by_the_stream_ending_is_sent_again_from_the_root_context() {
    let (mut flow, background, config) = flow_with_background("");
    let host = post("k1", b"{}");
    let token = start_keyed_post(&mut flow, &host);
    flow.on_callout_reply(&host, token, reply(200, &acquired(3, None)));
    host.set_response(201, &[], b"{}");
    host.set_property(&["response", "code_details"], b"via_upstream");
    flow.on_response_headers(&host, false);
    flow.on_response_body(&host, 2, true);
    flow.on_stream_done(&host);
    background.drain(&host, &config);
    assert_eq!(last_dispatch(&host).0, "/v1/complete");
}

#[test]
fn an_acquire_given_up_on_is_abandoned_with_its_attempt_id() {
    let (mut flow, background, config) = flow_with_background("");
    let host = post("k1", b"{}");
    let token = start_keyed_post(&mut flow, &host);
    let (_, acquire, _) = host.dispatches().remove(0);
    let attempt_id = present(acquire["attempt_id"].as_str()).to_owned();
    assert_eq!(attempt_id.len(), 32);
    let now_ms = 1_700_000_000_000u64;
    assert_eq!(acquire["deadline_ms"], now_ms + 1_000, "store_timeout after now");
    assert!(acquire["wait_ms"].is_null(), "the first acquire never waits");
    flow.on_callout_reply(
        &host,
        token,
        CalloutReply {
            status: None,
            body: vec![],
        },
    );
    assert_eq!(present(host.sent_response()).0, 503);
    background.drain(&host, &config);
    let (path, abandon, abandon_token) = last_dispatch(&host);
    assert_eq!(path, "/v1/abandon");
    assert_eq!(abandon["attempt_id"], attempt_id.as_str());
    // "Nothing held" right away is not believed: the acquire may still be landing.
    background.on_reply(
        &host,
        &config,
        abandon_token,
        CalloutReply {
            status: Some(200),
            body: br#"{"released":false}"#.to_vec(),
        },
    );
    assert_eq!(background.queued(), 1);
    *host.clock_advance.borrow_mut() = std::time::Duration::from_secs(1);
    background.drain(&host, &config);
    let (_, _, again) = last_dispatch(&host);
    background.on_reply(
        &host,
        &config,
        again,
        CalloutReply {
            status: Some(200),
            body: br#"{"released":true}"#.to_vec(),
        },
    );
    assert_eq!(background.queued(), 0);
    assert_eq!(host.counted(Counter::AbandonReleased), 1);
}

#[test]
fn a_stream_that_ends_during_its_acquire_abandons_it() {
    let (mut flow, background, config) = flow_with_background("");
    let host = post("k1", b"{}");
    start_keyed_post(&mut flow, &host);
    flow.on_stream_done(&host);
    background.drain(&host, &config);
    assert_eq!(last_dispatch(&host).0, "/v1/abandon");
}

#[test]
fn a_waiting_acquire_abandoned_by_its_stream_is_watched_until_it_can_no_longer_land() {
    // The second acquire waits up to 10 s in the store; the client leaves at once. The store may
    // still grant it until its deadline (now + 1 s + 10 s): "nothing held" is not believed
    // before that deadline has passed by the settle time.
    let (mut flow, background, config) = flow_with_background(r#","in_progress_wait":"10s""#);
    let host = post("k1", b"{}");
    let token = start_keyed_post(&mut flow, &host);
    let busy = AcquireResponse::InProgress {
        lock_remaining_ms: 299_000,
        outcome_unknown: false,
    };
    flow.on_callout_reply(&host, token, reply(200, &busy));
    flow.on_stream_done(&host);
    let nothing_held = CalloutReply {
        status: Some(200),
        body: br#"{"released":false}"#.to_vec(),
    };
    for (at_secs, still_watched) in [(7, true), (12, true), (17, false)] {
        *host.clock_advance.borrow_mut() = std::time::Duration::from_secs(at_secs);
        background.drain(&host, &config);
        let (path, _, abandon) = last_dispatch(&host);
        assert_eq!(path, "/v1/abandon");
        background.on_reply(&host, &config, abandon, nothing_held.clone());
        assert_eq!(background.queued() == 1, still_watched, "at +{at_secs} s");
    }
}

#[test]
fn a_key_in_progress_is_asked_again_waiting_in_the_store_with_a_longer_callout_timeout() {
    let mut flow = flow(r#","in_progress_wait":"2s""#);
    let host = post("k1", b"{}");
    let token = start_keyed_post(&mut flow, &host);
    let (_, first, _) = host.dispatches().remove(0);
    assert!(first["wait_ms"].is_null(), "the first acquire may share a batch");
    assert_eq!(
        *host.last_timeout.borrow(),
        Some(std::time::Duration::from_secs(1))
    );
    let busy = AcquireResponse::InProgress {
        lock_remaining_ms: 299_000,
        outcome_unknown: false,
    };
    flow.on_callout_reply(&host, token, reply(200, &busy));
    assert!(host.sent_response().is_none(), "no 409 yet");
    let (path, second, second_token) = last_dispatch(&host);
    assert_eq!(path, "/v1/acquire");
    assert_eq!(second["wait_ms"], 2_000);
    assert_eq!(second["attempt_id"], first["attempt_id"]);
    assert_eq!(
        *host.last_timeout.borrow(),
        Some(std::time::Duration::from_secs(3))
    );
    // Still in progress after the wait: now the 409.
    flow.on_callout_reply(&host, second_token, reply(200, &busy));
    assert_eq!(present(host.sent_response()).0, 409);
    assert_eq!(host.counted(Counter::ConcurrentCollision), 1);
}

#[test]
fn a_lock_of_unknown_outcome_is_not_waited_for() {
    let mut flow = flow(r#","in_progress_wait":"2s""#);
    let host = post("k1", b"{}");
    let token = start_keyed_post(&mut flow, &host);
    let kept = AcquireResponse::InProgress {
        lock_remaining_ms: 299_000,
        outcome_unknown: true,
    };
    flow.on_callout_reply(&host, token, reply(200, &kept));
    assert_eq!(present(host.sent_response()).0, 409);
    assert_eq!(host.dispatches().len(), 1, "no second acquire");
}

#[test]
fn retry_after_an_attempt_of_unknown_outcome_is_the_rest_of_its_lock() {
    let mut flow = flow("");
    let host = post("k1", b"{}");
    let token = start_keyed_post(&mut flow, &host);
    let answer = AcquireResponse::InProgress {
        lock_remaining_ms: 41_500,
        outcome_unknown: true,
    };
    flow.on_callout_reply(&host, token, reply(200, &answer));
    let (status, headers, _) = present(host.sent_response());
    assert_eq!(status, 409);
    assert!(
        headers.contains(&("retry-after".into(), "42".into())),
        "{headers:?}"
    );
    assert_eq!(body_json(&host)["details"]["outcomeUnknown"], true);
}

#[test]
fn a_takeover_tells_the_upstream_what_is_known_of_the_previous_attempt() {
    let mut flow = flow("");
    let host = post("k1", b"{}");
    let token = start_keyed_post(&mut flow, &host);
    let mut lock = match acquired(4, None) {
        AcquireResponse::Acquired(lock) => lock,
        _ => unreachable!(),
    };
    lock.resumed = true;
    lock.previous_attempt = Some(idempotency_wire::PreviousAttempt::Unknown);
    flow.on_callout_reply(&host, token, reply(200, &AcquireResponse::Acquired(lock)));
    assert!(host.calls().contains(&Call::SetRequestHeader(
        "x-idempotency-previous-attempt".into(),
        Some("unknown".into())
    )));
}

#[test]
fn oversize_response_is_recorded_without_body() {
    let (mut flow, background, config) = flow_with_background(r#","max_response_size":4"#);
    let host = post("k1", b"{}");
    let token = start_keyed_post(&mut flow, &host);
    flow.on_callout_reply(&host, token, reply(200, &acquired(1, None)));
    host.set_response(200, &[], b"0123456789");
    assert_eq!(flow.on_response_headers(&host, false), Verdict::Pause);
    assert_eq!(
        flow.on_response_body(&host, 10, false),
        Verdict::Continue,
        "over the limit it streams through, never into Envoy's buffer"
    );
    assert_eq!(flow.on_response_body(&host, 5, false), Verdict::Continue);
    assert!(
        host.dispatches().iter().all(|(p, _, _)| p != "/v1/complete"),
        "not before the end"
    );
    assert_eq!(
        flow.on_response_body(&host, 5, true),
        Verdict::Pause,
        "the last chunk waits for the record"
    );
    assert_eq!(background.queued(), 0);
    let _ = config;
    let (path, complete, token) = last_dispatch(&host);
    flow.on_callout_reply(
        &host,
        token,
        CalloutReply {
            status: Some(200),
            body: b"{}".to_vec(),
        },
    );
    assert_eq!(host.calls().last(), Some(&Call::ResumeResponse));
    assert_eq!(path, "/v1/complete");
    assert_eq!(complete["response"]["body_omitted"], true);
    assert_eq!(complete["response"]["body"], "");
    assert_eq!(host.counted(Counter::ResponseStreamed), 1);
}

#[test]
fn completed_record_is_replayed_with_marker_and_no_upstream() {
    let mut flow = flow("");
    let host = post("k1", b"{}");
    let token = start_keyed_post(&mut flow, &host);
    let stored = AcquireResponse::Completed {
        response: StoredResponse {
            status: 201,
            headers: vec![("content-type".into(), "application/json".into())],
            body: br#"{"orderId":"1"}"#.to_vec(),
            body_omitted: false,
            trailers: Vec::new(),
        },
        expires_at_ms: None,
        replay_ticket: None,
        record_id: None,
    };
    flow.on_callout_reply(&host, token, reply(200, &stored));
    let (status, headers, body) = present(host.sent_response());
    assert_eq!(status, 201);
    assert_eq!(body, r#"{"orderId":"1"}"#);
    assert!(headers.contains(&("idempotent-replayed".into(), "true".into())));
    assert!(!host.calls().contains(&Call::ResumeRequest));
    assert_eq!(host.counted(Counter::Hit), 1);
}

#[test]
fn in_progress_gives_409_with_retry_after() {
    let mut flow = flow(r#","in_progress_wait":"0s""#);
    let host = post("k1", b"{}");
    let token = start_keyed_post(&mut flow, &host);
    flow.on_callout_reply(
        &host,
        token,
        reply(
            200,
            &AcquireResponse::InProgress {
                lock_remaining_ms: 299_000,
                outcome_unknown: false,
            },
        ),
    );
    let (status, headers, _) = present(host.sent_response());
    assert_eq!(status, 409);
    assert!(headers.contains(&("retry-after".into(), "2".into())));
    assert_eq!(body_json(&host)["details"]["retryAfter"], 2);
    assert_eq!(body_json(&host)["code"], "IDEMPOTENCY_CONCURRENT_REQUEST");
}

#[test]
fn mismatch_gives_422() {
    let mut flow = flow("");
    let host = post("k1", b"{}");
    let token = start_keyed_post(&mut flow, &host);
    flow.on_callout_reply(&host, token, reply(200, &AcquireResponse::Mismatch));
    assert_eq!(present(host.sent_response()).0, 422);
    assert_eq!(body_json(&host)["code"], "IDEMPOTENCY_PARAMETER_MISMATCH");
}

#[test]
fn malformed_or_failed_store_replies_fail_closed_with_503() {
    for bad in [
        CalloutReply {
            status: Some(200),
            body: b"{\"outcome\":\"maybe\"}".to_vec(),
        },
        CalloutReply {
            status: Some(200),
            body: b"not json".to_vec(),
        },
        CalloutReply {
            status: Some(504),
            body: b"upstream request timeout".to_vec(),
        },
        CalloutReply {
            status: None,
            body: Vec::new(),
        },
    ] {
        let mut flow = flow("");
        let host = post("k1", b"{}");
        let token = start_keyed_post(&mut flow, &host);
        flow.on_callout_reply(&host, token, bad);
        let (status, headers, _) = present(host.sent_response());
        assert_eq!(status, 503);
        assert!(headers.contains(&("retry-after".into(), "5".into())));
        assert!(
            !host.calls().contains(&Call::ResumeRequest),
            "never forwarded unlocked"
        );
        assert_eq!(host.counted(Counter::StorageError), 1);
    }
}

#[test]
fn store_failure_passes_through_untracked_when_failure_mode_is_open() {
    let mut flow = flow(r#","failure_mode":"open""#);
    let host = post("k1", b"{}");
    let token = start_keyed_post(&mut flow, &host);
    flow.on_callout_reply(
        &host,
        token,
        CalloutReply {
            status: Some(503),
            body: Vec::new(),
        },
    );
    assert_eq!(host.calls().last(), Some(&Call::ResumeRequest));
    assert!(host.sent_response().is_none());
    assert_eq!(host.counted(Counter::FailOpen), 1);
    // Untracked: the response is not recorded.
    host.set_response(201, &[], b"{}");
    assert_eq!(flow.on_response_headers(&host, true), Verdict::Continue);
}

#[test]
fn dispatch_failure_fails_closed() {
    let mut flow = flow("");
    let host = post("k1", b"{}");
    *host.fail_dispatch.borrow_mut() = true;
    assert_eq!(flow.on_request_headers(&host, true), Verdict::Pause);
    assert_eq!(present(host.sent_response()).0, 503);
}

#[test]
fn missing_key_is_400_only_when_required() {
    let mut optional = flow("");
    let host = MockHost::with_request("POST", "/api/v1/orders", &[], b"");
    assert_eq!(optional.on_request_headers(&host, true), Verdict::Continue);

    let mut required = flow(r#","require_key":true"#);
    let host = MockHost::with_request("POST", "/api/v1/orders", &[], b"");
    assert_eq!(required.on_request_headers(&host, true), Verdict::Pause);
    assert_eq!(present(host.sent_response()).0, 400);
    assert_eq!(body_json(&host)["code"], "IDEMPOTENCY_KEY_REQUIRED");
}

#[test]
fn invalid_key_is_400_with_the_reason() {
    let mut flow = flow("");
    let host = post("bad key!", b"");
    assert_eq!(flow.on_request_headers(&host, true), Verdict::Pause);
    let body = body_json(&host);
    assert_eq!(body["code"], "IDEMPOTENCY_KEY_INVALID");
    assert_eq!(body["details"]["reason"], "invalid_character");
    assert!(present(body["message"].as_str()).contains("position 4"));
}

#[test]
fn repeated_key_header_is_invalid() {
    let mut flow = flow("");
    let host = MockHost::with_request(
        "POST",
        "/x",
        &[("idempotency-key", "a"), ("idempotency-key", "b")],
        b"",
    );
    flow.on_request_headers(&host, true);
    assert_eq!(body_json(&host)["details"]["reason"], "repeated_header");
}

#[test]
fn forged_internal_headers_are_stripped_on_every_request() {
    let mut flow = flow("");
    let host = MockHost::with_request("GET", "/x", &[("x-idempotency-fencing-token", "999")], b"");
    flow.on_request_headers(&host, true);
    assert!(host.calls().contains(&Call::SetRequestHeader(
        "x-idempotency-fencing-token".into(),
        None
    )));
}

#[test]
fn body_over_the_limit_is_413_before_any_store_call() {
    let mut flow = flow(r#","max_request_body":8"#);
    let host = post("k1", b"0123456789");
    assert_eq!(flow.on_request_headers(&host, false), Verdict::Pause);
    assert_eq!(flow.on_request_body(&host, 10, false), Verdict::Pause);
    assert_eq!(present(host.sent_response()).0, 413);
    assert!(host.dispatches().is_empty());

    let mut flow2 = make_flow(r#","max_request_body":8"#);
    let host = MockHost::with_request(
        "POST",
        "/x",
        &[("idempotency-key", "k"), ("content-length", "100")],
        b"",
    );
    assert_eq!(flow2.on_request_headers(&host, false), Verdict::Pause);
    assert_eq!(present(host.sent_response()).0, 413);
}

#[test]
fn client_gone_after_forwarding_keeps_the_lock_as_outcome_unknown() {
    let (mut flow, background, config) = flow_with_background("");
    let host = post("k1", b"{}");
    let token = start_keyed_post(&mut flow, &host);
    flow.on_callout_reply(&host, token, reply(200, &acquired(5, None)));
    let dispatched_before = host.dispatches().len();
    flow.on_stream_done(&host);
    assert_eq!(
        host.dispatches().len(),
        dispatched_before,
        "not from the dying stream"
    );
    assert_eq!(background.queued(), 1);
    background.drain(&host, &config);
    let (path, report, _) = last_dispatch(&host);
    assert_eq!(
        path, "/v1/outcome-unknown",
        "never a release: the upstream may be running"
    );
    assert_eq!(report["fencing_token"], 5);
    assert_eq!(report["record_id"], "rec-1");
    assert_eq!(report["reason"], "downstream_disconnect");
    assert_eq!(host.counted(Counter::OutcomeUnknown), 1);
    assert_eq!(host.counted(Counter::LockReleased), 0);
}

#[test]
fn replies_to_unknown_tokens_are_ignored() {
    let mut flow = flow("");
    let host = post("k1", b"{}");
    let token = start_keyed_post(&mut flow, &host);
    flow.on_callout_reply(&host, token + 100, reply(200, &acquired(5, None)));
    assert!(host.sent_response().is_none());
    assert!(!host.calls().contains(&Call::ResumeRequest));
    // The real reply still works afterwards.
    flow.on_callout_reply(&host, token, reply(200, &acquired(5, None)));
    assert_eq!(host.calls().last(), Some(&Call::ResumeRequest));
}

#[test]
fn shadow_mode_never_blocks() {
    let mut flow = flow(r#","mode":"shadow""#);
    let host = post("not valid!", b"{}");
    assert_eq!(flow.on_request_headers(&host, false), Verdict::Continue);
    assert!(host.sent_response().is_none());
    assert_eq!(host.counted(Counter::KeyInvalid), 1);
}

#[test]
fn reordered_json_bodies_have_the_same_fingerprint_and_excluded_fields_do_not_count() {
    let fingerprint_of = |body: &str| {
        let mut flow = flow(r#","exclude_fields":["/clientTimestamp"]"#);
        let host = json_post("k1", body, &[]);
        start_keyed_post(&mut flow, &host);
        acquire_body_of(&host)["fingerprint"].clone()
    };
    let a = fingerprint_of(r#"{"sku":"A","qty":2,"clientTimestamp":"10:00"}"#);
    let b = fingerprint_of("{ \"qty\": 2,\n \"sku\": \"A\", \"clientTimestamp\": \"10:07\" }");
    let c = fingerprint_of(r#"{"sku":"A","qty":3}"#);
    assert_eq!(a, b);
    assert_ne!(a, c);
}

#[test]
fn scope_comes_from_the_configured_header() {
    let mut flow = flow(r#","scope_from":["header:x-tenant-id"]"#);
    let host = json_post("k1", "{}", &[("x-tenant-id", "acme")]);
    start_keyed_post(&mut flow, &host);
    assert_eq!(acquire_body_of(&host)["scope"], "header:acme");
}

/// Scope and fingerprint headers whose values are not UTF-8 are read as bytes: the host's text
/// shows U+FFFD for any bad byte, and two callers (or two requests) that differ only there must
/// not share a record (or a fingerprint). Values that are UTF-8 cost no extra host call.
#[test]
fn scope_and_fingerprint_headers_that_are_not_utf8_are_told_apart_by_their_bytes() {
    let config = r#","scope_from":["header:x-tenant-id"],"fingerprint_headers":["x-currency"]"#;
    let acquire_with = |tenant: &[u8], currency: &[u8]| {
        let mut flow = flow(config);
        let host = json_post("k1", "{}", &[]);
        host.add_request_header_bytes("x-tenant-id", tenant);
        host.add_request_header_bytes("x-currency", currency);
        start_keyed_post(&mut flow, &host);
        let bytes_read = host
            .host_calls
            .borrow()
            .get("request_header_bytes")
            .copied()
            .unwrap_or_default();
        (acquire_body_of(&host), bytes_read)
    };
    let (a, a_reads) = acquire_with(b"t\xff", b"\xe9");
    let (b, _) = acquire_with(b"t\xfe", b"\xe8");
    assert_ne!(a["scope"], b["scope"], "two tenants");
    assert!(present(a["scope"].as_str()).starts_with("header:sha256:"));
    assert_ne!(a["fingerprint"], b["fingerprint"], "two currencies");
    assert_eq!(a_reads, 2, "both headers read as bytes");

    let (c, c_reads) = acquire_with(b"t\xff", b"\xe8");
    assert_eq!(c["scope"], a["scope"], "the same bytes, the same tenant");
    assert_eq!(
        c["fingerprint"], b["fingerprint"],
        "the same bytes, the same fingerprint"
    );
    assert_eq!(c_reads, 2);

    let (text, text_reads) = acquire_with("t\u{e9}".as_bytes(), "\u{fffd}".as_bytes());
    assert_eq!(text["scope"], "header:t\u{e9}", "UTF-8 stays in clear");
    assert_eq!(text_reads, 1, "only the value showing U+FFFD is read again");
    let (plain, plain_reads) = acquire_with(b"acme", b"EUR");
    assert_eq!(plain["scope"], "header:acme");
    assert_eq!(plain_reads, 0, "UTF-8 values cost no extra host call");

    // Two field lines of such bytes: both count.
    let mut flow = flow(config);
    let host = json_post("k1", "{}", &[]);
    host.add_request_header_bytes("x-tenant-id", b"t\xff");
    host.add_request_header_bytes("x-currency", b"\xe8");
    host.add_request_header_bytes("x-currency", b"\xe9");
    start_keyed_post(&mut flow, &host);
    let two_lines = acquire_body_of(&host);
    assert_eq!(two_lines["scope"], a["scope"]);
    assert_ne!(
        two_lines["fingerprint"], b["fingerprint"],
        "the second line counts"
    );
    assert_ne!(two_lines["fingerprint"], a["fingerprint"]);
}

#[test]
fn route_rules_choose_the_mode() {
    let config = r#","mode":"optional","routes":[{"path_prefix":"/api/v1/orders","mode":"required"},{"path_prefix":"/legacy","mode":"off"}]"#;
    let mut required = flow(config);
    let host = MockHost::with_request("POST", "/api/v1/orders", &[], b"");
    assert_eq!(required.on_request_headers(&host, true), Verdict::Pause);
    assert_eq!(present(host.sent_response()).0, 400);

    let mut off = flow(config);
    let host = post("k1", b"{}");
    *host.request_headers.borrow_mut() = vec![
        (":method".into(), "POST".into()),
        (":path".into(), "/legacy/x".into()),
        ("idempotency-key".into(), "k1".into()),
    ];
    assert_eq!(off.on_request_headers(&host, false), Verdict::Continue);
    assert!(host.dispatches().is_empty());
}

#[test]
fn route_metadata_overrides_the_plugin_mode() {
    let mut flow = flow(r#","mode":"optional""#);
    let host = MockHost::with_request("POST", "/api/v1/orders", &[], b"");
    set_route_metadata(&host, &[(b"mode", b"off")]);
    *host.request_headers.borrow_mut() = vec![
        (":method".into(), "POST".into()),
        (":path".into(), "/api/v1/orders".into()),
        ("idempotency-key".into(), "k1".into()),
    ];
    assert_eq!(flow.on_request_headers(&host, true), Verdict::Continue);
    assert!(
        host.dispatches().is_empty(),
        "route metadata turned the filter off"
    );
}

#[test]
fn keys_outside_the_enforced_percentage_run_in_shadow() {
    let rule = r#","routes":[{"path_prefix":"/","mode":"required","percentage":50}]"#;
    let keys: Vec<String> = (0..40).map(|i| format!("key-{i}")).collect();
    let mut paused = 0;
    for key in &keys {
        let (mut flow, background, _) = flow_with_background(rule);
        let host = json_post(key, "{}", &[]);
        if flow.on_request_headers(&host, true) == Verdict::Pause {
            paused += 1;
            assert_eq!(host.dispatches().len(), 1, "enforced keys acquire directly");
        } else {
            assert_eq!(
                background.queued(),
                1,
                "shadow keys consult the store on the side"
            );
        }
    }
    assert!((8..32).contains(&paused), "{paused} of 40 enforced at 50%");
}

#[test]
fn shadow_never_blocks_and_records_the_response_on_the_side() {
    let (mut flow, background, config) = flow_with_background(r#","mode":"shadow""#);
    let host = json_post("k1", r#"{"a":1}"#, &[]);
    assert_eq!(
        flow.on_request_headers(&host, false),
        Verdict::Pause,
        "body is buffered to fingerprint it"
    );
    assert_eq!(
        flow.on_request_body(&host, 7, true),
        Verdict::Continue,
        "but the store is not awaited"
    );
    assert!(
        host.dispatches().is_empty(),
        "the stream makes no store call itself"
    );
    background.drain(&host, &config);
    let acquire_token = host.last_token();

    // The response streams past (and the stream ends) before the store answered.
    host.set_response(201, &[("content-type", "application/json")], b"{\"id\":1}");
    assert_eq!(flow.on_response_headers(&host, false), Verdict::Continue);
    assert_eq!(flow.on_response_body(&host, 8, true), Verdict::Continue);
    flow.on_stream_done(&host);
    assert_eq!(background.queued(), 0, "no record before the lock is known");

    background.on_reply(&host, &config, acquire_token, reply(200, &acquired(1, None)));
    let (path, complete, _) = last_dispatch(&host);
    assert_eq!(path, "/v1/complete");
    assert_eq!(complete["response"]["status"], 201);
    assert_eq!(complete["response"]["body"], "eyJpZCI6MX0=");
    assert_eq!(host.counted(Counter::ShadowExecuted), 1);
    assert!(host.sent_response().is_none());
    assert!(!host.calls().contains(&Call::ResumeRequest) && !host.calls().contains(&Call::ResumeResponse));
}

#[test]
fn shadow_counts_what_enforcement_would_have_done() {
    for (answer, counter) in [
        (
            AcquireResponse::InProgress {
                lock_remaining_ms: 1000,
                outcome_unknown: false,
            },
            Counter::ShadowWouldConflict,
        ),
        (AcquireResponse::Mismatch, Counter::ShadowWouldMismatch),
        (
            AcquireResponse::Completed {
                response: StoredResponse {
                    status: 201,
                    headers: vec![],
                    body: vec![],
                    body_omitted: false,
                    trailers: Vec::new(),
                },
                expires_at_ms: None,
                replay_ticket: None,
                record_id: None,
            },
            Counter::ShadowWouldReplay,
        ),
    ] {
        let (mut flow, background, config) = flow_with_background(r#","mode":"shadow""#);
        let host = json_post("k1", "{}", &[]);
        assert_eq!(flow.on_request_headers(&host, true), Verdict::Continue);
        background.drain(&host, &config);
        background.on_reply(&host, &config, host.last_token(), reply(200, &answer));
        assert_eq!(host.counted(counter), 1, "{counter:?}");
        assert!(host.sent_response().is_none());
        assert_eq!(background.queued(), 0, "nothing to record");
    }
}

#[test]
fn shadow_store_failure_changes_nothing() {
    let (mut flow, background, config) = flow_with_background(r#","mode":"shadow""#);
    let host = json_post("k1", "{}", &[]);
    assert_eq!(flow.on_request_headers(&host, true), Verdict::Continue);
    background.drain(&host, &config);
    background.on_reply(
        &host,
        &config,
        host.last_token(),
        CalloutReply {
            status: Some(503),
            body: vec![],
        },
    );
    assert!(host.sent_response().is_none());
    assert_eq!(host.counted(Counter::StorageError), 1);
}

#[test]
fn completed_records_are_replayed_from_the_proxy_cache_without_a_callout() {
    let config = config("");
    let (background, cache) = (Rc::new(Background::default()), small_cache());
    // First request executes and is recorded: the acknowledged record enters the cache.
    let mut first = RequestFlow::new(config.clone(), background.clone(), cache.clone());
    let host = post("k1", b"{}");
    execute_and_record(&mut first, &host);
    assert_eq!(cache.borrow().len(), 1);

    // The retry is answered from the cache: no callout at all.
    let mut retry = RequestFlow::new(config.clone(), background.clone(), cache.clone());
    let host = post("k1", b"{}");
    assert_eq!(retry.on_request_headers(&host, false), Verdict::Pause);
    assert_eq!(retry.on_request_body(&host, 2, true), Verdict::Pause);
    assert!(host.dispatches().is_empty(), "no store call");
    let (status, headers, body) = present(host.sent_response());
    assert_eq!((status, body.as_str()), (201, "{\"id\":7}"));
    assert!(headers.contains(&("idempotent-replayed".into(), "true".into())));
    assert_eq!(host.counted(Counter::ReplayCacheHit), 1);

    // Other parameters with the same key: 422 from the cache, still no callout.
    let mut other = RequestFlow::new(config, background, cache);
    let host = post("k1", b"{\"different\":true}");
    other.on_request_headers(&host, false);
    other.on_request_body(&host, 18, true);
    assert!(host.dispatches().is_empty());
    assert_eq!(present(host.sent_response()).0, 422);
}

#[test]
fn cached_records_match_identical_bytes_directly_and_other_bytes_by_fingerprint() {
    let config = config("");
    let (background, cache) = (Rc::new(Background::default()), small_cache());
    let json_post = |body: &[u8]| {
        MockHost::with_request(
            "POST",
            "/api/v1/orders",
            &[("idempotency-key", "k1"), ("content-type", "application/json")],
            body,
        )
    };
    let body: &[u8] = br#"{"sku":"A","qty":2}"#;
    let mut first = RequestFlow::new(config.clone(), background.clone(), cache.clone());
    execute_and_record(&mut first, &json_post(body));
    let cached = cache
        .borrow_mut()
        .get("", "k1", std::time::Duration::from_secs(1_700_000_000));
    assert!(cached.is_some(), "the completed record is cached");
    let Some(cached) = cached else { return };
    assert!(
        cached.request.exact.is_some(),
        "a small request keeps its bytes for the cache"
    );

    // The same JSON in other bytes (keys reordered, spaces): replayed through the fingerprint.
    let reordered: &[u8] = br#"{ "qty": 2, "sku": "A" }"#;
    let mut retry = RequestFlow::new(config.clone(), background.clone(), cache.clone());
    let host = json_post(reordered);
    retry.on_request_headers(&host, false);
    retry.on_request_body(&host, reordered.len(), true);
    assert!(host.dispatches().is_empty(), "no store call");
    assert_eq!(present(host.sent_response()).0, 201);
    assert_eq!(host.counted(Counter::ReplayCacheHit), 1);

    // A byte changed: not the same request, whatever the cache kept.
    let other: &[u8] = br#"{"sku":"A","qty":3}"#;
    let mut different = RequestFlow::new(config, background, cache);
    let host = json_post(other);
    different.on_request_headers(&host, false);
    different.on_request_body(&host, other.len(), true);
    assert_eq!(present(host.sent_response()).0, 422);
}

#[test]
fn a_failed_record_is_not_cached() {
    let config = config("");
    let cache = Rc::new(std::cell::RefCell::new(crate::reply::cache::ReplayCache::new(
        100,
        1 << 20,
    )));
    let mut flow = RequestFlow::new(config, Rc::new(Background::default()), cache.clone());
    let host = post("k1", b"{}");
    let token = start_keyed_post(&mut flow, &host);
    flow.on_callout_reply(&host, token, reply(200, &acquired(1, None)));
    host.set_response(201, &[], b"{}");
    flow.on_response_headers(&host, true);
    let (_, _, complete_token) = last_dispatch(&host);
    flow.on_callout_reply(
        &host,
        complete_token,
        CalloutReply {
            status: Some(409),
            body: vec![],
        },
    );
    assert!(
        cache.borrow().is_empty(),
        "only records the store acknowledged are cached"
    );
}

#[test]
fn route_metadata_can_turn_on_a_route_when_the_plugin_default_is_off() {
    let mut flow = flow(r#","mode":"off""#);
    let host = MockHost::with_request("POST", "/api/v1/payments", &[], b"");
    set_route_metadata(&host, &[(b"mode", b"required")]);
    assert_eq!(flow.on_request_headers(&host, true), Verdict::Pause);
    assert_eq!(present(host.sent_response()).0, 400);

    let mut off = super::RequestFlow::new(
        config(r#","mode":"off""#),
        Rc::new(Background::default()),
        no_cache(),
    );
    let host = MockHost::with_request("POST", "/api/v1/orders", &[("idempotency-key", "k1")], b"");
    assert_eq!(
        off.on_request_headers(&host, true),
        Verdict::Continue,
        "off without metadata does nothing"
    );
    assert!(host.dispatches().is_empty());
}

#[test]
fn a_cached_replay_never_outlives_its_record() {
    let cache = Rc::new(std::cell::RefCell::new(crate::reply::cache::ReplayCache::new(
        100,
        1 << 20,
    )));
    let config = config(r#","replay_cache_max_entries":100,"replay_cache_ttl":"10m""#);
    let host = post("k1", b"{}");
    let mut first = RequestFlow::new(config.clone(), Rc::new(Background::default()), cache.clone());
    let token = start_keyed_post(&mut first, &host);
    let now_ms = 1_700_000_000_000u64;
    let stored = AcquireResponse::Completed {
        response: StoredResponse {
            status: 201,
            headers: vec![],
            body: b"{}".to_vec(),
            body_omitted: false,
            trailers: Vec::new(),
        },
        expires_at_ms: Some(now_ms + 30_000),
        replay_ticket: None,
        record_id: None,
    };
    first.on_callout_reply(&host, token, reply(200, &stored));

    // Within the record's life the cache answers (no callout).
    let host2 = post("k1", b"{}");
    let mut second = RequestFlow::new(config.clone(), Rc::new(Background::default()), cache.clone());
    assert_eq!(second.on_request_headers(&host2, false), Verdict::Pause);
    assert_eq!(second.on_request_body(&host2, 2, true), Verdict::Pause);
    assert!(host2.dispatches().is_empty(), "answered from the cache");

    // After the record expired (well within the 10 min TTL) the store is asked again.
    let host3 = post("k1", b"{}");
    *host3.clock_advance.borrow_mut() = std::time::Duration::from_secs(31);
    let mut third = RequestFlow::new(config, Rc::new(Background::default()), cache);
    third.on_request_headers(&host3, false);
    third.on_request_body(&host3, 2, true);
    assert_eq!(
        host3.dispatches().len(),
        1,
        "the expired record is not replayed from memory"
    );
}

#[test]
fn a_grpc_success_is_recorded_with_its_messages_and_trailers_before_the_trailers_pass() {
    let (mut flow, _background, _config, host) = forwarded_grpc_call();
    host.set_response(
        200,
        &[("content-type", "application/grpc")],
        b"\0\0\0\0\x03\x0a\x01x",
    );
    assert_eq!(flow.on_response_headers(&host, false), Verdict::Pause);
    assert_eq!(flow.on_response_body(&host, 8, false), Verdict::Pause);
    *host.response_trailers.borrow_mut() =
        vec![("grpc-status".into(), "0".into()), ("x-meta".into(), "m".into())];
    assert_eq!(
        flow.on_response_trailers(&host),
        Verdict::Pause,
        "trailers wait for the record"
    );
    let (path, complete, token) = last_dispatch(&host);
    assert_eq!(path, "/v1/complete");
    assert_eq!(
        complete["response"]["trailers"],
        serde_json::json!([["grpc-status", "0"], ["x-meta", "m"]])
    );
    assert_eq!(complete["response"]["body"], "AAAAAAMKAXg=");
    flow.on_callout_reply(
        &host,
        token,
        CalloutReply {
            status: Some(200),
            body: b"{}".to_vec(),
        },
    );
    assert_eq!(host.calls().last(), Some(&Call::ResumeResponse));
    assert_eq!(host.counted(Counter::GrpcStatus(0)), 1);
}

#[test]
fn grpc_unavailable_releases_whatever_the_framing() {
    // Trailers-only (status in the headers).
    let (mut flow, _b, _c, host) = forwarded_grpc_call();
    host.set_response(
        200,
        &[("content-type", "application/grpc"), ("grpc-status", "14")],
        b"",
    );
    assert_eq!(flow.on_response_headers(&host, true), Verdict::Pause);
    assert_eq!(last_dispatch(&host).0, "/v1/release");
    // In the trailers, after messages.
    let (mut flow, _b, _c, host) = forwarded_grpc_call();
    host.set_response(200, &[("content-type", "application/grpc")], b"");
    assert_eq!(flow.on_response_headers(&host, false), Verdict::Pause);
    *host.response_trailers.borrow_mut() = vec![("grpc-status".into(), "14".into())];
    assert_eq!(flow.on_response_trailers(&host), Verdict::Pause);
    assert_eq!(last_dispatch(&host).0, "/v1/release");
}

#[test]
fn deterministic_grpc_errors_are_stored_whatever_the_framing() {
    let (mut flow, _b, _c, host) = forwarded_grpc_call();
    host.set_response(
        200,
        &[
            ("content-type", "application/grpc"),
            ("grpc-status", "3"),
            ("grpc-message", "bad sku"),
        ],
        b"",
    );
    assert_eq!(flow.on_response_headers(&host, true), Verdict::Pause);
    let (path, complete, _) = last_dispatch(&host);
    assert_eq!(path, "/v1/complete");
    assert!(complete["response"]["headers"].to_string().contains("bad sku"));
    let (mut flow, _b, _c, host) = forwarded_grpc_call();
    host.set_response(200, &[("content-type", "application/grpc")], b"");
    flow.on_response_headers(&host, false);
    *host.response_trailers.borrow_mut() = vec![("grpc-status".into(), "3".into())];
    flow.on_response_trailers(&host);
    assert_eq!(last_dispatch(&host).0, "/v1/complete");
}

#[test]
fn a_grpc_body_ending_without_a_status_keeps_the_lock() {
    let (mut flow, background, config, host) = forwarded_grpc_call();
    host.set_response(200, &[("content-type", "application/grpc")], b"");
    flow.on_response_headers(&host, false);
    assert_eq!(flow.on_response_body(&host, 0, true), Verdict::Continue);
    background.drain(&host, &config);
    assert_eq!(last_dispatch(&host).0, "/v1/outcome-unknown");
    // The same over max_response_size, in one last chunk: not recorded as completed either.
    let (mut flow, background, config, host) = forwarded_grpc_call();
    host.set_response(200, &[("content-type", "application/grpc")], b"");
    flow.on_response_headers(&host, false);
    assert_eq!(flow.on_response_body(&host, 2 << 20, true), Verdict::Continue);
    background.drain(&host, &config);
    let (path, report, _) = last_dispatch(&host);
    assert_eq!(path, "/v1/outcome-unknown");
    assert_eq!(report["reason"], "response_incomplete");
}

#[test]
fn a_grpc_call_completed_without_its_messages_is_refused_for_good_not_run_again() {
    let mut flow = flow("");
    let host = grpc_call("g1");
    let token = start_keyed_post(&mut flow, &host);
    let completed = AcquireResponse::Completed {
        response: StoredResponse {
            status: 200,
            headers: vec![("content-type".into(), "application/grpc".into())],
            body: Vec::new(),
            body_omitted: true,
            trailers: vec![("grpc-status".into(), "0".into())],
        },
        expires_at_ms: None,
        replay_ticket: Some("ticket".into()),
        record_id: Some("rec-1".into()),
    };
    flow.on_callout_reply(&host, token, reply(200, &completed));
    let sent = host.calls().into_iter().find_map(|c| match c {
        Call::SendGrpc { status, message, .. } => Some((status, message)),
        _ => None,
    });
    let (status, message) = sent.unwrap_or_default();
    assert_eq!(
        status,
        crate::reply::grpc::code::ALREADY_EXISTS,
        "definite: not retried, not run"
    );
    assert!(
        message.contains("IDEMPOTENCY_RESPONSE_NOT_REPLAYABLE") && message.contains("OK"),
        "{message}"
    );
    assert_eq!(host.dispatches().len(), 1, "no replay routed, no second acquire");
}

#[test]
fn grpc_refusals_are_grpc_statuses() {
    let mut flow = flow(r#","in_progress_wait":"0s""#);
    let host = grpc_call("g1");
    let token = start_keyed_post(&mut flow, &host);
    let busy = AcquireResponse::InProgress {
        lock_remaining_ms: 1_500,
        outcome_unknown: false,
    };
    flow.on_callout_reply(&host, token, reply(200, &busy));
    let sent = host.calls().into_iter().find_map(|c| match c {
        Call::SendGrpc {
            status,
            message,
            metadata,
        } => Some((status, message, metadata)),
        _ => None,
    });
    assert!(sent.is_some(), "a gRPC status, not an HTTP error body");
    let (status, message, metadata) = sent.unwrap_or_default();
    assert_eq!(status, crate::reply::grpc::code::ABORTED);
    assert!(message.contains("IDEMPOTENCY_CONCURRENT_REQUEST"), "{message}");
    assert!(
        metadata.contains(&("grpc-retry-pushback-ms".into(), "2000".into())),
        "{metadata:?}"
    );
    assert!(host.sent_response().is_none());

    let mut required = make_flow(r#","mode":"required""#);
    let keyless = MockHost::with_request(
        "POST",
        "/demo.Orders/Create",
        &[("content-type", "application/grpc")],
        b"",
    );
    assert_eq!(required.on_request_headers(&keyless, false), Verdict::Pause);
    assert!(keyless
        .calls()
        .iter()
        .any(|c| matches!(c, Call::SendGrpc { status: 3, .. })));
}

#[test]
fn a_completed_grpc_call_is_routed_to_the_stores_replay_with_its_ticket() {
    let mut flow = flow("");
    let host = grpc_call("g1");
    let token = start_keyed_post(&mut flow, &host);
    let done = AcquireResponse::Completed {
        response: StoredResponse {
            status: 200,
            headers: vec![("content-type".into(), "application/grpc".into())],
            body: vec![],
            body_omitted: false,
            trailers: vec![("grpc-status".into(), "0".into())],
        },
        expires_at_ms: None,
        replay_ticket: Some("ticket-1".into()),
        record_id: None,
    };
    flow.on_callout_reply(&host, token, reply(200, &done));
    let calls = host.calls();
    assert!(calls.contains(&Call::SetRequestHeader(
        "x-idempotency-replay-ticket".into(),
        Some("ticket-1".into())
    )));
    assert!(calls.contains(&Call::SetRequestHeader(":path".into(), Some("/v1/replay".into()))));
    assert!(calls.contains(&Call::SetRequestHeader(":method".into(), Some("POST".into()))));
    assert!(calls.contains(&Call::ClearRouteCache));
    assert_eq!(
        calls.last(),
        Some(&Call::ResumeRequest),
        "forwarded, to the store"
    );
    assert!(host.sent_response().is_none());
    assert_eq!(host.counted(Counter::GrpcReplayRouted), 1);
}

#[test]
fn request_trailers_end_the_body_and_the_acquire_holds_them() {
    let mut flow = flow("");
    let host = grpc_call("g1");
    assert_eq!(flow.on_request_headers(&host, false), Verdict::Pause);
    assert_eq!(flow.on_request_body(&host, 7, false), Verdict::Pause);
    assert!(host.dispatches().is_empty());
    assert_eq!(flow.on_request_trailers(&host), Verdict::Pause);
    assert_eq!(host.dispatches().len(), 1, "acquired at the trailers");
}

/// Host calls of an executed request and of a cache replay, counted by the mock host: each is a
/// crossing from the VM into Envoy. The bounds keep new per-request host calls deliberate.
#[test]
fn an_execution_and_a_cache_replay_cross_into_envoy_only_a_few_times() {
    let config = config("");
    let (background, cache) = (Rc::new(Background::default()), small_cache());
    let mut first = RequestFlow::new(config.clone(), background.clone(), cache.clone());
    let host = post("k1", b"{}");
    host.quiet();
    execute_and_record(&mut first, &host);
    // 6 of them set the internal headers the service reads, 1 forbids the router's retries; 2
    // are the store calls.
    assert!(
        host.host_call_count() <= 24,
        "an execution made {} host calls: {:?}",
        host.host_call_count(),
        host.host_calls.borrow()
    );

    let mut retry = RequestFlow::new(config, background, cache);
    let host = post("k1", b"{}");
    host.quiet();
    retry.on_request_headers(&host, false);
    retry.on_request_body(&host, 2, true);
    assert_eq!(present(host.sent_response()).0, 201);
    assert!(
        host.host_call_count() <= 7,
        "a cache replay made {} host calls: {:?}",
        host.host_call_count(),
        host.host_calls.borrow()
    );
}
