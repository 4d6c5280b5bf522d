//! Handing store replies to whoever waits for them: a live stream (acting as that stream's
//! context) or the root context's background queue.
//!
//! Plain Rust behind [`Contexts`] (the wasm edge implements it with `set_effective_context`),
//! so who gets which reply, and in which context, is unit-tested with the mock host.

use std::cell::RefCell;
use std::rc::Weak;

use crate::config::Config;
use crate::flow::RequestFlow;
use crate::host::{Host, Level};
use crate::store::background::Background;
use crate::store::batch::{Delivery, Lane, Owner};

/// A stream waiting for a store call: its context id (to act on it from the root context) and
/// its flow (gone once the stream ended).
#[derive(Clone, Debug)]
pub struct StreamOwner {
    /// The stream's context id.
    pub context_id: u32,
    /// The stream's flow; dead once the stream ended.
    pub flow: Weak<RefCell<RequestFlow>>,
}

/// Whoever waits for a batched call: a stream, or the root context's background queue (whose
/// calls must be made even after their stream ended).
#[derive(Clone, Debug)]
pub enum CallOwner {
    /// A stream waits for the reply.
    Stream(StreamOwner),
    /// The root context's background queue (`background.rs`).
    Background,
}

impl Owner for CallOwner {
    fn alive(&self) -> bool {
        match self {
            CallOwner::Stream(stream) => stream.flow.strong_count() > 0,
            CallOwner::Background => true,
        }
    }

    fn lane(&self) -> Lane {
        match self {
            CallOwner::Stream(_) => Lane::Waited,
            CallOwner::Background => Lane::Detached,
        }
    }
}

/// What handing replies over needs from the host: acting as a context, and the host as the
/// root or as a stream.
pub trait Contexts {
    /// The root context's own id.
    fn root_context_id(&self) -> u32;
    /// Make `context_id` the effective context of the host calls that follow; false when the
    /// host refused (the stream is gone on its side).
    fn act_as(&self, context_id: u32) -> bool;
    /// Run `act` with the host as the root context.
    fn as_root(&self, act: &mut dyn FnMut(&dyn Host));
    /// Run `act` with the host as `owner`'s stream (its calls are that stream's).
    fn as_stream(&self, owner: StreamOwner, act: &mut dyn FnMut(&dyn Host));
}

/// Hand each reply to its stream, acting as that stream, or to the background queue, acting as
/// the root; the root is the effective context again when this returns. A reply whose stream
/// ended is dropped: what that stream owed the store was handed to the background queue when
/// it ended.
pub fn deliver(
    contexts: &impl Contexts,
    background: &Background,
    config: Option<&Config>,
    deliveries: Vec<Delivery<CallOwner>>,
) {
    let mut switched = false;
    for delivery in deliveries {
        let owner = match delivery.owner {
            CallOwner::Stream(owner) => owner,
            CallOwner::Background => {
                if let Some(config) = config {
                    if switched {
                        switched = !contexts.act_as(contexts.root_context_id());
                    }
                    let mut reply = Some(delivery.reply);
                    contexts.as_root(&mut |host| {
                        if let Some(reply) = reply.take() {
                            background.on_batched_reply(host, config, delivery.token, reply);
                        }
                    });
                }
                continue;
            }
        };
        let Some(flow) = owner.flow.upgrade() else {
            continue;
        };
        if !contexts.act_as(owner.context_id) {
            continue;
        }
        switched = true;
        let mut reply = Some(delivery.reply);
        contexts.as_stream(owner, &mut |host| {
            let Some(reply) = reply.take() else { return };
            match flow.try_borrow_mut() {
                Ok(mut flow) => flow.on_callout_reply(host, delivery.token, reply),
                Err(_) => host.log(
                    Level::Error,
                    "idempotency: a store reply arrived while its stream was busy; dropped",
                ),
            }
        });
    }
    if switched {
        contexts.act_as(contexts.root_context_id());
    }
}

#[cfg(test)]
#[path = "tests/routing.rs"]
mod tests;
