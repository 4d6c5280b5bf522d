//! Every local reply the filter sends: a replay of a stored response, a refusal (the problem
//! body, or a gRPC status for a gRPC call), and what a store failure means under
//! `failure_mode`.

#[allow(clippy::wildcard_imports)] // the flow module's own types and imports
use super::*;

impl RequestFlow {
    /// Answer with a stored response (its headers filtered by the denylist); the stream ends.
    pub(super) fn send_replay(&mut self, host: &dyn Host, response: &StoredResponse) {
        let headers = replay_headers(response, &self.config.replay.header_denylist);
        if let Err(e) = host.send_response(response.status, &headers, &response.body) {
            host.log(Level::Warn, &format!("idempotency: cannot send replay: {e}"));
        }
        self.state = State::Finished;
    }

    /// Answer the client with an error; the upstream is never called.
    pub(super) fn answer(&mut self, host: &dyn Host, problem: &Problem) -> Verdict {
        self.state = State::Finished;
        if self.grpc {
            let refusal = crate::reply::grpc::refusal(problem);
            host.count(Counter::GrpcStatus(refusal.status));
            if let Err(e) = host.send_grpc_response(refusal.status, &refusal.message, &refusal.metadata) {
                host.log(
                    Level::Warn,
                    &format!("idempotency: cannot send {}: {e}", problem.code.code()),
                );
            }
            return Verdict::Pause;
        }
        if let Err(e) = host.send_response(problem.status(), &problem.headers(), &problem.body()) {
            host.log(
                Level::Warn,
                &format!("idempotency: cannot send {}: {e}", problem.code.code()),
            );
        }
        Verdict::Pause
    }

    pub(super) fn too_large(&mut self, host: &dyn Host) -> Verdict {
        host.count(Counter::RequestTooLarge);
        self.answer(host, &admission::too_large(self.config.limits.max_request_body))
    }

    /// The store (or the host) failed before we held a lock: refuse (closed) or forward
    /// untracked (open). Never forwards while pretending to be tracked.
    pub(super) fn storage_failure(&mut self, host: &dyn Host, reason: &str) -> Verdict {
        host.count(Counter::StorageError);
        match self.config.policy.failure_mode {
            FailureMode::Closed => {
                host.log(
                    Level::Warn,
                    &format!("idempotency: store unavailable, refusing with 503: {reason}"),
                );
                self.answer(
                    host,
                    &Problem::new(
                        ErrorCode::StorageUnavailable,
                        "Idempotency storage is unavailable; retry with the same key later",
                    )
                    .retry_after(UNAVAILABLE_RETRY_AFTER_SECS),
                )
            }
            FailureMode::Open => {
                host.count(Counter::FailOpen);
                host.log(
                    Level::Warn,
                    &format!("idempotency: store unavailable, forwarding untracked: {reason}"),
                );
                self.state = State::PassThrough;
                Verdict::Continue
            }
        }
    }
}
