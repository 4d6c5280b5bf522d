//! The store side of `doctor`: reachable, live, ready, its backend and durable commits, the
//! credentials in force (names only), its replay listener, and its clock against this machine's.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use idempotency_client::ClientError;
use serde_json::Value;

use super::rules::{Finding, Severity};

/// Largest clock difference tolerated between this machine and the store: locks and retention
/// are the store's clock, but proxies compute deadlines and the cache's expiry with their own.
const MAX_SKEW: Duration = Duration::from_secs(2);

/// What the store said about itself, for the report.
#[derive(Debug, Default, serde::Serialize)]
pub struct StoreFacts {
    /// `/v1/info`, when the token allowed it.
    pub info: Option<Value>,
    /// Measured clock difference (store − here), milliseconds.
    pub clock_skew_ms: Option<i64>,
}

/// Check the store at `base` with `token` (an admin token reads `/v1/info`).
pub async fn check(base: &str, token: Option<&str>, findings: &mut Vec<Finding>) -> StoreFacts {
    let base = base.trim_end_matches('/');
    let mut facts = StoreFacts::default();
    let Ok(client) = reqwest::Client::builder().timeout(Duration::from_secs(5)).build() else {
        return facts;
    };
    let mut problem = |severity, rule, problem: String, fix: &str| {
        findings.push(Finding {
            severity,
            rule,
            location: format!("store {base}"),
            problem,
            fix: fix.to_owned(),
        });
    };
    match client.get(format!("{base}/healthz")).send().await {
        Err(e) => {
            problem(
                Severity::Error,
                "store-reachable",
                format!("the store does not answer ({e}): every keyed request gets 503 (or passes untracked with failure_mode: open)"),
                "start the store, or point --store at its --listen address",
            );
            return facts;
        }
        Ok(r) if !r.status().is_success() => problem(
            Severity::Error,
            "store-live",
            format!(
                "/healthz answers {}: {}",
                r.status(),
                r.text().await.unwrap_or_default()
            ),
            "the store cannot commit durably (a failed journal sync): restart it and check its disk",
        ),
        Ok(_) => {}
    }
    let sent = SystemTime::now();
    match client.get(format!("{base}/readyz")).send().await {
        Ok(r) if r.status().is_success() => {
            let back = SystemTime::now();
            facts.clock_skew_ms = store_clock_ms(&r).map(|store| store - midpoint_ms(sent, back));
        }
        Ok(r) => problem(
            Severity::Error,
            "store-ready",
            format!(
                "/readyz answers {}: the store is not ready for traffic",
                r.status()
            ),
            "wait for it, or check its log (storage backend unreachable?)",
        ),
        Err(e) => problem(
            Severity::Error,
            "store-ready",
            format!("/readyz failed: {e}"),
            "check the store's log",
        ),
    }
    let info = match idempotency_client::StoreClient::new(base, token.map(str::to_owned)) {
        Ok(store) => store.info().await,
        Err(e) => Err(e),
    };
    match info {
        Ok(info) => {
            if info["durable_commits_healthy"] == Value::Bool(false) {
                problem(
                    Severity::Error,
                    "store-durable",
                    format!("durable commits failing: {}", info["durable_commits_error"]),
                    "restart the store and check its disk",
                );
            }
            if info["replay_listen"].is_null() {
                problem(
                    Severity::Warning,
                    "store-replay-listener",
                    "no --replay-listen: gRPC replays are served beside the API, where a misrouted request meets more than a ticket check".into(),
                    "idempotency-store --replay-listen 0.0.0.0:8082   # and point the replay route's cluster at it",
                );
            }
            if info["authentication"] == Value::Bool(false) {
                problem(
                    Severity::Warning,
                    "store-authentication",
                    "the store serves without credentials: anyone who reaches it can complete or purge records".into(),
                    "idempotency-store --credentials-file credentials.yaml   # see docs/security.md",
                );
            }
            if let Some(now) = info["now_ms"].as_i64() {
                let here = i64::try_from(SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis()).unwrap_or(i64::MAX);
                facts.clock_skew_ms = Some(now - here);
            }
            facts.info = Some(info);
        }
        Err(ClientError::Status { status: status @ (401 | 403), .. }) => problem(
            Severity::Warning,
            "store-info",
            format!("/v1/info answers {status}: pass an admin token (--token or IDEMPOTENCY_TOKEN) to check backend, durability and credentials"),
            "idempotencyctl --token-file admin.token doctor ...",
        ),
        Err(ClientError::Status { status, .. }) => problem(
            Severity::Warning,
            "store-info",
            format!("/v1/info answers {status} (a store older than this tool?)"),
            "upgrade the store",
        ),
        Err(e) => problem(Severity::Warning, "store-info", format!("/v1/info failed: {e}"), "check the store's log"),
    }
    if let Some(skew) = facts.clock_skew_ms {
        if skew.unsigned_abs() > u64::try_from(MAX_SKEW.as_millis()).unwrap_or(u64::MAX) {
            problem(
                Severity::Warning,
                "clock-skew",
                format!("the store's clock is {skew} ms from this machine's: lock expiry and replay-cache lifetimes drift by as much"),
                "run NTP (chrony) on store and proxy nodes",
            );
        }
    }
    facts
}

/// The store's clock from its `Date` header (second precision), as Unix milliseconds.
fn store_clock_ms(response: &reqwest::Response) -> Option<i64> {
    let date = response.headers().get("date")?.to_str().ok()?;
    let at = httpdate::parse_http_date(date).ok()?;
    i64::try_from(at.duration_since(UNIX_EPOCH).ok()?.as_millis()).ok()
}

fn midpoint_ms(sent: SystemTime, back: SystemTime) -> i64 {
    let ms = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis();
    i64::try_from((ms(sent) + ms(back)) / 2).unwrap_or(i64::MAX)
}
