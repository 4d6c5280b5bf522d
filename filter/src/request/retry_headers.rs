//! The request headers that ask Envoy's router for retries: set to send a tracked request
//! once, or removed when a caller sent them.

/// Envoy's router reads this request header (from a filter as from an internal caller) over
/// the route's `num_retries`, and a caller's `x-envoy-retry-on`/`-retriable-status-codes`/
/// `-hedge-on-per-try-timeout` all spend those retries: `0` leaves none, so one tracked request
/// reaches the upstream at most once. (Envoy cannot narrow a route's `retry_on` per request, so
/// even `connect-failure` retries go: such a request never left Envoy, its lock is released and
/// the client's own retry runs it.)
pub const MAX_RETRIES_HEADER: &str = "x-envoy-max-retries";

/// A caller's requests for retries and hedging, removed from a tracked request with
/// `block_router_retries` (Envoy honours them from callers it treats as internal): with
/// `x-envoy-max-retries: 0` the router would not act on them, and the upstream should not see
/// a retry policy that does not apply.
pub const CALLER_RETRY_HEADERS: [&str; 5] = [
    "x-envoy-retry-on",
    "x-envoy-retry-grpc-on",
    "x-envoy-retriable-status-codes",
    "x-envoy-retriable-header-names",
    "x-envoy-hedge-on-per-try-timeout",
];
