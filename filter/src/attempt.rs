//! Attempt ids: a random id per acquire, so the proxy can later abandon exactly the acquire it
//! gave up on (the store releases a lock only if that attempt holds it).

use std::cell::Cell;
use std::time::Duration;

use sha2::{Digest, Sha256};

thread_local! {
    static SEQUENCE: Cell<u64> = const { Cell::new(0) };
}

/// A fresh attempt id: 128 random bits from the host (WASI `random_get`), hex-encoded. Should the
/// host refuse randomness, a hash of the time, a per-VM sequence number and the key is used: still
/// unique per attempt, which is all abandon needs.
pub fn new_attempt_id(now: Duration, key: &str) -> String {
    let mut bytes = [0u8; 16];
    if getrandom::getrandom(&mut bytes).is_ok() {
        return hex::encode(bytes);
    }
    let sequence = SEQUENCE.with(|s| {
        let next = s.get().wrapping_add(1);
        s.set(next);
        next
    });
    let mut hasher = Sha256::new();
    hasher.update(now.as_nanos().to_be_bytes());
    hasher.update(sequence.to_be_bytes());
    hasher.update(key.as_bytes());
    hex::encode(hasher.finalize().get(..16).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempt_ids_are_unique_and_hex() {
        let a = new_attempt_id(Duration::from_secs(1), "k");
        let b = new_attempt_id(Duration::from_secs(1), "k");
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
    }
}
