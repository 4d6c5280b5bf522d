//! Proxy-wasm HTTP filter that makes mutating requests safe to retry: validates the
//! `Idempotency-Key`, fingerprints the request, takes a lock in the store service, then replays,
//! refuses or forwards, and records the upstream's response before releasing it to the client.
//!
//! Layout, in the order a request meets it: [`config`] (the plugin configuration, parsed and
//! checked at load), [`request`] (pure: does the filter act on this request, its key, scope,
//! policy and fingerprint), [`flow`] (one HTTP stream: each host callback matches its state,
//! takes a pure step and applies it), [`store`] (every store call: bodies, batching, background
//! retries, reply routing), [`reply`] (what the filter answers and what an answer proves), behind
//! [`host::Host`], and `wasm` (the only module that talks to proxy-wasm). [`metrics`] names the
//! counters, [`tick`] the root context's timer.

pub mod config;
pub mod flow;
pub mod host;
pub mod metrics;
pub mod reply;
pub mod request;
pub mod store;
pub mod tick;

#[cfg(test)]
#[path = "tests/fingerprint_reference.rs"]
mod fingerprint_reference;
#[cfg(test)]
#[path = "tests/hostile_input.rs"]
mod hostile_input;
#[cfg(test)]
mod mock;

#[cfg(target_arch = "wasm32")]
mod wasm;

#[cfg(target_arch = "wasm32")]
#[allow(unsafe_code)] // the SDK's entry-point macro exports `_initialize` with #[no_mangle]
mod entry {
    proxy_wasm::main! {{
        proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Debug);
        proxy_wasm::set_root_context(|context_id| -> Box<dyn proxy_wasm::traits::RootContext> {
            Box::new(crate::wasm::Root::new(context_id))
        });
    }}
}
