//! Replays for gRPC: a short-lived, signed ticket issued with a completed acquire, and the
//! `/v1/replay` endpoint that serves the stored response (status, headers, messages, trailers)
//! to whoever presents it. Envoy routes a gRPC replay here (the filter sets the ticket header),
//! because its own local replies cannot carry a gRPC message.
//!
//! A ticket is `base64url(claims)` + `.` + `base64url(HMAC-SHA256)`. The claims name exactly one
//! record — its identity (service, scope, key), its record id and its fingerprint — and expire in
//! seconds: a record purged and created again (a new record id, perhaps other parameters) inside a
//! ticket's life is not served to it. It reveals nothing a client could not get by retrying with
//! its own key, and no store token travels with the replay.
//!
//! The signing keys come from `--replay-secret` or `--replay-secret-file` (one secret per line,
//! reloaded when the file changes: the first line signs, every line verifies, so replicas can
//! rotate it without refusing each other's tickets). Every replica must share them.

use std::sync::RwLock;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::Bytes;
use hmac::digest::KeyInit;
use hmac::{Hmac, Mac};
use http_body_util::StreamBody;
use hyper::body::Frame;
use idempotency_wire::{RecordId, StoredResponse};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

/// How long a ticket is valid: the proxy uses it at once.
pub const TICKET_TTL: Duration = Duration::from_secs(10);

/// Shortest replay secret accepted.
pub const MIN_SECRET_LENGTH: usize = 16;

/// Why a ticket was not accepted.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum TicketError {
    /// Not a ticket of ours (malformed or wrong signature).
    #[error("invalid replay ticket")]
    Invalid,
    /// Ours, but too old.
    #[error("replay ticket expired")]
    Expired,
}

/// Why replay secrets were refused.
#[derive(Debug, Error)]
pub enum SecretError {
    /// The file could not be read.
    #[error("cannot read replay secret file {path}: {error}")]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// No secret, or one too short.
    #[error("replay secrets: {0}")]
    Invalid(String),
}

/// The record a ticket was issued for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TicketClaims {
    /// Service.
    #[serde(rename = "s")]
    pub service: String,
    /// Scope.
    #[serde(rename = "c")]
    pub scope: String,
    /// Key.
    #[serde(rename = "k")]
    pub key: String,
    /// Record id: a record created again after a purge has another.
    #[serde(rename = "r")]
    pub record_id: String,
    /// Fingerprint of the request the ticket answers.
    #[serde(rename = "f")]
    pub fingerprint: String,
    /// Expiry, Unix ms.
    #[serde(rename = "e")]
    pub expires_ms: u64,
}

impl TicketClaims {
    /// The record identity.
    pub fn id(&self) -> RecordId {
        RecordId {
            service: self.service.clone(),
            scope: self.scope.clone(),
            key: self.key.clone(),
        }
    }
}

/// One SHA-256 block (64 bytes): HMAC's infallible key size.
type TicketKey = [u8; 64];

fn derive_key(secret: &[u8]) -> TicketKey {
    let half = |label: &[u8]| -> [u8; 32] {
        let mut hasher = Sha256::new();
        hasher.update(label);
        hasher.update(secret);
        hasher.finalize().into()
    };
    let mut key = [0u8; 64];
    let (first, second) = key.split_at_mut(32);
    first.copy_from_slice(&half(b"idempotency-replay-ticket:1:"));
    second.copy_from_slice(&half(b"idempotency-replay-ticket:2:"));
    key
}

/// Issues and checks replay tickets.
pub struct ReplayTickets {
    /// The first key signs; every key verifies (rotation).
    keys: RwLock<Vec<TicketKey>>,
}

impl std::fmt::Debug for ReplayTickets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReplayTickets(..)")
    }
}

/// The secrets of a replay secret file: one per non-empty line (trimmed), `#` lines ignored.
pub fn parse_secrets(text: &str) -> Result<Vec<Vec<u8>>, SecretError> {
    let secrets: Vec<Vec<u8>> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.as_bytes().to_vec())
        .collect();
    if secrets.is_empty() {
        return Err(SecretError::Invalid("the file holds no secret".into()));
    }
    if let Some(line) = secrets.iter().position(|s| s.len() < MIN_SECRET_LENGTH) {
        return Err(SecretError::Invalid(format!(
            "secret {} is shorter than {MIN_SECRET_LENGTH} characters",
            line + 1
        )));
    }
    Ok(secrets)
}

impl ReplayTickets {
    /// Tickets signed with a key derived from `secret`.
    pub fn new(secret: &[u8]) -> ReplayTickets {
        ReplayTickets {
            keys: RwLock::new(vec![derive_key(secret)]),
        }
    }

    /// Tickets signed with the first of `secrets`, verified with any of them.
    pub fn with_secrets(secrets: &[Vec<u8>]) -> ReplayTickets {
        let tickets = ReplayTickets::new(b"");
        tickets.replace(secrets);
        tickets
    }

    /// Put `secrets` in force (a reload). Empty: kept as they are.
    pub fn replace(&self, secrets: &[Vec<u8>]) {
        if secrets.is_empty() {
            return;
        }
        let keys = secrets.iter().map(|s| derive_key(s)).collect();
        if let Ok(mut current) = self.keys.write() {
            *current = keys;
        }
    }

    fn mac(key: &TicketKey, payload: &[u8]) -> Hmac<Sha256> {
        let mut mac = <Hmac<Sha256> as KeyInit>::new(key.into());
        mac.update(payload);
        mac
    }

    /// A ticket for record `record_id` of `id`, answering a request of `fingerprint`, valid
    /// until `now_ms` + [`TICKET_TTL`].
    pub fn issue(&self, id: &RecordId, record_id: &str, fingerprint: &str, now_ms: u64) -> String {
        let claims = TicketClaims {
            service: id.service.clone(),
            scope: id.scope.clone(),
            key: id.key.clone(),
            record_id: record_id.to_owned(),
            fingerprint: fingerprint.to_owned(),
            expires_ms: now_ms.saturating_add(u64::try_from(TICKET_TTL.as_millis()).unwrap_or(u64::MAX)),
        };
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap_or_default());
        let signature = self
            .keys
            .read()
            .ok()
            .and_then(|keys| {
                keys.first()
                    .map(|key| Self::mac(key, payload.as_bytes()).finalize().into_bytes())
            })
            .map(|mac| URL_SAFE_NO_PAD.encode(mac))
            .unwrap_or_default();
        format!("{payload}.{signature}")
    }

    /// The claims of a ticket, if it is ours (signed by any key in force) and still valid.
    pub fn verify(&self, ticket: &str, now_ms: u64) -> Result<TicketClaims, TicketError> {
        let (payload, signature) = ticket.split_once('.').ok_or(TicketError::Invalid)?;
        let signature = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| TicketError::Invalid)?;
        let signed = self.keys.read().map_err(|_| TicketError::Invalid)?.iter().fold(
            false,
            // Every key is tried (no early exit): the time taken says nothing about which matched.
            |found, key| {
                Self::mac(key, payload.as_bytes())
                    .verify_slice(&signature)
                    .is_ok()
                    | found
            },
        );
        if !signed {
            return Err(TicketError::Invalid);
        }
        let claims: TicketClaims = URL_SAFE_NO_PAD
            .decode(payload)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .ok_or(TicketError::Invalid)?;
        if claims.expires_ms <= now_ms {
            return Err(TicketError::Expired);
        }
        Ok(claims)
    }
}

/// A gRPC trailers-only answer for a replay that cannot be served; the client's retry acquires
/// again (and gets a fresh ticket, or runs if the record is gone).
pub fn grpc_unavailable(message: &str) -> Response {
    let mut headers = HeaderMap::new();
    headers.insert("content-type", HeaderValue::from_static("application/grpc"));
    headers.insert("grpc-status", HeaderValue::from_static("14"));
    if let Ok(value) = HeaderValue::from_str(message) {
        headers.insert("grpc-message", value);
    }
    (StatusCode::OK, headers).into_response()
}

/// The stored response as an HTTP response: status, headers (marked replayed), body, trailers.
pub fn stored_response(stored: StoredResponse) -> Response {
    let mut headers = HeaderMap::new();
    for (name, value) in &stored.headers {
        if let (Ok(name), Ok(value)) = (HeaderName::try_from(name.as_str()), HeaderValue::from_str(value)) {
            headers.append(name, value);
        }
    }
    headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
    let mut trailers = HeaderMap::new();
    for (name, value) in &stored.trailers {
        if let (Ok(name), Ok(value)) = (HeaderName::try_from(name.as_str()), HeaderValue::from_str(value)) {
            trailers.append(name, value);
        }
    }
    let mut frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = Vec::new();
    if !stored.body.is_empty() {
        frames.push(Ok(Frame::data(Bytes::from(stored.body))));
    }
    if !trailers.is_empty() {
        frames.push(Ok(Frame::trailers(trailers)));
    }
    // Nothing after the headers (a gRPC trailers-only answer, whose status is in them): an empty
    // body that says so, so the headers go with END_STREAM. A stream of no frames would send the
    // headers open and an empty DATA frame to end it, which strict gRPC clients (C-core) reject.
    let body = if frames.is_empty() {
        Body::empty()
    } else {
        Body::new(StreamBody::new(futures::stream::iter(frames)))
    };
    let status = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK);
    let mut response = (status, headers).into_response();
    *response.body_mut() = body;
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> RecordId {
        RecordId {
            service: "orders".into(),
            scope: "s".into(),
            key: "k".into(),
        }
    }

    #[test]
    fn a_ticket_names_its_record_until_it_expires() {
        let tickets = ReplayTickets::new(b"secret");
        let ticket = tickets.issue(&id(), "rec-1", "fp", 1_000);
        let claims = tickets.verify(&ticket, 1_500).unwrap();
        assert_eq!(claims.id(), id());
        assert_eq!(
            (claims.record_id.as_str(), claims.fingerprint.as_str()),
            ("rec-1", "fp")
        );
        assert_eq!(tickets.verify(&ticket, 1_000 + 10_000), Err(TicketError::Expired));
    }

    #[test]
    fn forged_or_foreign_tickets_are_refused() {
        let tickets = ReplayTickets::new(b"secret");
        let ticket = tickets.issue(&id(), "rec-1", "fp", 1_000);
        assert_eq!(
            ReplayTickets::new(b"other").verify(&ticket, 1_500),
            Err(TicketError::Invalid)
        );
        let (payload, signature) = ticket.split_once('.').unwrap();
        let forged_claims = URL_SAFE_NO_PAD
            .encode(br#"{"s":"orders","c":"other-tenant","k":"k","r":"rec-1","f":"fp","e":99999}"#);
        assert_eq!(
            tickets.verify(&format!("{forged_claims}.{signature}"), 1_500),
            Err(TicketError::Invalid)
        );
        assert_eq!(tickets.verify(payload, 1_500), Err(TicketError::Invalid));
        assert_eq!(tickets.verify("", 1_500), Err(TicketError::Invalid));
    }

    #[test]
    fn a_rotation_keeps_the_previous_secret_verifying_until_it_is_removed() {
        let old = b"old-secret-0000000".to_vec();
        let new = b"new-secret-0000000".to_vec();
        let tickets = ReplayTickets::with_secrets(std::slice::from_ref(&old));
        let issued_before = tickets.issue(&id(), "r", "f", 1_000);
        tickets.replace(&[new.clone(), old]);
        let issued_after = tickets.issue(&id(), "r", "f", 1_000);
        assert!(
            tickets.verify(&issued_before, 1_500).is_ok(),
            "old tickets still verify"
        );
        assert!(
            ReplayTickets::with_secrets(std::slice::from_ref(&new))
                .verify(&issued_after, 1_500)
                .is_ok(),
            "the new secret signs"
        );
        tickets.replace(&[new]);
        assert_eq!(tickets.verify(&issued_before, 1_500), Err(TicketError::Invalid));
    }

    #[test]
    fn secret_files_need_long_enough_secrets() {
        assert!(parse_secrets("# only a comment\n\n").is_err());
        assert!(parse_secrets("short\n")
            .unwrap_err()
            .to_string()
            .contains("secret 1"));
        assert_eq!(
            parse_secrets("# rotated on 1 Dec\nnew-secret-0000000\n  old-secret-0000000  \n")
                .unwrap()
                .len(),
            2
        );
    }

    #[test]
    fn a_trailers_only_answer_ends_with_its_headers() {
        use axum::body::HttpBody as _;
        let stored = StoredResponse {
            status: 200,
            headers: vec![
                ("content-type".into(), "application/grpc".into()),
                ("grpc-status".into(), "3".into()),
                ("grpc-message".into(), "bad sku".into()),
            ],
            body: Vec::new(),
            body_omitted: false,
            trailers: Vec::new(),
        };
        let response = stored_response(stored);
        assert!(
            response.body().is_end_stream(),
            "HEADERS with END_STREAM, no DATA frame"
        );
        assert_eq!(response.headers()["grpc-status"], "3");
        let with_messages = StoredResponse {
            status: 200,
            headers: Vec::new(),
            body: vec![0, 0, 0, 0, 0],
            body_omitted: false,
            trailers: vec![("grpc-status".into(), "0".into())],
        };
        assert!(!stored_response(with_messages).body().is_end_stream());
    }
}
