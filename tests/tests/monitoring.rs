//! Observability: the seed's metrics move as they should on the proxy and the store, the seed's
//! PromQL queries return data from a real Prometheus, alert rules pass promtool, the dashboard
//! references only real series, and logs never carry raw keys, bodies or tokens.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)] // test code

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use e2e::{free_port, metric_sum, repo_root, Proc, Stack, StackOptions, STORE_TOKEN};
use serde_json::{json, Value};

#[test]
fn alert_rules_pass_promtool_check_and_unit_tests() {
    let promtool = e2e::debian_tool("PROMTOOL_BIN", "promtool", "prometheus");
    let dir = repo_root().join("envoy/monitoring");
    for args in [
        ["check", "rules", "alerts.yaml"],
        ["test", "rules", "alerts.test.yaml"],
    ] {
        let output = Command::new(&promtool)
            .args(args)
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    // The seed's three alerts are there, with the seed's expressions.
    let rules = std::fs::read_to_string(dir.join("alerts.yaml")).unwrap();
    for expr in [
        "rate(idempotency_parameter_mismatches_total[5m]) > 10",
        "rate(idempotency_storage_errors_total[5m]) > 1",
        "histogram_quantile(0.99, rate(idempotency_lock_acquisition_duration_seconds_bucket[5m])) > 0.5",
    ] {
        assert!(rules.contains(expr), "{expr}");
    }
}

/// The seed's Monitoring queries, verbatim.
const SEED_QUERIES: [&str; 6] = [
    "sum(rate(idempotency_hits_total[5m])) /\n  (sum(rate(idempotency_hits_total[5m])) + sum(rate(idempotency_misses_total[5m])))",
    "rate(idempotency_parameter_mismatches_total[5m])",
    "rate(idempotency_concurrent_collisions_total[5m])",
    "rate(idempotency_storage_errors_total[5m])",
    "histogram_quantile(0.99, rate(idempotency_lock_acquisition_duration_seconds_bucket[5m]))",
    "sum(rate(message_deduplication_hits_total[5m])) by (topic, consumer_group)",
];

const SECRET_KEY: &str = "secret-key-5f1c9a";
const SECRET_BODY: &str = "SECRET-BODY-CONTENT-77";

async fn claim(client: &reqwest::Client, store: &str, message_id: &str) -> Value {
    let body = json!({"service": "orders", "topic": "orders.received", "consumer_group": "order-processor",
                      "message_id": message_id, "lock_timeout_ms": 60000, "retention_ms": 600000});
    let response: Value = client
        .post(format!("{store}/v1/messages/claim"))
        .bearer_auth(STORE_TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    if response["outcome"] == "claimed" {
        let mut done = body.clone();
        done["fencing_token"] = response["fencing_token"].clone();
        done["record_id"] = response["record_id"].clone();
        done["attempt_id"] = response["attempt_id"].clone();
        client
            .post(format!("{store}/v1/messages/complete"))
            .bearer_auth(STORE_TOKEN)
            .json(&done)
            .send()
            .await
            .unwrap();
    }
    response
}

fn start_prometheus(dir: &std::path::Path, envoy_admin: &str, store: &str) -> (Proc, String) {
    let bin = e2e::debian_tool("PROMETHEUS_BIN", "prometheus", "prometheus");
    let port = free_port();
    let target = |url: &str| url.trim_start_matches("http://").to_owned();
    let config = format!(
        "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nscrape_configs:\n  - job_name: envoy\n    metrics_path: /stats/prometheus\n    static_configs: [{{targets: ['{}']}}]\n  - job_name: idempotency-store\n    static_configs: [{{targets: ['{}']}}]\n",
        target(envoy_admin),
        target(store)
    );
    let config_path = dir.join("prometheus.yml");
    std::fs::write(&config_path, config).unwrap();
    let mut command = Command::new(bin);
    command
        .arg(format!("--config.file={}", config_path.display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("tsdb").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"));
    (
        Proc::spawn("prometheus", command, dir.join("prometheus.log")),
        format!("http://127.0.0.1:{port}"),
    )
}

async fn query(client: &reqwest::Client, prometheus: &str, promql: &str) -> Vec<Value> {
    let Ok(response) = client
        .get(format!("{prometheus}/api/v1/query"))
        .query(&[("query", promql)])
        .send()
        .await
    else {
        return Vec::new();
    };
    let body: Value = response.json().await.unwrap_or(Value::Null);
    body["data"]["result"].as_array().cloned().unwrap_or_default()
}

#[tokio::test]
async fn the_seeds_metrics_move_as_expected_and_its_queries_return_data() {
    // 409 at once for the scripted collision (the seed's counter); waiting turns it into a hit.
    let mut stack = Stack::start_with(StackOptions::plugin(json!({"in_progress_wait": "0s"}))).await;
    let dir = tempfile::tempdir().unwrap();
    let (mut prometheus_proc, prometheus) = start_prometheus(dir.path(), &stack.admin_url, &stack.store_url);
    e2e::wait_ready(
        &format!("{prometheus}/-/ready"),
        &mut prometheus_proc,
        Duration::from_secs(30),
    )
    .await;

    // Warm-up: creates the store's labelled series, then let Prometheus scrape them, so the
    // scripted mix below shows as increases (rate() ignores a series' first value).
    stack
        .post_order(Some("warm-up"), &json!({}))
        .send()
        .await
        .unwrap();
    stack
        .post_order(Some("warm-up"), &json!({}))
        .send()
        .await
        .unwrap();
    for id in ["evt-0", "evt-0"] {
        claim(&stack.client, &stack.store_url, id).await;
    }
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while query(
        &client,
        &prometheus,
        "idempotency_hits_total{job=\"idempotency-store\"}",
    )
    .await
    .is_empty()
        || query(&client, &prometheus, "idempotency_hits_total{job=\"envoy\"}")
            .await
            .is_empty()
    {
        assert!(Instant::now() < deadline, "Prometheus never scraped both targets");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let envoy_before = stack.envoy_metrics().await;
    let store_before = stack.store_metrics().await;

    // The scripted mix.
    let order = json!({"note": SECRET_BODY});
    for key in [SECRET_KEY, "mix-2"] {
        assert_eq!(
            stack.post_order(Some(key), &order).send().await.unwrap().status(),
            201
        ); // 2 misses
    }
    for _ in 0..3 {
        let replay = stack.post_order(Some(SECRET_KEY), &order).send().await.unwrap(); // 3 hits
        assert_eq!(replay.headers()["idempotent-replayed"], "true");
    }
    let mismatch = stack
        .post_order(Some("mix-2"), &json!({"other": 1}))
        .send()
        .await
        .unwrap(); // 1 mismatch
    assert_eq!(mismatch.status(), 422);
    let slow = stack
        .post_order(Some("mix-3"), &order)
        .header("x-demo-delay-ms", "500")
        .send(); // 1 miss
    let (slow, collided) = tokio::join!(slow, async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        stack.post_order(Some("mix-3"), &order).send().await // 1 collision
    });
    assert_eq!(slow.unwrap().status(), 201);
    assert_eq!(collided.unwrap().status(), 409);
    for id in ["evt-1", "evt-1", "evt-2"] {
        claim(&stack.client, &stack.store_url, id).await; // 1 duplicate
    }

    // Exact movement at the proxy (Envoy) and the store.
    let envoy = stack.envoy_metrics().await;
    let store = stack.store_metrics().await;
    let moved = |after: &str, before: &str, name: &str| metric_sum(after, name) - metric_sum(before, name);
    for (name, expected) in [
        ("idempotency_misses_total", 3.0),
        ("idempotency_hits_total", 3.0),
        ("idempotency_parameter_mismatches_total", 1.0),
        ("idempotency_concurrent_collisions_total", 1.0),
        ("idempotency_storage_errors_total", 0.0),
    ] {
        assert_eq!(moved(&envoy, &envoy_before, name), expected, "envoy {name}");
        assert_eq!(moved(&store, &store_before, name), expected, "store {name}");
    }
    assert!(
        envoy.contains("idempotency_hits_total{service=\"orders\"} 4"),
        "service label at the proxy"
    );
    assert_eq!(
        moved(&store, &store_before, "message_deduplication_hits_total"),
        1.0
    );
    assert!(store.contains(
        "message_deduplication_hits_total{consumer_group=\"order-processor\",topic=\"orders.received\"} 2"
    ));
    assert_eq!(
        moved(
            &store,
            &store_before,
            "idempotency_lock_acquisition_duration_seconds_count"
        ),
        8.0
    );

    // Envoy flushes histograms every 5 s: the proxy's acquire histogram shows up after that.
    let deadline = Instant::now() + Duration::from_secs(15);
    while metric_sum(
        &stack.envoy_metrics().await,
        "idempotency_lock_acquisition_duration_milliseconds_count",
    ) < 10.0
    {
        assert!(Instant::now() < deadline, "proxy histogram never flushed");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Whole milliseconds rounded up: every acquire took some time, so none may read as 0 ms
    // (a sub-millisecond acquire used to be recorded as 0).
    let proxy = stack.envoy_metrics().await;
    let (count, sum) = (
        metric_sum(&proxy, "idempotency_lock_acquisition_duration_milliseconds_count"),
        metric_sum(&proxy, "idempotency_lock_acquisition_duration_milliseconds_sum"),
    );
    assert!(sum >= count, "{count} acquires recorded as {sum} ms in total");

    // Every seed query returns data from a real Prometheus scraping both.
    let deadline = Instant::now() + Duration::from_secs(45);
    let mut missing: Vec<&str> = SEED_QUERIES.to_vec();
    while !missing.is_empty() && Instant::now() < deadline {
        let mut still = Vec::new();
        for promql in missing {
            let result = query(&client, &prometheus, promql).await;
            let has_data = result.iter().any(|r| {
                r["value"][1]
                    .as_str()
                    .and_then(|v| v.parse::<f64>().ok())
                    .is_some_and(|v| v.is_finite())
            });
            if !has_data {
                still.push(promql);
            }
        }
        missing = still;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    if let Some(first) = missing.first() {
        // Diagnostics for a failure: what Prometheus holds for the query.
        eprintln!("{first} => {:?}", query(&client, &prometheus, first).await);
    }
    assert!(missing.is_empty(), "seed queries without data: {missing:?}");
    let hit_rate = query(&client, &prometheus, SEED_QUERIES[0]).await;
    let value: f64 = hit_rate[0]["value"][1].as_str().unwrap().parse().unwrap();
    assert!((0.0..=1.0).contains(&value), "hit rate {value}");

    // A store outage (after the queries, so Prometheus' windows hold no counter reset): one
    // storage error at the proxy.
    stack.kill_store();
    assert_eq!(
        stack
            .post_order(Some("mix-4"), &order)
            .send()
            .await
            .unwrap()
            .status(),
        503
    );
    assert_eq!(
        metric_sum(&stack.envoy_metrics().await, "idempotency_storage_errors_total"),
        1.0
    );
    stack.restart_store().await;

    // Logs carry key hashes, never raw keys, bodies or tokens.
    let logs: String = std::fs::read_dir(stack.dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
        .filter(|e| !e.file_name().to_string_lossy().starts_with("demo"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .collect();
    assert!(
        logs.contains("idempotency: key "),
        "the filter logs its decisions"
    );
    for secret in [SECRET_KEY, SECRET_BODY, STORE_TOKEN] {
        assert!(!logs.contains(secret), "{secret} leaked into a log");
    }
}

#[tokio::test]
async fn the_dashboard_references_only_series_that_exist() {
    let stack = Stack::start().await;
    stack.post_order(Some("dash-1"), &json!({})).send().await.unwrap();
    stack.post_order(Some("dash-1"), &json!({})).send().await.unwrap();
    for id in ["evt-1", "evt-1"] {
        claim(&stack.client, &stack.store_url, id).await; // a duplicate: the dedup series appears
    }
    let exposed: BTreeSet<String> = [stack.envoy_metrics().await, stack.store_metrics().await]
        .iter()
        .flat_map(|text| {
            text.lines()
                .filter_map(|l| {
                    l.strip_prefix("# TYPE ")
                        .and_then(|t| t.split(' ').next())
                        .map(str::to_owned)
                })
                .collect::<Vec<_>>()
        })
        .collect();
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("envoy/monitoring/dashboard.json")).unwrap(),
    )
    .unwrap();
    let mut referenced = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("idempotency_") || word.starts_with("message_") {
                    let base = ["_bucket", "_count", "_sum"]
                        .iter()
                        .find_map(|s| word.strip_suffix(s))
                        .unwrap_or(word);
                    referenced.insert(base.to_owned());
                }
            }
        }
    }
    assert!(referenced.len() >= 20, "{referenced:?}");
    let unknown: Vec<&String> = referenced
        .iter()
        .filter(|name| !exposed.contains(*name))
        .collect();
    assert!(unknown.is_empty(), "dashboard series nobody exports: {unknown:?}");
}
