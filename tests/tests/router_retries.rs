//! Envoy's router never sends a tracked request twice, from the client's side: a caller's own
//! `x-envoy-*` retry headers, and a gateway route's `retry_policy` with an upstream that does the
//! work and then resets, run the request once; the lock is kept (the retry is told the outcome
//! is unknown). Each test runs the same setup with `block_router_retries: false` too, and sees
//! the router run the request again: the hazard is real here, and the filter is what stops it.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::sync::atomic::Ordering;
use std::time::Duration;

use e2e::gateway::{default_route, envoy_in_front_of, gateway, resetting_upstream};
use e2e::{free_port, wait_ready};
use serde_json::{json, Value};

fn order() -> Value {
    json!({"customerId": "C-1", "items": [{"sku": "S-1", "quantity": 1}]})
}

/// Executions of one keyed POST whose caller, one Envoy treats as internal (its address is in
/// `internal_address_config`, with `use_remote_address`), asks Envoy to retry even a 201, three
/// times.
async fn executions_with_caller_retry_headers(block_router_retries: bool) -> u64 {
    let dir = tempfile::tempdir().unwrap();
    let demo_port = free_port();
    let (url, _store, _envoy) = envoy_in_front_of(
        dir.path(),
        demo_port,
        &json!({"block_router_retries": block_router_retries}),
        |config| {
            let hcm = config
                .pointer_mut("/static_resources/listeners/0/filter_chains/0/filters/0/typed_config")
                .unwrap();
            hcm["use_remote_address"] = json!(true);
            // Envoy 1.40 trusts no address as internal unless told which.
            hcm["internal_address_config"] =
                json!({"cidr_ranges": [{"address_prefix": "127.0.0.1", "prefix_len": 32}]});
        },
    )
    .await;
    let mut demo = e2e::spawn_demo(dir.path(), demo_port, free_port());
    wait_ready(
        &format!("http://127.0.0.1:{demo_port}/healthz"),
        &mut demo,
        Duration::from_secs(30),
    )
    .await;
    let client = reqwest::Client::new();
    let response = client
        .post(format!("{url}/api/v1/orders"))
        .header("Idempotency-Key", "retry-me")
        .header("x-envoy-retry-on", "retriable-status-codes")
        .header("x-envoy-retriable-status-codes", "201")
        .header("x-envoy-max-retries", "3")
        .json(&order())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let executions = e2e::demo_executions(&client, &format!("http://127.0.0.1:{demo_port}")).await;
    executions["byKey"]["retry-me"].as_u64().unwrap_or(0)
}

#[tokio::test]
async fn a_callers_retry_headers_cannot_make_envoy_run_a_tracked_request_twice() {
    assert_eq!(executions_with_caller_retry_headers(true).await, 1);
    assert_eq!(
        executions_with_caller_retry_headers(false).await,
        4,
        "without the filter's word, Envoy's router runs it again"
    );
}

#[tokio::test]
async fn a_route_retry_policy_cannot_run_a_request_again_after_the_upstream_did_the_work_and_reset() {
    let dir = tempfile::tempdir().unwrap();
    let (upstream, executions) = resetting_upstream().await;
    let (url, _store, _envoy) = gateway(dir.path(), upstream, true).await;
    let client = reqwest::Client::new();
    let post = || {
        client
            .post(format!("{url}/api/v1/orders"))
            .header("Idempotency-Key", "reset-1")
            .json(&order())
    };
    let first = post().send().await.unwrap();
    assert!(first.status().is_server_error(), "{}", first.status());
    assert_eq!(
        executions.load(Ordering::SeqCst),
        1,
        "one execution, no router retry"
    );
    // Retries, at once and until the record says why: 409, the lock is kept (it may have run).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let retry = post().send().await.unwrap();
        assert_eq!(retry.status(), 409, "the lock is kept: it may have run");
        let body: Value = retry.json().await.unwrap();
        if body["details"]["outcomeUnknown"] == true {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never marked outcome unknown: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(executions.load(Ordering::SeqCst), 1);

    // The same gateway without the filter's word: the router runs it three times.
    let dir = tempfile::tempdir().unwrap();
    let (upstream, executions) = resetting_upstream().await;
    let (url, _store, _envoy) = gateway(dir.path(), upstream, false).await;
    let _ = client
        .post(format!("{url}/api/v1/orders"))
        .header("Idempotency-Key", "reset-2")
        .json(&order())
        .send()
        .await
        .unwrap();
    assert_eq!(
        executions.load(Ordering::SeqCst),
        3,
        "the hazard the filter removes"
    );
}

#[tokio::test]
async fn a_request_that_never_reached_the_upstream_is_released_and_the_clients_retry_runs_once() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens on the upstream's port yet: every try's connection is refused.
    let upstream = free_port();
    let (url, _store, _envoy) = gateway(dir.path(), upstream, true).await;
    let client = reqwest::Client::new();
    let post = || {
        client
            .post(format!("{url}/api/v1/orders"))
            .header("Idempotency-Key", "refused-1")
            .json(&order())
    };
    let first = post().send().await.unwrap();
    assert_eq!(first.status(), 503, "Envoy could not connect");
    // The upstream comes up; the client's keyed retry is not told "in progress": it runs, once.
    let mut demo = e2e::spawn_demo(dir.path(), upstream, free_port());
    wait_ready(
        &format!("http://127.0.0.1:{upstream}/healthz"),
        &mut demo,
        Duration::from_secs(30),
    )
    .await;
    let retry = post().send().await.unwrap();
    assert_eq!(retry.status(), 201);
    let again = post().send().await.unwrap();
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let executions = e2e::demo_executions(&client, &format!("http://127.0.0.1:{upstream}")).await;
    assert_eq!(executions["byKey"]["refused-1"], 1);
}

#[tokio::test]
async fn with_router_retries_allowed_a_release_after_several_tries_keeps_the_lock() {
    // An operator turned `block_router_retries` off and the route retries 503s: Envoy's router
    // ran the request twice (both answered 503). The 503 describes the last try only; the
    // filter reads the router's attempt count and keeps the lock instead of releasing it.
    let dir = tempfile::tempdir().unwrap();
    let demo_port = free_port();
    let mut demo = e2e::spawn_demo(dir.path(), demo_port, free_port());
    let (url, _store, envoy) = envoy_in_front_of(
        dir.path(),
        demo_port,
        &json!({"block_router_retries": false}),
        |config| {
            default_route(config)["route"]["retry_policy"] = json!({
                "retry_on": "retriable-status-codes",
                "retriable_status_codes": [503],
                "num_retries": 1
            });
        },
    )
    .await;
    wait_ready(
        &format!("http://127.0.0.1:{demo_port}/healthz"),
        &mut demo,
        Duration::from_secs(30),
    )
    .await;
    let client = reqwest::Client::new();
    let post = || {
        client
            .post(format!("{url}/api/v1/orders"))
            .header("Idempotency-Key", "tried-twice")
            .json(&order())
    };
    let first = post().header("x-demo-fail", "503").send().await.unwrap();
    assert_eq!(first.status(), 503);
    let demo_url = format!("http://127.0.0.1:{demo_port}");
    assert_eq!(
        e2e::demo_executions(&client, &demo_url).await["byKey"]["tried-twice"],
        2,
        "the router retried behind the filter (allowed here)"
    );
    let retry = post().send().await.unwrap();
    assert_eq!(
        retry.status(),
        409,
        "not released: an earlier try may have done the work"
    );
    assert_eq!(
        e2e::demo_executions(&client, &demo_url).await["byKey"]["tried-twice"],
        2,
        "the client's retry did not run a third time"
    );
    assert!(
        envoy.output().contains("router made 2 attempts"),
        "the filter read the attempt count"
    );
}

/// An upstream whose `POST /api/v1/orders` answers `307` to `/api/v1/orders/moved` (counting
/// nothing: a redirect does no work) and whose `/api/v1/orders/moved` does the work (counted).
async fn redirecting_upstream() -> (u16, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let executions = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counted = executions.clone();
    let app = axum::Router::new()
        .route(
            "/api/v1/orders",
            axum::routing::post(|| async {
                (
                    StatusCode::TEMPORARY_REDIRECT,
                    [("location", "/api/v1/orders/moved")],
                )
                    .into_response()
            }),
        )
        .route(
            "/api/v1/orders/moved",
            axum::routing::post(move || {
                let counted = counted.clone();
                async move {
                    counted.fetch_add(1, Ordering::SeqCst);
                    (StatusCode::CREATED, "{\"orderId\":\"moved\"}").into_response()
                }
            }),
        );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (port, executions)
}

#[tokio::test]
async fn an_internal_redirect_never_runs_a_tracked_request_twice() {
    let dir = tempfile::tempdir().unwrap();
    let (upstream, executions) = redirecting_upstream().await;
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let (url, _store, envoy) = envoy_in_front_of(dir.path(), upstream, &json!({}), |config| {
        default_route(config)["route"]["internal_redirect_policy"] =
            json!({"redirect_response_codes": [307], "max_internal_redirects": 1});
    })
    .await;
    let post = || {
        client
            .post(format!("{url}/api/v1/orders"))
            .header("Idempotency-Key", "redirected-1")
            .json(&order())
    };
    let first = post().send().await.unwrap();
    let first_status = first.status();
    let first_body = first.text().await.unwrap();
    let mut statuses = vec![first_status.as_u16()];
    for _ in 0..3 {
        let retry = post().send().await.unwrap();
        statuses.push(retry.status().as_u16());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Whether Envoy follows the redirect (the redirected stream meets the filter again, with
    // another path: 422, and the first stream's lock is kept as outcome unknown) or hands the
    // 307 on (recorded and replayed), the order runs at most once across the retries.
    assert!(
        executions.load(Ordering::SeqCst) <= 1,
        "{statuses:?} {first_body}"
    );
    assert!(!envoy.output().contains("panicked"));
}
