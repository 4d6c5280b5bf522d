//! Test support (unit tests, and other crates with the `testing` feature): a real MongoDB
//! wire-protocol server (PyPI `secantusdb`) on a free port.
//!
//! `make setup` installs it into `.venv`; `SECANTUSD_BIN` overrides the path.

// Test support: a server that cannot start fails the test that needs it, loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `secantusd-py --standalone` with in-memory storage; killed on drop.
#[derive(Debug)]
pub struct MongoServer {
    child: Option<Child>,
    port: u16,
}

fn server_bin() -> PathBuf {
    let path = std::env::var_os("SECANTUSD_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/secantusd-py"),
        PathBuf::from,
    );
    assert!(
        path.exists(),
        "{} is missing: run `make setup` (installs secantusdb)",
        path.display()
    );
    path
}

impl MongoServer {
    /// Start a server and wait until it accepts connections (its output discarded).
    pub async fn start() -> MongoServer {
        MongoServer::start_logging(None).await
    }

    /// Start a server writing its output to `log` (kept for a failed test), and wait until it
    /// accepts connections.
    pub async fn start_logging(log: Option<&std::path::Path>) -> MongoServer {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let output = || match log.and_then(|path| std::fs::File::create(path).ok()) {
            Some(file) => Stdio::from(file),
            None => Stdio::null(),
        };
        let mut child = Command::new(server_bin())
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args([
                "--storage-path",
                ":memory:",
                "--standalone",
                "--log-level",
                "WARNING",
            ])
            .stdin(Stdio::null())
            .stdout(output())
            .stderr(output())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("secantusd exited with {status} (its log: {log:?})");
            }
            assert!(
                Instant::now() < deadline,
                "secantusd did not start on port {port}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        MongoServer {
            child: Some(child),
            port,
        }
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Connection string.
    pub fn uri(&self) -> String {
        format!("mongodb://127.0.0.1:{}/?directConnection=true", self.port)
    }

    /// Kill the server now.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for MongoServer {
    fn drop(&mut self) {
        self.stop();
    }
}
