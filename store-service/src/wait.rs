//! Holding an acquire while its record is in progress (`in_progress_wait`): per-key wake-ups,
//! a bound on concurrent waiters, and polling for changes made by other store replicas.
//!
//! A waiting acquire re-runs the ordinary acquire rule whenever something may have changed: this
//! replica completed, released or abandoned the record (a per-key [`Notify`]), the poll interval
//! passed (another replica over the same MongoDB may have changed it), or the lock's expiry came.
//! So a wait ends with exactly the answer an immediate retry would get at that moment: the
//! replay, the lock (after a release or expiry), a mismatch, or — when the wait runs out — the
//! in-progress answer.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idempotency_wire::RecordId;
use tokio::sync::Notify;

/// Per-key wake-ups and the waiter bound, shared by every handler.
#[derive(Debug)]
pub struct Waiters {
    keys: Mutex<HashMap<String, Arc<Notify>>>,
    active: AtomicUsize,
    max: usize,
    poll: Duration,
}

/// A waiter's slot; frees itself (and its key's entry when it was the last) on drop.
#[derive(Debug)]
pub struct WaitSlot<'a> {
    waiters: &'a Waiters,
    key: String,
    notify: Arc<Notify>,
}

impl WaitSlot<'_> {
    /// Woken when this replica changes the record.
    pub fn notify(&self) -> &Notify {
        &self.notify
    }

    /// How long to sleep before looking again: the poll interval, the lock's expiry or the end
    /// of the wait, whichever comes first.
    pub fn next_look(&self, lock_remaining: Duration, wait_left: Duration) -> Duration {
        self.waiters
            .poll
            .min(lock_remaining.saturating_add(Duration::from_millis(1)))
            .min(wait_left)
    }
}

impl Drop for WaitSlot<'_> {
    fn drop(&mut self) {
        self.waiters.active.fetch_sub(1, Ordering::AcqRel);
        if let Ok(mut keys) = self.waiters.keys.lock() {
            // The map and this slot hold the only references: nobody else waits on this key.
            if Arc::strong_count(&self.notify) == 2 {
                keys.remove(&self.key);
            }
        }
    }
}

impl Waiters {
    /// At most `max` acquires wait at once; each looks again at least every `poll`.
    pub fn new(max: usize, poll: Duration) -> Waiters {
        Waiters {
            keys: Mutex::new(HashMap::new()),
            active: AtomicUsize::new(0),
            max,
            poll,
        }
    }

    /// A slot to wait on `id`, or `None` when `max` acquires already wait (answer at once).
    pub fn enter(&self, id: &RecordId) -> Option<WaitSlot<'_>> {
        let taken = self
            .active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            });
        if taken.is_err() {
            return None;
        }
        let key = crate::record::identity_key(id);
        let notify = match self.keys.lock() {
            Ok(mut keys) => keys.entry(key.clone()).or_default().clone(),
            Err(_) => Arc::new(Notify::new()),
        };
        Some(WaitSlot {
            waiters: self,
            key,
            notify,
        })
    }

    /// Wake every acquire waiting on `id` (after a complete, release or abandon).
    pub fn wake(&self, id: &RecordId) {
        let notify = self
            .keys
            .lock()
            .ok()
            .and_then(|keys| keys.get(&crate::record::identity_key(id)).cloned());
        if let Some(notify) = notify {
            notify.notify_waiters();
        }
    }

    /// Acquires waiting right now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(key: &str) -> RecordId {
        RecordId {
            service: "s".into(),
            scope: String::new(),
            key: key.into(),
        }
    }

    #[test]
    fn waiters_are_bounded_and_slots_free_themselves() {
        let waiters = Waiters::new(2, Duration::from_millis(50));
        let a = waiters.enter(&id("a")).unwrap();
        let b = waiters.enter(&id("a")).unwrap();
        assert!(waiters.enter(&id("b")).is_none());
        drop(a);
        assert_eq!(waiters.active(), 1);
        drop(b);
        assert_eq!(waiters.active(), 0);
        assert!(waiters.keys.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_wake_reaches_a_waiter_registered_before_it() {
        let waiters = Arc::new(Waiters::new(8, Duration::from_secs(60)));
        let slot = waiters.enter(&id("k")).unwrap();
        let notified = slot.notify().notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        waiters.wake(&id("k"));
        tokio::time::timeout(Duration::from_secs(1), notified)
            .await
            .unwrap();
    }

    #[test]
    fn next_look_is_the_earliest_of_poll_expiry_and_wait_end() {
        let waiters = Waiters::new(1, Duration::from_millis(100));
        let slot = waiters.enter(&id("k")).unwrap();
        assert_eq!(
            slot.next_look(Duration::from_secs(9), Duration::from_secs(9)),
            Duration::from_millis(100)
        );
        assert_eq!(
            slot.next_look(Duration::from_millis(10), Duration::from_secs(9)),
            Duration::from_millis(11)
        );
        assert_eq!(
            slot.next_look(Duration::from_secs(9), Duration::from_millis(5)),
            Duration::from_millis(5)
        );
    }
}
