//! `idempotencyctl`: look at a record, purge one, list stuck locks, summarise the store's metrics,
//! and check a deployment (`doctor`).
//!
//! Exit codes: 0 done; 1 not found; 2 usage (clap); 3 refused (401/403); 4 store unreachable or
//! failing; 5 anything else (an answer it could not read). `doctor`: 0 all good, 1 warnings,
//! 2 errors, 4 the configuration could not be read. `--json` prints machine-readable
//! output; errors go to stderr as one line.

// `serde_json::Value` indexed by a name yields `Null` when absent: it never panics.
#![allow(clippy::indexing_slicing)]

use std::io::{BufRead as _, Write as _};
use std::process::ExitCode;
use std::time::Duration;

use base64::Engine as _;
use clap::{Parser, Subcommand};
use idempotency_client::{metric_sum, ClientError, StoreClient};
use idempotency_wire::RecordId;
use serde_json::Value;
use thiserror::Error;

mod doctor;

/// Operator CLI for the idempotency store.
#[derive(Debug, Parser)]
#[command(name = "idempotencyctl", version, about)]
struct Cli {
    /// Base URL of the store service.
    #[arg(long, env = "IDEMPOTENCY_STORE", default_value = "http://127.0.0.1:8081")]
    store: String,
    /// Admin token (prefer the variable or --token-file: arguments show up in `ps`).
    #[arg(long, env = "IDEMPOTENCY_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Read the admin token from this file (e.g. a mounted Secret).
    #[arg(long, conflicts_with = "token")]
    token_file: Option<std::path::PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

/// Which record.
#[derive(Debug, clap::Args)]
struct RecordArgs {
    /// Service name.
    #[arg(long)]
    service: String,
    /// Caller scope (empty when unscoped).
    #[arg(long, default_value = "")]
    scope: String,
    /// Idempotency key.
    #[arg(long)]
    key: String,
}

impl RecordArgs {
    fn id(&self) -> RecordId {
        RecordId {
            service: self.service.clone(),
            scope: self.scope.clone(),
            key: self.key.clone(),
        }
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show one record: state, fingerprint, lock, checkpoints, stored response.
    Get {
        #[command(flatten)]
        record: RecordArgs,
    },
    /// Delete one record (asks first unless --yes).
    Purge {
        #[command(flatten)]
        record: RecordArgs,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
    /// List records of a service still in progress after `--older-than` (stuck locks).
    Locks {
        /// Service name.
        #[arg(long)]
        service: String,
        /// Only records created at least this long ago, e.g. `1m`.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "1m")]
        older_than: Duration,
        /// Most records to list.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Summarise the store's metrics.
    Stats,
    /// Check an Envoy setup (a file or a running Envoy's admin) and optionally the store: does
    /// every keyed request keep the guarantee? Exit 0 all good, 1 warnings, 2 errors.
    Doctor(doctor::DoctorArgs),
}

/// Why a command failed; each maps to an exit code.
#[derive(Debug, Error)]
enum CtlError {
    #[error("not found: {0}")]
    NotFound(String),
    #[error("refused by the store ({status}): {message}")]
    Refused { status: u16, message: String },
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("{0}")]
    Unreadable(String),
    #[error("{0}")]
    Other(String),
}

impl CtlError {
    fn exit_code(&self) -> u8 {
        match self {
            CtlError::NotFound(_) => 1,
            CtlError::Refused { .. } => 3,
            CtlError::Unavailable(_) | CtlError::Unreadable(_) => 4,
            CtlError::Other(_) => 5,
        }
    }
}

impl From<ClientError> for CtlError {
    fn from(error: ClientError) -> CtlError {
        match error {
            ClientError::Transport(e) => CtlError::Unavailable(e.to_string()),
            ClientError::Status {
                status: status @ (401 | 403),
                body,
            } => {
                let message = serde_json::from_str::<Value>(&body)
                    .ok()
                    .and_then(|b| b["message"].as_str().map(str::to_owned))
                    .unwrap_or(body);
                CtlError::Refused { status, message }
            }
            ClientError::Status { status: 404, .. } => CtlError::NotFound("no such record".to_owned()),
            ClientError::Status {
                status: status @ 500..=599,
                body,
            } => CtlError::Unavailable(format!("the store answered {status}: {body}")),
            ClientError::Status { status, body } => CtlError::Other(format!("unexpected {status}: {body}")),
            other => CtlError::Other(other.to_string()),
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn seconds(ms: u64) -> String {
    format!("{:.1}s", ms as f64 / 1000.0)
}

/// Human view of one record.
fn print_record(record: &Value) {
    let now = now_ms();
    let field = |name: &str| record[name].as_str().unwrap_or("").to_owned();
    let number = |name: &str| record[name].as_u64().unwrap_or(0);
    println!("record      {}", field("record_id"));
    println!(
        "identity    service={} scope={:?} key={}",
        field("service"),
        field("scope"),
        field("key")
    );
    println!("state       {}", field("state"));
    println!("request     {} {}", field("method"), field("path"));
    println!("fingerprint {}", field("fingerprint"));
    println!("fencing     {}", number("fencing_token"));
    let locked_until = number("locked_until_ms");
    if field("state") == "in_progress" {
        let remaining = locked_until.saturating_sub(now);
        println!(
            "lock        {}",
            if remaining > 0 {
                format!("{} left", seconds(remaining))
            } else {
                "free (released or expired)".into()
            }
        );
    }
    if let Some(unknown) = record.get("outcome_unknown").filter(|v| !v.is_null()) {
        println!(
            "outcome     unknown ({})",
            unknown["reason"].as_str().unwrap_or("?")
        );
    }
    let checkpoints: Vec<String> = record["checkpoints"]
        .as_array()
        .map(|c| {
            c.iter()
                .filter_map(|c| c["phase"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    println!(
        "checkpoints {}",
        if checkpoints.is_empty() {
            "-".into()
        } else {
            checkpoints.join(" → ")
        }
    );
    if let Some(response) = record.get("response").filter(|v| !v.is_null()) {
        println!("response    {}", response["status"]);
        for header in response["headers"].as_array().into_iter().flatten() {
            println!(
                "  {}: {}",
                header[0].as_str().unwrap_or(""),
                header[1].as_str().unwrap_or("")
            );
        }
        let body = base64::engine::general_purpose::STANDARD
            .decode(response["body"].as_str().unwrap_or(""))
            .unwrap_or_default();
        let preview = String::from_utf8_lossy(body.get(..200).unwrap_or(&body)).into_owned();
        println!(
            "body        {} bytes{}",
            body.len(),
            if body.is_empty() {
                String::new()
            } else {
                format!(": {preview}")
            }
        );
    }
    println!(
        "expires in  {}",
        seconds(number("expires_ms").saturating_sub(now))
    );
}

fn confirm(question: &str) -> bool {
    eprint!("{question} [y/N] ");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer).is_ok() && matches!(answer.trim(), "y" | "yes")
}

/// The store's counters worth a glance, summed over labels.
const STATS: [(&str, &str); 9] = [
    ("idempotency_misses_total", "executions (locks granted)"),
    ("idempotency_hits_total", "replays"),
    (
        "idempotency_concurrent_collisions_total",
        "in-progress refusals (409)",
    ),
    ("idempotency_parameter_mismatches_total", "mismatches (422)"),
    (
        "idempotency_outcome_unknown_total",
        "outcomes unknown (locks kept)",
    ),
    (
        "idempotency_stale_fencing_tokens_total",
        "writes refused by fencing",
    ),
    ("idempotency_storage_errors_total", "storage errors"),
    ("message_deduplication_hits_total", "duplicate messages skipped"),
    ("idempotency_store_live_records", "records stored"),
];

/// The admin token from `--token`, `IDEMPOTENCY_TOKEN` or `--token-file`.
fn read_token(cli: &Cli) -> Result<Option<String>, CtlError> {
    Ok(match (&cli.token, &cli.token_file) {
        (Some(token), _) => Some(token.clone()),
        (None, Some(path)) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| CtlError::Other(format!("cannot read {}: {e}", path.display())))?
                .trim()
                .to_owned(),
        ),
        (None, None) => None,
    })
}

/// Run a command; its exit code (0, or doctor's verdict).
async fn run(cli: Cli) -> Result<u8, CtlError> {
    let token = read_token(&cli)?;
    let store = StoreClient::new(cli.store.clone(), token.clone())?;
    match cli.command {
        Command::Get { record } => {
            let record = store
                .record(&record.id())
                .await?
                .ok_or_else(|| CtlError::NotFound("no such record".to_owned()))?;
            if cli.json {
                println!("{record}");
            } else {
                print_record(&record);
            }
        }
        Command::Purge { record, yes } => {
            let RecordArgs { service, scope, key } = &record;
            if !yes
                && !confirm(&format!(
                    "purge the record of key {key:?} (service {service}, scope {scope:?})?"
                ))
            {
                return Err(CtlError::Other("not purged".to_owned()));
            }
            if !store.purge(&record.id()).await? {
                return Err(CtlError::NotFound("no such record".to_owned()));
            }
            if cli.json {
                println!(
                    "{}",
                    serde_json::json!({"purged": true, "service": service, "scope": scope, "key": key})
                );
            } else {
                println!("purged");
            }
        }
        Command::Locks {
            service,
            older_than,
            limit,
        } => {
            let mut records = Vec::new();
            let mut cursor: Option<String> = None;
            while records.len() < limit {
                let page = store
                    .records_in_progress(
                        &service,
                        u64::try_from(older_than.as_millis()).unwrap_or(u64::MAX),
                        (limit - records.len()).min(1_000),
                        cursor.as_deref(),
                    )
                    .await?;
                records.extend(page["records"].as_array().cloned().unwrap_or_default());
                cursor = page["next"].as_str().map(str::to_owned);
                if cursor.is_none() {
                    break;
                }
            }
            if cli.json {
                println!("{}", Value::Array(records));
            } else {
                let now = now_ms();
                println!("key                      scope         token  lock left outcome              age");
                for r in &records {
                    let left = r["locked_until_ms"].as_u64().unwrap_or(0).saturating_sub(now);
                    println!(
                        "{:<24} {:<10} {:>8} {:>10} {:<20} {}",
                        r["key"].as_str().unwrap_or(""),
                        r["scope"].as_str().unwrap_or(""),
                        r["fencing_token"],
                        seconds(left),
                        r["outcome_unknown"]["reason"].as_str().unwrap_or("-"),
                        seconds(now.saturating_sub(r["created_ms"].as_u64().unwrap_or(now)))
                    );
                }
                println!(
                    "{} stuck lock(s) older than {}",
                    records.len(),
                    humantime::format_duration(older_than)
                );
            }
        }
        Command::Doctor(args) => {
            return doctor::run(&args, token.as_deref(), cli.json)
                .await
                .map_err(|e| CtlError::Unreadable(e.to_string()));
        }
        Command::Stats => {
            let text = store.metrics_text().await?;
            if cli.json {
                let summary: serde_json::Map<String, Value> = STATS
                    .iter()
                    .map(|(name, _)| ((*name).to_owned(), metric_sum(&text, name).into()))
                    .collect();
                println!("{}", Value::Object(summary));
            } else {
                for (name, label) in STATS {
                    println!("{:>12}  {label}", metric_sum(&text, name));
                }
            }
        }
    }
    Ok(0)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("idempotencyctl: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
