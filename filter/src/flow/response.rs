//! The upstream's answer: judge what its status proves, then hold it for the record, stream it
//! through, or keep the lock when the outcome is unknown.

#[allow(clippy::wildcard_imports)] // the flow module's own types and imports
use super::*;

impl RequestFlow {
    /// Count a gRPC call's final status and act on it unless it is one to store: release the
    /// lock, or keep it as outcome unknown (`None`: store it).
    fn unless_grpc_status_stored(
        &mut self,
        host: &dyn Host,
        held: &Held,
        grpc_status: u32,
    ) -> Option<Verdict> {
        host.count(Counter::GrpcStatus(grpc_status));
        match self.config.statuses.judge_grpc(grpc_status) {
            StatusVerdict::Store => None,
            StatusVerdict::Release => Some(self.release(host, held)),
            StatusVerdict::Unknown => {
                Some(self.outcome_unknown(host, held, UnknownReason::UpstreamGrpcStatus))
            }
        }
    }

    /// Response headers arrived from upstream (or from Envoy itself: a local reply).
    pub fn on_response_headers(&mut self, host: &dyn Host, end_of_stream: bool) -> Verdict {
        if let State::Shadow(job) = &self.state {
            let call = job
                .borrow_mut()
                .on_response_headers(host, &self.config, end_of_stream);
            self.in_background(host, call);
            return Verdict::Continue;
        }
        if let State::Replaying = &self.state {
            return self.on_replay_headers(host);
        }
        let State::Executing(held) = &self.state else {
            return Verdict::Continue;
        };
        let held = held.clone();
        let response_headers = match host.response_headers() {
            Ok(h) => h,
            Err(e) => {
                host.log(
                    Level::Warn,
                    &format!("idempotency: cannot read response headers: {e}"),
                );
                return self.outcome_unknown(host, &held, UnknownReason::ProxyFailure);
            }
        };
        let header = |wanted: &str| {
            response_headers
                .iter()
                .find(|(n, _)| n == wanted)
                .map(|(_, v)| v.as_str())
        };
        let Some(status) = header(":status").and_then(|v| v.parse::<u16>().ok()) else {
            return self.outcome_unknown(host, &held, UnknownReason::ProxyFailure);
        };
        let details = host
            .property(&["response", "code_details"])
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned());
        let facts = ResponseFacts {
            status,
            details: details.as_deref(),
            grpc_status: if held.grpc {
                crate::reply::grpc::status_of(&response_headers)
            } else {
                None
            },
            content_length: header("content-length").and_then(|v| v.trim().parse::<usize>().ok()),
            end_of_stream,
            grpc: held.grpc,
        };
        let (step, judged_grpc_status) = response_step(&facts, &self.config);
        if let Some(grpc_status) = judged_grpc_status {
            host.count(Counter::GrpcStatus(grpc_status));
        }
        match step {
            ResponseStep::KeepUnknown(reason) => {
                if judged_grpc_status.is_none() {
                    host.log(
                        Level::Warn,
                        &format!(
                            "idempotency: key {}: Envoy answered {status} ({}) after forwarding; outcome unknown, keeping the lock",
                            key_hash(&held.id.key),
                            details.as_deref().unwrap_or("no details")
                        ),
                    );
                }
                self.outcome_unknown(host, &held, reason)
            }
            ResponseStep::Release => self.release(host, &held),
            ResponseStep::Record => {
                let stored_headers = storable_headers(response_headers, &self.config.replay.header_denylist);
                self.complete(host, &held, status, stored_headers, Vec::new(), false)
            }
            ResponseStep::StreamThrough => {
                let stored_headers = storable_headers(response_headers, &self.config.replay.header_denylist);
                self.stream_through(host, held, status, stored_headers, end_of_stream)
            }
            ResponseStep::AwaitBody => {
                // The body follows (for gRPC: messages, then trailers with the status).
                let headers = storable_headers(response_headers, &self.config.replay.header_denylist);
                self.state = State::AwaitingResponseBody {
                    held,
                    status,
                    headers,
                    body_size: 0,
                };
                Verdict::Pause
            }
        }
    }

    /// The store's answer to a routed gRPC replay: pass it on (it carries `Idempotent-Replayed`),
    /// without the store's `x-idempotency-store` mark, which says which listener answered: a
    /// replay must come from the replay listener; anything else is a routing mistake, logged
    /// with its fix.
    pub(super) fn on_replay_headers(&mut self, host: &dyn Host) -> Verdict {
        let answered_by = host
            .response_headers()
            .ok()
            .and_then(|h| h.into_iter().find(|(n, _)| n == headers::ANSWERED_BY))
            .map(|(_, v)| v);
        match answered_by.as_deref() {
            Some(REPLAY_LISTENER) => {}
            Some(_) => host.log(
                Level::Error,
                "idempotency: a gRPC replay was answered by the store's API listener: point the replay route (path /v1/replay with x-idempotency-replay-ticket) at a cluster for the store's --replay-listen port, never at the API (see docs/grpc.md)",
            ),
            None => host.log(
                Level::Error,
                "idempotency: a gRPC replay was not answered by the store: add the replay route (path /v1/replay with x-idempotency-replay-ticket, first in the route table) to a cluster for the store's --replay-listen port (see docs/grpc.md)",
            ),
        }
        if answered_by.is_some() {
            if let Err(e) = host.set_response_header(headers::ANSWERED_BY, None) {
                host.log(
                    Level::Warn,
                    &format!("idempotency: cannot remove {}: {e}", headers::ANSWERED_BY),
                );
            }
        }
        self.state = State::Finished;
        Verdict::Continue
    }

    /// Response body data arrived (`body_size`: everything buffered so far while paused, or this
    /// chunk while streaming).
    pub fn on_response_body(&mut self, host: &dyn Host, body_size: usize, end_of_stream: bool) -> Verdict {
        match &self.state {
            State::AwaitingResponseBody {
                held,
                status,
                headers,
                ..
            } => {
                let (held, status, headers) = (held.clone(), *status, headers.clone());
                if body_size > self.config.limits.max_response_size {
                    return self.stream_through(host, held, status, headers, end_of_stream);
                }
                if !end_of_stream {
                    self.state = State::AwaitingResponseBody {
                        held,
                        status,
                        headers,
                        body_size,
                    };
                    return Verdict::Pause;
                }
                if held.grpc {
                    // The body ended without trailers: no final gRPC status was sent.
                    return self.outcome_unknown(host, &held, UnknownReason::ResponseIncomplete);
                }
                match host.response_body(body_size) {
                    Ok(body) => self.complete(host, &held, status, headers, body, false),
                    Err(e) => {
                        host.log(
                            Level::Warn,
                            &format!("idempotency: cannot read response body: {e}"),
                        );
                        self.outcome_unknown(host, &held, UnknownReason::ProxyFailure)
                    }
                }
            }
            State::Streaming {
                held,
                status,
                headers,
            } if end_of_stream => {
                // Write-ahead still holds for the end of the response: its last chunk waits
                // until the store has recorded the (body-less) result.
                let (held, status, headers) = (held.clone(), *status, headers.clone());
                if held.grpc {
                    return self.outcome_unknown(host, &held, UnknownReason::ResponseIncomplete);
                }
                host.count(Counter::ResponseStreamed);
                self.complete(host, &held, status, headers, Vec::new(), true)
            }
            // Keep holding everything until the store acknowledged the record.
            State::Recording { .. } => Verdict::Pause,
            State::Shadow(job) => {
                let call = job
                    .borrow_mut()
                    .on_response_body(host, &self.config, body_size, end_of_stream);
                self.in_background(host, call);
                Verdict::Continue
            }
            _ => Verdict::Continue,
        }
    }

    /// Response trailers arrived: the response is complete. For gRPC they carry the final
    /// status, which decides store vs release; they are recorded with the response and held
    /// until the store acknowledged.
    pub fn on_response_trailers(&mut self, host: &dyn Host) -> Verdict {
        let (held, status, headers, streamed, body_size) = match &self.state {
            State::AwaitingResponseBody {
                held,
                status,
                headers,
                body_size,
            } => (held.clone(), *status, headers.clone(), false, *body_size),
            State::Streaming {
                held,
                status,
                headers,
            } => (held.clone(), *status, headers.clone(), true, 0),
            State::Recording { .. } => return Verdict::Pause,
            _ => return Verdict::Continue,
        };
        let trailers = match host.response_trailers() {
            Ok(trailers) => storable_headers(trailers, &self.config.replay.header_denylist),
            Err(e) => {
                host.log(
                    Level::Warn,
                    &format!("idempotency: cannot read response trailers: {e}"),
                );
                return self.outcome_unknown(host, &held, UnknownReason::ProxyFailure);
            }
        };
        if held.grpc {
            let Some(grpc_status) = crate::reply::grpc::status_of(&trailers) else {
                // A gRPC response must end with a status; without one nothing is known.
                return self.outcome_unknown(host, &held, UnknownReason::ResponseIncomplete);
            };
            if let Some(verdict) = self.unless_grpc_status_stored(host, &held, grpc_status) {
                return verdict;
            }
        }
        if streamed {
            host.count(Counter::ResponseStreamed);
            return self.complete_with_trailers(host, &held, status, headers, Vec::new(), true, trailers);
        }
        match host.response_body(body_size) {
            Ok(body) => self.complete_with_trailers(host, &held, status, headers, body, false, trailers),
            Err(e) => {
                host.log(
                    Level::Warn,
                    &format!("idempotency: cannot read response body: {e}"),
                );
                self.outcome_unknown(host, &held, UnknownReason::ProxyFailure)
            }
        }
    }

    /// The response outgrew `max_response_size`: let it flow to the client as it arrives (never
    /// into Envoy's buffer limit) and record it without its body once it has ended (holding only
    /// its last chunk until the store acknowledged).
    pub(super) fn stream_through(
        &mut self,
        host: &dyn Host,
        held: Held,
        status: u16,
        headers: Vec<(String, String)>,
        end_of_stream: bool,
    ) -> Verdict {
        debug(host, || {
            format!(
                "idempotency: response of {} over max_response_size ({} bytes); streaming it through, recording it without body",
                key_hash(&held.id.key),
                self.config.limits.max_response_size
            )
        });
        if end_of_stream && held.grpc {
            // A gRPC body that ends without trailers sent no final status: nothing is known.
            return self.outcome_unknown(host, &held, UnknownReason::ResponseIncomplete);
        }
        if end_of_stream {
            self.record_streamed(host, &held, status, headers);
        } else {
            self.state = State::Streaming {
                held,
                status,
                headers,
            };
        }
        Verdict::Continue
    }
}

/// The store's `x-idempotency-store` value on answers from its replay listener.
const REPLAY_LISTENER: &str = "replay";

/// What the response headers of a forwarded request tell, read from the host.
pub(super) struct ResponseFacts<'a> {
    pub(super) status: u16,
    /// `response.code_details`: why Envoy answered, when it did.
    pub(super) details: Option<&'a str>,
    /// A gRPC call's `grpc-status` in its headers (a trailers-only answer).
    pub(super) grpc_status: Option<u32>,
    pub(super) content_length: Option<usize>,
    pub(super) end_of_stream: bool,
    pub(super) grpc: bool,
}

/// What to do with a forwarded request's response, once its headers arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ResponseStep {
    /// Whether the upstream ran cannot be known: keep the lock until it expires.
    KeepUnknown(UnknownReason),
    /// The answer proves the request may run again: release the lock.
    Release,
    /// A complete answer without a body (headers only, or trailers-only gRPC): record it now.
    Record,
    /// Larger than `max_response_size`: let it flow, record it without its body at the end.
    StreamThrough,
    /// Collect the body (and trailers) to record with it.
    AwaitBody,
}

/// Decide what a response's headers mean for the held lock (pure: [`classify`] for what the
/// status proves, then the body's fate), and which final gRPC status decided it, if one did
/// (a trailers-only answer: counted by status).
pub(super) fn response_step(facts: &ResponseFacts<'_>, config: &Config) -> (ResponseStep, Option<u32>) {
    let step = match classify(facts.status, facts.details, |s| config.statuses.judge(s)) {
        ResponseOutcome::Unknown(reason) => ResponseStep::KeepUnknown(reason),
        ResponseOutcome::Release => ResponseStep::Release,
        ResponseOutcome::Store => match facts.grpc_status {
            // Trailers-only gRPC: the headers carry the final status.
            Some(grpc_status) => {
                let step = match config.statuses.judge_grpc(grpc_status) {
                    StatusVerdict::Store => ResponseStep::Record,
                    StatusVerdict::Release => ResponseStep::Release,
                    StatusVerdict::Unknown => ResponseStep::KeepUnknown(UnknownReason::UpstreamGrpcStatus),
                };
                return (step, Some(grpc_status));
            }
            None if !facts.grpc
                && facts
                    .content_length
                    .is_some_and(|length| length > config.limits.max_response_size) =>
            {
                ResponseStep::StreamThrough
            }
            None if facts.end_of_stream && !facts.grpc => ResponseStep::Record,
            None => ResponseStep::AwaitBody,
        },
    };
    (step, None)
}
