//! The sensorlake sink: the lake on a local folder or an object store (S3, Azure Blob, GCS).
//!
//! The sink owns the lake's layout (Hive partitions of `telemetry/` and `dead_letter/`),
//! Parquet encoding, and the commit protocol that makes every flush durable and visible exactly
//! once across crashes ([`lake`] explains it). It takes Arrow batches shaped by
//! [`sensorlake_core::TelemetrySchema`] with the flush's counts, device checkpoints and opaque
//! source positions, and knows nothing of where the records came from.
//!
//! The API is blocking; async callers run [`Lake::commit`] on a blocking thread. Storage goes
//! through one internal enum (`store`): `local` (`std::fs`, fsync and rename) or `object`
//! (`object_store`: conditional puts, multipart uploads, copy then delete, on a runtime of its
//! own). The protocol in [`lake`] is written once against it, and `conformance` runs one suite
//! of scenarios on a folder, an in-memory store, `moto_server`'s S3 and Azurite's Azure Blob.
//! [`compact`] merges the small files of closed partitions with a protocol of the same shape.
//!
//! ```text
//! <lake>/telemetry/date=YYYY-MM-DD/hour=HH/part-<writer>-<commit:010>-<n:04>.parquet
//! <lake>/telemetry/date=YYYY-MM-DD/hour=HH/compact-<compaction:010>-<k:04>.parquet
//! <lake>/dead_letter/date=YYYY-MM-DD/part-<writer>-<commit:010>-<n:04>.parquet
//! <lake>/_sensorlake/commits/<writer>/<commit:020>.json
//! <lake>/_sensorlake/tmp/<writer>/<commit:020>/<n>.parquet
//! <lake>/_sensorlake/locks/<writer>.lock
//! <lake>/_sensorlake/compactions/<compaction:020>.json
//! <lake>/_sensorlake/compactions/tmp/<compaction:020>/<k>.parquet
//! ```

mod aws_profile;
pub mod compact;
mod encode;
mod error;
#[doc(hidden)]
pub mod failpoint;
pub mod lake;
mod layout;
mod local;
mod object;
mod options;
mod partition;
mod reader;
mod record;
mod store;
mod writer_id;

#[cfg(test)]
mod compact_tests;
#[cfg(test)]
mod conformance;
#[cfg(test)]
mod faults;
#[cfg(test)]
mod test_util;
#[cfg(test)]
mod tests;

#[doc(hidden)]
pub use compact::CompactStep;
pub use compact::{
    CompactOptions, CompactRecovered, CompactSummary, CompactedPartition, CompactionRecord,
    Compactor, SkippedPartition, compact, compact_object_store,
};
#[doc(hidden)]
pub use encode::encode_flush_discarding;
pub use encode::encode_parquet;
pub use error::SinkError;
#[doc(hidden)]
pub use lake::CommitStep;
pub use lake::{CommitSummary, Flush, Lake, Recovered, peek_writer};
pub use options::LakeOptions;
pub use reader::LakeReader;
pub use record::{
    COMMIT_RECORD_VERSION, CommitRecord, CommittedFile, FileEntry, Table, read_commit_records,
};
pub use writer_id::{MAX_WRITER_ID_LEN, WriterId};
