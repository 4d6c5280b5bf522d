//! `Config::parse`: the raw configuration read section by section, each field checked, into a
//! `Config`. Every error names the operator's field.

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
        let mut raw: RawConfig = serde_path_to_error::deserialize(deserializer).map_err(|e| {
            let path = e.path().to_string();
            if path.is_empty() || path == "." {
                ConfigError::Syntax(e.into_inner().to_string())
            } else {
                ConfigError::Syntax(format!("field `{path}`: {}", e.into_inner()))
            }
        })?;
        let service_name = raw
            .service_name
            .take()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .ok_or_else(|| field_error("service_name", "is required and must not be empty"))?;
        let records = Records::parse(&mut raw)?;
        Ok(Config {
            service_name,
            stats_service_tag: raw.stats_service_tag,
            policy: Policy::parse(&mut raw)?,
            statuses: Statuses::parse(&mut raw)?,
            limits: Limits::parse(&raw)?,
            fingerprint: Fingerprinting::parse(&mut raw)?,
            scope: Scoping::parse(&mut raw)?,
            store: StoreSettings::parse(&mut raw)?,
            replay: ReplaySettings::parse(&mut raw, records.retention_period)?,
            records,
        })
    }
}

impl Policy {
    fn parse(raw: &mut RawConfig) -> Result<Policy, ConfigError> {
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

        let mutating_methods: BTreeSet<String> = match raw.mutating_methods.take() {
            None => DEFAULT_MUTATING_METHODS.iter().map(|m| (*m).to_owned()).collect(),
            Some(methods) => parse_methods("mutating_methods", methods)?,
        };
        let streaming_methods = std::mem::take(&mut raw.streaming_methods)
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
            .collect::<Result<_, _>>()?;
        let routes = std::mem::take(&mut raw.routes)
            .into_iter()
            .enumerate()
            .map(|(i, r)| parse_route(i, r))
            .collect::<Result<Vec<_>, _>>()?;
        let route_metadata_namespace = raw
            .route_metadata_namespace
            .take()
            .unwrap_or_else(|| "idempotency".to_owned());
        if route_metadata_namespace.trim().is_empty() {
            return Err(field_error("route_metadata_namespace", "must not be empty"));
        }
        Ok(Policy {
            mode,
            only_mutating: raw.only_mutating,
            mutating_methods,
            streaming_methods,
            routes,
            route_metadata_namespace,
            failure_mode: raw.failure_mode,
            block_router_retries: raw.block_router_retries,
        })
    }
}

impl Records {
    fn parse(raw: &mut RawConfig) -> Result<Records, ConfigError> {
        let lock_timeout = parse_duration("lock_timeout", raw.lock_timeout.take(), Duration::from_secs(300))?;
        let retention_period = parse_duration(
            "retention_period",
            raw.retention_period.take(),
            Duration::from_secs(24 * 3600),
        )?;
        if retention_period < lock_timeout {
            return Err(field_error(
                "retention_period",
                "must be at least `lock_timeout`, or a record could vanish while its request runs",
            ));
        }
        let in_progress_wait = raw
            .in_progress_wait
            .take()
            .map(|text| parse_wait("in_progress_wait", &text).map_err(|e| field_error("in_progress_wait", e)))
            .transpose()?
            .unwrap_or(DEFAULT_IN_PROGRESS_WAIT);
        Ok(Records {
            lock_timeout,
            retention_period,
            in_progress_wait,
            record_mode: raw.record_mode,
        })
    }
}

impl Statuses {
    fn parse(raw: &mut RawConfig) -> Result<Statuses, ConfigError> {
        // An explicit release list from before `unknown_statuses` existed (e.g. `["5xx"]`) keeps
        // its meaning: it wins over the *default* unknown list (never over an explicit one).
        let unknown_given = raw.unknown_statuses.is_some();
        let release_statuses = status_list(
            "release_statuses",
            raw.release_statuses.take(),
            &DEFAULT_RELEASE_STATUSES,
        )?;
        let mut unknown_statuses = status_list(
            "unknown_statuses",
            raw.unknown_statuses.take(),
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
            raw.release_grpc_statuses.take(),
            &crate::reply::grpc::DEFAULT_RELEASE_STATUSES,
        )?;
        let unknown_grpc_given = raw.unknown_grpc_statuses.is_some();
        let mut unknown_grpc_statuses = grpc_status_list(
            "unknown_grpc_statuses",
            raw.unknown_grpc_statuses.take(),
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
        Ok(Statuses {
            release: release_statuses,
            unknown: unknown_statuses,
            release_grpc: release_grpc_statuses,
            unknown_grpc: unknown_grpc_statuses,
        })
    }
}

impl Limits {
    fn parse(raw: &RawConfig) -> Result<Limits, ConfigError> {
        if raw.max_key_length == 0 || raw.max_key_length > MAX_KEY_LENGTH_CEILING {
            return Err(field_error(
                "max_key_length",
                format!(
                    "must be between 1 and {MAX_KEY_LENGTH_CEILING}, got {}",
                    raw.max_key_length
                ),
            ));
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

        Ok(Limits {
            max_key_length: raw.max_key_length,
            max_request_body: raw.max_request_body,
            max_response_size: raw.max_response_size,
        })
    }
}

impl Fingerprinting {
    fn parse(raw: &mut RawConfig) -> Result<Fingerprinting, ConfigError> {
        let mut headers = header_names(
            "fingerprint_headers",
            std::mem::take(&mut raw.fingerprint_headers),
        )?;
        headers.sort();
        headers.dedup();
        Ok(Fingerprinting {
            headers,
            json_canonical: raw.json_canonical,
            exclude_fields: json_pointers("exclude_fields", std::mem::take(&mut raw.exclude_fields))?,
        })
    }
}

impl Scoping {
    fn parse(raw: &mut RawConfig) -> Result<Scoping, ConfigError> {
        let scope_from = raw
            .scope_from
            .iter()
            .map(|s| parse_scope_source(s))
            .collect::<Result<Vec<_>, _>>()?;
        let scope_secret = raw.scope_secret.take().filter(|secret| !secret.is_empty());
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
            .take()
            .unwrap_or_else(|| "jwt_payload".to_owned());
        if jwt_payload_metadata_key.trim().is_empty() {
            return Err(field_error("jwt_payload_metadata_key", "must not be empty"));
        }
        Ok(Scoping {
            sources: scope_from,
            secret: scope_secret,
            jwt_payload_metadata_key,
        })
    }
}

impl StoreSettings {
    fn parse(raw: &mut RawConfig) -> Result<StoreSettings, ConfigError> {
        let timeout = parse_duration(
            "store_timeout",
            raw.store_timeout.take(),
            Duration::from_millis(1000),
        )?;
        if timeout > Duration::from_secs(60) {
            return Err(field_error("store_timeout", "must be at most 60s"));
        }
        let store_cluster = raw
            .store_cluster
            .take()
            .unwrap_or_else(|| "idempotency_store".to_owned());
        if store_cluster.trim().is_empty() {
            return Err(field_error("store_cluster", "must not be empty"));
        }
        let store_authority = raw
            .store_authority
            .take()
            .unwrap_or_else(|| "idempotency-store".to_owned());
        if store_authority.trim().is_empty() {
            return Err(field_error("store_authority", "must not be empty"));
        }
        let store_token = match raw.store_token.take() {
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

        Ok(StoreSettings {
            cluster: store_cluster,
            authority: store_authority,
            token: store_token,
            timeout,
            batch_max_calls: bounded(
                "store_batch_max_calls",
                raw.store_batch_max_calls,
                MAX_STORE_BATCH_CALLS,
            )?,
            max_calls_in_flight: bounded(
                "store_max_calls_in_flight",
                raw.store_max_calls_in_flight,
                MAX_STORE_CALLS_IN_FLIGHT,
            )?,
        })
    }
}

impl ReplaySettings {
    fn parse(raw: &mut RawConfig, retention_period: Duration) -> Result<ReplaySettings, ConfigError> {
        let header_denylist = match raw.replay_header_denylist.take() {
            None => DEFAULT_REPLAY_DENYLIST.iter().map(|h| (*h).to_owned()).collect(),
            Some(list) => header_names("replay_header_denylist", list)?
                .into_iter()
                .collect(),
        };
        Ok(ReplaySettings {
            header_denylist,
            cache_max_entries: raw.replay_cache_max_entries,
            cache_max_bytes: raw.replay_cache_max_bytes,
            cache_ttl: parse_duration(
                "replay_cache_ttl",
                raw.replay_cache_ttl.take(),
                Duration::from_secs(600),
            )?
            .min(retention_period),
        })
    }
}
