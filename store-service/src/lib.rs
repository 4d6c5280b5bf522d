//! Idempotency store service: holds idempotency records (locks with expiry, stored responses,
//! phase checkpoints) behind an authenticated HTTP/JSON API, over embedded or MongoDB storage.

pub mod api;
pub mod config;
pub mod error;
pub mod messages;
pub mod metrics;
pub mod record;
pub mod shutdown;
pub mod storage;

use std::sync::Arc;
use std::time::Duration;

use crate::storage::Storage;

/// Delete expired records every `interval` until the process ends.
pub async fn sweep_loop(storage: Arc<dyn Storage>, metrics: metrics::Metrics, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        match storage.sweep_expired(api::now_ms()).await {
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
