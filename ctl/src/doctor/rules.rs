//! The rules an Envoy setup must follow for the idempotency guarantee to hold, each a check over
//! the [`Setup`] that says where it fails, what a client meets, and the YAML that fixes it.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

use super::envoy::{
    filter_uses, ConnectionManager, FilterUse, Listener, RetryPolicy, Route, RouteConfiguration, Setup,
};

/// The internal headers a client must never be able to send (the filter's own; the early strip
/// removes them before route selection).
pub const INTERNAL_HEADERS: [&str; 9] = [
    "x-idempotency-record-id",
    "x-idempotency-fencing-token",
    "x-idempotency-recovery-point",
    "x-idempotency-service",
    "x-idempotency-scope",
    "x-idempotency-key",
    "x-idempotency-previous-attempt",
    "x-idempotency-replay-ticket",
    "x-idempotency-attempt-id",
];

/// Envoy's default `per_connection_buffer_limit_bytes`.
const DEFAULT_BUFFER_LIMIT: u64 = 1_048_576;
/// The filter's default `max_response_size` and `max_request_body`.
const DEFAULT_BODY_LIMIT: u64 = 1_048_576;
/// Retry conditions that prove the request was never sent: safe on a tracked route.
const SAFE_RETRY_ON: [&str; 3] = ["connect-failure", "refused-stream", "reset-before-request"];

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The guarantee does not hold as configured.
    Error,
    /// It holds, with a cost or a gap a client may meet.
    Warning,
}

/// One thing wrong.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    /// Error or warning.
    pub severity: Severity,
    /// The rule's stable name.
    pub rule: &'static str,
    /// Listener / connection manager / route / filter.
    #[serde(rename = "where")]
    pub location: String,
    /// What goes wrong for a client.
    pub problem: String,
    /// The YAML that fixes it.
    pub fix: String,
}

/// Every rule over every listener that runs the filter. No listener running it is an error.
pub fn check(setup: &Setup) -> Vec<Finding> {
    let mut findings = Vec::new();
    let mut uses_seen = 0;
    let mut vm_code: BTreeMap<String, (String, Value)> = BTreeMap::new();
    for listener in &setup.listeners {
        for manager in &listener.managers {
            let uses: Vec<FilterUse> = manager.http_filters.iter().flat_map(filter_uses).collect();
            if uses.is_empty() {
                continue;
            }
            uses_seen += uses.len();
            let at = format!("listener {} / {}", listener.name, manager.stat_prefix);
            strip_before_routing(manager, &at, &mut findings);
            let routes = route_config(setup, manager);
            for filter in &uses {
                let at = format!("{at} / filter {}", filter.name);
                filter_settings(filter, &at, &mut findings);
                composite_matcher(manager, filter, &at, &mut findings);
                buffer_limit(listener, filter, &mut findings);
                store_cluster(setup, filter, &at, &mut findings);
                if let Some(routes) = &routes {
                    route_rules(setup, routes, filter, &at, &mut findings);
                }
                shared_vm(filter, &at, &mut vm_code, &mut findings);
            }
        }
    }
    if uses_seen == 0 {
        findings.push(Finding {
            severity: Severity::Error,
            rule: "filter-present",
            location: "(whole configuration)".into(),
            problem: "no HTTP filter runs the idempotency filter (a Wasm filter whose configuration has `service_name`): keyed requests are not protected at all".into(),
            fix: "add the filter as in envoy/envoy.yaml (http_filters → composite → Wasm with the plugin configuration)".into(),
        });
    }
    findings.sort_by(|a, b| {
        a.severity
            .cmp(&b.severity)
            .then_with(|| a.location.cmp(&b.location))
    });
    findings
}

fn route_config(setup: &Setup, manager: &ConnectionManager) -> Option<RouteConfiguration> {
    if let Some(inline) = &manager.route_config {
        return Some(inline.clone());
    }
    let name = &manager.rds.as_ref()?.route_config_name;
    setup.route_configs.get(name).cloned()
}

const STRIP_FIX: &str = "typed_config:   # the HttpConnectionManager
  early_header_mutation_extensions:
    - name: strip-internal-headers
      typed_config:
        \"@type\": type.googleapis.com/envoy.extensions.http.early_header_mutation.header_mutation.v3.HeaderMutation
        mutations:
          - remove: x-idempotency-record-id
          - remove: x-idempotency-fencing-token
          - remove: x-idempotency-recovery-point
          - remove: x-idempotency-service
          - remove: x-idempotency-scope
          - remove: x-idempotency-key
          - remove: x-idempotency-previous-attempt
          - remove: x-idempotency-replay-ticket
          - remove: x-idempotency-attempt-id";

/// Client copies of the internal headers must go before route selection.
fn strip_before_routing(manager: &ConnectionManager, at: &str, findings: &mut Vec<Finding>) {
    let removed: Vec<&str> = manager
        .early_header_mutation_extensions
        .iter()
        .flat_map(|e| e.typed_config["mutations"].as_array().into_iter().flatten())
        .filter_map(|m| m["remove"].as_str())
        .collect();
    let missing: Vec<&str> = INTERNAL_HEADERS
        .iter()
        .copied()
        .filter(|h| !removed.iter().any(|r| r.eq_ignore_ascii_case(h)))
        .collect();
    if missing.is_empty() {
        return;
    }
    let stripped_late = manager
        .http_filters
        .iter()
        .any(|f| f.typed_config.to_string().contains("x-idempotency-replay-ticket"));
    let late = if stripped_late {
        " (an HTTP filter strips them, but HTTP filters run after Envoy picked the route)"
    } else {
        ""
    };
    findings.push(Finding {
        severity: Severity::Error,
        rule: "strip-before-routing",
        location: at.to_owned(),
        problem: format!(
            "a client header can route a request to the store or pose as the filter: {} not removed before route selection{late}",
            missing.join(", ")
        ),
        fix: STRIP_FIX.into(),
    });
}

fn is_replay_route(route: &Route) -> bool {
    let path = route.matcher.path.as_deref().or(route.matcher.prefix.as_deref());
    path == Some("/v1/replay")
        && route
            .matcher
            .headers
            .iter()
            .any(|h| h.name == "x-idempotency-replay-ticket")
}

const REPLAY_ROUTE_FIX: &str = "routes:   # first in the virtual host
  - match:
      path: /v1/replay
      headers:
        - { name: x-idempotency-replay-ticket, present_match: true }
        - { name: \":method\", string_match: { exact: POST } }
    route: { cluster: idempotency_store_replay, timeout: 5s }   # the store's --replay-listen, HTTP/2";

const HTTP2_FIX: &str = "typed_extension_protocol_options:   # on the replay cluster
  envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
    \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
    explicit_http_config:
      http2_protocol_options: {}";

/// The replay route, router retries and internal redirects of the routes the filter runs on.
fn route_rules(
    setup: &Setup,
    routes: &RouteConfiguration,
    filter: &FilterUse,
    at: &str,
    findings: &mut Vec<Finding>,
) {
    let blocks_retries = filter.setting("block_router_retries").and_then(Value::as_bool) != Some(false);
    for host in &routes.virtual_hosts {
        let at = format!("{at} / route config {} / virtual host {}", routes.name, host.name);
        match host.routes.iter().position(is_replay_route) {
            None => findings.push(Finding {
                severity: Severity::Warning,
                rule: "replay-route",
                location: at.clone(),
                problem: "no gRPC replay route: a keyed gRPC call that completed is sent to the service as POST /v1/replay instead of being replayed (HTTP replays are unaffected)".into(),
                fix: REPLAY_ROUTE_FIX.into(),
            }),
            Some(0) => {}
            Some(position) => findings.push(Finding {
                severity: Severity::Error,
                rule: "replay-route-first",
                location: at.clone(),
                problem: format!("the gRPC replay route is route {} of the virtual host: the routes before it can take a replay to the service", position + 1),
                fix: REPLAY_ROUTE_FIX.into(),
            }),
        }
        if let Some(replay) = host.routes.iter().find(|r| is_replay_route(r)) {
            replay_cluster(setup, replay, &at, findings);
        }
        for route in host.routes.iter().filter(|r| !is_replay_route(r)) {
            let Some(action) = &route.route else {
                continue;
            };
            let at = format!("{at} / route {}", route_label(route));
            let policy = action.retry_policy.as_ref().or(host.retry_policy.as_ref());
            if let Some(policy) = policy {
                router_retries(policy, blocks_retries, &at, findings);
            }
            if (action.hedge_policy.is_some() || host.hedge_policy.is_some()) && !blocks_retries {
                findings.push(Finding {
                    severity: Severity::Error,
                    rule: "router-retries",
                    location: at.clone(),
                    problem: "a hedge policy with block_router_retries: false: Envoy may send a tracked request twice at once".into(),
                    fix: "remove hedge_policy from tracked routes, or keep the filter's default block_router_retries: true".into(),
                });
            }
            if action.internal_redirect_policy.is_some() {
                findings.push(Finding {
                    severity: Severity::Warning,
                    rule: "internal-redirect",
                    location: at,
                    problem: "Envoy follows 3xx internally on this route: the redirected request meets the filter again with another path, so a client gets 422 and the first attempt's lock is kept until lock_timeout".into(),
                    fix: "remove internal_redirect_policy from routes that carry keyed requests (a 3xx handed to the client is recorded and replayed)".into(),
                });
            }
        }
    }
}

fn route_label(route: &Route) -> String {
    if !route.name.is_empty() {
        return route.name.clone();
    }
    match (&route.matcher.path, &route.matcher.prefix) {
        (Some(path), _) => format!("path {path}"),
        (_, Some(prefix)) => format!("prefix {prefix}"),
        _ => "(other match)".into(),
    }
}

fn router_retries(policy: &RetryPolicy, blocks_retries: bool, at: &str, findings: &mut Vec<Finding>) {
    let unsafe_conditions: Vec<&str> = policy
        .retry_on
        .split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty() && !SAFE_RETRY_ON.contains(c))
        .collect();
    if unsafe_conditions.is_empty() || policy.num_retries == Some(0) {
        return;
    }
    if blocks_retries {
        // The filter sets x-envoy-max-retries: 0 on tracked requests: safe, as long as it stays on.
        findings.push(Finding {
            severity: Severity::Warning,
            rule: "router-retries",
            location: at.to_owned(),
            problem: format!(
                "the route retries {} after a request may have reached the upstream: tracked requests are sent once only because block_router_retries is on (turning it off would let Envoy run them twice)",
                unsafe_conditions.join(",")
            ),
            fix: "retry_policy: { retry_on: \"connect-failure,refused-stream,reset-before-request\", num_retries: 2 }   # or keep it for untracked traffic and never set block_router_retries: false".into(),
        });
        return;
    }
    findings.push(Finding {
        severity: Severity::Error,
        rule: "router-retries",
        location: at.to_owned(),
        problem: format!(
            "Envoy may retry a tracked request behind the filter after it reached the upstream (retry_on: {}; block_router_retries is false): the service runs it again",
            unsafe_conditions.join(",")
        ),
        fix: "retry_policy: { retry_on: \"connect-failure,refused-stream,reset-before-request\", num_retries: 2 }   # or drop block_router_retries: false from the plugin".into(),
    });
}

fn replay_cluster(setup: &Setup, replay: &Route, at: &str, findings: &mut Vec<Finding>) {
    if !setup.knows_clusters {
        return;
    }
    let Some(action) = &replay.route else {
        return;
    };
    match setup.clusters.get(&action.cluster) {
        None => findings.push(Finding {
            severity: Severity::Error,
            rule: "replay-cluster",
            location: at.to_owned(),
            problem: format!("the replay route leads to cluster {:?}, which Envoy does not have: gRPC replays fail with UNAVAILABLE", action.cluster),
            fix: "define the cluster for the store's --replay-listen port (HTTP/2), as idempotency_store_replay in envoy/envoy-grpc.yaml".into(),
        }),
        Some(cluster) if !cluster.speaks_http2() => findings.push(Finding {
            severity: Severity::Error,
            rule: "replay-cluster-http2",
            location: format!("{at} / cluster {}", cluster.name),
            problem: "the replay cluster speaks HTTP/1.1: a replayed gRPC call loses its trailers (grpc-status), and clients see UNKNOWN or INTERNAL instead of the stored status".into(),
            fix: HTTP2_FIX.into(),
        }),
        Some(_) => {}
    }
}

fn store_cluster(setup: &Setup, filter: &FilterUse, at: &str, findings: &mut Vec<Finding>) {
    if !setup.knows_clusters {
        return;
    }
    let name = filter
        .setting("store_cluster")
        .and_then(Value::as_str)
        .unwrap_or("idempotency_store");
    if !setup.clusters.contains_key(name) {
        findings.push(Finding {
            severity: Severity::Error,
            rule: "store-cluster",
            location: at.to_owned(),
            problem: format!("store_cluster {name:?} is not a cluster of this Envoy: every keyed request gets 503 (failure_mode: closed) or passes untracked (open)"),
            fix: format!("clusters:\n  - name: {name}\n    connect_timeout: 1s\n    load_assignment: {{ cluster_name: {name}, endpoints: [...] }}   # the store's --listen port"),
        });
    }
}

/// Settings of the Wasm filter itself.
fn filter_settings(filter: &FilterUse, at: &str, findings: &mut Vec<Finding>) {
    if filter.wasm["allow_on_headers_stop_iteration"].as_bool() != Some(true) {
        findings.push(Finding {
            severity: Severity::Error,
            rule: "allow-on-headers-stop-iteration",
            location: at.to_owned(),
            problem: "allow_on_headers_stop_iteration is not true: Envoy does not let the filter hold the request headers while it reads the body, so the request can reach the upstream before the lock is taken".into(),
            fix: "config:   # the Wasm filter's\n  allow_on_headers_stop_iteration: true".into(),
        });
    }
    if filter.wasm["failure_policy"].as_str() != Some("FAIL_CLOSED") {
        findings.push(Finding {
            severity: Severity::Warning,
            rule: "failure-policy",
            location: at.to_owned(),
            problem: "failure_policy is not FAIL_CLOSED: should the Wasm VM fail, keyed requests pass untracked and may run twice".into(),
            fix: "config:   # the Wasm filter's\n  failure_policy: FAIL_CLOSED".into(),
        });
    }
}

/// The composite filter's matcher decides which requests reach the filter at all: it must let
/// through every method the filter acts on, and — on `required` routes — keyless requests too
/// (the filter answers them 400; skipped, they pass untracked).
fn composite_matcher(manager: &ConnectionManager, filter: &FilterUse, at: &str, findings: &mut Vec<Finding>) {
    let Some(extension) = manager.http_filters.iter().find(|f| f.name == filter.name) else {
        return;
    };
    let Some(matcher) = extension.typed_config.get("xds_matcher") else {
        return; // not gated by a matcher: every request reaches the filter
    };
    let predicates: Vec<&Value> = matcher["matcher_list"]["matchers"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|m| {
            let predicate = &m["predicate"];
            let all = predicate["and_matcher"]["predicate"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if all.is_empty() {
                vec![predicate]
            } else {
                predicate["and_matcher"]["predicate"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .collect()
            }
        })
        .collect();
    let header_of = |p: &Value| {
        p["single_predicate"]["input"]["typed_config"]["header_name"]
            .as_str()
            .map(str::to_ascii_lowercase)
    };
    let method_pattern = predicates
        .iter()
        .find(|p| header_of(p).as_deref() == Some(":method"))
        .and_then(|p| {
            let matcher = &p["single_predicate"]["value_match"];
            matcher["safe_regex"]["regex"]
                .as_str()
                .or(matcher["exact"].as_str())
                .map(str::to_owned)
        });
    let methods: Vec<String> = filter
        .setting("mutating_methods")
        .and_then(Value::as_array)
        .map(|m| {
            m.iter()
                .filter_map(Value::as_str)
                .map(str::to_ascii_uppercase)
                .collect()
        })
        .unwrap_or_else(|| ["POST", "PUT", "PATCH", "DELETE"].map(str::to_owned).to_vec());
    if let Some(pattern) = method_pattern {
        let skipped: Vec<&String> = methods.iter().filter(|m| !pattern.contains(m.as_str())).collect();
        if !skipped.is_empty() {
            findings.push(Finding {
                severity: Severity::Error,
                rule: "composite-methods",
                location: at.to_owned(),
                problem: format!(
                    "the composite matcher ({pattern:?}) never hands {} requests to the filter, which acts on them: keyed ones pass untracked and may run twice",
                    skipped.iter().map(|m| m.as_str()).collect::<Vec<_>>().join(", ")
                ),
                fix: "value_match:   # the :method predicate\n  safe_regex: { google_re2: {}, regex: \"^(POST|PUT|PATCH|DELETE)$\" }   # every one of mutating_methods".into(),
            });
        }
    }
    let key_gated = predicates
        .iter()
        .any(|p| header_of(p).as_deref() == Some("idempotency-key"));
    let required = filter.setting("require_key").and_then(Value::as_bool) == Some(true)
        || filter.setting("mode").and_then(Value::as_str) == Some("required")
        || filter
            .setting("routes")
            .and_then(Value::as_array)
            .is_some_and(|routes| routes.iter().any(|r| r["mode"] == "required"));
    if key_gated && required {
        findings.push(Finding {
            severity: Severity::Error,
            rule: "composite-required-key",
            location: at.to_owned(),
            problem: "the composite matcher hands only requests with an Idempotency-Key to the filter, but a route requires keys: a keyless request passes untracked instead of getting 400".into(),
            fix: "drop the idempotency-key predicate from the composite matcher (keep the :method one)".into(),
        });
    }
}

/// Envoy buffers what the filter holds; above the listener's limit it answers 413/500 itself.
fn buffer_limit(listener: &Listener, filter: &FilterUse, findings: &mut Vec<Finding>) {
    if listener.name.starts_with("EnvoyFilter ") {
        return; // Istio's listener: its limit is not in the patches
    }
    let limit = listener.buffer_limit.unwrap_or(DEFAULT_BUFFER_LIMIT);
    let size = |name: &str| {
        filter
            .setting(name)
            .and_then(Value::as_u64)
            .unwrap_or(DEFAULT_BODY_LIMIT)
    };
    let (response, request) = (size("max_response_size"), size("max_request_body"));
    let needed = response.max(request);
    if limit < needed {
        findings.push(Finding {
            severity: Severity::Error,
            rule: "buffer-limit",
            location: format!("listener {}", listener.name),
            problem: format!(
                "per_connection_buffer_limit_bytes is {limit}: responses (max_response_size {response}) and requests (max_request_body {request}) above it are cut off by Envoy (500/413) before the filter records them"
            ),
            fix: format!("per_connection_buffer_limit_bytes: {}   # on the listener, above max_response_size and max_request_body", needed.saturating_mul(2)),
        });
    }
}

/// Filters sharing a `vm_id` share one VM: its code must be the same module.
fn shared_vm(
    filter: &FilterUse,
    at: &str,
    seen: &mut BTreeMap<String, (String, Value)>,
    findings: &mut Vec<Finding>,
) {
    let vm = &filter.wasm["vm_config"];
    let Some(vm_id) = vm["vm_id"].as_str() else {
        return;
    };
    let code = vm["code"].clone();
    match seen.get(vm_id) {
        Some((first_at, first_code)) if *first_code != code => findings.push(Finding {
            severity: Severity::Error,
            rule: "vm-id",
            location: at.to_owned(),
            problem: format!("vm_id {vm_id:?} is shared with {first_at} but loads other code: Envoy runs one of the two modules for both"),
            fix: "give each module its own vm_id (filters with the same module may share one)".into(),
        }),
        Some(_) => {}
        None => {
            seen.insert(vm_id.to_owned(), (at.to_owned(), code));
        }
    }
}
