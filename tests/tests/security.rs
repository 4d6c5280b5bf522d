//! Least privilege against a real store process: role-based credentials from a file, rotated
//! without a restart (file change and SIGHUP), admin actions audited, and no token ever logged.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::process::Command;
use std::time::{Duration, Instant};

use e2e::{free_port, store_bin, wait_ready, Proc};
use serde_json::json;

const OLD: &str = "proxy-token-old-00001";
const NEW: &str = "proxy-token-new-00001";
const ADMIN: &str = "admin-token-000000001";

fn write_credentials(path: &std::path::Path, proxy_tokens: &[&str]) {
    let tokens: Vec<String> = proxy_tokens.iter().map(|t| format!("\"{t}\"")).collect();
    std::fs::write(
        path,
        format!(
            "credentials:\n  - {{name: mesh-proxies, role: proxy, services: [orders], tokens: [{}]}}\n  - {{name: oncall, role: admin, tokens: [\"{ADMIN}\"]}}\n",
            tokens.join(", ")
        ),
    )
    .unwrap();
}

async fn status_with(client: &reqwest::Client, url: &str, token: &str) -> u16 {
    client
        .post(format!("{url}/v1/abandon"))
        .bearer_auth(token)
        .json(&json!({"service": "orders", "scope": "", "key": "k", "attempt_id": "a"}))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn until_status(client: &reqwest::Client, url: &str, token: &str, wanted: u16, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let status = status_with(client, url, token).await;
        if status == wanted {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{token}: still {status}, wanted {wanted}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn tokens_rotate_without_a_restart_and_admin_actions_are_audited_without_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let credentials = dir.path().join("credentials.yaml");
    write_credentials(&credentials, &[OLD]);
    let port = free_port();
    let mut command = Command::new(store_bin());
    command
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--data-path")
        .arg(dir.path().join("store-data"))
        .arg("--credentials")
        .arg(&credentials)
        .env("RUST_LOG", "info");
    let mut store = Proc::spawn("store", command, dir.path().join("store.log"));
    let url = format!("http://127.0.0.1:{port}");
    wait_ready(&format!("{url}/readyz"), &mut store, Duration::from_secs(30)).await;
    let client = reqwest::Client::new();
    assert_eq!(status_with(&client, &url, OLD).await, 200);
    assert_eq!(status_with(&client, &url, NEW).await, 401);

    // Step 1 of a rotation: both tokens valid (the file changed; no signal).
    write_credentials(&credentials, &[OLD, NEW]);
    until_status(&client, &url, NEW, 200, Duration::from_secs(10)).await;
    assert_eq!(
        status_with(&client, &url, OLD).await,
        200,
        "both valid during the rollout"
    );
    // Step 2: the old token removed, picked up at once on SIGHUP.
    write_credentials(&credentials, &[NEW]);
    Command::new("kill")
        .arg("-HUP")
        .arg(store.pid().unwrap().to_string())
        .status()
        .unwrap();
    until_status(&client, &url, OLD, 401, Duration::from_secs(2)).await;
    assert_eq!(status_with(&client, &url, NEW).await, 200);
    // A broken file keeps the credentials in force.
    std::fs::write(&credentials, "credentials: [{").unwrap();
    Command::new("kill")
        .arg("-HUP")
        .arg(store.pid().unwrap().to_string())
        .status()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(status_with(&client, &url, NEW).await, 200);

    // Admin lookup and purge are audited: who (credential name), what, which.
    let lookup = client
        .get(format!("{url}/v1/records"))
        .query(&[("service", "orders"), ("scope", ""), ("key", "audited-key")])
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(lookup.status(), 404);
    let purge = client
        .delete(format!("{url}/v1/records"))
        .query(&[("service", "orders"), ("scope", ""), ("key", "audited-key")])
        .bearer_auth(NEW)
        .send()
        .await
        .unwrap();
    assert_eq!(purge.status(), 403, "a proxy token cannot purge");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let log = store.output();
    let audit: Vec<&str> = log.lines().filter(|l| l.contains("admin action")).collect();
    assert_eq!(audit.len(), 1, "{log}");
    assert!(
        audit[0].contains("\"credential\":\"oncall\"") && audit[0].contains("\"action\":\"get\""),
        "{}",
        audit[0]
    );
    assert!(!audit[0].contains("audited-key"), "keys are logged as hashes");
    for token in [OLD, NEW, ADMIN] {
        assert!(!log.contains(token), "a token leaked into the log");
    }
    assert!(log.contains("credentials reloaded"), "{log}");
}

/// A ticket for `g1` (completed by then) from the store at `url`.
async fn replay_ticket(client: &reqwest::Client, url: &str) -> String {
    let acquire = json!({"service": "orders", "scope": "", "key": "g1", "fingerprint": "f", "method": "POST",
        "path": "/demo.Orders/Create", "lock_timeout_ms": 60000, "retention_ms": 60000, "replay_ticket": true});
    let answer: serde_json::Value = client
        .post(format!("{url}/v1/acquire"))
        .bearer_auth(e2e::STORE_TOKEN)
        .json(&acquire)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    if answer["outcome"] == "acquired" {
        let complete = json!({"service": "orders", "scope": "", "key": "g1", "fencing_token": answer["fencing_token"],
            "record_id": answer["record_id"], "attempt_id": answer["attempt_id"], "retention_ms": 60000,
            "response": {"status": 200, "headers": [["content-type", "application/grpc"]], "body": "AAAAAAA=",
                         "trailers": [["grpc-status", "0"]]}});
        let done = client
            .post(format!("{url}/v1/complete"))
            .bearer_auth(e2e::STORE_TOKEN)
            .json(&complete)
            .send()
            .await
            .unwrap();
        assert_eq!(done.status(), 200);
        return Box::pin(replay_ticket(client, url)).await;
    }
    answer["replay_ticket"].as_str().unwrap().to_owned()
}

/// The grpc-status a replay of `ticket` on the replay listener answers ("0": served).
async fn replayed_status(client: &reqwest::Client, replay_url: &str, ticket: &str) -> String {
    let response = client
        .post(format!("{replay_url}/v1/replay"))
        .header("x-idempotency-replay-ticket", ticket)
        .send()
        .await
        .unwrap();
    let headers = response.headers().clone();
    // A served replay carries its status in the trailers; a refusal is trailers-only.
    match headers.get("grpc-status") {
        Some(status) => status.to_str().unwrap().to_owned(),
        None => {
            assert_eq!(headers["idempotent-replayed"], "true");
            "0".to_owned()
        }
    }
}

fn write_secrets(path: &std::path::Path, secrets: &[&str]) {
    let staged = path.with_extension("staged");
    std::fs::write(&staged, secrets.join("\n")).unwrap();
    std::fs::rename(&staged, path).unwrap();
}

async fn reloaded(store: &Proc, times: usize) {
    // The store looks at the file every 2 s; generous for a loaded CI machine.
    let deadline = Instant::now() + Duration::from_secs(15);
    while store.output().matches("replay secrets reloaded").count() < times {
        assert!(Instant::now() < deadline, "{}", store.output());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn replay_secrets_rotate_without_a_restart_and_without_refusing_tickets_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("replay-secrets");
    write_secrets(&secrets, &["old-replay-secret-0001"]);
    let (port, replay_port) = (free_port(), free_port());
    let mut store = e2e::spawn_store(
        dir.path(),
        port,
        &dir.path().join("store-data"),
        &[
            "--replay-listen".into(),
            format!("127.0.0.1:{replay_port}"),
            "--replay-secret-file".into(),
            secrets.display().to_string(),
        ],
        "store.log",
    );
    let url = format!("http://127.0.0.1:{port}");
    let replay_url = format!("http://127.0.0.1:{replay_port}");
    wait_ready(&format!("{url}/readyz"), &mut store, Duration::from_secs(30)).await;
    let client = reqwest::Client::new();
    let before = replay_ticket(&client, &url).await;
    assert_eq!(replayed_status(&client, &replay_url, &before).await, "0");

    // Step 1: the new secret signs, the old one still verifies.
    write_secrets(&secrets, &["new-replay-secret-0001", "old-replay-secret-0001"]);
    Command::new("kill")
        .arg("-HUP")
        .arg(store.pid().unwrap().to_string())
        .status()
        .unwrap();
    reloaded(&store, 1).await;
    let after = replay_ticket(&client, &url).await;
    assert_eq!(
        replayed_status(&client, &replay_url, &before).await,
        "0",
        "issued before: still served"
    );
    assert_eq!(replayed_status(&client, &replay_url, &after).await, "0");
    // Step 2: the old secret removed (the file changed; no signal).
    write_secrets(&secrets, &["new-replay-secret-0001"]);
    reloaded(&store, 2).await;
    assert_eq!(
        replayed_status(&client, &replay_url, &before).await,
        "14",
        "the old key is gone"
    );
    assert_eq!(replayed_status(&client, &replay_url, &after).await, "0");
}
