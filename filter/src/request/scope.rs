//! Record scope: isolates callers, so one caller can never receive another caller's stored
//! response for the same key. The first configured source that is present wins; each value is
//! prefixed with its source, so no header value can impersonate another source's scope.

use hmac::digest::KeyInit;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::config::ScopeSource;

/// Longest scope kept in clear; longer values are replaced by their hash.
pub const MAX_CLEAR_SCOPE: usize = 128;

/// Envoy property holding the peer's mTLS URI SAN (the SPIFFE principal in Istio).
pub const PEER_PRINCIPAL_PROPERTY: [&str; 2] = ["connection", "uri_san_peer_certificate"];

fn hashed(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes).get(..16).unwrap_or_default())
}

/// A keyed hash of a credential: without `scope_secret` nobody can test guesses against a stored
/// or forwarded scope (an unkeyed hash of a Basic-auth header is an offline-guessable password).
fn keyed_hash(secret: &[u8], bytes: &[u8]) -> String {
    let mut key = [0u8; 64];
    let digest = Sha256::digest(secret);
    if let Some(first) = key.get_mut(..32) {
        first.copy_from_slice(&digest);
    }
    let mut mac = <Hmac<Sha256> as KeyInit>::new(&key.into());
    mac.update(bytes);
    hex::encode(mac.finalize().into_bytes().get(..16).unwrap_or_default())
}

fn bounded(prefix: &str, value: &str) -> String {
    if value.len() > MAX_CLEAR_SCOPE {
        format!("{prefix}:sha256:{}", hashed(value.as_bytes()))
    } else {
        format!("{prefix}:{value}")
    }
}

/// The scope of a header value's exact bytes: trimmed text in clear (hashed when long), or the
/// hash of the bytes when they are not UTF-8 (so two such values never share a scope).
fn header_scope(bytes: &[u8]) -> Option<String> {
    match std::str::from_utf8(bytes) {
        Ok(text) => Some(text.trim())
            .filter(|v| !v.is_empty())
            .map(|v| bounded("header", v)),
        Err(_) => Some(format!("header:sha256:{}", hashed(bytes.trim_ascii()))),
    }
}

/// Resolve the scope of a request. `header` gives a request header's exact bytes; `property`
/// reads an Envoy property. Returns the empty (shared) scope when no source is present.
pub fn resolve_scope(
    sources: &[ScopeSource],
    jwt_payload_key: &str,
    scope_secret: &[u8],
    header: impl Fn(&str) -> Option<Vec<u8>>,
    property: impl Fn(&[&str]) -> Option<Vec<u8>>,
) -> String {
    for source in sources {
        let scope = match source {
            ScopeSource::Header(name) => header(name).and_then(|v| header_scope(&v)),
            ScopeSource::AuthorizationHash => header("authorization")
                .filter(|v| !String::from_utf8_lossy(v).trim().is_empty())
                .map(|v| format!("auth:{}", keyed_hash(scope_secret, &v))),
            ScopeSource::PeerPrincipal => property(&PEER_PRINCIPAL_PROPERTY)
                .and_then(|b| String::from_utf8(b).ok())
                .filter(|v| !v.is_empty())
                .map(|v| bounded("peer", &v)),
            ScopeSource::JwtClaim(claim) => property(&[
                "metadata",
                "filter_metadata",
                "envoy.filters.http.jwt_authn",
                jwt_payload_key,
                claim,
            ])
            .and_then(|b| String::from_utf8(b).ok())
            .filter(|v| !v.is_empty())
            .map(|v| bounded("jwt", &v)),
        };
        if let Some(scope) = scope {
            return scope;
        }
    }
    String::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<Vec<u8>> {
        move |name| {
            pairs
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.as_bytes().to_vec())
        }
    }

    fn no_properties(_: &[&str]) -> Option<Vec<u8>> {
        None
    }

    #[test]
    fn header_scope_isolates_tenants() {
        let sources = [ScopeSource::Header("x-tenant-id".into())];
        let a = resolve_scope(
            &sources,
            "jwt_payload",
            b"test-secret",
            headers(&[("x-tenant-id", "acme")]),
            no_properties,
        );
        let b = resolve_scope(
            &sources,
            "jwt_payload",
            b"test-secret",
            headers(&[("x-tenant-id", "globex")]),
            no_properties,
        );
        assert_eq!(a, "header:acme");
        assert_ne!(a, b);
    }

    #[test]
    fn header_values_that_are_not_utf8_scope_by_their_bytes() {
        let scope_of = |value: &'static [u8]| {
            resolve_scope(
                &[ScopeSource::Header("x-tenant-id".into())],
                "jwt_payload",
                b"test-secret",
                move |_| Some(value.to_vec()),
                no_properties,
            )
        };
        let a = scope_of(b" acme-\xff ");
        assert!(a.starts_with("header:sha256:"), "{a}");
        assert_eq!(a, scope_of(b"acme-\xff"), "trimmed like text");
        assert_ne!(a, scope_of(b"acme-\xfe"));
        assert_ne!(a, scope_of("acme-\u{fffd}".as_bytes()));
        let auth = |value: &'static [u8]| {
            resolve_scope(
                &[ScopeSource::AuthorizationHash],
                "jwt_payload",
                b"test-secret",
                move |_| Some(value.to_vec()),
                no_properties,
            )
        };
        assert_ne!(auth(b"Bearer \xff"), auth(b"Bearer \xfe"));
        assert_ne!(auth(b"Bearer \xff"), auth("Bearer \u{fffd}".as_bytes()));
    }

    #[test]
    fn authorization_is_hashed_never_kept_in_clear() {
        let scope = resolve_scope(
            &[ScopeSource::AuthorizationHash],
            "jwt_payload",
            b"test-secret",
            headers(&[("authorization", "Bearer secret-token")]),
            no_properties,
        );
        assert!(scope.starts_with("auth:"));
        assert!(!scope.contains("secret"));
    }

    #[test]
    fn first_present_source_wins_and_absent_means_shared() {
        let sources = [
            ScopeSource::PeerPrincipal,
            ScopeSource::Header("x-tenant-id".into()),
        ];
        let peer = |path: &[&str]| {
            (path == PEER_PRINCIPAL_PROPERTY).then(|| b"spiffe://cluster.local/ns/shop/sa/web".to_vec())
        };
        assert_eq!(
            resolve_scope(
                &sources,
                "jwt_payload",
                b"test-secret",
                headers(&[("x-tenant-id", "acme")]),
                peer
            ),
            "peer:spiffe://cluster.local/ns/shop/sa/web"
        );
        assert_eq!(
            resolve_scope(
                &sources,
                "jwt_payload",
                b"test-secret",
                headers(&[("x-tenant-id", "acme")]),
                no_properties
            ),
            "header:acme"
        );
        assert_eq!(
            resolve_scope(
                &sources,
                "jwt_payload",
                b"test-secret",
                headers(&[]),
                no_properties
            ),
            ""
        );
    }

    #[test]
    fn jwt_claim_is_read_from_jwt_authn_metadata() {
        let jwt = |path: &[&str]| {
            (path
                == [
                    "metadata",
                    "filter_metadata",
                    "envoy.filters.http.jwt_authn",
                    "jwt_payload",
                    "sub",
                ])
            .then(|| b"user-42".to_vec())
        };
        let scope = resolve_scope(
            &[ScopeSource::JwtClaim("sub".into())],
            "jwt_payload",
            b"test-secret",
            headers(&[]),
            jwt,
        );
        assert_eq!(scope, "jwt:user-42");
    }

    #[test]
    fn a_header_cannot_forge_another_sources_scope() {
        let forged = resolve_scope(
            &[ScopeSource::Header("x-tenant-id".into())],
            "jwt_payload",
            b"test-secret",
            headers(&[("x-tenant-id", "jwt:user-42")]),
            no_properties,
        );
        assert_ne!(forged, "jwt:user-42");
    }

    #[test]
    fn long_scopes_are_hashed() {
        let long: &'static str = Box::leak("t".repeat(500).into_boxed_str());
        let pairs: &'static [(&'static str, &'static str)] =
            Box::leak(vec![("x-tenant-id", long)].into_boxed_slice());
        let scope = resolve_scope(
            &[ScopeSource::Header("x-tenant-id".into())],
            "jwt_payload",
            b"test-secret",
            headers(pairs),
            no_properties,
        );
        assert!(scope.len() < 100, "{scope}");
    }

    #[test]
    fn credential_scopes_are_keyed_stable_per_secret_and_different_across_secrets() {
        let sources = vec![ScopeSource::AuthorizationHash];
        let auth = headers(&[("authorization", "Basic dXNlcjpwYXNzd29yZA==")]);
        let a = resolve_scope(
            &sources,
            "jwt_payload",
            b"secret-one-16chars",
            &auth,
            no_properties,
        );
        let again = resolve_scope(
            &sources,
            "jwt_payload",
            b"secret-one-16chars",
            &auth,
            no_properties,
        );
        let other = resolve_scope(
            &sources,
            "jwt_payload",
            b"secret-two-16chars",
            &auth,
            no_properties,
        );
        assert_eq!(a, again, "stable for one credential and secret");
        assert_ne!(a, other, "a different secret gives a different scope");
        let unkeyed = hex::encode(
            Sha256::digest(b"Basic dXNlcjpwYXNzd29yZA==")
                .get(..16)
                .unwrap_or_default(),
        );
        assert!(!a.contains(&unkeyed), "not the plain, guessable hash");
    }
}
