//! What the filter answers and what an answer proves: problem bodies, stored headers to replay,
//! gRPC refusals, the per-worker replay cache, and the outcome of a forwarded request.

pub mod cache;
pub mod grpc;
pub mod outcome;
pub mod problem;
pub mod replay;
