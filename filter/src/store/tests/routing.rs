//! Who gets which store reply, in which context: the routing the wasm edge does, against the
//! mock host.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;

use idempotency_wire::{AcquireResponse, Lock};

use super::{deliver, CallOwner, Contexts, StreamOwner};
use crate::flow::{RequestFlow, Verdict};
use crate::host::{CalloutReply, Host};
use crate::mock::{Call, MockHost};
use crate::reply::cache::ReplayCache;
use crate::store::background::Background;
use crate::store::batch::Delivery;

const ROOT: u32 = 1;

/// The host's contexts: one mock host per stream, a journal of what was done as whom.
struct FakeContexts {
    streams: HashMap<u32, MockHost>,
    root: MockHost,
    refused: HashSet<u32>,
    journal: RefCell<Vec<String>>,
}

impl FakeContexts {
    fn new(streams: &[u32]) -> FakeContexts {
        FakeContexts {
            streams: streams.iter().map(|id| (*id, keyed_post())).collect(),
            root: MockHost::with_request("GET", "/", &[], b""),
            refused: HashSet::new(),
            journal: RefCell::default(),
        }
    }

    fn journal(&self) -> Vec<String> {
        self.journal.borrow().clone()
    }
}

impl Contexts for FakeContexts {
    fn root_context_id(&self) -> u32 {
        ROOT
    }

    fn act_as(&self, context_id: u32) -> bool {
        self.journal.borrow_mut().push(format!("act as {context_id}"));
        !self.refused.contains(&context_id)
    }

    fn as_root(&self, act: &mut dyn FnMut(&dyn Host)) {
        self.journal.borrow_mut().push("root handles".to_owned());
        act(&self.root);
    }

    fn as_stream(&self, owner: StreamOwner, act: &mut dyn FnMut(&dyn Host)) {
        self.journal
            .borrow_mut()
            .push(format!("stream {} handles", owner.context_id));
        if let Some(host) = self.streams.get(&owner.context_id) {
            act(host);
        }
    }
}

fn keyed_post() -> MockHost {
    MockHost::with_request(
        "POST",
        "/api/v1/orders",
        &[("idempotency-key", "k1")],
        b"{\"a\":1}",
    )
}

/// A flow for stream `id` paused on its acquire; returns it and the acquire's token.
fn acquiring(
    contexts: &FakeContexts,
    id: u32,
    background: &Rc<Background>,
) -> (Rc<RefCell<RequestFlow>>, u32) {
    let config = Rc::new(crate::config::tests::orders(""));
    let cache = Rc::new(RefCell::new(ReplayCache::new(0, 0)));
    let flow = Rc::new(RefCell::new(RequestFlow::new(config, background.clone(), cache)));
    let host = &contexts.streams[&id];
    let size = host.request_body.borrow().len();
    assert_eq!(flow.borrow_mut().on_request_headers(host, false), Verdict::Pause);
    assert_eq!(
        flow.borrow_mut().on_request_body(host, size, true),
        Verdict::Pause
    );
    (flow, host.last_token())
}

fn acquired() -> CalloutReply {
    let lock = Lock {
        record_id: "r1".to_owned(),
        fencing_token: 1,
        attempt_id: "a1".to_owned(),
        resumed: false,
        recovery_point: None,
        previous_attempt: None,
    };
    CalloutReply {
        status: Some(200),
        body: crate::mock::succeeded(serde_json::to_vec(&AcquireResponse::Acquired(lock))),
    }
}

fn to_stream(id: u32, flow: &Rc<RefCell<RequestFlow>>, token: u32) -> Delivery<CallOwner> {
    Delivery {
        owner: CallOwner::Stream(StreamOwner {
            context_id: id,
            flow: Rc::downgrade(flow),
        }),
        token,
        reply: acquired(),
    }
}

fn resumed(host: &MockHost) -> bool {
    host.calls().contains(&Call::ResumeRequest)
}

#[test]
fn each_reply_reaches_its_own_stream_as_that_stream_and_the_root_is_restored() {
    let contexts = FakeContexts::new(&[7, 9]);
    let background = Rc::new(Background::default());
    let (seven, seven_token) = acquiring(&contexts, 7, &background);
    let (nine, nine_token) = acquiring(&contexts, 9, &background);
    let config = crate::config::tests::orders("");
    deliver(
        &contexts,
        &background,
        Some(&config),
        vec![to_stream(9, &nine, nine_token), to_stream(7, &seven, seven_token)],
    );
    assert_eq!(
        contexts.journal(),
        [
            "act as 9",
            "stream 9 handles",
            "act as 7",
            "stream 7 handles",
            "act as 1"
        ]
    );
    assert!(resumed(&contexts.streams[&7]) && resumed(&contexts.streams[&9]));
}

#[test]
fn a_reply_for_an_ended_stream_is_dropped_without_acting_as_it() {
    let contexts = FakeContexts::new(&[7]);
    let background = Rc::new(Background::default());
    let (seven, token) = acquiring(&contexts, 7, &background);
    let delivery = to_stream(7, &seven, token);
    drop(seven);
    let config = crate::config::tests::orders("");
    deliver(&contexts, &background, Some(&config), vec![delivery]);
    assert!(contexts.journal().is_empty(), "{:?}", contexts.journal());
    assert!(!resumed(&contexts.streams[&7]));
}

#[test]
fn a_stream_the_host_will_not_act_as_gets_nothing_and_the_next_one_still_does() {
    let mut contexts = FakeContexts::new(&[7, 9]);
    contexts.refused.insert(7);
    let background = Rc::new(Background::default());
    let (seven, seven_token) = acquiring(&contexts, 7, &background);
    let (nine, nine_token) = acquiring(&contexts, 9, &background);
    let config = crate::config::tests::orders("");
    deliver(
        &contexts,
        &background,
        Some(&config),
        vec![to_stream(7, &seven, seven_token), to_stream(9, &nine, nine_token)],
    );
    assert_eq!(
        contexts.journal(),
        ["act as 7", "act as 9", "stream 9 handles", "act as 1"]
    );
    assert!(!resumed(&contexts.streams[&7]));
    assert!(resumed(&contexts.streams[&9]));
}

#[test]
fn background_replies_are_handled_as_the_root_even_between_stream_replies() {
    let contexts = FakeContexts::new(&[7]);
    let background = Rc::new(Background::default());
    let (seven, token) = acquiring(&contexts, 7, &background);
    let config = crate::config::tests::orders("");
    let background_reply = Delivery {
        owner: CallOwner::Background,
        token: 4242,
        reply: acquired(),
    };
    deliver(
        &contexts,
        &background,
        Some(&config),
        vec![to_stream(7, &seven, token), background_reply],
    );
    // The stream's reply made 7 the effective context: the root acts as itself again before
    // handling its own, and nothing switches afterwards.
    assert_eq!(
        contexts.journal(),
        ["act as 7", "stream 7 handles", "act as 1", "root handles"]
    );
}

#[test]
fn a_reply_while_its_stream_is_busy_is_logged_not_a_panic() {
    let contexts = FakeContexts::new(&[7]);
    let background = Rc::new(Background::default());
    let (seven, token) = acquiring(&contexts, 7, &background);
    let config = crate::config::tests::orders("");
    let busy = seven.borrow_mut();
    deliver(
        &contexts,
        &background,
        Some(&config),
        vec![to_stream(7, &seven, token)],
    );
    drop(busy);
    assert!(!resumed(&contexts.streams[&7]));
    assert!(contexts.streams[&7]
        .logs
        .borrow()
        .iter()
        .any(|(_, line)| line.contains("while its stream was busy")));
}
