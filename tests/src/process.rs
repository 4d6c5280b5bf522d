//! Processes the tests start: where binaries and the `.wasm` are, free ports, a child process
//! that is killed (and its log kept on failure) when dropped, waiting for readiness.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub(crate) fn bin(name: &str) -> PathBuf {
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

/// When a test fails, keep its processes' logs and print where they are.
pub(crate) fn keep_logs_if_panicking(dir: &tempfile::TempDir) {
    if std::thread::panicking() {
        let kept = std::env::temp_dir().join(format!("e2e-logs-{}", uuid::Uuid::new_v4()));
        if copy_dir(dir.path(), &kept).is_ok() {
            eprintln!("test failed; process logs kept in {}", kept.display());
        }
    }
}

pub(crate) fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        if entry.file_type()?.is_file() && entry.path().extension().is_some_and(|e| e == "log") {
            std::fs::copy(entry.path(), to.join(entry.file_name()))?;
        }
    }
    Ok(())
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
