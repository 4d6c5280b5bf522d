//! Reading an Envoy setup: a bootstrap file, Istio `EnvoyFilter` patches, or a live admin
//! endpoint's `/config_dump`, into one view of the listeners, routes and clusters the checks read.
//!
//! The pieces the checks depend on are typed (serde structs named after Envoy's own fields);
//! everything else is ignored. Envoy's generated API crates were considered and not used: the
//! ones with serde (`xds-api`, pbjson) cannot decode `typed_config` (`google.protobuf.Any` in its
//! JSON form, `"@type"` beside the fields), which is where everything this tool reads lives, and
//! Istio patches are fragments that no full-message type accepts.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

/// What a setup consists of, wherever it came from.
#[derive(Debug, Default)]
pub struct Setup {
    /// Listeners with their connection managers.
    pub listeners: Vec<Listener>,
    /// Route configurations by name (RDS, and inline ones under their own name).
    pub route_configs: BTreeMap<String, RouteConfiguration>,
    /// Clusters by name.
    pub clusters: BTreeMap<String, Cluster>,
    /// False when the source cannot show clusters (Istio patches: Istio makes them), so checks
    /// that need them are skipped rather than failed.
    pub knows_clusters: bool,
}

/// A listener and what it runs.
#[derive(Debug)]
pub struct Listener {
    /// Its name (Istio: `virtualInbound`, …; patches: `EnvoyFilter <name>`).
    pub name: String,
    /// `per_connection_buffer_limit_bytes` (Envoy's default: 1 MiB).
    pub buffer_limit: Option<u64>,
    /// Its HTTP connection managers.
    pub managers: Vec<ConnectionManager>,
}

/// An `HttpConnectionManager`, as far as the checks read it.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ConnectionManager {
    /// `stat_prefix`, to name it.
    pub stat_prefix: String,
    /// Header mutations applied before route selection.
    pub early_header_mutation_extensions: Vec<TypedExtension>,
    /// An inline route configuration.
    pub route_config: Option<RouteConfiguration>,
    /// Routes by RDS.
    pub rds: Option<Rds>,
    /// The HTTP filter chain.
    pub http_filters: Vec<TypedExtension>,
}

/// `name` + `typed_config`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub struct TypedExtension {
    /// Extension name.
    pub name: String,
    /// Its configuration (`"@type"` and fields).
    pub typed_config: Value,
}

/// `rds` of a connection manager.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Rds {
    /// The route configuration's name.
    pub route_config_name: String,
}

/// A route configuration.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub struct RouteConfiguration {
    /// Its name.
    pub name: String,
    /// Its virtual hosts.
    pub virtual_hosts: Vec<VirtualHost>,
}

/// A virtual host.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub struct VirtualHost {
    /// Its name.
    pub name: String,
    /// Routes, first match wins.
    pub routes: Vec<Route>,
    /// A retry policy for every route that has none.
    pub retry_policy: Option<RetryPolicy>,
    /// A hedge policy for every route.
    pub hedge_policy: Option<Value>,
}

/// A route.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub struct Route {
    /// Its name, if any.
    pub name: String,
    /// What it matches (`path`/`prefix`, `headers`).
    #[serde(rename = "match")]
    pub matcher: RouteMatch,
    /// Where it leads.
    pub route: Option<RouteAction>,
}

/// A route's match.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub struct RouteMatch {
    /// Exact path.
    pub path: Option<String>,
    /// Path prefix.
    pub prefix: Option<String>,
    /// Header matchers.
    pub headers: Vec<HeaderMatcher>,
}

/// A header matcher (only its name matters here).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub struct HeaderMatcher {
    /// Header name.
    pub name: String,
}

/// A route's action.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub struct RouteAction {
    /// Target cluster.
    pub cluster: String,
    /// Retries.
    pub retry_policy: Option<RetryPolicy>,
    /// Hedging.
    pub hedge_policy: Option<Value>,
    /// Internal redirects.
    pub internal_redirect_policy: Option<Value>,
}

/// A retry policy.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub struct RetryPolicy {
    /// Comma-separated conditions.
    pub retry_on: String,
    /// Retry count (Envoy's default: 1).
    pub num_retries: Option<u32>,
}

/// A cluster.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub struct Cluster {
    /// Its name.
    pub name: String,
    /// `typed_extension_protocol_options` (HTTP/2 lives here).
    pub typed_extension_protocol_options: BTreeMap<String, Value>,
    /// Legacy HTTP/2 switch.
    pub http2_protocol_options: Option<Value>,
}

impl Cluster {
    /// True when it speaks HTTP/2 to its endpoints (gRPC replays need trailers).
    pub fn speaks_http2(&self) -> bool {
        self.http2_protocol_options.is_some()
            || self.typed_extension_protocol_options.values().any(|options| {
                options
                    .pointer("/explicit_http_config/http2_protocol_options")
                    .is_some()
                    || options.get("use_downstream_protocol_config").is_some()
                    || options.pointer("/auto_config/http2_protocol_options").is_some()
            })
    }
}

/// Where the configuration comes from.
#[derive(Debug)]
pub enum Source {
    /// A file: a bootstrap, Istio `EnvoyFilter`(s), or a saved `/config_dump`.
    File(std::path::PathBuf),
    /// A running Envoy's admin endpoint.
    Admin(String),
}

/// Why a setup could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    File {
        /// Which file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Not YAML/JSON, or not a shape this tool knows.
    #[error("{0}")]
    Format(String),
    /// The admin endpoint did not answer.
    #[error("cannot read {url}: {message}")]
    Admin {
        /// Which URL.
        url: String,
        /// Why.
        message: String,
    },
}

/// Read a setup from `source`.
pub async fn read(source: &Source) -> Result<Setup, ReadError> {
    match source {
        Source::File(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| ReadError::File {
                path: path.display().to_string(),
                source,
            })?;
            parse(&text)
        }
        Source::Admin(base) => {
            let url = format!("{}/config_dump", base.trim_end_matches('/'));
            let client = reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(10))
                .build()
                .map_err(|e| ReadError::Admin {
                    url: url.clone(),
                    message: e.to_string(),
                })?;
            let admin_error = |message: String| ReadError::Admin {
                url: url.clone(),
                message,
            };
            let response = client
                .get(&url)
                .send()
                .await
                .map_err(|e| admin_error(e.to_string()))?;
            if !response.status().is_success() {
                return Err(admin_error(format!("status {}", response.status())));
            }
            let dump: Value = response.json().await.map_err(|e| admin_error(e.to_string()))?;
            Ok(from_config_dump(&dump))
        }
    }
}

/// Parse a file's text: every YAML document in it, each a bootstrap, an `EnvoyFilter` or a
/// `/config_dump`; documents of other kinds (a `WasmPlugin`, a `Service`) are skipped.
pub fn parse(text: &str) -> Result<Setup, ReadError> {
    let mut setup = Setup::default();
    let mut understood = 0;
    for document in serde_yaml::Deserializer::from_str(text) {
        let value =
            Value::deserialize(document).map_err(|e| ReadError::Format(format!("not YAML or JSON: {e}")))?;
        if value.get("static_resources").is_some() {
            add_bootstrap(&mut setup, &value);
        } else if value.get("configs").is_some() {
            merge(&mut setup, from_config_dump(&value));
        } else if value.get("kind").and_then(Value::as_str) == Some("EnvoyFilter") {
            add_envoy_filter(&mut setup, &value);
        } else {
            continue;
        }
        understood += 1;
    }
    if understood == 0 {
        return Err(ReadError::Format(
            "found no Envoy bootstrap (static_resources), /config_dump (configs) or Istio EnvoyFilter".into(),
        ));
    }
    Ok(setup)
}

fn merge(into: &mut Setup, other: Setup) {
    into.listeners.extend(other.listeners);
    into.route_configs.extend(other.route_configs);
    into.clusters.extend(other.clusters);
    into.knows_clusters |= other.knows_clusters;
}

fn add_bootstrap(setup: &mut Setup, bootstrap: &Value) {
    setup.knows_clusters = true;
    let resources = &bootstrap["static_resources"];
    for listener in resources["listeners"].as_array().into_iter().flatten() {
        setup.listeners.push(listener_of(listener));
    }
    for cluster in resources["clusters"].as_array().into_iter().flatten() {
        add_cluster(setup, cluster);
    }
}

fn add_cluster(setup: &mut Setup, value: &Value) {
    if let Ok(cluster) = Cluster::deserialize(value) {
        setup.clusters.insert(cluster.name.clone(), cluster);
    }
}

/// A listener's connection managers, from every filter chain (and the default one).
fn listener_of(listener: &Value) -> Listener {
    let chains = listener["filter_chains"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(listener.get("default_filter_chain"));
    let managers = chains
        .flat_map(|chain| chain["filters"].as_array().into_iter().flatten())
        .filter(|filter| type_of(&filter["typed_config"]).ends_with("HttpConnectionManager"))
        .filter_map(|filter| ConnectionManager::deserialize(&filter["typed_config"]).ok())
        .collect();
    Listener {
        name: listener["name"]
            .as_str()
            .unwrap_or("(unnamed listener)")
            .to_owned(),
        buffer_limit: listener["per_connection_buffer_limit_bytes"].as_u64(),
        managers,
    }
}

fn type_of(typed_config: &Value) -> &str {
    typed_config["@type"].as_str().unwrap_or_default()
}

/// `/config_dump`: listeners (static and active dynamic), route configurations, clusters.
pub fn from_config_dump(dump: &Value) -> Setup {
    let mut setup = Setup {
        knows_clusters: true,
        ..Setup::default()
    };
    for config in dump["configs"].as_array().into_iter().flatten() {
        let kind = type_of(config);
        if kind.ends_with("ListenersConfigDump") {
            let statics = config["static_listeners"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|l| &l["listener"]);
            let dynamics = config["dynamic_listeners"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|l| &l["active_state"]["listener"]);
            for listener in statics.chain(dynamics).filter(|l| l.is_object()) {
                setup.listeners.push(listener_of(listener));
            }
        } else if kind.ends_with("RoutesConfigDump") {
            let statics = config["static_route_configs"].as_array().into_iter().flatten();
            let dynamics = config["dynamic_route_configs"].as_array().into_iter().flatten();
            for route_config in statics.chain(dynamics).map(|r| &r["route_config"]) {
                if let Ok(parsed) = RouteConfiguration::deserialize(route_config) {
                    setup.route_configs.insert(parsed.name.clone(), parsed);
                }
            }
        } else if kind.ends_with("ClustersConfigDump") {
            let statics = config["static_clusters"].as_array().into_iter().flatten();
            let dynamics = config["dynamic_active_clusters"].as_array().into_iter().flatten();
            for cluster in statics.chain(dynamics).map(|c| &c["cluster"]) {
                add_cluster(&mut setup, cluster);
            }
        }
    }
    setup
}

/// An `EnvoyFilter`'s patches as one inbound connection manager: its `NETWORK_FILTER` merges
/// (the early header strip), its `HTTP_FILTER` insertions, its `HTTP_ROUTE`s (first when
/// `INSERT_FIRST`) and its `CLUSTER` additions. What Istio itself adds is not known here.
fn add_envoy_filter(setup: &mut Setup, filter: &Value) {
    let name = filter["metadata"]["name"].as_str().unwrap_or("(unnamed)");
    let mut manager = ConnectionManager {
        stat_prefix: format!("EnvoyFilter {name}"),
        ..ConnectionManager::default()
    };
    let mut routes: Vec<Route> = Vec::new();
    for patch in filter["spec"]["configPatches"].as_array().into_iter().flatten() {
        let value = &patch["patch"]["value"];
        let operation = patch["patch"]["operation"].as_str().unwrap_or_default();
        match patch["applyTo"].as_str().unwrap_or_default() {
            "NETWORK_FILTER" => {
                if let Ok(merged) = ConnectionManager::deserialize(&value["typed_config"]) {
                    manager
                        .early_header_mutation_extensions
                        .extend(merged.early_header_mutation_extensions);
                    manager.http_filters.extend(merged.http_filters);
                }
            }
            "HTTP_FILTER" => {
                if let Ok(extension) = TypedExtension::deserialize(value) {
                    manager.http_filters.push(extension);
                }
            }
            "HTTP_ROUTE" => {
                if let Ok(route) = Route::deserialize(value) {
                    if operation == "INSERT_FIRST" {
                        routes.insert(0, route);
                    } else {
                        routes.push(route);
                    }
                }
            }
            "CLUSTER" => {
                add_cluster(setup, value);
                setup.knows_clusters = true;
            }
            _ => {}
        }
    }
    if !routes.is_empty() {
        manager.route_config = Some(RouteConfiguration {
            name: format!("{name} routes"),
            virtual_hosts: vec![VirtualHost {
                name: "(patched inbound virtual host)".into(),
                routes,
                ..VirtualHost::default()
            }],
        });
    }
    setup.listeners.push(Listener {
        name: format!("EnvoyFilter {name}"),
        buffer_limit: None,
        managers: vec![manager],
    });
}

/// The idempotency filter found in an HTTP filter (directly or inside a composite filter's
/// matcher tree): a Wasm filter whose configuration is a JSON object with `service_name`.
#[derive(Debug, Clone)]
pub struct FilterUse {
    /// The HTTP filter's name.
    pub name: String,
    /// The Wasm `config` (`allow_on_headers_stop_iteration`, `failure_policy`, `vm_config`).
    pub wasm: Value,
    /// The plugin configuration (the filter's JSON).
    pub plugin: Value,
}

impl FilterUse {
    /// A plugin setting, or `default`.
    pub fn setting<'a>(&'a self, name: &str) -> Option<&'a Value> {
        self.plugin.get(name)
    }
}

/// Every use of the idempotency filter in `extension`.
pub fn filter_uses(extension: &TypedExtension) -> Vec<FilterUse> {
    let mut found = Vec::new();
    find_wasm(&extension.typed_config, &extension.name, &mut found);
    found
}

fn find_wasm(value: &Value, name: &str, found: &mut Vec<FilterUse>) {
    match value {
        Value::Object(map) => {
            if type_of(value).ends_with("filters.http.wasm.v3.Wasm") {
                let wasm = value["config"].clone();
                let plugin = plugin_configuration(&wasm["configuration"]);
                if plugin.get("service_name").is_some() {
                    found.push(FilterUse {
                        name: name.to_owned(),
                        wasm,
                        plugin,
                    });
                }
                return;
            }
            for child in map.values() {
                find_wasm(child, name, found);
            }
        }
        Value::Array(items) => {
            for item in items {
                find_wasm(item, name, found);
            }
        }
        _ => {}
    }
}

/// The plugin's JSON from a Wasm `configuration` (a `StringValue`: `{"@type", "value"}`).
fn plugin_configuration(configuration: &Value) -> Value {
    configuration["value"]
        .as_str()
        .and_then(|text| serde_json::from_str(text).ok())
        .unwrap_or(Value::Null)
}
