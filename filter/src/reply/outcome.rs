//! What a response tells us about whether the upstream executed the request: Envoy's
//! `response.code_details` separates answers the upstream sent from Envoy's own local replies.
//!
//! Only two things release a forwarded request's lock: an answer *from the upstream* whose
//! status is in `release_statuses` (the service said "not done, retry"), or a local reply whose
//! details prove the request never left Envoy (no connection to the upstream was ever made).
//! An upstream answer in `unknown_statuses` (a gateway in front of the app that gave up waiting:
//! 502, 504) and every other local reply — a route timeout (504), a reset after the request was
//! sent (503), anything unrecognised — mean the outcome is unknown, and the lock is kept until it
//! expires.

/// `response.code_details` of a response the upstream sent.
pub const VIA_UPSTREAM: &str = "via_upstream";

/// What an upstream's status (HTTP or gRPC) proves about the work, per the configured lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusVerdict {
    /// A definite answer: store it and replay it to retries.
    Store,
    /// The service said it did not do the work (or failed before doing it): release the lock.
    Release,
    /// The status says nothing about whether the work was done (a gateway that gave up
    /// waiting): keep the lock as outcome unknown.
    Unknown,
}

/// What to do with a forwarded request's lock once response headers arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseOutcome {
    /// The upstream answered with a status to store: record it.
    Store,
    /// The upstream answered with a status in `release_statuses`, or the request provably never
    /// reached it: release the lock (checkpoints kept) so a retry runs.
    Release,
    /// Envoy answered after the request may have reached the upstream: keep the lock.
    Unknown(UnknownReason),
}

/// Why the outcome of a forwarded request is unknown; named in logs, metrics and the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnknownReason {
    /// The client (downstream) went away before the response.
    DownstreamDisconnect,
    /// Envoy's route or per-try timeout fired (504).
    UpstreamTimeout,
    /// The upstream reset or closed the stream after the request was sent.
    UpstreamReset,
    /// Envoy answered locally for another reason after forwarding.
    LocalReply,
    /// The response began but the stream ended before it was complete.
    ResponseIncomplete,
    /// The proxy could not read the response (a host call failed).
    ProxyFailure,
    /// The upstream answered, but the store refused to record the response (413: larger than it
    /// accepts): the work is done and cannot be replayed, so the lock is kept.
    RecordRefusedByStore,
    /// The upstream's HTTP status is in `unknown_statuses` (by default 502 and 504: a gateway
    /// between Envoy and the app gave up waiting, the app may have finished the work).
    UpstreamStatus,
    /// The upstream's gRPC status is in `unknown_grpc_statuses` (by default `DEADLINE_EXCEEDED`
    /// and `CANCELLED`: the server stopped waiting, its handler may have finished the work).
    UpstreamGrpcStatus,
    /// Envoy's router made more than one attempt (a retry the filter could not stop): the
    /// response describes the last one only, so an earlier one may have run the request.
    SeveralAttempts,
}

impl UnknownReason {
    /// Stable name for logs, the record and the `reason` label.
    pub fn as_str(self) -> &'static str {
        match self {
            UnknownReason::DownstreamDisconnect => "downstream_disconnect",
            UnknownReason::UpstreamTimeout => "upstream_timeout",
            UnknownReason::UpstreamReset => "upstream_reset",
            UnknownReason::LocalReply => "local_reply",
            UnknownReason::ResponseIncomplete => "response_incomplete",
            UnknownReason::ProxyFailure => "proxy_failure",
            UnknownReason::RecordRefusedByStore => "record_refused_by_store",
            UnknownReason::UpstreamStatus => "upstream_status",
            UnknownReason::UpstreamGrpcStatus => "upstream_grpc_status",
            UnknownReason::SeveralAttempts => "several_attempts",
        }
    }
}

/// True when Envoy's details prove the request never left Envoy: the connection to the upstream
/// was never established, or no upstream was chosen at all.
///
/// The filter tells Envoy's router to send a tracked request once (`block_router_retries`, on by
/// default), so the details describe that one try. With it off and a route retry policy that
/// retries after a request was sent (`5xx`, `reset`), they would describe only the last try.
pub fn never_left_envoy(details: &str) -> bool {
    const NEVER_SENT: [&str; 5] = [
        "no_healthy_upstream",
        "cluster_not_found",
        "route_not_found",
        "maintenance_mode",
        "upstream_reset_before_response_started{overflow",
    ];
    if NEVER_SENT.iter().any(|d| details.starts_with(d)) {
        return true;
    }
    // A connection that never opened, or an HTTP/2 REFUSED_STREAM (RFC 9113 §8.7: the server
    // did not process the stream).
    details.starts_with("upstream_reset_before_response_started{")
        && (details.contains("connection_failure") || details.contains("refused_stream"))
}

/// Decide for a response with `status` and Envoy's `details` (`None` when Envoy did not say);
/// `judge` applies the configured status lists to an upstream's status.
pub fn classify(status: u16, details: Option<&str>, judge: impl Fn(u16) -> StatusVerdict) -> ResponseOutcome {
    match details {
        Some(VIA_UPSTREAM) => match judge(status) {
            StatusVerdict::Store => ResponseOutcome::Store,
            StatusVerdict::Release => ResponseOutcome::Release,
            StatusVerdict::Unknown => ResponseOutcome::Unknown(UnknownReason::UpstreamStatus),
        },
        Some(details) if never_left_envoy(details) => ResponseOutcome::Release,
        Some(details) if details.contains("timeout") => {
            ResponseOutcome::Unknown(UnknownReason::UpstreamTimeout)
        }
        Some(details) if details.starts_with("upstream_reset") || details.contains("reset") => {
            ResponseOutcome::Unknown(UnknownReason::UpstreamReset)
        }
        Some(_) => ResponseOutcome::Unknown(UnknownReason::LocalReply),
        // No details: trust a stored status (only an upstream produces those in practice) but
        // never release on a guess.
        None => match judge(status) {
            StatusVerdict::Store => ResponseOutcome::Store,
            StatusVerdict::Release => ResponseOutcome::Unknown(UnknownReason::LocalReply),
            StatusVerdict::Unknown => ResponseOutcome::Unknown(UnknownReason::UpstreamStatus),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn releases(status: u16) -> StatusVerdict {
        match status {
            502 | 504 => StatusVerdict::Unknown,
            408 | 425 | 429 | 500 | 503 => StatusVerdict::Release,
            _ => StatusVerdict::Store,
        }
    }

    #[test]
    fn upstream_answers_decide_by_status() {
        assert_eq!(
            classify(201, Some(VIA_UPSTREAM), releases),
            ResponseOutcome::Store
        );
        assert_eq!(
            classify(422, Some(VIA_UPSTREAM), releases),
            ResponseOutcome::Store
        );
        assert_eq!(
            classify(503, Some(VIA_UPSTREAM), releases),
            ResponseOutcome::Release
        );
    }

    #[test]
    fn a_gateway_that_gave_up_proves_nothing() {
        for status in [502, 504] {
            assert_eq!(
                classify(status, Some(VIA_UPSTREAM), releases),
                ResponseOutcome::Unknown(UnknownReason::UpstreamStatus)
            );
            assert_eq!(
                classify(status, None, releases),
                ResponseOutcome::Unknown(UnknownReason::UpstreamStatus)
            );
        }
    }

    #[test]
    fn envoy_timeouts_and_resets_after_forwarding_keep_the_lock() {
        assert_eq!(
            classify(504, Some("response_timeout"), releases),
            ResponseOutcome::Unknown(UnknownReason::UpstreamTimeout)
        );
        assert_eq!(
            classify(504, Some("upstream_per_try_timeout"), releases),
            ResponseOutcome::Unknown(UnknownReason::UpstreamTimeout)
        );
        assert_eq!(
            classify(
                503,
                Some("upstream_reset_before_response_started{remote_reset}"),
                releases
            ),
            ResponseOutcome::Unknown(UnknownReason::UpstreamReset)
        );
        assert_eq!(
            classify(
                503,
                Some("upstream_reset_before_response_started{connection_termination}"),
                releases
            ),
            ResponseOutcome::Unknown(UnknownReason::UpstreamReset)
        );
        assert_eq!(
            classify(500, Some("something_new"), releases),
            ResponseOutcome::Unknown(UnknownReason::LocalReply)
        );
    }

    #[test]
    fn only_proof_that_nothing_was_sent_releases_a_local_reply() {
        for details in [
            "upstream_reset_before_response_started{remote_connection_failure,delayed_connect_error:_Connection_refused}",
            "upstream_reset_before_response_started{connection_failure}",
            "upstream_reset_before_response_started{overflow}",
            "upstream_reset_before_response_started{remote_refused_stream_reset}",
            "no_healthy_upstream",
            "cluster_not_found",
        ] {
            assert_eq!(classify(503, Some(details), releases), ResponseOutcome::Release, "{details}");
        }
    }

    #[test]
    fn without_details_a_release_status_is_never_guessed_safe() {
        assert_eq!(
            classify(503, None, releases),
            ResponseOutcome::Unknown(UnknownReason::LocalReply)
        );
        assert_eq!(classify(201, None, releases), ResponseOutcome::Store);
    }
}
