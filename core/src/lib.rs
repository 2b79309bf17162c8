//! Types every sensorlake stage shares.
//!
//! The crate graph is the architecture: `ingest` produces [`RawRecord`]s, `transform` turns them
//! into Arrow batches shaped by [`TelemetrySchema`], and `sink` writes those batches with the
//! [`DeviceCheckpoint`]s and [`FlushCounts`] of the flush into its commit records. None of the
//! stages depend on each other; they meet here. Nothing in this crate does I/O.

pub mod fingerprint;
pub mod reason;
pub mod record;
pub mod schema;
pub mod time;

pub use reason::Reason;
pub use record::{DeviceCheckpoint, FlushCounts, RawRecord, SourceKind};
pub use schema::{DeviceTypeSpec, MetricSpec, TelemetrySchema, columns};
