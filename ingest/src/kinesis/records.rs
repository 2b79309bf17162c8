//! One Kinesis record → the readings' raw records it carries, KPL aggregates unpacked.
//!
//! Shared by the long-lived consumer and the Lambda function, so that both write the same
//! positions and the same dead letters for the same stream.

use bytes::Bytes;
use sensorlake_core::{RawRecord, Reason};

use super::checkpoint::ShardCheckpoint;
use super::kpl;
use super::seqnum::SequenceNumber;

/// A user record ready for the transform, with where it sits in its shard.
#[derive(Debug, Clone)]
pub struct ShardRecord {
    /// The record; `position` is `<shard>/<sequence>` or `<shard>/<sequence>/<sub>`, and the
    /// claimed device id is the (user record's) partition key.
    pub record: RawRecord,
    /// The Kinesis record's sequence number.
    pub sequence: SequenceNumber,
    /// The index within a KPL aggregate; `None` for a plain record.
    pub sub: Option<u64>,
    /// Whether this is the last user record of its Kinesis record.
    pub last_in_record: bool,
}

/// Appends the user records of one Kinesis record to `out`, skipping those `committed`
/// already covers. `arrival_us` (the record's ApproximateArrivalTimestamp) becomes
/// `received_at`, so a record read twice yields identical rows.
///
/// A record that starts like an aggregate but does not decode becomes one record marked
/// [`Reason::CorruptAggregate`]: a dead letter with the raw bytes, never garbage rows.
pub fn expand(
    shard: &str,
    sequence: &SequenceNumber,
    partition_key: &str,
    data: Bytes,
    arrival_us: i64,
    committed: Option<&ShardCheckpoint>,
    out: &mut Vec<ShardRecord>,
) {
    let covered = |sub: Option<u64>| committed.is_some_and(|c| c.covers(sequence, sub));
    match kpl::deaggregate(&data) {
        Ok(Some(users)) => {
            let n = users.len();
            for (i, user) in users.into_iter().enumerate() {
                let sub = i as u64;
                if covered(Some(sub)) {
                    continue;
                }
                out.push(ShardRecord {
                    record: RawRecord {
                        payload: user.data,
                        claimed_device_id: Some(user.partition_key.into_boxed_str()),
                        position: format!("{shard}/{sequence}/{sub}").into_boxed_str(),
                        received_at_us: arrival_us,
                        rejected: None,
                    },
                    sequence: sequence.clone(),
                    sub: Some(sub),
                    last_in_record: i + 1 == n,
                });
            }
        }
        other => {
            if covered(None) {
                return;
            }
            let rejected = match other {
                Err(e) => Some(Box::new((Reason::CorruptAggregate, e.to_string()))),
                _ => None,
            };
            out.push(ShardRecord {
                record: RawRecord {
                    payload: data,
                    claimed_device_id: Some(partition_key.into()),
                    position: format!("{shard}/{sequence}").into_boxed_str(),
                    received_at_us: arrival_us,
                    rejected,
                },
                sequence: sequence.clone(),
                sub: None,
                last_in_record: true,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sn(s: &str) -> SequenceNumber {
        SequenceNumber::parse(s).expect("valid")
    }

    #[test]
    fn unpacks_aggregates_skips_what_is_committed_and_marks_corrupt_ones() {
        let agg = Bytes::from(kpl::aggregate(&[
            ("dev-1", b"{\"a\":1}".as_slice()),
            ("dev-2", b"{\"b\":2}".as_slice()),
            ("dev-1", b"{\"c\":3}".as_slice()),
        ]));
        let mut out = Vec::new();
        expand(
            "shardId-000000000000",
            &sn("100"),
            "dev-1",
            agg.clone(),
            7,
            None,
            &mut out,
        );
        assert_eq!(out.len(), 3);
        assert_eq!(out[1].record.claimed_device_id.as_deref(), Some("dev-2"));
        assert_eq!(&*out[2].record.position, "shardId-000000000000/100/2");
        assert_eq!(&out[2].record.payload[..], b"{\"c\":3}");
        assert!(out[2].last_in_record && !out[1].last_in_record);
        assert_eq!(out[0].record.received_at_us, 7);

        // Two of three user records committed: only the third comes out again.
        let mut cp = ShardCheckpoint::new("s", "shardId-000000000000");
        cp.advance(&sn("100"), Some(1), false);
        let mut again = Vec::new();
        expand(
            "shardId-000000000000",
            &sn("100"),
            "dev-1",
            agg,
            7,
            Some(&cp),
            &mut again,
        );
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].sub, Some(2));

        let mut broken = kpl::aggregate(&[("dev-1", b"x".as_slice())]);
        let last = broken.len() - 1;
        broken[last] ^= 0xff;
        let mut bad = Vec::new();
        expand(
            "shardId-000000000000",
            &sn("101"),
            "dev-1",
            Bytes::from(broken),
            7,
            Some(&cp),
            &mut bad,
        );
        assert_eq!(bad.len(), 1);
        let (reason, _) = &**bad[0].record.rejected.as_ref().expect("marked");
        assert_eq!(reason.code(), "corrupt_aggregate");

        let mut plain = Vec::new();
        expand(
            "shardId-000000000000",
            &sn("99"),
            "dev-9",
            Bytes::from_static(b"{}"),
            7,
            Some(&cp),
            &mut plain,
        );
        assert!(
            plain.is_empty(),
            "a record before the checkpoint is committed already"
        );
    }
}
