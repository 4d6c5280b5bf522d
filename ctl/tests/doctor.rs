//! `idempotencyctl doctor` through its real binary: every shipped Envoy configuration passes with
//! no error; each rule catches a broken copy of a shipped file (the mistakes operators and this
//! project's own files have made); a running Envoy (its `/config_dump`) and store pass too.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)] // test code

use std::process::{Command, Output};

use e2e::{repo_root, ShippedStack, STORE_TOKEN};
use serde_json::{json, Value};

fn doctor(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_idempotencyctl"))
        .arg("--json")
        .arg("doctor")
        .args(args)
        .output()
        .unwrap()
}

/// Doctor's JSON report and exit code for `config` (written to a file).
fn report_of(config: &Value) -> (Value, i32) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("envoy.json");
    std::fs::write(&path, config.to_string()).unwrap();
    let output = doctor(&["--envoy-config", path.to_str().unwrap()]);
    parse_report(&output)
}

fn parse_report(output: &Output) -> (Value, i32) {
    let text = String::from_utf8_lossy(&output.stdout);
    let report: Value = serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("{e}: {text}{}", String::from_utf8_lossy(&output.stderr)));
    (report, output.status.code().unwrap_or(-1))
}

/// Every YAML document of a shipped file, as JSON values.
fn shipped(file: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(repo_root().join("envoy").join(file)).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect()
}

fn rules_of(report: &Value, severity: &str) -> Vec<String> {
    report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["severity"] == severity)
        .map(|f| f["rule"].as_str().unwrap().to_owned())
        .collect()
}

/// The one connection manager of a shipped bootstrap.
fn manager(config: &mut Value) -> &mut Value {
    config
        .pointer_mut("/static_resources/listeners/0/filter_chains/0/filters/0/typed_config")
        .unwrap()
}

/// The Wasm filter's `config` inside the composite filter of a shipped bootstrap.
fn wasm_config(config: &mut Value) -> &mut Value {
    manager(config)
        .pointer_mut("/http_filters/0/typed_config/xds_matcher/matcher_list/matchers/0/on_match/action/typed_config/typed_config/typed_config/config")
        .unwrap()
}

fn set_plugin(config: &mut Value, field: &str, value: Value) {
    let wasm = wasm_config(config);
    let mut plugin: Value = serde_json::from_str(wasm["configuration"]["value"].as_str().unwrap()).unwrap();
    plugin[field] = value;
    wasm["configuration"]["value"] = Value::String(plugin.to_string());
}

fn routes(config: &mut Value) -> &mut Vec<Value> {
    manager(config)
        .pointer_mut("/route_config/virtual_hosts/0/routes")
        .and_then(Value::as_array_mut)
        .unwrap()
}

/// Assert that `config` (a broken copy) fails `rule` with `severity` (and exits accordingly).
fn assert_caught(config: &Value, rule: &str, severity: &str) {
    let (report, code) = report_of(config);
    assert!(
        rules_of(&report, severity).iter().any(|r| r == rule),
        "{rule} not reported as {severity}: {report:#}"
    );
    let expected = if severity == "error" { 2 } else { 1 };
    assert!(code >= expected, "exit {code} for a {severity}: {report}");
}

#[test]
fn every_shipped_configuration_passes_without_error() {
    for file in [
        "envoy.yaml",
        "envoy-two-routes.yaml",
        "envoy-grpc.yaml",
        "compose/envoy.yaml",
        "istio/envoyfilter.yaml",
        "istio/envoyfilter-grpc.yaml",
    ] {
        let path = repo_root().join("envoy").join(file);
        let (report, code) = parse_report(&doctor(&["--envoy-config", path.to_str().unwrap()]));
        assert_eq!(report["errors"], 0, "{file}: {report:#}");
        assert!(code == 0 || code == 1, "{file}: exit {code}");
    }
}

#[test]
fn a_strip_after_routing_or_none_is_an_error() {
    let mut config = shipped("envoy.yaml").remove(0);
    // Moved from before routing to an HTTP filter: too late.
    let strip = manager(&mut config)["early_header_mutation_extensions"].take();
    let mutations = strip[0]["typed_config"]["mutations"].clone();
    manager(&mut config)["early_header_mutation_extensions"] = json!([]);
    manager(&mut config)["http_filters"]
        .as_array_mut()
        .unwrap()
        .insert(
            0,
            json!({"name": "strip", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
            "mutations": {"request_mutations": mutations}}}),
        );
    assert_caught(&config, "strip-before-routing", "error");
    // One header forgotten.
    let mut config = shipped("envoy.yaml").remove(0);
    manager(&mut config)["early_header_mutation_extensions"][0]["typed_config"]["mutations"]
        .as_array_mut()
        .unwrap()
        .retain(|m| m["remove"] != "x-idempotency-replay-ticket");
    assert_caught(&config, "strip-before-routing", "error");
    // The Istio patch without its NETWORK_FILTER merge.
    let mut filter = shipped("istio/envoyfilter.yaml").remove(0);
    filter["spec"]["configPatches"]
        .as_array_mut()
        .unwrap()
        .retain(|p| p["applyTo"] != "NETWORK_FILTER");
    assert_caught(&filter, "strip-before-routing", "error");
}

#[test]
fn a_replay_route_that_is_not_first_is_an_error_and_a_missing_one_a_warning() {
    let mut config = shipped("envoy-grpc.yaml").remove(0);
    routes(&mut config).swap(0, 1);
    assert_caught(&config, "replay-route-first", "error");
    let mut config = shipped("envoy-grpc.yaml").remove(0);
    routes(&mut config).remove(0);
    assert_caught(&config, "replay-route", "warning");
}

#[test]
fn a_replay_cluster_without_http2_or_missing_is_an_error() {
    let mut config = shipped("envoy-grpc.yaml").remove(0);
    for cluster in config["static_resources"]["clusters"].as_array_mut().unwrap() {
        if cluster["name"] == "idempotency_store_replay" {
            cluster
                .as_object_mut()
                .unwrap()
                .remove("typed_extension_protocol_options");
        }
    }
    assert_caught(&config, "replay-cluster-http2", "error");
    let mut config = shipped("envoy-grpc.yaml").remove(0);
    config["static_resources"]["clusters"]
        .as_array_mut()
        .unwrap()
        .retain(|c| c["name"] != "idempotency_store_replay");
    assert_caught(&config, "replay-cluster", "error");
}

#[test]
fn filter_settings_that_break_the_guarantee_are_caught() {
    let mut config = shipped("envoy.yaml").remove(0);
    wasm_config(&mut config)
        .as_object_mut()
        .unwrap()
        .remove("allow_on_headers_stop_iteration");
    assert_caught(&config, "allow-on-headers-stop-iteration", "error");

    let mut config = shipped("envoy.yaml").remove(0);
    wasm_config(&mut config)
        .as_object_mut()
        .unwrap()
        .remove("failure_policy");
    assert_caught(&config, "failure-policy", "warning");

    let mut config = shipped("envoy.yaml").remove(0);
    set_plugin(&mut config, "store_cluster", json!("no_such_cluster"));
    assert_caught(&config, "store-cluster", "error");
}

#[test]
fn a_buffer_limit_below_max_response_size_is_an_error() {
    let mut config = shipped("envoy.yaml").remove(0);
    config["static_resources"]["listeners"][0]["per_connection_buffer_limit_bytes"] = json!(65_536);
    assert_caught(&config, "buffer-limit", "error");
    // Envoy's default (1 MiB) against a raised max_response_size.
    let mut config = shipped("envoy.yaml").remove(0);
    config["static_resources"]["listeners"][0]
        .as_object_mut()
        .unwrap()
        .remove("per_connection_buffer_limit_bytes");
    set_plugin(&mut config, "max_response_size", json!(4_194_304));
    assert_caught(&config, "buffer-limit", "error");
}

#[test]
fn router_retries_behind_the_filter_are_an_error_only_when_the_filter_allows_them() {
    let mut config = shipped("envoy.yaml").remove(0);
    routes(&mut config)[1]["route"]["retry_policy"] = json!({"retry_on": "5xx,reset", "num_retries": 2});
    // The default block_router_retries sends tracked requests once: a warning, not an error.
    let (report, _) = report_of(&config);
    assert!(
        !rules_of(&report, "error").contains(&"router-retries".to_owned()),
        "{report:#}"
    );
    assert!(
        rules_of(&report, "warning").contains(&"router-retries".to_owned()),
        "{report:#}"
    );
    set_plugin(&mut config, "block_router_retries", json!(false));
    assert_caught(&config, "router-retries", "error");
    // Only conditions that prove the request never left: fine even then.
    routes(&mut config)[1]["route"]["retry_policy"] =
        json!({"retry_on": "connect-failure,refused-stream", "num_retries": 2});
    let (report, _) = report_of(&config);
    assert!(
        !rules_of(&report, "error").contains(&"router-retries".to_owned())
            && !rules_of(&report, "warning").contains(&"router-retries".to_owned()),
        "{report:#}"
    );

    let mut config = shipped("envoy.yaml").remove(0);
    routes(&mut config)[1]["route"]["internal_redirect_policy"] = json!({"redirect_response_codes": [307]});
    assert_caught(&config, "internal-redirect", "warning");
}

#[test]
fn a_composite_matcher_that_skips_methods_or_keyless_requests_on_required_routes_is_an_error() {
    let mut config = shipped("envoy.yaml").remove(0);
    let method = manager(&mut config)
        .pointer_mut("/http_filters/0/typed_config/xds_matcher/matcher_list/matchers/0/predicate/and_matcher/predicate/0/single_predicate/value_match/safe_regex/regex")
        .unwrap();
    *method = json!("^(POST|PUT)$");
    assert_caught(&config, "composite-methods", "error");
    let mut config = shipped("envoy.yaml").remove(0);
    set_plugin(&mut config, "require_key", json!(true));
    assert_caught(&config, "composite-required-key", "error");
}

#[test]
fn two_modules_under_one_vm_id_are_an_error() {
    let mut config = shipped("envoy.yaml").remove(0);
    let mut second = manager(&mut config)["http_filters"][0].clone();
    second["name"] = json!("idempotency-other");
    second
        .pointer_mut("/typed_config/xds_matcher/matcher_list/matchers/0/on_match/action/typed_config/typed_config/typed_config/config/vm_config/code/local/filename")
        .map(|f| *f = json!("other.wasm"))
        .unwrap();
    manager(&mut config)["http_filters"]
        .as_array_mut()
        .unwrap()
        .insert(1, second);
    assert_caught(&config, "vm-id", "error");
}

#[test]
fn no_filter_at_all_and_an_unreadable_file_are_reported() {
    let mut config = shipped("envoy.yaml").remove(0);
    manager(&mut config)["http_filters"]
        .as_array_mut()
        .unwrap()
        .remove(0);
    assert_caught(&config, "filter-present", "error");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("not-envoy.yaml");
    std::fs::write(&path, "kind: Service\n").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_idempotencyctl"))
        .args(["doctor", "--envoy-config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&output.stderr).contains("found no Envoy bootstrap"));
}

#[tokio::test]
async fn a_running_envoy_and_store_pass_and_the_table_says_so() {
    let stack = ShippedStack::start("envoy.yaml").await;
    let store = stack_store_url(&stack).await;
    let output = Command::new(env!("CARGO_BIN_EXE_idempotencyctl"))
        .args([
            "--token",
            STORE_TOKEN,
            "--json",
            "doctor",
            "--envoy-admin",
            &stack.admin_url,
            "--store",
            &store,
        ])
        .output()
        .unwrap();
    let (report, code) = parse_report(&output);
    assert_eq!(report["errors"], 0, "{report:#}");
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["store"]["info"]["backend"], "embedded", "{report:#}");
    assert!(report["store"]["info"]["replay_listen"].is_string());
    assert!(report["store"]["clock_skew_ms"].as_i64().unwrap().abs() < 2_000);
    // The human table.
    let output = Command::new(env!("CARGO_BIN_EXE_idempotencyctl"))
        .args([
            "--token",
            STORE_TOKEN,
            "doctor",
            "--envoy-admin",
            &stack.admin_url,
            "--store",
            &store,
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.contains("every check passed") && text.contains("backend embedded"),
        "{text}"
    );
    // A store that is down: an error, exit 2.
    let output = Command::new(env!("CARGO_BIN_EXE_idempotencyctl"))
        .args([
            "--json",
            "doctor",
            "--envoy-admin",
            &stack.admin_url,
            "--store",
            "http://127.0.0.1:9",
        ])
        .output()
        .unwrap();
    let (report, code) = parse_report(&output);
    assert_eq!(code, 2, "{report:#}");
    assert!(rules_of(&report, "error").contains(&"store-reachable".to_owned()));
}

/// The store API address of a shipped stack, from Envoy's own view of `idempotency_store`.
async fn stack_store_url(stack: &ShippedStack) -> String {
    let clusters = e2e::get_text(
        &stack.client,
        &format!("{}/clusters?format=json", stack.admin_url),
    )
    .await;
    let clusters: Value = serde_json::from_str(&clusters).unwrap();
    let store = clusters["cluster_statuses"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "idempotency_store")
        .unwrap();
    let address = &store["host_statuses"][0]["address"]["socket_address"];
    format!(
        "http://{}:{}",
        address["address"].as_str().unwrap(),
        address["port_value"]
    )
}
