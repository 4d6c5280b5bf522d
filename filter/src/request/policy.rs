//! Which mode applies to a request: route rules, then Envoy route metadata, then the percentage
//! of keys (stable by key hash) that is enforced while the rest runs in shadow.

use sha2::{Digest, Sha256};

use crate::config::{Config, Mode, RecordMode};
use crate::request::metadata::RouteOverrides;

/// The policy for one request, before the key is known.
#[derive(Debug, Clone, PartialEq)]
pub struct RoutePolicy<'a> {
    /// Mode of the matching rule (or the service default), after route-metadata overrides.
    pub mode: Mode,
    /// Share of keys enforced (0..=100); the others run in shadow.
    pub percentage: f64,
    /// Name of the matching rule, for logs.
    pub rule: &'a str,
    /// Extra JSON pointers excluded from the fingerprint on this route.
    pub exclude_fields: &'a [String],
    /// How long a retry of an in-progress key may wait for the first attempt.
    pub in_progress_wait: std::time::Duration,
    /// The matching rule opts client- and bidi-streaming gRPC methods in.
    pub track_streaming: bool,
    /// Whether the response waits for its record (the rule's `record_mode`, else the plugin's).
    pub record_mode: RecordMode,
}

/// The policy for `method` and `path` (query string ignored), or `None` when the filter does not
/// act on this request at all.
pub fn route_policy<'a>(
    config: &'a Config,
    method: &str,
    path: &str,
    overrides: Option<&RouteOverrides>,
) -> Option<RoutePolicy<'a>> {
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    let rule = config.policy.routes.iter().find(|rule| {
        let method_matches = match &rule.methods {
            Some(methods) => methods.contains(method),
            None => config.policy.acts_on_method(method),
        };
        method_matches && rule.path.matches(path)
    });
    let mut policy = match rule {
        Some(rule) => RoutePolicy {
            mode: rule.mode,
            percentage: rule.percentage,
            rule: &rule.name,
            exclude_fields: &rule.exclude_fields,
            in_progress_wait: rule.in_progress_wait.unwrap_or(config.records.in_progress_wait),
            track_streaming: rule.track_streaming,
            record_mode: rule.record_mode.unwrap_or(config.records.record_mode),
        },
        None if config.policy.acts_on_method(method) => RoutePolicy {
            mode: config.policy.mode,
            percentage: 100.0,
            rule: "default",
            exclude_fields: &[],
            in_progress_wait: config.records.in_progress_wait,
            track_streaming: false,
            record_mode: config.records.record_mode,
        },
        None => return None,
    };
    if let Some(overrides) = overrides {
        if let Some(mode) = overrides.mode {
            policy.mode = mode;
        }
        if let Some(percentage) = overrides.percentage {
            policy.percentage = percentage;
        }
    }
    (policy.mode != Mode::Off).then_some(policy)
}

/// True when `key` falls in the enforced `percentage` of keys. Stable: the same key always lands
/// in the same bucket, so a client's retries are all enforced or all shadowed.
pub fn key_is_enforced(key: &str, percentage: f64) -> bool {
    if percentage >= 100.0 {
        return true;
    }
    if percentage <= 0.0 {
        return false;
    }
    let digest = Sha256::digest(key.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(digest.get(..8).unwrap_or(&[0; 8]));
    let bucket = u64::from_be_bytes(first) % 10_000;
    (bucket as f64) < percentage * 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> Config {
        crate::mock::succeeded(Config::parse(json.as_bytes()))
    }

    #[test]
    fn first_matching_rule_wins_and_unmatched_mutations_use_the_default() {
        let c = config(
            r#"{"service_name":"o","mode":"optional","routes":[
                {"name":"payments","path_prefix":"/payments","mode":"required"},
                {"name":"legacy","path_exact":"/legacy","mode":"off"},
                {"name":"reports","path_prefix":"/reports","methods":["GET"],"mode":"shadow"}]}"#,
        );
        assert_eq!(
            route_policy(&c, "POST", "/payments/1?x=y", None).map(|p| p.rule),
            Some("payments")
        );
        assert!(route_policy(&c, "POST", "/legacy", None).is_none(), "off");
        assert_eq!(
            route_policy(&c, "POST", "/orders", None).map(|p| p.mode),
            Some(Mode::Optional)
        );
        assert!(route_policy(&c, "GET", "/orders", None).is_none(), "not mutating");
        assert_eq!(
            route_policy(&c, "GET", "/reports/x", None).map(|p| p.mode),
            Some(Mode::Shadow),
            "rule methods"
        );
    }

    #[test]
    fn route_metadata_overrides_mode_and_percentage() {
        let c = config(r#"{"service_name":"o"}"#);
        let overrides = RouteOverrides {
            mode: Some(Mode::Required),
            percentage: Some(10.0),
        };
        assert_eq!(
            route_policy(&c, "POST", "/x", Some(&overrides)).map(|p| (p.mode, p.percentage)),
            Some((Mode::Required, 10.0))
        );
        let off = RouteOverrides {
            mode: Some(Mode::Off),
            percentage: None,
        };
        assert!(route_policy(&c, "POST", "/x", Some(&off)).is_none());
    }

    #[test]
    fn percentage_splits_keys_stably_and_roughly_evenly() {
        let keys: Vec<String> = (0..4000).map(|i| format!("key-{i}")).collect();
        let enforced = keys.iter().filter(|k| key_is_enforced(k, 25.0)).count();
        assert!((800..1200).contains(&enforced), "{enforced} of 4000 at 25%");
        for key in &keys {
            assert_eq!(key_is_enforced(key, 25.0), key_is_enforced(key, 25.0));
            // Raising the percentage never un-enforces a key.
            assert!(!key_is_enforced(key, 25.0) || key_is_enforced(key, 50.0));
        }
        assert!(keys.iter().all(|k| key_is_enforced(k, 100.0)));
        assert!(!keys.iter().any(|k| key_is_enforced(k, 0.0)));
    }
}
