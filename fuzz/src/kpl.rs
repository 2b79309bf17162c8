//! The `kpl_decoder` target: arbitrary bytes as a Kinesis record through
//! [`kpl::deaggregate`] and [`records::expand`], and the same bytes read as (partition key,
//! data) pairs through [`kpl::aggregate`] and back.
//!
//! The whole input is both things at once: the record for the decoder, and the
//! [`Unstructured`] source of the pairs for the round trip. Seeds are aggregates and plain
//! records, so the decoder starts from valid input.

use bytes::Bytes;
use libfuzzer_sys::arbitrary::Unstructured;
use sensorlake_core::Reason;
use sensorlake_ingest::kinesis::kpl::{self, KplError, MAGIC, UserRecord};
use sensorlake_ingest::kinesis::records::{self, ShardRecord};
use sensorlake_ingest::kinesis::{SequenceNumber, ShardCheckpoint};

const SHARD: &str = "shardId-000000000000";
/// The partition key of the outer Kinesis record.
const PARTITION_KEY: &str = "outer-key";
const ARRIVAL_US: i64 = 1_764_255_845_123_000;

/// Runs one input and panics when an invariant breaks.
pub fn run(data: &[u8]) {
    let record = Bytes::copy_from_slice(data);
    let decoded = kpl::deaggregate(&record);
    match &decoded {
        Ok(None) => assert!(!data.starts_with(&MAGIC), "an aggregate read as plain"),
        Err(_) => assert!(data.starts_with(&MAGIC), "a plain record read as corrupt"),
        Ok(Some(users)) => check_users(&record, users),
    }
    check_expand(&record, &decoded);
    round_trip(data);
}

/// A decoded aggregate: not empty, its data zero-copy slices of the record, and what
/// `aggregate` writes for it decodes to the same keys and data.
fn check_users(record: &Bytes, users: &[UserRecord]) {
    assert!(record.starts_with(&MAGIC));
    assert!(!users.is_empty(), "an aggregate of no records decoded");
    let range = record.as_ptr_range();
    for user in users {
        let data = user.data.as_ptr_range();
        assert!(
            user.data.is_empty() || (range.start <= data.start && data.end <= range.end),
            "user record data outside the record"
        );
    }
    let pairs: Vec<(&str, &[u8])> = users
        .iter()
        .map(|u| (u.partition_key.as_str(), &u.data[..]))
        .collect();
    let again = decode_packed(&pairs);
    let plain: Vec<UserRecord> = users
        .iter()
        .map(|u| UserRecord {
            explicit_hash_key: None,
            ..u.clone()
        })
        .collect();
    assert_eq!(again, plain, "re-aggregated user records differ");
}

/// Packs `pairs` and unpacks them again.
fn decode_packed(pairs: &[(&str, &[u8])]) -> Vec<UserRecord> {
    let packed = kpl::aggregate(pairs);
    assert!(packed.starts_with(&MAGIC));
    match kpl::deaggregate(&Bytes::from(packed)) {
        Ok(Some(users)) => users,
        other => panic!(
            "an aggregate of {} records decoded as {other:?}",
            pairs.len()
        ),
    }
}

/// `expand` yields each user record once, in order, with its sub-sequence number, or the
/// record itself (marked when corrupt); and skips exactly what a checkpoint covers.
fn check_expand(record: &Bytes, decoded: &Result<Option<Vec<UserRecord>>, KplError>) {
    let sequence = SequenceNumber::parse("100").expect("valid");
    let expand = |committed: Option<&ShardCheckpoint>| {
        let mut out = Vec::new();
        records::expand(
            SHARD,
            &sequence,
            PARTITION_KEY,
            record.clone(),
            ARRIVAL_US,
            committed,
            &mut out,
        );
        out
    };
    let all = expand(None);
    match decoded {
        Ok(Some(users)) => {
            assert_eq!(all.len(), users.len());
            for (i, (out, user)) in all.iter().zip(users).enumerate() {
                assert_eq!(out.sub, Some(i as u64));
                assert_eq!(out.last_in_record, i + 1 == users.len());
                assert_eq!(out.record.payload, user.data);
                assert_eq!(
                    out.record.claimed_device_id.as_deref(),
                    Some(user.partition_key.as_str())
                );
                assert_eq!(&*out.record.position, format!("{SHARD}/100/{i}"));
                assert!(out.record.rejected.is_none());
            }
            // Committed up to user record k: only those after it come out again.
            let k = record.len() % users.len();
            let mut checkpoint = ShardCheckpoint::new("stream", SHARD);
            checkpoint.advance(&sequence, Some(k as u64), k + 1 == users.len());
            let rest = expand(Some(&checkpoint));
            let subs: Vec<Option<u64>> = rest.iter().map(|r| r.sub).collect();
            let expected: Vec<Option<u64>> = (k as u64 + 1..users.len() as u64).map(Some).collect();
            assert_eq!(subs, expected, "resumed after user record {k}");
        }
        other => {
            assert_eq!(all.len(), 1);
            let out: &ShardRecord = &all[0];
            assert_eq!(out.sub, None);
            assert!(out.last_in_record);
            assert_eq!(&out.record.payload, record);
            assert_eq!(out.record.claimed_device_id.as_deref(), Some(PARTITION_KEY));
            match (other, &out.record.rejected) {
                (Err(_), Some(rejected)) => assert_eq!(rejected.0, Reason::CorruptAggregate),
                (Ok(None), None) => {}
                (other, rejected) => panic!("{other:?} expanded with rejection {rejected:?}"),
            }
        }
    }
    // A checkpoint at the record covers all of it, one before it none of it.
    let mut at = ShardCheckpoint::new("stream", SHARD);
    at.advance(&sequence, None, true);
    assert!(
        expand(Some(&at)).is_empty(),
        "a committed record came out again"
    );
    let mut before = ShardCheckpoint::new("stream", SHARD);
    before.advance(&SequenceNumber::parse("99").expect("valid"), None, true);
    assert_eq!(expand(Some(&before)).len(), all.len());
}

/// The input read as (key, data) pairs: what `aggregate` packs, `deaggregate` unpacks.
fn round_trip(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(pairs) = u.arbitrary::<Vec<(String, Vec<u8>)>>() else {
        return;
    };
    let borrowed: Vec<(&str, &[u8])> = pairs
        .iter()
        .map(|(k, d)| (k.as_str(), d.as_slice()))
        .collect();
    if borrowed.is_empty() {
        // The KPL never writes an aggregate of no records, and `deaggregate` rejects one.
        let packed = Bytes::from(kpl::aggregate(&borrowed));
        assert!(kpl::deaggregate(&packed).is_err());
        return;
    }
    let users = decode_packed(&borrowed);
    let got: Vec<(&str, &[u8])> = users
        .iter()
        .map(|u| (u.partition_key.as_str(), &u.data[..]))
        .collect();
    assert_eq!(
        got, borrowed,
        "aggregate then deaggregate changed the records"
    );
    assert!(users.iter().all(|u| u.explicit_hash_key.is_none()));
}
