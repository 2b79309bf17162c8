//! The de-duplication gate: has this device's `seq` been seen before?
//!
//! MQTT QoS 1 redelivers what was not acknowledged, devices retry, and Kinesis consumers replay
//! after a crash, so the same reading arrives more than once. Each device keeps the highest
//! `seq` that passed the gate and a bitmap of the [`WINDOW`] sequence numbers below it, so
//! readings that arrive out of order within that window are still told apart from repeats.
//!
//! A `seq` more than [`WINDOW`] below the highest one counts as a duplicate: the gate cannot
//! tell whether it passed before, and promise 3 (no duplicates in the lake) wins over keeping a
//! reading that arrives more than 128 readings late. After a restart, [`SeqWindow::restored`]
//! treats every `seq` up to the committed one as seen, for the same reason.

/// How many sequence numbers below the highest one the gate remembers individually.
pub(crate) const WINDOW: u64 = 128;

/// The gate state of one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SeqWindow {
    /// The highest `seq` that passed the gate.
    high: u64,
    /// Bit `i` set: `high - 1 - i` passed the gate.
    below: u128,
}

impl SeqWindow {
    /// The state after a device's first reading.
    pub(crate) fn first(seq: u64) -> Self {
        Self {
            high: seq,
            below: 0,
        }
    }

    /// The state restored from a commit: `seq` and everything below it were seen.
    pub(crate) fn restored(seq: u64) -> Self {
        Self {
            high: seq,
            below: u128::MAX,
        }
    }

    /// The highest `seq` that passed the gate.
    pub(crate) fn high(&self) -> u64 {
        self.high
    }

    /// Lets `seq` through if it was not seen before (and marks it seen); `false` for a
    /// duplicate, or for a `seq` older than the window.
    pub(crate) fn admit(&mut self, seq: u64) -> bool {
        if seq > self.high {
            let shift = seq - self.high;
            self.below = if shift > WINDOW {
                0
            } else {
                // `shift` is 1..=128 here; shifting a u128 by 128 yields 0.
                let moved = self.below.checked_shl(shift as u32).unwrap_or(0);
                moved | (1 << (shift - 1))
            };
            self.high = seq;
            true
        } else if seq == self.high {
            false
        } else {
            let distance = self.high - seq;
            if distance > WINDOW {
                return false;
            }
            let bit = 1u128 << (distance - 1);
            let fresh = self.below & bit == 0;
            self.below |= bit;
            fresh
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_each_seq_once_in_order() {
        let mut w = SeqWindow::first(10);
        assert!(!w.admit(10));
        assert!(w.admit(11));
        assert!(!w.admit(11));
        assert!(!w.admit(10));
        assert_eq!(w.high(), 11);
    }

    #[test]
    fn admits_out_of_order_readings_inside_the_window_once() {
        let mut w = SeqWindow::first(100);
        assert!(w.admit(103));
        assert!(w.admit(101));
        assert!(w.admit(102));
        assert!(!w.admit(101));
        assert!(!w.admit(102));
        assert!(!w.admit(103));
        assert!(w.admit(99), "below the first seq, but inside the window");
        assert!(!w.admit(99));
    }

    #[test]
    fn treats_readings_older_than_the_window_as_duplicates() {
        let mut w = SeqWindow::first(1000);
        assert!(w.admit(1000 - WINDOW));
        assert!(!w.admit(1000 - WINDOW - 1));
    }

    #[test]
    fn remembers_seqs_across_a_jump_of_exactly_the_window() {
        let mut w = SeqWindow::first(0);
        assert!(w.admit(WINDOW));
        assert!(!w.admit(0), "0 is exactly WINDOW below and was seen");
        assert!(w.admit(1));
        let mut w = SeqWindow::first(0);
        assert!(w.admit(WINDOW + 1));
        assert!(!w.admit(0), "older than the window");
        assert!(w.admit(1));
    }

    #[test]
    fn forgets_nothing_it_should_not_across_large_jumps() {
        let mut w = SeqWindow::first(5);
        assert!(w.admit(u64::MAX));
        assert!(!w.admit(u64::MAX));
        assert!(w.admit(u64::MAX - 1));
        assert!(!w.admit(5));
    }

    #[test]
    fn restored_state_treats_everything_up_to_the_checkpoint_as_seen() {
        let mut w = SeqWindow::restored(50);
        for seq in [0, 1, 49, 50] {
            assert!(!w.admit(seq), "{seq}");
        }
        assert!(w.admit(52));
        assert!(w.admit(51));
        assert!(!w.admit(51));
    }
}
