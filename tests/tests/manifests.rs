//! Mesh and deployment artifacts never rot: Istio manifests carry a plugin configuration the
//! filter accepts and an Envoy patch Envoy accepts; Kubernetes and compose files only use names
//! the store service actually reads; every YAML under `envoy/` parses.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)] // test code

use std::collections::BTreeSet;

use clap::CommandFactory;
use e2e::{repo_root, shipped_yaml_files};
use idempotency_filter::config::Config;
use idempotency_store::config::StoreConfig;
use serde::Deserialize;
use serde_yaml::Value as Yaml;

fn documents(relative: &str) -> Vec<Yaml> {
    let text = std::fs::read_to_string(repo_root().join(relative)).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| Yaml::deserialize(doc).unwrap_or_else(|e| panic!("{relative}: {e}")))
        .filter(|doc| !doc.is_null())
        .collect()
}

fn get<'a>(value: &'a Yaml, path: &[&str]) -> &'a Yaml {
    path.iter().fold(value, |v, key| &v[*key])
}

/// The store's long flags and environment variables, from its own clap definition.
fn store_flags_and_env() -> (BTreeSet<String>, BTreeSet<String>) {
    let command = StoreConfig::command();
    let flags = command
        .get_arguments()
        .filter_map(|a| a.get_long())
        .map(|l| format!("--{l}"))
        .collect();
    let env = command
        .get_arguments()
        .filter_map(|a| a.get_env())
        .map(|e| e.to_string_lossy().into_owned())
        .collect();
    (flags, env)
}

#[test]
fn every_yaml_file_under_envoy_parses() {
    let files = shipped_yaml_files();
    assert!(files.len() >= 8, "{files:?}");
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            Yaml::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        }
    }
}

#[test]
fn istio_wasmplugin_has_match_phase_fail_strategy_and_a_valid_plugin_config() {
    let docs = documents("envoy/istio/wasmplugin.yaml");
    let plugin = &docs[0];
    assert_eq!(plugin["kind"], "WasmPlugin");
    let spec = &plugin["spec"];
    assert_eq!(spec["phase"], "AUTHZ");
    assert_eq!(spec["failStrategy"], "FAIL_CLOSE");
    assert!(spec["match"].as_sequence().is_some_and(|m| !m.is_empty()));
    assert!(spec["url"].as_str().unwrap().starts_with("oci://"));
    // Istio hands pluginConfig to the filter as JSON.
    let json = serde_json::to_vec(&spec["pluginConfig"]).unwrap();
    let config = Config::parse(&json).unwrap();
    assert_eq!(config.service_name, "orders");
    assert!(!config.policy.routes.is_empty());
}

#[test]
fn istio_envoyfilter_patch_is_accepted_by_envoy_and_its_plugin_config_by_the_filter() {
    let docs = documents("envoy/istio/envoyfilter.yaml");
    let filter = &docs[0];
    assert_eq!(filter["kind"], "EnvoyFilter");
    let patches = filter["spec"]["configPatches"].as_sequence().unwrap();
    let values: Vec<serde_json::Value> = patches
        .iter()
        .map(|p| serde_json::to_value(&p["patch"]["value"]).unwrap())
        .collect();

    // The filter's configuration, parsed by the filter's own parser.
    let mut wasm = values
        .iter()
        .find(|v| v["name"] == "idempotency")
        .unwrap()
        .clone();
    let wasm_config = &*e2e::envoy_config::shipped_wasm_config(&mut wasm);
    assert_eq!(wasm_config["allow_on_headers_stop_iteration"], true);
    let plugin = wasm_config["configuration"]["value"].as_str().unwrap();
    let config = Config::parse(plugin.as_bytes()).unwrap();
    let store_cluster = config.store.cluster.clone();

    // The patched filters in an HCM, with the clusters they name, pass `envoy --mode validate`
    // (the remote module is swapped for the local build: validation does not fetch).
    let (http_filters, _) = e2e::istio_envoyfilter_filters("token", None);
    let bootstrap = e2e::inbound_bootstrap(
        1,
        None,
        "app",
        vec![serde_json::json!({"match": {"prefix": "/"}, "route": {"cluster": "app"}})],
        http_filters,
        vec![
            e2e::static_cluster("app", 1),
            e2e::static_cluster(&store_cluster, 1),
        ],
    );
    let hcm = e2e::istio_patches("envoy/istio/envoyfilter.yaml", "token", None).hcm_merge;
    assert!(hcm["early_header_mutation_extensions"].is_array(), "{hcm}");
    let bootstrap = e2e::with_hcm_merge(bootstrap, &hcm);
    e2e::assert_envoy_accepts(&bootstrap.to_string(), "envoyfilter-bootstrap.json");
}

#[test]
fn kubernetes_store_deployment_uses_only_what_the_store_reads() {
    let (flags, env) = store_flags_and_env();
    let docs = documents("envoy/kubernetes/store.yaml");
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    for kind in [
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
    ] {
        assert!(kinds.contains(&kind), "{kind} in {kinds:?}");
    }
    let deployment = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    let container = &get(deployment, &["spec", "template", "spec", "containers"])[0];

    let args: Vec<&str> = container["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    for arg in args.iter().filter(|a| a.starts_with("--")) {
        assert!(flags.contains(*arg), "{arg} is not a store flag ({flags:?})");
    }
    let listen = args[args.iter().position(|a| *a == "--listen").unwrap() + 1];
    let port: u64 = listen.rsplit(':').next().unwrap().parse().unwrap();
    assert_eq!(container["ports"][0]["containerPort"].as_u64(), Some(port));

    let secret = &documents("envoy/kubernetes/secret.example.yaml")[0];
    let mut names = BTreeSet::new();
    for var in container["env"].as_sequence().unwrap() {
        let name = var["name"].as_str().unwrap();
        // Besides its own variables the store reads RUST_LOG (logging) and MIMALLOC_* (its
        // allocator, at start).
        assert!(
            env.contains(name) || name == "RUST_LOG" || name == "MIMALLOC_PURGE_DELAY",
            "{name} is not read by the store ({env:?})"
        );
        if let Some(key) = var["valueFrom"]["secretKeyRef"]["key"].as_str() {
            assert_eq!(
                var["valueFrom"]["secretKeyRef"]["name"],
                secret["metadata"]["name"]
            );
            assert!(
                !secret["stringData"][key].is_null(),
                "secret key {key} missing in the example Secret"
            );
        }
        names.insert(name.to_owned());
    }
    for required in ["MONGODB_URI", "STORE_CREDENTIALS", "STORE_REPLAY_SECRET_FILE"] {
        assert!(names.contains(required), "{required} must be set");
    }
    assert!(
        !names.contains("STORE_TOKEN"),
        "production uses roles, not the all-roles token"
    );
    // The mounted credentials and replay secrets are the Secret's, and the store's own parsers
    // accept them; the proxies are known by their mesh identity, bound to their service.
    let file = secret["stringData"]["credentials.yaml"].as_str().unwrap();
    let credentials = idempotency_store::auth::Credentials::from_yaml(file).unwrap();
    let orders = credentials
        .authenticate_identity(&["spiffe://cluster.local/ns/shop/sa/orders".into()])
        .expect("the orders workload's identity is a credential");
    assert!(orders.may_act_for(idempotency_store::auth::Permission::ProxyCalls, "orders"));
    assert!(!orders.may_act_for(idempotency_store::auth::Permission::ProxyCalls, "payments"));
    idempotency_store::replay::parse_secrets(secret["stringData"]["replay-secrets"].as_str().unwrap())
        .unwrap();
    let items: Vec<&str> = get(deployment, &["spec", "template", "spec", "volumes"])[0]["secret"]["items"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|i| i["key"].as_str().unwrap())
        .collect();
    assert_eq!(items, ["credentials.yaml", "replay-secrets"]);
    // The replay port is the store's --replay-listen, and the Service exposes it.
    let replay = args[args.iter().position(|a| *a == "--replay-listen").unwrap() + 1];
    let replay_port: u64 = replay.rsplit(':').next().unwrap().parse().unwrap();
    assert_eq!(container["ports"][1]["containerPort"].as_u64(), Some(replay_port));
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert!(!container["resources"]["requests"].is_null() && !container["resources"]["limits"].is_null());
    let service = docs.iter().find(|d| d["kind"] == "Service").unwrap();
    assert_eq!(
        service["spec"]["ports"][0]["targetPort"],
        container["ports"][0]["name"]
    );
}

#[test]
fn compose_store_environment_uses_only_what_the_store_reads() {
    let (_, env) = store_flags_and_env();
    let compose = &documents("envoy/compose/docker-compose.yaml")[0];
    let store_env = compose["services"]["store"]["environment"].as_mapping().unwrap();
    for name in store_env.keys() {
        let name = name.as_str().unwrap();
        assert!(env.contains(name), "{name} is not read by the store");
    }
    for service in ["mongo", "store", "demo", "envoy"] {
        assert!(!compose["services"][service].is_null(), "{service}");
    }
}

#[test]
fn every_shipped_config_that_runs_the_filter_removes_every_internal_header_before_routing() {
    let mut checked = 0;
    for path in shipped_yaml_files() {
        let text = std::fs::read_to_string(&path).unwrap();
        if !text.contains("filters.http.wasm.v3.Wasm") {
            continue;
        }
        checked += 1;
        let name = path.display();
        assert!(
            text.contains("early_header_mutation_extensions"),
            "{name}: internal headers must be removed before route selection"
        );
        assert!(
            !text.contains("filters.http.header_mutation.v3"),
            "{name}: an HTTP-filter strip runs after routing"
        );
        for header in idempotency_wire::headers::ALL {
            assert!(
                text.contains(&format!("remove: {header}")),
                "{name} does not strip {header}"
            );
        }
    }
    assert!(checked >= 6, "{checked} configs");
}

#[test]
fn istio_envoyfilter_for_grpc_adds_the_replay_route_first_and_envoy_accepts_it() {
    let ((filters, shipped), routes) =
        e2e::istio_envoyfilter_parts("envoy/istio/envoyfilter-grpc.yaml", "token", None);
    let config = Config::parse(shipped.to_string().as_bytes()).unwrap();
    assert!(!config.policy.streaming_methods.is_empty());
    assert_eq!(routes.len(), 1);
    assert_eq!(
        routes[0]["match"]["headers"][0]["name"],
        idempotency_wire::headers::REPLAY_TICKET
    );
    assert_eq!(routes[0]["match"]["path"], idempotency_wire::paths::REPLAY);
    let replay_cluster = routes[0]["route"]["cluster"].as_str().unwrap().to_owned();
    assert_eq!(
        replay_cluster,
        config.store.cluster.replace("|8081|", "|8082|"),
        "the replay goes to the replay port of the store the filter calls"
    );
    let mut all_routes = routes.clone();
    all_routes.push(serde_json::json!({"match": {"prefix": "/"}, "route": {"cluster": "app"}}));
    let bootstrap = e2e::inbound_bootstrap(
        1,
        None,
        "inbound|http|50051",
        all_routes,
        filters,
        vec![
            e2e::static_cluster("app", 1),
            e2e::static_cluster(&config.store.cluster, 1),
            e2e::static_cluster(&replay_cluster, 1),
        ],
    );
    let hcm = e2e::istio_patches("envoy/istio/envoyfilter-grpc.yaml", "token", None).hcm_merge;
    let bootstrap = e2e::with_hcm_merge(bootstrap, &hcm);
    e2e::assert_envoy_accepts(&bootstrap.to_string(), "envoyfilter-grpc-bootstrap.json");
}

#[test]
fn compose_tokens_match_the_roles_in_its_credentials_file() {
    let credentials = std::fs::read_to_string(repo_root().join("envoy/compose/credentials.yaml")).unwrap();
    let credentials = idempotency_store::auth::Credentials::from_yaml(&credentials).unwrap();
    let envoy = std::fs::read_to_string(repo_root().join("envoy/compose/envoy.yaml")).unwrap();
    let proxy_token = envoy
        .split("\"store_token\": \"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap();
    let proxy = credentials
        .authenticate(proxy_token)
        .expect("Envoy's store_token is a known token");
    assert!(proxy.may_act_for(idempotency_store::auth::Permission::ProxyCalls, "orders"));
    assert!(
        !proxy.may_act_for(idempotency_store::auth::Permission::ProxyCalls, "payments"),
        "the proxy credential is bound to its service"
    );
    let compose = &documents("envoy/compose/docker-compose.yaml")[0];
    let demo_token = compose["services"]["demo"]["environment"]["DEMO_STORE_TOKEN"]
        .as_str()
        .unwrap();
    let demo = credentials
        .authenticate(demo_token)
        .expect("the demo's token is a known token");
    assert!(demo.may_act_for(idempotency_store::auth::Permission::Checkpoint, "orders"));
    assert!(!demo.may(idempotency_store::auth::Permission::ProxyCalls));
}
