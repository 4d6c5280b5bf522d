//! Replays for gRPC: a short-lived, signed ticket issued with a completed acquire, and the
//! `/v1/replay` endpoint that serves the stored response (status, headers, messages, trailers)
//! to whoever presents it. Envoy routes a gRPC replay here (the filter sets the ticket header),
//! because its own local replies cannot carry a gRPC message.
//!
//! A ticket is `base64url(service, scope, key, expiry)` + `.` + `base64url(HMAC-SHA256)`, keyed
//! with `--replay-secret` (every replica must share it; it defaults to one derived from the store
//! token). It names exactly one record and expires in seconds, so it reveals nothing a client
//! could not get by retrying with its own key, and no store token travels with the replay.

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

#[derive(Serialize, Deserialize)]
struct Claims {
    s: String,
    c: String,
    k: String,
    e: u64,
}

/// Issues and checks replay tickets.
#[derive(Clone)]
pub struct ReplayTickets {
    /// One SHA-256 block (64 bytes): HMAC's infallible key size.
    key: [u8; 64],
}

impl std::fmt::Debug for ReplayTickets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReplayTickets(..)")
    }
}

impl ReplayTickets {
    /// Tickets signed with a key derived from `secret`.
    pub fn new(secret: &[u8]) -> ReplayTickets {
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
        ReplayTickets { key }
    }

    fn mac(&self, payload: &[u8]) -> Hmac<Sha256> {
        let mut mac = <Hmac<Sha256> as KeyInit>::new(&self.key.into());
        mac.update(payload);
        mac
    }

    /// A ticket for `id`, valid until `now_ms` + [`TICKET_TTL`].
    pub fn issue(&self, id: &RecordId, now_ms: u64) -> String {
        let claims = Claims {
            s: id.service.clone(),
            c: id.scope.clone(),
            k: id.key.clone(),
            e: now_ms.saturating_add(u64::try_from(TICKET_TTL.as_millis()).unwrap_or(u64::MAX)),
        };
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap_or_default());
        let signature = URL_SAFE_NO_PAD.encode(self.mac(payload.as_bytes()).finalize().into_bytes());
        format!("{payload}.{signature}")
    }

    /// The record a ticket names, if it is ours and still valid.
    pub fn verify(&self, ticket: &str, now_ms: u64) -> Result<RecordId, TicketError> {
        let (payload, signature) = ticket.split_once('.').ok_or(TicketError::Invalid)?;
        let signature = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| TicketError::Invalid)?;
        self.mac(payload.as_bytes())
            .verify_slice(&signature)
            .map_err(|_| TicketError::Invalid)?;
        let claims: Claims = URL_SAFE_NO_PAD
            .decode(payload)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .ok_or(TicketError::Invalid)?;
        if claims.e <= now_ms {
            return Err(TicketError::Expired);
        }
        Ok(RecordId {
            service: claims.s,
            scope: claims.c,
            key: claims.k,
        })
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
    let body = Body::new(StreamBody::new(futures::stream::iter(frames)));
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
        let ticket = tickets.issue(&id(), 1_000);
        assert_eq!(tickets.verify(&ticket, 1_500), Ok(id()));
        assert_eq!(tickets.verify(&ticket, 1_000 + 10_000), Err(TicketError::Expired));
    }

    #[test]
    fn forged_or_foreign_tickets_are_refused() {
        let tickets = ReplayTickets::new(b"secret");
        let ticket = tickets.issue(&id(), 1_000);
        assert_eq!(
            ReplayTickets::new(b"other").verify(&ticket, 1_500),
            Err(TicketError::Invalid)
        );
        let (payload, _) = ticket.split_once('.').unwrap();
        let forged_claims = URL_SAFE_NO_PAD.encode(br#"{"s":"orders","c":"other-tenant","k":"k","e":99999}"#);
        assert_eq!(
            tickets.verify(
                &format!("{forged_claims}.{}", ticket.split_once('.').unwrap().1),
                1_500
            ),
            Err(TicketError::Invalid)
        );
        assert_eq!(tickets.verify(payload, 1_500), Err(TicketError::Invalid));
        assert_eq!(tickets.verify("", 1_500), Err(TicketError::Invalid));
    }
}
