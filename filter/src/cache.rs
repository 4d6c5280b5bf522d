//! Proxy-local cache of completed records, so a replay is answered with no callout and no
//! upstream call.
//!
//! Safe because a completed record never changes: the store refuses every write after
//! `complete` (fencing), so the cached response is the stored one until retention ends. Entries
//! are keyed by scope and key (one VM serves one service), carry the record's fingerprint (a
//! different one is a 422, as the store would say), expire after `replay_cache_ttl` or when the
//! record itself expires in the store, whichever comes first, and are bounded by entries and bytes per worker, oldest evicted first. An admin
//! purge in the store is not seen by caches until their entries expire.

use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::time::Duration;

use idempotency_wire::StoredResponse;

/// A cached completed record.
#[derive(Debug, Clone)]
pub struct CachedRecord {
    /// Fingerprint of the request that completed the record.
    pub fingerprint: String,
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

fn entry_size(scope: &str, key: &str, fingerprint: &str, response: &StoredResponse) -> usize {
    let headers: usize = response.headers.iter().map(|(n, v)| n.len() + v.len() + 16).sum();
    scope.len() + key.len() + fingerprint.len() + response.body.len() + headers + 128
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
        fingerprint: &str,
        response: Rc<StoredResponse>,
        expires_at: Duration,
    ) {
        if self.max_entries == 0 {
            return;
        }
        let size = entry_size(scope, key, fingerprint, &response);
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
                fingerprint: fingerprint.to_owned(),
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

    #[test]
    fn returns_live_records_and_forgets_expired_ones() {
        let mut cache = ReplayCache::new(10, 1 << 20);
        cache.insert("", "k1", "f1", response(10), NOW + Duration::from_secs(5));
        assert_eq!(cache.get("", "k1", NOW).unwrap().fingerprint, "f1");
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
            cache.insert("", &format!("k{i}"), "f", response(10), NOW * 2);
        }
        assert_eq!(cache.len(), 3);
        assert!(cache.get("", "k0", NOW).is_none() && cache.get("", "k4", NOW).is_some());
    }

    #[test]
    fn is_bounded_by_bytes_and_skips_huge_records() {
        let mut cache = ReplayCache::new(1000, 10_000);
        cache.insert("", "huge", "f", response(5_000), NOW * 2);
        assert!(cache.get("", "huge", NOW).is_none());
        for i in 0..20 {
            cache.insert("", &format!("k{i}"), "f", response(1_000), NOW * 2);
        }
        assert!(cache.bytes <= 10_000);
        assert!(cache.get("", "k19", NOW).is_some());
    }

    #[test]
    fn disabled_with_zero_entries() {
        let mut cache = ReplayCache::new(0, 1 << 20);
        cache.insert("", "k", "f", response(1), NOW * 2);
        assert!(cache.get("", "k", NOW).is_none());
    }
}
