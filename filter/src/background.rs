//! Store calls that must outlive their HTTP stream, made from the root context.
//!
//! Envoy cancels a stream's pending callouts when the stream ends, so a call made from a stream
//! that is about to finish (shadow acquire and record, or the release of a lock whose stream was
//! abandoned) would be lost. Streams queue such calls here instead; the root context, which lives
//! as long as the VM, dispatches them on its next tick and receives their replies. Everything
//! stays on one worker thread (one Wasm instance), so plain `Rc`/`RefCell` sharing is enough.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;

use crate::config::Config;
use crate::flow::shadow::ShadowJob;
use crate::host::{Callout, CalloutReply, Host, Level};
use crate::metrics::Counter;

/// One queued store call.
#[derive(Debug)]
pub struct BackgroundCall {
    /// Store path, e.g. `/v1/release`.
    pub path: &'static str,
    /// JSON body.
    pub body: Vec<u8>,
    /// The shadow job waiting for this call's reply (shadow acquires only).
    pub job: Option<Rc<RefCell<ShadowJob>>>,
}

/// Most calls kept queued; beyond this new ones are dropped (and counted as storage errors)
/// rather than growing without bound while the store is unreachable.
pub const MAX_QUEUED: usize = 10_000;

/// The per-VM queue of background calls and their in-flight replies.
#[derive(Debug, Default)]
pub struct Background {
    queue: RefCell<VecDeque<BackgroundCall>>,
    in_flight: RefCell<HashMap<u32, Option<Rc<RefCell<ShadowJob>>>>>,
}

impl Background {
    /// Queue a call for the root context to make.
    pub fn enqueue(&self, host: &dyn Host, call: BackgroundCall) {
        let mut queue = self.queue.borrow_mut();
        if queue.len() >= MAX_QUEUED {
            host.count(Counter::StorageError);
            host.log(
                Level::Warn,
                &format!("idempotency: background queue full, dropping {}", call.path),
            );
            return;
        }
        queue.push_back(call);
    }

    /// Calls waiting to be dispatched.
    pub fn queued(&self) -> usize {
        self.queue.borrow().len()
    }

    /// Root context: dispatch everything queued.
    pub fn drain(&self, host: &dyn Host) {
        let calls: Vec<BackgroundCall> = self.queue.borrow_mut().drain(..).collect();
        for call in calls {
            match host.dispatch(&Callout {
                path: call.path,
                body: &call.body,
            }) {
                Ok(token) => {
                    self.in_flight.borrow_mut().insert(token, call.job);
                }
                Err(e) => {
                    host.count(Counter::StorageError);
                    host.log(
                        Level::Warn,
                        &format!("idempotency: background {} failed: {e}", call.path),
                    );
                }
            }
        }
    }

    /// Root context: a background call answered.
    pub fn on_reply(&self, host: &dyn Host, config: &Config, token: u32, reply: CalloutReply) {
        let Some(job) = self.in_flight.borrow_mut().remove(&token) else {
            return;
        };
        match job {
            Some(job) => {
                let record = job.borrow_mut().on_acquire_reply(host, config, reply);
                if let Some(call) = record {
                    self.enqueue(host, call);
                    self.drain(host);
                }
            }
            None if reply.status != Some(200) => {
                host.count(Counter::StorageError);
                host.log(
                    Level::Warn,
                    &format!(
                        "idempotency: background store call failed (status {:?})",
                        reply.status
                    ),
                );
            }
            None => {}
        }
    }
}
