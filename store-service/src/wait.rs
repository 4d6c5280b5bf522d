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
            // Every reference is taken (`enter`) and let go (here) under the lock, so the count
            // read under it is exact: this slot's reference goes first, then the entry goes if
            // the map's is the last (two slots dropping at once each saw the other's otherwise).
            drop(std::mem::replace(&mut self.notify, Arc::new(Notify::new())));
            if keys.get(&self.key).is_some_and(|n| Arc::strong_count(n) == 1) {
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

    /// Wake every acquire waiting on `id` (after a complete, release or abandon). The wake-up is
    /// sent under the map's lock, holding no reference of its own afterwards: a reference kept
    /// past the lock made a slot dropped meanwhile think another waiter remained, and leave its
    /// key's entry in the map for ever.
    pub fn wake(&self, id: &RecordId) {
        if let Ok(keys) = self.keys.lock() {
            if let Some(notify) = keys.get(&crate::record::identity_key(id)) {
                notify.notify_waiters();
            }
        }
    }

    /// Keys with a waiter entry right now.
    pub fn keys(&self) -> usize {
        self.keys.lock().map(|keys| keys.len()).unwrap_or_default()
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
    fn racing_wake_ups_leave_no_entry_behind() {
        let waiters = Arc::new(Waiters::new(64, Duration::from_millis(50)));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let waker = {
            let (waiters, stop) = (waiters.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    waiters.wake(&id("k"));
                }
            })
        };
        let entrants: Vec<_> = (0..2)
            .map(|_| {
                let waiters = waiters.clone();
                std::thread::spawn(move || {
                    for _ in 0..20_000 {
                        drop(waiters.enter(&id("k")));
                    }
                })
            })
            .collect();
        for entrant in entrants {
            entrant.join().unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        waker.join().unwrap();
        assert_eq!(waiters.active(), 0);
        assert_eq!(waiters.keys(), 0, "an entry outlived its last waiter");
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
