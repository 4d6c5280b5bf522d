//! Admin calls: read, list and purge records (audited), and what `idempotencyctl doctor` reads
//! about the store (`/v1/info`).

#[allow(clippy::wildcard_imports)] // the api module's state, checks and imports
use super::*;

/// One structured line per admin action: who (credential name, never the token), what, which.
pub(super) fn audit(principal: &Principal, action: &str, id: &RecordId, found: bool) {
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

pub(super) async fn get_record(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Arc<Principal>>,
    Query(id): Query<RecordId>,
) -> Result<Json<Record>, ApiError> {
    let op = Op::admin("get", &id).authorize(&principal)?;
    let result = op.run(&state, state.storage.get(&id, now_ms()), op::never).await;
    audit(&principal, "get", &id, matches!(result, Ok(Some(_))));
    result?
        .map(Json)
        .ok_or(ApiError::Storage(StorageError::NotFound(id)))
}

/// Query of `GET /v1/records/in-progress`.
#[derive(Debug, serde::Deserialize)]
pub(super) struct ListQuery {
    service: String,
    /// Only records created at least this long ago (stuck locks).
    #[serde(default)]
    older_than_ms: u64,
    #[serde(default = "default_page")]
    limit: usize,
    cursor: Option<String>,
}

pub(super) fn default_page() -> usize {
    100
}

/// Largest page of the listing.
pub const MAX_PAGE: usize = 1_000;

pub(super) async fn list_in_progress(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Arc<Principal>>,
    Query(query): Query<ListQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if query.service.is_empty() || query.limit == 0 || query.limit > MAX_PAGE {
        return Err(ApiError::BadRequest(format!(
            "service must be set and limit between 1 and {MAX_PAGE}"
        )));
    }
    let now = now_ms();
    let result = timed(
        &state,
        "list",
        &query.service,
        state.storage.list_in_progress(
            &query.service,
            now.saturating_sub(query.older_than_ms),
            query.limit,
            query.cursor.as_deref(),
            now,
        ),
    )
    .await;
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

pub(super) async fn purge_record(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Arc<Principal>>,
    Query(id): Query<RecordId>,
) -> Result<StatusCode, ApiError> {
    let op = Op::admin("purge", &id).authorize(&principal)?;
    let result = op.run(&state, state.storage.purge(&id), op::never).await;
    audit(&principal, "purge", &id, matches!(result, Ok(true)));
    if result? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::Storage(StorageError::NotFound(id)))
    }
}

/// What an operator (`idempotencyctl doctor`) checks: version, backend, whether durable commits
/// are healthy, the replay listener, the credentials in force (names only), the store's clock.
pub(super) async fn info(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
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
