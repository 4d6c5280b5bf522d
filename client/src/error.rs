//! Errors of the store client.

use thiserror::Error;

/// Why a store call or a helper failed.
#[derive(Debug, Error)]
pub enum ClientError {
    /// The store could not be reached.
    #[error("store request failed: {0}")]
    Transport(#[from] reqwest::Error),
    /// This attempt no longer holds the record: another attempt took it over after the lock
    /// expired. Stop; the other attempt's result wins.
    #[error("this attempt lost its lock (stale fencing token); another attempt took over")]
    LostLock,
    /// The store answered with an unexpected status.
    #[error("store answered {status}: {body}")]
    Status {
        /// HTTP status.
        status: u16,
        /// Response body (the store's `{"error","message"}`).
        body: String,
    },
    /// An internal header the filter sets is malformed.
    #[error("header {name} is malformed")]
    InvalidHeader {
        /// Header name.
        name: &'static str,
    },
    /// A phase name that is not in the manager's phase list.
    #[error("unknown phase {0:?}")]
    UnknownPhase(String),
}
