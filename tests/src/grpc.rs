//! gRPC end-to-end harness: a stock tonic `Orders` server that counts executions per
//! idempotency key, and a stack of store + that server + Envoy (h2c on both sides) with the
//! shipped gRPC routes: the replay route to the store, and the service route.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tonic::{Request, Response, Status};

use crate::envoy_config::{bootstrap, Ports};
use crate::{free_port, plugin_config, spawn_store, start_envoy, wait_ready, Proc};

/// Generated from `proto/orders.proto`.
pub mod pb {
    #![allow(clippy::all, clippy::pedantic, clippy::unwrap_used, missing_docs)]
    tonic::include_proto!("demo");
}

use pb::orders_server::{Orders, OrdersServer};
use pb::{ChatMessage, CreateReply, CreateRequest, Event, EventsRequest};

/// Executions per idempotency key, shared with the test.
pub type Executions = Arc<Mutex<HashMap<String, u64>>>;

/// The test service.
#[derive(Debug, Clone, Default)]
pub struct OrdersService {
    /// Executions per key.
    pub executions: Executions,
}

fn key_of<T>(request: &Request<T>) -> String {
    request
        .metadata()
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

impl OrdersService {
    fn count(&self, key: &str) -> u64 {
        let mut map = self.executions.lock().unwrap();
        let n = map.entry(key.to_owned()).or_insert(0);
        *n += 1;
        *n
    }
}

type ChatStream = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<ChatMessage, Status>> + Send>>;

type EventStream = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<Event, Status>> + Send>>;

#[tonic::async_trait]
impl Orders for OrdersService {
    async fn create(&self, request: Request<CreateRequest>) -> Result<Response<CreateReply>, Status> {
        let key = key_of(&request);
        let execution = self.count(&key);
        let body = request.into_inner();
        if body.delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(u64::from(body.delay_ms))).await;
        }
        if body.fail_code != 0 && (!body.fail_once || execution == 1) {
            let mut status = Status::new(tonic::Code::from(body.fail_code), "failure injected");
            status
                .metadata_mut()
                .insert("x-failed-execution", execution.into());
            return Err(status);
        }
        let mut reply = Response::new(CreateReply {
            order_id: format!("ORD-{}", uuid::Uuid::new_v4()),
            execution,
        });
        reply.metadata_mut().insert("x-order-meta", "m1".parse().unwrap());
        Ok(reply)
    }

    type EventsStream = EventStream;

    async fn events(&self, request: Request<EventsRequest>) -> Result<Response<EventStream>, Status> {
        let key = key_of(&request);
        self.count(&key);
        let body = request.into_inner();
        let order_id = format!("ORD-{}", uuid::Uuid::new_v4());
        let padding = "x".repeat(body.padding_bytes as usize);
        let mut items: Vec<Result<Event, Status>> = (0..body.count)
            .map(|seq| {
                Ok(Event {
                    seq,
                    order_id: order_id.clone(),
                    padding: padding.clone(),
                })
            })
            .collect();
        if body.fail_code != 0 {
            items.push(Err(Status::new(
                tonic::Code::from(body.fail_code),
                "stream failed",
            )));
        }
        Ok(Response::new(Box::pin(tokio_stream::iter(items))))
    }

    type ChatStream = ChatStream;

    async fn chat(
        &self,
        request: Request<tonic::Streaming<ChatMessage>>,
    ) -> Result<Response<ChatStream>, Status> {
        let key = key_of(&request);
        self.count(&key);
        let mut incoming = request.into_inner();
        // Echo each message as it arrives (the answer to one comes before the next is sent).
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            while let Ok(Some(message)) = incoming.message().await {
                if tx.send(Ok(message)).await.is_err() {
                    break;
                }
            }
        });
        let echoes: ChatStream = Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx));
        Ok(Response::new(echoes))
    }
}

/// Start the test service on a free port; it runs until the test's runtime ends.
pub async fn start_server(service: OrdersService) -> u16 {
    let port = free_port();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(OrdersServer::new(service))
            .serve(addr)
            .await
            .unwrap();
    });
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return port;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("gRPC test server did not start on {port}")
}

/// The test bootstrap with the gRPC routes added, as `envoy/envoy-grpc.yaml` has them: the
/// replay route (POST `/v1/replay` with `x-idempotency-replay-ticket`) first, to the store's
/// replay listener, then `/demo.Orders/` to the gRPC service over HTTP/2.
pub fn grpc_bootstrap(ports: &Ports, grpc_port: u16, plugin: &Value) -> String {
    with_grpc_service(&bootstrap(ports, plugin), grpc_port)
}

/// Pass-through Envoy (router only) with the gRPC route and cluster: the baseline of the gRPC
/// benchmark.
pub fn grpc_passthrough_bootstrap(ports: &Ports, grpc_port: u16) -> String {
    with_grpc_service(&crate::envoy_config::passthrough_bootstrap(ports), grpc_port)
}

/// Pass-through Envoy with the no-op Wasm filter in `mode` (`bench/noop-filter`, e.g.
/// `"buffer+callout"`: one callout to the store per call) and the gRPC route and cluster: what a
/// gRPC replay cannot cost less than (it asks the store once, then is proxied once).
pub fn grpc_noop_wasm_bootstrap(ports: &Ports, grpc_port: u16, wasm: &std::path::Path, mode: &str) -> String {
    with_grpc_service(
        &crate::envoy_config::noop_wasm_bootstrap_with(ports, wasm, mode),
        grpc_port,
    )
}

/// Add the `/demo.Orders/` route (first) and the HTTP/2 `grpc` cluster to a bootstrap.
fn with_grpc_service(base: &str, grpc_port: u16) -> String {
    let mut config: Value = serde_json::from_str(base).unwrap();
    let routes = config
        .pointer_mut(
            "/static_resources/listeners/0/filter_chains/0/filters/0/typed_config/route_config/virtual_hosts/0/routes",
        )
        .unwrap()
        .as_array_mut()
        .unwrap();
    // After the replay route, which stays first.
    routes.insert(
        1.min(routes.len()),
        json!({"match": {"prefix": "/demo.Orders/"}, "route": {"cluster": "grpc", "timeout": "30s"}}),
    );
    let clusters = config
        .pointer_mut("/static_resources/clusters")
        .unwrap()
        .as_array_mut()
        .unwrap();
    clusters.push(json!({"name": "grpc", "type": "STATIC", "connect_timeout": "1s",
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}}},
        "load_assignment": {"cluster_name": "grpc", "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": grpc_port}}}}]}]}}));
    config.to_string()
}

/// Store + gRPC service + Envoy.
#[derive(Debug)]
pub struct GrpcStack {
    /// Envoy listener, `http://127.0.0.1:PORT`.
    pub url: String,
    /// Envoy admin.
    pub admin_url: String,
    /// Store.
    pub store_url: String,
    /// Executions per key at the service.
    pub executions: Executions,
    store: Proc,
    _envoy: Proc,
    dir: tempfile::TempDir,
}

impl Drop for GrpcStack {
    fn drop(&mut self) {
        crate::keep_logs_if_panicking(&self.dir);
    }
}

impl GrpcStack {
    /// Start everything with these plugin configuration fields.
    pub async fn start(plugin: Value) -> GrpcStack {
        let dir = tempfile::tempdir().unwrap();
        let service = OrdersService::default();
        let executions = service.executions.clone();
        let grpc_port = start_server(service).await;
        let (store_port, replay_port, listener, admin) = (free_port(), free_port(), free_port(), free_port());
        let mut store = spawn_store(
            dir.path(),
            store_port,
            &dir.path().join("store-data"),
            &["--replay-listen".to_owned(), format!("127.0.0.1:{replay_port}")],
            "store.log",
        );
        let ports = Ports {
            listener,
            admin,
            upstream: free_port(), // the HTTP demo is not used here
            stores: vec![store_port],
            replays: vec![replay_port],
        };
        let mut envoy = start_envoy(
            dir.path(),
            &grpc_bootstrap(&ports, grpc_port, &plugin_config(&plugin)),
            "envoy.log",
        );
        let store_url = format!("http://127.0.0.1:{store_port}");
        wait_ready(
            &format!("{store_url}/readyz"),
            &mut store,
            Duration::from_secs(30),
        )
        .await;
        let admin_url = format!("http://127.0.0.1:{admin}");
        wait_ready(&format!("{admin_url}/ready"), &mut envoy, Duration::from_secs(60)).await;
        GrpcStack {
            url: format!("http://127.0.0.1:{listener}"),
            admin_url,
            store_url,
            executions,
            store,
            _envoy: envoy,
            dir,
        }
    }

    /// A stock tonic client through Envoy.
    pub async fn client(&self) -> pb::orders_client::OrdersClient<tonic::transport::Channel> {
        pb::orders_client::OrdersClient::connect(self.url.clone())
            .await
            .unwrap()
    }

    /// SIGKILL the store.
    pub fn kill_store(&mut self) {
        self.store.kill();
    }

    /// The Envoy log so far.
    pub fn envoy_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("envoy.log")).unwrap_or_default()
    }

    /// Executions of `key` at the service.
    pub fn executions_of(&self, key: &str) -> u64 {
        self.executions.lock().unwrap().get(key).copied().unwrap_or(0)
    }

    /// Envoy's Prometheus text.
    pub async fn envoy_metrics(&self) -> String {
        crate::get_text(
            &reqwest::Client::new(),
            &format!("{}/stats/prometheus", self.admin_url),
        )
        .await
    }
}

/// A request with an `idempotency-key`.
pub fn keyed<T>(key: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("idempotency-key", key.parse().unwrap());
    request
}
