//! The configuration exactly as the operator wrote it (serde types), and the defaults of its
//! fields.

use serde::Deserialize;

#[allow(clippy::wildcard_imports)] // the config module's types
use super::*;

/// The configuration exactly as written by the operator.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) service_name: Option<String>,
    pub(super) mode: Option<Mode>,
    pub(super) require_key: Option<bool>,
    #[serde(default = "default_true")]
    pub(super) only_mutating: bool,
    pub(super) mutating_methods: Option<Vec<String>>,
    #[serde(default = "default_max_key_length")]
    pub(super) max_key_length: usize,
    pub(super) lock_timeout: Option<String>,
    pub(super) in_progress_wait: Option<String>,
    #[serde(default)]
    pub(super) record_mode: RecordMode,
    pub(super) retention_period: Option<String>,
    #[serde(default = "default_body_limit")]
    pub(super) max_response_size: usize,
    #[serde(default = "default_body_limit")]
    pub(super) max_request_body: usize,
    #[serde(default = "default_failure_mode")]
    pub(super) failure_mode: FailureMode,
    #[serde(default = "default_true")]
    pub(super) block_router_retries: bool,
    pub(super) store_cluster: Option<String>,
    pub(super) store_authority: Option<String>,
    pub(super) store_token: Option<String>,
    pub(super) store_timeout: Option<String>,
    #[serde(default)]
    pub(super) fingerprint_headers: Vec<String>,
    pub(super) release_statuses: Option<Vec<String>>,
    pub(super) unknown_statuses: Option<Vec<String>>,
    pub(super) release_grpc_statuses: Option<Vec<String>>,
    pub(super) unknown_grpc_statuses: Option<Vec<String>>,
    #[serde(default)]
    pub(super) streaming_methods: Vec<String>,
    pub(super) replay_header_denylist: Option<Vec<String>>,
    #[serde(default)]
    pub(super) routes: Vec<RawRouteRule>,
    #[serde(default)]
    pub(super) scope_from: Vec<String>,
    pub(super) scope_secret: Option<String>,
    pub(super) jwt_payload_metadata_key: Option<String>,
    #[serde(default = "default_true")]
    pub(super) json_canonical: bool,
    #[serde(default)]
    pub(super) exclude_fields: Vec<String>,
    pub(super) route_metadata_namespace: Option<String>,
    #[serde(default)]
    pub(super) stats_service_tag: bool,
    #[serde(default = "default_cache_entries")]
    pub(super) replay_cache_max_entries: usize,
    #[serde(default = "default_cache_bytes")]
    pub(super) replay_cache_max_bytes: usize,
    pub(super) replay_cache_ttl: Option<String>,
    #[serde(default = "default_batch_max_calls")]
    pub(super) store_batch_max_calls: usize,
    #[serde(default = "default_calls_in_flight")]
    pub(super) store_max_calls_in_flight: usize,
}

pub(super) fn default_batch_max_calls() -> usize {
    64
}
pub(super) fn default_calls_in_flight() -> usize {
    1
}
pub(super) fn default_cache_entries() -> usize {
    10_000
}
pub(super) fn default_cache_bytes() -> usize {
    4 * 1024 * 1024
}

/// One route rule as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRouteRule {
    pub(super) name: Option<String>,
    pub(super) path_prefix: Option<String>,
    pub(super) path_exact: Option<String>,
    pub(super) path_regex: Option<String>,
    pub(super) methods: Option<Vec<String>>,
    pub(super) mode: Mode,
    pub(super) percentage: Option<f64>,
    #[serde(default)]
    pub(super) exclude_fields: Vec<String>,
    pub(super) in_progress_wait: Option<String>,
    #[serde(default)]
    pub(super) track_streaming: bool,
    pub(super) record_mode: Option<RecordMode>,
}

pub(super) fn default_true() -> bool {
    true
}
pub(super) fn default_max_key_length() -> usize {
    255
}
pub(super) fn default_body_limit() -> usize {
    1024 * 1024
}

pub(super) fn default_failure_mode() -> FailureMode {
    FailureMode::Closed
}
