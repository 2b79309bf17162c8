//! What the transform can be told: payload limits, time windows, and how strict to be about
//! devices and metrics it does not know.
//!
//! Read from the `[transform]` section of the configuration file; every key is optional.

use serde::{Deserialize, Serialize};

/// The transform's settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransformConfig {
    /// Payloads longer than this are dead-lettered as `too_large` without being parsed, which
    /// bounds the work one message can cost.
    #[serde(default = "default_max_payload_bytes")]
    pub max_payload_bytes: usize,
    /// A batch message with more readings than this is dead-lettered whole as
    /// `too_many_readings` (and counted as one).
    #[serde(default = "default_max_readings_per_message")]
    pub max_readings_per_message: usize,
    /// How far in the future (by the pipeline's clock) a reading's `ts` may be before it is
    /// rejected as `ts_in_future`; device clocks drift.
    #[serde(default = "default_max_future_skew_ms")]
    pub max_future_skew_ms: i64,
    /// How old a reading's `ts` may be before it is rejected as `ts_too_old`. Keeps late data
    /// from reopening partitions that were compacted long ago.
    #[serde(default = "default_lateness_ms")]
    pub lateness_ms: i64,
    /// What to do with readings of devices that are not in the registry.
    #[serde(default)]
    pub unknown_devices: UnknownDevices,
    /// What to do with metric names that the device type does not define.
    #[serde(default)]
    pub unknown_metrics: UnknownMetrics,
}

fn default_max_payload_bytes() -> usize {
    256 * 1024
}

fn default_max_readings_per_message() -> usize {
    10_000
}

fn default_max_future_skew_ms() -> i64 {
    5 * 60 * 1000
}

fn default_lateness_ms() -> i64 {
    7 * 24 * 60 * 60 * 1000
}

impl Default for TransformConfig {
    fn default() -> Self {
        Self {
            max_payload_bytes: default_max_payload_bytes(),
            max_readings_per_message: default_max_readings_per_message(),
            max_future_skew_ms: default_max_future_skew_ms(),
            lateness_ms: default_lateness_ms(),
            unknown_devices: UnknownDevices::default(),
            unknown_metrics: UnknownMetrics::default(),
        }
    }
}

/// Readings of a device missing from the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownDevices {
    /// Accept them, with null registry columns.
    #[default]
    Keep,
    /// Dead-letter them as `unknown_device`.
    Reject,
}

/// Metric names a device type does not define.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownMetrics {
    /// Dead-letter the reading as `unknown_metric:<name>`.
    #[default]
    Reject,
    /// Drop the value and keep the rest of the reading.
    Ignore,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_is_optional_and_defaults_follow_the_spec() {
        let c: TransformConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(c, TransformConfig::default());
        assert_eq!(c.max_payload_bytes, 262_144);
        assert_eq!(c.max_readings_per_message, 10_000);
        assert_eq!(c.max_future_skew_ms, 300_000);
        assert_eq!(c.lateness_ms, 604_800_000);
        assert_eq!(c.unknown_devices, UnknownDevices::Keep);
        assert_eq!(c.unknown_metrics, UnknownMetrics::Reject);
    }

    #[test]
    fn reads_policies_in_lowercase() {
        let c: TransformConfig =
            serde_json::from_str(r#"{"unknown_devices":"reject","unknown_metrics":"ignore"}"#)
                .unwrap();
        assert_eq!(c.unknown_devices, UnknownDevices::Reject);
        assert_eq!(c.unknown_metrics, UnknownMetrics::Ignore);
    }

    #[test]
    fn rejects_unknown_keys() {
        let err = serde_json::from_str::<TransformConfig>(r#"{"max_payload":1}"#).unwrap_err();
        assert!(
            err.to_string().contains("unknown field `max_payload`"),
            "{err}"
        );
    }
}
