//! Gateways in front of and behind the filter, for the retry and status tests: an Envoy with
//! the test bootstrap in front of any upstream (optionally a gateway route that retries), an
//! upstream that does the work and then resets, and an nginx-like hop that gives up waiting.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::envoy_config::{bootstrap, Ports};
use crate::{free_port, plugin_config, spawn_store, start_envoy, wait_ready};

/// An upstream that reads a request, does its work (counts it), then resets the connection
/// without answering.
pub async fn resetting_upstream() -> (u16, Arc<AtomicU64>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let executions = Arc::new(AtomicU64::new(0));
    let counted = executions.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let counted = counted.clone();
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buffer = [0u8; 4096];
                loop {
                    let Ok(n) = socket.read(&mut buffer).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    request.extend_from_slice(&buffer[..n]);
                    let text = String::from_utf8_lossy(&request);
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let length = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                            })
                            .unwrap_or(0);
                        if body.len() >= length {
                            break;
                        }
                    }
                }
                counted.fetch_add(1, Ordering::SeqCst);
                // The work is done; the answer never comes: a reset (RST), as a crashing
                // server's kernel sends.
                let _ = socket.flush().await;
                let _ = socket.set_zero_linger();
                drop(socket);
            });
        }
    });
    (port, executions)
}

/// A store and an Envoy with the test bootstrap (the filter configured with `plugin` over the
/// test defaults, the bootstrap changed by `tweak`) in front of `upstream`;
/// returns (listener URL, store, envoy).
pub async fn envoy_in_front_of(
    dir: &std::path::Path,
    upstream: u16,
    plugin: &Value,
    tweak: impl FnOnce(&mut Value),
) -> (String, crate::Proc, crate::Proc) {
    let (listener, admin, store_port) = (free_port(), free_port(), free_port());
    let mut store = spawn_store(dir, store_port, &dir.join("store-data"), &[], "store.log");
    let ports = Ports {
        listener,
        admin,
        upstream,
        stores: vec![store_port],
        replays: Vec::new(),
    };
    let mut config: Value = serde_json::from_str(&bootstrap(&ports, &plugin_config(plugin))).unwrap();
    tweak(&mut config);
    let mut envoy = start_envoy(dir, &config.to_string(), "envoy.log");
    wait_ready(
        &format!("http://127.0.0.1:{store_port}/readyz"),
        &mut store,
        Duration::from_secs(30),
    )
    .await;
    wait_ready(
        &format!("http://127.0.0.1:{admin}/ready"),
        &mut envoy,
        Duration::from_secs(60),
    )
    .await;
    (format!("http://127.0.0.1:{listener}"), store, envoy)
}

/// The test bootstrap's catch-all route (the last one), to give it a `retry_policy` or an
/// `internal_redirect_policy`.
pub fn default_route(config: &mut Value) -> &mut Value {
    config
        .pointer_mut("/static_resources/listeners/0/filter_chains/0/filters/0/typed_config/route_config/virtual_hosts/0/routes")
        .and_then(Value::as_array_mut)
        .and_then(|routes| routes.last_mut())
        .expect("the test bootstrap has routes")
}

/// A gateway-like Envoy whose route retries `5xx,reset,connect-failure` twice, in front of
/// `upstream`.
pub async fn gateway(
    dir: &std::path::Path,
    upstream: u16,
    block_router_retries: bool,
) -> (String, crate::Proc, crate::Proc) {
    gateway_with_plugin(
        dir,
        upstream,
        &json!({"block_router_retries": block_router_retries}),
    )
    .await
}

/// [`gateway`] with the filter configured by `plugin` (over the test defaults).
pub async fn gateway_with_plugin(
    dir: &std::path::Path,
    upstream: u16,
    plugin: &Value,
) -> (String, crate::Proc, crate::Proc) {
    envoy_in_front_of(dir, upstream, plugin, |config| {
        default_route(config)["route"]["retry_policy"] =
            json!({"retry_on": "5xx,reset,connect-failure", "num_retries": 2});
    })
    .await
}

/// An nginx-like hop in front of `upstream`: it forwards each request and answers `504` itself
/// when the upstream takes longer than `patience` — while the upstream goes on and finishes the
/// work, as a proxy's `proxy_read_timeout` leaves it. Returns the hop's port.
pub async fn impatient_hop(upstream: u16, patience: Duration) -> u16 {
    use axum::body::Bytes;
    use axum::http::{HeaderMap, Method, StatusCode, Uri};
    use axum::response::IntoResponse;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let client = reqwest::Client::builder().timeout(patience).build().unwrap();
    let forward = move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
        let client = client.clone();
        async move {
            let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
            let mut request = client.request(
                reqwest::Method::from_bytes(method.as_str().as_bytes()).unwrap(),
                format!("http://127.0.0.1:{upstream}{path}"),
            );
            for (name, value) in &headers {
                if name != "host" && name != "content-length" {
                    request = request.header(name.as_str(), value.as_bytes());
                }
            }
            match request.body(body).send().await {
                Ok(response) => {
                    let status = StatusCode::from_u16(response.status().as_u16()).unwrap();
                    let body = response.bytes().await.unwrap_or_default();
                    (status, body).into_response()
                }
                Err(e) if e.is_timeout() => (
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream timed out (hop's read timeout)",
                )
                    .into_response(),
                Err(_) => (StatusCode::BAD_GATEWAY, "bad gateway").into_response(),
            }
        }
    };
    let app = axum::Router::new().fallback(forward);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    port
}

/// What an upstream of the gateway storm ran: executions per idempotency key, and how many times
/// two runs of one key overlapped.
#[derive(Debug, Default)]
pub struct WorkLedger {
    /// Runs per key.
    pub executions: std::collections::HashMap<String, u64>,
    /// Runs per key in progress right now.
    running: std::collections::HashMap<String, u64>,
    /// Times a run started while another of the same key was running.
    pub overlaps: u64,
}

/// An upstream that does each request's work (counted per `idempotency-key` in the ledger, taking
/// 100–400 ms), then answers 201 — or, for `reset_percent` of the runs, resets the connection
/// instead of answering, as a crashing app behind a gateway does. One request per connection.
pub async fn work_then_reset_upstream(reset_percent: u64) -> (u16, Arc<std::sync::Mutex<WorkLedger>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let ledger = Arc::new(std::sync::Mutex::new(WorkLedger::default()));
    let shared = ledger.clone();
    let draws = Arc::new(AtomicU64::new(0x9E37_79B9_7F4A_7C15));
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let (ledger, draws) = (shared.clone(), draws.clone());
            tokio::spawn(async move {
                let Some(key) = read_request_key(&mut socket).await else {
                    return;
                };
                {
                    let mut l = ledger.lock().unwrap();
                    *l.executions.entry(key.clone()).or_insert(0) += 1;
                    let running = l.running.entry(key.clone()).or_insert(0);
                    *running += 1;
                    if *running > 1 {
                        l.overlaps += 1;
                    }
                }
                // A splitmix step: a fair, reproducible spread of work times and resets.
                let draw = draws.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::SeqCst);
                let mixed = (draw ^ (draw >> 31)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                tokio::time::sleep(Duration::from_millis(100 + mixed % 300)).await;
                if let Some(running) = ledger.lock().unwrap().running.get_mut(&key) {
                    *running -= 1;
                }
                if (mixed >> 20) % 100 < reset_percent {
                    let _ = socket.set_zero_linger();
                    return; // the work is done; the answer never comes
                }
                let body = format!("{{\"orderId\":\"ORD-{key}\"}}");
                let response = format!(
                    "HTTP/1.1 201 Created\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(response.as_bytes()).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    (port, ledger)
}

/// Read one HTTP/1.1 request (head and `content-length` body); its `idempotency-key`.
async fn read_request_key(socket: &mut tokio::net::TcpStream) -> Option<String> {
    let mut request = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        let n = socket.read(&mut buffer).await.ok()?;
        if n == 0 {
            return None;
        }
        request.extend_from_slice(&buffer[..n]);
        let text = String::from_utf8_lossy(&request);
        let Some((head, body)) = text.split_once("\r\n\r\n") else {
            continue;
        };
        let header = |name: &str| {
            head.lines().find_map(|l| {
                let (n, v) = l.split_once(':')?;
                n.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
            })
        };
        let length = header("content-length")
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(0);
        if body.len() >= length {
            return Some(header("idempotency-key").unwrap_or_default());
        }
    }
}
