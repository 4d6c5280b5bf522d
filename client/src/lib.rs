//! Service-side helpers for the idempotency store, mirroring the seed's Go API at the mesh:
//! [`PhaseManager`] records phase checkpoints of a multi-phase request and skips phases a
//! previous attempt finished; [`DeduplicatingHandler`] makes an event consumer handle each
//! CloudEvent once, and with the `kafka` feature [`KafkaDeduplicatingConsumer`] does the same
//! for an `rdkafka` consumer group, committing offsets only after the store knows. All of them
//! talk to the store service over plain HTTP ([`StoreClient`]).

mod dedup;
mod error;
#[cfg(feature = "kafka")]
mod kafka;
mod phases;
mod store;

pub use dedup::{event_message_id, ConsumerConfig, DeduplicatingHandler, HandleError, Outcome};
pub use error::ClientError;
#[cfg(feature = "kafka")]
pub use kafka::{
    record_identity, CommitPolicy, DeadLetterPolicy, Delivery, DeliveryResult, KafkaConsumerConfig,
    KafkaDeduplicatingConsumer, KafkaLoopError, MessageIdSource,
};
pub use phases::PhaseManager;
/// The `rdkafka` this crate is built with, so a consumer names the same message types.
#[cfg(feature = "kafka")]
pub use rdkafka;
pub use store::{metric_sum, StoreClient};
