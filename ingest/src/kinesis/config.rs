//! `[kinesis]`: which stream, where to start, how fast to poll, and the optional lease table.
//!
//! The endpoint, region and credentials come from the standard AWS environment and profile
//! files (`AWS_REGION`, `AWS_PROFILE`, `AWS_ENDPOINT_URL_KINESIS`, `AWS_ENDPOINT_URL_DYNAMODB`,
//! …), never from this file.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Where reading starts in a shard that has no committed position and no parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum StartPosition {
    /// The oldest record still in the shard (default: nothing already in the stream is missed).
    #[default]
    TrimHorizon,
    /// Only records put after the reader starts.
    Latest,
    /// Records put at or after `start_timestamp`.
    AtTimestamp,
}

/// `[kinesis]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KinesisConfig {
    /// The stream's name or ARN. When set, `run` reads this stream instead of MQTT.
    #[serde(default)]
    pub stream: Option<String>,
    /// `trim_horizon` (default), `latest` or `at_timestamp`, for shards with no committed
    /// position. Children of a split or merge always start at their beginning.
    #[serde(default)]
    pub start_position: StartPosition,
    /// RFC 3339 time for `start_position = "at_timestamp"`.
    #[serde(default)]
    pub start_timestamp: Option<String>,
    /// Records asked for per GetRecords call (1–10000).
    #[serde(default = "default_max_records")]
    pub max_records_per_call: u32,
    /// Least time between two GetRecords calls on one shard, in milliseconds. The service
    /// allows 5 calls per second per shard, shared by every consumer of the stream: 200 ms is
    /// the most one consumer may take.
    #[serde(default = "default_poll_interval_ms")]
    pub poll_interval_ms: u64,
    /// Wait after a call that returned nothing, in milliseconds (no tight loop on a quiet shard).
    #[serde(default = "default_idle_poll_interval_ms")]
    pub idle_poll_interval_ms: u64,
    /// How often the shard list is read again to find new shards (after a split or merge).
    #[serde(default = "default_discovery_interval_secs")]
    pub discovery_interval_secs: u64,
    /// A DynamoDB table of shard leases, shared by every consumer of the stream: set it to run
    /// several consumers that split the shards between them. Created (on-demand billing) if
    /// missing. Unset (default): this instance reads every shard.
    #[serde(default)]
    pub lease_table: Option<String>,
    /// How long a lease lives without renewal before another consumer may take it; renewed
    /// every third of it.
    #[serde(default = "default_lease_duration_secs")]
    pub lease_duration_secs: u64,
    /// This consumer's name in the lease table; default `<hostname>-<pid>`.
    #[serde(default)]
    pub worker_id: Option<String>,
    /// GetRecords results buffered between the shard readers and the pipeline (each up to
    /// `max_records_per_call` records and 10 MiB): with the flush limits, what bounds memory.
    #[serde(default = "default_channel_capacity")]
    pub channel_capacity: usize,
}

fn default_max_records() -> u32 {
    10_000
}
fn default_poll_interval_ms() -> u64 {
    200
}
fn default_idle_poll_interval_ms() -> u64 {
    1_000
}
fn default_discovery_interval_secs() -> u64 {
    10
}
fn default_lease_duration_secs() -> u64 {
    10
}
fn default_channel_capacity() -> usize {
    8
}

impl Default for KinesisConfig {
    fn default() -> Self {
        Self {
            stream: None,
            start_position: StartPosition::default(),
            start_timestamp: None,
            max_records_per_call: default_max_records(),
            poll_interval_ms: default_poll_interval_ms(),
            idle_poll_interval_ms: default_idle_poll_interval_ms(),
            discovery_interval_secs: default_discovery_interval_secs(),
            lease_table: None,
            lease_duration_secs: default_lease_duration_secs(),
            worker_id: None,
            channel_capacity: default_channel_capacity(),
        }
    }
}

/// A `[kinesis]` value that cannot work.
#[derive(Debug, thiserror::Error)]
#[error("kinesis.{key}: {why}")]
pub struct ConfigError {
    /// The key.
    pub key: &'static str,
    /// What is wrong and what to do.
    pub why: String,
}

impl KinesisConfig {
    /// Checks every value without the network.
    ///
    /// # Errors
    /// The first bad value, named.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key, why: &str| {
            Err(ConfigError {
                key,
                why: why.to_owned(),
            })
        };
        if let Some(s) = &self.stream {
            let name = super::stream_name(s);
            if name.is_empty()
                || name.len() > 128
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
            {
                return bad(
                    "stream",
                    "a stream name is 1-128 of A-Z a-z 0-9 _ . - (or give the stream's ARN)",
                );
            }
        }
        if !(1..=10_000).contains(&self.max_records_per_call) {
            return bad(
                "max_records_per_call",
                "must be 1 to 10000 (the service's limit)",
            );
        }
        if self.poll_interval_ms < 200 {
            return bad(
                "poll_interval_ms",
                "must be at least 200: Kinesis allows 5 GetRecords calls per second per shard",
            );
        }
        if self.idle_poll_interval_ms < self.poll_interval_ms {
            return bad("idle_poll_interval_ms", "must be at least poll_interval_ms");
        }
        if self.discovery_interval_secs == 0 {
            return bad("discovery_interval_secs", "must be at least 1");
        }
        if self.lease_duration_secs < 3 {
            return bad("lease_duration_secs", "must be at least 3");
        }
        if self.channel_capacity == 0 {
            return bad("channel_capacity", "must be at least 1");
        }
        match (self.start_position, &self.start_timestamp) {
            (StartPosition::AtTimestamp, None) => {
                return bad(
                    "start_timestamp",
                    "start_position = \"at_timestamp\" needs start_timestamp (RFC 3339)",
                );
            }
            (_, Some(t)) if sensorlake_core::time::parse_rfc3339(t).is_none() => {
                return bad(
                    "start_timestamp",
                    "not an RFC 3339 time (2026-11-27T15:00:00Z)",
                );
            }
            _ => {}
        }
        if let Some(t) = &self.lease_table
            && (t.len() < 3
                || t.len() > 255
                || !t
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')))
        {
            return bad(
                "lease_table",
                "a DynamoDB table name is 3-255 of A-Z a-z 0-9 _ . -",
            );
        }
        Ok(())
    }

    /// [`KinesisConfig::poll_interval_ms`] as a duration.
    pub fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.poll_interval_ms)
    }

    /// [`KinesisConfig::idle_poll_interval_ms`] as a duration.
    pub fn idle_poll_interval(&self) -> Duration {
        Duration::from_millis(self.idle_poll_interval_ms)
    }

    /// [`KinesisConfig::lease_duration_secs`] as a duration.
    pub fn lease_duration(&self) -> Duration {
        Duration::from_secs(self.lease_duration_secs)
    }

    /// The worker id: configured, or `<hostname>-<pid>`.
    pub fn worker_id(&self) -> String {
        self.worker_id.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "sensorlake".to_owned());
            format!("{host}-{}", std::process::id())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_bad_values_are_named() {
        assert!(KinesisConfig::default().validate().is_ok());
        type Break = fn(&mut KinesisConfig);
        let cases: [(&str, Break); 6] = [
            ("poll_interval_ms", |c| c.poll_interval_ms = 100),
            ("max_records_per_call", |c| c.max_records_per_call = 10_001),
            ("start_timestamp", |c| {
                c.start_position = StartPosition::AtTimestamp
            }),
            ("start_timestamp", |c| {
                c.start_timestamp = Some("yesterday".into())
            }),
            ("stream", |c| c.stream = Some("bad/name".into())),
            ("lease_table", |c| c.lease_table = Some("x".into())),
        ];
        for (key, break_it) in cases {
            let mut c = KinesisConfig::default();
            break_it(&mut c);
            let e = c.validate().expect_err(key);
            assert_eq!(e.key, key, "{e}");
        }
        let mut c = KinesisConfig {
            stream: Some("arn:aws:kinesis:eu-west-1:123456789012:stream/telemetry".into()),
            start_position: StartPosition::AtTimestamp,
            start_timestamp: Some("2026-11-27T15:00:00Z".into()),
            ..KinesisConfig::default()
        };
        assert!(c.validate().is_ok());
        c.worker_id = None;
        assert!(c.worker_id().ends_with(&format!("-{}", std::process::id())));
    }
}
