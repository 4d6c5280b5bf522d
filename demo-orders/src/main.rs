//! Demo orders service: the upstream behind Envoy in `make run` and the end-to-end tests.
//!
//! It counts every execution of a mutating request (total and per idempotency key) and every
//! time two executions of one key overlapped, so tests can prove exactly-once. With
//! `--executions-log FILE` each execution is appended to that file and the counts are read back
//! at start, so they survive a crash or restart of the service. Work runs in its own task: like
//! most real services it finishes even when the caller (Envoy) has gone away. Test knobs: `x-demo-fail: <status>` answers that status,
//! `x-demo-delay-ms: <n>` sleeps first, `x-demo-response-bytes: <n>` pads the body.
//!
//! `POST /api/v1/orders/phased` is the seed's four-phase operation (validate → reserve inventory
//! → create record → notify) using [`PhaseManager`]: it checkpoints each phase in the store and
//! skips phases an earlier attempt finished. `x-demo-fail-after-phase: <n>` fails with 500 after
//! phase n; `x-demo-pause-after-phase: <n>` with `x-demo-pause-ms` sleeps after phase n.

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
use idempotency_client::{ClientError, PhaseManager, StoreClient};
use serde_json::{json, Map, Value};

/// Demo orders service.
#[derive(Debug, Parser)]
#[command(name = "demo-orders", about)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "DEMO_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Store service, for phase checkpoints.
    #[arg(long, env = "DEMO_STORE_URL", default_value = "http://127.0.0.1:8081")]
    store_url: String,
    /// Bearer token of the store service.
    #[arg(
        long,
        env = "DEMO_STORE_TOKEN",
        default_value = "dev-token",
        hide_env_values = true
    )]
    store_token: String,
    /// Append every execution to this file and start from the counts it holds.
    #[arg(long, env = "DEMO_EXECUTIONS_LOG")]
    executions_log: Option<std::path::PathBuf>,
}

/// The seed's four phases of order creation.
const PHASES: [&str; 4] = [
    "validated",
    "inventory_reserved",
    "order_created",
    "notification_sent",
];

struct Counts {
    total: AtomicU64,
    by_key: Mutex<HashMap<String, u64>>,
    /// Executions of a key that started while another of the same key was running.
    overlaps: Mutex<HashMap<String, u64>>,
    running: Mutex<HashMap<String, u64>>,
    phases: Mutex<HashMap<String, u64>>,
    lost_locks: AtomicU64,
    log: Option<Mutex<std::fs::File>>,
    store: StoreClient,
}

type Shared = Arc<Counts>;

/// One line of the executions log.
#[derive(serde::Serialize, serde::Deserialize)]
struct LoggedExecution {
    key: String,
    overlapped: bool,
}

/// An execution in progress; it stops counting as running when dropped.
struct Running {
    counts: Shared,
    key: String,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(mut running) = self.counts.running.lock() {
            if let Some(n) = running.get_mut(&self.key) {
                *n = n.saturating_sub(1);
            }
        }
    }
}

fn add(map: &Mutex<HashMap<String, u64>>, key: &str) -> u64 {
    match map.lock() {
        Ok(mut map) => {
            let n = map.entry(key.to_owned()).or_insert(0);
            *n += 1;
            *n
        }
        Err(_) => 0,
    }
}

/// Record one execution; returns the execution number of this key and its running guard.
fn record_execution(counts: &Shared, headers: &HeaderMap) -> (u64, Running) {
    counts.total.fetch_add(1, Ordering::SeqCst);
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .trim_matches('"')
        .to_owned();
    let overlapped = !key.is_empty() && add(&counts.running, &key) > 1;
    if overlapped {
        add(&counts.overlaps, &key);
        tracing::warn!(key, "two executions of one key overlap");
    }
    if let Some(log) = &counts.log {
        let line = serde_json::to_string(&LoggedExecution {
            key: key.clone(),
            overlapped,
        })
        .unwrap_or_default();
        if let Ok(mut file) = log.lock() {
            use std::io::Write as _;
            // Written before the work starts: a crash right after still counts it.
            if let Err(e) = writeln!(file, "{line}") {
                tracing::error!("cannot append to the executions log: {e}");
            }
        }
    }
    let number = add(&counts.by_key, &key);
    let guard = Running {
        counts: counts.clone(),
        key,
    };
    (number, guard)
}

/// Open the executions log and count what it already holds.
fn open_log(counts: &mut Counts, path: &std::path::Path) -> std::io::Result<()> {
    if let Ok(text) = std::fs::read_to_string(path) {
        for line in text.lines() {
            let Ok(entry) = serde_json::from_str::<LoggedExecution>(line) else {
                continue; // a line torn by a crash
            };
            counts.total.fetch_add(1, Ordering::SeqCst);
            add(&counts.by_key, &entry.key);
            if entry.overlapped {
                add(&counts.overlaps, &entry.key);
            }
        }
    }
    let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    counts.log = Some(Mutex::new(file));
    Ok(())
}

/// Run a handler's work in its own task, so it finishes even when the caller goes away.
async fn detached(work: impl std::future::Future<Output = Response> + Send + 'static) -> Response {
    match tokio::spawn(work).await {
        Ok(response) => response,
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("handler failed: {e}")).into_response(),
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
    detached(create_order_work(counts, headers, body)).await
}

async fn create_order_work(counts: Shared, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    let (execution, _running) = record_execution(&counts, &headers);
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

fn count_phase(counts: &Counts, phase: &str) {
    if let Ok(mut map) = counts.phases.lock() {
        *map.entry(phase.to_owned()).or_insert(0) += 1;
    }
}

async fn create_order_phased(State(counts): State<Shared>, headers: HeaderMap) -> Response {
    detached(create_order_phased_work(counts, headers)).await
}

async fn create_order_phased_work(counts: Shared, headers: HeaderMap) -> Response {
    let (execution, _running) = record_execution(&counts, &headers);
    let fail_after = header_number(&headers, "x-demo-fail-after-phase");
    let pause_after = header_number(&headers, "x-demo-pause-after-phase");
    let pause_ms = header_number(&headers, "x-demo-pause-ms")
        .unwrap_or(0)
        .min(60_000);
    let manager = match PhaseManager::from_headers(&headers, counts.store.clone(), &PHASES) {
        Ok(m) => m,
        Err(e) => return (StatusCode::BAD_REQUEST, Json(json!({"error": e.to_string()}))).into_response(),
    };
    let resumed_from = manager
        .as_ref()
        .and_then(|m| m.recovery_point())
        .map(str::to_owned);
    let (mut ran, mut skipped) = (Vec::new(), Vec::new());
    for (number, phase) in (1u64..).zip(PHASES) {
        if manager.as_ref().is_some_and(|m| m.is_done(phase)) {
            skipped.push(phase);
            continue;
        }
        count_phase(&counts, phase); // the phase's work
        ran.push(phase);
        if let Some(manager) = &manager {
            match manager.checkpoint(phase).await {
                Ok(()) => {}
                Err(ClientError::LostLock) => {
                    counts.lost_locks.fetch_add(1, Ordering::SeqCst);
                    let body = json!({"error": "another attempt took over this request", "phase": phase});
                    return (StatusCode::CONFLICT, Json(body)).into_response();
                }
                Err(e) => {
                    return (StatusCode::BAD_GATEWAY, Json(json!({"error": e.to_string()}))).into_response()
                }
            }
        }
        if fail_after == Some(number) {
            let body = json!({"error": format!("failure injected after phase {number} ({phase})")});
            return (StatusCode::INTERNAL_SERVER_ERROR, Json(body)).into_response();
        }
        if pause_after == Some(number) {
            tokio::time::sleep(Duration::from_millis(pause_ms)).await;
        }
    }
    let body = json!({
        "orderId": format!("ORD-{}", uuid::Uuid::new_v4()),
        "status": "created",
        "execution": execution,
        "phasesRun": ran,
        "phasesSkipped": skipped,
        "resumedFrom": resumed_from,
    });
    (StatusCode::CREATED, Json(body)).into_response()
}

async fn update_order(
    State(counts): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    detached(async move {
        let (execution, _running) = record_execution(&counts, &headers);
        let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let body = json!({"orderId": id, "status": "updated", "request": request, "execution": execution,
                          "idempotency": internal_headers(&headers)});
        respond(&headers, StatusCode::OK, body, &[]).await
    })
    .await
}

async fn delete_order(State(counts): State<Shared>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    detached(async move {
        let (execution, _running) = record_execution(&counts, &headers);
        let body = json!({"orderId": id, "status": "deleted", "execution": execution});
        respond(&headers, StatusCode::OK, body, &[]).await
    })
    .await
}

async fn list_orders(headers: HeaderMap) -> Response {
    Json(json!({"orders": [], "idempotency": internal_headers(&headers)})).into_response()
}

async fn executions(State(counts): State<Shared>) -> Json<Value> {
    let by_key = counts.by_key.lock().map(|m| m.clone()).unwrap_or_default();
    let phases = counts.phases.lock().map(|m| m.clone()).unwrap_or_default();
    let overlaps = counts.overlaps.lock().map(|m| m.clone()).unwrap_or_default();
    Json(json!({
        "total": counts.total.load(Ordering::SeqCst),
        "byKey": by_key,
        "overlaps": overlaps,
        "phases": phases,
        "lostLocks": counts.lost_locks.load(Ordering::SeqCst),
    }))
}

async fn reset(State(counts): State<Shared>) -> StatusCode {
    counts.total.store(0, Ordering::SeqCst);
    if let Ok(mut map) = counts.by_key.lock() {
        map.clear();
    }
    if let Ok(mut map) = counts.phases.lock() {
        map.clear();
    }
    if let Ok(mut map) = counts.overlaps.lock() {
        map.clear();
    }
    if let Some(log) = &counts.log {
        if let Ok(file) = log.lock() {
            let _ = file.set_len(0);
        }
    }
    counts.lost_locks.store(0, Ordering::SeqCst);
    StatusCode::NO_CONTENT
}

fn app(counts: Shared) -> Router {
    Router::new()
        .route("/api/v1/orders", post(create_order).get(list_orders))
        .route("/api/v1/orders/phased", post(create_order_phased))
        .route(
            "/api/v1/orders/{id}",
            put(update_order).patch(update_order).delete(delete_order),
        )
        .route("/_demo/executions", get(executions))
        .route("/_demo/reset", post(reset))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(counts)
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt().with_writer(std::io::stderr).init();
    let args = Args::parse();
    let store = match StoreClient::new(args.store_url.clone(), Some(args.store_token.clone())) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot create the store client: {e}");
            return ExitCode::from(1);
        }
    };
    let mut counts = Counts {
        total: AtomicU64::new(0),
        by_key: Mutex::new(HashMap::new()),
        overlaps: Mutex::new(HashMap::new()),
        running: Mutex::new(HashMap::new()),
        phases: Mutex::new(HashMap::new()),
        lost_locks: AtomicU64::new(0),
        log: None,
        store,
    };
    if let Some(path) = &args.executions_log {
        if let Err(e) = open_log(&mut counts, path) {
            tracing::error!("cannot open the executions log {}: {e}", path.display());
            return ExitCode::from(1);
        }
    }
    let counts = Arc::new(counts);
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
    match axum::serve(listener, app(counts))
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
