//! Proxy-wasm HTTP filter that makes mutating requests safe to retry: validates the
//! `Idempotency-Key`, fingerprints the request, takes a lock in the store service, then replays,
//! refuses or forwards, and records the upstream's response before releasing it to the client.
//!
//! Layout: [`config`] (plugin configuration), [`credentials`] (the store token a call presents), [`policy`] and [`metadata`] (per-route mode),
//! [`key`], [`scope`] (caller isolation), [`fingerprint`], [`problem`] (error bodies), [`replay`]
//! (stored headers), [`outcome`] (whether a forwarded request's lock may be released),
//! [`attempt`] (attempt ids), [`batch`] (store calls of all streams, batched while the store is
//! busy), [`store_check`] (the start-up check of the store route), [`flow`] (admission, the per-request state machine and its store
//! calls, plain Rust behind [`host::Host`]), [`background`] (root-context calls, retried), [`tick`] (the root's timer), and
//! `wasm` (the only module that talks to proxy-wasm).

pub mod attempt;
pub mod background;
pub mod batch;
pub mod cache;
pub mod config;
pub mod credentials;
pub mod fingerprint;
pub mod flow;
pub mod grpc;
pub mod host;
pub mod key;
pub mod metadata;
pub mod metrics;
pub mod outcome;
pub mod policy;
pub mod problem;
pub mod replay;
pub mod scope;
pub mod store_check;
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
