//! How often the root context's tick fires: rarely while idle, at the retry backoff while background calls wait.
//!
//! Every store call and every first try of a background call leaves on an event (a doorbell
//! ring, a callout reply), never on the tick. The tick is left with what needs a clock: a
//! background call waiting out its backoff, Envoy's log level (read on the tick, not per log
//! line), and a doorbell ring that went unanswered. A fixed 5 ms tick did all of that at a cost:
//! an idle Envoy with this filter woke ~420 times a second per thread and spent ~3.6% of a core
//! (concurrency 1, main thread and one worker) against ~0.2% with a 1 s tick.

use std::time::Duration;

use crate::store::background::FIRST_BACKOFF;

/// Nothing waits for a clock: the log level and a lost ring are picked up within this.
pub const IDLE: Duration = Duration::from_secs(1);

/// A background call waits for its retry: the first backoff, so no retry leaves much later than
/// it is due.
pub const RETRYING: Duration = FIRST_BACKOFF;

/// No doorbell (the shared queue could not be registered): the tick is what sends store calls.
pub const POLLING: Duration = Duration::from_millis(5);

/// The period the root context needs now.
pub fn period(has_doorbell: bool, retries_waiting: bool) -> Duration {
    match (has_doorbell, retries_waiting) {
        (false, _) => POLLING,
        (true, true) => RETRYING,
        (true, false) => IDLE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_ticks_once_a_second_retries_at_their_backoff_and_no_doorbell_polls() {
        assert_eq!(period(true, false), Duration::from_secs(1));
        assert_eq!(period(true, true), Duration::from_millis(50));
        assert_eq!(period(false, false), Duration::from_millis(5));
        assert_eq!(period(false, true), Duration::from_millis(5));
    }
}
