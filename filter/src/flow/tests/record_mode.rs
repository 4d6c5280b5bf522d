//! `record_mode: async`: the response goes on at once, the record is written (batched, retried,
//! cached once acknowledged) by the root context.
#![cfg(test)] // test code only

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use super::support::*;
use super::{RequestFlow, Verdict};
use crate::config::Config;
use crate::host::CalloutReply;
use crate::metrics::Counter;
use crate::mock::{Call, MockHost};
use crate::reply::cache::ReplayCache;
use crate::store::background::Background;

/// The flow, its background queue, its configuration, its host, and the deciding verdict.
type Answered = (RequestFlow, Rc<Background>, Rc<Config>, MockHost, Verdict);

/// A flow whose upstream answered `status` with `body`, up to the end of its response; the
/// verdict of the callback that decided (headers for a released lock, else the body's end).
fn answered_async(status: u16, body: &[u8], cache: &Rc<RefCell<ReplayCache>>) -> Answered {
    let config = config(r#","record_mode":"async""#);
    let background = Rc::new(Background::default());
    let mut flow = RequestFlow::new(config.clone(), background.clone(), cache.clone());
    let host = post("k1", b"{}");
    let token = start_keyed_post(&mut flow, &host);
    flow.on_callout_reply(&host, token, reply(200, &acquired(3, None)));
    host.set_response(status, &[], body);
    host.set_property(&["response", "code_details"], b"via_upstream");
    let verdict = match flow.on_response_headers(&host, false) {
        Verdict::Pause => flow.on_response_body(&host, body.len(), true),
        decided => decided,
    };
    (flow, background, config, host, verdict)
}

#[test]
fn the_response_goes_on_at_once_and_the_root_context_writes_the_record() {
    let cache = small_cache();
    let (mut flow, background, config, host, verdict) = answered_async(201, b"{\"id\":7}", &cache);
    assert_eq!(verdict, Verdict::Continue, "not held");
    assert_eq!(
        host.dispatches().len(),
        1,
        "only the acquire left from the stream"
    );
    assert!(!host.calls().contains(&Call::ResumeResponse), "nothing to resume");
    assert_eq!(host.counted(Counter::RecordedAsync), 1);
    assert_eq!(host.counted(Counter::ResponseRecorded), 1);
    assert_eq!(background.queued(), 1);
    assert!(cache.borrow().is_empty(), "not cached before the store has it");

    // The stream may end before the write is even sent: nothing is written twice.
    flow.on_stream_done(&host);
    assert_eq!(background.queued(), 1);

    background.drain(&host, &config);
    let (path, complete, write_token) = last_dispatch(&host);
    assert_eq!(path, "/v1/complete");
    assert_eq!(complete["fencing_token"], 3);
    assert_eq!(
        *host.last_may_batch.borrow(),
        Some(true),
        "shares a batch with other calls"
    );
    background.on_batched_reply(
        &host,
        &config,
        write_token,
        CalloutReply {
            status: Some(200),
            body: b"{}".to_vec(),
        },
    );
    assert_eq!(background.queued() + background.in_flight(), 0);
    assert_eq!(cache.borrow().len(), 1, "cached once acknowledged");

    // A retry is answered from the cache.
    let mut retry = RequestFlow::new(config, background, cache);
    let host = post("k1", b"{}");
    retry.on_request_headers(&host, false);
    retry.on_request_body(&host, 2, true);
    assert!(host.dispatches().is_empty());
    assert_eq!(sent_status(&host), Some(201));
}

#[test]
fn a_failed_async_write_is_retried_until_refused_and_never_cached() {
    let (_flow, background, config, host, verdict) = answered_async(201, b"{}", &small_cache());
    assert_eq!(verdict, Verdict::Continue);
    background.drain(&host, &config);
    let (_, _, first) = last_dispatch(&host);
    background.on_batched_reply(
        &host,
        &config,
        first,
        CalloutReply {
            status: None,
            body: b"batch failed".to_vec(),
        },
    );
    assert_eq!(background.queued(), 1, "retried after a backoff");
    *host.clock_advance.borrow_mut() = Duration::from_secs(1);
    background.drain(&host, &config);
    let (path, _, second) = last_dispatch(&host);
    assert_eq!(path, "/v1/complete");
    // Fenced out: final.
    background.on_batched_reply(
        &host,
        &config,
        second,
        CalloutReply {
            status: Some(409),
            body: vec![],
        },
    );
    assert_eq!(background.queued() + background.in_flight(), 0);
}

#[test]
fn a_released_lock_does_not_hold_the_response_either() {
    let (_flow, background, config, host, verdict) = answered_async(503, b"busy", &small_cache());
    assert_eq!(verdict, Verdict::Continue);
    assert_eq!(host.counted(Counter::LockReleased), 1);
    background.drain(&host, &config);
    assert_eq!(last_dispatch(&host).0, "/v1/release");
}

#[test]
fn a_route_rule_chooses_its_own_record_mode() {
    // Plugin-wide async, one route back to write-ahead.
    let config = config(
        r#","record_mode":"async","routes":[{"path_prefix":"/api/v1/payments","mode":"optional","record_mode":"write_ahead"}]"#,
    );
    let run = |path: &str| {
        let mut flow = RequestFlow::new(config.clone(), Rc::new(Background::default()), no_cache());
        let host = MockHost::with_request("POST", path, &[("idempotency-key", "k1")], b"{}");
        assert_eq!(flow.on_request_headers(&host, false), Verdict::Pause);
        flow.on_request_body(&host, 2, true);
        let (_, _, token) = last_dispatch(&host);
        flow.on_callout_reply(&host, token, reply(200, &acquired(1, None)));
        host.set_response(201, &[], b"{}");
        host.set_property(&["response", "code_details"], b"via_upstream");
        flow.on_response_headers(&host, false);
        flow.on_response_body(&host, 2, true)
    };
    assert_eq!(
        run("/api/v1/payments/1"),
        Verdict::Pause,
        "write-ahead on this route"
    );
    assert_eq!(run("/api/v1/orders"), Verdict::Continue, "async elsewhere");
}
