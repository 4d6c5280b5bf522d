//! Metric names: the seed's series plus the filter's own, as Envoy stats.
//!
//! Proxy-wasm metrics appear on Envoy's `/stats/prometheus` under exactly these names. With
//! `stats_service_tag` the names get a `.service.<name>` suffix that the bootstrap's `stats_tags`
//! rule turns into a `service` label (see envoy/envoy.yaml).
//!
//! The acquire histogram is in milliseconds: Envoy histograms record integers, so a `_seconds`
//! histogram at the proxy could not resolve anything under a second. The seed's
//! `idempotency_lock_acquisition_duration_seconds` comes from the store service.

/// Counters the filter increments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Counter {
    /// A completed record was replayed.
    Hit,
    /// A lock was acquired and the request executed.
    Miss,
    /// The key was reused with other parameters (422).
    ParameterMismatch,
    /// Another attempt held the lock (409).
    ConcurrentCollision,
    /// The store failed, timed out or answered nonsense.
    StorageError,
    /// A mutating request came without a key.
    KeyMissing,
    /// A key was malformed (400).
    KeyInvalid,
    /// A request was forwarded untracked because the store failed and `failure_mode` is `open`.
    FailOpen,
    /// A request body was over `max_request_body` (413).
    RequestTooLarge,
    /// A response was recorded as completed.
    ResponseRecorded,
    /// A lock was released (retryable status, upstream failure or client gone).
    LockReleased,
    /// A replay answered from the proxy-local cache (also counted as a hit).
    ReplayCacheHit,
    /// Shadow: the request executed and was recorded (enforcement would have let it through).
    ShadowExecuted,
    /// Shadow: enforcement would have replayed a stored response instead of executing.
    ShadowWouldReplay,
    /// Shadow: enforcement would have answered 409.
    ShadowWouldConflict,
    /// Shadow: enforcement would have answered 422.
    ShadowWouldMismatch,
    /// Shadow: enforcement would have answered 400 (missing or invalid key) or 413.
    ShadowWouldReject,
    /// A forwarded request's outcome could not be known; its lock is kept until it expires.
    OutcomeUnknown,
    /// An acquire the proxy gave up on was abandoned and its lock released.
    AbandonReleased,
    /// A response over `max_response_size` streamed through and was recorded without its body.
    ResponseStreamed,
    /// A `complete`/`release`/`outcome-unknown` write was handed to the root context to retry.
    WriteRetried,
    /// `record_mode: async`: a response went on before its `complete`/`release` was written.
    RecordedAsync,
    /// A gRPC response (or refusal) with this `grpc-status` (0..=16).
    GrpcStatus(u32),
    /// A gRPC replay was routed to the store's `/v1/replay`.
    GrpcReplayRouted,
    /// A keyed client- or bidi-streaming gRPC call passed through untracked.
    GrpcStreamingUntracked,
}

/// Names of the per-status gRPC counters, index = `grpc-status`.
const GRPC_STATUS_NAMES: [&str; 17] = [
    "idempotency_grpc_status_ok_total",
    "idempotency_grpc_status_cancelled_total",
    "idempotency_grpc_status_unknown_total",
    "idempotency_grpc_status_invalid_argument_total",
    "idempotency_grpc_status_deadline_exceeded_total",
    "idempotency_grpc_status_not_found_total",
    "idempotency_grpc_status_already_exists_total",
    "idempotency_grpc_status_permission_denied_total",
    "idempotency_grpc_status_resource_exhausted_total",
    "idempotency_grpc_status_failed_precondition_total",
    "idempotency_grpc_status_aborted_total",
    "idempotency_grpc_status_out_of_range_total",
    "idempotency_grpc_status_unimplemented_total",
    "idempotency_grpc_status_internal_total",
    "idempotency_grpc_status_unavailable_total",
    "idempotency_grpc_status_data_loss_total",
    "idempotency_grpc_status_unauthenticated_total",
];

impl Counter {
    /// Every counter, for defining them at start-up.
    pub const ALL: [Counter; 41] = [
        Counter::Hit,
        Counter::Miss,
        Counter::ParameterMismatch,
        Counter::ConcurrentCollision,
        Counter::StorageError,
        Counter::KeyMissing,
        Counter::KeyInvalid,
        Counter::FailOpen,
        Counter::RequestTooLarge,
        Counter::ResponseRecorded,
        Counter::LockReleased,
        Counter::ReplayCacheHit,
        Counter::ShadowExecuted,
        Counter::ShadowWouldReplay,
        Counter::ShadowWouldConflict,
        Counter::ShadowWouldMismatch,
        Counter::ShadowWouldReject,
        Counter::OutcomeUnknown,
        Counter::AbandonReleased,
        Counter::ResponseStreamed,
        Counter::WriteRetried,
        Counter::RecordedAsync,
        Counter::GrpcReplayRouted,
        Counter::GrpcStreamingUntracked,
        Counter::GrpcStatus(0),
        Counter::GrpcStatus(1),
        Counter::GrpcStatus(2),
        Counter::GrpcStatus(3),
        Counter::GrpcStatus(4),
        Counter::GrpcStatus(5),
        Counter::GrpcStatus(6),
        Counter::GrpcStatus(7),
        Counter::GrpcStatus(8),
        Counter::GrpcStatus(9),
        Counter::GrpcStatus(10),
        Counter::GrpcStatus(11),
        Counter::GrpcStatus(12),
        Counter::GrpcStatus(13),
        Counter::GrpcStatus(14),
        Counter::GrpcStatus(15),
        Counter::GrpcStatus(16),
    ];

    /// The stat name.
    pub fn name(self) -> &'static str {
        match self {
            Counter::Hit => "idempotency_hits_total",
            Counter::Miss => "idempotency_misses_total",
            Counter::ParameterMismatch => "idempotency_parameter_mismatches_total",
            Counter::ConcurrentCollision => "idempotency_concurrent_collisions_total",
            Counter::StorageError => "idempotency_storage_errors_total",
            Counter::KeyMissing => "idempotency_key_missing_total",
            Counter::KeyInvalid => "idempotency_key_invalid_total",
            Counter::FailOpen => "idempotency_fail_open_total",
            Counter::RequestTooLarge => "idempotency_request_too_large_total",
            Counter::ResponseRecorded => "idempotency_responses_recorded_total",
            Counter::LockReleased => "idempotency_locks_released_total",
            Counter::ReplayCacheHit => "idempotency_replay_cache_hits_total",
            Counter::ShadowExecuted => "idempotency_shadow_executed_total",
            Counter::ShadowWouldReplay => "idempotency_shadow_would_replay_total",
            Counter::ShadowWouldConflict => "idempotency_shadow_would_conflict_total",
            Counter::ShadowWouldMismatch => "idempotency_shadow_would_mismatch_total",
            Counter::ShadowWouldReject => "idempotency_shadow_would_reject_total",
            Counter::OutcomeUnknown => "idempotency_outcome_unknown_total",
            Counter::AbandonReleased => "idempotency_abandoned_acquires_total",
            Counter::ResponseStreamed => "idempotency_responses_streamed_total",
            Counter::WriteRetried => "idempotency_store_writes_retried_total",
            Counter::RecordedAsync => "idempotency_records_written_async_total",
            Counter::GrpcReplayRouted => "idempotency_grpc_replays_routed_total",
            Counter::GrpcStreamingUntracked => "idempotency_grpc_streaming_untracked_total",
            Counter::GrpcStatus(code) => usize::try_from(code)
                .ok()
                .and_then(|i| GRPC_STATUS_NAMES.get(i))
                .copied()
                .unwrap_or("idempotency_grpc_status_unknown_total"),
        }
    }
}

/// Histogram of acquire round trips, in whole milliseconds rounded up (Envoy histograms take
/// integers; see [`whole_milliseconds_up`]).
pub const ACQUIRE_DURATION_HISTOGRAM: &str = "idempotency_lock_acquisition_duration_milliseconds";

/// A duration as [`ACQUIRE_DURATION_HISTOGRAM`] records it: whole milliseconds, rounded up, so
/// an acquire of 0.3 ms lands in the `≤ 1` bucket (truncating recorded it as 0, in `≤ 0.5`, and
/// every sub-millisecond acquire read as free).
pub fn whole_milliseconds_up(duration: std::time::Duration) -> u64 {
    u64::try_from(duration.as_micros().div_ceil(1000)).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::whole_milliseconds_up;

    #[test]
    fn acquire_durations_round_up_to_whole_milliseconds() {
        assert_eq!(whole_milliseconds_up(Duration::ZERO), 0);
        assert_eq!(whole_milliseconds_up(Duration::from_micros(1)), 1);
        assert_eq!(whole_milliseconds_up(Duration::from_micros(300)), 1);
        assert_eq!(whole_milliseconds_up(Duration::from_micros(1_000)), 1);
        assert_eq!(whole_milliseconds_up(Duration::from_micros(1_001)), 2);
        assert_eq!(whole_milliseconds_up(Duration::from_secs(2)), 2_000);
    }
}
