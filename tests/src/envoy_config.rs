//! Envoy bootstraps for tests, shaped like `envoy/envoy.yaml` but on free ports.

use serde_json::{json, Value};

use crate::wasm_path;

/// Ports of one stack.
#[derive(Debug, Clone)]
pub struct Ports {
    /// Envoy listener.
    pub listener: u16,
    /// Envoy admin.
    pub admin: u16,
    /// Demo orders service.
    pub upstream: u16,
    /// Store service replicas.
    pub stores: Vec<u16>,
    /// Their replay listeners (`--replay-listen`); empty: the replay route leads to `stores`
    /// (a store without a replay listener serves `/v1/replay` beside its API).
    pub replays: Vec<u16>,
}

fn endpoint(port: u16) -> Value {
    json!({"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}})
}

/// The wasm HTTP filter entry with `plugin` as its configuration.
pub fn wasm_filter(plugin: &Value) -> Value {
    json!({
        "name": "idempotency",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": "idempotency",
                "root_id": "idempotency",
                "allow_on_headers_stop_iteration": true,
                "failure_policy": "FAIL_CLOSED",
                "vm_config": {
                    "vm_id": "idempotency",
                    "runtime": "envoy.wasm.runtime.v8",
                    "code": {"local": {"filename": wasm_path().display().to_string()}}
                },
                "configuration": {
                    "@type": "type.googleapis.com/google.protobuf.StringValue",
                    "value": plugin.to_string()
                }
            }
        }
    })
}

/// The connection manager's early header mutation that removes client-sent internal headers
/// before Envoy picks a route, as every shipped config has it.
pub fn early_strip() -> Value {
    let internal: Vec<Value> = idempotency_wire::headers::ALL
        .iter()
        .map(|h| json!({"remove": h}))
        .collect();
    json!([{"name": "strip-internal-headers", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.http.early_header_mutation.header_mutation.v3.HeaderMutation",
        "mutations": internal}}])
}

/// The replay route as every shipped config has it: only what the filter produces (POST
/// `/v1/replay` with a ticket), to the store's replay listener.
pub fn replay_route(cluster: &str) -> Value {
    json!({"match": {"path": idempotency_wire::paths::REPLAY, "headers": [
            {"name": idempotency_wire::headers::REPLAY_TICKET, "present_match": true},
            {"name": ":method", "string_match": {"exact": "POST"}}]},
        "route": {"cluster": cluster, "timeout": "5s"}})
}

/// The shipped filter chain: the idempotency filter instantiated (by a composite filter) only
/// for mutating methods, the router. (Internal headers are stripped earlier: [`early_strip`].)
pub fn http_filters(plugin: &Value) -> Value {
    http_filters_with(plugin, false)
}

/// Which requests get the filter: mutating methods and, with `keyed_only`, only those with an
/// `Idempotency-Key` (only for routes that are not `required`).
fn run_predicate(keyed_only: bool) -> Value {
    let mutating = json!({"single_predicate": {
        "input": {"name": "request-method", "typed_config": {
            "@type": "type.googleapis.com/envoy.type.matcher.v3.HttpRequestHeaderMatchInput",
            "header_name": ":method"}},
        "value_match": {"safe_regex": {"google_re2": {}, "regex": "^(POST|PUT|PATCH|DELETE)$"}}}});
    if !keyed_only {
        return mutating;
    }
    let keyed = json!({"single_predicate": {
        "input": {"name": "idempotency-key", "typed_config": {
            "@type": "type.googleapis.com/envoy.type.matcher.v3.HttpRequestHeaderMatchInput",
            "header_name": "idempotency-key"}},
        "value_match": {"safe_regex": {"google_re2": {}, "regex": ".*"}}}});
    json!({"and_matcher": {"predicate": [mutating, keyed]}})
}

/// The filter chain, optionally also keeping keyless requests out of the Wasm VM.
///
/// The Wasm filter sits in a composite filter that creates it only for requests the matcher
/// picks: other requests never enter the VM. (Wrapping the Wasm filter itself in an
/// `ExtensionWithMatcher` with `SkipFilter` still creates a Wasm context per request — ~5 µs of
/// Envoy CPU on every GET.)
pub fn http_filters_with(plugin: &Value, keyed_only: bool) -> Value {
    json!([
        {"name": "idempotency", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.common.matching.v3.ExtensionWithMatcher",
            "extension_config": {"name": "composite", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.composite.v3.Composite"}},
            "xds_matcher": {"matcher_list": {"matchers": [{
                "predicate": run_predicate(keyed_only),
                "on_match": {"action": {"name": "run-idempotency", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.composite.v3.ExecuteFilterAction",
                    "typed_config": wasm_filter(plugin)}}}
            }]}}}},
        {"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
    ])
}

/// The Wasm filter's `config` inside the shipped `idempotency` filter entry (composite form).
pub fn shipped_wasm_config(filter: &mut Value) -> &mut Value {
    &mut filter["typed_config"]["xds_matcher"]["matcher_list"]["matchers"][0]["on_match"]["action"]
        ["typed_config"]["typed_config"]["typed_config"]["config"]
}

/// A complete bootstrap (JSON text, which Envoy reads as YAML).
pub fn bootstrap(ports: &Ports, plugin: &Value) -> String {
    bootstrap_with(ports, plugin, false)
}

/// A complete bootstrap whose matcher also keeps keyless requests out of the filter.
pub fn bootstrap_with(ports: &Ports, plugin: &Value, keyed_only: bool) -> String {
    let stores: Vec<Value> = ports.stores.iter().map(|p| endpoint(*p)).collect();
    let replays: Vec<Value> = if ports.replays.is_empty() {
        stores.clone()
    } else {
        ports.replays.iter().map(|p| endpoint(*p)).collect()
    };
    let h2 = json!({"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {}}}});
    json!({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": ports.admin}}},
        "stats_config": {"stats_tags": [{"tag_name": "service",
            "regex": "^wasmcustom\\.idempotency_\\w+?(\\.service\\.([^.]+))$"}]},
        "static_resources": {
            "listeners": [{
                "name": "ingress",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": ports.listener}},
                "per_connection_buffer_limit_bytes": 4_194_304,
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "ingress",
                        "early_header_mutation_extensions": early_strip(),
                        "route_config": {"name": "local", "virtual_hosts": [{
                            "name": "orders", "domains": ["*"],
                            "routes": [
                                // gRPC replays go to the store's replay listener.
                                replay_route("idempotency_store_replay"),
                                // Tests pick a 300 ms route timeout with `x-e2e-route: short-timeout`.
                                {"match": {"prefix": "/", "headers": [{"name": "x-e2e-route",
                                    "string_match": {"exact": "short-timeout"}}]},
                                 "route": {"cluster": "orders", "timeout": "0.3s"}},
                                {"match": {"prefix": "/"}, "route": {"cluster": "orders", "timeout": "30s"}}
                            ]
                        }]},
                        "http_filters": http_filters_with(plugin, keyed_only)
                    }
                }]}]
            }],
            "clusters": [
                {"name": "orders", "type": "STATIC", "connect_timeout": "1s",
                 "load_assignment": {"cluster_name": "orders", "endpoints": [{"lb_endpoints": [endpoint(ports.upstream)]}]}},
                {"name": "idempotency_store", "type": "STATIC", "connect_timeout": "1s",
                 "typed_extension_protocol_options": h2,
                 "load_assignment": {"cluster_name": "idempotency_store", "endpoints": [{"lb_endpoints": stores}]}},
                {"name": "idempotency_store_replay", "type": "STATIC", "connect_timeout": "1s",
                 "typed_extension_protocol_options": h2,
                 "load_assignment": {"cluster_name": "idempotency_store_replay", "endpoints": [{"lb_endpoints": replays}]}}
            ]
        }
    })
    .to_string()
}

/// The same listener and clusters without any filter but the router: pass-through Envoy, the
/// benchmark's baseline.
pub fn passthrough_bootstrap(ports: &Ports) -> String {
    let mut config: Value = serde_json::from_str(&bootstrap(ports, &json!({}))).unwrap_or_default();
    if let Some(filters) = config
        .pointer_mut("/static_resources/listeners/0/filter_chains/0/filters/0/typed_config/http_filters")
    {
        *filters = json!([{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]);
    }
    config.to_string()
}

/// Pass-through Envoy plus a Wasm filter that does nothing (`bench/noop-filter`) on every
/// request: the floor that any Wasm filter costs in this Envoy.
pub fn noop_wasm_bootstrap(ports: &Ports, wasm: &std::path::Path) -> String {
    noop_wasm_bootstrap_with(ports, wasm, "")
}

/// [`noop_wasm_bootstrap`] with the no-op filter in `mode` (`"buffer"`, `"buffer+callout"`: see
/// `bench/noop-filter`).
pub fn noop_wasm_bootstrap_with(ports: &Ports, wasm: &std::path::Path, mode: &str) -> String {
    let mut config: Value = serde_json::from_str(&passthrough_bootstrap(ports)).unwrap_or_default();
    let mut noop = wasm_filter(&json!({}));
    if let Some(value) = noop.pointer_mut("/typed_config/config/configuration/value") {
        *value = json!(mode);
    }
    if let Some(filename) = noop.pointer_mut("/typed_config/config/vm_config/code/local/filename") {
        *filename = json!(wasm.display().to_string());
    }
    for (pointer, value) in [
        ("/name", "noop"),
        ("/typed_config/config/name", "noop"),
        ("/typed_config/config/root_id", "noop"),
        ("/typed_config/config/vm_config/vm_id", "noop"),
    ] {
        if let Some(field) = noop.pointer_mut(pointer) {
            *field = json!(value);
        }
    }
    if let Some(filters) = config
        .pointer_mut("/static_resources/listeners/0/filter_chains/0/filters/0/typed_config/http_filters")
        .and_then(Value::as_array_mut)
    {
        filters.insert(0, noop);
    }
    config.to_string()
}
