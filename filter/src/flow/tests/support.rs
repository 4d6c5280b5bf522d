//! Shared set-up of the flow tests: hosts, flows, store replies.
#![cfg(test)]

use super::*;
use crate::mock::present_because;

/// Route metadata under the `idempotency` namespace, encoded as Envoy 1.40 hands it over.
pub(super) fn set_route_metadata(host: &MockHost, pairs: &[(&[u8], &[u8])]) {
    let encoded = crate::request::metadata::encode_serialized_map(pairs);
    host.set_property(
        &["xds", "route_metadata", "filter_metadata", "idempotency"],
        &encoded,
    );
}

/// A replay cache of 100 records and 1 MiB.
pub(super) fn small_cache() -> Rc<std::cell::RefCell<crate::reply::cache::ReplayCache>> {
    Rc::new(std::cell::RefCell::new(crate::reply::cache::ReplayCache::new(
        100,
        1 << 20,
    )))
}

pub(super) fn no_cache() -> Rc<std::cell::RefCell<crate::reply::cache::ReplayCache>> {
    Rc::new(std::cell::RefCell::new(crate::reply::cache::ReplayCache::new(
        0, 0,
    )))
}

pub(super) fn config(extra: &str) -> Rc<Config> {
    Rc::new(crate::config::tests::orders(extra))
}

pub(super) fn flow(extra: &str) -> RequestFlow {
    make_flow(extra)
}

pub(super) fn make_flow(extra: &str) -> RequestFlow {
    RequestFlow::new(config(extra), Rc::new(Background::default()), no_cache())
}

pub(super) fn flow_with_background(extra: &str) -> (RequestFlow, Rc<Background>, Rc<Config>) {
    let config = config(extra);
    let background = Rc::new(Background::default());
    (
        RequestFlow::new(config.clone(), background.clone(), no_cache()),
        background,
        config,
    )
}

pub(super) fn reply(status: u16, body: &AcquireResponse) -> CalloutReply {
    CalloutReply {
        status: Some(status),
        // A store reply always serializes; an empty body would fail the test as a malformed reply.
        body: serde_json::to_vec(body).unwrap_or_default(),
    }
}

pub(super) fn acquired(token: u64, recovery_point: Option<&str>) -> AcquireResponse {
    AcquireResponse::Acquired(Lock {
        record_id: "rec-1".into(),
        fencing_token: token,
        attempt_id: "att-1".into(),
        resumed: recovery_point.is_some(),
        recovery_point: recovery_point.map(str::to_owned),
        previous_attempt: None,
    })
}

/// The last store call the host dispatched: path, JSON body, token (asserts there was one).
#[track_caller]
pub(super) fn last_dispatch(host: &MockHost) -> (String, Value, u32) {
    present_because(host.dispatches().pop(), "no store call was dispatched")
}

/// Status of the local response the flow sent, if it sent one.
pub(super) fn sent_status(host: &MockHost) -> Option<u16> {
    host.sent_response().map(|(status, _, _)| status)
}

/// The JSON body of the local response the flow sent; `null` when none was sent or it is not
/// JSON, so a test's field assertions fail.
pub(super) fn body_json(host: &MockHost) -> Value {
    host.sent_response()
        .and_then(|(_, _, body)| serde_json::from_str(&body).ok())
        .unwrap_or_default()
}

/// Drive a keyed POST through acquire, a 201 `{"id":7}` from upstream and an acknowledged
/// `complete`.
pub(super) fn execute_and_record(flow: &mut RequestFlow, host: &MockHost) {
    let token = start_keyed_post(flow, host);
    flow.on_callout_reply(host, token, reply(200, &acquired(1, None)));
    host.set_response(201, &[("content-type", "application/json")], b"{\"id\":7}");
    flow.on_response_headers(host, false);
    flow.on_response_body(host, 8, true);
    let (_, _, complete_token) = last_dispatch(host);
    flow.on_callout_reply(
        host,
        complete_token,
        CalloutReply {
            status: Some(200),
            body: b"{}".to_vec(),
        },
    );
}

/// Drive a keyed POST with a body up to the acquire callout.
pub(super) fn start_keyed_post(flow: &mut RequestFlow, host: &MockHost) -> u32 {
    assert_eq!(flow.on_request_headers(host, false), Verdict::Pause);
    assert_eq!(flow.on_request_body(host, 10, false), Verdict::Pause);
    let size = host.request_body.borrow().len();
    assert_eq!(flow.on_request_body(host, size, true), Verdict::Pause);
    host.last_token()
}

pub(super) fn post(key: &str, body: &[u8]) -> MockHost {
    MockHost::with_request("POST", "/api/v1/orders", &[("idempotency-key", key)], body)
}

/// Drive a keyed POST to the point where the upstream (or Envoy) answers `status` with `details`.
pub(super) fn answered(
    status: u16,
    details: Option<&str>,
) -> (RequestFlow, Rc<Background>, Rc<Config>, MockHost, Verdict) {
    let (mut flow, background, config) = flow_with_background("");
    let host = post("k1", b"{}");
    let token = start_keyed_post(&mut flow, &host);
    flow.on_callout_reply(&host, token, reply(200, &acquired(3, None)));
    host.set_response(status, &[], b"");
    if let Some(details) = details {
        host.set_property(&["response", "code_details"], details.as_bytes());
    }
    let verdict = flow.on_response_headers(&host, false);
    (flow, background, config, host, verdict)
}

pub(super) fn json_post(key: &str, body: &str, extra: &[(&'static str, &'static str)]) -> MockHost {
    let mut headers: Vec<(&str, &str)> = vec![("content-type", "application/json")];
    headers.extend_from_slice(extra);
    let leaked: &'static str = Box::leak(key.to_owned().into_boxed_str());
    headers.push(("idempotency-key", leaked));
    MockHost::with_request("POST", "/api/v1/orders", &headers, body.as_bytes())
}

pub(super) fn acquire_body_of(host: &MockHost) -> Value {
    host.dispatches()
        .into_iter()
        .find(|(path, _, _)| path == "/v1/acquire")
        .map(|(_, body, _)| body)
        .unwrap_or_default() // `null`: no acquire was sent, and the test's assertions fail
}

pub(super) fn grpc_call(key: &str) -> MockHost {
    MockHost::with_request(
        "POST",
        "/demo.Orders/Create",
        &[
            ("idempotency-key", key),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ],
        b"\0\0\0\0\x02\x0a\x00",
    )
}

/// A gRPC call forwarded with the lock held; returns the flow and host.
pub(super) fn forwarded_grpc_call() -> (RequestFlow, Rc<Background>, Rc<Config>, MockHost) {
    let (mut flow, background, config) = flow_with_background("");
    let host = grpc_call("g1");
    let token = start_keyed_post(&mut flow, &host);
    let (_, acquire, _) = host.dispatches().remove(0);
    assert_eq!(
        acquire["replay_ticket"], true,
        "gRPC acquires ask for a replay ticket"
    );
    flow.on_callout_reply(&host, token, reply(200, &acquired(2, None)));
    host.set_property(&["response", "code_details"], b"via_upstream");
    (flow, background, config, host)
}
