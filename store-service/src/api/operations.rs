//! Operations endpoints without credentials: liveness, readiness, Prometheus metrics.

#[allow(clippy::wildcard_imports)] // the api module's state, checks and imports
use super::*;

/// Liveness: fails only when the process cannot recover without a restart (a failed journal
/// sync), so an orchestrator restarts it.
pub(super) async fn healthz(State(state): State<Arc<AppState>>) -> Response {
    match state.storage.live() {
        Ok(()) => (StatusCode::OK, "ok").into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("not live: {e}")).into_response(),
    }
}

pub(super) async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    match state.storage.ready().await {
        Ok(()) => (StatusCode::OK, "ready").into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}")).into_response(),
    }
}

pub(super) async fn metrics(State(state): State<Arc<AppState>>) -> Response {
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
