//! Service-side helpers for the idempotency store, mirroring the seed's Go API at the mesh:
//! [`PhaseManager`] records phase checkpoints of a multi-phase request and skips phases a
//! previous attempt finished; [`DeduplicatingHandler`] makes an event consumer handle each
//! CloudEvent once. Both talk to the store service over plain HTTP ([`StoreClient`]).

mod dedup;
mod error;
mod phases;
mod store;

pub use dedup::{event_message_id, ConsumerConfig, DeduplicatingHandler, HandleError, Outcome};
pub use error::ClientError;
pub use phases::PhaseManager;
pub use store::StoreClient;
