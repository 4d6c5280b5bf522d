//! Event consumers' calls: claim, complete (possibly as dead-lettered) and release a message.

#[allow(clippy::wildcard_imports)] // the api module's state, checks and imports
use super::*;

pub(super) async fn claim_message(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Arc<Principal>>,
    Json(claim): Json<ClaimRequest>,
) -> Result<Json<ClaimResponse>, ApiError> {
    let acquire = messages::acquire_request(&claim);
    let op = Op::service("claim", &acquire.id, Permission::Messages).authorize(&principal)?;
    if claim.id.topic.is_empty() || claim.id.consumer_group.is_empty() || claim.lock_timeout_ms == 0 {
        return Err(ApiError::BadRequest(
            "topic, consumer_group and lock_timeout_ms must be set".into(),
        ));
    }
    let answer = op
        .run(&state, state.storage.acquire(&acquire, now_ms()), op::never)
        .await?;
    let response = messages::claim_response(answer)?;
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

pub(super) async fn complete_message(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Arc<Principal>>,
    Json(done): Json<MessageDoneRequest>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let request = messages::complete_request(&done);
    let op = Op::service("message_complete", &request.id, Permission::Messages).authorize(&principal)?;
    if let Some(note) = &done.dead_letter {
        if note.topic.is_empty() || note.topic.len() > 249 || note.reason.len() > 4096 {
            return Err(ApiError::BadRequest(
                "dead_letter: topic must be 1 to 249 bytes (a Kafka topic name) and reason at most 4096 bytes".into(),
            ));
        }
    }
    op.run(&state, state.storage.complete(&request, now_ms()), op::never)
        .await?;
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

pub(super) async fn release_message(
    State(state): State<Arc<AppState>>,
    Extension(principal): Extension<Arc<Principal>>,
    Json(done): Json<MessageDoneRequest>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let request = messages::release_request(&done);
    Op::service("message_release", &request.id, Permission::Messages)
        .authorize(&principal)?
        .run(&state, state.storage.release(&request, now_ms()), op::never)
        .await?;
    Ok(Json(json!({"ok": true})))
}
