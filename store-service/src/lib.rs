//! Idempotency store service: holds idempotency records (locks with expiry, stored responses,
//! phase checkpoints) behind an authenticated HTTP/JSON API, over embedded or MongoDB storage.

pub mod api;
pub mod auth;
pub mod config;
pub mod error;
pub mod identity;
pub mod messages;
pub mod metrics;
pub mod record;
pub mod reload;
pub mod replay;
pub mod shutdown;
pub mod storage;
pub mod tls;
pub mod wait;

use std::sync::Arc;
use std::time::Duration;

use crate::storage::Storage;

/// Most records one sweep step deletes; the sweep repeats steps until it is done, and other
/// operations interleave between steps (each step is its own short write).
pub const SWEEP_CHUNK: u64 = 1_000;

/// Delete every expired record, one bounded chunk at a time; returns how many.
pub async fn sweep_all(storage: &dyn Storage, now_ms: u64) -> Result<u64, storage::StorageError> {
    let mut total = 0;
    loop {
        let removed = storage.sweep_expired(now_ms, SWEEP_CHUNK).await?;
        total += removed;
        if removed < SWEEP_CHUNK {
            return Ok(total);
        }
        tokio::task::yield_now().await;
    }
}

/// Delete expired records every `interval` until the process ends.
pub async fn sweep_loop(storage: Arc<dyn Storage>, metrics: metrics::Metrics, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        match sweep_all(storage.as_ref(), api::now_ms()).await {
            Ok(0) => {}
            Ok(removed) => {
                metrics
                    .expired
                    .with_label_values(&[storage.name()])
                    .inc_by(removed);
                tracing::debug!(removed, "swept expired records");
            }
            Err(e) => tracing::warn!(error = %e, "expiry sweep failed"),
        }
    }
}
