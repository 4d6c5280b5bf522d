//! Plugin configuration: parsed once in `on_configure`, validated, shared read-only.
//!
//! Names follow the seed's Go `idempotency.Config` in snake_case (`service_name`, `require_key`,
//! `only_mutating`, `max_key_length`, `lock_timeout`, `retention_period`, `max_response_size`),
//! plus what a proxy needs (`failure_mode`, the store cluster and its timeout). Unknown fields are
//! refused, so a typo never silently falls back to a default.

use std::collections::BTreeSet;
use std::time::Duration;

use serde::Deserialize;

use crate::reply::outcome::StatusVerdict;

/// What the filter does for a request on a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[cfg_attr(test, derive(Default))] // tests only: see `Config`
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// The filter does nothing.
    #[cfg_attr(test, default)]
    Off,
    /// Track and count what would happen, never change a response or block.
    Shadow,
    /// Enforce idempotency for requests that carry a key; pass others through.
    Optional,
    /// Enforce idempotency and refuse mutating requests without a key (400).
    Required,
}

/// What happens when the store cannot be reached or answers nonsense.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[cfg_attr(test, derive(Default))] // tests only: see `Config`
#[serde(rename_all = "snake_case")]
pub enum FailureMode {
    /// Refuse with 503 `IDEMPOTENCY_STORAGE_UNAVAILABLE` (never risk a duplicate).
    #[cfg_attr(test, default)]
    Closed,
    /// Forward untracked (counted and logged): availability over exactly-once.
    Open,
}

/// When the response leaves for the client, relative to writing its record.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordMode {
    /// Hold the response until the store acknowledged `complete`/`release`: a client never sees
    /// an answer the store has not recorded, so an immediate retry always finds the record.
    #[default]
    WriteAhead,
    /// Let the response go as soon as it has been read and write the record in the background
    /// (batched with other calls, retried until the lock expires): one store round trip less
    /// on the client's latency. Meanwhile the key stays locked, so a retry that overtakes the
    /// write gets 409 (or waits, with `in_progress_wait`), never a second execution.
    Async,
}

/// An entry of `release_statuses` / `unknown_statuses`: one status or a class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusMatcher {
    /// One exact status, e.g. `429`.
    Exact(u16),
    /// A class, e.g. `5xx` (stored as the leading digit).
    Class(u16),
}

impl StatusMatcher {
    /// True when some status matches both.
    pub fn overlaps(self, other: StatusMatcher) -> bool {
        (100..=599).any(|s| self.matches(s) && other.matches(s))
    }

    fn matches(&self, status: u16) -> bool {
        match self {
            StatusMatcher::Exact(code) => *code == status,
            StatusMatcher::Class(class) => status / 100 == *class,
        }
    }
}

/// How a rule matches the request path (query string excluded).
#[derive(Debug, Clone)]
pub enum PathMatch {
    /// Path starts with this.
    Prefix(String),
    /// Path equals this.
    Exact(String),
    /// Path matches this regular expression.
    Regex(regex_lite::Regex),
}

impl PathMatch {
    /// True when `path` (without query) matches.
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Prefix(prefix) => path.starts_with(prefix.as_str()),
            PathMatch::Exact(exact) => path == exact,
            PathMatch::Regex(regex) => regex.is_match(path),
        }
    }
}

/// A per-route rollout rule; the first rule matching path and method decides.
#[derive(Debug, Clone)]
pub struct RouteRule {
    /// Name for logs and docs.
    pub name: String,
    /// Path condition.
    pub path: PathMatch,
    /// Methods (upper case); `None` means the service's `mutating_methods`.
    pub methods: Option<BTreeSet<String>>,
    /// Mode on this route.
    pub mode: Mode,
    /// Share of keys (0..=100, stable by key hash) enforced; the rest runs in shadow.
    pub percentage: f64,
    /// JSON pointers removed from JSON bodies before fingerprinting, besides the global ones.
    pub exclude_fields: Vec<String>,
    /// `in_progress_wait` on this route, overriding the plugin-wide value.
    pub in_progress_wait: Option<Duration>,
    /// Track the client- and bidi-streaming gRPC methods (`streaming_methods`) this rule matches
    /// (the request is buffered whole first: only for client-streaming methods whose client
    /// closes its side before expecting answers).
    pub track_streaming: bool,
    /// `record_mode` on this route, overriding the plugin-wide value.
    pub record_mode: Option<RecordMode>,
}

/// Where the record scope (caller isolation) comes from; the first source present wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScopeSource {
    /// A request header, e.g. a tenant id set by an authenticating gateway.
    Header(String),
    /// SHA-256 of the `Authorization` header (never stored in clear).
    AuthorizationHash,
    /// The peer's mTLS identity (Istio: the SPIFFE principal).
    PeerPrincipal,
    /// A claim of the JWT validated by Envoy's `jwt_authn` filter (`payload_in_metadata`).
    JwtClaim(String),
}

/// Validated configuration, in sections by concern (the operator's JSON stays flat: each field
/// says which key it comes from). A real one only comes from [`Config::parse`]; the `Default`
/// that tests get is what `mock::succeeded` hands back after its assertion has already failed.
#[derive(Debug, Clone)]
#[cfg_attr(test, derive(Default))]
pub struct Config {
    /// `service_name`: the logical service; part of every record's identity.
    pub service_name: String,
    /// `stats_service_tag`: append `.service.<service_name>` to every stat name, for the
    /// bootstrap's `stats_tags` rule to turn into a `service` label.
    pub stats_service_tag: bool,
    /// Which requests are tracked, and how.
    pub policy: Policy,
    /// How long locks and records live, and when the response waits for its record.
    pub records: Records,
    /// What an upstream's status proves.
    pub statuses: Statuses,
    /// Bounds on keys and bodies.
    pub limits: Limits,
    /// What the fingerprint covers.
    pub fingerprint: Fingerprinting,
    /// Where the record scope (caller isolation) comes from.
    pub scope: Scoping,
    /// How the store service is called.
    pub store: StoreSettings,
    /// What is replayed, and the per-worker cache of completed records.
    pub replay: ReplaySettings,
}

/// Which requests the filter tracks, and what it does when it cannot.
#[derive(Debug, Clone)]
#[cfg_attr(test, derive(Default))]
pub struct Policy {
    /// `mode` (or the seed's `require_key`): the default mode for this plugin.
    pub mode: Mode,
    /// `only_mutating`: only act on `mutating_methods` (the seed's `OnlyMutating`).
    pub only_mutating: bool,
    /// `mutating_methods`: methods considered mutating (upper case).
    pub mutating_methods: BTreeSet<String>,
    /// `streaming_methods`: paths (`/package.Service/Method`) of client- and bidi-streaming gRPC
    /// methods, passed through untracked (counted) unless a route rule sets `track_streaming`.
    pub streaming_methods: BTreeSet<String>,
    /// `routes`: per-route rules, first match wins; unmatched requests use `mode`.
    pub routes: Vec<RouteRule>,
    /// `route_metadata_namespace`: the namespace of Envoy route `filter_metadata` that overrides
    /// `mode`/`percentage` per route.
    pub route_metadata_namespace: String,
    /// `failure_mode`: store outage behaviour.
    pub failure_mode: FailureMode,
    /// `block_router_retries`: tell Envoy's router not to retry a tracked request
    /// (`x-envoy-max-retries: 0`), whatever the route's `retry_policy` or the caller's
    /// `x-envoy-*` retry headers say: a retry after the request may have reached the upstream
    /// runs it again behind the filter's back, and the filter sees one response. A request that
    /// never left Envoy is released instead, and the client's keyed retry runs it once. On by
    /// default.
    pub block_router_retries: bool,
}

/// How long locks and records live.
#[derive(Debug, Clone)]
#[cfg_attr(test, derive(Default))]
pub struct Records {
    /// `lock_timeout`: how long a lock is held before another attempt may take it over.
    pub lock_timeout: Duration,
    /// `retention_period`: how long records are kept.
    pub retention_period: Duration,
    /// `in_progress_wait`: how long the store may hold a retry's acquire while the key is in
    /// progress, waiting for the first attempt to finish (then the retry gets the replay); 0
    /// answers 409 at once.
    pub in_progress_wait: Duration,
    /// `record_mode`: whether the response waits for its record to be written (`write_ahead`)
    /// or not (`async`).
    pub record_mode: RecordMode,
}

/// What an upstream's status proves (the lists never overlap: load refuses a status in both).
#[derive(Debug, Clone)]
#[cfg_attr(test, derive(Default))]
pub struct Statuses {
    /// `release_statuses`: upstream statuses that release the lock instead of being stored.
    pub release: Vec<StatusMatcher>,
    /// `unknown_statuses`: upstream statuses that keep the lock as outcome unknown (a gateway
    /// that gave up waiting).
    pub unknown: Vec<StatusMatcher>,
    /// `release_grpc_statuses`: gRPC statuses that release the lock instead of being stored.
    pub release_grpc: Vec<u32>,
    /// `unknown_grpc_statuses`: gRPC statuses that keep the lock as outcome unknown.
    pub unknown_grpc: Vec<u32>,
}

/// Bounds on keys and bodies.
#[derive(Debug, Clone)]
#[cfg_attr(test, derive(Default))]
pub struct Limits {
    /// `max_key_length`: the longest accepted key, after unquoting.
    pub max_key_length: usize,
    /// `max_request_body`: the largest request body fingerprinted; larger requests get 413.
    pub max_request_body: usize,
    /// `max_response_size`: the largest response body stored; larger ones are recorded without
    /// their body.
    pub max_response_size: usize,
}

/// What the request fingerprint covers besides method and path.
#[derive(Debug, Clone)]
#[cfg_attr(test, derive(Default))]
pub struct Fingerprinting {
    /// `fingerprint_headers`: request headers (lower case, sorted) included.
    pub headers: Vec<String>,
    /// `json_canonical`: fingerprint JSON bodies canonically (key order and whitespace
    /// insensitive).
    pub json_canonical: bool,
    /// `exclude_fields`: JSON pointers removed from every JSON body first.
    pub exclude_fields: Vec<String>,
}

/// Where the record scope (caller isolation) comes from.
#[derive(Debug, Clone)]
#[cfg_attr(test, derive(Default))]
pub struct Scoping {
    /// `scope_from`: the sources, in order; the first present wins.
    pub sources: Vec<ScopeSource>,
    /// `scope_secret`: the key of the HMAC over credentials for `scope_from: authorization`
    /// (required with it).
    pub secret: Option<String>,
    /// `jwt_payload_metadata_key`: `jwt_authn`'s `payload_in_metadata` name, for `jwt_claim:`
    /// scopes.
    pub jwt_payload_metadata_key: String,
}

/// How the store service is called.
#[derive(Debug, Clone)]
#[cfg_attr(test, derive(Default))]
pub struct StoreSettings {
    /// `store_cluster`: the Envoy cluster of the store service.
    pub cluster: String,
    /// `store_authority`: the `:authority` sent to the store.
    pub authority: String,
    /// `store_token`: the bearer token for the store API, if the store requires one.
    pub token: Option<String>,
    /// `store_timeout`: the timeout of each store callout.
    pub timeout: Duration,
    /// `store_batch_max_calls`: most store calls sent together in one `/v1/batch` request (1:
    /// every call alone).
    pub batch_max_calls: usize,
    /// `store_max_calls_in_flight`: store calls (single or batched) a worker keeps in flight;
    /// calls made meanwhile queue and leave together as soon as one answers.
    pub max_calls_in_flight: usize,
}

/// What is replayed, and the per-worker cache of completed records.
#[derive(Debug, Clone)]
#[cfg_attr(test, derive(Default))]
pub struct ReplaySettings {
    /// `replay_header_denylist`: response headers (lower case) never stored or replayed,
    /// besides hop-by-hop ones.
    pub header_denylist: BTreeSet<String>,
    /// `replay_cache_max_entries`: completed records cached per worker (0 disables the cache).
    pub cache_max_entries: usize,
    /// `replay_cache_max_bytes`: bytes of completed records cached per worker.
    pub cache_max_bytes: usize,
    /// `replay_cache_ttl`: how long a cached record is served before the store is asked again
    /// (≤ retention).
    pub cache_ttl: Duration,
}

/// Upper bound of `store_batch_max_calls` (the store's own limit per batch).
pub const MAX_STORE_BATCH_CALLS: usize = 256;
/// Upper bound of `store_max_calls_in_flight`.
pub const MAX_STORE_CALLS_IN_FLIGHT: usize = 1024;

impl Config {
    /// The stat name for `base` (with the service tag suffix when enabled).
    pub fn stat_name(&self, base: &str) -> String {
        if self.stats_service_tag {
            let service: String = self
                .service_name
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect();
            format!("{base}.service.{service}")
        } else {
            base.to_owned()
        }
    }
}

impl Statuses {
    /// What an upstream's HTTP status proves: stored, released or outcome unknown.
    pub fn judge(&self, status: u16) -> StatusVerdict {
        if self.unknown.iter().any(|m| m.matches(status)) {
            StatusVerdict::Unknown
        } else if self.release.iter().any(|m| m.matches(status)) {
            StatusVerdict::Release
        } else {
            StatusVerdict::Store
        }
    }

    /// What an upstream's `grpc-status` proves: stored, released or outcome unknown.
    pub fn judge_grpc(&self, status: u32) -> StatusVerdict {
        if self.unknown_grpc.contains(&status) {
            StatusVerdict::Unknown
        } else if self.release_grpc.contains(&status) {
            StatusVerdict::Release
        } else {
            StatusVerdict::Store
        }
    }
}

impl Policy {
    /// True when the filter acts on this method.
    pub fn acts_on_method(&self, method: &str) -> bool {
        !self.only_mutating || self.mutating_methods.contains(method)
    }
}

mod error;
mod fields;
mod parse;
mod raw;

pub(crate) use error::field_error;
pub use error::ConfigError;
pub use fields::{
    valid_percentage, DEFAULT_IN_PROGRESS_WAIT, DEFAULT_MUTATING_METHODS, DEFAULT_REPLAY_DENYLIST,
    MAX_IN_PROGRESS_WAIT, MAX_KEY_LENGTH_CEILING,
};

#[cfg(test)]
pub(crate) mod tests;
