//! Plugin configuration: parsed once in `on_configure`, validated, shared read-only.
//!
//! Names follow the seed's Go `idempotency.Config` in snake_case (`service_name`, `require_key`,
//! `only_mutating`, `max_key_length`, `lock_timeout`, `retention_period`, `max_response_size`),
//! plus what a proxy needs (`failure_mode`, the store cluster and its timeout). Unknown fields are
//! refused, so a typo never silently falls back to a default.

use std::collections::BTreeSet;
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

use crate::outcome::StatusVerdict;

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

/// Validated configuration. A real one only comes from [`Config::parse`]; the `Default` that
/// tests get is what `mock::succeeded` hands back after its assertion has already failed.
#[derive(Debug, Clone)]
#[cfg_attr(test, derive(Default))]
pub struct Config {
    /// Logical service name; part of every record's identity.
    pub service_name: String,
    /// Default mode for this plugin.
    pub mode: Mode,
    /// Only act on `mutating_methods` (the seed's `OnlyMutating`).
    pub only_mutating: bool,
    /// Methods considered mutating (upper case).
    pub mutating_methods: BTreeSet<String>,
    /// Longest accepted key, after unquoting.
    pub max_key_length: usize,
    /// How long a lock is held before another attempt may take it over.
    pub lock_timeout: Duration,
    /// How long the store may hold a retry's acquire while the key is in progress, waiting for
    /// the first attempt to finish (then the retry gets the replay); 0 answers 409 at once.
    pub in_progress_wait: Duration,
    /// Whether the response waits for its record to be written (`write_ahead`) or not (`async`).
    pub record_mode: RecordMode,
    /// How long records are kept.
    pub retention_period: Duration,
    /// Largest response body stored; larger ones are recorded without body.
    pub max_response_size: usize,
    /// Largest request body fingerprinted; larger requests get 413.
    pub max_request_body: usize,
    /// Store outage behaviour.
    pub failure_mode: FailureMode,
    /// Tell Envoy's router not to retry a tracked request (`x-envoy-max-retries: 0`), whatever
    /// the route's `retry_policy` or the caller's `x-envoy-*` retry headers say: a retry after
    /// the request may have reached the upstream runs it again behind the filter's back, and
    /// the filter sees one response. A request that never left Envoy is released instead, and
    /// the client's keyed retry runs it once. On by default.
    pub block_router_retries: bool,
    /// Envoy cluster of the store service.
    pub store_cluster: String,
    /// `:authority` sent to the store.
    pub store_authority: String,
    /// Bearer token for the store API, if the store requires one.
    pub store_token: Option<String>,
    /// Timeout of each store callout.
    pub store_timeout: Duration,
    /// Request headers (lower case, sorted) included in the fingerprint.
    pub fingerprint_headers: Vec<String>,
    /// Upstream statuses that release the lock instead of being stored.
    pub release_statuses: Vec<StatusMatcher>,
    /// Upstream statuses that keep the lock as outcome unknown (a gateway that gave up waiting).
    pub unknown_statuses: Vec<StatusMatcher>,
    /// gRPC statuses that release the lock instead of being stored (`release_grpc_statuses`).
    pub release_grpc_statuses: Vec<u32>,
    /// gRPC statuses that keep the lock as outcome unknown (`unknown_grpc_statuses`).
    pub unknown_grpc_statuses: Vec<u32>,
    /// Paths (`/package.Service/Method`) of client- and bidi-streaming gRPC methods: passed
    /// through untracked (counted) unless a route rule sets `track_streaming`.
    pub streaming_methods: BTreeSet<String>,
    /// Response headers (lower case) never stored or replayed, besides hop-by-hop ones.
    pub replay_header_denylist: BTreeSet<String>,
    /// Per-route rules, first match wins; unmatched requests use `mode`.
    pub routes: Vec<RouteRule>,
    /// Where the record scope comes from, in order.
    pub scope_from: Vec<ScopeSource>,
    /// Key of the HMAC over credentials for `scope_from: authorization` (required with it).
    pub scope_secret: Option<String>,
    /// `jwt_authn`'s `payload_in_metadata` name, for `jwt_claim:` scopes.
    pub jwt_payload_metadata_key: String,
    /// Fingerprint JSON bodies canonically (key order and whitespace insensitive).
    pub json_canonical: bool,
    /// JSON pointers removed from every JSON body before fingerprinting.
    pub exclude_fields: Vec<String>,
    /// Namespace of Envoy route `filter_metadata` that overrides `mode`/`percentage` per route.
    pub route_metadata_namespace: String,
    /// Append `.service.<service_name>` to every stat name, for the bootstrap's `stats_tags`
    /// rule to turn into a `service` label.
    pub stats_service_tag: bool,
    /// Completed records cached per worker (0 disables the replay cache).
    pub replay_cache_max_entries: usize,
    /// Bytes of completed records cached per worker.
    pub replay_cache_max_bytes: usize,
    /// How long a cached record is served before the store is asked again (≤ retention).
    pub replay_cache_ttl: Duration,
    /// Most store calls sent together in one `/v1/batch` request (1: every call alone).
    pub store_batch_max_calls: usize,
    /// Store calls (single or batched) a worker keeps in flight; calls made meanwhile queue
    /// and leave together as soon as one answers.
    pub store_max_calls_in_flight: usize,
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

impl Config {
    /// What an upstream's HTTP status proves: stored, released or outcome unknown (the two
    /// lists never overlap: load refuses a status in both).
    pub fn judge_status(&self, status: u16) -> StatusVerdict {
        if self.unknown_statuses.iter().any(|m| m.matches(status)) {
            StatusVerdict::Unknown
        } else if self.release_statuses.iter().any(|m| m.matches(status)) {
            StatusVerdict::Release
        } else {
            StatusVerdict::Store
        }
    }

    /// What an upstream's `grpc-status` proves: stored, released or outcome unknown.
    pub fn judge_grpc_status(&self, status: u32) -> StatusVerdict {
        if self.unknown_grpc_statuses.contains(&status) {
            StatusVerdict::Unknown
        } else if self.release_grpc_statuses.contains(&status) {
            StatusVerdict::Release
        } else {
            StatusVerdict::Store
        }
    }

    /// True when the filter acts on this method.
    pub fn acts_on_method(&self, method: &str) -> bool {
        !self.only_mutating || self.mutating_methods.contains(method)
    }
}

/// Why a configuration was refused. Every message names the offending field.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    /// The configuration is not valid JSON or has a wrongly typed or unknown field.
    #[error("invalid idempotency filter configuration: {0}")]
    Syntax(String),
    /// A field has a value outside what the filter accepts.
    #[error("invalid idempotency filter configuration: field `{field}`: {reason}")]
    Field {
        /// The field's name.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

fn field_error(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Field {
        field,
        reason: reason.into(),
    }
}

/// The configuration exactly as written by the operator.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    service_name: Option<String>,
    mode: Option<Mode>,
    require_key: Option<bool>,
    #[serde(default = "default_true")]
    only_mutating: bool,
    mutating_methods: Option<Vec<String>>,
    #[serde(default = "default_max_key_length")]
    max_key_length: usize,
    lock_timeout: Option<String>,
    in_progress_wait: Option<String>,
    #[serde(default)]
    record_mode: RecordMode,
    retention_period: Option<String>,
    #[serde(default = "default_body_limit")]
    max_response_size: usize,
    #[serde(default = "default_body_limit")]
    max_request_body: usize,
    #[serde(default = "default_failure_mode")]
    failure_mode: FailureMode,
    #[serde(default = "default_true")]
    block_router_retries: bool,
    store_cluster: Option<String>,
    store_authority: Option<String>,
    store_token: Option<String>,
    store_timeout: Option<String>,
    #[serde(default)]
    fingerprint_headers: Vec<String>,
    release_statuses: Option<Vec<String>>,
    unknown_statuses: Option<Vec<String>>,
    release_grpc_statuses: Option<Vec<String>>,
    unknown_grpc_statuses: Option<Vec<String>>,
    #[serde(default)]
    streaming_methods: Vec<String>,
    replay_header_denylist: Option<Vec<String>>,
    #[serde(default)]
    routes: Vec<RawRouteRule>,
    #[serde(default)]
    scope_from: Vec<String>,
    scope_secret: Option<String>,
    jwt_payload_metadata_key: Option<String>,
    #[serde(default = "default_true")]
    json_canonical: bool,
    #[serde(default)]
    exclude_fields: Vec<String>,
    route_metadata_namespace: Option<String>,
    #[serde(default)]
    stats_service_tag: bool,
    #[serde(default = "default_cache_entries")]
    replay_cache_max_entries: usize,
    #[serde(default = "default_cache_bytes")]
    replay_cache_max_bytes: usize,
    replay_cache_ttl: Option<String>,
    #[serde(default = "default_batch_max_calls")]
    store_batch_max_calls: usize,
    #[serde(default = "default_calls_in_flight")]
    store_max_calls_in_flight: usize,
}

fn default_batch_max_calls() -> usize {
    64
}
fn default_calls_in_flight() -> usize {
    1
}
fn default_cache_entries() -> usize {
    10_000
}
fn default_cache_bytes() -> usize {
    4 * 1024 * 1024
}

/// One route rule as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRouteRule {
    name: Option<String>,
    path_prefix: Option<String>,
    path_exact: Option<String>,
    path_regex: Option<String>,
    methods: Option<Vec<String>>,
    mode: Mode,
    percentage: Option<f64>,
    #[serde(default)]
    exclude_fields: Vec<String>,
    in_progress_wait: Option<String>,
    #[serde(default)]
    track_streaming: bool,
    record_mode: Option<RecordMode>,
}

fn default_true() -> bool {
    true
}
fn default_max_key_length() -> usize {
    255
}
fn default_body_limit() -> usize {
    1024 * 1024
}

fn default_failure_mode() -> FailureMode {
    FailureMode::Closed
}

/// Response headers not replayed by default: they describe one delivery, not the result.
pub const DEFAULT_REPLAY_DENYLIST: [&str; 12] = [
    "date",
    "set-cookie",
    "server",
    "x-request-id",
    "traceparent",
    "tracestate",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-cloud-trace-context",
    "x-envoy-upstream-service-time",
];

/// Methods acted on by default (the seed's `OnlyMutating`).
pub const DEFAULT_MUTATING_METHODS: [&str; 4] = ["POST", "PUT", "PATCH", "DELETE"];

/// Longest key the filter will ever accept, whatever `max_key_length` says.
pub const MAX_KEY_LENGTH_CEILING: usize = 1024;

/// Longest `in_progress_wait`: the store holds at most this long, and the acquire callout's
/// timeout grows by the wait.
pub const MAX_IN_PROGRESS_WAIT: Duration = Duration::from_secs(30);

/// The default `in_progress_wait`: a double submit (two clicks, a client's retry while the first
/// try still runs) gets the first one's answer instead of a 409, for handlers that finish within
/// a few seconds — and well inside Envoy's default 15 s route timeout and common client timeouts.
/// `0s` answers 409 at once.
pub const DEFAULT_IN_PROGRESS_WAIT: Duration = Duration::from_secs(5);

/// An `in_progress_wait` value: `0s` (answer 409 at once) up to [`MAX_IN_PROGRESS_WAIT`].
fn parse_wait(field: &'static str, text: &str) -> Result<Duration, String> {
    let wait = humantime::parse_duration(text.trim()).map_err(|e| {
        format!("`{field}`: in_progress_wait: expected a duration like \"2s\", got {text:?} ({e})")
    })?;
    if wait > MAX_IN_PROGRESS_WAIT {
        return Err(format!(
            "`{field}`: in_progress_wait must be at most {}",
            humantime::format_duration(MAX_IN_PROGRESS_WAIT)
        ));
    }
    Ok(wait)
}

fn parse_duration(
    field: &'static str,
    value: Option<String>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    let Some(text) = value else { return Ok(default) };
    let duration = humantime::parse_duration(text.trim()).map_err(|e| {
        field_error(
            field,
            format!("expected a duration like \"500ms\", \"30s\" or \"5m\", got {text:?} ({e})"),
        )
    })?;
    if duration.is_zero() {
        return Err(field_error(field, "must be greater than zero"));
    }
    Ok(duration)
}

fn parse_status_matcher(field: &'static str, text: &str) -> Result<StatusMatcher, ConfigError> {
    let lower = text.trim().to_ascii_lowercase();
    let reason = || format!("expected a status like \"429\" or a class like \"5xx\", got {text:?}");
    if let Some(class) = lower.strip_suffix("xx") {
        return match class.parse::<u16>() {
            Ok(digit @ 1..=5) if class.len() == 1 => Ok(StatusMatcher::Class(digit)),
            _ => Err(field_error(field, reason())),
        };
    }
    match lower.parse::<u16>() {
        Ok(code @ 100..=599) => Ok(StatusMatcher::Exact(code)),
        _ => Err(field_error(field, reason())),
    }
}

/// `release_statuses` or `unknown_statuses` from the raw list, or `default` when absent.
fn status_list(
    field: &'static str,
    raw: Option<Vec<String>>,
    default: &[StatusMatcher],
) -> Result<Vec<StatusMatcher>, ConfigError> {
    match raw {
        None => Ok(default.to_vec()),
        Some(list) => list.iter().map(|s| parse_status_matcher(field, s)).collect(),
    }
}

/// `release_grpc_statuses` or `unknown_grpc_statuses` from the raw list (names or numbers).
fn grpc_status_list(
    field: &'static str,
    raw: Option<Vec<String>>,
    default: &[u32],
) -> Result<Vec<u32>, ConfigError> {
    match raw {
        None => Ok(default.to_vec()),
        Some(list) => list
            .iter()
            .map(|s| {
                crate::grpc::parse_code(s).ok_or_else(|| {
                    field_error(
                        field,
                        format!("{s:?} is not a gRPC status (a name like \"UNAVAILABLE\" or a number 0-16)"),
                    )
                })
            })
            .collect(),
    }
}

/// The default `release_statuses`: the service says it did not do the work, or failed.
const DEFAULT_RELEASE_STATUSES: [StatusMatcher; 5] = [
    StatusMatcher::Exact(408),
    StatusMatcher::Exact(425),
    StatusMatcher::Exact(429),
    StatusMatcher::Exact(500),
    StatusMatcher::Exact(503),
];

/// The default `unknown_statuses`: a gateway in front of the app gave up waiting.
const DEFAULT_UNKNOWN_STATUSES: [StatusMatcher; 2] = [StatusMatcher::Exact(502), StatusMatcher::Exact(504)];

fn parse_methods(field: &'static str, methods: Vec<String>) -> Result<BTreeSet<String>, ConfigError> {
    let mut set = BTreeSet::new();
    for method in methods {
        let upper = method.trim().to_ascii_uppercase();
        if upper.is_empty() || !upper.chars().all(|c| c.is_ascii_uppercase()) {
            return Err(field_error(field, format!("{method:?} is not an HTTP method")));
        }
        set.insert(upper);
    }
    if set.is_empty() {
        return Err(field_error(field, "must list at least one method"));
    }
    Ok(set)
}

/// Check a list of RFC 6901 JSON pointers.
fn json_pointers(field: &'static str, pointers: Vec<String>) -> Result<Vec<String>, ConfigError> {
    for pointer in &pointers {
        if !pointer.starts_with('/') {
            return Err(field_error(
                field,
                format!("{pointer:?} is not a JSON pointer (must start with '/')"),
            ));
        }
        let mut chars = pointer.chars();
        while let Some(c) = chars.next() {
            if c == '~' && !matches!(chars.next(), Some('0' | '1')) {
                return Err(field_error(
                    field,
                    format!("{pointer:?}: '~' must be followed by 0 or 1"),
                ));
            }
        }
    }
    Ok(pointers)
}

/// Check a percentage.
pub fn valid_percentage(value: f64) -> bool {
    value.is_finite() && (0.0..=100.0).contains(&value)
}

fn parse_route(index: usize, raw: RawRouteRule) -> Result<RouteRule, ConfigError> {
    let name = raw.name.unwrap_or_else(|| format!("routes[{index}]"));
    let path =
        match (raw.path_prefix, raw.path_exact, raw.path_regex) {
            (Some(prefix), None, None) => PathMatch::Prefix(prefix),
            (None, Some(exact), None) => PathMatch::Exact(exact),
            (None, None, Some(regex)) => PathMatch::Regex(regex_lite::Regex::new(&regex).map_err(|e| {
                field_error("routes", format!("{name}: path_regex {regex:?} is invalid: {e}"))
            })?),
            (None, None, None) => PathMatch::Prefix("/".to_owned()),
            _ => {
                return Err(field_error(
                    "routes",
                    format!("{name}: set only one of path_prefix, path_exact, path_regex"),
                ))
            }
        };
    let methods = raw.methods.map(|m| parse_methods("routes", m)).transpose()?;
    let percentage = raw.percentage.unwrap_or(100.0);
    if !valid_percentage(percentage) {
        return Err(field_error(
            "routes",
            format!("{name}: percentage must be between 0 and 100, got {percentage}"),
        ));
    }
    let in_progress_wait = raw
        .in_progress_wait
        .map(|text| parse_wait("routes", &text).map_err(|e| field_error("routes", format!("{name}: {e}"))))
        .transpose()?;
    Ok(RouteRule {
        name,
        path,
        methods,
        mode: raw.mode,
        percentage,
        exclude_fields: json_pointers("routes", raw.exclude_fields)?,
        in_progress_wait,
        track_streaming: raw.track_streaming,
        record_mode: raw.record_mode,
    })
}

fn parse_scope_source(text: &str) -> Result<ScopeSource, ConfigError> {
    let (kind, argument) = match text.split_once(':') {
        Some((kind, argument)) => (kind.trim(), Some(argument.trim())),
        None => (text.trim(), None),
    };
    let source = match (kind, argument) {
        ("header", Some(name)) if !name.is_empty() && name.chars().all(is_token_char) => {
            ScopeSource::Header(name.to_ascii_lowercase())
        }
        ("authorization", None) => ScopeSource::AuthorizationHash,
        ("peer_principal", None) => ScopeSource::PeerPrincipal,
        ("jwt_claim", Some(claim)) if !claim.is_empty() => ScopeSource::JwtClaim(claim.to_owned()),
        _ => {
            return Err(field_error(
                "scope_from",
                format!(
                    "{text:?} is not a scope source; use \"header:<name>\", \"authorization\", \"peer_principal\" or \"jwt_claim:<claim>\""
                ),
            ))
        }
    };
    Ok(source)
}

fn is_token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c)
}

fn header_names(field: &'static str, names: Vec<String>) -> Result<Vec<String>, ConfigError> {
    names
        .into_iter()
        .map(|name| {
            let lower = name.trim().to_ascii_lowercase();
            if lower.is_empty() || !lower.chars().all(is_token_char) {
                Err(field_error(field, format!("{name:?} is not a valid header name")))
            } else {
                Ok(lower)
            }
        })
        .collect()
}

impl Config {
    /// Parse and validate the plugin configuration (JSON).
    pub fn parse(bytes: &[u8]) -> Result<Config, ConfigError> {
        let deserializer = &mut serde_json::Deserializer::from_slice(bytes);
        let raw: RawConfig = serde_path_to_error::deserialize(deserializer).map_err(|e| {
            let path = e.path().to_string();
            if path.is_empty() || path == "." {
                ConfigError::Syntax(e.into_inner().to_string())
            } else {
                ConfigError::Syntax(format!("field `{path}`: {}", e.into_inner()))
            }
        })?;

        let service_name = raw
            .service_name
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .ok_or_else(|| field_error("service_name", "is required and must not be empty"))?;

        let mode = match (raw.mode, raw.require_key) {
            (Some(mode), None) => mode,
            (None, Some(true)) => Mode::Required,
            (None, Some(false)) | (None, None) => Mode::Optional,
            (Some(Mode::Required), Some(true)) => Mode::Required,
            (Some(mode), Some(true)) => {
                return Err(field_error(
                    "require_key",
                    format!("is true but `mode` is {mode:?}; set only one of them"),
                ))
            }
            (Some(Mode::Required), Some(false)) => {
                return Err(field_error(
                    "require_key",
                    "is false but `mode` is Required; set only one of them",
                ))
            }
            (Some(mode), Some(false)) => mode,
        };

        let mutating_methods: BTreeSet<String> = match raw.mutating_methods {
            None => DEFAULT_MUTATING_METHODS.iter().map(|m| (*m).to_owned()).collect(),
            Some(methods) => parse_methods("mutating_methods", methods)?,
        };

        if raw.max_key_length == 0 || raw.max_key_length > MAX_KEY_LENGTH_CEILING {
            return Err(field_error(
                "max_key_length",
                format!(
                    "must be between 1 and {MAX_KEY_LENGTH_CEILING}, got {}",
                    raw.max_key_length
                ),
            ));
        }
        let lock_timeout = parse_duration("lock_timeout", raw.lock_timeout, Duration::from_secs(300))?;
        let retention_period = parse_duration(
            "retention_period",
            raw.retention_period,
            Duration::from_secs(24 * 3600),
        )?;
        if retention_period < lock_timeout {
            return Err(field_error(
                "retention_period",
                "must be at least `lock_timeout`, or a record could vanish while its request runs",
            ));
        }
        let store_timeout = parse_duration("store_timeout", raw.store_timeout, Duration::from_millis(1000))?;
        let in_progress_wait = raw
            .in_progress_wait
            .map(|text| parse_wait("in_progress_wait", &text).map_err(|e| field_error("in_progress_wait", e)))
            .transpose()?
            .unwrap_or(DEFAULT_IN_PROGRESS_WAIT);
        if store_timeout > Duration::from_secs(60) {
            return Err(field_error("store_timeout", "must be at most 60s"));
        }
        const MAX_BODY: usize = 64 * 1024 * 1024;
        if raw.max_response_size > idempotency_wire::MAX_RECORDED_BODY {
            return Err(field_error(
                "max_response_size",
                format!(
                    "must be at most {} bytes: the store takes a recorded response of at most that size (base64 in a {}-byte request); a larger response streams through and is recorded without its body",
                    idempotency_wire::MAX_RECORDED_BODY,
                    idempotency_wire::MAX_STORE_REQUEST_BYTES
                ),
            ));
        }
        if raw.max_request_body == 0 || raw.max_request_body > MAX_BODY {
            return Err(field_error(
                "max_request_body",
                format!("must be between 1 and {MAX_BODY} bytes"),
            ));
        }

        let store_cluster = raw
            .store_cluster
            .unwrap_or_else(|| "idempotency_store".to_owned());
        if store_cluster.trim().is_empty() {
            return Err(field_error("store_cluster", "must not be empty"));
        }
        let store_authority = raw
            .store_authority
            .unwrap_or_else(|| "idempotency-store".to_owned());
        if store_authority.trim().is_empty() {
            return Err(field_error("store_authority", "must not be empty"));
        }
        let store_token = match raw.store_token {
            Some(token) if token.is_empty() => {
                return Err(field_error("store_token", "must not be empty when set"))
            }
            Some(token) if token.chars().any(|c| c.is_control() || c == ' ') => {
                return Err(field_error(
                    "store_token",
                    "must not contain spaces or control characters",
                ))
            }
            other => other,
        };

        let mut fingerprint_headers = header_names("fingerprint_headers", raw.fingerprint_headers)?;
        fingerprint_headers.sort();
        fingerprint_headers.dedup();

        // An explicit release list from before `unknown_statuses` existed (e.g. `["5xx"]`) keeps
        // its meaning: it wins over the *default* unknown list (never over an explicit one).
        let unknown_given = raw.unknown_statuses.is_some();
        let release_statuses = status_list(
            "release_statuses",
            raw.release_statuses,
            &DEFAULT_RELEASE_STATUSES,
        )?;
        let mut unknown_statuses = status_list(
            "unknown_statuses",
            raw.unknown_statuses,
            &DEFAULT_UNKNOWN_STATUSES,
        )?;
        if !unknown_given {
            unknown_statuses.retain(|unknown| !release_statuses.iter().any(|r| r.overlaps(*unknown)));
        }
        if let Some(status) = (100..=599).find(|&s| {
            release_statuses.iter().any(|m| m.matches(s)) && unknown_statuses.iter().any(|m| m.matches(s))
        }) {
            return Err(field_error(
                "unknown_statuses",
                format!("status {status} is also in `release_statuses`: a status either proves the work was not done or proves nothing, remove it from one list"),
            ));
        }
        let release_grpc_statuses = grpc_status_list(
            "release_grpc_statuses",
            raw.release_grpc_statuses,
            &crate::grpc::DEFAULT_RELEASE_STATUSES,
        )?;
        let unknown_grpc_given = raw.unknown_grpc_statuses.is_some();
        let mut unknown_grpc_statuses = grpc_status_list(
            "unknown_grpc_statuses",
            raw.unknown_grpc_statuses,
            &crate::grpc::DEFAULT_UNKNOWN_STATUSES,
        )?;
        if !unknown_grpc_given {
            unknown_grpc_statuses.retain(|code| !release_grpc_statuses.contains(code));
        }
        if let Some(status) = release_grpc_statuses
            .iter()
            .find(|s| unknown_grpc_statuses.contains(s))
        {
            return Err(field_error(
                "unknown_grpc_statuses",
                format!("gRPC status {status} is also in `release_grpc_statuses`: remove it from one list"),
            ));
        }
        let replay_header_denylist = match raw.replay_header_denylist {
            None => DEFAULT_REPLAY_DENYLIST.iter().map(|h| (*h).to_owned()).collect(),
            Some(list) => header_names("replay_header_denylist", list)?
                .into_iter()
                .collect(),
        };

        let routes = raw
            .routes
            .into_iter()
            .enumerate()
            .map(|(i, r)| parse_route(i, r))
            .collect::<Result<Vec<_>, _>>()?;
        let scope_from = raw
            .scope_from
            .iter()
            .map(|s| parse_scope_source(s))
            .collect::<Result<Vec<_>, _>>()?;
        let scope_secret = raw.scope_secret.filter(|secret| !secret.is_empty());
        let keyed = scope_from.contains(&ScopeSource::AuthorizationHash);
        match &scope_secret {
            None if keyed => {
                return Err(field_error(
                    "scope_secret",
                    "is required with `scope_from: authorization` (the scope is an HMAC of the credential; an unkeyed hash of a password can be guessed offline)",
                ))
            }
            Some(secret) if secret.len() < 16 => {
                return Err(field_error("scope_secret", "must be at least 16 characters"))
            }
            _ => {}
        }
        let jwt_payload_metadata_key = raw
            .jwt_payload_metadata_key
            .unwrap_or_else(|| "jwt_payload".to_owned());
        if jwt_payload_metadata_key.trim().is_empty() {
            return Err(field_error("jwt_payload_metadata_key", "must not be empty"));
        }
        let route_metadata_namespace = raw
            .route_metadata_namespace
            .unwrap_or_else(|| "idempotency".to_owned());
        if route_metadata_namespace.trim().is_empty() {
            return Err(field_error("route_metadata_namespace", "must not be empty"));
        }

        Ok(Config {
            service_name,
            mode,
            only_mutating: raw.only_mutating,
            mutating_methods,
            max_key_length: raw.max_key_length,
            lock_timeout,
            in_progress_wait,
            record_mode: raw.record_mode,
            retention_period,
            max_response_size: raw.max_response_size,
            block_router_retries: raw.block_router_retries,
            max_request_body: raw.max_request_body,
            failure_mode: raw.failure_mode,
            store_cluster,
            store_authority,
            store_token,
            store_timeout,
            fingerprint_headers,
            release_statuses,
            unknown_statuses,
            release_grpc_statuses,
            unknown_grpc_statuses,
            streaming_methods: raw
                .streaming_methods
                .into_iter()
                .map(|path| {
                    if path.starts_with('/') && path.matches('/').count() == 2 {
                        Ok(path)
                    } else {
                        Err(field_error(
                            "streaming_methods",
                            format!("{path:?} is not a gRPC method path like \"/package.Service/Method\""),
                        ))
                    }
                })
                .collect::<Result<_, _>>()?,
            replay_header_denylist,
            routes,
            scope_from,
            scope_secret,
            jwt_payload_metadata_key,
            json_canonical: raw.json_canonical,
            exclude_fields: json_pointers("exclude_fields", raw.exclude_fields)?,
            route_metadata_namespace,
            stats_service_tag: raw.stats_service_tag,
            replay_cache_max_entries: raw.replay_cache_max_entries,
            replay_cache_max_bytes: raw.replay_cache_max_bytes,
            replay_cache_ttl: parse_duration(
                "replay_cache_ttl",
                raw.replay_cache_ttl,
                Duration::from_secs(600),
            )?
            .min(retention_period),
            store_batch_max_calls: bounded(
                "store_batch_max_calls",
                raw.store_batch_max_calls,
                MAX_STORE_BATCH_CALLS,
            )?,
            store_max_calls_in_flight: bounded(
                "store_max_calls_in_flight",
                raw.store_max_calls_in_flight,
                MAX_STORE_CALLS_IN_FLIGHT,
            )?,
        })
    }
}

/// A count between 1 and `max`.
fn bounded(field: &'static str, value: usize, max: usize) -> Result<usize, ConfigError> {
    if (1..=max).contains(&value) {
        Ok(value)
    } else {
        Err(field_error(
            field,
            format!("must be between 1 and {max}, got {value}"),
        ))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The configuration other modules' tests start from: service `orders` plus `extra` fields
    /// (e.g. `,"mode":"required"`).
    pub(crate) fn orders(extra: &str) -> Config {
        parsed(&format!(r#"{{"service_name":"orders"{extra}}}"#))
    }

    /// `json` parsed, asserting it is valid.
    fn parsed(json: &str) -> Config {
        crate::mock::succeeded(Config::parse(json.as_bytes()))
    }

    /// Why `json` is refused, asserting it is.
    fn refused(json: &str) -> String {
        crate::mock::error_text(Config::parse(json.as_bytes()))
    }

    #[test]
    fn store_batching_is_on_by_default_and_bounded() {
        let config = parsed(r#"{"service_name":"orders"}"#);
        assert_eq!(
            (config.store_batch_max_calls, config.store_max_calls_in_flight),
            (64, 1)
        );
        let off = parsed(r#"{"service_name":"orders","store_batch_max_calls":1}"#);
        assert_eq!(off.store_batch_max_calls, 1);
        for (field, value) in [
            ("store_batch_max_calls", 0),
            ("store_batch_max_calls", 257),
            ("store_max_calls_in_flight", 0),
        ] {
            let error = refused(&format!(r#"{{"service_name":"orders","{field}":{value}}}"#));
            assert!(error.to_string().contains(field), "{error}");
        }
    }

    #[test]
    fn minimal_config_takes_the_seed_defaults() {
        let config = parsed(r#"{"service_name":"orders"}"#);
        assert_eq!(config.mode, Mode::Optional);
        assert!(config.only_mutating);
        assert_eq!(config.max_key_length, 255);
        assert_eq!(config.lock_timeout, Duration::from_secs(300));
        assert_eq!(config.retention_period, Duration::from_secs(86_400));
        assert_eq!(config.max_response_size, 1_048_576);
        assert_eq!(config.failure_mode, FailureMode::Closed);
        assert!(config.acts_on_method("POST") && !config.acts_on_method("GET"));
        for released in [408, 425, 429, 500, 503] {
            assert_eq!(
                config.judge_status(released),
                StatusVerdict::Release,
                "{released}"
            );
        }
        for unknown in [502, 504] {
            assert_eq!(config.judge_status(unknown), StatusVerdict::Unknown, "{unknown}");
        }
        for stored in [200, 201, 404, 409, 422, 501] {
            assert_eq!(config.judge_status(stored), StatusVerdict::Store, "{stored}");
        }
    }

    #[test]
    fn record_mode_is_write_ahead_unless_async_is_chosen_and_names_its_field_when_wrong() {
        assert_eq!(
            parsed(r#"{"service_name":"o"}"#).record_mode,
            RecordMode::WriteAhead
        );
        let config = parsed(
            r#"{"service_name":"o","record_mode":"async","routes":[{"path_prefix":"/pay","mode":"required","record_mode":"write_ahead"}]}"#,
        );
        assert_eq!(config.record_mode, RecordMode::Async);
        assert_eq!(config.routes[0].record_mode, Some(RecordMode::WriteAhead));
        let err = refused(r#"{"service_name":"o","record_mode":"later"}"#);
        assert!(err.to_string().contains("`record_mode`"), "{err}");
        assert!(
            err.to_string().contains("write_ahead"),
            "lists the choices: {err}"
        );
        let err = refused(r#"{"service_name":"o","routes":[{"mode":"optional","record_mode":"sync"}]}"#);
        assert!(err.to_string().contains("record_mode"), "{err}");
    }

    #[test]
    fn require_key_true_means_required_mode() {
        assert_eq!(
            parsed(r#"{"service_name":"o","require_key":true}"#).mode,
            Mode::Required
        );
    }

    #[test]
    fn conflicting_mode_and_require_key_names_the_field() {
        let err = refused(r#"{"service_name":"o","require_key":true,"mode":"shadow"}"#);
        assert!(err.to_string().contains("`require_key`"), "{err}");
    }

    #[test]
    fn unknown_field_is_refused_by_name() {
        let err = refused(r#"{"service_name":"o","requir_key":true}"#);
        assert!(err.to_string().contains("requir_key"), "{err}");
    }

    #[test]
    fn a_max_response_size_the_store_would_refuse_to_record_is_refused_at_load() {
        let err = refused(r#"{"service_name":"o","max_response_size":67108864}"#);
        assert!(
            err.contains("`max_response_size`") && err.contains("8388608"),
            "{err}"
        );
        let config = parsed(r#"{"service_name":"o","max_response_size":8388608}"#);
        assert_eq!(config.max_response_size, idempotency_wire::MAX_RECORDED_BODY);
    }

    #[test]
    fn missing_service_name_is_refused_by_name() {
        let err = refused(r#"{}"#);
        assert!(err.to_string().contains("`service_name`"), "{err}");
    }

    #[test]
    fn bad_duration_names_the_field() {
        let err = refused(r#"{"service_name":"o","lock_timeout":"five minutes"}"#);
        assert!(err.to_string().contains("`lock_timeout`"), "{err}");
        let err = refused(r#"{"service_name":"o","lock_timeout":"0s"}"#);
        assert!(err.to_string().contains("`lock_timeout`"), "{err}");
    }

    #[test]
    fn wrong_type_is_refused_with_the_field_name() {
        let err = refused(r#"{"service_name":"o","max_key_length":"long"}"#);
        assert!(
            err.to_string().contains("max_key_length") || err.to_string().contains("invalid type"),
            "{err}"
        );
        let err = refused(r#"{"service_name":"o","failure_mode":"sideways"}"#);
        assert!(err.to_string().contains("sideways"), "{err}");
    }

    #[test]
    fn out_of_range_values_name_the_field() {
        for (json, field) in [
            (r#"{"service_name":"o","max_key_length":0}"#, "max_key_length"),
            (
                r#"{"service_name":"o","release_statuses":["6xx"]}"#,
                "release_statuses",
            ),
            (
                r#"{"service_name":"o","fingerprint_headers":["bad header"]}"#,
                "fingerprint_headers",
            ),
            (
                r#"{"service_name":"o","lock_timeout":"2h","retention_period":"1h"}"#,
                "retention_period",
            ),
            (
                r#"{"service_name":"o","mutating_methods":[]}"#,
                "mutating_methods",
            ),
            (r#"{"service_name":"o","store_token":""}"#, "store_token"),
        ] {
            let err = refused(json);
            assert!(err.to_string().contains(&format!("`{field}`")), "{json}: {err}");
        }
    }

    #[test]
    fn route_rules_parse_and_bad_ones_name_the_field() {
        let config = parsed(
            r#"{"service_name":"o","routes":[
                {"name":"orders","path_prefix":"/api/v1/orders","methods":["post"],"mode":"required","percentage":25,
                 "exclude_fields":["/clientTimestamp","/meta/a~1b"]},
                {"path_regex":"^/api/v1/orders/[^/]+$","mode":"shadow"},
                {"path_exact":"/legacy","mode":"off"}]}"#,
        );
        assert_eq!(config.routes.len(), 3);
        assert_eq!(config.routes[0].percentage, 25.0);
        assert!(config.routes[1].path.matches("/api/v1/orders/ORD-1"));
        assert!(!config.routes[1].path.matches("/api/v1/orders/ORD-1/items"));
        for bad in [
            r#"{"service_name":"o","routes":[{"path_prefix":"/a","path_exact":"/a","mode":"off"}]}"#,
            r#"{"service_name":"o","routes":[{"path_regex":"(","mode":"off"}]}"#,
            r#"{"service_name":"o","routes":[{"mode":"required","percentage":101}]}"#,
            r#"{"service_name":"o","routes":[{"mode":"required","exclude_fields":["nope"]}]}"#,
            r#"{"service_name":"o","routes":[{"mode":"sometimes"}]}"#,
        ] {
            let err = refused(bad);
            assert!(err.to_string().contains("routes"), "{bad}: {err}");
        }
    }

    #[test]
    fn scope_sources_parse_and_bad_ones_name_the_field() {
        let config = parsed(
            r#"{"service_name":"o","scope_from":["header:X-Tenant-Id","jwt_claim:sub","peer_principal","authorization"],
                "scope_secret":"a-secret-of-16-chars"}"#,
        );
        assert_eq!(
            config.scope_from,
            vec![
                ScopeSource::Header("x-tenant-id".into()),
                ScopeSource::JwtClaim("sub".into()),
                ScopeSource::PeerPrincipal,
                ScopeSource::AuthorizationHash
            ]
        );
        let err = refused(r#"{"service_name":"o","scope_from":["cookie"]}"#);
        assert!(err.to_string().contains("`scope_from`"), "{err}");
        let err = refused(r#"{"service_name":"o","scope_from":["authorization"]}"#);
        assert!(err.to_string().contains("`scope_secret`"), "{err}");
        let err = refused(r#"{"service_name":"o","scope_from":["authorization"],"scope_secret":"short"}"#);
        assert!(err.to_string().contains("`scope_secret`"), "{err}");
    }

    #[test]
    fn stat_names_carry_a_sanitised_service_tag_only_when_asked() {
        let plain = parsed(r#"{"service_name":"orders.v2"}"#);
        assert_eq!(
            plain.stat_name("idempotency_hits_total"),
            "idempotency_hits_total"
        );
        let tagged = parsed(r#"{"service_name":"orders.v2","stats_service_tag":true}"#);
        assert_eq!(
            tagged.stat_name("idempotency_hits_total"),
            "idempotency_hits_total.service.orders_v2"
        );
    }

    #[test]
    fn grpc_statuses_default_to_what_each_proves_and_bad_names_are_refused() {
        let config = parsed(r#"{"service_name":"o"}"#);
        for released in [2, 8, 10, 13, 14] {
            assert_eq!(
                config.judge_grpc_status(released),
                StatusVerdict::Release,
                "{released}"
            );
        }
        for unknown in [1, 4] {
            assert_eq!(
                config.judge_grpc_status(unknown),
                StatusVerdict::Unknown,
                "{unknown}"
            );
        }
        for stored in [0, 3, 5, 6, 9, 12] {
            assert_eq!(config.judge_grpc_status(stored), StatusVerdict::Store, "{stored}");
        }
        let custom = parsed(r#"{"service_name":"o","release_grpc_statuses":["UNAVAILABLE","10"]}"#);
        assert_eq!(custom.release_grpc_statuses, vec![14, 10]);
        let err = refused(r#"{"service_name":"o","release_grpc_statuses":["SOMETIMES"]}"#);
        assert!(err.to_string().contains("`release_grpc_statuses`"), "{err}");
        let err = refused(
            r#"{"service_name":"o","release_grpc_statuses":["DEADLINE_EXCEEDED"],"unknown_grpc_statuses":["DEADLINE_EXCEEDED"]}"#,
        );
        assert!(err.to_string().contains("`unknown_grpc_statuses`"), "{err}");
        let err = refused(r#"{"service_name":"o","unknown_grpc_statuses":["NOPE"]}"#);
        assert!(err.to_string().contains("`unknown_grpc_statuses`"), "{err}");
    }

    #[test]
    fn release_statuses_accept_codes_and_classes() {
        let config = parsed(r#"{"service_name":"o","release_statuses":["503","4xx"]}"#);
        assert_eq!(config.judge_status(503), StatusVerdict::Release);
        assert_eq!(config.judge_status(404), StatusVerdict::Release);
        assert_eq!(config.judge_status(500), StatusVerdict::Store);
        assert_eq!(config.judge_status(201), StatusVerdict::Store);
    }

    #[test]
    fn an_explicit_release_list_wins_over_the_default_unknown_one_but_not_over_an_explicit_one() {
        // A configuration written before `unknown_statuses` ("5xx" released) keeps working.
        let config = parsed(r#"{"service_name":"o","release_statuses":["5xx"]}"#);
        assert_eq!(config.judge_status(504), StatusVerdict::Release);
        let config =
            parsed(r#"{"service_name":"o","release_grpc_statuses":["DEADLINE_EXCEEDED","UNAVAILABLE"]}"#);
        assert_eq!(config.judge_grpc_status(4), StatusVerdict::Release);
        assert_eq!(
            config.judge_grpc_status(1),
            StatusVerdict::Unknown,
            "CANCELLED stays unknown"
        );
        // Both written: a status in both is refused, named.
        let err = refused(r#"{"service_name":"o","release_statuses":["5xx"],"unknown_statuses":["504"]}"#);
        let text = err.to_string();
        assert!(
            text.contains("`unknown_statuses`") && text.contains("504"),
            "{text}"
        );
        let config = parsed(r#"{"service_name":"o","release_statuses":["5xx"],"unknown_statuses":[]}"#);
        assert_eq!(config.judge_status(504), StatusVerdict::Release);
        let err = refused(r#"{"service_name":"o","unknown_statuses":["5x"]}"#);
        assert!(err.to_string().contains("`unknown_statuses`"), "{err}");
    }
}
