//! `/v1/batch`: several proxy calls in one request, each run exactly as if it had come alone.
//!
//! The filter batches the calls that queue up while the store is busy: for Envoy a callout costs
//! about as much CPU as forwarding a request, and here one HTTP request replaces many. The calls
//! run concurrently inside `Storage::together`, so the embedded engine commits their writes
//! together (one sync).

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use idempotency_wire::{paths, BatchRequest};
use serde::de::DeserializeOwned;

use std::sync::Arc;

use super::AppState;
use crate::auth::Principal;
use crate::error::ApiError;

/// Most calls one batch may carry (the filter sends at most its `store_batch_max_calls`).
pub const MAX_BATCH_CALLS: usize = 256;

/// `POST /v1/batch`.
pub async fn batch(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Arc<Principal>>,
    body: Bytes,
) -> Response {
    let request: BatchRequest<'_> = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => return ApiError::BadRequest(format!("invalid batch: {e}")).into_response(),
    };
    if request.calls.len() > MAX_BATCH_CALLS {
        return ApiError::BadRequest(format!(
            "a batch carries at most {MAX_BATCH_CALLS} calls, got {}",
            request.calls.len()
        ))
        .into_response();
    }
    if let Some(call) = request
        .calls
        .iter()
        .find(|call| !paths::BATCHABLE.contains(&call.path.as_str()))
    {
        return ApiError::BadRequest(format!(
            "`{}` cannot be batched (only {})",
            call.path,
            paths::BATCHABLE.join(", ")
        ))
        .into_response();
    }
    #[allow(clippy::cast_precision_loss)] // at most MAX_BATCH_CALLS
    state.metrics.batch_calls.observe(request.calls.len() as f64);
    let mut replies = Vec::new();
    let calls = futures::future::join_all(
        request
            .calls
            .iter()
            .map(|call| run(&state, &principal, &call.path, call.body.get())),
    );
    state
        .storage
        .together(Box::pin(async {
            replies = calls.await;
        }))
        .await;
    let mut out = Vec::with_capacity(64 + replies.iter().map(|(_, body)| body.len() + 24).sum::<usize>());
    out.extend_from_slice(b"{\"replies\":[");
    for (index, (status, body)) in replies.iter().enumerate() {
        if index > 0 {
            out.push(b',');
        }
        out.extend_from_slice(format!("{{\"status\":{},\"body\":", status.as_u16()).as_bytes());
        out.extend_from_slice(body);
        out.push(b'}');
    }
    out.extend_from_slice(b"]}");
    (
        StatusCode::OK,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        out,
    )
        .into_response()
}

/// Run one call through its own handler (as the batch's caller: every item is checked against
/// its credential's services); its status and (JSON) body.
async fn run(
    state: &Arc<AppState>,
    principal: &Arc<Principal>,
    path: &str,
    body: &str,
) -> (StatusCode, Bytes) {
    let response = match path {
        p if p == paths::ACQUIRE => call(state, principal, body, super::acquire).await,
        p if p == paths::COMPLETE => call(state, principal, body, super::complete).await,
        p if p == paths::RELEASE => call(state, principal, body, super::release).await,
        p if p == paths::OUTCOME_UNKNOWN => call(state, principal, body, super::outcome_unknown).await,
        p if p == paths::ABANDON => call(state, principal, body, super::abandon).await,
        _ => ApiError::BadRequest(format!("`{path}` cannot be batched")).into_response(),
    };
    let status = response.status();
    match axum::body::to_bytes(response.into_body(), usize::MAX).await {
        // Every handler answers JSON (errors included); an empty body would break the batch.
        Ok(bytes) if !bytes.is_empty() => (status, bytes),
        _ => (status, Bytes::from_static(b"null")),
    }
}

/// Parse `body` as the handler's request and run the handler.
async fn call<T, R, F, Fut>(
    state: &Arc<AppState>,
    principal: &Arc<Principal>,
    body: &str,
    handler: F,
) -> Response
where
    T: DeserializeOwned,
    R: IntoResponse,
    F: FnOnce(State<Arc<AppState>>, Extension<Arc<Principal>>, Json<T>) -> Fut,
    Fut: std::future::Future<Output = R>,
{
    match serde_json::from_str::<T>(body) {
        Ok(request) => handler(State(state.clone()), Extension(principal.clone()), Json(request))
            .await
            .into_response(),
        Err(e) => ApiError::BadRequest(format!("invalid body: {e}")).into_response(),
    }
}
