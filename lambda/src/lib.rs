//! sensorlake as an AWS Lambda function: Kinesis records from an event source mapping in,
//! the same lake out as the long-lived service writes, exactly once.
//!
//! The `sensorlake-lambda` binary (`main.rs`) only wires the Lambda runtime to a
//! [`Handler`]; everything an invocation does is here, callable with a JSON fixture and no
//! runtime:
//!
//! - [`event`]: the events the function takes (a Kinesis event, `{"action": "compact"}`, an
//!   EventBridge schedule) and the partial batch response it gives;
//! - [`handler`]: configuration loaded at cold start ([`Settings`]), then per invocation the
//!   shard's batch → expand → transform → commit, or a compaction run.
//!
//! # Exactly once without state of its own
//!
//! Each shard is written by one lake writer, `ks-<stream>-<shard>`
//! ([`shard_writer_id`](sensorlake_ingest::kinesis::shard_writer_id)), and every commit of that
//! writer records, in the same atomic commit record as the files, the shard's checkpoint: the
//! last record (and, inside a KPL aggregate, the last user record) it holds. An invocation
//! opens the lake as that writer, skips every record the checkpoint covers, and commits the
//! rest as one flush whose checkpoint is advanced to its last record. So:
//!
//! - **A retried batch writes nothing.** Its records are covered by the checkpoint committed
//!   the first time; the lake's files stay byte for byte what they were. The issue asked that a
//!   retry "rewrite the same files"; skipping is stronger, because it does not depend on the
//!   batch boundaries: after bisect-on-error, a different batch size or batching window, or a
//!   partial-failure retry that starts mid-batch, files named after a batch's first/last
//!   sequence numbers would be different files holding the same rows. A batch that straddles
//!   the checkpoint commits only its uncommitted tail.
//! - **A crash at any point is repaired by the next invocation.** A flush either passed its
//!   commit point (its files and checkpoint are in the lake; recovery at the next open finishes
//!   making the files visible) or did not (recovery removes its temporary files, and the
//!   checkpoint does not cover its records, so they are written again).
//! - **Failures are reported per record.** A commit that fails, after a few quick retries
//!   within the invocation's time, is reported as `batchItemFailures` naming the first record
//!   the committed checkpoint does not cover; nothing after it was committed, since the batch
//!   is one flush. An unknown outcome (the store may or may not hold the commit record) is
//!   reported the same way: the retry's recovery reads what the store holds, and the
//!   checkpoint then covers the records or not. Bad records (bad JSON, invalid readings, a
//!   corrupt KPL aggregate) are dead letters, committed like any reading, never failures.
//! - **The function never fails the invocation for these**, so bisect-on-error only splits
//!   batches after a crash or timeout. A function error is returned only for an event that is
//!   not a Kinesis event or a compaction request, or for a bug (a panicking task).
//!
//! This needs one invocation per shard at a time, with the shard's records in order — the
//! event source mapping's `ParallelizationFactor: 1`. With a higher factor Lambda splits a
//! shard's records by partition key over concurrent batches whose sequence numbers interleave:
//! one checkpoint per shard could then not say what is committed (a batch would skip the other
//! batch's uncommitted records as covered, which loses them), and two invocations would race
//! for the writer's next commit number. The long-lived consumer (`sensorlake run --kinesis`)
//! uses the same writer ids, so either can take over from the other — but never both at once
//! on one stream.

pub mod event;
pub mod handler;

pub use event::{BatchItemFailure, BatchResponse, CompactRequest, Invocation, KinesisEvent};
pub use handler::{Handler, HandlerError, InitError, Settings, ShardOutcome, ShardReport};
