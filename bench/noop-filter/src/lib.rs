//! `make bench`'s floors: a proxy-wasm HTTP filter that does nothing (the cost of Wasm itself in
//! this Envoy), or only the mechanics the idempotency filter needs, so the table can say where
//! its time goes.
//!
//! The plugin configuration picks the mode: empty (or anything else) — do nothing; `"buffer"` —
//! hold the request and the response until each has ended and read their bodies into the VM,
//! as the idempotency filter does; `"buffer+callout"` — also make one callout (`GET /healthz` on
//! the `idempotency_store` cluster) once the request body is in, and continue on its reply.

use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(NoopRoot { mode: Mode::Nothing }) });
}}

/// What each request goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Nothing,
    Buffer,
    BufferAndCallout,
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
        self.mode = match config.as_slice() {
            b"buffer" => Mode::Buffer,
            b"buffer+callout" => Mode::BufferAndCallout,
            _ => Mode::Nothing,
        };
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
        if self.mode == Mode::Nothing || end_of_stream {
            Action::Continue
        } else {
            Action::Pause
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if self.mode == Mode::Nothing {
            return Action::Continue;
        }
        if !end_of_stream {
            return Action::Pause;
        }
        let _ = hostcalls::get_buffer(BufferType::HttpRequestBody, 0, body_size);
        if self.mode != Mode::BufferAndCallout {
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
        if self.mode == Mode::Nothing || end_of_stream {
            Action::Continue
        } else {
            Action::Pause
        }
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if self.mode == Mode::Nothing {
            return Action::Continue;
        }
        if !end_of_stream {
            return Action::Pause;
        }
        let _ = hostcalls::get_buffer(BufferType::HttpResponseBody, 0, body_size);
        Action::Continue
    }
}
