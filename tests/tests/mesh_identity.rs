//! The store trusts mesh identity instead of tokens: certificates made here (a CA, workloads with
//! SPIFFE ids); the store terminating mTLS itself, and behind an Envoy "sidecar" that terminates
//! it and sets `x-forwarded-client-cert`. Each workload acts only for its own services, a
//! certificate from another CA gets nowhere, a forged XFCC header is ignored, and a filter with
//! no token in its configuration executes and replays through both shapes.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use e2e::certs::{PemFiles, Pki, TlsClient};
use e2e::envoy_config::{bootstrap, Ports};
use e2e::{free_port, plugin_config, spawn_demo, start_envoy, store_bin, wait_ready, Proc};
use serde_json::{json, Value};

const ORDERS_ID: &str = "spiffe://cluster.local/ns/shop/sa/orders";
const PAYMENTS_ID: &str = "spiffe://cluster.local/ns/pay/sa/payments";

fn credentials(dir: &Path) -> String {
    let path = dir.join("credentials.yaml");
    std::fs::write(
        &path,
        format!(
            "credentials:\n  - {{name: orders-proxies, role: proxy, services: [orders], identities: [\"{ORDERS_ID}\"]}}\n  - {{name: payments-proxies, role: proxy, services: [payments], identities: [\"{PAYMENTS_ID}\"]}}\n"
        ),
    )
    .unwrap();
    path.display().to_string()
}

/// A store on `port` with only the credentials file (no token) and `extra` flags.
fn spawn_store(dir: &Path, port: u16, extra: &[String]) -> Proc {
    let mut command = Command::new(store_bin());
    command
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--data-path")
        .arg(dir.join("store-data"))
        .arg("--credentials")
        .arg(credentials(dir))
        .args(extra)
        .env("RUST_LOG", "info");
    Proc::spawn("store", command, dir.join("store.log"))
}

fn acquire(service: &str, key: &str) -> Value {
    json!({"service": service, "scope": "", "key": key, "fingerprint": "f", "method": "POST",
           "path": "/", "lock_timeout_ms": 60_000, "retention_ms": 60_000})
}

async fn acquire_status(client: &TlsClient, port: u16, service: &str, key: &str) -> (u16, Value) {
    client
        .send(port, "POST", "/v1/acquire", &[], Some(&acquire(service, key)))
        .await
        .unwrap()
}

fn upstream_tls(identity: &PemFiles, ca: &Path) -> Value {
    json!({"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "sni": "idempotency-store",
        "common_tls_context": {
            "alpn_protocols": ["h2"],
            "tls_certificates": [{"certificate_chain": {"filename": identity.cert}, "private_key": {"filename": identity.key}}],
            "validation_context": {"trusted_ca": {"filename": ca},
                "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": "idempotency-store"}}]}}}})
}

/// A proxy Envoy with the filter, whose store cluster leads to `store_port` over mTLS presenting
/// `identity`; the plugin configuration has no store token.
async fn proxy_envoy(
    dir: &Path,
    store_port: u16,
    identity: &PemFiles,
    ca: &Path,
) -> (Proc, Proc, String, String) {
    let (listener, admin, demo_port) = (free_port(), free_port(), free_port());
    let mut plugin = plugin_config(&json!({}));
    plugin.as_object_mut().unwrap().remove("store_token");
    let ports = Ports {
        listener,
        admin,
        upstream: demo_port,
        stores: vec![store_port],
        replays: Vec::new(),
    };
    let mut config: Value = serde_json::from_str(&bootstrap(&ports, &plugin)).unwrap();
    let clusters = config["static_resources"]["clusters"].as_array_mut().unwrap();
    let store = clusters
        .iter_mut()
        .find(|c| c["name"] == "idempotency_store")
        .unwrap();
    store["transport_socket"] = upstream_tls(identity, ca);
    let mut demo = spawn_demo(dir, demo_port, store_port);
    let mut envoy = start_envoy(dir, &config.to_string(), "proxy-envoy.log");
    let demo_url = format!("http://127.0.0.1:{demo_port}");
    wait_ready(&format!("{demo_url}/healthz"), &mut demo, Duration::from_secs(30)).await;
    wait_ready(
        &format!("http://127.0.0.1:{admin}/ready"),
        &mut envoy,
        Duration::from_secs(60),
    )
    .await;
    (envoy, demo, format!("http://127.0.0.1:{listener}"), demo_url)
}

/// A keyed POST through the proxy runs once and its retry is replayed.
async fn executes_once_and_replays(url: &str, demo_url: &str, key: &str) {
    let client = reqwest::Client::new();
    let order = json!({"customerId": "C-1", "items": [{"sku": "S-1", "quantity": 1}]});
    let post = || {
        client
            .post(format!("{url}/api/v1/orders"))
            .header("Idempotency-Key", key)
            .json(&order)
    };
    let first = post().send().await.unwrap();
    assert_eq!(first.status(), 201, "{}", first.text().await.unwrap());
    let again = post().send().await.unwrap();
    assert_eq!(again.status(), 201);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let executions = e2e::demo_executions(&client, demo_url).await;
    assert_eq!(executions["byKey"][key], 1);
}

async fn wait_tls_ready(client: &TlsClient, port: u16, store: &mut Proc) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if client
            .send(port, "GET", "/readyz", &[], None)
            .await
            .is_ok_and(|(status, _)| status == 200)
        {
            return;
        }
        assert!(
            Instant::now() < deadline && store.wait_exit(Duration::ZERO).is_none(),
            "store not ready over mTLS: {}",
            store.output()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_store_terminating_mtls_maps_each_workload_certificate_to_its_own_services() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "mesh");
    let server = pki.server("store");
    let orders = pki.workload("orders", ORDERS_ID);
    let payments = pki.workload("payments", PAYMENTS_ID);
    let rogue = Pki::new(dir.path(), "rogue").workload("orders", ORDERS_ID);
    let port = free_port();
    let mut store = spawn_store(
        dir.path(),
        port,
        &[
            "--tls-cert".into(),
            server.cert.display().to_string(),
            "--tls-key".into(),
            server.key.display().to_string(),
            "--client-ca".into(),
            pki.ca().display().to_string(),
        ],
    );
    let as_orders = TlsClient::new(&pki.ca(), Some(&orders));
    wait_tls_ready(&as_orders, port, &mut store).await;

    let (status, body) = acquire_status(&as_orders, port, "orders", "k1").await;
    assert_eq!(
        (status, body["outcome"].as_str()),
        (200, Some("acquired")),
        "{body}"
    );
    let (status, body) = acquire_status(&as_orders, port, "payments", "k1").await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("orders-proxies"),
        "{body}"
    );
    let (status, _) = acquire_status(&TlsClient::new(&pki.ca(), Some(&payments)), port, "orders", "k2").await;
    assert_eq!(status, 403, "another workload's certificate");
    assert!(
        TlsClient::new(&pki.ca(), Some(&rogue))
            .send(port, "GET", "/readyz", &[], None)
            .await
            .is_err(),
        "the same SPIFFE id from another CA is refused at the handshake"
    );
    assert!(
        TlsClient::new(&pki.ca(), None)
            .send(port, "GET", "/readyz", &[], None)
            .await
            .is_err(),
        "no client certificate, no connection"
    );

    // The filter, with no token anywhere in its configuration, through Envoy's mTLS store cluster.
    let (_envoy, _demo, url, demo_url) = proxy_envoy(dir.path(), port, &orders, &pki.ca()).await;
    executes_once_and_replays(&url, &demo_url, "mtls-1").await;
}

/// An Envoy in front of the store, as its sidecar: terminates mTLS, sets XFCC (replacing any the
/// client sent), and connects to the store from 127.0.0.2, the one address the store trusts.
///
/// `forward`: its `forward_client_cert_details` (`SANITIZE_SET` replaces a client's XFCC;
/// Istio's inbound default `APPEND_FORWARD` keeps it and appends the sidecar's element).
fn sidecar_bootstrap_with(
    listener: u16,
    admin: u16,
    store_port: u16,
    server: &PemFiles,
    ca: &Path,
    forward: &str,
) -> String {
    json!({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [{"name": "store-inbound",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": listener}},
                "filter_chains": [{
                    "transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                        "require_client_certificate": true,
                        "common_tls_context": {
                            "alpn_protocols": ["h2", "http/1.1"],
                            "tls_certificates": [{"certificate_chain": {"filename": server.cert}, "private_key": {"filename": server.key}}],
                            "validation_context": {"trusted_ca": {"filename": ca}}}}},
                    "filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "store_inbound",
                        "forward_client_cert_details": forward,
                        "set_current_client_cert_details": {"uri": true, "dns": true},
                        "route_config": {"virtual_hosts": [{"name": "store", "domains": ["*"],
                            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "store"}}]}]},
                        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}}]}]}],
            "clusters": [{"name": "store", "type": "STATIC", "connect_timeout": "1s",
                "upstream_bind_config": {"source_address": {"address": "127.0.0.2", "port_value": 0}},
                "load_assignment": {"cluster_name": "store", "endpoints": [{"lb_endpoints": [{"endpoint": {"address":
                    {"socket_address": {"address": "127.0.0.1", "port_value": store_port}}}}]}]}}]
        }
    })
    .to_string()
}

/// A store trusting XFCC from 127.0.0.2 only, behind a sidecar Envoy (`forward`) that connects
/// from there; the workload `orders`'s certificate, the CA.
struct SidecarStack {
    dir: tempfile::TempDir,
    pki: Pki,
    orders: PemFiles,
    store_port: u16,
    sidecar_port: u16,
    _store: Proc,
    _sidecar: Proc,
}

async fn sidecar_stack(forward: &str) -> SidecarStack {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path(), "mesh");
    let server = pki.server("sidecar");
    let orders = pki.workload("orders", ORDERS_ID);
    let (store_port, sidecar_port, sidecar_admin) = (free_port(), free_port(), free_port());
    let mut store = spawn_store(
        dir.path(),
        store_port,
        &[
            "--trust-forwarded-client-cert".into(),
            "--trusted-proxies".into(),
            "127.0.0.2/32".into(),
        ],
    );
    wait_ready(
        &format!("http://127.0.0.1:{store_port}/readyz"),
        &mut store,
        Duration::from_secs(30),
    )
    .await;
    let mut sidecar = start_envoy(
        dir.path(),
        &sidecar_bootstrap_with(
            sidecar_port,
            sidecar_admin,
            store_port,
            &server,
            &pki.ca(),
            forward,
        ),
        "sidecar-envoy.log",
    );
    wait_ready(
        &format!("http://127.0.0.1:{sidecar_admin}/ready"),
        &mut sidecar,
        Duration::from_secs(60),
    )
    .await;
    SidecarStack {
        dir,
        pki,
        orders,
        store_port,
        sidecar_port,
        _store: store,
        _sidecar: sidecar,
    }
}

#[tokio::test]
async fn behind_its_sidecar_the_store_reads_the_callers_identity_from_xfcc_and_ignores_forged_ones() {
    let SidecarStack {
        dir,
        pki,
        orders,
        store_port,
        sidecar_port,
        ..
    } = &sidecar_stack("SANITIZE_SET").await;
    let (store_port, sidecar_port) = (*store_port, *sidecar_port);
    let as_orders = TlsClient::new(&pki.ca(), Some(orders));

    let (status, body) = acquire_status(&as_orders, sidecar_port, "orders", "x1").await;
    assert_eq!(
        (status, body["outcome"].as_str()),
        (200, Some("acquired")),
        "{body}"
    );
    let (status, body) = acquire_status(&as_orders, sidecar_port, "payments", "x1").await;
    assert_eq!(status, 403, "{body}");
    // The client names itself payments in its own XFCC header: the sidecar replaces it.
    let forged_header = format!("URI={PAYMENTS_ID}");
    let (status, body) = as_orders
        .send(
            sidecar_port,
            "POST",
            "/v1/acquire",
            &[("x-forwarded-client-cert", forged_header.as_str())],
            Some(&acquire("payments", "x2")),
        )
        .await
        .unwrap();
    assert_eq!(status, 403, "a client-forged XFCC is not believed: {body}");
    // Straight to the store, from an address it does not trust: the header counts for nothing.
    let direct = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{store_port}/v1/acquire"))
        .header("x-forwarded-client-cert", format!("URI={ORDERS_ID}"))
        .json(&acquire("orders", "x3"))
        .send()
        .await
        .unwrap();
    assert_eq!(direct.status(), 401, "XFCC from an untrusted peer");

    // The mesh's shape: the filter's callouts leave through mTLS with the workload's identity.
    let (_envoy, _demo, url, demo_url) = proxy_envoy(dir.path(), sidecar_port, orders, &pki.ca()).await;
    executes_once_and_replays(&url, &demo_url, "xfcc-1").await;
}

#[tokio::test]
async fn behind_an_append_forward_sidecar_a_caller_cannot_smuggle_its_own_xfcc_element_in() {
    let SidecarStack {
        pki,
        orders,
        sidecar_port,
        ..
    } = &sidecar_stack("APPEND_FORWARD").await;
    let sidecar_port = *sidecar_port;
    let as_orders = TlsClient::new(&pki.ca(), Some(orders));
    let (status, body) = acquire_status(&as_orders, sidecar_port, "orders", "a1").await;
    assert_eq!(
        (status, body["outcome"].as_str()),
        (200, Some("acquired")),
        "{body}"
    );
    // The caller's own element comes first; the sidecar's is appended and names orders.
    let plain = format!("URI={PAYMENTS_ID}");
    // An open quote would swallow the `,` before the sidecar's element.
    let smuggled = format!("URI={PAYMENTS_ID};x=\"");
    for forged in [plain.as_str(), smuggled.as_str()] {
        let (status, body) = as_orders
            .send(
                sidecar_port,
                "POST",
                "/v1/acquire",
                &[("x-forwarded-client-cert", forged)],
                Some(&acquire("payments", "a2")),
            )
            .await
            .unwrap();
        assert_ne!(status, 200, "{forged}: the caller acted as payments: {body}");
    }
}
