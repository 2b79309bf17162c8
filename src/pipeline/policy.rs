//! When to flush: a pure policy, no clocks and no I/O (the caller passes times in).
//!
//! Acknowledgements wait for the commit, and a broker sends only so many unacknowledged
//! messages (its in-flight window). So a flush starts when the pending messages reach half the
//! window, when their payload bytes reach the limit, or when the oldest has waited `max_age` —
//! whichever comes first. With MQTT 3.1.1 the window is the broker's secret; if it is smaller
//! than we assumed, the broker simply stops sending and only the age limit would flush, a few
//! messages per interval. [`FlushPolicy::on_age_flush`] recognises that pattern (two age
//! flushes in a row with the same count, each after the arrivals had stopped) and lowers the
//! threshold to half the window it saw.

use std::time::Duration;

/// Why a flush starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushTrigger {
    /// Pending messages reached the threshold.
    Messages,
    /// Pending payload bytes reached the limit.
    Bytes,
    /// The oldest pending message reached the age limit.
    Age,
    /// Shutdown.
    Shutdown,
    /// A Kinesis shard was read to its end (split or merged): committing it lets its children
    /// be read.
    ShardEnd,
}

impl FlushTrigger {
    /// Label for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            FlushTrigger::Messages => "messages",
            FlushTrigger::Bytes => "bytes",
            FlushTrigger::Age => "age",
            FlushTrigger::Shutdown => "shutdown",
            FlushTrigger::ShardEnd => "shard_end",
        }
    }
}

/// The flush decision.
#[derive(Debug, Clone)]
pub struct FlushPolicy {
    threshold: usize,
    max_bytes: usize,
    max_age: Duration,
    /// Pending count at the previous age-triggered flush that looked stalled.
    last_stall: Option<usize>,
    /// The window detected to be pinned, once.
    pinned: Option<usize>,
}

impl FlushPolicy {
    /// A policy flushing at `max_messages` messages, `max_bytes` bytes or `max_age`.
    pub fn new(max_messages: usize, max_bytes: usize, max_age: Duration) -> Self {
        Self {
            threshold: max_messages.max(1),
            max_bytes: max_bytes.max(1),
            max_age,
            last_stall: None,
            pinned: None,
        }
    }

    /// The message threshold now in force.
    pub fn threshold(&self) -> usize {
        self.threshold
    }

    /// The age limit.
    pub fn max_age(&self) -> Duration {
        self.max_age
    }

    /// The broker window detected as pinned, if any.
    pub fn pinned_window(&self) -> Option<usize> {
        self.pinned
    }

    /// Whether the pending messages must be flushed now (age is handled by the caller's timer).
    pub fn check(&self, pending_messages: usize, pending_bytes: usize) -> Option<FlushTrigger> {
        if pending_messages >= self.threshold {
            Some(FlushTrigger::Messages)
        } else if pending_bytes >= self.max_bytes {
            Some(FlushTrigger::Bytes)
        } else {
            None
        }
    }

    /// Records an age-triggered flush of `pending` messages, the last of which arrived
    /// `since_last_arrival` ago. Returns the detected window when this flush shows the broker
    /// has pinned it (the caller warns once).
    pub fn on_age_flush(&mut self, pending: usize, since_last_arrival: Duration) -> Option<usize> {
        let stalled = pending > 0
            && pending < self.threshold
            && since_last_arrival >= (self.max_age / 4).max(Duration::from_millis(50));
        if !stalled {
            self.last_stall = None;
            return None;
        }
        if self.last_stall == Some(pending) && self.pinned.is_none() {
            self.pinned = Some(pending);
            self.threshold = (pending / 2).max(1);
            return Some(pending);
        }
        self.last_stall = Some(pending);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flushes_on_messages_or_bytes_whichever_comes_first() {
        let p = FlushPolicy::new(100, 1000, Duration::from_secs(1));
        assert_eq!(p.check(99, 999), None);
        assert_eq!(p.check(100, 0), Some(FlushTrigger::Messages));
        assert_eq!(p.check(1, 1000), Some(FlushTrigger::Bytes));
    }

    #[test]
    fn detects_a_pinned_window_after_two_identical_stalls() {
        let mut p = FlushPolicy::new(10_000, usize::MAX, Duration::from_secs(1));
        let quiet = Duration::from_millis(900);
        assert_eq!(p.on_age_flush(20, quiet), None);
        assert_eq!(p.on_age_flush(20, quiet), Some(20));
        assert_eq!(p.threshold(), 10);
        assert_eq!(p.pinned_window(), Some(20));
        // Reported once only.
        assert_eq!(p.on_age_flush(20, quiet), None);
    }

    #[test]
    fn steady_thin_traffic_is_not_mistaken_for_a_pinned_window() {
        let mut p = FlushPolicy::new(10_000, usize::MAX, Duration::from_secs(1));
        // Messages keep arriving until the flush: not a stall.
        for _ in 0..5 {
            assert_eq!(p.on_age_flush(100, Duration::from_millis(10)), None);
        }
        // Different counts after quiet periods: not a pinned window either.
        assert_eq!(p.on_age_flush(7, Duration::from_millis(600)), None);
        assert_eq!(p.on_age_flush(9, Duration::from_millis(600)), None);
        assert_eq!(p.threshold(), 10_000);
    }
}
