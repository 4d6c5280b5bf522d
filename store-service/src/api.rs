//! HTTP API: `/v1/*` operations (bearer tokens with roles, `auth.rs`), `/healthz`, `/readyz`,
//! `/metrics`; and the replay listener's router, which serves `/v1/replay` alone.

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

mod batch;

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

/// Shared state of every handler.
#[derive(Clone)]
pub struct AppState {
    /// The storage backend.
    pub storage: Arc<dyn Storage>,
    /// Metrics registry (shared: the state is cloned for every request).
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
async fn require_token(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
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

/// A `service` credential may act only for its own services.
fn check_service(principal: &Principal, service: &str, permission: Permission) -> Result<(), ApiError> {
    if principal.may_act_for(permission, service) {
        Ok(())
    } else {
        Err(ApiError::Forbidden {
            credential: principal.name.clone(),
            permission: permission.name(),
            service: Some(service.to_owned()),
        })
    }
}

/// A proxy call names a record of a service its credential is bound to, and never a
/// consumer's `message:` record: only the messages API claims those, for its own service (else a
/// proxy credential could complete another service's message and make its consumer skip it).
fn check_proxy_call(principal: &Principal, id: &RecordId) -> Result<(), ApiError> {
    check_service(principal, &id.service, Permission::ProxyCalls)?;
    if id.scope.starts_with(messages::SCOPE_PREFIX) {
        return Err(ApiError::MessageScope {
            credential: principal.name.clone(),
            service: id.service.clone(),
        });
    }
    Ok(())
}

/// One structured line per admin action: who (credential name, never the token), what, which.
fn audit(principal: &Principal, action: &str, id: &RecordId, found: bool) {
    use sha2::Digest as _;
    let key_hash = hex::encode(
        sha2::Sha256::digest(id.key.as_bytes())
            .get(..6)
            .unwrap_or_default(),
    );
    tracing::info!(
        audit = true,
        credential = %principal.name,
        action,
        service = %id.service,
        scope = %id.scope,
        key_hash,
        found,
        "admin action"
    );
}

fn check_identity(id: &RecordId) -> Result<(), ApiError> {
    if id.service.is_empty() || id.key.is_empty() {
        return Err(ApiError::BadRequest("service and key must not be empty".into()));
    }
    if [&id.service, &id.scope, &id.key]
        .iter()
        .any(|p| p.len() > MAX_IDENTITY_PART)
    {
        return Err(ApiError::BadRequest(format!(
            "service, scope and key must be at most {MAX_IDENTITY_PART} bytes"
        )));
    }
    Ok(())
}

/// Count the outcome of one operation and time it.
fn observe<T>(
    state: &AppState,
    operation: &str,
    service: &str,
    started: Instant,
    result: &Result<T, StorageError>,
) {
    let outcome = match result {
        Ok(_) => "ok",
        Err(StorageError::NotFound(_)) => "not_found",
        Err(StorageError::StaleToken { .. }) => "stale_token",
        Err(StorageError::DeadlinePassed { .. }) => "deadline_passed",
        Err(StorageError::Unavailable(_)) | Err(StorageError::Corrupt(_)) => "error",
    };
    let m = &state.metrics;
    m.requests.with_label_values(&[operation, outcome]).inc();
    m.operation_seconds
        .with_label_values(&[operation, state.storage.name()])
        .observe(started.elapsed().as_secs_f64());
    match result {
        Err(StorageError::Unavailable(e)) | Err(StorageError::Corrupt(e)) => {
            m.storage_errors.with_label_values(&[service, operation]).inc();
            tracing::warn!(operation, service, error = %e, "storage operation failed");
        }
        Err(StorageError::StaleToken { presented, current }) => {
            m.stale_tokens.with_label_values(&[operation]).inc();
            tracing::info!(
                operation,
                service,
                presented,
                current,
                "refused write with stale fencing token"
            );
        }
        _ => {}
    }
}

pub(crate) async fn acquire(
    State(state): State<AppState>,
    Extension(principal): Extension<Arc<Principal>>,
    Json(mut request): Json<AcquireRequest>,
) -> Result<Json<AcquireResponse>, ApiError> {
    check_identity(&request.id)?;
    check_proxy_call(&principal, &request.id)?;
    if request.attempt_id.is_empty() {
        // Every lock gets a secret holder proof, even for callers that send no attempt id.
        request.attempt_id = uuid::Uuid::new_v4().simple().to_string();
    }
    if request.lock_timeout_ms == 0 || request.fingerprint.is_empty() {
        return Err(ApiError::BadRequest(
            "lock_timeout_ms must be positive and fingerprint non-empty".into(),
        ));
    }
    let started = Instant::now();
    let result = acquire_or_wait(&state, &request).await;
    observe(&state, "acquire", &request.id.service, started, &result);
    let service = request.id.service.as_str();
    let m = &state.metrics;
    m.lock_acquisition_seconds
        .with_label_values(&[service])
        .observe(started.elapsed().as_secs_f64());
    let mut response = result?;
    if request.replay_ticket {
        if let AcquireResponse::Completed {
            replay_ticket,
            record_id,
            ..
        } = &mut response
        {
            *replay_ticket = Some(state.tickets.issue(
                &request.id,
                record_id.as_deref().unwrap_or_default(),
                &request.fingerprint,
                now_ms(),
            ));
        }
    }
    match &response {
        AcquireResponse::Acquired(_) => m.misses.with_label_values(&[service]).inc(),
        AcquireResponse::Completed { .. } => m.hits.with_label_values(&[service]).inc(),
        AcquireResponse::InProgress { .. } => m.collisions.with_label_values(&[service]).inc(),
        AcquireResponse::Mismatch => m.mismatches.with_label_values(&[service]).inc(),
    }
    Ok(Json(response))
}

/// How long this acquire may wait: what it asked, capped, and ending before its deadline.
fn wait_budget(request: &AcquireRequest, now: u64) -> Duration {
    let asked = Duration::from_millis(request.wait_ms).min(MAX_WAIT);
    match request.deadline_ms {
        Some(deadline) => asked.min(Duration::from_millis(
            deadline
                .saturating_sub(now)
                .saturating_sub(WAIT_DEADLINE_MARGIN_MS),
        )),
        None => asked,
    }
}

/// Acquire; while the record is in progress and the request asked to wait, look again whenever
/// it may have changed (see `wait.rs`) until it completes, is released, or the wait runs out.
async fn acquire_or_wait(
    state: &AppState,
    request: &AcquireRequest,
) -> Result<AcquireResponse, StorageError> {
    let first = state.storage.acquire(request, now_ms()).await;
    let budget = wait_budget(request, now_ms());
    let service = request.id.service.as_str();
    if budget.is_zero() || !matches!(first, Ok(AcquireResponse::InProgress { .. })) {
        return first;
    }
    let Some(slot) = state.waiters.enter(&request.id) else {
        state
            .metrics
            .acquire_waits
            .with_label_values(&[service, "full"])
            .inc();
        return first;
    };
    let wait_end = Instant::now() + budget;
    let mut answer = first;
    while let Ok(AcquireResponse::InProgress {
        lock_remaining_ms,
        outcome_unknown,
    }) = &answer
    {
        let wait_left = wait_end.saturating_duration_since(Instant::now());
        // A lock kept because its outcome is unknown changes only when it expires: waiting for
        // anything sooner only delays the answer.
        let unchanging = *outcome_unknown && Duration::from_millis(*lock_remaining_ms) > wait_left;
        if wait_left.is_zero() || unchanging {
            break;
        }
        let notified = slot.notify().notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        // A change between the last look and `enable` would be missed by the notification, but
        // not by this look, which happens after it.
        let nap = slot.next_look(Duration::from_millis(*lock_remaining_ms), wait_left);
        let _ = tokio::time::timeout(nap, notified).await;
        answer = state.storage.acquire(request, now_ms()).await;
    }
    let outcome = match &answer {
        Ok(AcquireResponse::Completed { .. }) => "completed",
        Ok(AcquireResponse::Acquired(_)) => "acquired",
        Ok(AcquireResponse::InProgress {
            outcome_unknown: true,
            ..
        }) => "outcome_unknown",
        Ok(AcquireResponse::InProgress { .. }) => "timed_out",
        Ok(AcquireResponse::Mismatch) => "mismatch",
        Err(_) => "error",
    };
    state
        .metrics
        .acquire_waits
        .with_label_values(&[service, outcome])
        .inc();
    drop(slot);
    answer
}

/// Serve a completed record's stored response to the holder of a replay ticket (gRPC replays).
async fn replay(State(state): State<AppState>, headers: axum::http::HeaderMap) -> Response {
    let ticket = headers
        .get(idempotency_wire::headers::REPLAY_TICKET)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let count = |outcome: &str| {
        state.metrics.replays_served.with_label_values(&[outcome]).inc();
    };
    let claims = match state.tickets.verify(ticket, now_ms()) {
        Ok(claims) => claims,
        Err(e) => {
            count("refused");
            tracing::warn!(error = %e, "replay refused");
            return crate::replay::grpc_unavailable(&format!("{e}; retry with the same key"));
        }
    };
    match state.storage.get(&claims.id(), now_ms()).await {
        // Purged and created again since the ticket was issued: not the response it was for.
        Ok(Some(record))
            if record.record_id != claims.record_id || record.fingerprint != claims.fingerprint =>
        {
            count("changed");
            crate::replay::grpc_unavailable(
                "the record changed since the replay was granted; retry with the same key",
            )
        }
        Ok(Some(record)) => match record.response {
            Some(stored) if record.state == crate::record::RecordState::Completed => {
                count("served");
                crate::replay::stored_response(stored)
            }
            _ => {
                count("not_completed");
                crate::replay::grpc_unavailable("the record is not completed; retry with the same key")
            }
        },
        Ok(None) => {
            count("gone");
            crate::replay::grpc_unavailable("the record expired; retry with the same key")
        }
        Err(e) => {
            count("error");
            tracing::warn!(error = %e, "replay failed");
            crate::replay::grpc_unavailable("idempotency storage unavailable; retry with the same key")
        }
    }
}

pub(crate) async fn outcome_unknown(
    State(state): State<AppState>,
    Extension(principal): Extension<Arc<Principal>>,
    Json(request): Json<OutcomeUnknownRequest>,
) -> Result<Json<serde_json::Value>, ApiError> {
    check_identity(&request.id)?;
    check_proxy_call(&principal, &request.id)?;
    if request.reason.is_empty() || request.reason.len() > 128 {
        return Err(ApiError::BadRequest("reason must be 1 to 128 bytes".into()));
    }
    let started = Instant::now();
    let result = state.storage.outcome_unknown(&request, now_ms()).await;
    observe(&state, "outcome_unknown", &request.id.service, started, &result);
    result?;
    state
        .metrics
        .outcome_unknown
        .with_label_values(&[request.id.service.as_str(), reason_label(&request.reason)])
        .inc();
    tracing::warn!(
        service = %request.id.service,
        record_id = %request.record_id,
        fencing_token = request.fencing_token,
        reason = %request.reason,
        "outcome unknown: the lock is kept until it expires"
    );
    Ok(Json(json!({"ok": true})))
}

/// The reasons a filter reports (its `UnknownReason`): any other becomes `other` in the metric's
/// label, so a caller cannot grow the store's series without bound (the record keeps the text).
const KNOWN_UNKNOWN_REASONS: [&str; 11] = [
    "downstream_disconnect",
    "upstream_timeout",
    "upstream_reset",
    "local_reply",
    "response_incomplete",
    "proxy_failure",
    "response_too_large_to_replay",
    "record_refused_by_store",
    "upstream_status",
    "upstream_grpc_status",
    "several_attempts",
];

fn reason_label(reason: &str) -> &str {
    if KNOWN_UNKNOWN_REASONS.contains(&reason) {
        reason
    } else {
        "other"
    }
}

pub(crate) async fn abandon(
    State(state): State<AppState>,
    Extension(principal): Extension<Arc<Principal>>,
    Json(request): Json<AbandonRequest>,
) -> Result<Json<AbandonResponse>, ApiError> {
    check_identity(&request.id)?;
    check_proxy_call(&principal, &request.id)?;
    let started = Instant::now();
    let result = state.storage.abandon(&request, now_ms()).await;
    observe(&state, "abandon", &request.id.service, started, &result);
    let released = result?;
    state
        .metrics
        .abandoned
        .with_label_values(&[
            request.id.service.as_str(),
            if released { "true" } else { "false" },
        ])
        .inc();
    if released {
        state.waiters.wake(&request.id);
    }
    Ok(Json(AbandonResponse { released }))
}

pub(crate) async fn complete(
    State(state): State<AppState>,
    Extension(principal): Extension<Arc<Principal>>,
    Json(request): Json<CompleteRequest>,
) -> Result<Json<serde_json::Value>, ApiError> {
    check_identity(&request.id)?;
    check_proxy_call(&principal, &request.id)?;
    let started = Instant::now();
    let result = state.storage.complete(&request, now_ms()).await;
    observe(&state, "complete", &request.id.service, started, &result);
    result?;
    state.waiters.wake(&request.id);
    Ok(Json(json!({"ok": true})))
}

pub(crate) async fn release(
    State(state): State<AppState>,
    Extension(principal): Extension<Arc<Principal>>,
    Json(request): Json<ReleaseRequest>,
) -> Result<Json<serde_json::Value>, ApiError> {
    check_identity(&request.id)?;
    check_proxy_call(&principal, &request.id)?;
    let started = Instant::now();
    let result = state.storage.release(&request, now_ms()).await;
    observe(&state, "release", &request.id.service, started, &result);
    result?;
    state.waiters.wake(&request.id);
    Ok(Json(json!({"ok": true})))
}

async fn checkpoint(
    State(state): State<AppState>,
    Extension(principal): Extension<Arc<Principal>>,
    Json(request): Json<CheckpointRequest>,
) -> Result<Json<serde_json::Value>, ApiError> {
    check_identity(&request.id)?;
    check_service(&principal, &request.id.service, Permission::Checkpoint)?;
    if request.phase.is_empty() || request.phase.len() > 256 {
        return Err(ApiError::BadRequest("phase must be 1 to 256 bytes".into()));
    }
    let started = Instant::now();
    let result = state.storage.checkpoint(&request, now_ms()).await;
    observe(&state, "checkpoint", &request.id.service, started, &result);
    result?;
    Ok(Json(json!({"ok": true})))
}

async fn get_record(
    State(state): State<AppState>,
    Extension(principal): Extension<Arc<Principal>>,
    Query(id): Query<RecordId>,
) -> Result<Json<Record>, ApiError> {
    check_identity(&id)?;
    let started = Instant::now();
    let result = state.storage.get(&id, now_ms()).await;
    observe(&state, "get", &id.service, started, &result);
    audit(&principal, "get", &id, matches!(result, Ok(Some(_))));
    result?
        .map(Json)
        .ok_or(ApiError::Storage(StorageError::NotFound(id)))
}

/// Query of `GET /v1/records/in-progress`.
#[derive(Debug, serde::Deserialize)]
struct ListQuery {
    service: String,
    /// Only records created at least this long ago (stuck locks).
    #[serde(default)]
    older_than_ms: u64,
    #[serde(default = "default_page")]
    limit: usize,
    cursor: Option<String>,
}

fn default_page() -> usize {
    100
}

/// Largest page of the listing.
pub const MAX_PAGE: usize = 1_000;

async fn list_in_progress(
    State(state): State<AppState>,
    Extension(principal): Extension<Arc<Principal>>,
    Query(query): Query<ListQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if query.service.is_empty() || query.limit == 0 || query.limit > MAX_PAGE {
        return Err(ApiError::BadRequest(format!(
            "service must be set and limit between 1 and {MAX_PAGE}"
        )));
    }
    let now = now_ms();
    let started = Instant::now();
    let result = state
        .storage
        .list_in_progress(
            &query.service,
            now.saturating_sub(query.older_than_ms),
            query.limit,
            query.cursor.as_deref(),
            now,
        )
        .await;
    observe(&state, "list", &query.service, started, &result);
    let (records, next) = result?;
    tracing::info!(
        audit = true,
        credential = %principal.name,
        action = "list_in_progress",
        service = %query.service,
        found = records.len(),
        "admin action"
    );
    Ok(Json(json!({"records": records, "next": next, "now_ms": now})))
}

async fn purge_record(
    State(state): State<AppState>,
    Extension(principal): Extension<Arc<Principal>>,
    Query(id): Query<RecordId>,
) -> Result<StatusCode, ApiError> {
    check_identity(&id)?;
    let started = Instant::now();
    let result = state.storage.purge(&id).await;
    observe(&state, "purge", &id.service, started, &result);
    audit(&principal, "purge", &id, matches!(result, Ok(true)));
    if result? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::Storage(StorageError::NotFound(id)))
    }
}

async fn claim_message(
    State(state): State<AppState>,
    Extension(principal): Extension<Arc<Principal>>,
    Json(claim): Json<ClaimRequest>,
) -> Result<Json<ClaimResponse>, ApiError> {
    let acquire = messages::acquire_request(&claim);
    check_identity(&acquire.id)?;
    check_service(&principal, &claim.id.service, Permission::Messages)?;
    if claim.id.topic.is_empty() || claim.id.consumer_group.is_empty() || claim.lock_timeout_ms == 0 {
        return Err(ApiError::BadRequest(
            "topic, consumer_group and lock_timeout_ms must be set".into(),
        ));
    }
    let started = Instant::now();
    let result = state.storage.acquire(&acquire, now_ms()).await;
    observe(&state, "claim", &claim.id.service, started, &result);
    let response = messages::claim_response(result?)?;
    let (topic, group) = (claim.id.topic.as_str(), claim.id.consumer_group.as_str());
    let outcome = match &response {
        ClaimResponse::Claimed { .. } => "claimed",
        ClaimResponse::Duplicate => {
            state
                .metrics
                .message_dedup_hits
                .with_label_values(&[topic, group])
                .inc();
            "duplicate"
        }
        ClaimResponse::InProgress { .. } => "in_progress",
    };
    state
        .metrics
        .message_claims
        .with_label_values(&[topic, group, outcome])
        .inc();
    Ok(Json(response))
}

async fn complete_message(
    State(state): State<AppState>,
    Extension(principal): Extension<Arc<Principal>>,
    Json(done): Json<MessageDoneRequest>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let request = messages::complete_request(&done);
    check_identity(&request.id)?;
    check_service(&principal, &done.id.service, Permission::Messages)?;
    if let Some(note) = &done.dead_letter {
        if note.topic.is_empty() || note.topic.len() > 249 || note.reason.len() > 4096 {
            return Err(ApiError::BadRequest(
                "dead_letter: topic must be 1 to 249 bytes (a Kafka topic name) and reason at most 4096 bytes".into(),
            ));
        }
    }
    let started = Instant::now();
    let result = state.storage.complete(&request, now_ms()).await;
    observe(&state, "message_complete", &done.id.service, started, &result);
    result?;
    if let Some(note) = &done.dead_letter {
        state
            .metrics
            .message_dead_letters
            .with_label_values(&[done.id.topic.as_str(), done.id.consumer_group.as_str()])
            .inc();
        tracing::warn!(topic = %done.id.topic, consumer_group = %done.id.consumer_group,
            dead_letter_topic = %note.topic, attempts = note.attempts, reason = %note.reason,
            "message dead-lettered");
    }
    Ok(Json(json!({"ok": true})))
}

async fn release_message(
    State(state): State<AppState>,
    Extension(principal): Extension<Arc<Principal>>,
    Json(done): Json<MessageDoneRequest>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let request = messages::release_request(&done);
    check_identity(&request.id)?;
    check_service(&principal, &done.id.service, Permission::Messages)?;
    let started = Instant::now();
    let result = state.storage.release(&request, now_ms()).await;
    observe(&state, "message_release", &done.id.service, started, &result);
    result?;
    Ok(Json(json!({"ok": true})))
}

/// What an operator (`idempotencyctl doctor`) checks: version, backend, whether durable commits
/// are healthy, the replay listener, the credentials in force (names only), the store's clock.
async fn info(State(state): State<AppState>) -> Json<serde_json::Value> {
    let live = state.storage.live();
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "backend": state.storage.name(),
        "durable_commits_healthy": live.is_ok(),
        "durable_commits_error": live.err().map(|e| e.to_string()),
        "replay_listen": state.replay_listen,
        "authentication": state.auth.is_some(),
        "credentials": state.auth.as_ref().map(|a| a.names()).unwrap_or_default(),
        "trusts_forwarded_client_cert": state.forwarded_identity.is_some(),
        "now_ms": now_ms(),
    }))
}

/// Liveness: fails only when the process cannot recover without a restart (a failed journal
/// sync), so an orchestrator restarts it.
async fn healthz(State(state): State<AppState>) -> Response {
    match state.storage.live() {
        Ok(()) => (StatusCode::OK, "ok").into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("not live: {e}")).into_response(),
    }
}

async fn readyz(State(state): State<AppState>) -> Response {
    match state.storage.ready().await {
        Ok(()) => (StatusCode::OK, "ready").into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}")).into_response(),
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    // Read from the slots themselves, which free on drop: a wait whose proxy went away (its
    // future dropped mid-wait) is gone from the gauge too.
    state
        .metrics
        .acquire_waiters
        .set(i64::try_from(state.waiters.active()).unwrap_or(i64::MAX));
    if let Ok(count) = state.storage.record_count().await {
        state
            .metrics
            .live_records
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }
    if let Some(bytes) = state.storage.write_buffer_bytes() {
        state
            .metrics
            .write_buffer_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }
    if let Some(totals) = state.storage.group_commits() {
        // Counters only move forward; the storage keeps the totals, a scrape catches up.
        let m = &state.metrics;
        let _one_at_a_time = m
            .catch_up
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        m.durable_commits
            .inc_by(totals.commits.saturating_sub(m.durable_commits.get()));
        m.durable_commit_operations.inc_by(
            totals
                .operations
                .saturating_sub(m.durable_commit_operations.get()),
        );
        let sync_seconds = std::time::Duration::from_nanos(totals.sync_nanos).as_secs_f64();
        let behind = sync_seconds - m.durable_commit_sync_seconds.get();
        if behind > 0.0 {
            m.durable_commit_sync_seconds.inc_by(behind);
        }
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}
