//! Store calls of every stream on a worker, sent by the root context: alone while the store has
//! room, together in one `/v1/batch` request once `store_max_calls_in_flight` calls are out.
//!
//! Why: for Envoy a callout costs about as much CPU as forwarding a request (a full async
//! stream with its own router), and an executed request needs two. Under load most requests
//! wait for the store anyway; their calls now share one callout (and one store request, whose
//! writes the embedded engine commits with one sync). At one connection nothing queues, so
//! every call still leaves at once, alone.
//!
//! Streams [`Batcher::submit`] a call and get a token back, as from a dispatch; the root
//! context [`Batcher::flush`]es the queue (woken at once, see `wasm/mod.rs`) and hands each reply
//! back to its stream with [`Batcher::on_reply`]. A batch that fails as a whole fails each of
//! its calls the way a lone call fails (no reply: the stream treats it as transient), so every
//! guarantee of the lone call holds: an acquire without an answer is abandoned, a holder write
//! is retried in the background. A store that does not know `/v1/batch` (404/405: an older
//! version during a rollout) gets the calls again one by one, and batching stays off.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use idempotency_wire::{encode_batch, paths, BatchResponse};

use crate::host::{Callout, CalloutReply, Host, Level};

/// Body bytes one batch carries at most (besides a single larger call, which goes alone); the
/// store accepts requests up to 16 MiB.
pub const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;

/// Which queue a call waits in. Each lane has its own `max_in_flight` callouts, so a write no
/// client waits for (`record_mode: async`: the answer has left) never holds up a call a client
/// is waiting on — at one connection the next request's `acquire` would otherwise queue behind
/// the previous request's `complete`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// A stream waits for the reply.
    Waited,
    /// Nobody waits: the root context settles the reply.
    Detached,
}

impl Lane {
    const ALL: [Lane; 2] = [Lane::Waited, Lane::Detached];
}

/// One lane's queue and the callouts it has in flight.
#[derive(Debug)]
struct LaneState<O> {
    queue: RefCell<VecDeque<Queued<O>>>,
    /// In-flight callouts that count against `max_in_flight`.
    slots_taken: Cell<usize>,
}

impl<O> Default for LaneState<O> {
    fn default() -> LaneState<O> {
        LaneState {
            queue: RefCell::default(),
            slots_taken: Cell::new(0),
        }
    }
}

/// Whoever waits for a call's reply (in Envoy: a stream's context id and its flow).
pub trait Owner: Clone {
    /// False once the stream has ended: its queued calls are not sent.
    fn alive(&self) -> bool;
    /// The lane its calls queue in.
    fn lane(&self) -> Lane {
        Lane::Waited
    }
}

/// A reply for one submitted call.
#[derive(Debug)]
pub struct Delivery<O> {
    /// Who made the call.
    pub owner: O,
    /// The token [`Batcher::submit`] returned for it.
    pub token: u32,
    /// What the store answered (or a failure without status).
    pub reply: CalloutReply,
}

/// A call waiting to be sent.
#[derive(Debug)]
struct Queued<O> {
    owner: O,
    token: u32,
    path: &'static str,
    body: Vec<u8>,
    timeout: Duration,
    may_batch: bool,
}

/// Calls of one callout in flight.
#[derive(Debug)]
enum Sent<O> {
    /// One call; `counted`: the lane whose `max_in_flight` slot it holds.
    Alone {
        owner: O,
        token: u32,
        counted: Option<Lane>,
    },
    /// Kept whole: should the store not know `/v1/batch`, they are sent again alone.
    Batch(Vec<Queued<O>>, Lane),
}

/// The per-worker queue of store calls.
#[derive(Debug)]
pub struct Batcher<O> {
    max_calls: usize,
    max_in_flight: usize,
    /// Batchable calls a stream waits for.
    waited: LaneState<O>,
    /// Batchable calls nobody waits for.
    detached: LaneState<O>,
    /// Calls the store may hold (`may_batch: false`): sent at once, alone, outside the limit,
    /// so a held call never keeps the others waiting.
    unbatchable: RefCell<VecDeque<Queued<O>>>,
    in_flight: RefCell<HashMap<u32, Sent<O>>>,
    next_token: Cell<u32>,
    /// The store answered `/v1/batch` with 404/405: send everything alone from now on.
    batching_unsupported: Cell<bool>,
}

impl<O: Owner> Batcher<O> {
    /// A batcher sending at most `max_calls` calls per batch with `max_in_flight` callouts out.
    pub fn new(max_calls: usize, max_in_flight: usize) -> Batcher<O> {
        Batcher {
            max_calls: max_calls.max(1),
            max_in_flight: max_in_flight.max(1),
            waited: LaneState::default(),
            detached: LaneState::default(),
            unbatchable: RefCell::default(),
            in_flight: RefCell::default(),
            next_token: Cell::new(1),
            batching_unsupported: Cell::new(false),
        }
    }

    /// Queue a call; its reply comes back under the returned token.
    pub fn submit(&self, owner: O, callout: &Callout<'_>) -> u32 {
        let token = self.next_token.get();
        self.next_token.set(token.wrapping_add(1).max(1));
        let call = Queued {
            owner,
            token,
            path: callout.path,
            body: callout.body.to_vec(),
            timeout: callout.timeout,
            may_batch: callout.may_batch,
        };
        if call.may_batch {
            self.queue(call.owner.lane()).borrow_mut().push_back(call);
        } else {
            self.unbatchable.borrow_mut().push_back(call);
        }
        token
    }

    fn lane(&self, lane: Lane) -> &LaneState<O> {
        match lane {
            Lane::Waited => &self.waited,
            Lane::Detached => &self.detached,
        }
    }

    fn queue(&self, lane: Lane) -> &RefCell<VecDeque<Queued<O>>> {
        &self.lane(lane).queue
    }

    fn slots(&self, lane: Lane) -> &Cell<usize> {
        &self.lane(lane).slots_taken
    }

    /// Calls waiting to be sent.
    pub fn queued(&self) -> usize {
        self.waited.queue.borrow().len()
            + self.detached.queue.borrow().len()
            + self.unbatchable.borrow().len()
    }

    fn batching(&self) -> bool {
        self.max_calls > 1 && !self.batching_unsupported.get()
    }

    fn room(&self, lane: Lane) -> bool {
        !self.batching() || self.slots(lane).get() < self.max_in_flight
    }

    fn lane_ready(&self, lane: Lane) -> bool {
        !self.queue(lane).borrow().is_empty() && self.room(lane)
    }

    /// Whether [`Self::flush`] would send something now.
    pub fn ready(&self) -> bool {
        !self.unbatchable.borrow().is_empty() || Lane::ALL.iter().any(|&lane| self.lane_ready(lane))
    }

    /// Send what may leave now: every call the store may hold, alone; then, in each lane while
    /// its in-flight limit allows, the queued calls — alone when only one waits, else up to
    /// `max_calls` together. Calls that could not be sent come back as failed deliveries.
    pub fn flush(&self, host: &dyn Host) -> Vec<Delivery<O>> {
        let mut failed = Vec::new();
        let unbatchable: Vec<Queued<O>> = self.unbatchable.borrow_mut().drain(..).collect();
        for call in unbatchable.into_iter().filter(|call| call.owner.alive()) {
            self.send(host, vec![call], None, &mut failed);
        }
        for lane in Lane::ALL {
            while self.lane_ready(lane) {
                let calls = self.next_calls(lane);
                if calls.is_empty() {
                    break;
                }
                self.send(host, calls, Some(lane), &mut failed);
            }
        }
        failed
    }

    /// Dispatch `calls` (alone, or as one batch); `counted`: the lane whose in-flight slot it
    /// takes.
    fn send(
        &self,
        host: &dyn Host,
        mut calls: Vec<Queued<O>>,
        counted: Option<Lane>,
        failed: &mut Vec<Delivery<O>>,
    ) {
        let result = match calls.as_slice() {
            [] => return,
            [call] => host.dispatch(&Callout {
                path: call.path,
                body: &call.body,
                timeout: call.timeout,
                may_batch: false,
            }),
            several => host.dispatch(&Callout {
                path: paths::BATCH,
                body: &encode_batch(several.iter().map(|c| (c.path, c.body.as_slice()))),
                timeout: several.iter().map(|c| c.timeout).max().unwrap_or_default(),
                may_batch: false,
            }),
        };
        let token = match result {
            Ok(token) => token,
            Err(e) => {
                let reply = CalloutReply {
                    status: None,
                    body: e.to_string().into_bytes(),
                };
                failed.extend(calls.into_iter().map(|call| Delivery {
                    owner: call.owner,
                    token: call.token,
                    reply: reply.clone(),
                }));
                return;
            }
        };
        let entry = match (calls.len(), calls.pop()) {
            (1, Some(call)) => Sent::Alone {
                owner: call.owner,
                token: call.token,
                counted,
            },
            (_, Some(last)) => {
                calls.push(last);
                // Batches come only from a lane's queue, whose sends are counted.
                Sent::Batch(calls, counted.unwrap_or(Lane::Waited))
            }
            (_, None) => return,
        };
        if let Some(lane) = counted {
            self.slots(lane).set(self.slots(lane).get() + 1);
        }
        self.in_flight.borrow_mut().insert(token, entry);
    }

    /// The next calls of `lane` to send together, skipping those whose stream has ended.
    fn next_calls(&self, lane: Lane) -> Vec<Queued<O>> {
        let mut queue = self.queue(lane).borrow_mut();
        let mut calls: Vec<Queued<O>> = Vec::new();
        let mut bytes = 0;
        let limit = if self.batching() { self.max_calls } else { 1 };
        while calls.len() < limit {
            // Large bodies (recorded responses up to 1 MiB, as base64) make a batch heavy: it
            // stays well under the store's request limit, and always carries at least one call.
            if !calls.is_empty()
                && queue
                    .front()
                    .is_some_and(|next| bytes + next.body.len() > MAX_BATCH_BYTES)
            {
                break;
            }
            let Some(call) = queue.pop_front() else {
                break;
            };
            if call.owner.alive() {
                bytes += call.body.len();
                calls.push(call);
            }
        }
        calls
    }

    /// Whether callout `token` is one of ours (in flight).
    pub fn owns(&self, token: u32) -> bool {
        self.in_flight.borrow().contains_key(&token)
    }

    /// The reply to callout `token`, split per call; `None` when the callout is not ours.
    pub fn on_reply(&self, host: &dyn Host, token: u32, reply: CalloutReply) -> Option<Vec<Delivery<O>>> {
        let sent = self.in_flight.borrow_mut().remove(&token)?;
        let (calls, lane) = match sent {
            Sent::Alone {
                owner,
                token,
                counted,
            } => {
                if let Some(lane) = counted {
                    self.slots(lane).set(self.slots(lane).get().saturating_sub(1));
                }
                return Some(vec![Delivery { owner, token, reply }]);
            }
            Sent::Batch(calls, lane) => {
                self.slots(lane).set(self.slots(lane).get().saturating_sub(1));
                (calls, lane)
            }
        };
        if matches!(reply.status, Some(404 | 405)) {
            host.log(
                Level::Warn,
                &format!(
                    "idempotency: the store does not know {} (status {:?}); sending its calls one by one from now on (upgrade the store to batch them)",
                    paths::BATCH,
                    reply.status
                ),
            );
            self.batching_unsupported.set(true);
            let mut queue = self.queue(lane).borrow_mut();
            for call in calls.into_iter().rev() {
                queue.push_front(call);
            }
            return Some(Vec::new());
        }
        if reply.status == Some(413) {
            // The store takes smaller requests than this batch (`--max-request-bytes`): send
            // its calls again, alone, so each gets its own answer — a `complete` its own 413,
            // which keeps its lock as outcome unknown, an acquire its lock.
            host.log(
                Level::Warn,
                &format!(
                    "idempotency: the store refused a batch of {} calls as too large (413); sending them one by one",
                    calls.len()
                ),
            );
            self.unbatchable.borrow_mut().extend(calls);
            return Some(Vec::new());
        }
        let split = (reply.status == Some(200))
            .then(|| serde_json::from_slice::<BatchResponse<'_>>(&reply.body).ok())
            .flatten()
            .filter(|batch| batch.replies.len() == calls.len());
        Some(match split {
            Some(batch) => calls
                .into_iter()
                .zip(batch.replies)
                .map(|(call, answer)| Delivery {
                    owner: call.owner,
                    token: call.token,
                    reply: CalloutReply {
                        status: Some(answer.status),
                        body: answer.body.get().as_bytes().to_vec(),
                    },
                })
                .collect(),
            None => {
                // Nothing is known of any call in it: each fails like a lone call without reply.
                let reason = format!(
                    "batch failed (status {:?}): {}",
                    reply.status,
                    String::from_utf8_lossy(reply.body.get(..200).unwrap_or(&reply.body))
                );
                calls
                    .into_iter()
                    .map(|call| Delivery {
                        owner: call.owner,
                        token: call.token,
                        reply: CalloutReply {
                            status: None,
                            body: reason.clone().into_bytes(),
                        },
                    })
                    .collect()
            }
        })
    }
}

#[cfg(test)]
mod tests;
