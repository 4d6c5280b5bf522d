//! The shipped configurations run as shipped: `envoy/*.yaml` on free ports, the Istio patches
//! assembled into bootstraps.

#[allow(clippy::wildcard_imports)] // the harness's shared imports and items
use crate::*;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};

/// A shipped Envoy bootstrap from `envoy/`, run as shipped except for its ports (moved to free
/// ones) and the store token, with its own store and demo service.
#[derive(Debug)]
pub struct ShippedStack {
    /// Envoy listener URL.
    pub url: String,
    /// Envoy admin URL.
    pub admin_url: String,
    /// Demo service URL.
    pub demo_url: String,
    /// Shared client.
    pub client: reqwest::Client,
    _store: Proc,
    _demo: Proc,
    _envoy: Proc,
    _dir: tempfile::TempDir,
}

impl Drop for ShippedStack {
    fn drop(&mut self) {
        keep_logs_if_panicking(&self._dir);
    }
}

impl ShippedStack {
    /// Start `envoy/<file>` with fresh ports.
    pub async fn start(file: &str) -> ShippedStack {
        let text = std::fs::read_to_string(repo_root().join("envoy").join(file)).unwrap();
        ShippedStack::start_config(&text).await
    }

    /// Start an Envoy bootstrap written for the shipped ports (listener 10000, admin 9901, demo
    /// 8080 or gRPC 50051, store 8081, store replays 8082; the compose file's host names and
    /// module path too) on fresh ones, with the test token as the filter's `store_token`.
    pub async fn start_config(text: &str) -> ShippedStack {
        let (listener, admin, demo, store, replay) =
            (free_port(), free_port(), free_port(), free_port(), free_port());
        let mut text = text
            .replace("port_value: 10000", &format!("port_value: {listener}"))
            .replace("port_value: 9901", &format!("port_value: {admin}"))
            .replace("port_value: 8080", &format!("port_value: {demo}"))
            .replace("port_value: 50051", &format!("port_value: {demo}"))
            .replace("port_value: 8081", &format!("port_value: {store}"))
            .replace("port_value: 8082", &format!("port_value: {replay}"))
            // The compose file's addresses and module path.
            .replace("address: 0.0.0.0", "address: 127.0.0.1")
            .replace("address: demo,", "address: 127.0.0.1,")
            .replace("address: store,", "address: 127.0.0.1,")
            .replace(
                "filename: /etc/envoy/idempotency_filter.wasm",
                &format!("filename: {}", wasm_path().display()),
            );
        if let Some((before, rest)) = text.split_once("\"store_token\": \"") {
            if let Some((_, after)) = rest.split_once('"') {
                text = format!("{before}\"store_token\": \"{STORE_TOKEN}\"{after}");
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let mut store_proc = spawn_store(
            dir.path(),
            store,
            &dir.path().join("store-data"),
            &["--replay-listen".to_owned(), format!("127.0.0.1:{replay}")],
            "store.log",
        );
        let mut demo_proc = spawn_demo(dir.path(), demo, store);
        let mut envoy = start_envoy(dir.path(), &text, "envoy.log");
        wait_all_ready(
            (store, &mut store_proc),
            (demo, &mut demo_proc),
            (admin, &mut envoy),
        )
        .await;
        ShippedStack {
            url: format!("http://127.0.0.1:{listener}"),
            admin_url: format!("http://127.0.0.1:{admin}"),
            demo_url: format!("http://127.0.0.1:{demo}"),
            client: reqwest::Client::new(),
            _store: store_proc,
            _demo: demo_proc,
            _envoy: envoy,
            _dir: dir,
        }
    }

    /// Executions of one key at the demo service.
    pub async fn executions_of(&self, key: &str) -> u64 {
        demo_executions(&self.client, &self.demo_url).await["byKey"][key]
            .as_u64()
            .unwrap_or(0)
    }

    /// Envoy's Prometheus text.
    pub async fn envoy_metrics(&self) -> String {
        get_text(&self.client, &format!("{}/stats/prometheus", self.admin_url)).await
    }
}

/// Every `.yaml` file under `envoy/`, recursively.
pub fn shipped_yaml_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(&repo_root().join("envoy"), &mut files);
    files.sort();
    files
}

/// The HTTP filters the Istio `EnvoyFilter` (`envoy/istio/envoyfilter.yaml`) patches into a
/// sidecar, in order, followed by the router; the remote module is swapped for the local build
/// and the plugin's `store_token`/`store_cluster` for `store_token`/`store_cluster`. Also returns
/// the plugin configuration as shipped.
pub fn istio_envoyfilter_filters(store_token: &str, store_cluster: Option<&str>) -> (Vec<Value>, Value) {
    istio_envoyfilter_parts("envoy/istio/envoyfilter.yaml", store_token, store_cluster).0
}

/// What an Istio `EnvoyFilter` file patches into a sidecar's inbound listener.
#[derive(Debug, Clone)]
pub struct IstioPatches {
    /// The HTTP filters (as [`istio_envoyfilter_filters`]) and the shipped plugin configuration.
    pub filters: (Vec<Value>, Value),
    /// Routes it inserts.
    pub routes: Vec<Value>,
    /// Fields it merges into the connection manager's `typed_config` (`NETWORK_FILTER` MERGE).
    pub hcm_merge: Value,
}

/// The HTTP filters (as [`istio_envoyfilter_filters`]) and the routes an Istio `EnvoyFilter`
/// file patches in: `((filters, shipped plugin configuration), routes)`.
pub fn istio_envoyfilter_parts(
    file: &str,
    store_token: &str,
    store_cluster: Option<&str>,
) -> ((Vec<Value>, Value), Vec<Value>) {
    let patches = istio_patches(file, store_token, store_cluster);
    (patches.filters, patches.routes)
}

/// Everything an Istio `EnvoyFilter` file patches in, with the module, token and store cluster
/// swapped as in [`istio_envoyfilter_filters`].
pub fn istio_patches(file: &str, store_token: &str, store_cluster: Option<&str>) -> IstioPatches {
    let text = std::fs::read_to_string(repo_root().join(file)).unwrap();
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let patches = doc["spec"]["configPatches"].as_sequence().unwrap();
    let of = |kind: &str| -> Vec<Value> {
        patches
            .iter()
            .filter(|p| p["applyTo"].as_str() == Some(kind))
            .map(|p| serde_json::to_value(&p["patch"]["value"]).unwrap())
            .collect()
    };
    let routes = of("HTTP_ROUTE");
    let hcm_merge = of("NETWORK_FILTER")
        .into_iter()
        .find(|v| v["name"] == "envoy.filters.network.http_connection_manager")
        .map(|v| v["typed_config"].clone())
        .unwrap_or_else(|| json!({}));
    let mut filters = of("HTTP_FILTER");
    let wasm = filters.iter_mut().find(|v| v["name"] == "idempotency").unwrap();
    let config = envoy_config::shipped_wasm_config(wasm);
    config["vm_config"]["code"] = json!({"local": {"filename": wasm_path().display().to_string()}});
    let shipped: Value = serde_json::from_str(config["configuration"]["value"].as_str().unwrap()).unwrap();
    let mut plugin = shipped.clone();
    plugin["store_token"] = json!(store_token);
    if let Some(cluster) = store_cluster {
        plugin["store_cluster"] = json!(cluster);
    }
    config["configuration"]["value"] = json!(plugin.to_string());
    filters.push(json!({"name": "envoy.filters.http.router", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}));
    IstioPatches {
        filters: (filters, shipped),
        routes,
        hcm_merge,
    }
}

/// `bootstrap` (from [`inbound_bootstrap`]) with `merge`'s fields merged into its connection
/// manager, as Istio applies a `NETWORK_FILTER` MERGE patch.
pub fn with_hcm_merge(mut bootstrap: Value, merge: &Value) -> Value {
    if let (Some(hcm), Some(fields)) = (
        bootstrap
            .pointer_mut("/static_resources/listeners/0/filter_chains/0/filters/0/typed_config")
            .and_then(Value::as_object_mut),
        merge.as_object(),
    ) {
        for (k, v) in fields {
            if k != "@type" {
                hcm.insert(k.clone(), v.clone());
            }
        }
    }
    bootstrap
}

/// A STATIC cluster to `127.0.0.1:port`.
pub fn static_cluster(name: &str, port: u16) -> Value {
    json!({"name": name, "type": "STATIC", "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address":
            {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}})
}

/// A sidecar-like inbound bootstrap: one listener with `filters` and `routes` (virtual host
/// `vhost`), the given clusters, and an admin port if any. Envoy's default buffer limits.
pub fn inbound_bootstrap(
    listener: u16,
    admin: Option<u16>,
    vhost: &str,
    routes: Vec<Value>,
    filters: Vec<Value>,
    clusters: Vec<Value>,
) -> Value {
    let mut bootstrap = json!({"static_resources": {
        "listeners": [{"name": "inbound", "address": {"socket_address": {"address": "127.0.0.1", "port_value": listener}},
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": "inbound",
                "route_config": {"virtual_hosts": [{"name": vhost, "domains": ["*"], "routes": routes}]},
                "http_filters": filters}}]}]}],
        "clusters": clusters}});
    if let Some(admin) = admin {
        bootstrap["admin"] =
            json!({"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}});
    }
    bootstrap
}

/// Assert that `envoy --mode validate` accepts `config` (YAML or JSON text); `name` labels the
/// failure. Runs from the repository root, so relative paths in shipped configs resolve.
pub fn assert_envoy_accepts(config: &str, name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.yaml");
    std::fs::write(&path, config).unwrap();
    let output = Command::new(envoy_bin())
        .arg("--mode")
        .arg("validate")
        .arg("-c")
        .arg(&path)
        .current_dir(repo_root())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{name}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}
