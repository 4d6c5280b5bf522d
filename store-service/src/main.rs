//! Entry point: parse configuration, open storage, serve until SIGTERM/Ctrl-C.

/// mimalloc instead of the system allocator: the store allocates on every request (JSON
/// bodies, records), and glibc's malloc showed up at the top of its profile.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use idempotency_store::api::{app, AppState};
use idempotency_store::auth::Authenticator;
use idempotency_store::config::{Backend, LogFormat, StoreConfig};
use idempotency_store::metrics::Metrics;
use idempotency_store::replay::ReplayTickets;
use idempotency_store::shutdown::shutdown_signal;
use idempotency_store::storage::embedded::EmbeddedStorage;
use idempotency_store::storage::mongo::MongoStorage;
use idempotency_store::storage::Storage;
use idempotency_store::sweep_loop;
use idempotency_store::wait::Waiters;
use tracing_subscriber::EnvFilter;

/// How often the credentials file is checked for changes (SIGHUP reloads at once).
const CREDENTIALS_POLL: std::time::Duration = std::time::Duration::from_secs(2);

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

async fn open_storage(config: &StoreConfig) -> Result<Arc<dyn Storage>, String> {
    match config.storage {
        Backend::Embedded => {
            let path = config.data_path();
            EmbeddedStorage::open_engine(
                config.embedded_engine,
                &path,
                config.cache_mb.saturating_mul(1024 * 1024),
            )
            .map(|s| Arc::new(s) as Arc<dyn Storage>)
            .map_err(|e| {
                format!(
                    "embedded storage ({:?}) at {}: {e}",
                    config.embedded_engine,
                    path.display()
                )
            })
        }
        Backend::Mongodb => {
            let uri = config.mongodb_uri.as_deref().unwrap_or_default();
            MongoStorage::connect(uri, &config.mongodb_database)
                .await
                .map(|s| Arc::new(s) as Arc<dyn Storage>)
                .map_err(|e| format!("mongodb storage (database {:?}): {e}", config.mongodb_database))
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let config = StoreConfig::parse();
    init_logging(config.log_format);
    if let Err(message) = config.validate() {
        tracing::error!("invalid configuration: {message}");
        return ExitCode::from(2);
    }
    let storage = match open_storage(&config).await {
        Ok(s) => s,
        Err(message) => {
            tracing::error!("cannot start: {message}");
            return ExitCode::from(1);
        }
    };
    let metrics = match Metrics::new() {
        Ok(m) => m,
        Err(e) => {
            tracing::error!("cannot register metrics: {e}");
            return ExitCode::from(1);
        }
    };
    metrics.initialize(storage.name());
    let sweeper = tokio::spawn(sweep_loop(
        storage.clone(),
        metrics.clone(),
        config.sweep_interval,
    ));
    let auth = if config.token.is_none() && config.credentials.is_none() {
        tracing::warn!("serving /v1 WITHOUT authentication (--allow-unauthenticated)");
        None
    } else {
        match Authenticator::new(config.credentials.clone(), config.token.clone()) {
            Ok(auth) => Some(Arc::new(auth)),
            Err(e) => {
                tracing::error!("invalid configuration: --credentials: {e}");
                return ExitCode::from(2);
            }
        }
    };
    if config.token.is_some() {
        tracing::warn!(
            "--token grants every role (proxy, service, admin); use --credentials with roles in production"
        );
    }
    if let Some(auth) = &auth {
        tokio::spawn(idempotency_store::auth::watch(auth.clone(), CREDENTIALS_POLL));
    }
    // Replay tickets must verify on every replica: derive their key from what replicas share.
    let replay_secret = match (&config.replay_secret, &config.token, &config.credentials) {
        (Some(secret), _, _) => secret.clone().into_bytes(),
        (None, Some(token), _) => token.clone().into_bytes(),
        (None, None, Some(path)) => std::fs::read(path).unwrap_or_default(),
        (None, None, None) => {
            tracing::warn!("no --replay-secret: replay tickets use a per-process key (set --replay-secret when running several replicas)");
            uuid::Uuid::new_v4().as_bytes().to_vec()
        }
    };
    let state = AppState {
        tickets: Arc::new(ReplayTickets::new(&replay_secret)),
        waiters: Arc::new(Waiters::new(config.max_waiters, config.wait_poll)),
        auth,
        ..AppState::new(storage.clone(), metrics, None)
    };
    let listener = match tokio::net::TcpListener::bind(config.listen).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("cannot listen on {}: {e}", config.listen);
            return ExitCode::from(1);
        }
    };
    // Answers leave at once: without TCP_NODELAY a reply written in pieces (HTTP/2 frames) can
    // wait for the peer's delayed ACK, ~40 ms on Linux, which showed as a 40-50 ms p99.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("cannot set TCP_NODELAY: {e}");
        }
    });
    tracing::info!(listen = %config.listen, backend = storage.name(), "idempotency store ready");
    let server = axum::serve(listener, app(state)).with_graceful_shutdown(shutdown_signal());
    if let Err(e) = server.await {
        tracing::error!("server failed: {e}");
        return ExitCode::from(1);
    }
    sweeper.abort();
    tracing::info!("stopped");
    ExitCode::SUCCESS
}
