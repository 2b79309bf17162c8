//! The `lambda_event` target: arbitrary bytes as the JSON event the Lambda function is invoked
//! with, through `Invocation::parse` and `KinesisEvent::shard_batches`.
//!
//! `lambda/src/event.rs` is compiled into this crate from its own file rather than through a
//! dependency on `sensorlake-lambda`: that crate links the sink, the Lambda runtime and the
//! service's configuration (about 130 crates more than `sensorlake-ingest`), none of which the
//! event parsing uses. The module needs only what this crate has (`sensorlake_ingest`, serde,
//! serde_json, base64, bytes, thiserror); if it starts using more of its crate, this build
//! breaks and says so.

use std::collections::BTreeSet;

#[path = "../../lambda/src/event.rs"]
pub mod event;

use event::{EventError, Invocation};

/// Runs one input and panics when an invariant breaks.
pub fn run(data: &[u8]) {
    // The runtime hands the function a `serde_json::Value`, as here.
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let records = value
        .get("Records")
        .and_then(|r| r.as_array())
        .map(Vec::len);
    match Invocation::parse(value) {
        Ok(Invocation::Kinesis(kinesis)) => {
            assert_eq!(Some(kinesis.records.len()), records);
            check_batches(&kinesis);
        }
        Ok(Invocation::Compact(request)) => assert_eq!(request.action, "compact"),
        Err(EventError::Unrecognised(why) | EventError::Malformed { why, .. }) => {
            assert!(!why.is_empty());
        }
        Err(e @ EventError::BadRecord { .. }) => panic!("parse gave a per-record error: {e}"),
    }
}

/// Each shard's records are in strictly increasing sequence order (sorted, repeats dropped),
/// none is lost but repeats, and a shard appears once.
fn check_batches(kinesis: &event::KinesisEvent) {
    let Ok(batches) = kinesis.shard_batches() else {
        return;
    };
    let mut shards = BTreeSet::new();
    let mut total = 0;
    for batch in &batches {
        assert!(!batch.records.is_empty(), "an empty shard batch");
        assert!(!batch.shard.is_empty() && !batch.stream.is_empty());
        assert!(
            shards.insert((batch.stream.as_str(), batch.shard.as_str())),
            "shard {} listed twice",
            batch.shard
        );
        for pair in batch.records.windows(2) {
            assert!(
                pair[0].sequence < pair[1].sequence,
                "{} then {}",
                pair[0].sequence,
                pair[1].sequence
            );
        }
        total += batch.records.len();
    }
    assert!(total <= kinesis.records.len());
    assert_eq!(total == 0, kinesis.records.is_empty());
}
