//! Every call to the store service: the bodies ([`calls`]), batching across streams
//! ([`batch`]), the root context's retried calls ([`background`]), handing replies to whoever
//! waits for them ([`routing`]), the credential a call presents and the start-up route check.

pub mod background;
pub mod batch;
pub mod calls;
pub mod credentials;
pub mod routing;
pub mod store_check;
