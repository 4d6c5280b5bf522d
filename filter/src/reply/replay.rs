//! Which response headers are stored and replayed, and how a replay is built.

use std::collections::BTreeSet;

use idempotency_wire::{headers::INTERNAL_PREFIX, StoredResponse};

/// Marks every replayed response.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";
/// Marks a replay whose original body was over `max_response_size` and was not stored.
pub const BODY_OMITTED_HEADER: &str = "idempotent-body-omitted";
/// Longest header value stored; longer ones are dropped rather than replayed truncated.
pub const MAX_STORED_HEADER_VALUE: usize = 8 * 1024;
/// Most header bytes stored per response.
pub const MAX_STORED_HEADER_BYTES: usize = 64 * 1024;

/// Hop-by-hop headers (RFC 9110 §7.6.1) and ones the proxy recomputes.
const NEVER_STORED: [&str; 11] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    REPLAYED_HEADER,
];

/// The subset of response headers worth storing: no pseudo-headers, hop-by-hop, internal or
/// denied names, no oversized values, bounded in total.
pub fn storable_headers(
    headers: Vec<(String, String)>,
    denylist: &BTreeSet<String>,
) -> Vec<(String, String)> {
    let mut total = 0usize;
    let mut kept = Vec::new();
    for (name, value) in headers {
        let lower = name.to_ascii_lowercase();
        if lower.starts_with(':')
            || lower.starts_with(INTERNAL_PREFIX)
            || NEVER_STORED.contains(&lower.as_str())
            || lower == BODY_OMITTED_HEADER
            || denylist.contains(&lower)
            || value.len() > MAX_STORED_HEADER_VALUE
        {
            continue;
        }
        total += lower.len() + value.len();
        if total > MAX_STORED_HEADER_BYTES {
            break;
        }
        kept.push((lower, value));
    }
    kept
}

/// Headers of a replayed response: the stored ones plus the replay markers.
pub fn replay_headers(response: &StoredResponse, denylist: &BTreeSet<String>) -> Vec<(String, String)> {
    let mut headers = storable_headers(response.headers.clone(), denylist);
    headers.push((REPLAYED_HEADER.to_owned(), "true".to_owned()));
    if response.body_omitted {
        headers.push((BODY_OMITTED_HEADER.to_owned(), "true".to_owned()));
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn keeps_location_etag_content_type_and_drops_hop_by_hop_and_denied() {
        let deny: BTreeSet<String> = ["date".to_owned(), "set-cookie".to_owned()].into();
        let kept = storable_headers(
            pairs(&[
                (":status", "201"),
                ("content-type", "application/json"),
                ("Location", "/orders/1"),
                ("etag", "\"v1\""),
                ("connection", "close"),
                ("transfer-encoding", "chunked"),
                ("content-length", "10"),
                ("date", "today"),
                ("set-cookie", "session=1"),
                ("x-idempotency-record-id", "r"),
            ]),
            &deny,
        );
        assert_eq!(
            kept,
            pairs(&[
                ("content-type", "application/json"),
                ("location", "/orders/1"),
                ("etag", "\"v1\"")
            ])
        );
    }

    #[test]
    fn oversized_header_values_are_not_stored() {
        let kept = storable_headers(
            pairs(&[("x-big", &"v".repeat(MAX_STORED_HEADER_VALUE + 1))]),
            &BTreeSet::new(),
        );
        assert!(kept.is_empty());
    }

    #[test]
    fn replay_marks_the_response_and_an_omitted_body() {
        let response = StoredResponse {
            status: 200,
            headers: pairs(&[("content-type", "text/plain")]),
            body: Vec::new(),
            body_omitted: true,
            trailers: Vec::new(),
        };
        let headers = replay_headers(&response, &BTreeSet::new());
        assert!(headers.contains(&(REPLAYED_HEADER.to_owned(), "true".to_owned())));
        assert!(headers.contains(&(BODY_OMITTED_HEADER.to_owned(), "true".to_owned())));
    }
}
