//! Request fingerprint: SHA-256 over method, path with query, selected headers and the body.

use sha2::{Digest, Sha256};

/// Hex SHA-256 of the request's parameters.
///
/// Each part is length-prefixed, so no choice of values can make two different requests hash
/// alike by shifting bytes between parts. `headers` must already be the configured subset, with
/// lower-case names; their order does not matter.
pub fn fingerprint(method: &str, path: &str, headers: &[(String, String)], body: &[u8]) -> String {
    let mut hasher = Sha256::new();
    let mut part = |bytes: &[u8]| {
        hasher.update((bytes.len() as u64).to_be_bytes());
        hasher.update(bytes);
    };
    part(method.as_bytes());
    part(path.as_bytes());
    let mut sorted: Vec<&(String, String)> = headers.iter().collect();
    sorted.sort();
    for (name, value) in sorted {
        part(name.as_bytes());
        part(value.as_bytes());
    }
    part(body);
    hex::encode(hasher.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn same_request_same_fingerprint() {
        let a = fingerprint("POST", "/orders", &h(&[("x-a", "1"), ("x-b", "2")]), b"{}");
        let b = fingerprint("POST", "/orders", &h(&[("x-b", "2"), ("x-a", "1")]), b"{}");
        assert_eq!(a, b);
        assert_eq!(a.len(), 64);
    }

    #[test]
    fn any_changed_part_changes_the_fingerprint() {
        let base = fingerprint("POST", "/orders", &[], b"{\"a\":1}");
        assert_ne!(base, fingerprint("PUT", "/orders", &[], b"{\"a\":1}"));
        assert_ne!(base, fingerprint("POST", "/orders?x=1", &[], b"{\"a\":1}"));
        assert_ne!(base, fingerprint("POST", "/orders", &[], b"{\"a\":2}"));
        assert_ne!(
            base,
            fingerprint("POST", "/orders", &h(&[("x-a", "1")]), b"{\"a\":1}")
        );
    }

    #[test]
    fn bytes_cannot_shift_between_parts() {
        assert_ne!(
            fingerprint("POST", "/ab", &[], b"c"),
            fingerprint("POST", "/a", &[], b"bc")
        );
    }
}
