//! A holder write the store refuses is never silently lost, and a routed gRPC replay must come
//! from the store's replay listener.

use super::support::*;
use super::*;
use crate::host::Level;

/// A keyed POST executed upstream, its `complete` sent and waiting: returns its callout token.
fn recording(flow: &mut RequestFlow, host: &MockHost) -> u32 {
    let token = start_keyed_post(flow, host);
    flow.on_callout_reply(host, token, reply(200, &acquired(3, None)));
    host.set_response(201, &[("content-type", "application/json")], b"{\"id\":1}");
    host.set_property(&["response", "code_details"], b"via_upstream");
    flow.on_response_headers(host, false);
    assert_eq!(
        flow.on_response_body(host, 8, true),
        Verdict::Pause,
        "write-ahead"
    );
    let (path, _, token) = last_dispatch(host);
    assert_eq!(path, "/v1/complete");
    token
}

fn refused(status: u16) -> CalloutReply {
    CalloutReply {
        status: Some(status),
        body: b"{\"error\":\"x\"}".to_vec(),
    }
}

#[test]
fn a_complete_refused_as_too_large_keeps_the_lock_as_outcome_unknown() {
    let (mut flow, background, config) = flow_with_background("");
    let host = post("k1", b"{}");
    let token = recording(&mut flow, &host);
    flow.on_callout_reply(&host, token, refused(413));
    assert_eq!(
        host.calls().last(),
        Some(&Call::ResumeResponse),
        "the client gets the upstream's answer"
    );
    background.drain(&host, &config);
    let (path, body, _) = last_dispatch(&host);
    assert_eq!(path, "/v1/outcome-unknown", "not a silent in-progress record");
    assert_eq!(body["reason"], "record_refused_by_store");
    assert_eq!(body["fencing_token"], 3);
    assert_eq!(host.counted(Counter::OutcomeUnknown), 1);
}

#[test]
fn a_complete_refused_as_too_large_from_the_root_context_keeps_the_lock_too() {
    let (mut flow, background, config) = flow_with_background("");
    let host = post("k1", b"{}");
    let token = recording(&mut flow, &host);
    // The first try fails in transit; the retry from the root context meets the 413.
    flow.on_callout_reply(
        &host,
        token,
        CalloutReply {
            status: None,
            body: vec![],
        },
    );
    *host.clock_advance.borrow_mut() = std::time::Duration::from_secs(1);
    background.drain(&host, &config);
    let (path, _, retry) = last_dispatch(&host);
    assert_eq!(path, "/v1/complete");
    background.on_reply(&host, &config, retry, refused(413));
    background.drain(&host, &config);
    let (path, body, _) = last_dispatch(&host);
    assert_eq!(path, "/v1/outcome-unknown");
    assert_eq!(body["reason"], "record_refused_by_store");
}

#[test]
fn a_complete_refused_for_credentials_is_retried_until_the_lock_expires() {
    for status in [401, 403] {
        let (mut flow, background, config) = flow_with_background("");
        let host = post("k1", b"{}");
        let token = recording(&mut flow, &host);
        flow.on_callout_reply(&host, token, refused(status));
        assert_eq!(host.calls().last(), Some(&Call::ResumeResponse));
        assert_eq!(background.queued(), 1, "{status}: retried, not dropped");
        *host.clock_advance.borrow_mut() = std::time::Duration::from_secs(1);
        background.drain(&host, &config);
        let (path, _, retry) = last_dispatch(&host);
        assert_eq!(path, "/v1/complete");
        // Still refused (the rotation is under way): tried again.
        background.on_reply(&host, &config, retry, refused(status));
        assert_eq!(background.queued(), 1, "{status}: retried again");
        // The credential is in force again: done.
        *host.clock_advance.borrow_mut() = std::time::Duration::from_secs(3);
        background.drain(&host, &config);
        let (_, _, last) = last_dispatch(&host);
        background.on_reply(
            &host,
            &config,
            last,
            CalloutReply {
                status: Some(200),
                body: b"{\"ok\":true}".to_vec(),
            },
        );
        assert_eq!(background.queued(), 0);
        assert!(
            host.logs
                .borrow()
                .iter()
                .any(|(_, line)| line.contains("bound to this service")),
            "says what to check"
        );
    }
}

/// A gRPC call routed to the store for its replay, answered with `headers`: the log lines.
fn replay_answered_with(headers: &[(&str, &str)]) -> (MockHost, Vec<(Level, String)>) {
    let mut flow = flow("");
    let host = grpc_call("g1");
    let token = start_keyed_post(&mut flow, &host);
    let done = AcquireResponse::Completed {
        response: StoredResponse {
            status: 200,
            headers: vec![],
            body: vec![],
            body_omitted: false,
            trailers: vec![("grpc-status".into(), "0".into())],
        },
        expires_at_ms: None,
        replay_ticket: Some("ticket-1".into()),
        record_id: Some("r".into()),
    };
    flow.on_callout_reply(&host, token, reply(200, &done));
    host.set_response(200, headers, b"");
    assert_eq!(flow.on_response_headers(&host, false), Verdict::Continue);
    let logs = host.logs.borrow().clone();
    (host, logs)
}

#[test]
fn a_replay_from_the_replay_listener_passes_without_the_stores_mark() {
    let (host, logs) = replay_answered_with(&[
        ("content-type", "application/grpc"),
        ("idempotent-replayed", "true"),
        ("x-idempotency-store", "replay"),
    ]);
    assert!(logs.iter().all(|(level, _)| *level != Level::Error), "{logs:?}");
    let headers = host.response_headers.borrow().clone();
    assert!(
        headers.iter().all(|(n, _)| n != "x-idempotency-store"),
        "{headers:?}"
    );
    assert!(headers.iter().any(|(n, _)| n == "idempotent-replayed"));
}

#[test]
fn a_replay_answered_by_the_api_listener_or_not_by_the_store_logs_the_fix() {
    let (_, logs) = replay_answered_with(&[("x-idempotency-store", "api")]);
    assert!(
        logs.iter()
            .any(|(level, line)| *level == Level::Error && line.contains("--replay-listen")),
        "{logs:?}"
    );
    let (_, logs) = replay_answered_with(&[("content-type", "application/grpc")]);
    assert!(
        logs.iter()
            .any(|(level, line)| *level == Level::Error && line.contains("replay route")),
        "{logs:?}"
    );
}

#[test]
fn a_tracked_request_tells_envoys_router_to_send_it_once_unless_configured_otherwise() {
    for (extra, expected) in [
        ("", Some("0".to_owned())),
        (r#","block_router_retries":false"#, None),
    ] {
        let mut flow = flow(extra);
        let host = MockHost::with_request(
            "POST",
            "/api/v1/orders",
            &[
                ("idempotency-key", "k1"),
                ("x-envoy-retry-on", "5xx"),
                ("x-envoy-retriable-status-codes", "201"),
            ],
            b"{}",
        );
        let token = start_keyed_post(&mut flow, &host);
        flow.on_callout_reply(&host, token, reply(200, &acquired(1, None)));
        let set = host.calls().into_iter().find_map(|call| match call {
            Call::SetRequestHeader(name, value) if name == "x-envoy-max-retries" => Some(value),
            _ => None,
        });
        assert_eq!(set.flatten(), expected, "{extra:?}");
        // The caller's own retry and hedging requests go too (only with the block).
        let removed: Vec<String> = host
            .calls()
            .into_iter()
            .filter_map(|call| match call {
                Call::SetRequestHeader(name, None) if name.starts_with("x-envoy-") => Some(name),
                _ => None,
            })
            .collect();
        if expected.is_some() {
            for name in crate::request::retry_headers::CALLER_RETRY_HEADERS {
                assert!(
                    removed.iter().any(|r| r == name),
                    "{name} not removed: {removed:?}"
                );
            }
        } else {
            assert!(removed.is_empty(), "{removed:?}");
        }
    }
}
