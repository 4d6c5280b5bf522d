//! Every shipped Envoy config — the bootstraps, the compose file, both Istio `EnvoyFilter`s and
//! the operator guide's "Wiring it into your own Envoy" block — as a hostile client meets it: each
//! internal header with each store path, with and without a token, on GET and POST, keyed and
//! keyless, and not one request is answered by the store (every store answer carries
//! `x-idempotency-store`). gRPC replays still reach a stock client through them.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use e2e::grpc::pb::CreateRequest;
use e2e::grpc::{keyed, start_server, OrdersService};
use e2e::{repo_root, ShippedStack, STORE_TOKEN};
use idempotency_wire::headers::{ALL, ANSWERED_BY, REPLAY_TICKET};
use serde_json::{json, Value};

/// Every path the store serves, on either listener.
const STORE_PATHS: [&str; 11] = [
    "/metrics",
    "/readyz",
    "/healthz",
    "/v1/records?service=orders&scope=&key=k",
    "/v1/records/in-progress?service=orders",
    "/v1/acquire",
    "/v1/complete",
    "/v1/batch",
    "/v1/checkpoint",
    "/v1/messages/claim",
    "/v1/replay",
];

/// A plausible value for `header`: a ticket-shaped one for the replay ticket.
fn value_for(header: &str) -> &'static str {
    if header == REPLAY_TICKET {
        "eyJzIjoib3JkZXJzIn0.c2lnbmF0dXJl"
    } else {
        "1"
    }
}

/// Send the whole matrix to `url`; the requests the store answered, described.
async fn requests_answered_by_the_store(url: &str) -> (usize, Vec<String>) {
    let client = reqwest::Client::new();
    let mut headers: Vec<Option<&str>> = vec![None];
    headers.extend(ALL.iter().copied().map(Some));
    let (mut sent, mut answered) = (0usize, Vec::new());
    for header in headers {
        for path in STORE_PATHS {
            for token in [None, Some(STORE_TOKEN)] {
                for method in [reqwest::Method::GET, reqwest::Method::POST] {
                    for key in [false, true] {
                        let mut request = client.request(method.clone(), format!("{url}{path}"));
                        if let Some(header) = header {
                            request = request.header(header, value_for(header));
                        }
                        if let Some(token) = token {
                            request = request.bearer_auth(token);
                        }
                        if key {
                            request = request.header("idempotency-key", format!("attack-{sent}"));
                        }
                        if method == reqwest::Method::POST {
                            request = request.header("content-type", "application/json").body("{}");
                        }
                        let response = request.send().await.unwrap();
                        sent += 1;
                        if let Some(listener) = response.headers().get(ANSWERED_BY) {
                            answered.push(format!(
                                "{method} {path} header={header:?} token={} keyed={key}: {} from the store's {listener:?} listener",
                                token.is_some(),
                                response.status()
                            ));
                        }
                    }
                }
            }
        }
    }
    (sent, answered)
}

async fn assert_the_store_answers_no_client(stack: &ShippedStack, name: &str) {
    let (sent, answered) = requests_answered_by_the_store(&stack.url).await;
    assert!(sent >= 800, "{name}: {sent}");
    assert!(
        answered.is_empty(),
        "{name}: {} of {sent} client requests were answered by the store:\n{}",
        answered.len(),
        answered.join("\n")
    );
}

fn shipped(file: &str) -> String {
    std::fs::read_to_string(repo_root().join(file)).unwrap()
}

#[tokio::test]
async fn no_client_header_reaches_the_store_through_the_shipped_bootstraps() {
    for file in [
        "envoy/envoy.yaml",
        "envoy/envoy-two-routes.yaml",
        "envoy/envoy-grpc.yaml",
        "envoy/compose/envoy.yaml",
    ] {
        let stack = ShippedStack::start_config(&shipped(file)).await;
        assert_the_store_answers_no_client(&stack, file).await;
    }
}

/// The operator guide's "Wiring it into your own Envoy" block, assembled into a bootstrap as its
/// comments say (listener 10000, admin 9901).
fn readme_bootstrap() -> String {
    let readme = shipped("docs/operator-guide.md");
    let section = readme
        .split("## Wiring it into your own Envoy")
        .nth(1)
        .expect("the operator guide has the section");
    let block = section
        .split("```yaml\n")
        .nth(1)
        .and_then(|rest| rest.split("\n```").next())
        .expect("a yaml block");
    let parts: Value = serde_yaml::from_str(block).unwrap();
    let bootstrap = json!({
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 9901}}},
        "static_resources": {
            "listeners": [{
                "name": "ingress",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": 10000}},
                "per_connection_buffer_limit_bytes": parts["per_connection_buffer_limit_bytes"],
                "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                    "stat_prefix": "ingress",
                    "early_header_mutation_extensions": parts["early_header_mutation_extensions"],
                    "route_config": {"virtual_hosts": [{"name": "app", "domains": ["*"], "routes": parts["routes"]}]},
                    "http_filters": parts["http_filters"]}}]}]
            }],
            "clusters": parts["clusters"]
        }
    });
    serde_yaml::to_string(&bootstrap).unwrap()
}

/// An Istio `EnvoyFilter` file's patches on a sidecar-like inbound listener (listener 10000,
/// admin 9901, the app on 8080, the store's API on 8081 and replays on 8082).
fn istio_bootstrap(file: &str, vhost: &str) -> String {
    let patches = e2e::istio_patches(file, STORE_TOKEN, None);
    let plugin = &patches.filters.1;
    let store_cluster = plugin["store_cluster"].as_str().unwrap();
    let replay_cluster = store_cluster.replace("|8081|", "|8082|");
    let mut routes = patches.routes.clone();
    routes.push(json!({"match": {"prefix": "/"}, "route": {"cluster": "app", "timeout": "30s"}}));
    let bootstrap = e2e::inbound_bootstrap(
        10000,
        Some(9901),
        vhost,
        routes,
        patches.filters.0.clone(),
        vec![
            e2e::static_cluster("app", 8080),
            e2e::static_cluster(store_cluster, 8081),
            e2e::static_cluster(&replay_cluster, 8082),
        ],
    );
    serde_yaml::to_string(&e2e::with_hcm_merge(bootstrap, &patches.hcm_merge)).unwrap()
}

#[tokio::test]
async fn no_client_header_reaches_the_store_through_the_istio_envoyfilters_or_the_readme_snippet() {
    for (name, config) in [
        (
            "envoy/istio/envoyfilter.yaml",
            istio_bootstrap("envoy/istio/envoyfilter.yaml", "inbound|http|8080"),
        ),
        (
            "envoy/istio/envoyfilter-grpc.yaml",
            istio_bootstrap("envoy/istio/envoyfilter-grpc.yaml", "inbound|http|50051"),
        ),
        (
            "docs/operator-guide.md: Wiring it into your own Envoy",
            readme_bootstrap(),
        ),
    ] {
        let stack = ShippedStack::start_config(&config).await;
        assert_the_store_answers_no_client(&stack, name).await;
    }
}

/// The matrix finds the hole it looks for: the shape every config had before (internal headers
/// stripped by an HTTP filter, after routing; a replay route matching any path with a ticket
/// header, to the store's API) lets a client's ticket header route it to the store.
#[tokio::test]
async fn the_matrix_catches_a_strip_that_runs_after_routing() {
    let text = shipped("envoy/envoy.yaml");
    let (before, after) = text
        .split_once("                early_header_mutation_extensions:")
        .unwrap();
    let after = after.split_once("                route_config:").unwrap().1;
    let mut old = format!("{before}                route_config:{after}");
    let replay_route_start = old
        .find("                        - match:\n                            path: /v1/replay")
        .unwrap();
    let replay_route_end = old[replay_route_start..].find("timeout: 5s }\n").unwrap()
        + replay_route_start
        + "timeout: 5s }\n".len();
    old.replace_range(
        replay_route_start..replay_route_end,
        "                        - match: { prefix: \"/\", headers: [{ name: x-idempotency-replay-ticket, present_match: true }] }\n                          route: { cluster: idempotency_store, timeout: 5s }\n",
    );
    let stack = ShippedStack::start_config(&old).await;
    let (_, answered) = requests_answered_by_the_store(&stack.url).await;
    assert!(
        answered
            .iter()
            .any(|a| a.contains("GET /v1/records") && a.contains("token=true")),
        "the old shape let a client read records through the proxy: {answered:?}"
    );
}

/// A stock gRPC client's retry gets the stored answer through a shipped gRPC config.
async fn grpc_replays_through(name: &str, config: &str) {
    let service = OrdersService::default();
    let executions = service.executions.clone();
    let grpc_port = start_server(service).await;
    let config = config.replace("port_value: 50051", &format!("port_value: {grpc_port}"));
    let stack = ShippedStack::start_config(&config).await;
    let mut client = e2e::grpc::pb::orders_client::OrdersClient::connect(stack.url.clone())
        .await
        .unwrap();
    let request = || {
        keyed(
            "mesh-grpc-1",
            CreateRequest {
                sku: "A".into(),
                ..CreateRequest::default()
            },
        )
    };
    let first = client.create(request()).await.unwrap().into_inner();
    let again = client.create(request()).await.unwrap();
    assert_eq!(
        again
            .metadata()
            .get("idempotent-replayed")
            .map(|v| v.to_str().unwrap()),
        Some("true"),
        "{name}: replayed"
    );
    assert!(
        again.metadata().get(ANSWERED_BY).is_none(),
        "{name}: the store's mark is removed by the filter"
    );
    assert_eq!(again.into_inner(), first, "{name}: the same message");
    assert_eq!(
        executions.lock().unwrap().get("mesh-grpc-1").copied(),
        Some(1),
        "{name}: executed once"
    );
}

#[tokio::test]
async fn grpc_replays_reach_a_stock_client_through_the_shipped_grpc_config_and_the_readme_snippet() {
    grpc_replays_through("envoy/envoy-grpc.yaml", &shipped("envoy/envoy-grpc.yaml")).await;
    grpc_replays_through("operator guide snippet", &readme_bootstrap()).await;
}
