//! The admission step: from the request head alone, decide whether the filter acts on a request
//! (pass through, refuse with 400/413, or track it) — pure, no host calls but the two lookups it
//! is handed, so every rule is testable without the mock host.

use std::time::Duration;

use idempotency_wire::RecordId;

use crate::config::{Config, Mode, RecordMode};
use crate::metrics::Counter;
use crate::reply::cache::RequestParts;
use crate::reply::problem::{ErrorCode, Problem};
use crate::request::fingerprint::is_json_content_type;
use crate::request::key::{parse_key, KeyError};
use crate::request::metadata::RouteOverrides;
use crate::request::policy::{key_is_enforced, route_policy};
use crate::request::scope::resolve_scope;

/// A keyed request the filter tracks: everything needed to fingerprint and acquire it.
#[derive(Debug, Clone, PartialEq)]
pub struct Pending {
    /// The record identity.
    pub id: RecordId,
    /// Request method.
    pub method: String,
    /// Request path with query.
    pub path: String,
    /// The configured fingerprint headers present on the request, with their exact bytes.
    pub fingerprint_headers: Vec<(String, Vec<u8>)>,
    /// Canonicalise the body as JSON before hashing.
    pub json: bool,
    /// JSON pointers removed before hashing.
    pub exclude_fields: Vec<String>,
    /// Shadow: record and count, never block or answer.
    pub shadow: bool,
    /// How long the store may hold the acquire while the key is in progress.
    pub in_progress_wait: Duration,
    /// Whether the response waits for its record to be written.
    pub record_mode: RecordMode,
    /// A gRPC request (`application/grpc*`).
    pub grpc: bool,
    /// The caller asked Envoy for retries or hedging (one of `CALLER_RETRY_HEADERS`), which
    /// `block_router_retries` removes.
    pub caller_retry_headers: bool,
}

impl Pending {
    /// The parts the fingerprint is computed from, with the request's `body`.
    pub fn parts<'a>(&'a self, body: &'a [u8]) -> RequestParts<'a> {
        RequestParts {
            method: &self.method,
            path: &self.path,
            headers: &self.fingerprint_headers,
            json: self.json,
            exclude_fields: &self.exclude_fields,
            body,
        }
    }
}

/// What to do with a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Not ours, or shadowed without a key: let it through untouched.
    PassThrough,
    /// Answer with this error; the upstream is never called.
    Refuse(Problem),
    /// Track it: buffer the body, fingerprint, acquire.
    Track(Pending),
}

/// A decision and the counters it moves.
#[derive(Debug, Clone, PartialEq)]
pub struct Admission {
    /// Counters to add one to.
    pub counters: Vec<Counter>,
    /// The decision.
    pub decision: Decision,
}

impl Admission {
    fn pass(counters: Vec<Counter>) -> Admission {
        Admission {
            counters,
            decision: Decision::PassThrough,
        }
    }

    fn refuse(counters: Vec<Counter>, problem: Problem) -> Admission {
        Admission {
            counters,
            decision: Decision::Refuse(problem),
        }
    }
}

/// Decide for a request with `headers` (pseudo-headers included, names lower case).
/// `overrides` reads the route's metadata, `property` an Envoy property and `header_bytes` every
/// value of a header as exact bytes; each is called only when needed (a non-mutating request
/// costs none, and `header_bytes` is read only for a scope or fingerprint header whose text shows
/// U+FFFD).
pub fn admit(
    config: &Config,
    headers: &[(String, String)],
    overrides: impl FnOnce() -> Option<RouteOverrides>,
    property: impl Fn(&[&str]) -> Option<Vec<u8>>,
    header_bytes: impl Fn(&str) -> Option<Vec<Vec<u8>>>,
) -> Admission {
    let header = |wanted: &str| headers.iter().find(|(n, _)| n == wanted).map(|(_, v)| v.as_str());
    let identity_header = |name: &str| identity_header(headers, name, &header_bytes);
    let method = header(":method").unwrap_or_default();
    let path = header(":path").unwrap_or_default();
    let candidate = config.policy.acts_on_method(method)
        || config
            .policy
            .routes
            .iter()
            .any(|r| r.methods.as_ref().is_some_and(|m| m.contains(method)));
    if !candidate {
        return Admission::pass(Vec::new());
    }
    // No shortcut for `mode: off`: Envoy route metadata may still turn a route on.
    let overrides = overrides();
    let Some(policy) = route_policy(config, method, path, overrides.as_ref()) else {
        return Admission::pass(Vec::new());
    };
    let grpc = crate::reply::grpc::is_grpc(header("content-type"));
    if grpc && !policy.track_streaming && config.policy.streaming_methods.contains(path) {
        // Buffering a bidi stream's request would deadlock it: untracked unless opted in.
        return Admission::pass(vec![Counter::GrpcStreamingUntracked]);
    }

    let mut keys = headers
        .iter()
        .filter(|(n, _)| n == "idempotency-key")
        .map(|(_, v)| v.as_str());
    let parsed = match (keys.next(), keys.next()) {
        (None, _) => {
            return match policy.mode {
                Mode::Required if policy.percentage < 100.0 => {
                    Admission::pass(vec![Counter::KeyMissing, Counter::ShadowWouldReject])
                }
                Mode::Required => Admission::refuse(
                    vec![Counter::KeyMissing],
                    Problem::new(
                        ErrorCode::KeyRequired,
                        format!("{method} requests to this endpoint require an Idempotency-Key header"),
                    )
                    .detail("header", "Idempotency-Key"),
                ),
                _ => Admission::pass(vec![Counter::KeyMissing]),
            };
        }
        (Some(raw), Some(_)) => Err((KeyError::Repeated, raw)),
        (Some(raw), None) => parse_key(raw, config.limits.max_key_length).map_err(|e| (e, raw)),
    };
    let key = match parsed {
        Ok(key) => key.to_owned(),
        Err((error, raw)) => {
            if policy.mode == Mode::Shadow || !key_is_enforced(raw, policy.percentage) {
                return Admission::pass(vec![Counter::KeyInvalid, Counter::ShadowWouldReject]);
            }
            return Admission::refuse(
                vec![Counter::KeyInvalid],
                Problem::new(ErrorCode::KeyInvalid, error.to_string())
                    .detail("reason", error.reason())
                    .detail("maxLength", config.limits.max_key_length),
            );
        }
    };
    let shadow = policy.mode == Mode::Shadow || !key_is_enforced(&key, policy.percentage);

    let declared_length = header("content-length").and_then(|v| v.trim().parse::<usize>().ok());
    if declared_length.is_some_and(|length| length > config.limits.max_request_body) {
        if shadow {
            return Admission::pass(vec![Counter::ShadowWouldReject]);
        }
        return Admission::refuse(Vec::new(), too_large(config.limits.max_request_body));
    }

    let scope = resolve_scope(
        &config.scope.sources,
        &config.scope.jwt_payload_metadata_key,
        config
            .scope
            .secret
            .as_deref()
            .map(str::as_bytes)
            .unwrap_or_default(),
        identity_header,
        property,
    );
    let fingerprint_headers = config
        .fingerprint
        .headers
        .iter()
        .filter_map(|name| identity_header(name).map(|v| (name.clone(), v)))
        .collect();
    let json = config.fingerprint.json_canonical && header("content-type").is_some_and(is_json_content_type);
    let exclude_fields = config
        .fingerprint
        .exclude_fields
        .iter()
        .chain(policy.exclude_fields.iter())
        .cloned()
        .collect();
    Admission {
        counters: Vec::new(),
        decision: Decision::Track(Pending {
            id: RecordId {
                service: config.service_name.clone(),
                scope,
                key,
            },
            method: method.to_owned(),
            path: path.to_owned(),
            fingerprint_headers,
            json,
            exclude_fields,
            shadow,
            in_progress_wait: policy.in_progress_wait,
            record_mode: policy.record_mode,
            grpc,
            caller_retry_headers: headers.iter().any(|(name, _)| {
                crate::request::retry_headers::CALLER_RETRY_HEADERS.contains(&name.as_str())
            }),
        }),
    }
}

/// A header that decides the record's identity (a scope or fingerprint header), as bytes:
/// every field line's value, joined with `, ` as HTTP combines them (RFC 9110 §5.3), so a
/// second line counts as much as the first. Text that shows U+FFFD may stand for bytes that are
/// not UTF-8, and two such values must not scope or fingerprint alike: then the exact bytes are
/// read. `None` when the request has no such header.
fn identity_header(
    headers: &[(String, String)],
    name: &str,
    header_bytes: impl Fn(&str) -> Option<Vec<Vec<u8>>>,
) -> Option<Vec<u8>> {
    let values: Vec<&str> = headers
        .iter()
        .filter(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
        .collect();
    if values.is_empty() {
        return None;
    }
    if values.iter().any(|v| v.contains(char::REPLACEMENT_CHARACTER)) {
        if let Some(exact) = header_bytes(name).filter(|exact| !exact.is_empty()) {
            return Some(exact.join(b", ".as_slice()));
        }
    }
    Some(values.join(", ").into_bytes())
}

/// The 413 for a body over `limit` bytes.
pub fn too_large(limit: usize) -> Problem {
    Problem::new(
        ErrorCode::RequestTooLarge,
        format!("The request body is larger than {limit} bytes, the most this endpoint fingerprints"),
    )
    .detail("maxBytes", limit)
}

#[cfg(test)]
#[path = "tests/admission.rs"]
mod tests;
