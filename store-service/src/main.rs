//! Entry point: parse configuration, open storage, serve until SIGTERM/Ctrl-C.

/// mimalloc instead of the system allocator: the store allocates on every request (JSON
/// bodies, records), and glibc's malloc showed up at the top of its profile.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use idempotency_store::api::{app, replay_app, AppState};
use idempotency_store::auth::Authenticator;
use idempotency_store::config::{Backend, LogFormat, StoreConfig};
use idempotency_store::identity::TrustedProxies;
use idempotency_store::metrics::Metrics;
use idempotency_store::replay::{parse_secrets, ReplayTickets};
use idempotency_store::shutdown::shutdown_signal;
use idempotency_store::storage::embedded::EmbeddedStorage;
use idempotency_store::storage::mongo::MongoStorage;
use idempotency_store::storage::Storage;
use idempotency_store::sweep_loop;
use idempotency_store::wait::Waiters;
use tracing_subscriber::EnvFilter;

/// `mi_option_purge_delay` in mimalloc v3's `mimalloc.h` (libmimalloc-sys names no constant
/// for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
/// mimalloc v3's default for it, in ms: how the option is recognised before it is changed.
const MIMALLOC_DEFAULT_PURGE_DELAY_MS: std::os::raw::c_long = 1000;

/// Return freed memory to the OS at once instead of a second later (mimalloc v3's default).
///
/// The embedded engine's compactions allocate and free hundreds of MB in bursts; held for a
/// second, that showed as RSS. Measured with `idempotency-bench --store-only --store-records
/// 3000000 --store-arg=--cache-mb=32` (full-speed writes at 64 connections): RSS right after
/// writing 388 → 96 MB, 5 s idle 144 → 100 MB, peak while writing 548 → 314 MB, for ~5 µs
/// (4%) more of the store's CPU per durable operation. A 10 ms delay costs nothing measurable
/// and gives the same idle figure, but left the peak at 519 MB: the lower peak is worth 4%.
/// `MIMALLOC_PURGE_DELAY` (or its older name `MIMALLOC_RESET_DELAY`) in the environment still
/// decides when set. Called before any other thread starts: the option is a plain variable.
/// Returns what to warn about once logging is set up.
fn return_freed_memory_promptly() -> Option<String> {
    if ["MIMALLOC_PURGE_DELAY", "MIMALLOC_RESET_DELAY"]
        .iter()
        .any(|name| std::env::var_os(name).is_some())
    {
        return None;
    }
    #[allow(unsafe_code)]
    // SAFETY: reads and sets one of the allocator's options (a plain integer it reads at each
    // purge) while this is the process's only thread; no memory is touched.
    let now = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
    if now != MIMALLOC_DEFAULT_PURGE_DELAY_MS {
        return Some(format!(
            "mimalloc's option {MI_OPTION_PURGE_DELAY} is {now}, not the purge delay's default \
             {MIMALLOC_DEFAULT_PURGE_DELAY_MS}: this build's allocator differs; left as it is"
        ));
    }
    #[allow(unsafe_code)]
    // SAFETY: as above.
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0);
    }
    None
}

/// How often the credentials and replay secret files are checked for changes (SIGHUP reloads
/// at once).
const CREDENTIALS_POLL: std::time::Duration = std::time::Duration::from_secs(2);

/// The replay ticket keys: from --replay-secret-file (watched), --replay-secret, the --token
/// shortcut (local runs), or else a per-process key (a single replica only).
fn replay_tickets(config: &StoreConfig) -> Result<Arc<ReplayTickets>, String> {
    if let Some(path) = &config.replay_secret_file {
        let load = {
            let path = path.clone();
            move || {
                std::fs::read_to_string(&path)
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))
                    .and_then(|text| parse_secrets(&text).map_err(|e| e.to_string()))
            }
        };
        let tickets = Arc::new(ReplayTickets::with_secrets(
            &load().map_err(|e| format!("--replay-secret-file: {e}"))?,
        ));
        let watched = tickets.clone();
        tokio::spawn(idempotency_store::reload::watch_file(
            path.clone(),
            CREDENTIALS_POLL,
            "replay secrets",
            move || {
                let secrets = load()?;
                watched.replace(&secrets);
                Ok(format!("{} secrets", secrets.len()))
            },
        ));
        return Ok(tickets);
    }
    let secret = match (&config.replay_secret, &config.token) {
        (Some(secret), _) => secret.clone().into_bytes(),
        (None, Some(token)) => token.clone().into_bytes(),
        (None, None) => {
            tracing::warn!("no --replay-secret or --replay-secret-file: replay tickets use a per-process key, so with several replicas a gRPC replay granted by one is refused by another (the client's retry is answered UNAVAILABLE)");
            uuid::Uuid::new_v4().as_bytes().to_vec()
        }
    };
    Ok(Arc::new(ReplayTickets::new(&secret)))
}

/// Bind `address` and serve `router` on it (over mTLS with `tls`) until shutdown; `None`
/// (logged) when it cannot bind. Handlers see the peer address (`ConnectInfo`), which decides
/// whether an `x-forwarded-client-cert` header is believed.
async fn serve(
    address: std::net::SocketAddr,
    router: axum::Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> Option<std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<()>> + Send>>> {
    let listener = match tokio::net::TcpListener::bind(address).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("cannot listen on {address}: {e}");
            return None;
        }
    };
    if let Some(acceptor) = tls {
        return Some(Box::pin(idempotency_store::tls::serve(
            listener,
            acceptor,
            router,
            shutdown_signal(),
        )));
    }
    // Answers leave at once: without TCP_NODELAY a reply written in pieces (HTTP/2 frames) can
    // wait for the peer's delayed ACK, ~40 ms on Linux, which showed as a 40-50 ms p99.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("cannot set TCP_NODELAY: {e}");
        }
    });
    let server = axum::serve(
        listener,
        router.into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown_signal());
    Some(Box::pin(async move {
        let result = server.await;
        if let Err(e) = &result {
            tracing::error!("server on {address} failed: {e}");
        }
        result
    }))
}

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

fn main() -> ExitCode {
    // Before the runtime starts its threads.
    let allocator_warning = return_freed_memory_promptly();
    match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime.block_on(run_store(allocator_warning)),
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run_store(allocator_warning: Option<String>) -> ExitCode {
    let config = StoreConfig::parse();
    init_logging(config.log_format);
    if let Some(warning) = allocator_warning {
        tracing::warn!("{warning}");
    }
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
    let tickets = match replay_tickets(&config) {
        Ok(tickets) => tickets,
        Err(message) => {
            tracing::error!("invalid configuration: {message}");
            return ExitCode::from(2);
        }
    };
    let forwarded_identity = if config.trust_forwarded_client_cert {
        match TrustedProxies::parse(&config.trusted_proxies) {
            Ok(trusted) => Some(Arc::new(trusted)),
            Err(e) => {
                tracing::error!("invalid configuration: {e}");
                return ExitCode::from(2);
            }
        }
    } else {
        None
    };
    let tls = match (&config.tls_cert, &config.tls_key, &config.client_ca) {
        (Some(cert), Some(key), Some(ca)) => match idempotency_store::tls::acceptor(cert, key, ca) {
            Ok(acceptor) => Some(acceptor),
            Err(e) => {
                tracing::error!("invalid configuration: {e}");
                return ExitCode::from(2);
            }
        },
        _ => None,
    };
    let state = AppState {
        tickets,
        waiters: Arc::new(Waiters::new(config.max_waiters, config.wait_poll)),
        max_request_bytes: config.max_request_bytes,
        forwarded_identity,
        auth,
        replay_listen: config.replay_listen.map(|a| a.to_string()),
        ..AppState::new(storage.clone(), metrics, None)
    };
    let (api, replays) = match config.replay_listen {
        Some(_) => (app(state.clone()), Some(replay_app(state))),
        None => {
            tracing::warn!("no --replay-listen: /v1/replay is served on --listen beside the API; give replays a listener of their own so a misrouted request can reach nothing but a ticket check");
            (app(state.clone()).merge(replay_app(state)), None)
        }
    };
    let Some(api) = serve(config.listen, api, tls.clone()).await else {
        return ExitCode::from(1);
    };
    let replays = match (config.replay_listen, replays) {
        (Some(address), Some(router)) => match serve(address, router, tls).await {
            Some(server) => Some(server),
            None => return ExitCode::from(1),
        },
        _ => None,
    };
    tracing::info!(listen = %config.listen, replay_listen = ?config.replay_listen, backend = storage.name(), "idempotency store ready");
    let failed = match replays {
        Some(replays) => {
            let (api, replays) = tokio::join!(api, replays);
            api.is_err() || replays.is_err()
        }
        None => api.await.is_err(),
    };
    if failed {
        return ExitCode::from(1);
    }
    sweeper.abort();
    tracing::info!("stopped");
    ExitCode::SUCCESS
}
