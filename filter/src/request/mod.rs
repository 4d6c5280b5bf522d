//! What a request is, decided from what it carries (pure, no host): whether the filter acts on
//! it ([`admission`]), its key, scope, route policy and metadata, its fingerprint and its
//! attempt id.

pub mod admission;
pub mod attempt;
pub mod fingerprint;
pub mod key;
pub mod metadata;
pub mod policy;
pub mod retry_headers;
pub mod scope;
