//! HTTP API: `/v1/*` operations (bearer tokens with roles, `auth.rs`), `/healthz`, `/readyz`,
//! `/metrics`; and the replay listener's router, which serves `/v1/replay` alone.
//!
//! This file holds the state, both routers and the authentication middleware; `op.rs` is the
//! skeleton every record operation runs through (checks, timing, observation, wake-ups); the
//! handlers live by caller:
//! `proxy.rs` (the filter and phase checkpoints), `consumers.rs` (event consumers), `admin.rs`,
//! `replays.rs` (the replay listener), `operations.rs` (health, metrics), `batch.rs`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{ConnectInfo, DefaultBodyLimit, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use idempotency_wire::{
    paths, AbandonRequest, AbandonResponse, AcquireRequest, AcquireResponse, CheckpointRequest, ClaimRequest,
    ClaimResponse, CompleteRequest, MessageDoneRequest, OutcomeUnknownRequest, RecordId, ReleaseRequest,
};
use serde_json::json;

use crate::auth::{Authenticator, Permission, Principal};
use crate::error::ApiError;
use crate::identity::{xfcc_identities, PeerIdentity, TrustedProxies, XFCC};
use crate::messages;
use crate::metrics::Metrics;
use crate::record::Record;
use crate::replay::ReplayTickets;
use crate::storage::{Storage, StorageError};
use crate::wait::Waiters;

mod admin;
mod batch;
mod consumers;
mod op;
mod operations;
mod proxy;
mod replays;

use op::{timed, Op};

pub use admin::MAX_PAGE;
use admin::{get_record, info, list_in_progress, purge_record};
use consumers::{claim_message, complete_message, release_message};
use operations::{healthz, metrics, readyz};
use proxy::{abandon, acquire, checkpoint, complete, outcome_unknown, release};
use replays::replay;

/// Largest request body accepted by default (a 1 MiB response is ~1.4 MiB as base64 JSON);
/// the filter refuses a `max_response_size` whose record would not fit.
pub const MAX_BODY_BYTES: usize = idempotency_wire::MAX_STORE_REQUEST_BYTES;
/// Longest key, scope or service name accepted.
pub const MAX_IDENTITY_PART: usize = 1024;
/// Longest `in_progress_wait` the store honours, whatever the proxy asks.
pub const MAX_WAIT: Duration = Duration::from_secs(60);
/// A wait ends this long before the proxy's deadline, so its answer arrives in time.
pub const WAIT_DEADLINE_MARGIN_MS: u64 = 200;
/// Default bound on concurrently waiting acquires (`--max-waiters`).
pub const DEFAULT_MAX_WAITERS: usize = 4096;
/// Default poll interval of a waiting acquire (`--wait-poll`): changes made by other replicas
/// are seen at least this often; this replica's own changes wake waiters at once.
pub const DEFAULT_WAIT_POLL: Duration = Duration::from_millis(100);

/// Shared state of every handler (the routers hold it in one `Arc`: axum clones the state for
/// every extractor of every request).
#[derive(Clone)]
pub struct AppState {
    /// The storage backend.
    pub storage: Arc<dyn Storage>,
    /// Metrics registry.
    pub metrics: Arc<Metrics>,
    /// Credentials required on `/v1`; `None` serves without authentication.
    pub auth: Option<Arc<Authenticator>>,
    /// Acquires waiting for in-progress records.
    pub waiters: Arc<Waiters>,
    /// Replay tickets for gRPC replays (`/v1/replay`).
    pub tickets: Arc<ReplayTickets>,
    /// Largest request body accepted (`--max-request-bytes`); larger ones get 413.
    pub max_request_bytes: usize,
    /// With `--trust-forwarded-client-cert`: the peers whose `x-forwarded-client-cert` names
    /// the caller; `None`: the header is never read.
    pub forwarded_identity: Option<Arc<TrustedProxies>>,
    /// The replay listener's address (`--replay-listen`), reported by `/v1/info`.
    pub replay_listen: Option<String>,
}

impl AppState {
    /// State with the default waiter bound and poll interval.
    pub fn new(storage: Arc<dyn Storage>, metrics: Metrics, token: Option<Arc<str>>) -> AppState {
        AppState {
            storage,
            metrics: Arc::new(metrics),
            // Without a token, a key of this process alone (an empty one would make tickets
            // forgeable by anyone who knows the derivation).
            tickets: Arc::new(ReplayTickets::new(&token.as_deref().map_or_else(
                || uuid::Uuid::new_v4().as_bytes().to_vec(),
                |t| t.as_bytes().to_vec(),
            ))),
            auth: token.as_deref().map(|t| {
                Arc::new(
                    Authenticator::new(None, Some(t.to_owned())).unwrap_or_else(|_| empty_authenticator()),
                )
            }),
            waiters: Arc::new(Waiters::new(DEFAULT_MAX_WAITERS, DEFAULT_WAIT_POLL)),
            max_request_bytes: MAX_BODY_BYTES,
            forwarded_identity: None,
            replay_listen: None,
        }
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The API's router (every route but `/v1/replay`); tests drive it with `oneshot`. Every answer
/// carries `x-idempotency-store: api`, so a client answered by it (a misrouted request) and a
/// filter whose replay came from here both can tell.
pub fn app(state: AppState) -> Router {
    // One allocation shared by every request: axum clones the state for each extractor.
    let state = Arc::new(state);
    let v1 = Router::new()
        .route(paths::ACQUIRE, post(acquire))
        .route(paths::COMPLETE, post(complete))
        .route(paths::RELEASE, post(release))
        .route(paths::OUTCOME_UNKNOWN, post(outcome_unknown))
        .route(paths::ABANDON, post(abandon))
        .route(paths::CHECKPOINT, post(checkpoint))
        .route(paths::RECORDS, get(get_record).delete(purge_record))
        .route(paths::RECORDS_IN_PROGRESS, get(list_in_progress))
        .route(paths::MESSAGE_CLAIM, post(claim_message))
        .route(paths::MESSAGE_COMPLETE, post(complete_message))
        .route(paths::MESSAGE_RELEASE, post(release_message))
        .route(paths::BATCH, post(batch::batch))
        .route(paths::INFO, get(info))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .merge(v1)
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(state.max_request_bytes))
        .layer(middleware::map_response(|r| mark(r, ANSWERED_BY_API)))
        .with_state(state)
}

/// The replay listener's router (`--replay-listen`): `/v1/replay`, authenticated by its ticket,
/// and nothing else; every answer carries `x-idempotency-store: replay`.
pub fn replay_app(state: AppState) -> Router {
    let state = Arc::new(state);
    Router::new()
        .route(paths::REPLAY, post(replay))
        .layer(DefaultBodyLimit::max(REPLAY_BODY_LIMIT))
        .layer(middleware::map_response(|r| mark(r, ANSWERED_BY_REPLAY)))
        .with_state(state)
}

/// `x-idempotency-store` value on the API's answers.
pub const ANSWERED_BY_API: &str = "api";
/// `x-idempotency-store` value on the replay listener's answers.
pub const ANSWERED_BY_REPLAY: &str = "replay";
/// A replay's request body is the client's gRPC message, which the store ignores.
const REPLAY_BODY_LIMIT: usize = 4 * 1024 * 1024;

async fn mark(mut response: Response, listener: &'static str) -> Response {
    response.headers_mut().insert(
        idempotency_wire::headers::ANSWERED_BY,
        header::HeaderValue::from_static(listener),
    );
    response
}

fn empty_authenticator() -> Authenticator {
    // Without a file nothing can fail to load; this is the (unreachable) fallback of `new`.
    Authenticator::new(None, None).unwrap_or_else(|_| empty_authenticator())
}

/// What a `/v1` call needs, by method and path.
fn permission_for(method: &axum::http::Method, path: &str) -> Permission {
    match path {
        p if p == paths::CHECKPOINT => Permission::Checkpoint,
        p if p.starts_with("/v1/messages/") => Permission::Messages,
        p if p.starts_with(paths::RECORDS) && method == axum::http::Method::DELETE => Permission::AdminPurge,
        p if p.starts_with(paths::RECORDS) || p == paths::INFO => Permission::AdminRead,
        _ => Permission::ProxyCalls,
    }
}

/// The mesh identities of a request's caller: its connection's client certificate (mTLS
/// terminated by the store), else the `x-forwarded-client-cert` header when the connection comes
/// from a trusted proxy (`--trust-forwarded-client-cert`). A client's own XFCC header, sent
/// from anywhere else, is ignored.
fn caller_identities(state: &AppState, request: &Request) -> Vec<String> {
    // An mTLS connection the store terminated names its caller by its certificate, only.
    if let Some(PeerIdentity(identities)) = request.extensions().get::<PeerIdentity>() {
        return identities.to_vec();
    }
    let Some(trusted) = &state.forwarded_identity else {
        return Vec::new();
    };
    let mut values = request.headers().get_all(XFCC).iter();
    // Several header lines: not what one sidecar sets; believe none of them.
    let (Some(header), None) = (values.next().and_then(|v| v.to_str().ok()), values.next()) else {
        return Vec::new();
    };
    match request.extensions().get::<ConnectInfo<SocketAddr>>() {
        Some(ConnectInfo(peer)) if trusted.trusts(peer) => xfcc_identities(header),
        peer => {
            tracing::debug!(peer = ?peer.map(|p| p.0), "x-forwarded-client-cert from an untrusted peer ignored");
            Vec::new()
        }
    }
}

/// Authenticate the caller — bearer token, else mesh identity — and check the role the path
/// needs; the caller travels on as a request extension for service-bound checks and audit lines.
async fn require_token(State(state): State<Arc<AppState>>, mut request: Request, next: Next) -> Response {
    let principal = match &state.auth {
        None => Arc::new(Principal::all_roles("unauthenticated")),
        Some(auth) => {
            let presented = request
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "));
            let found = match presented {
                Some(token) => auth.authenticate(token),
                None => auth.authenticate_identity(&caller_identities(&state, &request)),
            };
            match found {
                Some(principal) => principal,
                None => {
                    state
                        .metrics
                        .requests
                        .with_label_values(&["auth", "unauthorized"])
                        .inc();
                    return ApiError::Unauthorized.into_response();
                }
            }
        }
    };
    let permission = permission_for(request.method(), request.uri().path());
    if !principal.may(permission) {
        state
            .metrics
            .requests
            .with_label_values(&["auth", "forbidden"])
            .inc();
        return ApiError::Forbidden {
            credential: principal.name.clone(),
            permission: permission.name(),
            service: None,
        }
        .into_response();
    }
    request.extensions_mut().insert(principal);
    next.run(request).await
}
