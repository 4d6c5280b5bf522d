//! The replay listener's one route: serve a completed record's stored response to the holder of a
//! replay ticket (how gRPC replays reach stock clients).

#[allow(clippy::wildcard_imports)] // the api module's state, checks and imports
use super::*;

/// Serve a completed record's stored response to the holder of a replay ticket (gRPC replays).
pub(super) async fn replay(State(state): State<Arc<AppState>>, headers: axum::http::HeaderMap) -> Response {
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
