//! The standard test stack: store(s), the demo service and Envoy with the test bootstrap, and
//! what tests ask of it (executions, records, metrics).

#[allow(clippy::wildcard_imports)] // the harness's shared imports and items
use crate::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// How to start a stack.
#[derive(Debug, Clone)]
pub struct StackOptions {
    /// Fields merged over the default plugin configuration.
    pub plugin: Value,
    /// Extra arguments for the store service.
    pub store_args: Vec<String>,
    /// Store replicas behind Envoy's store cluster.
    pub store_replicas: usize,
    /// Use the MongoDB backend (a `secantusd` server started for this stack) instead of redb.
    pub mongodb: bool,
    /// Put a TCP proxy that delays every chunk by this much between Envoy and the store.
    pub store_delay: Option<Duration>,
    /// Put a front between Envoy and the store that answers `/v1/batch` with 404, like a store
    /// from before batching (and counts the calls it passes on).
    pub store_without_batch: bool,
}

impl Default for StackOptions {
    fn default() -> StackOptions {
        StackOptions {
            plugin: json!({}),
            store_args: Vec::new(),
            store_replicas: 1,
            mongodb: false,
            store_delay: None,
            store_without_batch: false,
        }
    }
}

impl StackOptions {
    /// Default options with these plugin configuration fields.
    pub fn plugin(fields: Value) -> StackOptions {
        StackOptions {
            plugin: fields,
            ..StackOptions::default()
        }
    }
}

/// Default plugin configuration of the tests, with `overrides` merged in.
pub fn plugin_config(overrides: &Value) -> Value {
    let mut config = json!({
        "service_name": "orders",
        "stats_service_tag": true,
        // Replays reach the store unless a test turns the proxy-local cache on: the suites are
        // about the store's guarantees (durability, fencing, metrics).
        "replay_cache_max_entries": 0,
        "store_cluster": "idempotency_store",
        "store_token": STORE_TOKEN,
        "store_timeout": "1s",
        "lock_timeout": "5m",
        "retention_period": "24h",
    });
    if let (Some(base), Some(extra)) = (config.as_object_mut(), overrides.as_object()) {
        for (k, v) in extra {
            base.insert(k.clone(), v.clone());
        }
    }
    config
}

/// Store, demo service and Envoy, running.
#[derive(Debug)]
pub struct Stack {
    /// Envoy listener, e.g. `http://127.0.0.1:PORT`.
    pub url: String,
    /// Envoy admin.
    pub admin_url: String,
    /// Store service.
    pub store_url: String,
    /// Demo service, directly.
    pub demo_url: String,
    /// Ports of the store replicas, reused on restart.
    pub store_ports: Vec<u16>,
    /// Store data file.
    pub data_path: PathBuf,
    /// Shared HTTP client.
    pub client: reqwest::Client,
    store_args: Vec<String>,
    /// The store replicas.
    pub stores: Vec<Proc>,
    /// The MongoDB server, when the stack uses the MongoDB backend.
    pub mongo: Option<MongoServer>,
    /// The delaying proxy in front of the store, if any.
    delay_proxy: Option<tokio::task::JoinHandle<()>>,
    /// Its delay in milliseconds, changeable while the stack runs.
    pub store_delay_ms: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
    envoy_config: String,
    demo_port: u16,
    /// The demo process.
    pub demo: Proc,
    /// The Envoy process.
    pub envoy: Proc,
    dir: tempfile::TempDir,
}

/// Start the store service on `port`.
pub fn spawn_store(dir: &Path, port: u16, data_path: &Path, extra: &[String], log_name: &str) -> Proc {
    let mut command = Command::new(bin("idempotency-store"));
    command
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--data-path")
        .arg(data_path)
        .arg("--token")
        .arg(STORE_TOKEN)
        .args(extra)
        .env("RUST_LOG", "info");
    Proc::spawn("store", command, dir.join(log_name))
}

/// Start the demo orders service on `port`, checkpointing into the store on `store_port`.
pub fn spawn_demo(dir: &Path, port: u16, store_port: u16) -> Proc {
    let mut command = Command::new(bin("demo-orders"));
    command
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--store-url")
        .arg(format!("http://127.0.0.1:{store_port}"))
        .arg("--store-token")
        .arg(STORE_TOKEN)
        // Executions are counted in a file, so the counts survive a restart of the demo.
        .arg("--executions-log")
        .arg(dir.join("executions.jsonl"));
    Proc::spawn("demo", command, dir.join("demo.log"))
}

impl Stack {
    /// Start everything with the default configuration.
    pub async fn start() -> Stack {
        Stack::start_with(StackOptions::default()).await
    }

    /// Start everything.
    pub async fn start_with(options: StackOptions) -> Stack {
        let dir = tempfile::tempdir().unwrap();
        let (demo_port, envoy_port, admin_port) = (free_port(), free_port(), free_port());
        let store_ports: Vec<u16> = (0..options.store_replicas.max(1)).map(|_| free_port()).collect();
        let data_path = dir.path().join("store-data");

        let mongo = if options.mongodb {
            Some(MongoServer::start_logging(Some(&dir.path().join("mongo.log"))).await)
        } else {
            None
        };
        let mut store_args = options.store_args.clone();
        if let Some(mongo) = &mongo {
            store_args.extend([
                "--storage".into(),
                "mongodb".into(),
                "--mongodb-uri".into(),
                mongo.uri(),
            ]);
        }
        let mut stores: Vec<Proc> = store_ports
            .iter()
            .enumerate()
            .map(|(i, port)| {
                let data = dir.path().join(format!("store-{i}-data"));
                let data = if i == 0 { data_path.clone() } else { data };
                spawn_store(dir.path(), *port, &data, &store_args, &format!("store-{i}.log"))
            })
            .collect();
        let mut demo = spawn_demo(dir.path(), demo_port, store_ports[0]);

        let (envoy_store_ports, delay_proxy, store_delay_ms) = match options.store_delay {
            Some(delay) => {
                let (port, task, handle) = switchable_delay_proxy(store_ports[0], delay).await;
                (vec![port], Some(task), Some(handle))
            }
            None if options.store_without_batch => {
                let (port, task) = old_store::front(store_ports[0]).await;
                (vec![port], Some(task), None)
            }
            None => (store_ports.clone(), None, None),
        };
        let config = envoy_config::bootstrap(
            &envoy_config::Ports {
                listener: envoy_port,
                admin: admin_port,
                upstream: demo_port,
                stores: envoy_store_ports,
                replays: Vec::new(),
            },
            &plugin_config(&options.plugin),
        );
        let mut envoy = start_envoy(dir.path(), &config, "envoy.log");

        let store_url = format!("http://127.0.0.1:{}", store_ports[0]);
        let demo_url = format!("http://127.0.0.1:{demo_port}");
        let admin_url = format!("http://127.0.0.1:{admin_port}");
        for (port, store) in store_ports.iter().zip(stores.iter_mut()) {
            wait_ready(
                &format!("http://127.0.0.1:{port}/readyz"),
                store,
                Duration::from_secs(30),
            )
            .await;
        }
        wait_ready(&format!("{demo_url}/healthz"), &mut demo, Duration::from_secs(30)).await;
        wait_ready(&format!("{admin_url}/ready"), &mut envoy, Duration::from_secs(60)).await;

        Stack {
            url: format!("http://127.0.0.1:{envoy_port}"),
            admin_url,
            store_url,
            demo_url,
            store_ports,
            data_path,
            client: reqwest::Client::builder()
                .pool_max_idle_per_host(64)
                .build()
                .unwrap(),
            store_args,
            stores,
            mongo,
            delay_proxy,
            store_delay_ms,
            envoy_config: config,
            demo_port,
            demo,
            envoy,
            dir,
        }
    }

    /// SIGKILL Envoy and start it again with the same configuration and ports.
    pub async fn restart_envoy(&mut self) {
        self.envoy.kill();
        let log = format!("envoy-{}.log", uuid::Uuid::new_v4());
        self.envoy = start_envoy(self.dir.path(), &self.envoy_config, &log);
        let url = format!("{}/ready", self.admin_url);
        wait_ready(&url, &mut self.envoy, Duration::from_secs(60)).await;
    }

    /// SIGKILL the demo service (the upstream).
    pub fn kill_demo(&mut self) {
        self.demo.kill();
    }

    /// Start the demo service again on the same port (its execution counts carry over).
    pub async fn restart_demo(&mut self) {
        self.demo.kill();
        self.demo = spawn_demo(self.dir.path(), self.demo_port, self.store_ports[0]);
        let url = format!("{}/healthz", self.demo_url);
        wait_ready(&url, &mut self.demo, Duration::from_secs(30)).await;
    }

    /// Working directory of this stack (logs, data).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// SIGKILL every store replica.
    pub fn kill_store(&mut self) {
        self.stores.iter_mut().for_each(Proc::kill);
    }

    /// Start the store replicas again on the same ports and data files.
    pub async fn restart_store(&mut self) {
        self.kill_store();
        for (i, port) in self.store_ports.clone().into_iter().enumerate() {
            let data = if i == 0 {
                self.data_path.clone()
            } else {
                self.dir.path().join(format!("store-{i}-data"))
            };
            let log = format!("store-{i}-{}.log", uuid::Uuid::new_v4());
            let mut store = spawn_store(self.dir.path(), port, &data, &self.store_args, &log);
            wait_ready(
                &format!("http://127.0.0.1:{port}/readyz"),
                &mut store,
                Duration::from_secs(30),
            )
            .await;
            self.stores[i] = store;
        }
    }

    /// Prometheus text of store replica `index`.
    pub async fn replica_metrics(&self, index: usize) -> String {
        get_text(
            &self.client,
            &format!("http://127.0.0.1:{}/metrics", self.store_ports[index]),
        )
        .await
    }

    /// A keyed JSON POST to the orders endpoint through Envoy.
    pub fn post_order(&self, key: Option<&str>, body: &Value) -> reqwest::RequestBuilder {
        let mut request = self.client.post(format!("{}/api/v1/orders", self.url)).json(body);
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        request
    }

    /// The demo service's execution counts: `{"total": N, "byKey": {...}}`.
    pub async fn executions(&self) -> Value {
        demo_executions(&self.client, &self.demo_url).await
    }

    /// Executions of one key.
    pub async fn executions_of(&self, key: &str) -> u64 {
        self.executions().await["byKey"][key].as_u64().unwrap_or(0)
    }

    /// Send a keyed POST whose upstream takes `upstream_ms`, SIGKILL the store once the request
    /// has reached the upstream, and return the body the client got: 201, the upstream's answer
    /// (with `record_mode: async`, written to the store later).
    pub async fn answered_with_the_store_killed(&mut self, key: &str, upstream_ms: u64) -> Value {
        let first = {
            let request = self
                .post_order(Some(key), &json!({}))
                .header("x-demo-delay-ms", upstream_ms.to_string());
            tokio::spawn(async move { request.send().await.unwrap() })
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.executions_of(key).await == 0 {
            assert!(Instant::now() < deadline, "{key} never reached the upstream");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.kill_store();
        let answered = first.await.unwrap();
        assert_eq!(answered.status(), 201, "the client gets the upstream's answer");
        answered.json().await.unwrap()
    }

    /// The store's Prometheus text.
    pub async fn store_metrics(&self) -> String {
        get_text(&self.client, &format!("{}/metrics", self.store_url)).await
    }

    /// Envoy's Prometheus text.
    pub async fn envoy_metrics(&self) -> String {
        get_text(&self.client, &format!("{}/stats/prometheus", self.admin_url)).await
    }

    /// Read a record from the store's admin API.
    pub async fn record(&self, key: &str) -> Option<Value> {
        let response = self
            .client
            .get(format!("{}/v1/records", self.store_url))
            .query(&[("service", "orders"), ("scope", ""), ("key", key)])
            .bearer_auth(STORE_TOKEN)
            .send()
            .await
            .unwrap();
        if response.status() == 404 {
            return None;
        }
        Some(response.json().await.unwrap())
    }
}

/// Retry `key` until it is replayed (409 meanwhile is fine: the write is on its way), and return
/// the replayed body. Any other answer fails the test.
pub async fn replay_of(key: &str, request: impl Fn() -> reqwest::RequestBuilder) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let retry = request().send().await.unwrap();
        match retry.status().as_u16() {
            409 => {
                assert!(retry.headers().contains_key("retry-after"));
                assert!(Instant::now() < deadline, "{key} still in progress");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            200 | 201 => {
                assert_eq!(retry.headers()["idempotent-replayed"], "true", "{key} ran again");
                return retry.json().await.unwrap();
            }
            other => panic!("{key}: unexpected {other}: {}", retry.text().await.unwrap()),
        }
    }
}

/// The demo service's execution ledger (`GET /_demo/executions`) at `demo_url`: counts per key,
/// kept in a file that survives the demo's restarts.
pub async fn demo_executions(client: &reqwest::Client, demo_url: &str) -> Value {
    client
        .get(format!("{demo_url}/_demo/executions"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

impl Drop for Stack {
    fn drop(&mut self) {
        if let Some(task) = self.delay_proxy.take() {
            task.abort();
        }
        keep_logs_if_panicking(&self.dir);
    }
}

/// A store service on a free port in `dir`, ready; returns it with its base URL.
pub async fn ready_store(dir: &Path) -> (Proc, String) {
    let port = free_port();
    let mut store = spawn_store(dir, port, &dir.join("store-data"), &[], "store.log");
    let url = format!("http://127.0.0.1:{port}");
    wait_ready(&format!("{url}/readyz"), &mut store, Duration::from_secs(30)).await;
    (store, url)
}

/// Wait until a store, a demo service and an Envoy (admin port) all answer ready.
pub async fn wait_all_ready(store: (u16, &mut Proc), demo: (u16, &mut Proc), envoy_admin: (u16, &mut Proc)) {
    wait_ready(
        &format!("http://127.0.0.1:{}/readyz", store.0),
        store.1,
        Duration::from_secs(30),
    )
    .await;
    wait_ready(
        &format!("http://127.0.0.1:{}/healthz", demo.0),
        demo.1,
        Duration::from_secs(30),
    )
    .await;
    wait_ready(
        &format!("http://127.0.0.1:{}/ready", envoy_admin.0),
        envoy_admin.1,
        Duration::from_secs(60),
    )
    .await;
}
