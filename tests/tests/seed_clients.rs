//! The seed guide's own clients (its JavaScript and Python code, in `tests/seed-clients/`) against
//! the shipped `envoy/envoy.yaml`, as a user of `make run` would meet them: a double submit (two
//! calls with one key, 50 ms apart, while the service takes 500 ms) ends with the same order for
//! both callers and one execution — the second waits in the store (`in_progress_wait`, 5 s by
//! default) instead of running out of the guide's 100/200 ms retries on 409.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)] // test code

use std::process::Command;

use e2e::{repo_root, ShippedStack};
use serde_json::Value;

/// The shipped bootstrap, with the demo taking 500 ms per order and `plugin_extra` added to the
/// filter's configuration.
async fn shipped_stack_with_a_slow_service(plugin_extra: &str) -> ShippedStack {
    let text = std::fs::read_to_string(repo_root().join("envoy/envoy.yaml")).unwrap();
    let route = "route: { cluster: orders, timeout: 30s }";
    assert!(text.contains(route), "the shipped catch-all route changed");
    let text = text
        .replace(
            route,
            &format!("{route}\n                          request_headers_to_add: [{{ header: {{ key: x-demo-delay-ms, value: \"500\" }} }}]"),
        )
        .replace("\"service_name\": \"orders\",", &format!("\"service_name\": \"orders\",{plugin_extra}"));
    ShippedStack::start_config(&text).await
}

/// Run a seed client's double submit; what each caller ended with.
fn double_submit(program: &str, args: &[&str], key: &str) -> Vec<Value> {
    let output = Command::new(program)
        .args(args)
        .current_dir(repo_root().join("tests/seed-clients"))
        .env("SEED_IDEMPOTENCY_KEY", key)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{program} failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

fn assert_same_order(results: &[Value]) {
    let first = results[0]["orderId"]
        .as_str()
        .unwrap_or_else(|| panic!("{results:?}"));
    assert_eq!(
        results[1]["orderId"], first,
        "both callers get the same order: {results:?}"
    );
}

#[tokio::test]
async fn the_guides_javascript_client_ends_a_double_submit_with_the_same_order() {
    let stack = shipped_stack_with_a_slow_service("").await;
    let results = double_submit("node", &["double_submit.mjs", &stack.url], "seed-js-1");
    assert_same_order(&results);
    assert_eq!(stack.executions_of("seed-js-1").await, 1);

    // With `in_progress_wait: 0s` (409 at once), the guide's retries give up: the reported bug.
    let stack = shipped_stack_with_a_slow_service(" \"in_progress_wait\": \"0s\",").await;
    let results = double_submit("node", &["double_submit.mjs", &stack.url], "seed-js-2");
    assert_eq!(results[1]["error"], "ConcurrentRequestError", "{results:?}");
    assert_eq!(stack.executions_of("seed-js-2").await, 1);
}

#[tokio::test]
async fn the_guides_python_client_ends_a_double_submit_with_the_same_order() {
    let stack = shipped_stack_with_a_slow_service("").await;
    let python = repo_root().join(".venv/bin/python");
    let results = double_submit(
        python.to_str().unwrap(),
        &["double_submit.py", &stack.url, "seed-py-1"],
        "seed-py-1",
    );
    assert_same_order(&results);
    assert_eq!(stack.executions_of("seed-py-1").await, 1);
}
