//! The small host interface the idempotency logic needs; proxy-wasm is behind it (`wasm/`),
//! and unit tests put a mock behind it (`mock.rs`).

use std::time::Duration;

use thiserror::Error;

use crate::metrics::Counter;

/// A host call failed. The logic treats it like a store failure: fail closed or open.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("host call `{call}` failed: {status}")]
pub struct HostError {
    /// Which host call.
    pub call: &'static str,
    /// The host's status, as text.
    pub status: String,
}

/// Log severity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// One line per decision.
    Debug,
    /// Something worth an operator's attention.
    Warn,
    /// Configuration refused and other hard failures.
    Error,
}

/// One HTTP call to the store service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Callout<'a> {
    /// Path on the store, e.g. `/v1/acquire`.
    pub path: &'static str,
    /// JSON body.
    pub body: &'a [u8],
    /// How long Envoy waits for the reply before reporting a timeout.
    pub timeout: Duration,
    /// May share one `/v1/batch` request with other calls (see `store/batch.rs`); false for calls
    /// the store may hold (an acquire that waits for an in-progress record).
    pub may_batch: bool,
}

/// What the store answered to a callout.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CalloutReply {
    /// `:status` of the reply; `None` when the host gave none.
    pub status: Option<u16>,
    /// Reply body.
    pub body: Vec<u8>,
}

/// Everything the per-request logic asks of the proxy.
pub trait Host {
    /// All request headers, pseudo-headers included, names lower case.
    fn request_headers(&self) -> Result<Vec<(String, String)>, HostError>;
    /// Every value of a request header (one per field line, in order), as exact bytes.
    /// [`Host::request_headers`] gives text, with bytes that are not UTF-8 read as U+FFFD; where
    /// a value decides a record's identity (fingerprint and scope headers) two such values must
    /// not read alike, so the flow asks for the bytes of a header whose text shows U+FFFD.
    fn request_header_bytes(&self, name: &str) -> Result<Vec<Vec<u8>>, HostError>;
    /// Set (`Some`) or remove (`None`) a request header.
    fn set_request_header(&self, name: &str, value: Option<&str>) -> Result<(), HostError>;
    /// The buffered request body.
    fn request_body(&self, size: usize) -> Result<Vec<u8>, HostError>;
    /// All response headers, `:status` included.
    fn response_headers(&self) -> Result<Vec<(String, String)>, HostError>;
    /// Set (`Some`) or remove (`None`) a response header.
    fn set_response_header(&self, name: &str, value: Option<&str>) -> Result<(), HostError>;
    /// The buffered response body.
    fn response_body(&self, size: usize) -> Result<Vec<u8>, HostError>;
    /// All response trailers.
    fn response_trailers(&self) -> Result<Vec<(String, String)>, HostError>;
    /// Start a call to the store; the reply arrives later under the returned token.
    fn dispatch(&self, callout: &Callout<'_>) -> Result<u32, HostError>;
    /// Read the reply of the callout being delivered.
    fn callout_reply(&self, body_size: usize) -> CalloutReply;
    /// Answer the client directly; the upstream is not called.
    fn send_response(&self, status: u16, headers: &[(String, String)], body: &[u8]) -> Result<(), HostError>;
    /// Answer a gRPC client directly with a status (trailers-only); the upstream is not called.
    fn send_grpc_response(
        &self,
        status: u32,
        message: &str,
        metadata: &[(String, String)],
    ) -> Result<(), HostError>;
    /// Make Envoy pick the route again (after request headers changed).
    fn clear_route_cache(&self) -> Result<(), HostError>;
    /// Continue a paused request.
    fn resume_request(&self) -> Result<(), HostError>;
    /// Continue a paused response.
    fn resume_response(&self) -> Result<(), HostError>;
    /// An Envoy property (e.g. route metadata, peer principal); `None` when absent.
    fn property(&self, path: &[&str]) -> Option<Vec<u8>>;
    /// Time since the Unix epoch.
    fn now(&self) -> Duration;
    /// Write a log line.
    fn log(&self, level: Level, message: &str);
    /// Whether a `Debug` line would be written (Envoy's Wasm log level is debug or trace); no
    /// host call (the root context keeps it current).
    fn debug_enabled(&self) -> bool;
    /// Add one to a counter.
    fn count(&self, counter: Counter);
    /// Make the root context dispatch queued background calls soon.
    fn wake_background(&self);
    /// Record how long an acquire took.
    fn record_acquire_duration(&self, duration: Duration);
}

/// Write a `Debug` line, building it only when debug logging is on: the request path logs at
/// debug level several times per request, and formatting (plus hashing the key) is wasted work
/// at the default `info` level.
pub fn debug(host: &dyn Host, message: impl FnOnce() -> String) {
    if host.debug_enabled() {
        host.log(Level::Debug, &message());
    }
}
