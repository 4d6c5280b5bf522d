//! Shadow tracking: the store is consulted on the side while the request flows untouched.
//!
//! The outcome enforcement would have had is counted (`idempotency_shadow_*`) and logged. When
//! the store granted the lock, the response is copied chunk by chunk as it streams past (never
//! held) and recorded afterwards, so switching the route to `optional` later replays it.

use idempotency_wire::{paths, AcquireResponse, CompleteRequest, RecordId, ReleaseRequest, StoredResponse};

use super::{key_hash, millis, Held};
use crate::config::Config;
use crate::host::{Callout, CalloutReply, Host, Level};
use crate::metrics::Counter;
use crate::replay::storable_headers;

/// The upstream response as seen streaming past.
#[derive(Debug, Default)]
struct Captured {
    /// `None` when the status releases the lock instead of being stored.
    status: Option<u16>,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    body_omitted: bool,
    complete: bool,
}

/// Shadow state of one stream.
#[derive(Debug)]
pub(super) struct Shadow {
    id: RecordId,
    /// The acquire callout still in flight.
    acquire_token: Option<u32>,
    /// The lock, once the store granted it.
    lock: Option<Held>,
    response: Option<Captured>,
    recorded: bool,
}

impl Shadow {
    pub(super) fn new(id: RecordId, acquire_token: u32) -> Shadow {
        Shadow {
            id,
            acquire_token: Some(acquire_token),
            lock: None,
            response: None,
            recorded: false,
        }
    }

    /// True when `token` is our acquire.
    pub(super) fn awaits(&self, token: u32) -> bool {
        self.acquire_token == Some(token)
    }

    /// Worth capturing the response: the lock is granted or may still be.
    fn capturing(&self) -> bool {
        self.acquire_token.is_some() || self.lock.is_some()
    }

    pub(super) fn on_acquire_reply(&mut self, host: &dyn Host, config: &Config, reply: CalloutReply) {
        self.acquire_token = None;
        let key = key_hash(&self.id.key);
        let parsed = match reply.status {
            Some(200) => serde_json::from_slice::<AcquireResponse>(&reply.body).ok(),
            _ => None,
        };
        let (counter, outcome) = match parsed {
            None => {
                host.count(Counter::StorageError);
                host.log(
                    Level::Warn,
                    &format!(
                        "idempotency shadow: key {key}: store failed (status {:?})",
                        reply.status
                    ),
                );
                return;
            }
            Some(AcquireResponse::Acquired(lock)) => {
                self.lock = Some(Held {
                    id: self.id.clone(),
                    lock,
                });
                self.record_if_ready(host, config);
                (Counter::ShadowExecuted, "would execute")
            }
            Some(AcquireResponse::Completed { .. }) => (Counter::ShadowWouldReplay, "would replay"),
            Some(AcquireResponse::InProgress { .. }) => (Counter::ShadowWouldConflict, "would answer 409"),
            Some(AcquireResponse::Mismatch) => (Counter::ShadowWouldMismatch, "would answer 422"),
        };
        host.count(counter);
        host.log(Level::Debug, &format!("idempotency shadow: key {key} {outcome}"));
    }

    pub(super) fn on_response_headers(&mut self, host: &dyn Host, config: &Config, end_of_stream: bool) {
        if !self.capturing() {
            return;
        }
        let Ok(headers) = host.response_headers() else {
            return;
        };
        let status = headers
            .iter()
            .find(|(n, _)| n == ":status")
            .and_then(|(_, v)| v.parse::<u16>().ok())
            .filter(|s| config.stores_status(*s));
        self.response = Some(Captured {
            status,
            headers: storable_headers(headers, &config.replay_header_denylist),
            complete: end_of_stream,
            ..Captured::default()
        });
        self.record_if_ready(host, config);
    }

    /// `chunk_size` is the size of the chunk passing now (shadow never buffers).
    pub(super) fn on_response_body(
        &mut self,
        host: &dyn Host,
        config: &Config,
        chunk_size: usize,
        end_of_stream: bool,
    ) {
        let Some(captured) = self.response.as_mut().filter(|c| !c.complete) else {
            return;
        };
        if captured.status.is_some() && !captured.body_omitted {
            if captured.body.len() + chunk_size > config.max_response_size {
                captured.body_omitted = true;
                captured.body = Vec::new();
            } else if let Ok(chunk) = host.response_body(chunk_size) {
                captured.body.extend(chunk);
            }
        }
        captured.complete = end_of_stream;
        self.record_if_ready(host, config);
    }

    pub(super) fn on_stream_done(&mut self, host: &dyn Host) {
        if let (Some(held), false) = (&self.lock, self.recorded) {
            self.recorded = true;
            release(host, held);
        }
    }

    /// Once both the lock and the whole response are known, record (or release) without waiting.
    fn record_if_ready(&mut self, host: &dyn Host, config: &Config) {
        let (Some(held), Some(captured), false) = (&self.lock, &self.response, self.recorded) else {
            return;
        };
        if !captured.complete {
            return;
        }
        self.recorded = true;
        let Some(status) = captured.status else {
            release(host, held);
            return;
        };
        let request = CompleteRequest {
            id: held.id.clone(),
            fencing_token: held.lock.fencing_token,
            response: StoredResponse {
                status,
                headers: captured.headers.clone(),
                body: captured.body.clone(),
                body_omitted: captured.body_omitted,
            },
            retention_ms: millis(config.retention_period),
        };
        send(host, paths::COMPLETE, serde_json::to_vec(&request));
    }
}

fn release(host: &dyn Host, held: &Held) {
    let request = ReleaseRequest {
        id: held.id.clone(),
        fencing_token: held.lock.fencing_token,
    };
    send(host, paths::RELEASE, serde_json::to_vec(&request));
}

/// Fire and forget: shadow never waits for the store.
fn send(host: &dyn Host, path: &str, payload: Result<Vec<u8>, serde_json::Error>) {
    let result = payload.map_err(|e| e.to_string()).and_then(|body| {
        host.dispatch(&Callout { path, body: &body })
            .map_err(|e| e.to_string())
    });
    if let Err(e) = result {
        host.count(Counter::StorageError);
        host.log(
            Level::Warn,
            &format!("idempotency shadow: cannot call {path}: {e}"),
        );
    }
}
