//! One shard's reader: GetRecords in a paced loop, records handed to the pipeline in order.
//!
//! Limits kept: at most one call per `poll_interval` (200 ms = the service's 5 calls per second
//! per shard), `idle_poll_interval` after a call that returned nothing, capped jittered backoff
//! on throttling (ProvisionedThroughputExceeded, KMS throttling) and on transport errors. An
//! expired iterator is replaced by one AFTER the last record handed to the pipeline (every
//! record before it is committed or waiting in the pipeline to be), or at the starting position
//! when nothing was handed over yet. The reader stops at the end of a closed shard (a split or
//! merge parent) after handing over an end marker, when its lease runs out, or when cancelled.

use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_kinesis::operation::get_records::GetRecordsError;
use aws_sdk_kinesis::operation::get_shard_iterator::GetShardIteratorError;
use aws_sdk_kinesis::types::ShardIteratorType;
use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::checkpoint::ShardCheckpoint;
use super::client::describe;
use super::records::{ShardRecord, expand};
use super::seqnum::SequenceNumber;
use crate::backoff::Backoff;

/// What the reader hands the pipeline: records of one GetRecords call, in shard order.
#[derive(Debug)]
pub struct ShardBatch {
    /// The shard.
    pub shard: Arc<str>,
    /// The lane generation this reader belongs to; a batch of an older generation is dropped.
    pub epoch: u64,
    /// The records (may be empty on the end marker).
    pub records: Vec<ShardRecord>,
    /// The shard is closed and this is its last batch: after committing it, the shard is done.
    pub end: bool,
}

/// Where a reader starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// After a committed record.
    After(SequenceNumber),
    /// At a record of which only some user records (a KPL aggregate) are committed.
    At(SequenceNumber),
    /// The oldest record in the shard.
    TrimHorizon,
    /// Records put from now on.
    Latest,
    /// Records put at or after this time (ms since the epoch).
    AtTimestamp(i64),
}

impl Start {
    /// Where to start given a shard's committed checkpoint (if any), whether it has a parent,
    /// and the configured start for new shards.
    pub fn from_checkpoint(
        checkpoint: Option<&ShardCheckpoint>,
        has_parent: bool,
        configured: &Start,
    ) -> Start {
        match checkpoint.and_then(|c| c.sequence.as_ref().map(|s| (s, c.sub_sequence))) {
            Some((seq, Some(_))) => Start::At(seq.clone()),
            Some((seq, None)) => Start::After(seq.clone()),
            // A child of a split or merge is read from its beginning: its parents were read to
            // their ends, and this is where their data continues.
            None if has_parent => Start::TrimHorizon,
            None => configured.clone(),
        }
    }
}

/// How a reader ended.
#[derive(Debug, PartialEq, Eq)]
pub enum ReaderExit {
    /// The shard is closed and read to its end (the end marker was handed over).
    Ended,
    /// Cancelled (shutdown, or the lease was lost or handed off).
    Stopped,
    /// The pipeline went away.
    PipelineGone,
}

/// A failure the reader cannot get past by waiting.
#[derive(Debug, thiserror::Error)]
#[error("shard {shard} of stream {stream}: {why}")]
pub struct ReaderError {
    /// The stream.
    pub stream: String,
    /// The shard.
    pub shard: String,
    /// What happened and what to do.
    pub why: String,
}

/// Everything one reader needs.
#[derive(Debug, Clone)]
pub struct ReaderSpec {
    /// The stream's name.
    pub stream: String,
    /// The shard.
    pub shard: Arc<str>,
    /// Lane generation, copied into every batch.
    pub epoch: u64,
    /// Where to start.
    pub start: Start,
    /// The committed checkpoint, whose user records are skipped (a part-committed aggregate).
    pub committed: Option<ShardCheckpoint>,
    /// Records per call.
    pub limit: i32,
    /// Least time between calls.
    pub poll_interval: Duration,
    /// Wait after an empty call.
    pub idle_poll_interval: Duration,
    /// The shard's lease, when leases are on: no call is made while it is not held.
    pub lease: Option<Arc<super::lease::LeaseClock>>,
}

/// Reads `spec.shard` until it ends, `cancel` fires, or an error that waiting cannot fix.
///
/// # Errors
/// [`ReaderError`] when the stream or shard does not exist or access is denied.
pub async fn read_shard(
    client: aws_sdk_kinesis::Client,
    spec: ReaderSpec,
    tx: mpsc::Sender<ShardBatch>,
    cancel: CancellationToken,
) -> Result<ReaderExit, ReaderError> {
    let fail = |why: String| ReaderError {
        stream: spec.stream.clone(),
        shard: spec.shard.to_string(),
        why,
    };
    let shard_label = spec.shard.to_string();
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    // The last record handed to the pipeline: where a replacement iterator starts.
    let mut handed: Option<SequenceNumber> = None;
    let mut iterator: Option<String> = None;
    let mut next_call = Instant::now();
    info!(stream = %spec.stream, shard = %spec.shard, start = ?spec.start, "Reading shard");
    loop {
        if cancel.is_cancelled() {
            return Ok(ReaderExit::Stopped);
        }
        tokio::select! {
            () = cancel.cancelled() => return Ok(ReaderExit::Stopped),
            () = tokio::time::sleep_until(next_call.into()) => {}
        }
        // A lease not renewed in time: another worker may take it soon, so no more reads
        // until the coordinator renews it or stops this reader.
        if spec.lease.as_ref().is_some_and(|l| !l.is_valid()) {
            next_call = Instant::now() + Duration::from_millis(100);
            continue;
        }
        let it = match iterator.take() {
            Some(it) => it,
            None => {
                let start = match &handed {
                    Some(seq) => Start::After(seq.clone()),
                    None => spec.start.clone(),
                };
                match get_iterator(&client, &spec, &start).await {
                    Ok(it) => it,
                    Err(IteratorFailure::Fatal(why)) => return Err(fail(why)),
                    Err(IteratorFailure::Retry(why)) => {
                        let delay = backoff.next_delay();
                        warn!(shard = %spec.shard, error = %why, retry_in_ms = delay.as_millis() as u64,
                              "GetShardIterator failed; retrying");
                        next_call = Instant::now() + delay;
                        continue;
                    }
                }
            }
        };
        let called = Instant::now();
        let result = client
            .get_records()
            .shard_iterator(&it)
            .limit(spec.limit)
            .send()
            .await;
        let out = match result {
            Ok(out) => out,
            Err(e) => {
                let service = e.as_service_error();
                let (kind, keep_iterator) = match service {
                    Some(GetRecordsError::ProvisionedThroughputExceededException(_))
                    | Some(GetRecordsError::KmsThrottlingException(_)) => ("throttled", true),
                    Some(GetRecordsError::ExpiredIteratorException(_)) => {
                        ("expired_iterator", false)
                    }
                    Some(
                        GetRecordsError::ResourceNotFoundException(_)
                        | GetRecordsError::AccessDeniedException(_)
                        | GetRecordsError::InvalidArgumentException(_)
                        | GetRecordsError::KmsAccessDeniedException(_)
                        | GetRecordsError::KmsNotFoundException(_)
                        | GetRecordsError::KmsDisabledException(_),
                    ) => return Err(fail(describe(&e))),
                    _ => ("error", true),
                };
                metrics::counter!("sensorlake_kinesis_get_records_errors_total", "kind" => kind)
                    .increment(1);
                if kind == "expired_iterator" {
                    info!(shard = %spec.shard, after = ?handed,
                          "The shard iterator expired; getting a new one after the last record handed over");
                    next_call = called + spec.poll_interval;
                    continue;
                }
                if keep_iterator {
                    iterator = Some(it);
                }
                let delay = backoff.next_delay();
                if kind == "throttled" {
                    debug!(shard = %spec.shard, retry_in_ms = delay.as_millis() as u64,
                           "GetRecords throttled; backing off");
                } else {
                    warn!(shard = %spec.shard, error = %describe(&e), retry_in_ms = delay.as_millis() as u64,
                          "GetRecords failed; retrying");
                }
                next_call = Instant::now() + delay.max(spec.poll_interval);
                continue;
            }
        };
        backoff.reset();
        metrics::counter!("sensorlake_kinesis_get_records_total").increment(1);
        if let Some(ms) = out.millis_behind_latest {
            metrics::gauge!("sensorlake_kinesis_millis_behind_latest", "shard" => shard_label.clone())
                .set(ms as f64);
        }
        let fetched = out.records.len();
        let mut records = Vec::with_capacity(fetched);
        for r in out.records {
            let seq = match SequenceNumber::parse(&r.sequence_number) {
                Ok(s) => s,
                Err(e) => return Err(fail(format!("the service returned {e}"))),
            };
            let arrival_us = r
                .approximate_arrival_timestamp
                .and_then(|t| t.to_millis().ok())
                .map_or_else(now_us, |ms| ms.saturating_mul(1000));
            let data = Bytes::from(r.data.into_inner());
            let key = r.partition_key.unwrap_or_default();
            expand(
                &spec.shard,
                &seq,
                &key,
                data,
                arrival_us,
                spec.committed.as_ref(),
                &mut records,
            );
            handed = Some(seq);
        }
        let end = out.next_shard_iterator.is_none();
        if !records.is_empty() || end {
            metrics::counter!("sensorlake_kinesis_records_total").increment(records.len() as u64);
            let batch = ShardBatch {
                shard: spec.shard.clone(),
                epoch: spec.epoch,
                records,
                end,
            };
            // Bounded: a pipeline that is behind stops this reader here, and no new poll is made.
            tokio::select! {
                () = cancel.cancelled() => return Ok(ReaderExit::Stopped),
                sent = tx.send(batch) => if sent.is_err() { return Ok(ReaderExit::PipelineGone) },
            }
        }
        if end {
            info!(stream = %spec.stream, shard = %spec.shard, "Shard read to its end (closed by a split or merge)");
            return Ok(ReaderExit::Ended);
        }
        iterator = out.next_shard_iterator;
        next_call = called
            + if fetched == 0 {
                spec.idle_poll_interval
            } else {
                spec.poll_interval
            };
    }
}

enum IteratorFailure {
    Fatal(String),
    Retry(String),
}

async fn get_iterator(
    client: &aws_sdk_kinesis::Client,
    spec: &ReaderSpec,
    start: &Start,
) -> Result<String, IteratorFailure> {
    let mut req = client
        .get_shard_iterator()
        .stream_name(&spec.stream)
        .shard_id(spec.shard.as_ref());
    req = match start {
        Start::After(seq) => req
            .shard_iterator_type(ShardIteratorType::AfterSequenceNumber)
            .starting_sequence_number(seq.as_str()),
        Start::At(seq) => req
            .shard_iterator_type(ShardIteratorType::AtSequenceNumber)
            .starting_sequence_number(seq.as_str()),
        Start::TrimHorizon => req.shard_iterator_type(ShardIteratorType::TrimHorizon),
        Start::Latest => req.shard_iterator_type(ShardIteratorType::Latest),
        Start::AtTimestamp(ms) => req
            .shard_iterator_type(ShardIteratorType::AtTimestamp)
            .timestamp(aws_sdk_kinesis::primitives::DateTime::from_millis(*ms)),
    };
    match req.send().await {
        Ok(out) => out.shard_iterator.ok_or_else(|| {
            IteratorFailure::Retry("GetShardIterator returned no iterator".to_owned())
        }),
        Err(e) => match e.as_service_error() {
            Some(
                GetShardIteratorError::ResourceNotFoundException(_)
                | GetShardIteratorError::AccessDeniedException(_)
                | GetShardIteratorError::InvalidArgumentException(_),
            ) => Err(IteratorFailure::Fatal(describe(&e))),
            _ => Err(IteratorFailure::Retry(describe(&e))),
        },
    }
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sn(s: &str) -> SequenceNumber {
        SequenceNumber::parse(s).expect("valid")
    }

    #[test]
    fn starts_after_the_checkpoint_at_a_part_committed_aggregate_or_at_the_beginning_of_a_child() {
        let configured = Start::Latest;
        assert_eq!(
            Start::from_checkpoint(None, false, &configured),
            Start::Latest
        );
        assert_eq!(
            Start::from_checkpoint(None, true, &configured),
            Start::TrimHorizon,
            "a child reads from its first record"
        );
        let mut cp = ShardCheckpoint::new("s", "shardId-000000000001");
        cp.advance(&sn("42"), None, true);
        assert_eq!(
            Start::from_checkpoint(Some(&cp), true, &configured),
            Start::After(sn("42"))
        );
        cp.advance(&sn("43"), Some(1), false);
        assert_eq!(
            Start::from_checkpoint(Some(&cp), false, &configured),
            Start::At(sn("43")),
            "the rest of the aggregate is still to be read"
        );
    }
}
