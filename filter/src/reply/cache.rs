//! Proxy-local cache of completed records, so a replay is answered with no callout and no
//! upstream call.
//!
//! Safe because a completed record never changes: the store refuses every write after
//! `complete` (fencing), so the cached response is the stored one until retention ends. Entries
//! are keyed by scope and key (one VM serves one service), carry the record's fingerprint (a
//! different one is a 422, as the store would say), expire after `replay_cache_ttl` or when the
//! record itself expires in the store, whichever comes first, and are bounded by entries and bytes per worker, oldest evicted first. An admin
//! purge in the store is not seen by caches until their entries expire.
//!
//! A record completed by a small request also keeps that request's exact parts
//! ([`ExactRequest`]): a retry with the same bytes is recognised by comparing them, with no
//! canonicalising and no SHA-256 (in the VM ~6 µs of a 1 KiB replay's ~10 µs). Same bytes on the
//! same route give the same fingerprint, so this never replays what the fingerprint would refuse;
//! any difference (a reordered JSON body, another header) falls back to the fingerprint.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::time::Duration;

use idempotency_wire::{RecordId, StoredResponse};

/// A completed record to cache once the store has acknowledged its `complete` (never before: a
/// write the store refuses, fenced out by a later holder, must not be replayed from here).
#[derive(Debug)]
pub struct CacheCandidate {
    /// The cache it goes into (the worker's).
    pub cache: Rc<RefCell<ReplayCache>>,
    /// The record.
    pub id: RecordId,
    /// The request that completed it.
    pub request: RequestMatch,
    /// The recorded response.
    pub response: Rc<StoredResponse>,
    /// Host time when the record expires in the store.
    pub record_expires_at: Duration,
}

impl CacheCandidate {
    /// The store acknowledged the record: cache it until the earlier of `now + ttl` and the
    /// record's own expiry.
    pub fn acknowledged(self, now: Duration, ttl: Duration) {
        let expires_at = now.saturating_add(ttl).min(self.record_expires_at);
        self.cache.borrow_mut().insert(
            &self.id.scope,
            &self.id.key,
            self.request,
            self.response,
            expires_at,
        );
    }
}

/// Requests up to this size keep their exact bytes for the cache; larger ones are matched by
/// fingerprint only (comparing is cheap, but each cached byte is memory of every worker).
pub const EXACT_MATCH_MAX_BODY: usize = 16 * 1024;

/// The parts of a request that its fingerprint is computed from, borrowed.
#[derive(Debug, Clone, Copy)]
pub struct RequestParts<'a> {
    /// Request method.
    pub method: &'a str,
    /// Request path with query.
    pub path: &'a str,
    /// The configured fingerprint headers present on the request, in request order.
    pub headers: &'a [(String, Vec<u8>)],
    /// Whether the body is canonicalised as JSON.
    pub json: bool,
    /// JSON pointers removed before hashing (the route's setting).
    pub exclude_fields: &'a [String],
    /// The raw body.
    pub body: &'a [u8],
}

/// The exact parts of a request that completed a record (see the module docs).
#[derive(Debug, PartialEq, Eq)]
pub struct ExactRequest {
    method: String,
    path: String,
    headers: Vec<(String, Vec<u8>)>,
    json: bool,
    exclude_fields: Vec<String>,
    body: Vec<u8>,
}

impl ExactRequest {
    /// A copy of `parts`, if its body is small enough to keep.
    pub fn keep(parts: &RequestParts<'_>) -> Option<Rc<ExactRequest>> {
        (parts.body.len() <= EXACT_MATCH_MAX_BODY).then(|| {
            Rc::new(ExactRequest {
                method: parts.method.to_owned(),
                path: parts.path.to_owned(),
                headers: parts.headers.to_vec(),
                json: parts.json,
                exclude_fields: parts.exclude_fields.to_vec(),
                body: parts.body.to_vec(),
            })
        })
    }

    /// True when `parts` is byte for byte this request (so its fingerprint is this one's).
    pub fn matches(&self, parts: &RequestParts<'_>) -> bool {
        self.body == parts.body
            && self.method == parts.method
            && self.path == parts.path
            && self.json == parts.json
            && self.headers == parts.headers
            && self.exclude_fields == parts.exclude_fields
    }

    fn size(&self) -> usize {
        let headers: usize = self.headers.iter().map(|(n, v)| n.len() + v.len() + 16).sum();
        let excluded: usize = self.exclude_fields.iter().map(|f| f.len() + 16).sum();
        self.method.len() + self.path.len() + headers + excluded + self.body.len() + 64
    }
}

/// How a cached record recognises a retry of the request that completed it.
#[derive(Debug, Clone, Default)]
pub struct RequestMatch {
    /// The request's fingerprint (what the store compares).
    pub fingerprint: String,
    /// Its exact parts, when kept.
    pub exact: Option<Rc<ExactRequest>>,
}

/// A cached completed record.
#[derive(Debug, Clone)]
pub struct CachedRecord {
    /// The request that completed the record.
    pub request: RequestMatch,
    /// The stored response.
    pub response: Rc<StoredResponse>,
    expires_at: Duration,
    generation: u64,
    size: usize,
}

/// Bounded cache of completed records of one VM.
#[derive(Debug)]
pub struct ReplayCache {
    entries: HashMap<(String, String), CachedRecord>,
    order: VecDeque<((String, String), u64)>,
    bytes: usize,
    max_entries: usize,
    max_bytes: usize,
    generation: u64,
}

fn entry_size(scope: &str, key: &str, request: &RequestMatch, response: &StoredResponse) -> usize {
    let headers: usize = response.headers.iter().map(|(n, v)| n.len() + v.len() + 16).sum();
    let exact = request.exact.as_deref().map_or(0, ExactRequest::size);
    scope.len() + key.len() + request.fingerprint.len() + exact + response.body.len() + headers + 128
}

impl ReplayCache {
    /// A cache of at most `max_entries` records and `max_bytes` bytes (0 entries disables it).
    pub fn new(max_entries: usize, max_bytes: usize) -> ReplayCache {
        ReplayCache {
            entries: HashMap::new(),
            order: VecDeque::new(),
            bytes: 0,
            max_entries,
            max_bytes,
            generation: 0,
        }
    }

    /// Number of cached records.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// True when the cache keeps records at all.
    pub fn enabled(&self) -> bool {
        self.max_entries > 0
    }

    /// The live record for `scope`/`key`, if cached.
    pub fn get(&mut self, scope: &str, key: &str, now: Duration) -> Option<CachedRecord> {
        let id = (scope.to_owned(), key.to_owned());
        match self.entries.get(&id) {
            Some(entry) if entry.expires_at > now => Some(entry.clone()),
            Some(_) => {
                self.remove(&id);
                None
            }
            None => None,
        }
    }

    fn remove(&mut self, id: &(String, String)) {
        if let Some(old) = self.entries.remove(id) {
            self.bytes = self.bytes.saturating_sub(old.size);
        }
    }

    /// Remember a completed record until `expires_at`.
    pub fn insert(
        &mut self,
        scope: &str,
        key: &str,
        request: RequestMatch,
        response: Rc<StoredResponse>,
        expires_at: Duration,
    ) {
        if self.max_entries == 0 {
            return;
        }
        let size = entry_size(scope, key, &request, &response);
        // One record may take at most a quarter of the budget, so a few large bodies cannot
        // flush everything else.
        if size > self.max_bytes / 4 {
            return;
        }
        let id = (scope.to_owned(), key.to_owned());
        self.remove(&id);
        self.generation += 1;
        self.entries.insert(
            id.clone(),
            CachedRecord {
                request,
                response,
                expires_at,
                generation: self.generation,
                size,
            },
        );
        self.order.push_back((id, self.generation));
        self.bytes += size;
        while self.entries.len() > self.max_entries || self.bytes > self.max_bytes {
            let Some((oldest, generation)) = self.order.pop_front() else {
                break;
            };
            // Skip order entries of records replaced since.
            if self
                .entries
                .get(&oldest)
                .is_some_and(|e| e.generation == generation)
            {
                self.remove(&oldest);
            }
        }
        // Keep the order queue from growing with stale entries.
        if self.order.len() > 2 * self.max_entries.max(16) {
            let entries = &self.entries;
            self.order
                .retain(|(id, generation)| entries.get(id).is_some_and(|e| e.generation == *generation));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(bytes: usize) -> Rc<StoredResponse> {
        Rc::new(StoredResponse {
            status: 201,
            headers: vec![],
            body: vec![b'x'; bytes],
            body_omitted: false,
            trailers: Vec::new(),
        })
    }

    const NOW: Duration = Duration::from_secs(100);

    fn fp(fingerprint: &str) -> RequestMatch {
        RequestMatch {
            fingerprint: fingerprint.to_owned(),
            exact: None,
        }
    }

    fn parts<'a>(
        headers: &'a [(String, Vec<u8>)],
        exclude: &'a [String],
        body: &'a [u8],
    ) -> RequestParts<'a> {
        RequestParts {
            method: "POST",
            path: "/orders",
            headers,
            json: true,
            exclude_fields: exclude,
            body,
        }
    }

    #[test]
    fn an_exact_request_matches_only_the_same_parts() {
        let tenant = vec![("x-tenant".to_owned(), b"a".to_vec())];
        let kept = ExactRequest::keep(&parts(&tenant, &[], b"{\"a\":1}"));
        assert!(kept.is_some(), "a small request is kept");
        let Some(kept) = kept else { return };
        assert!(kept.matches(&parts(&tenant, &[], b"{\"a\":1}")));
        assert!(!kept.matches(&parts(&tenant, &[], b"{\"a\":2}")), "other body");
        assert!(
            !kept.matches(&parts(&tenant, &[], b"{ \"a\":1}")),
            "same JSON, other bytes: fingerprint decides"
        );
        let other_tenant = vec![("x-tenant".to_owned(), b"b".to_vec())];
        assert!(
            !kept.matches(&parts(&other_tenant, &[], b"{\"a\":1}")),
            "other header"
        );
        assert!(
            !kept.matches(&parts(&tenant, &["/a".to_owned()], b"{\"a\":1}")),
            "other exclusions"
        );
        let other_path = RequestParts {
            path: "/orders?x=1",
            ..parts(&tenant, &[], b"{\"a\":1}")
        };
        assert!(!kept.matches(&other_path), "other path");
        let not_json = RequestParts {
            json: false,
            ..parts(&tenant, &[], b"{\"a\":1}")
        };
        assert!(!kept.matches(&not_json), "other content type");
    }

    #[test]
    fn only_small_requests_are_kept_and_they_count_against_the_budget() {
        let big = vec![b'x'; EXACT_MATCH_MAX_BODY + 1];
        assert!(ExactRequest::keep(&parts(&[], &[], &big)).is_none());
        let body = vec![b'x'; 3_000];
        let request = RequestMatch {
            fingerprint: "f".to_owned(),
            exact: ExactRequest::keep(&parts(&[], &[], &body)),
        };
        let mut cache = ReplayCache::new(1000, 100_000);
        cache.insert("", "k", request, response(10), NOW * 2);
        assert!(cache.get("", "k", NOW).is_some());
        assert!(cache.bytes > 3_000, "the kept body is accounted: {}", cache.bytes);
    }

    #[test]
    fn returns_live_records_and_forgets_expired_ones() {
        let mut cache = ReplayCache::new(10, 1 << 20);
        cache.insert("", "k1", fp("f1"), response(10), NOW + Duration::from_secs(5));
        assert_eq!(
            cache.get("", "k1", NOW).map(|r| r.request.fingerprint),
            Some("f1".to_owned())
        );
        assert!(
            cache.get("other-scope", "k1", NOW).is_none(),
            "scope is part of the identity"
        );
        assert!(cache.get("", "k1", NOW + Duration::from_secs(6)).is_none());
        assert!(cache.is_empty());
    }

    #[test]
    fn is_bounded_by_entries_evicting_the_oldest() {
        let mut cache = ReplayCache::new(3, 1 << 20);
        for i in 0..5 {
            cache.insert("", &format!("k{i}"), fp("f"), response(10), NOW * 2);
        }
        assert_eq!(cache.len(), 3);
        assert!(cache.get("", "k0", NOW).is_none() && cache.get("", "k4", NOW).is_some());
    }

    #[test]
    fn is_bounded_by_bytes_and_skips_huge_records() {
        let mut cache = ReplayCache::new(1000, 10_000);
        cache.insert("", "huge", fp("f"), response(5_000), NOW * 2);
        assert!(cache.get("", "huge", NOW).is_none());
        for i in 0..20 {
            cache.insert("", &format!("k{i}"), fp("f"), response(1_000), NOW * 2);
        }
        assert!(cache.bytes <= 10_000);
        assert!(cache.get("", "k19", NOW).is_some());
    }

    #[test]
    fn disabled_with_zero_entries() {
        let mut cache = ReplayCache::new(0, 1 << 20);
        cache.insert("", "k", fp("f"), response(1), NOW * 2);
        assert!(cache.get("", "k", NOW).is_none());
    }
}
