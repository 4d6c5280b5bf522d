//! Reading one field or list: durations, statuses, methods, JSON pointers, header names,
//! scope sources, route rules; and the defaults and bounds they are checked against.

use std::collections::BTreeSet;
use std::time::Duration;

use super::raw::RawRouteRule;
#[allow(clippy::wildcard_imports)] // the config module's types
use super::*;

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
pub(super) fn parse_wait(field: &'static str, text: &str) -> Result<Duration, String> {
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

pub(super) fn parse_duration(
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

pub(super) fn parse_status_matcher(field: &'static str, text: &str) -> Result<StatusMatcher, ConfigError> {
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
pub(super) fn status_list(
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
pub(super) fn grpc_status_list(
    field: &'static str,
    raw: Option<Vec<String>>,
    default: &[u32],
) -> Result<Vec<u32>, ConfigError> {
    match raw {
        None => Ok(default.to_vec()),
        Some(list) => list
            .iter()
            .map(|s| {
                crate::reply::grpc::parse_code(s).ok_or_else(|| {
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
pub(super) const DEFAULT_RELEASE_STATUSES: [StatusMatcher; 5] = [
    StatusMatcher::Exact(408),
    StatusMatcher::Exact(425),
    StatusMatcher::Exact(429),
    StatusMatcher::Exact(500),
    StatusMatcher::Exact(503),
];

/// The default `unknown_statuses`: a gateway in front of the app gave up waiting.
pub(super) const DEFAULT_UNKNOWN_STATUSES: [StatusMatcher; 2] =
    [StatusMatcher::Exact(502), StatusMatcher::Exact(504)];

pub(super) fn parse_methods(
    field: &'static str,
    methods: Vec<String>,
) -> Result<BTreeSet<String>, ConfigError> {
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
pub(super) fn json_pointers(field: &'static str, pointers: Vec<String>) -> Result<Vec<String>, ConfigError> {
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

pub(super) fn parse_route(index: usize, raw: RawRouteRule) -> Result<RouteRule, ConfigError> {
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

pub(super) fn parse_scope_source(text: &str) -> Result<ScopeSource, ConfigError> {
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

pub(super) fn is_token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c)
}

pub(super) fn header_names(field: &'static str, names: Vec<String>) -> Result<Vec<String>, ConfigError> {
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

/// A count between 1 and `max`.
pub(super) fn bounded(field: &'static str, value: usize, max: usize) -> Result<usize, ConfigError> {
    if (1..=max).contains(&value) {
        Ok(value)
    } else {
        Err(field_error(
            field,
            format!("must be between 1 and {max}, got {value}"),
        ))
    }
}
