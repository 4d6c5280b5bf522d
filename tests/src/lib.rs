//! End-to-end harness: starts the store service, the demo orders service and a real Envoy with
//! the built `.wasm` as processes on free loopback ports, and stops them all on drop.
//!
//! Binaries come from `target/release` (built by `make build`; override with `E2E_BIN_DIR`),
//! Envoy from `.venv/bin/envoy` (override with `ENVOY_BIN`), the filter from
//! `target/wasm32-wasip1/wasm-release/idempotency_filter.wasm` (override with `E2E_WASM`).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)] // test code

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub mod certs;
pub mod envoy_config;
pub mod gateway;
pub mod grpc;
pub mod old_store;

/// Token shared by the store and the filter in tests.
pub const STORE_TOKEN: &str = "e2e-token";

/// Repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn bin(name: &str) -> PathBuf {
    let dir =
        std::env::var_os("E2E_BIN_DIR").map_or_else(|| repo_root().join("target/release"), PathBuf::from);
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `make build` first",
        path.display()
    );
    path
}

/// The store service binary.
pub fn store_bin() -> PathBuf {
    bin("idempotency-store")
}

/// The Envoy binary.
pub fn envoy_bin() -> PathBuf {
    let path =
        std::env::var_os("ENVOY_BIN").map_or_else(|| repo_root().join(".venv/bin/envoy"), PathBuf::from);
    assert!(
        path.exists(),
        "{} is missing: run `make setup` first",
        path.display()
    );
    path
}

/// The built filter.
pub fn wasm_path() -> PathBuf {
    let path = std::env::var_os("E2E_WASM").map_or_else(
        || repo_root().join("target/wasm32-wasip1/wasm-release/idempotency_filter.wasm"),
        PathBuf::from,
    );
    assert!(
        path.exists(),
        "{} is missing: run `make build` first",
        path.display()
    );
    path
}

/// A free loopback port for a test server.
///
/// Ports come from below the kernel's ephemeral range (32768+ by default), so no outgoing
/// connection (Envoy to the store, say) can take one between our check and the server's bind,
/// and each is handed out once per test process, so parallel tests never share one.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    const FIRST: u16 = 20_000;
    const SPAN: u16 = 12_000;
    // Test binaries run one after another; start each at a different place anyway.
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let offset = (std::process::id() % u32::from(SPAN)) as u16;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed) % SPAN;
        let port = FIRST + (offset + n) % SPAN;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port between {FIRST} and {}", FIRST + SPAN)
}

/// A child process that is killed when dropped.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    /// Start `command`, sending its output to `log`.
    pub fn spawn(name: &str, mut command: Command, log: PathBuf) -> Proc {
        let out = std::fs::File::create(&log).unwrap();
        let err = out.try_clone().unwrap();
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc {
            name: name.to_owned(),
            child: Some(child),
            log,
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Wait for the process to exit on its own; returns its exit status if it did in time.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Some(status);
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Everything the process printed so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Poll `url` until it answers 200 or `timeout` passes.
pub async fn wait_ready(url: &str, proc: &mut Proc, timeout: Duration) {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(response) = client.get(url).timeout(Duration::from_secs(1)).send().await {
            if response.status().is_success() {
                return;
            }
        }
        if let Some(status) = proc.wait_exit(Duration::from_millis(0)) {
            panic!(
                "{} exited with {status} before ready:\n{}",
                proc.name(),
                proc.output()
            );
        }
        if Instant::now() > deadline {
            panic!(
                "{} not ready at {url} after {timeout:?}:\n{}",
                proc.name(),
                proc.output()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

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

/// The MongoDB wire-protocol test server (one copy, the store crate's).
pub use idempotency_store::storage::test_mongo::MongoServer;

/// Start Envoy with `config` (JSON or YAML text) and wait for nothing.
pub fn start_envoy(dir: &Path, config: &str, log_name: &str) -> Proc {
    let config_path = dir.join(format!("{log_name}.config.yaml"));
    std::fs::write(&config_path, config).unwrap();
    let mut command = Command::new(envoy_bin());
    command
        .arg("-c")
        .arg(&config_path)
        .args([
            "--concurrency",
            "1",
            "--disable-hot-restart",
            "--log-level",
            "warn",
        ])
        .args(["--component-log-level", "wasm:debug"])
        .current_dir(repo_root());
    Proc::spawn("envoy", command, dir.join(log_name))
}

/// CPU time (ns) and the times put on a CPU, summed over the threads of a process (schedstat).
pub fn scheduled(pid: u32) -> (u64, u64) {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return (0, 0);
    };
    tasks
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok())
        .map(|line| {
            let mut fields = line.split_whitespace().map(|f| f.parse::<u64>().unwrap_or(0));
            let run_ns = fields.next().unwrap_or(0);
            (run_ns, fields.nth(1).unwrap_or(0))
        })
        .fold((0, 0), |(run, woke), (r, w)| (run + r, woke + w))
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

/// The sum of a metric's series in Prometheus text (one copy: the client crate's).
pub use idempotency_client::metric_sum;

/// A shipped Envoy bootstrap from `envoy/`, run as shipped except for its ports (moved to free
/// ones) and the store token, with its own store and demo service.
#[derive(Debug)]
pub struct ShippedStack {
    /// Envoy listener URL.
    pub url: String,
    /// Envoy admin URL.
    pub admin_url: String,
    /// Demo service URL.
    pub demo_url: String,
    /// Shared client.
    pub client: reqwest::Client,
    _store: Proc,
    _demo: Proc,
    _envoy: Proc,
    _dir: tempfile::TempDir,
}

impl Drop for ShippedStack {
    fn drop(&mut self) {
        keep_logs_if_panicking(&self._dir);
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if let Some(task) = self.delay_proxy.take() {
            task.abort();
        }
        keep_logs_if_panicking(&self.dir);
    }
}

/// A TCP proxy on a free port to `127.0.0.1:target` that holds every chunk from the client for
/// `delay` before forwarding it: a slow store, injected outside the code under test.
pub async fn delay_proxy(target: u16, delay: Duration) -> (u16, tokio::task::JoinHandle<()>) {
    let (port, task, _) = switchable_delay_proxy(target, delay).await;
    (port, task)
}

/// Like [`delay_proxy`], with the delay changeable while it runs (milliseconds, through the
/// returned handle): a store that is slow, then recovers.
pub async fn switchable_delay_proxy(
    target: u16,
    delay: Duration,
) -> (
    u16,
    tokio::task::JoinHandle<()>,
    std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let delay_ms = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(
        u64::try_from(delay.as_millis()).unwrap(),
    ));
    let handle = delay_ms.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let delay_ms = delay_ms.clone();
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else {
                    return;
                };
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                let upstream = async move {
                    let mut buffer = vec![0u8; 64 * 1024];
                    while let Ok(n) = client_read.read(&mut buffer).await {
                        if n == 0 {
                            break;
                        }
                        let delay = Duration::from_millis(delay_ms.load(Ordering::Relaxed));
                        tokio::time::sleep(delay).await;
                        if server_write.write_all(&buffer[..n]).await.is_err() {
                            break;
                        }
                    }
                };
                let downstream = async move {
                    let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
                };
                tokio::join!(upstream, downstream);
            });
        }
    });
    (port, task, handle)
}

/// When a test fails, keep its processes' logs and print where they are.
pub(crate) fn keep_logs_if_panicking(dir: &tempfile::TempDir) {
    if std::thread::panicking() {
        let kept = std::env::temp_dir().join(format!("e2e-logs-{}", uuid::Uuid::new_v4()));
        if copy_dir(dir.path(), &kept).is_ok() {
            eprintln!("test failed; process logs kept in {}", kept.display());
        }
    }
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        if entry.file_type()?.is_file() && entry.path().extension().is_some_and(|e| e == "log") {
            std::fs::copy(entry.path(), to.join(entry.file_name()))?;
        }
    }
    Ok(())
}

impl ShippedStack {
    /// Start `envoy/<file>` with fresh ports.
    pub async fn start(file: &str) -> ShippedStack {
        let text = std::fs::read_to_string(repo_root().join("envoy").join(file)).unwrap();
        ShippedStack::start_config(&text).await
    }

    /// Start an Envoy bootstrap written for the shipped ports (listener 10000, admin 9901, demo
    /// 8080 or gRPC 50051, store 8081, store replays 8082; the compose file's host names and
    /// module path too) on fresh ones, with the test token as the filter's `store_token`.
    pub async fn start_config(text: &str) -> ShippedStack {
        let (listener, admin, demo, store, replay) =
            (free_port(), free_port(), free_port(), free_port(), free_port());
        let mut text = text
            .replace("port_value: 10000", &format!("port_value: {listener}"))
            .replace("port_value: 9901", &format!("port_value: {admin}"))
            .replace("port_value: 8080", &format!("port_value: {demo}"))
            .replace("port_value: 50051", &format!("port_value: {demo}"))
            .replace("port_value: 8081", &format!("port_value: {store}"))
            .replace("port_value: 8082", &format!("port_value: {replay}"))
            // The compose file's addresses and module path.
            .replace("address: 0.0.0.0", "address: 127.0.0.1")
            .replace("address: demo,", "address: 127.0.0.1,")
            .replace("address: store,", "address: 127.0.0.1,")
            .replace(
                "filename: /etc/envoy/idempotency_filter.wasm",
                &format!("filename: {}", wasm_path().display()),
            );
        if let Some((before, rest)) = text.split_once("\"store_token\": \"") {
            if let Some((_, after)) = rest.split_once('"') {
                text = format!("{before}\"store_token\": \"{STORE_TOKEN}\"{after}");
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let mut store_proc = spawn_store(
            dir.path(),
            store,
            &dir.path().join("store-data"),
            &["--replay-listen".to_owned(), format!("127.0.0.1:{replay}")],
            "store.log",
        );
        let mut demo_proc = spawn_demo(dir.path(), demo, store);
        let mut envoy = start_envoy(dir.path(), &text, "envoy.log");
        wait_all_ready(
            (store, &mut store_proc),
            (demo, &mut demo_proc),
            (admin, &mut envoy),
        )
        .await;
        ShippedStack {
            url: format!("http://127.0.0.1:{listener}"),
            admin_url: format!("http://127.0.0.1:{admin}"),
            demo_url: format!("http://127.0.0.1:{demo}"),
            client: reqwest::Client::new(),
            _store: store_proc,
            _demo: demo_proc,
            _envoy: envoy,
            _dir: dir,
        }
    }

    /// Executions of one key at the demo service.
    pub async fn executions_of(&self, key: &str) -> u64 {
        demo_executions(&self.client, &self.demo_url).await["byKey"][key]
            .as_u64()
            .unwrap_or(0)
    }

    /// Envoy's Prometheus text.
    pub async fn envoy_metrics(&self) -> String {
        get_text(&self.client, &format!("{}/stats/prometheus", self.admin_url)).await
    }
}

/// Poll a Prometheus endpoint until the series `name` sums to at least `expected` (shadow
/// outcomes are recorded after the response, from the root context), or 5 s pass. Returns the
/// last exposition text.
pub async fn wait_for_metric(client: &reqwest::Client, url: &str, name: &str, expected: f64) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = client.get(url).send().await.unwrap().text().await.unwrap();
        if metric_sum(&text, name) >= expected || Instant::now() > deadline {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every `.yaml` file under `envoy/`, recursively.
pub fn shipped_yaml_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(&repo_root().join("envoy"), &mut files);
    files.sort();
    files
}

/// GET `url` and return the body as text.
pub async fn get_text(client: &reqwest::Client, url: &str) -> String {
    client.get(url).send().await.unwrap().text().await.unwrap()
}

/// A command from a Debian package, or the path in `env`; fails clearly when missing.
pub fn debian_tool(env: &str, name: &str, package: &str) -> String {
    let bin = std::env::var(env).unwrap_or_else(|_| name.to_owned());
    let found = Command::new(&bin)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "{bin} not found: install Debian's {package} package (`.ci/run` does) or set {env}"
    );
    bin
}

/// A store service on a free port in `dir`, ready; returns it with its base URL.
pub async fn ready_store(dir: &Path) -> (Proc, String) {
    let port = free_port();
    let mut store = spawn_store(dir, port, &dir.join("store-data"), &[], "store.log");
    let url = format!("http://127.0.0.1:{port}");
    wait_ready(&format!("{url}/readyz"), &mut store, Duration::from_secs(30)).await;
    (store, url)
}

/// The HTTP filters the Istio `EnvoyFilter` (`envoy/istio/envoyfilter.yaml`) patches into a
/// sidecar, in order, followed by the router; the remote module is swapped for the local build
/// and the plugin's `store_token`/`store_cluster` for `store_token`/`store_cluster`. Also returns
/// the plugin configuration as shipped.
pub fn istio_envoyfilter_filters(store_token: &str, store_cluster: Option<&str>) -> (Vec<Value>, Value) {
    istio_envoyfilter_parts("envoy/istio/envoyfilter.yaml", store_token, store_cluster).0
}

/// What an Istio `EnvoyFilter` file patches into a sidecar's inbound listener.
#[derive(Debug, Clone)]
pub struct IstioPatches {
    /// The HTTP filters (as [`istio_envoyfilter_filters`]) and the shipped plugin configuration.
    pub filters: (Vec<Value>, Value),
    /// Routes it inserts.
    pub routes: Vec<Value>,
    /// Fields it merges into the connection manager's `typed_config` (`NETWORK_FILTER` MERGE).
    pub hcm_merge: Value,
}

/// The HTTP filters (as [`istio_envoyfilter_filters`]) and the routes an Istio `EnvoyFilter`
/// file patches in: `((filters, shipped plugin configuration), routes)`.
pub fn istio_envoyfilter_parts(
    file: &str,
    store_token: &str,
    store_cluster: Option<&str>,
) -> ((Vec<Value>, Value), Vec<Value>) {
    let patches = istio_patches(file, store_token, store_cluster);
    (patches.filters, patches.routes)
}

/// Everything an Istio `EnvoyFilter` file patches in, with the module, token and store cluster
/// swapped as in [`istio_envoyfilter_filters`].
pub fn istio_patches(file: &str, store_token: &str, store_cluster: Option<&str>) -> IstioPatches {
    let text = std::fs::read_to_string(repo_root().join(file)).unwrap();
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let patches = doc["spec"]["configPatches"].as_sequence().unwrap();
    let of = |kind: &str| -> Vec<Value> {
        patches
            .iter()
            .filter(|p| p["applyTo"].as_str() == Some(kind))
            .map(|p| serde_json::to_value(&p["patch"]["value"]).unwrap())
            .collect()
    };
    let routes = of("HTTP_ROUTE");
    let hcm_merge = of("NETWORK_FILTER")
        .into_iter()
        .find(|v| v["name"] == "envoy.filters.network.http_connection_manager")
        .map(|v| v["typed_config"].clone())
        .unwrap_or_else(|| json!({}));
    let mut filters = of("HTTP_FILTER");
    let wasm = filters.iter_mut().find(|v| v["name"] == "idempotency").unwrap();
    let config = envoy_config::shipped_wasm_config(wasm);
    config["vm_config"]["code"] = json!({"local": {"filename": wasm_path().display().to_string()}});
    let shipped: Value = serde_json::from_str(config["configuration"]["value"].as_str().unwrap()).unwrap();
    let mut plugin = shipped.clone();
    plugin["store_token"] = json!(store_token);
    if let Some(cluster) = store_cluster {
        plugin["store_cluster"] = json!(cluster);
    }
    config["configuration"]["value"] = json!(plugin.to_string());
    filters.push(json!({"name": "envoy.filters.http.router", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}));
    IstioPatches {
        filters: (filters, shipped),
        routes,
        hcm_merge,
    }
}

/// `bootstrap` (from [`inbound_bootstrap`]) with `merge`'s fields merged into its connection
/// manager, as Istio applies a `NETWORK_FILTER` MERGE patch.
pub fn with_hcm_merge(mut bootstrap: Value, merge: &Value) -> Value {
    if let (Some(hcm), Some(fields)) = (
        bootstrap
            .pointer_mut("/static_resources/listeners/0/filter_chains/0/filters/0/typed_config")
            .and_then(Value::as_object_mut),
        merge.as_object(),
    ) {
        for (k, v) in fields {
            if k != "@type" {
                hcm.insert(k.clone(), v.clone());
            }
        }
    }
    bootstrap
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

/// A STATIC cluster to `127.0.0.1:port`.
pub fn static_cluster(name: &str, port: u16) -> Value {
    json!({"name": name, "type": "STATIC", "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [{"endpoint": {"address":
            {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}]}]}})
}

/// A sidecar-like inbound bootstrap: one listener with `filters` and `routes` (virtual host
/// `vhost`), the given clusters, and an admin port if any. Envoy's default buffer limits.
pub fn inbound_bootstrap(
    listener: u16,
    admin: Option<u16>,
    vhost: &str,
    routes: Vec<Value>,
    filters: Vec<Value>,
    clusters: Vec<Value>,
) -> Value {
    let mut bootstrap = json!({"static_resources": {
        "listeners": [{"name": "inbound", "address": {"socket_address": {"address": "127.0.0.1", "port_value": listener}},
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": "inbound",
                "route_config": {"virtual_hosts": [{"name": vhost, "domains": ["*"], "routes": routes}]},
                "http_filters": filters}}]}]}],
        "clusters": clusters}});
    if let Some(admin) = admin {
        bootstrap["admin"] =
            json!({"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}});
    }
    bootstrap
}

/// Assert that `envoy --mode validate` accepts `config` (YAML or JSON text); `name` labels the
/// failure. Runs from the repository root, so relative paths in shipped configs resolve.
pub fn assert_envoy_accepts(config: &str, name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.yaml");
    std::fs::write(&path, config).unwrap();
    let output = Command::new(envoy_bin())
        .arg("--mode")
        .arg("validate")
        .arg("-c")
        .arg(&path)
        .current_dir(repo_root())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{name}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}
