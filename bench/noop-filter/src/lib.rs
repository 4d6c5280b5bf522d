//! A proxy-wasm HTTP filter that does nothing: `make bench` loads it where the idempotency filter would be, to measure the floor that a Wasm filter costs in this Envoy.

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{ContextType, LogLevel};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(NoopRoot) });
}}

struct NoopRoot;

impl Context for NoopRoot {}

impl RootContext for NoopRoot {
    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(NoopRequest))
    }
}

/// Every callback keeps its default: continue.
struct NoopRequest;

impl Context for NoopRequest {}

impl HttpContext for NoopRequest {}
