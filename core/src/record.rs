//! What flows between stages: raw payloads in, counts and device checkpoints out.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Which kind of source a record came from; stored in the `source` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// An MQTT subscription.
    Mqtt,
    /// An Amazon Kinesis stream (long-lived consumer or Lambda event).
    Kinesis,
}

impl SourceKind {
    /// The value written to the `source` column.
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Mqtt => "mqtt",
            SourceKind::Kinesis => "kinesis",
        }
    }
}

/// One message as a source received it, before any parsing.
///
/// The payload is shared (`Bytes`), never copied on its way to the transform.
#[derive(Debug, Clone)]
pub struct RawRecord {
    /// The message body exactly as received.
    pub payload: Bytes,
    /// The device id the transport claims for this message (the last level of an MQTT topic
    /// `telemetry/{site}/{device_type}/{device_id}`, a Kinesis partition key), if it carries one.
    /// A payload whose `device_id` differs is rejected with `topic_mismatch`.
    pub claimed_device_id: Option<Box<str>>,
    /// Where the record came from: the MQTT topic, or `shard/sequence` for Kinesis.
    pub position: Box<str>,
    /// When the source received it, microseconds since the Unix epoch (UTC).
    pub received_at_us: i64,
    /// Set when the source already knows the record is bad (a corrupt KPL aggregate): the
    /// transform writes it to the dead-letter table with this reason and detail, unparsed.
    pub rejected: Option<Box<(crate::Reason, String)>>,
}

/// The committed state of one device, recorded in every commit that touches the device and
/// restored at start-up so that redelivered readings are recognised as duplicates.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DeviceCheckpoint {
    /// The highest `seq` that passed the de-duplication gate for the device so far (including
    /// readings dead-lettered after the gate, so a redelivered reject is a duplicate too).
    pub seq: u64,
    /// The latest accepted value of the device type's first never-decreasing metric
    /// (`energy_kwh`), carried forward over nulls, for the never-decreasing rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub energy_kwh: Option<f64>,
}

/// How many inputs one flush (or a whole run) accounted for, and where each ended up.
///
/// Invariant: `received == accepted + rejected_total() + duplicates`, where `received` counts
/// readings (a batch message with 10 readings counts 10; an unparseable message counts 1).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlushCounts {
    /// Readings (or unparseable messages) that entered the transform.
    pub received: u64,
    /// Readings written to the telemetry table.
    pub accepted: u64,
    /// Readings written to the dead-letter table, by reason class (`missing_field`, ...).
    pub rejected: BTreeMap<String, u64>,
    /// Readings dropped because their (device_id, seq) was already accepted.
    pub duplicates: u64,
}

impl FlushCounts {
    /// All rejected readings, whatever the reason.
    pub fn rejected_total(&self) -> u64 {
        self.rejected.values().sum()
    }

    /// Whether every received reading is accounted for exactly once.
    pub fn adds_up(&self) -> bool {
        self.received == self.accepted + self.rejected_total() + self.duplicates
    }

    /// Adds another flush's counts to these.
    pub fn add(&mut self, other: &FlushCounts) {
        self.received += other.received;
        self.accepted += other.accepted;
        self.duplicates += other.duplicates;
        for (k, v) in &other.rejected {
            *self.rejected.entry(k.clone()).or_default() += v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_add_up_when_every_reading_has_one_place() {
        let mut c = FlushCounts {
            received: 10,
            accepted: 6,
            duplicates: 1,
            ..Default::default()
        };
        c.rejected.insert("json_syntax".into(), 3);
        assert!(c.adds_up());
        let mut total = FlushCounts::default();
        total.add(&c);
        total.add(&c);
        assert_eq!(total.received, 20);
        assert_eq!(total.rejected["json_syntax"], 6);
        assert!(total.adds_up());
    }
}
