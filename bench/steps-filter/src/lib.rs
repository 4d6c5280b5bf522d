//! `idempotency-bench --body-cost`: a proxy-wasm HTTP filter that does the steps of an execution
//! one at a time, without the store, so each step's Envoy CPU per request can be read apart (the
//! no-op floor stays `noop-filter`, small as a filter can be).
//!
//! The plugin configuration names the steps, joined by `+` (empty: do nothing): `buffer` — hold
//! the request and the response until each has ended and read their bodies into the VM, as the
//! idempotency filter does (`request`: the request only, the response streams); `callout` — also make one callout (`GET /healthz` on the
//! `idempotency_store` cluster) once the request body is in, and continue on its reply;
//! `canonical` — canonicalise the request body as JSON, `sha256` — fingerprint it (the
//! filter's own `request/fingerprint.rs`, compiled in here), `blake3` — hash it with BLAKE3
//! instead (SIMD in the VM: the faster hash a future fingerprint could use); `record` — encode the response
//! into a `complete` body as the filter sends it (`idempotency-wire`). `--body-cost` adds them one
//! at a time, so each step's Envoy CPU per request can be read apart.

use std::time::Duration;

use idempotency_wire::{CompleteRequest, RecordId, StoredResponse};

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel};

/// The filter's fingerprint code itself, so the steps cost here what they cost there.
#[path = "../../../filter/src/request/fingerprint.rs"]
#[allow(dead_code)]
mod fingerprint;

/// What `fingerprint.rs`'s own tests need from the filter's test support, so `clippy
/// --all-targets` compiles them here too (they run in the filter crate).
#[cfg(test)]
mod mock {
    pub fn succeeded<T: Default, E: std::fmt::Debug>(result: Result<T, E>) -> T {
        assert!(result.is_ok(), "expected Ok, got {:?}", result.as_ref().err());
        result.unwrap_or_default()
    }
}

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(NoopRoot { mode: Mode::default() }) });
}}

/// What each request goes through (the configured steps).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Mode {
    buffer: bool,
    /// Hold and read the request body only (the response streams, as a response over
    /// `max_response_size` does through the filter).
    request: bool,
    callout: bool,
    canonical: bool,
    sha256: bool,
    blake3: bool,
    record: bool,
}

impl Mode {
    fn holds_request(&self) -> bool {
        self.buffer || self.request
    }

    fn parse(config: &[u8]) -> Mode {
        let text = String::from_utf8_lossy(config);
        let has = |step: &str| text.split('+').any(|s| s.trim() == step);
        Mode {
            buffer: has("buffer"),
            request: has("request"),
            callout: has("callout"),
            canonical: has("canonical"),
            sha256: has("sha256"),
            blake3: has("blake3"),
            record: has("record"),
        }
    }
}

struct NoopRoot {
    mode: Mode,
}

impl Context for NoopRoot {}

impl RootContext for NoopRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let config = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX)
            .ok()
            .flatten()
            .unwrap_or_default();
        self.mode = Mode::parse(&config);
        true
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(NoopRequest { mode: self.mode }))
    }
}

/// One request in the chosen mode.
struct NoopRequest {
    mode: Mode,
}

impl Context for NoopRequest {
    fn on_http_call_response(&mut self, _token: u32, _headers: usize, _body: usize, _trailers: usize) {
        let _ = hostcalls::resume_http_request();
    }
}

impl HttpContext for NoopRequest {
    fn on_http_request_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        if !self.mode.holds_request() || end_of_stream {
            Action::Continue
        } else {
            Action::Pause
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if !self.mode.holds_request() {
            return Action::Continue;
        }
        if !end_of_stream {
            return Action::Pause;
        }
        let body = hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_size)
            .ok()
            .flatten()
            .unwrap_or_default();
        let canonical = if self.mode.canonical {
            fingerprint::fingerprint_body(&body, true, &[])
        } else {
            std::borrow::Cow::Borrowed(body.as_slice())
        };
        if self.mode.sha256 {
            let digest = fingerprint::fingerprint("POST", "/api/v1/orders", &[], &canonical);
            std::hint::black_box(digest);
        }
        if self.mode.blake3 {
            std::hint::black_box(blake3::hash(&canonical));
        }
        if !self.mode.callout {
            return Action::Continue;
        }
        let headers = vec![
            (":method", "GET"),
            (":path", "/healthz"),
            (":authority", "idempotency-store"),
        ];
        match hostcalls::dispatch_http_call(
            "idempotency_store",
            headers,
            None,
            Vec::new(),
            Duration::from_secs(1),
        ) {
            Ok(_) => Action::Pause,
            Err(_) => Action::Continue,
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, end_of_stream: bool) -> Action {
        if !self.mode.buffer || end_of_stream {
            Action::Continue
        } else {
            Action::Pause
        }
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if !self.mode.buffer {
            return Action::Continue;
        }
        if !end_of_stream {
            return Action::Pause;
        }
        let body = hostcalls::get_buffer(BufferType::HttpResponseBody, 0, body_size)
            .ok()
            .flatten()
            .unwrap_or_default();
        if self.mode.record {
            let complete = CompleteRequest {
                id: RecordId {
                    service: "orders".to_owned(),
                    scope: String::new(),
                    key: "bench".to_owned(),
                },
                record_id: "r".to_owned(),
                fencing_token: 1,
                attempt_id: "a".to_owned(),
                response: StoredResponse {
                    status: 201,
                    headers: vec![("content-type".to_owned(), "application/json".to_owned())],
                    body,
                    body_omitted: false,
                    trailers: Vec::new(),
                },
                retention_ms: 86_400_000,
            };
            std::hint::black_box(serde_json::to_vec(&complete).ok());
        }
        Action::Continue
    }
}
