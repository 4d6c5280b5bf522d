//! Demo orders service: the upstream behind Envoy in `make run` and the end-to-end tests.
//!
//! It counts every execution of a mutating request (total and per idempotency key), so tests
//! can prove exactly-once, and it has test knobs: `x-demo-fail: <status>` answers that status,
//! `x-demo-delay-ms: <n>` sleeps first, `x-demo-response-bytes: <n>` pads the body.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use clap::Parser;
use serde_json::{json, Map, Value};

/// Demo orders service.
#[derive(Debug, Parser)]
#[command(name = "demo-orders", about)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "DEMO_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
}

#[derive(Default)]
struct Counts {
    total: AtomicU64,
    by_key: Mutex<HashMap<String, u64>>,
}

type Shared = Arc<Counts>;

/// Record one execution; returns the execution number of this key.
fn record_execution(counts: &Counts, headers: &HeaderMap) -> u64 {
    counts.total.fetch_add(1, Ordering::SeqCst);
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .trim_matches('"')
        .to_owned();
    match counts.by_key.lock() {
        Ok(mut map) => {
            let n = map.entry(key).or_insert(0);
            *n += 1;
            *n
        }
        Err(_) => 0,
    }
}

fn header_number(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// What the service saw of the idempotency layer: every `x-idempotency-*` header.
fn internal_headers(headers: &HeaderMap) -> Value {
    let seen: Map<String, Value> = headers
        .iter()
        .filter(|(name, _)| name.as_str().starts_with("x-idempotency-"))
        .map(|(name, value)| {
            (
                name.to_string(),
                Value::from(value.to_str().unwrap_or("<binary>")),
            )
        })
        .collect();
    Value::Object(seen)
}

/// Apply the test knobs, then build the response.
async fn respond(
    headers: &HeaderMap,
    status: StatusCode,
    mut body: Value,
    extra: &[(&str, String)],
) -> Response {
    if let Some(ms) = header_number(headers, "x-demo-delay-ms") {
        tokio::time::sleep(Duration::from_millis(ms.min(60_000))).await;
    }
    if let Some(code) = header_number(headers, "x-demo-fail").and_then(|c| u16::try_from(c).ok()) {
        if let Ok(status) = StatusCode::from_u16(code) {
            return (status, Json(json!({"error": "failure injected by x-demo-fail"}))).into_response();
        }
    }
    if let (Some(bytes), Value::Object(map)) = (header_number(headers, "x-demo-response-bytes"), &mut body) {
        map.insert(
            "padding".into(),
            Value::from("x".repeat(usize::try_from(bytes.min(16 << 20)).unwrap_or(0))),
        );
    }
    let mut response = (status, Json(body)).into_response();
    for (name, value) in extra {
        if let (Ok(name), Ok(value)) = (name.parse::<axum::http::HeaderName>(), value.parse()) {
            response.headers_mut().insert(name, value);
        }
    }
    response
}

async fn create_order(State(counts): State<Shared>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    let execution = record_execution(&counts, &headers);
    let order_id = format!("ORD-{}", uuid::Uuid::new_v4());
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let body = json!({
        "orderId": order_id,
        "status": "created",
        "request": request,
        "execution": execution,
        "idempotency": internal_headers(&headers),
    });
    let location = format!("/api/v1/orders/{order_id}");
    respond(
        &headers,
        StatusCode::CREATED,
        body,
        &[("location", location), ("etag", "\"v1\"".into())],
    )
    .await
}

async fn update_order(
    State(counts): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let execution = record_execution(&counts, &headers);
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let body = json!({"orderId": id, "status": "updated", "request": request, "execution": execution,
                      "idempotency": internal_headers(&headers)});
    respond(&headers, StatusCode::OK, body, &[]).await
}

async fn delete_order(State(counts): State<Shared>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    let execution = record_execution(&counts, &headers);
    let body = json!({"orderId": id, "status": "deleted", "execution": execution});
    respond(&headers, StatusCode::OK, body, &[]).await
}

async fn list_orders(headers: HeaderMap) -> Response {
    Json(json!({"orders": [], "idempotency": internal_headers(&headers)})).into_response()
}

async fn executions(State(counts): State<Shared>) -> Json<Value> {
    let by_key = counts.by_key.lock().map(|m| m.clone()).unwrap_or_default();
    Json(json!({"total": counts.total.load(Ordering::SeqCst), "byKey": by_key}))
}

async fn reset(State(counts): State<Shared>) -> StatusCode {
    counts.total.store(0, Ordering::SeqCst);
    if let Ok(mut map) = counts.by_key.lock() {
        map.clear();
    }
    StatusCode::NO_CONTENT
}

fn app() -> Router {
    Router::new()
        .route("/api/v1/orders", post(create_order).get(list_orders))
        .route(
            "/api/v1/orders/{id}",
            put(update_order).patch(update_order).delete(delete_order),
        )
        .route("/_demo/executions", get(executions))
        .route("/_demo/reset", post(reset))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(Shared::default())
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt().with_writer(std::io::stderr).init();
    let args = Args::parse();
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("cannot listen on {}: {e}", args.listen);
            return ExitCode::from(1);
        }
    };
    tracing::info!(listen = %args.listen, "demo orders service ready");
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    match axum::serve(listener, app())
        .with_graceful_shutdown(shutdown)
        .await
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("server failed: {e}");
            ExitCode::from(1)
        }
    }
}
