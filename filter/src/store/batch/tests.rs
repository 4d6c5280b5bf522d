//! Batcher: lone calls while the store has room, one batch once it is busy, replies split back.
#![cfg(test)]

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use idempotency_wire::paths;

use super::{Batcher, Delivery, Lane, Owner};
use crate::host::{Callout, CalloutReply};
use crate::mock::{present, succeeded, Call, MockHost};

#[derive(Debug, Clone)]
struct Stream {
    id: u32,
    alive: Rc<Cell<bool>>,
    lane: Lane,
}

impl Owner for Stream {
    fn alive(&self) -> bool {
        self.alive.get()
    }

    fn lane(&self) -> Lane {
        self.lane
    }
}

fn stream(id: u32) -> Stream {
    Stream {
        id,
        alive: Rc::new(Cell::new(true)),
        lane: Lane::Waited,
    }
}

/// An owner nobody waits on (the root context's async writes).
fn detached(id: u32) -> Stream {
    Stream {
        lane: Lane::Detached,
        ..stream(id)
    }
}

fn call<'a>(path: &'static str, body: &'a str) -> Callout<'a> {
    Callout {
        path,
        body: body.as_bytes(),
        timeout: Duration::from_secs(1),
        may_batch: true,
    }
}

fn dispatched(host: &MockHost) -> Vec<(String, String, u32)> {
    host.calls()
        .into_iter()
        .filter_map(|c| match c {
            Call::Dispatch { path, body, token } => Some((path, body, token)),
            _ => None,
        })
        .collect()
}

fn ok(body: &str) -> CalloutReply {
    CalloutReply {
        status: Some(200),
        body: body.as_bytes().to_vec(),
    }
}

fn summary(deliveries: &[Delivery<Stream>]) -> Vec<(u32, u32, Option<u16>, String)> {
    deliveries
        .iter()
        .map(|d| {
            (
                d.owner.id,
                d.token,
                d.reply.status,
                String::from_utf8_lossy(&d.reply.body).into_owned(),
            )
        })
        .collect()
}

#[test]
fn calls_leave_alone_while_the_store_has_room() {
    let host = MockHost::default();
    let batcher = Batcher::new(64, 2);
    let first = batcher.submit(stream(1), &call(paths::ACQUIRE, r#"{"key":"a"}"#));
    assert!(batcher.ready());
    assert!(batcher.flush(&host).is_empty());
    let second = batcher.submit(stream(2), &call(paths::COMPLETE, r#"{"key":"b"}"#));
    assert!(batcher.flush(&host).is_empty());
    let sent = dispatched(&host);
    assert_eq!(sent.len(), 2);
    assert_eq!(
        (sent[0].0.as_str(), sent[0].1.as_str()),
        (paths::ACQUIRE, r#"{"key":"a"}"#)
    );
    assert_eq!(
        (sent[1].0.as_str(), sent[1].1.as_str()),
        (paths::COMPLETE, r#"{"key":"b"}"#)
    );

    let delivered = present(batcher.on_reply(&host, sent[1].2, ok(r#"{"ok":true}"#)));
    assert_eq!(
        summary(&delivered),
        vec![(2, second, Some(200), r#"{"ok":true}"#.to_owned())]
    );
    let delivered = present(batcher.on_reply(&host, sent[0].2, ok("{}")));
    assert_eq!(delivered[0].token, first);
    assert!(
        batcher.on_reply(&host, 999, ok("{}")).is_none(),
        "not our callout"
    );
}

#[test]
fn calls_made_while_the_store_is_busy_leave_together_and_their_replies_split_back() {
    let host = MockHost::default();
    let batcher = Batcher::new(64, 1);
    batcher.submit(stream(1), &call(paths::ACQUIRE, r#"{"key":"a"}"#));
    batcher.flush(&host);
    let tokens: Vec<u32> = (2..=4)
        .map(|id| {
            batcher.submit(
                stream(id),
                &call(paths::COMPLETE, &format!(r#"{{"key":"{id}"}}"#)),
            )
        })
        .collect();
    assert!(!batcher.ready(), "one callout in flight: the others wait");
    assert!(batcher.flush(&host).is_empty());
    assert_eq!(dispatched(&host).len(), 1);

    let first = dispatched(&host)[0].2;
    present(batcher.on_reply(&host, first, ok("{}")));
    assert!(batcher.ready());
    batcher.flush(&host);
    let sent = dispatched(&host);
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[1].0, paths::BATCH);
    let batch: serde_json::Value = succeeded(serde_json::from_str(&sent[1].1));
    assert_eq!(batch["calls"].as_array().map(Vec::len), Some(3));
    assert_eq!(batch["calls"][0]["path"], paths::COMPLETE);
    assert_eq!(batch["calls"][2]["body"]["key"], "4");

    let delivered = present(batcher.on_reply(
        &host,
        sent[1].2,
        ok(r#"{"replies":[{"status":200,"body":{"ok":true}},{"status":409,"body":{"error":"stale_fencing_token"}},{"status":200,"body":{}}]}"#),
    ));
    assert_eq!(
        summary(&delivered),
        vec![
            (2, tokens[0], Some(200), r#"{"ok":true}"#.to_owned()),
            (
                3,
                tokens[1],
                Some(409),
                r#"{"error":"stale_fencing_token"}"#.to_owned()
            ),
            (4, tokens[2], Some(200), "{}".to_owned()),
        ]
    );
}

#[test]
fn a_failed_or_malformed_batch_fails_each_call_without_a_status() {
    for reply in [
        CalloutReply {
            status: Some(503),
            body: b"upstream connect error".to_vec(),
        },
        CalloutReply {
            status: None,
            body: Vec::new(),
        },
        ok("not json"),
        ok(r#"{"replies":[{"status":200,"body":{}}]}"#),
    ] {
        let host = MockHost::default();
        let batcher = Batcher::new(64, 1);
        batcher.submit(stream(1), &call(paths::ACQUIRE, "{}"));
        batcher.flush(&host);
        batcher.submit(stream(2), &call(paths::ACQUIRE, "{}"));
        batcher.submit(stream(3), &call(paths::COMPLETE, "{}"));
        batcher.on_reply(&host, dispatched(&host)[0].2, ok("{}"));
        batcher.flush(&host);
        let batch = dispatched(&host)[1].2;
        let delivered = present(batcher.on_reply(&host, batch, reply.clone()));
        assert_eq!(delivered.len(), 2, "{reply:?}");
        assert!(
            delivered.iter().all(|d| d.reply.status.is_none()),
            "a 200 for a call would read as success: {reply:?}"
        );
    }
}

#[test]
fn a_store_without_batch_support_gets_the_calls_again_one_by_one() {
    let host = MockHost::default();
    let batcher = Batcher::new(64, 1);
    batcher.submit(stream(1), &call(paths::ACQUIRE, "{}"));
    batcher.flush(&host);
    batcher.submit(stream(2), &call(paths::COMPLETE, r#"{"n":2}"#));
    batcher.submit(stream(3), &call(paths::RELEASE, r#"{"n":3}"#));
    batcher.on_reply(&host, dispatched(&host)[0].2, ok("{}"));
    batcher.flush(&host);
    let batch = dispatched(&host)[1].2;
    let delivered = present(batcher.on_reply(
        &host,
        batch,
        CalloutReply {
            status: Some(404),
            body: Vec::new(),
        },
    ));
    assert!(delivered.is_empty(), "nothing is answered yet");
    assert_eq!(batcher.queued(), 2);
    batcher.flush(&host);
    let sent = dispatched(&host);
    assert_eq!(
        sent[2..]
            .iter()
            .map(|s| (s.0.as_str(), s.1.as_str()))
            .collect::<Vec<_>>(),
        vec![(paths::COMPLETE, r#"{"n":2}"#), (paths::RELEASE, r#"{"n":3}"#)],
        "sent alone, in order, without waiting for each other"
    );
}

#[test]
fn a_batch_the_store_refuses_as_too_large_is_sent_again_call_by_call_and_batching_goes_on() {
    let host = MockHost::default();
    let batcher = Batcher::new(64, 1);
    batcher.submit(stream(1), &call(paths::ACQUIRE, "{}"));
    batcher.flush(&host);
    batcher.submit(stream(2), &call(paths::COMPLETE, r#"{"n":2}"#));
    batcher.submit(stream(3), &call(paths::ACQUIRE, r#"{"n":3}"#));
    batcher.on_reply(&host, dispatched(&host)[0].2, ok("{}"));
    batcher.flush(&host);
    let batch = dispatched(&host)[1].clone();
    assert_eq!(batch.0, paths::BATCH);
    let delivered = present(batcher.on_reply(
        &host,
        batch.2,
        CalloutReply {
            status: Some(413),
            body: Vec::new(),
        },
    ));
    assert!(delivered.is_empty(), "no call is failed for its batch's size");
    batcher.flush(&host);
    let sent = dispatched(&host);
    assert_eq!(
        sent[2..]
            .iter()
            .map(|s| (s.0.as_str(), s.1.as_str()))
            .collect::<Vec<_>>(),
        vec![(paths::COMPLETE, r#"{"n":2}"#), (paths::ACQUIRE, r#"{"n":3}"#)],
        "each alone, so each gets its own answer"
    );
    // A lone call's own 413 is its answer.
    let own = present(batcher.on_reply(
        &host,
        sent[2].2,
        CalloutReply {
            status: Some(413),
            body: Vec::new(),
        },
    ));
    assert_eq!(own[0].reply.status, Some(413));
    assert!(batcher.batching(), "later calls are batched again");
}

#[test]
fn a_call_the_store_may_hold_leaves_at_once_alone_and_keeps_no_one_waiting() {
    let host = MockHost::default();
    let batcher = Batcher::new(64, 1);
    let waiting = Callout {
        may_batch: false,
        ..call(paths::ACQUIRE, r#"{"wait_ms":5000}"#)
    };
    // Two held acquires are out (the store may keep them for seconds)...
    batcher.submit(stream(1), &waiting);
    batcher.submit(stream(2), &waiting);
    batcher.flush(&host);
    assert_eq!(dispatched(&host).len(), 2);
    // ...and the in-flight slot is still free for everyone else.
    batcher.submit(stream(3), &call(paths::COMPLETE, r#"{"n":3}"#));
    assert!(batcher.ready());
    batcher.flush(&host);
    batcher.submit(stream(4), &call(paths::COMPLETE, r#"{"n":4}"#));
    batcher.submit(stream(5), &waiting);
    assert!(batcher.ready(), "a held call never waits for a slot");
    batcher.flush(&host);
    let sent = dispatched(&host);
    assert_eq!(sent.len(), 4);
    assert_eq!(
        (sent[2].0.as_str(), sent[2].1.as_str()),
        (paths::COMPLETE, r#"{"n":3}"#)
    );
    assert_eq!(
        (sent[3].0.as_str(), sent[3].1.as_str()),
        (paths::ACQUIRE, r#"{"wait_ms":5000}"#)
    );
    assert_eq!(batcher.queued(), 1, "n=4 waits for the slot n=3 holds");
}

#[test]
fn calls_of_ended_streams_are_not_sent_and_dispatch_failures_come_back() {
    let host = MockHost::default();
    let batcher = Batcher::new(64, 4);
    let gone = stream(1);
    batcher.submit(gone.clone(), &call(paths::ACQUIRE, "{}"));
    gone.alive.set(false);
    assert!(batcher.flush(&host).is_empty());
    assert!(dispatched(&host).is_empty());

    *host.fail_dispatch.borrow_mut() = true;
    let token = batcher.submit(stream(2), &call(paths::ACQUIRE, "{}"));
    let failed = batcher.flush(&host);
    assert_eq!(failed.len(), 1);
    assert_eq!(
        (failed[0].owner.id, failed[0].token, failed[0].reply.status),
        (2, token, None)
    );
}

#[test]
fn with_batching_off_every_call_leaves_at_once() {
    let host = MockHost::default();
    let batcher = Batcher::new(1, 1);
    for id in 1..=3 {
        batcher.submit(stream(id), &call(paths::COMPLETE, "{}"));
    }
    batcher.flush(&host);
    let sent = dispatched(&host);
    assert_eq!(sent.len(), 3);
    assert!(sent.iter().all(|s| s.0 == paths::COMPLETE));
}

#[test]
fn a_batch_stops_short_of_the_byte_limit_and_a_large_call_goes_alone() {
    let host = MockHost::default();
    let batcher = Batcher::new(64, 1);
    batcher.submit(stream(1), &call(paths::ACQUIRE, "{}"));
    batcher.flush(&host);
    let third = format!(r#"{{"body":"{}"}}"#, "x".repeat(super::MAX_BATCH_BYTES / 3));
    for id in 2..=4 {
        batcher.submit(stream(id), &call(paths::COMPLETE, &third));
    }
    let huge = format!(r#"{{"body":"{}"}}"#, "x".repeat(super::MAX_BATCH_BYTES));
    batcher.submit(stream(5), &call(paths::COMPLETE, &huge));
    batcher.on_reply(&host, dispatched(&host)[0].2, ok("{}"));
    let mut sent = Vec::new();
    for _ in 0..3 {
        batcher.flush(&host);
        let (path, body, token) = present(dispatched(&host).pop());
        sent.push(if path == paths::BATCH {
            let calls = succeeded(serde_json::from_str::<serde_json::Value>(&body));
            present(calls["calls"].as_array().map(Vec::len))
        } else {
            assert_eq!(path, paths::COMPLETE);
            body.len()
        });
        batcher.on_reply(&host, token, ok(r#"{"replies":[]}"#));
    }
    assert_eq!(
        sent,
        vec![2, third.len(), huge.len()],
        "2 fit, the third waits, the huge one alone"
    );
    assert_eq!(batcher.queued(), 0);
}

#[test]
fn a_write_nobody_waits_for_never_holds_up_a_call_a_client_waits_on() {
    let host = MockHost::default();
    let batcher = Batcher::new(64, 1);
    // The previous request's async complete is out...
    batcher.submit(detached(1), &call(paths::COMPLETE, r#"{"key":"a"}"#));
    batcher.flush(&host);
    // ...and the next request's acquire leaves at once, in its own lane.
    let acquire = batcher.submit(stream(2), &call(paths::ACQUIRE, r#"{"key":"b"}"#));
    assert!(batcher.ready());
    batcher.flush(&host);
    let sent = dispatched(&host);
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[1].0, paths::ACQUIRE);
    // More writes queue behind the write in flight, not behind the acquire, and leave together.
    batcher.submit(detached(3), &call(paths::COMPLETE, r#"{"key":"c"}"#));
    batcher.submit(detached(4), &call(paths::COMPLETE, r#"{"key":"d"}"#));
    assert!(!batcher.ready(), "the write lane's slot is taken");
    let delivered = present(batcher.on_reply(&host, sent[1].2, ok("{}")));
    assert_eq!(delivered[0].token, acquire);
    assert!(!batcher.ready(), "a free acquire slot does not release writes");
    present(batcher.on_reply(&host, sent[0].2, ok("{}")));
    assert!(batcher.ready());
    batcher.flush(&host);
    let sent = dispatched(&host);
    assert_eq!(sent.len(), 3);
    assert_eq!(sent[2].0, paths::BATCH);
}
