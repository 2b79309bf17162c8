//! What the function is invoked with, and what it answers.
//!
//! Three kinds of event reach the function (see [`Invocation::parse`]):
//! - a Kinesis event from an event source mapping ([`KinesisEvent`]), answered with a
//!   [`BatchResponse`] (`{"batchItemFailures": [...]}`);
//! - `{"action": "compact", ...}` ([`CompactRequest`]), as the template's schedule sends it;
//! - an EventBridge scheduled event (`"detail-type": "Scheduled Event"`), which compacts with
//!   the defaults.
//!
//! The serde types here are our own (no `aws_lambda_events`): only the fields the function
//! uses, everything else ignored, so that fields AWS adds later never break parsing.

use std::collections::BTreeMap;

use base64::Engine as _;
use bytes::Bytes;
use sensorlake_ingest::kinesis::{SequenceNumber, stream_name};
use serde::{Deserialize, Serialize};

/// A Kinesis event as a Kinesis event source mapping delivers it.
#[derive(Debug, Clone, Deserialize)]
pub struct KinesisEvent {
    /// The records, in shard order (one shard per invocation from an event source mapping).
    #[serde(rename = "Records")]
    pub records: Vec<KinesisEventRecord>,
}

/// One record of a [`KinesisEvent`].
#[derive(Debug, Clone, Deserialize)]
pub struct KinesisEventRecord {
    /// `shardId-000000000006:<sequence number>`: where the shard id comes from.
    #[serde(rename = "eventID")]
    pub event_id: String,
    /// The stream's ARN (`arn:aws:kinesis:REGION:ACCOUNT:stream/NAME`).
    #[serde(rename = "eventSourceARN")]
    pub event_source_arn: String,
    /// The Kinesis record.
    pub kinesis: KinesisRecord,
}

/// The Kinesis part of a [`KinesisEventRecord`].
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KinesisRecord {
    /// The partition key the producer gave (the device id, for sensorlake's producers).
    pub partition_key: String,
    /// The record's sequence number (up to 128 decimal digits; never parsed as an integer).
    pub sequence_number: String,
    /// The record's bytes, base64-encoded.
    pub data: String,
    /// When Kinesis received the record: seconds since the epoch, with milliseconds.
    pub approximate_arrival_timestamp: f64,
}

/// `{"action": "compact"}`, with optional settings (defaults as `sensorlake compact`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompactRequest {
    /// Always `"compact"`.
    #[serde(default)]
    pub action: String,
    /// Compact a partition only once its hour (day, for dead letters) ended this long ago.
    /// Default 7,200 (2 h).
    #[serde(default)]
    pub older_than_secs: Option<u64>,
    /// Merge files smaller than this into files of about this size. Default 128 MiB.
    #[serde(default)]
    pub target_size_bytes: Option<u64>,
    /// The most compressed input one merge holds in memory. Default: a quarter of the
    /// function's memory, at most 1 GiB.
    #[serde(default)]
    pub merge_memory_bytes: Option<u64>,
}

/// What an invocation asks for.
#[derive(Debug, Clone)]
pub enum Invocation {
    /// Write these records to the lake.
    Kinesis(KinesisEvent),
    /// Run compaction.
    Compact(CompactRequest),
}

/// An event the function cannot use. The invocation fails with it (a function error): it
/// does not come from the event source mapping or the schedule the template sets up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    /// Neither a Kinesis event, nor a compaction request, nor a scheduled event.
    #[error(
        "unrecognised event ({0}): expected a Kinesis event (\"Records\"), {{\"action\": \"compact\"}} \
         or an EventBridge scheduled event"
    )]
    Unrecognised(String),
    /// A Kinesis event or compaction request whose fields do not parse.
    #[error("malformed {what}: {why}")]
    Malformed {
        /// What was being read.
        what: &'static str,
        /// The parser's explanation.
        why: String,
    },
    /// One record of a Kinesis event is not what Kinesis sends.
    #[error("malformed Kinesis record {event_id:?}: {why}")]
    BadRecord {
        /// The record's `eventID`.
        event_id: String,
        /// What is wrong.
        why: String,
    },
}

impl Invocation {
    /// Tells the event kinds apart: a `Records` array is a Kinesis event, `"action":
    /// "compact"` a compaction request, `"source": "aws.events"` / `"detail-type": "Scheduled
    /// Event"` a schedule (compaction with the defaults).
    ///
    /// # Errors
    /// [`EventError`] for anything else, or when the fields do not parse.
    pub fn parse(event: serde_json::Value) -> Result<Self, EventError> {
        let serde_json::Value::Object(map) = &event else {
            return Err(EventError::Unrecognised(format!(
                "a JSON {}",
                json_kind(&event)
            )));
        };
        if map.contains_key("Records") {
            return serde_json::from_value(event)
                .map(Invocation::Kinesis)
                .map_err(|e| EventError::Malformed {
                    what: "Kinesis event",
                    why: e.to_string(),
                });
        }
        if let Some(action) = map.get("action") {
            if action.as_str() != Some("compact") {
                return Err(EventError::Unrecognised(format!(
                    "unknown action {action}; the only action is \"compact\""
                )));
            }
            return serde_json::from_value(event)
                .map(Invocation::Compact)
                .map_err(|e| EventError::Malformed {
                    what: "compaction request",
                    why: e.to_string(),
                });
        }
        let scheduled = map.get("detail-type").and_then(|v| v.as_str()) == Some("Scheduled Event")
            || matches!(
                map.get("source").and_then(|v| v.as_str()),
                Some("aws.events" | "aws.scheduler")
            );
        if scheduled {
            return Ok(Invocation::Compact(CompactRequest {
                action: "compact".into(),
                ..CompactRequest::default()
            }));
        }
        let keys: Vec<&str> = map.keys().map(String::as_str).take(8).collect();
        Err(EventError::Unrecognised(format!(
            "an object with keys {keys:?}"
        )))
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "boolean",
        serde_json::Value::Number(_) => "number",
        serde_json::Value::String(_) => "string",
        serde_json::Value::Array(_) => "array",
        serde_json::Value::Object(_) => "object",
    }
}

/// One Kinesis record, decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardEventRecord {
    /// Its sequence number.
    pub sequence: SequenceNumber,
    /// Its partition key.
    pub partition_key: String,
    /// Its bytes (a KPL aggregate or one user record).
    pub data: Bytes,
    /// Its ApproximateArrivalTimestamp in microseconds since the epoch: the rows'
    /// `received_at`, the same on every delivery.
    pub arrival_us: i64,
}

/// The records of one shard in an event, in sequence order.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardBatch {
    /// The stream's name.
    pub stream: String,
    /// The shard id.
    pub shard: String,
    /// The records, sorted by sequence number, without repeats; never empty.
    pub records: Vec<ShardEventRecord>,
}

impl KinesisEvent {
    /// Decodes the records and groups them by shard (an event source mapping sends one shard
    /// per invocation; an event with several is split here), each shard's records in
    /// sequence order. A record listed twice is kept once.
    ///
    /// # Errors
    /// [`EventError::BadRecord`] for a record Kinesis could not have sent: an `eventID`
    /// without a shard id, an invalid sequence number, data that is not base64, an arrival
    /// time that is not a time.
    pub fn shard_batches(&self) -> Result<Vec<ShardBatch>, EventError> {
        let mut by_shard: BTreeMap<(String, String), Vec<ShardEventRecord>> = BTreeMap::new();
        let mut order: Vec<(String, String)> = Vec::new();
        for r in &self.records {
            let bad = |why: String| EventError::BadRecord {
                event_id: r.event_id.chars().take(200).collect(),
                why,
            };
            let shard = match r.event_id.split_once(':') {
                Some((shard, _)) if !shard.is_empty() => shard.to_owned(),
                _ => {
                    return Err(bad(
                        "the eventID is not `<shard id>:<sequence number>`".into()
                    ));
                }
            };
            let stream = stream_of_arn(&r.event_source_arn).ok_or_else(|| {
                bad(format!(
                    "eventSourceARN {:?} is not a Kinesis stream ARN",
                    r.event_source_arn
                ))
            })?;
            let sequence = SequenceNumber::parse(&r.kinesis.sequence_number)
                .map_err(|e| bad(e.to_string()))?;
            let data = base64::engine::general_purpose::STANDARD
                .decode(r.kinesis.data.as_bytes())
                .map_err(|e| bad(format!("data is not base64: {e}")))?;
            let arrival_us =
                arrival_micros(r.kinesis.approximate_arrival_timestamp).ok_or_else(|| {
                    bad(format!(
                        "approximateArrivalTimestamp {} is not a time in seconds since the epoch",
                        r.kinesis.approximate_arrival_timestamp
                    ))
                })?;
            let key = (stream.to_owned(), shard);
            let list = by_shard.entry(key.clone()).or_insert_with(|| {
                order.push(key);
                Vec::new()
            });
            list.push(ShardEventRecord {
                sequence,
                partition_key: r.kinesis.partition_key.clone(),
                data: Bytes::from(data),
                arrival_us,
            });
        }
        let mut out = Vec::with_capacity(order.len());
        for key in order {
            let mut records = by_shard.remove(&key).unwrap_or_default();
            // Event source mappings deliver in order; sorting (stable) costs nothing then and
            // keeps the checkpoint right if a hand-made event does not.
            records.sort_by(|a, b| a.sequence.cmp(&b.sequence));
            records.dedup_by(|a, b| a.sequence == b.sequence);
            let (stream, shard) = key;
            out.push(ShardBatch {
                stream,
                shard,
                records,
            });
        }
        Ok(out)
    }
}

/// The stream name in a stream ARN (also with an enhanced fan-out consumer's
/// `/consumer/NAME:…` suffix), or in a bare name.
fn stream_of_arn(arn: &str) -> Option<&str> {
    let name = stream_name(arn);
    let name = name.split('/').next().unwrap_or(name);
    let valid = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    valid.then_some(name)
}

/// Seconds since the epoch (with a fraction) as whole microseconds; `None` when not finite or
/// out of range. Deterministic: the same JSON number always gives the same value.
fn arrival_micros(secs: f64) -> Option<i64> {
    let us = (secs * 1e6).round();
    // 2^62 µs is far beyond any real arrival time and exactly representable.
    (us.is_finite() && us.abs() < 4.611_686_018_427_388e18).then_some(us as i64)
}

/// One entry of [`BatchResponse::batch_item_failures`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchItemFailure {
    /// The sequence number of the first record of its shard that is not committed; the event
    /// source mapping retries from it.
    #[serde(rename = "itemIdentifier")]
    pub item_identifier: String,
}

/// The answer to a Kinesis event (partial batch response, `ReportBatchItemFailures`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchResponse {
    /// Empty when every record is committed (to the telemetry or the dead-letter table).
    #[serde(rename = "batchItemFailures")]
    pub batch_item_failures: Vec<BatchItemFailure>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const ARN: &str = "arn:aws:kinesis:eu-west-1:123456789012:stream/telemetry";
    const SEQ1: &str = "49590338271490256608559692538361571095921575989136588898";
    const SEQ2: &str = "49590338271490256608559692540925702759324208523137515618";

    fn record(shard: &str, seq: &str, data: &[u8]) -> serde_json::Value {
        json!({
            "kinesis": {
                "kinesisSchemaVersion": "1.0",
                "partitionKey": "env-000001",
                "sequenceNumber": seq,
                "data": base64::engine::general_purpose::STANDARD.encode(data),
                "approximateArrivalTimestamp": 1764255845.123
            },
            "eventSource": "aws:kinesis",
            "eventVersion": "1.0",
            "eventID": format!("{shard}:{seq}"),
            "eventName": "aws:kinesis:record",
            "invokeIdentityArn": "arn:aws:iam::123456789012:role/lambda-role",
            "awsRegion": "eu-west-1",
            "eventSourceARN": ARN
        })
    }

    fn kinesis(records: Vec<serde_json::Value>) -> KinesisEvent {
        match Invocation::parse(json!({ "Records": records })).expect("parses") {
            Invocation::Kinesis(e) => e,
            other => panic!("not a Kinesis event: {other:?}"),
        }
    }

    #[test]
    fn decodes_a_kinesis_event_as_aws_sends_it() {
        let e = kinesis(vec![record("shardId-000000000006", SEQ1, b"{\"a\":1}")]);
        let batches = e.shard_batches().expect("valid");
        assert_eq!(batches.len(), 1);
        let b = &batches[0];
        assert_eq!(
            (b.stream.as_str(), b.shard.as_str()),
            ("telemetry", "shardId-000000000006")
        );
        assert_eq!(b.records[0].sequence.as_str(), SEQ1);
        assert_eq!(&b.records[0].data[..], b"{\"a\":1}");
        assert_eq!(b.records[0].partition_key, "env-000001");
        assert_eq!(b.records[0].arrival_us, 1_764_255_845_123_000);
    }

    #[test]
    fn sorts_records_numerically_and_drops_repeats() {
        let e = kinesis(vec![
            record("shardId-000000000001", SEQ2, b"2"),
            record("shardId-000000000001", SEQ1, b"1"),
            record("shardId-000000000001", SEQ2, b"2"),
            record("shardId-000000000001", "9", b"0"),
        ]);
        let b = e.shard_batches().expect("valid");
        let seqs: Vec<&str> = b[0].records.iter().map(|r| r.sequence.as_str()).collect();
        assert_eq!(seqs, ["9", SEQ1, SEQ2]);
    }

    #[test]
    fn splits_an_event_with_two_shards_in_first_seen_order() {
        let e = kinesis(vec![
            record("shardId-000000000002", SEQ1, b"a"),
            record("shardId-000000000001", SEQ1, b"b"),
            record("shardId-000000000002", SEQ2, b"c"),
        ]);
        let b = e.shard_batches().expect("valid");
        let shards: Vec<(&str, usize)> = b
            .iter()
            .map(|s| (s.shard.as_str(), s.records.len()))
            .collect();
        assert_eq!(
            shards,
            [("shardId-000000000002", 2), ("shardId-000000000001", 1)]
        );
    }

    #[test]
    fn rejects_records_kinesis_could_not_have_sent() {
        let mut no_shard = record("shardId-000000000001", SEQ1, b"a");
        no_shard["eventID"] = json!(SEQ1);
        let mut bad_seq = record("shardId-000000000001", "12x", b"a");
        bad_seq["eventID"] = json!("shardId-000000000001:12x");
        let mut bad_b64 = record("shardId-000000000001", SEQ1, b"a");
        bad_b64["kinesis"]["data"] = json!("not base64!");
        let mut bad_arn = record("shardId-000000000001", SEQ1, b"a");
        bad_arn["eventSourceARN"] = json!("arn:aws:kinesis:eu-west-1:1:stream/");
        for (r, needle) in [
            (no_shard, "eventID"),
            (bad_seq, "sequence number"),
            (bad_b64, "base64"),
            (bad_arn, "eventSourceARN"),
        ] {
            let e = kinesis(vec![r]).shard_batches().expect_err("must fail");
            assert!(e.to_string().contains(needle), "{e}");
        }
        let missing = Invocation::parse(json!({"Records": [{"eventID": "x"}]}))
            .expect_err("a record without fields");
        assert!(matches!(missing, EventError::Malformed { .. }), "{missing}");
    }

    #[test]
    fn reads_the_stream_name_of_plain_and_consumer_arns() {
        assert_eq!(stream_of_arn(ARN), Some("telemetry"));
        assert_eq!(
            stream_of_arn("arn:aws:kinesis:eu-west-1:1:stream/telemetry/consumer/c1:1700000000"),
            Some("telemetry")
        );
        assert_eq!(stream_of_arn("arn:aws:kinesis:eu-west-1:1:stream/"), None);
        assert_eq!(
            stream_of_arn("arn:aws:kinesis:eu-west-1:1:stream/a b"),
            None
        );
    }

    #[test]
    fn arrival_times_round_to_whole_microseconds() {
        assert_eq!(arrival_micros(1545084650.987), Some(1_545_084_650_987_000));
        assert_eq!(arrival_micros(0.000_001), Some(1));
        assert_eq!(arrival_micros(f64::NAN), None);
        assert_eq!(arrival_micros(1e300), None);
    }

    #[test]
    fn tells_compaction_and_schedules_from_other_events() {
        match Invocation::parse(json!({"action": "compact", "older_than_secs": 60})) {
            Ok(Invocation::Compact(r)) => assert_eq!(r.older_than_secs, Some(60)),
            other => panic!("{other:?}"),
        }
        let scheduled = json!({
            "version": "0", "id": "x", "detail-type": "Scheduled Event", "source": "aws.events",
            "account": "123456789012", "time": "2026-11-27T15:00:00Z", "region": "eu-west-1",
            "resources": [], "detail": {}
        });
        assert!(matches!(
            Invocation::parse(scheduled),
            Ok(Invocation::Compact(CompactRequest {
                older_than_secs: None,
                ..
            }))
        ));
        for bad in [
            json!({"action": "vacuum"}),
            json!({"hello": 1}),
            json!([1, 2]),
            json!("compact"),
        ] {
            assert!(
                matches!(
                    Invocation::parse(bad.clone()),
                    Err(EventError::Unrecognised(_))
                ),
                "{bad}"
            );
        }
        let typo = Invocation::parse(json!({"action": "compact", "older_than": 5}))
            .expect_err("unknown key");
        assert!(typo.to_string().contains("older_than"), "{typo}");
    }

    #[test]
    fn the_response_uses_the_names_lambda_expects() {
        let r = BatchResponse {
            batch_item_failures: vec![BatchItemFailure {
                item_identifier: SEQ1.into(),
            }],
        };
        assert_eq!(
            serde_json::to_value(&r).expect("serializes"),
            json!({"batchItemFailures": [{"itemIdentifier": SEQ1}]})
        );
    }
}
