//! `Config::parse`: the raw configuration read field by field, each checked, into a `Config`.

use std::collections::BTreeSet;
use std::time::Duration;

#[allow(clippy::wildcard_imports)] // the config module's types and field readers
use super::fields::*;
use super::raw::RawConfig;
#[allow(clippy::wildcard_imports)]
use super::*;

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
            &crate::reply::grpc::DEFAULT_RELEASE_STATUSES,
        )?;
        let unknown_grpc_given = raw.unknown_grpc_statuses.is_some();
        let mut unknown_grpc_statuses = grpc_status_list(
            "unknown_grpc_statuses",
            raw.unknown_grpc_statuses,
            &crate::reply::grpc::DEFAULT_UNKNOWN_STATUSES,
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
