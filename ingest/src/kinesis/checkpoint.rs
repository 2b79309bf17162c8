//! Where a shard's reading stands, as recorded in the lake.
//!
//! Each Kinesis shard is written by its own lake writer ([`shard_writer_id`]), by whichever
//! process reads the shard (a long-lived consumer holding its lease, or the Lambda function
//! the event source mapping invoked). The `sources` of that writer's commit records hold a
//! [`ShardCheckpoint`]: the last record committed, and whether the shard has been read to its
//! end. So the checkpoint and the data it covers are committed together, by one conditional
//! write, and whoever picks the shard up next resumes exactly after it; a parent shard's final
//! checkpoint (`ended`) is what lets its children be read.

use serde::{Deserialize, Serialize};

use super::seqnum::SequenceNumber;

/// The longest writer id the lake accepts.
const MAX_WRITER_ID_LEN: usize = 64;

/// The committed position of one shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardCheckpoint {
    /// The stream's name.
    pub stream: String,
    /// The shard id (`shardId-000000000001`).
    pub shard: String,
    /// The last Kinesis record committed (all of it unless `sub_sequence` is set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence: Option<SequenceNumber>,
    /// For a KPL aggregate committed in part: the last user record committed within it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub_sequence: Option<u64>,
    /// The shard is closed (split or merged) and every record in it is committed.
    #[serde(default)]
    pub ended: bool,
}

/// The key under which a checkpoint sits in a commit record's `sources`.
const KEY: &str = "kinesis";

/// A commit record whose `sources` do not hold a shard checkpoint this version can read.
#[derive(Debug, thiserror::Error)]
#[error(
    "the lake's commit record has no readable Kinesis checkpoint ({0}); was this writer id used for something else?"
)]
pub struct BadCheckpoint(String);

impl ShardCheckpoint {
    /// A shard nothing of which is committed yet.
    pub fn new(stream: &str, shard: &str) -> Self {
        Self {
            stream: stream.to_owned(),
            shard: shard.to_owned(),
            sequence: None,
            sub_sequence: None,
            ended: false,
        }
    }

    /// The value stored as a commit record's `sources`.
    pub fn to_sources(&self) -> serde_json::Value {
        serde_json::json!({ KEY: self })
    }

    /// Reads the checkpoint out of a writer's last commit `sources` (as
    /// `Recovered::sources` lists them); `None` when the writer has committed nothing.
    ///
    /// # Errors
    /// [`BadCheckpoint`] when a commit exists but holds no checkpoint.
    pub fn from_sources(sources: &[serde_json::Value]) -> Result<Option<Self>, BadCheckpoint> {
        let Some(first) = sources.first() else {
            return Ok(None);
        };
        let inner = first
            .get(KEY)
            .ok_or_else(|| BadCheckpoint(format!("no \"{KEY}\" key in {first}")))?;
        serde_json::from_value(inner.clone())
            .map(Some)
            .map_err(|e| BadCheckpoint(e.to_string()))
    }

    /// Whether the user record `sub` (`None` for a record that is not an aggregate) of Kinesis
    /// record `sequence` is already committed.
    pub fn covers(&self, sequence: &SequenceNumber, sub: Option<u64>) -> bool {
        let Some(last) = &self.sequence else {
            return false;
        };
        match sequence.cmp(last) {
            std::cmp::Ordering::Less => true,
            std::cmp::Ordering::Greater => false,
            std::cmp::Ordering::Equal => match (self.sub_sequence, sub) {
                (None, _) => true,
                (Some(done), Some(s)) => s <= done,
                (Some(_), None) => false,
            },
        }
    }

    /// Moves the checkpoint to `sequence`/`sub`: `last_in_record` says whether `sub` is the
    /// last user record of its Kinesis record (then the whole record counts as committed).
    pub fn advance(&mut self, sequence: &SequenceNumber, sub: Option<u64>, last_in_record: bool) {
        self.sequence = Some(sequence.clone());
        self.sub_sequence = if last_in_record { None } else { sub };
    }
}

/// The stream name in `name_or_arn` (`arn:aws:kinesis:REGION:ACCOUNT:stream/NAME` or `NAME`).
///
/// Lenient where [`arn_parts`] is strict: whatever follows `:stream/` (an enhanced fan-out
/// consumer ARN keeps its `/consumer/…` suffix, for the caller to cut).
pub fn stream_name(name_or_arn: &str) -> &str {
    if name_or_arn.starts_with("arn:") {
        name_or_arn
            .rsplit_once(":stream/")
            .map_or(name_or_arn, |(_, name)| name)
    } else {
        name_or_arn
    }
}

/// (region, name) of a Kinesis stream ARN (`arn:PARTITION:kinesis:REGION:ACCOUNT:stream/NAME`);
/// `None` for anything else.
pub fn arn_parts(arn: &str) -> Option<(&str, &str)> {
    let mut parts = arn.splitn(6, ':');
    let (Some("arn"), Some(_partition), Some("kinesis"), Some(region), Some(_account), Some(res)) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return None;
    };
    let name = res.strip_prefix("stream/")?;
    (!region.is_empty() && !name.is_empty() && !name.contains('/')).then_some((region, name))
}

/// The lake writer id of shard `shard` of stream `stream`: `ks-<stream>-<shard number>`.
///
/// Stable, so that the long-lived consumer and the Lambda function resume each other's work,
/// and within the lake's 64 characters of `A-Z a-z 0-9 _ -`: other characters become `_`, and
/// a long stream name is cut and followed by a hash of the whole name.
pub fn shard_writer_id(stream: &str, shard: &str) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    let shard_part = clean(shard.strip_prefix("shardId-").unwrap_or(shard));
    let mut stream_part = clean(stream);
    let room = MAX_WRITER_ID_LEN.saturating_sub("ks-".len() + 1 + shard_part.len());
    if stream_part.len() > room || stream_part != stream {
        // Cut (or disambiguate a renamed character) with a hash of the exact name.
        let hash = fnv1a(stream.as_bytes());
        let keep = room.saturating_sub(9).min(stream_part.len());
        stream_part.truncate(keep);
        stream_part = format!("{stream_part}_{hash:08x}");
    }
    let mut id = format!("ks-{stream_part}-{shard_part}");
    id.truncate(MAX_WRITER_ID_LEN);
    id
}

/// 32-bit FNV-1a: stable across versions and platforms (unlike the std hasher).
fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sn(s: &str) -> SequenceNumber {
        SequenceNumber::parse(s).expect("valid")
    }

    #[test]
    fn writer_ids_are_stable_valid_and_distinct() {
        assert_eq!(
            shard_writer_id("telemetry", "shardId-000000000003"),
            "ks-telemetry-000000000003"
        );
        let a = shard_writer_id("my.stream", "shardId-000000000003");
        let b = shard_writer_id("my_stream", "shardId-000000000003");
        assert_ne!(a, b, "a renamed character must not merge two streams");
        let long = "s".repeat(128);
        let c = shard_writer_id(&long, "shardId-000000000003");
        let d = shard_writer_id(&format!("{}t", &long[..127]), "shardId-000000000003");
        assert_ne!(c, d);
        for id in [a, b, c, d] {
            assert!(id.len() <= MAX_WRITER_ID_LEN, "{id}");
            assert!(
                id.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
                "{id}"
            );
            assert!(id.ends_with("-000000000003"), "{id}");
        }
    }

    #[test]
    fn stream_names_come_out_of_arns() {
        assert_eq!(
            stream_name("arn:aws:kinesis:eu-west-1:123456789012:stream/telemetry"),
            "telemetry"
        );
        assert_eq!(stream_name("telemetry"), "telemetry");
        assert_eq!(
            arn_parts("arn:aws:kinesis:eu-west-1:123456789012:stream/telemetry"),
            Some(("eu-west-1", "telemetry"))
        );
        assert_eq!(arn_parts("arn:aws:kinesis:eu-west-1:1:stream/"), None);
        assert_eq!(arn_parts("arn:aws:sqs:eu-west-1:1:stream/x"), None);
        assert_eq!(arn_parts("telemetry"), None);
    }

    #[test]
    fn covers_whole_records_and_parts_of_aggregates() {
        let mut cp = ShardCheckpoint::new("s", "shardId-000000000000");
        assert!(!cp.covers(&sn("5"), None), "nothing committed yet");
        cp.advance(&sn("100"), Some(2), false);
        assert!(cp.covers(&sn("99"), None));
        assert!(cp.covers(&sn("100"), Some(2)));
        assert!(!cp.covers(&sn("100"), Some(3)));
        assert!(!cp.covers(&sn("101"), None));
        cp.advance(&sn("100"), Some(3), true);
        assert!(
            cp.covers(&sn("100"), Some(9)),
            "the whole aggregate is committed"
        );
    }

    #[test]
    fn round_trips_through_commit_sources() {
        let mut cp = ShardCheckpoint::new("s", "shardId-000000000001");
        cp.advance(
            &sn("49590338271490256608559692538361571095921575989136588898"),
            Some(4),
            false,
        );
        let v = cp.to_sources();
        let back = ShardCheckpoint::from_sources(std::slice::from_ref(&v)).expect("readable");
        assert_eq!(back, Some(cp));
        assert_eq!(ShardCheckpoint::from_sources(&[]).expect("empty"), None);
        assert!(ShardCheckpoint::from_sources(&[serde_json::json!({"mqtt": 1})]).is_err());
    }
}
