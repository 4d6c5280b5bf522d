//! Invalid plugin configuration is refused by name; the shipped Envoy bootstrap is valid and works.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)] // test code

use std::time::Duration;

use e2e::envoy_config::{bootstrap, Ports};
use e2e::{free_port, plugin_config, start_envoy};
use serde_json::json;

fn plugin_value_of_shipped_bootstrap(text: &str) -> String {
    // The filter configuration is the block scalar after `value: |`.
    let mut lines = text
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("value: |"))
        .skip(1);
    let first = lines.next().unwrap();
    let indent = first.len() - first.trim_start().len();
    std::iter::once(first)
        .chain(lines.take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() >= indent))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every Envoy bootstrap shipped under `envoy/` (YAML files with `static_resources`), recursively.
fn shipped_bootstraps() -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = e2e::shipped_yaml_files()
        .into_iter()
        .filter(|p| std::fs::read_to_string(p).unwrap().contains("static_resources:"))
        .collect();
    files.sort();
    files
}

/// Validate an Envoy config with `envoy --mode validate`, pointing any Wasm module at the built one.
fn envoy_validates(text: &str, name: &str) {
    let wasm = e2e::wasm_path().display().to_string();
    let text = text
        .replace(
            "filename: target/wasm32-wasip1/wasm-release/idempotency_filter.wasm",
            &format!("filename: {wasm}"),
        )
        .replace(
            "filename: /etc/envoy/idempotency_filter.wasm",
            &format!("filename: {wasm}"),
        );
    e2e::assert_envoy_accepts(&text, name);
}

#[test]
fn every_shipped_bootstrap_passes_envoy_validation() {
    let files = shipped_bootstraps();
    assert!(files.len() >= 3, "{files:?}");
    for file in files {
        envoy_validates(
            &std::fs::read_to_string(&file).unwrap(),
            &file.display().to_string(),
        );
    }
}

#[test]
fn every_shipped_bootstrap_plugin_configuration_parses_with_the_filters_own_parser() {
    for file in shipped_bootstraps() {
        let text = std::fs::read_to_string(&file).unwrap();
        let plugin = plugin_value_of_shipped_bootstrap(&text);
        let config = idempotency_filter::config::Config::parse(plugin.as_bytes())
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        assert_eq!(config.service_name, "orders", "{}", file.display());
    }
}

#[tokio::test]
async fn invalid_plugin_configuration_is_refused_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let ports = Ports {
        listener: free_port(),
        admin: free_port(),
        upstream: free_port(),
        stores: vec![free_port()],
        replays: Vec::new(),
    };
    let config = bootstrap(&ports, &plugin_config(&json!({"lock_timeout": "soon"})));
    let mut envoy = start_envoy(dir.path(), &config, "envoy.log");
    let status = envoy.wait_exit(Duration::from_secs(60));
    let output = envoy.output();
    assert!(
        status.is_some_and(|s| !s.success()),
        "Envoy must refuse the filter:\n{output}"
    );
    assert!(
        output.contains("`lock_timeout`"),
        "the log names the field:\n{output}"
    );
}

#[tokio::test]
async fn shipped_bootstrap_serves_a_keyed_request_end_to_end() {
    let stack = e2e::ShippedStack::start("envoy.yaml").await;
    let url = format!("{}/api/v1/orders", stack.url);
    for expect_replay in [false, true] {
        let response = stack
            .client
            .post(&url)
            .header("Idempotency-Key", "shipped-1")
            .json(&json!({"sku": "A"}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
        assert_eq!(
            response.headers().contains_key("idempotent-replayed"),
            expect_replay
        );
    }
    assert_eq!(stack.executions_of("shipped-1").await, 1);
}
