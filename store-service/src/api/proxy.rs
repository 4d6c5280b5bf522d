//! The proxy's calls (the filter's caller identity): acquire — waiting for a key in progress when
//! asked — complete, release, outcome-unknown, abandon, and the service's phase checkpoints.

#[allow(clippy::wildcard_imports)] // the api module's state, checks and imports
use super::*;

pub(crate) async fn acquire(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Arc<Principal>>,
    Json(mut request): Json<AcquireRequest>,
) -> Result<Json<AcquireResponse>, ApiError> {
    let op = Op::proxy("acquire", &request.id).authorize(&principal)?;
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
    let result = op.run(&state, acquire_or_wait(&state, &request), op::never).await;
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
pub(super) fn wait_budget(request: &AcquireRequest, now: u64) -> Duration {
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
pub(super) async fn acquire_or_wait(
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

pub(crate) async fn outcome_unknown(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Arc<Principal>>,
    Json(request): Json<OutcomeUnknownRequest>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let op = Op::proxy("outcome_unknown", &request.id).authorize(&principal)?;
    if request.reason.is_empty() || request.reason.len() > 128 {
        return Err(ApiError::BadRequest("reason must be 1 to 128 bytes".into()));
    }
    // The lock stays: nothing changes for a waiting acquire (the store does not wait on it).
    op.run(
        &state,
        state.storage.outcome_unknown(&request, now_ms()),
        op::never,
    )
    .await?;
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
pub(super) const KNOWN_UNKNOWN_REASONS: [&str; 11] = [
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

pub(super) fn reason_label(reason: &str) -> &str {
    if KNOWN_UNKNOWN_REASONS.contains(&reason) {
        reason
    } else {
        "other"
    }
}

pub(crate) async fn abandon(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Arc<Principal>>,
    Json(request): Json<AbandonRequest>,
) -> Result<Json<AbandonResponse>, ApiError> {
    let released = Op::proxy("abandon", &request.id)
        .authorize(&principal)?
        .run(&state, state.storage.abandon(&request, now_ms()), |released| {
            *released
        })
        .await?;
    state
        .metrics
        .abandoned
        .with_label_values(&[
            request.id.service.as_str(),
            if released { "true" } else { "false" },
        ])
        .inc();
    Ok(Json(AbandonResponse { released }))
}

pub(crate) async fn complete(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Arc<Principal>>,
    Json(request): Json<CompleteRequest>,
) -> Result<Json<serde_json::Value>, ApiError> {
    Op::proxy("complete", &request.id)
        .authorize(&principal)?
        .run(&state, state.storage.complete(&request, now_ms()), op::always)
        .await?;
    Ok(Json(json!({"ok": true})))
}

pub(crate) async fn release(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Arc<Principal>>,
    Json(request): Json<ReleaseRequest>,
) -> Result<Json<serde_json::Value>, ApiError> {
    Op::proxy("release", &request.id)
        .authorize(&principal)?
        .run(&state, state.storage.release(&request, now_ms()), op::always)
        .await?;
    Ok(Json(json!({"ok": true})))
}

pub(super) async fn checkpoint(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Arc<Principal>>,
    Json(request): Json<CheckpointRequest>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let op = Op::service("checkpoint", &request.id, Permission::Checkpoint).authorize(&principal)?;
    if request.phase.is_empty() || request.phase.len() > 256 {
        return Err(ApiError::BadRequest("phase must be 1 to 256 bytes".into()));
    }
    op.run(&state, state.storage.checkpoint(&request, now_ms()), op::never)
        .await?;
    Ok(Json(json!({"ok": true})))
}
