//! End-to-end harness: starts the store service, the demo orders service and a real Envoy with
//! the built `.wasm` as processes on free loopback ports, and stops them all on drop.
//!
//! Binaries come from `target/release` (built by `make build`; override with `E2E_BIN_DIR`),
//! Envoy from `.venv/bin/envoy` (override with `ENVOY_BIN`), the filter from
//! `target/wasm32-wasip1/wasm-release/idempotency_filter.wasm` (override with `E2E_WASM`).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)] // test code

pub mod certs;

pub mod envoy_config;

pub mod gateway;

pub mod grpc;

pub mod old_store;

/// Token shared by the store and the filter in tests.
pub const STORE_TOKEN: &str = "e2e-token";

/// The MongoDB wire-protocol test server (one copy, the store crate's).
pub use idempotency_store::storage::test_mongo::MongoServer;

/// The sum of a metric's series in Prometheus text (one copy: the client crate's).
pub use idempotency_client::metric_sum;

mod metrics;
mod process;
mod proxies;
mod shipped;
mod stack;

pub use metrics::*;
pub use process::*;
pub use proxies::*;
pub use shipped::*;
pub use stack::*;
