//! The Kinesis source: shard readers, KPL de-aggregation, checkpoints kept in the lake, and
//! optional DynamoDB leases to split a stream's shards between several consumers.

pub mod checkpoint;
pub mod client;
pub mod config;
pub mod consumer;
pub mod kpl;
pub mod lease;
pub mod reader;
pub mod records;
pub mod seqnum;

pub use checkpoint::{ShardCheckpoint, arn_parts, shard_writer_id, stream_name};
pub use config::{KinesisConfig, StartPosition};
pub use consumer::{KinesisSource, LaneRequest, OpenReply, ShardInfo};
pub use reader::ShardBatch;
pub use records::ShardRecord;
pub use seqnum::SequenceNumber;
