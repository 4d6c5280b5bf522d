//! Attempt ids: a random id per acquire, so the proxy can later abandon exactly the acquire it
//! gave up on, and the upstream can prove it holds the lock (checkpoints). It is the holder's
//! secret, so it must be unguessable: without randomness from the host there is no attempt id,
//! and the request is refused rather than tracked under a guessable one.

use std::cell::Cell;
use std::time::Duration;

use sha2::{Digest, Sha256};
use thiserror::Error;

thread_local! {
    static SEQUENCE: Cell<u64> = const { Cell::new(0) };
}

/// The host gave no randomness (WASI `random_get` failed).
#[derive(Debug, Error)]
#[error("no randomness from the host for an attempt id: {0}")]
pub struct NoRandomness(String);

/// A fresh attempt id: 128 random bits from the host (WASI `random_get`), hex-encoded.
pub fn new_attempt_id() -> Result<String, NoRandomness> {
    let mut bytes = [0u8; 16];
    getrandom::getrandom(&mut bytes).map_err(|e| NoRandomness(e.to_string()))?;
    Ok(hex::encode(bytes))
}

/// A name unique to this VM instance (not secret): random when the host gives randomness, else
/// a hash of the time, a per-VM sequence number and `label`.
pub fn unique_name(now: Duration, label: &str) -> String {
    if let Ok(id) = new_attempt_id() {
        return id;
    }
    let sequence = SEQUENCE.with(|s| {
        let next = s.get().wrapping_add(1);
        s.set(next);
        next
    });
    let mut hasher = Sha256::new();
    hasher.update(now.as_nanos().to_be_bytes());
    hasher.update(sequence.to_be_bytes());
    hasher.update(label.as_bytes());
    hex::encode(hasher.finalize().get(..16).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempt_ids_are_unique_and_hex() {
        let (a, b) = (
            new_attempt_id().unwrap_or_default(),
            new_attempt_id().unwrap_or_default(),
        );
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
    }
}
