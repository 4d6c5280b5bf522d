//! Command-line and environment configuration of the store service.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

pub use crate::storage::embedded::EngineKind;

/// Which storage backend to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// Local disk, no server needed (default); see --embedded-engine.
    Embedded,
    /// MongoDB replica set, shared by many store replicas (production).
    Mongodb,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line (default; for log pipelines).
    Json,
    /// Human-readable lines.
    Text,
}

/// Idempotency store service.
#[derive(Debug, Clone, Parser)]
#[command(name = "idempotency-store", version, about)]
pub struct StoreConfig {
    /// Address to listen on.
    #[arg(long, env = "STORE_LISTEN", default_value = "127.0.0.1:8081")]
    pub listen: SocketAddr,

    /// Address of the replay listener: it serves `/v1/replay` (gRPC replays, authenticated by
    /// their ticket) and nothing else. Envoy's replay route points here, never at --listen, so a
    /// misrouted client request can reach at most a ticket check. Unset: `/v1/replay` is served
    /// on --listen beside the API (a warning says so; every shipped config sets it).
    #[arg(long, env = "STORE_REPLAY_LISTEN")]
    pub replay_listen: Option<SocketAddr>,

    /// Storage backend.
    #[arg(long, env = "STORE_BACKEND", value_enum, default_value_t = Backend::Embedded)]
    pub storage: Backend,

    /// Engine of the embedded backend: `fjall` (default; a journal fdatasync'd once per batch of
    /// operations) or `redb` (a B-tree file; for data written by earlier versions).
    #[arg(long, env = "STORE_EMBEDDED_ENGINE", value_enum, default_value_t = EngineKind::Fjall)]
    pub embedded_engine: EngineKind,

    /// Where the embedded backend keeps its data: a directory for `fjall`, a file for `redb`.
    /// Default: `data/idempotency` (fjall) or `data/idempotency.redb` (redb).
    #[arg(long, env = "STORE_DATA_PATH")]
    pub data_path: Option<PathBuf>,

    /// Cache of the embedded engine, in MiB (bounds the store's memory).
    #[arg(long, env = "STORE_CACHE_MB", default_value_t = 32)]
    pub cache_mb: usize,

    /// MongoDB connection string (mongodb backend).
    #[arg(long, env = "MONGODB_URI")]
    pub mongodb_uri: Option<String>,

    /// MongoDB database name (mongodb backend).
    #[arg(long, env = "MONGODB_DATABASE", default_value = "idempotency")]
    pub mongodb_database: String,

    /// A single bearer token with every role (proxy, service, admin): the shortcut for local
    /// runs. In production use --credentials.
    #[arg(long, env = "STORE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// YAML file of credentials with roles (`proxy`, `service` bound to service names, `admin`),
    /// several tokens each; reloaded on SIGHUP and when the file changes.
    #[arg(long, env = "STORE_CREDENTIALS")]
    pub credentials: Option<PathBuf>,

    /// Terminate TLS on both listeners with this certificate chain (PEM) and require client
    /// certificates signed by --client-ca: the caller's identity is its certificate's URI SAN
    /// (e.g. a SPIFFE id) or DNS SAN, mapped to a credential by `identities` in --credentials.
    #[arg(long, env = "STORE_TLS_CERT", requires_all = ["tls_key", "client_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, env = "STORE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// CA certificates (PEM) that sign the client certificates the store accepts.
    #[arg(long, env = "STORE_CLIENT_CA", requires = "tls_cert")]
    pub client_ca: Option<PathBuf>,
    /// Read the caller's identity from `x-forwarded-client-cert`, as the store's own sidecar
    /// sets it (Envoy `forward_client_cert_details: SANITIZE_SET` or `APPEND_FORWARD` with
    /// `set_current_client_cert_details: {uri: true, dns: true}`; Istio's inbound default) —
    /// only on connections from --trusted-proxies.
    #[arg(
        long,
        env = "STORE_TRUST_FORWARDED_CLIENT_CERT",
        default_value_t = false,
        requires = "trusted_proxies"
    )]
    pub trust_forwarded_client_cert: bool,
    /// Addresses or CIDR blocks of the proxies whose `x-forwarded-client-cert` is believed
    /// (comma-separated; Istio's inbound sidecar connects from 127.0.0.6).
    #[arg(
        long,
        env = "STORE_TRUSTED_PROXIES",
        value_delimiter = ',',
        requires = "trust_forwarded_client_cert"
    )]
    pub trusted_proxies: Vec<String>,

    /// Serve `/v1` without a token (only behind mesh mTLS with an authorization policy).
    #[arg(long, env = "STORE_ALLOW_UNAUTHENTICATED", default_value_t = false)]
    pub allow_unauthenticated: bool,

    /// Largest request body the API accepts, in bytes (at most the default, 16 MiB, which fits
    /// the largest `max_response_size` a filter may have). A `complete` refused as too large
    /// (413) keeps its record locked as outcome unknown, never re-executed.
    #[arg(long, env = "STORE_MAX_REQUEST_BYTES", default_value_t = idempotency_wire::MAX_STORE_REQUEST_BYTES)]
    pub max_request_bytes: usize,

    /// How often expired records are deleted.
    #[arg(long, env = "STORE_SWEEP_INTERVAL", value_parser = humantime::parse_duration, default_value = "30s")]
    pub sweep_interval: Duration,

    /// Most acquires that may wait at once for an in-progress record (`in_progress_wait` on a
    /// route); beyond this an acquire answers "in progress" at once instead of waiting.
    #[arg(long, env = "STORE_MAX_WAITERS", default_value_t = crate::api::DEFAULT_MAX_WAITERS)]
    pub max_waiters: usize,
    /// How often a waiting acquire looks at its record again (changes made through this replica
    /// wake it at once; this bounds how late it sees another replica's).
    #[arg(long, env = "STORE_WAIT_POLL", value_parser = humantime::parse_duration, default_value = "100ms")]
    pub wait_poll: Duration,
    /// Key for signing replay tickets (gRPC replays), at least 16 characters; every replica
    /// must use the same one. Without it or --replay-secret-file: derived from --token when
    /// given (local runs), else a per-process key (one replica only; a warning says so).
    #[arg(
        long,
        env = "STORE_REPLAY_SECRET",
        hide_env_values = true,
        conflicts_with = "replay_secret_file"
    )]
    pub replay_secret: Option<String>,
    /// File of replay secrets, one per line: the first signs, every one verifies (rotate by
    /// adding the new secret first, then removing the old one once every replica has it).
    /// Reloaded on SIGHUP and when the file changes.
    #[arg(long, env = "STORE_REPLAY_SECRET_FILE")]
    pub replay_secret_file: Option<PathBuf>,
    /// Log format.
    #[arg(long, env = "STORE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,
}

impl StoreConfig {
    /// The embedded backend's data path: as configured, or the engine's default.
    pub fn data_path(&self) -> PathBuf {
        self.data_path
            .clone()
            .unwrap_or_else(|| match self.embedded_engine {
                EngineKind::Fjall => PathBuf::from("data/idempotency"),
                EngineKind::Redb => PathBuf::from("data/idempotency.redb"),
            })
    }

    /// Cross-field checks clap cannot express; the message names the flag.
    pub fn validate(&self) -> Result<(), String> {
        match (&self.token, self.allow_unauthenticated) {
            (None, false) if self.credentials.is_none() => {
                return Err(
                    "--credentials (STORE_CREDENTIALS) or --token (STORE_TOKEN) is required; pass --allow-unauthenticated to run without either"
                        .into(),
                )
            }
            (Some(t), _) if t.trim().is_empty() => {
                return Err("--token (STORE_TOKEN) must not be empty".into())
            }
            _ => {}
        }
        if self.max_request_bytes == 0 || self.max_request_bytes > idempotency_wire::MAX_STORE_REQUEST_BYTES {
            return Err(format!(
                "--max-request-bytes must be between 1 and {}",
                idempotency_wire::MAX_STORE_REQUEST_BYTES
            ));
        }
        if self.trust_forwarded_client_cert {
            crate::identity::TrustedProxies::parse(&self.trusted_proxies).map_err(|e| e.to_string())?;
        }
        if self.replay_listen == Some(self.listen) {
            return Err("--replay-listen must differ from --listen".into());
        }
        if let Some(secret) = &self.replay_secret {
            if secret.len() < crate::replay::MIN_SECRET_LENGTH {
                return Err(format!(
                    "--replay-secret (STORE_REPLAY_SECRET) must be at least {} characters",
                    crate::replay::MIN_SECRET_LENGTH
                ));
            }
        }
        if self.storage == Backend::Mongodb && self.mongodb_uri.is_none() {
            return Err("--mongodb-uri (MONGODB_URI) is required with --storage mongodb".into());
        }
        if self.wait_poll.is_zero() {
            return Err("--wait-poll must be greater than zero".into());
        }
        if self.sweep_interval.is_zero() {
            return Err("--sweep-interval must be greater than zero".into());
        }
        Ok(())
    }
}
