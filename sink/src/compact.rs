//! Compaction: the small files of closed partitions merged into files near a target size,
//! sorted by `(device_id, ts)`, with the swap recorded as a commit.
//!
//! A writer commits one file per partition per flush, so an hour of telemetry ends up as
//! hundreds of small files, each with its own footer and row group, and engines pay per file.
//! [`Compactor::run`] (the `sensorlake compact` command) rewrites them.
//!
//! # What it compacts
//!
//! - **Partitions:** telemetry hours (`telemetry/date=…/hour=…/`) that ended more than
//!   [`CompactOptions::older_than`] ago, and dead-letter days (`dead_letter/date=…/`) likewise.
//! - **Files:** the `.parquet` files of such a partition smaller than
//!   [`CompactOptions::target_size_bytes`] — except the files listed in the last commit record
//!   of any writer (a writer's recovery re-publishes its last commit and would report them
//!   missing), and files whose columns are not the lake's (left alone with a warning). A
//!   partition is compacted when at least two files qualify.
//! - **Late data:** files that appear in a partition while it is being compacted are not
//!   touched: compaction deletes exactly the inputs it merged, named in its record.
//!
//! # The protocol
//!
//! It mirrors the writers' commit protocol ([`crate::lake`]):
//!
//! 0. **Lease.** One compaction at a time per lake: locally a file lock on
//!    `_sensorlake/compactions/compactor.lease` (released by the kernel when the process ends);
//!    on an object store an object of that name created with a conditional put and deleted at
//!    the end. A killed compaction leaves that object behind, and the next one fails naming it:
//!    delete it if no compaction is running.
//! 1. **Recovery** of an interrupted compaction: see [below](#recovery).
//! 2. **Plan.** List the closed partitions and their files, *then* read the last commit
//!    record of every writer. In that order, a listed file whose commit is not the last one at
//!    that moment can never be re-published by its writer's recovery.
//!
//! Then for each partition, as compaction number `n` (one more than the last record's):
//!
//! 3. **Merge.** The inputs are merged (see [Memory](#memory)) into outputs written to
//!    `_sensorlake/compactions/tmp/<n:020>/<k>.parquet`, with the lake's writer properties;
//!    an output is closed once its size reaches the target. Outputs are fsynced, then their
//!    folder. Nothing a reader globs sees these names.
//! 4. **Commit point.** The compaction record `_sensorlake/compactions/<n:020>.json` (the
//!    partition, every input with its rows and bytes, every output with its final and
//!    temporary paths, rows and bytes) is written atomically: locally to a temporary name,
//!    fsynced and renamed; on an object store with a conditional put. From here on the swap
//!    happens, whatever crashes.
//! 5. **Swap.** Every output is renamed to `<partition>/compact-<n:010>-<k:04>.parquet`
//!    (object stores: copied, then the temporary object deleted), then every input is
//!    deleted, then the partition folder is fsynced.
//! 6. **Clean up.** The temporary folder is removed.
//!
//! A failure before step 4 removes the temporary files and stops the run (a partition whose
//! inputs cannot be read is skipped instead, and reported). A failure after it stops the run;
//! the next run's recovery finishes the swap.
//!
//! # What a directory reader sees
//!
//! A reader that globs `telemetry/**/*.parquet` sees the old files until the first rename of
//! step 5 and the new files after the last delete of step 5. **In between, it may see some
//! rows twice** — in an output already renamed and in an input not yet deleted — though never
//! part of a file. The window is as short as the protocol can make it: every output is
//! written, durable and committed before the first rename, and the renames and deletes follow
//! one another with nothing in between (the one fsync comes after the last delete). Locally it
//! lasts a rename per output and an unlink per input (well under a millisecond each); on an
//! object store, a server-side copy and a DELETE per output (about a second for 128 MiB) and
//! one bulk DELETE per 1,000 inputs. A reader that may never double-count either reads while
//! no compaction runs, or skips
//! a `compact-<n>-*` file while any input listed in `_sensorlake/compactions/<n:020>.json` is
//! still visible. A killed compaction extends the window until the next run's recovery.
//!
//! # Memory
//!
//! Inputs are read whole (compressed) and decoded batch by batch. The files a writer wrote are
//! each sorted by `(device_id, ts)` already, so telemetry is merged with a k-way merge of the
//! inputs rather than sorted: memory holds the compressed inputs plus one small decoded batch
//! per input, never the partition decoded. An input found unsorted (a checked projection of
//! its two key columns tells) is decoded and sorted on its own first. A partition whose
//! candidates exceed [`CompactOptions::merge_memory_bytes`] is merged in several groups of
//! at most that many compressed bytes, in name order; each group's outputs hold consecutive,
//! non-overlapping `(device_id, ts)` ranges, but ranges of different groups overlap, and each
//! group may leave one output under the target size (the next run merges those). Dead letters
//! are not sorted: their files are concatenated in name order. Before its commit point a
//! compaction checks that its outputs hold exactly as many rows as its inputs' footers say.
//!
//! # Recovery
//!
//! After taking the lease, [`Compactor::open`] reads the last compaction record. If that
//! compaction is unfinished (an output still under its temporary name, or an input still
//! present), it finishes it: renames every output whose temporary file exists and final name
//! does not, then deletes the inputs still present. Only the last compaction can be unfinished,
//! because a run stops at the first failure after a commit point and the next run starts with
//! recovery. If an output exists under neither name while an input is still there, finishing
//! would lose or double rows: it stops with [`SinkError::CompactionBroken`] for a human.
//! Recovery then deletes every temporary folder (compactions that never reached their record)
//! and any record left under its temporary name.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arrow::array::{AsArray, RecordBatch, StringArray, TimestampMicrosecondArray};
use arrow::compute::interleave_record_batch;
use arrow::datatypes::{SchemaRef, TimestampMicrosecondType};
use arrow::error::ArrowError;
use bytes::Bytes;
use parquet::arrow::ArrowWriter;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReaderBuilder,
};
use parquet::errors::ParquetError;
use parquet::file::properties::WriterProperties;
use sensorlake_core::TelemetrySchema;
use sensorlake_core::columns;
use sensorlake_core::time::{MICROS_PER_DAY, MICROS_PER_HOUR, format_rfc3339_millis};
use serde::{Deserialize, Serialize};

use crate::encode::writer_properties;
use crate::layout;
use crate::local::PutError;
use crate::object::ObjectStorage;
use crate::partition;
use crate::record::{self, Table};
use crate::store::{Store, StoreWriter, WriterLock};
use crate::{LakeOptions, SinkError};

/// The compaction record format this crate writes and reads.
pub const COMPACTION_RECORD_VERSION: u32 = 1;

/// Rows per batch handed to the Parquet writer by the merge, at most: outputs are closed
/// between batches.
const OUT_BATCH_ROWS: usize = 8192;

/// Rows per batch handed to the Parquet writer, at least (for small targets).
const MIN_OUT_BATCH_ROWS: usize = 64;

/// Decoded rows held across all inputs of a merge (one batch each): the per-input batch size is
/// this divided by the number of inputs, within [`MIN_IN_BATCH_ROWS`]..=[`OUT_BATCH_ROWS`].
/// At ~250 bytes a decoded telemetry row, about 64 MiB.
const MERGE_ROWS_IN_MEMORY: usize = 256 * 1024;

/// The smallest batch read from one input, however many inputs there are.
const MIN_IN_BATCH_ROWS: usize = 256;

/// What to compact and how big to make the files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompactOptions {
    /// A partition is compacted only once its hour (telemetry) or day (dead letters) ended at
    /// least this long ago, so that files of late readings have mostly arrived. Default 2 h.
    pub older_than: Duration,
    /// Outputs are closed once they reach this size; files at least this big are left alone.
    /// Default 128 MiB.
    pub target_size_bytes: u64,
    /// The most compressed input bytes held in memory by one merge: a partition with more is
    /// merged in several groups. Default 1 GiB.
    pub merge_memory_bytes: u64,
}

impl Default for CompactOptions {
    fn default() -> Self {
        Self {
            older_than: Duration::from_secs(2 * 3600),
            target_size_bytes: 128 << 20,
            merge_memory_bytes: 1 << 30,
        }
    }
}

impl CompactOptions {
    /// Checks every value is in range.
    ///
    /// # Errors
    /// [`SinkError::InvalidOptions`] naming the first bad field.
    pub fn validate(&self) -> Result<(), SinkError> {
        if self.target_size_bytes == 0 {
            return Err(SinkError::InvalidOptions {
                field: "target_size_bytes",
                why: "must be at least 1".into(),
            });
        }
        if self.merge_memory_bytes == 0 {
            return Err(SinkError::InvalidOptions {
                field: "merge_memory_bytes",
                why: "must be at least 1".into(),
            });
        }
        Ok(())
    }
}

/// One input of a compaction, as its record lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompactionInput {
    /// Path relative to the lake root.
    pub path: String,
    /// Rows in the file.
    pub rows: u64,
    /// Size of the file in bytes.
    pub bytes: u64,
}

/// One output of a compaction, as its record lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompactionOutput {
    /// The final path, relative to the lake root
    /// (`<partition>/compact-<compaction:010>-<k:04>.parquet`).
    pub path: String,
    /// Where it is written first (`_sensorlake/compactions/tmp/<compaction:020>/<k>.parquet`).
    pub tmp_path: String,
    /// Rows in the file.
    pub rows: u64,
    /// Size of the file in bytes.
    pub bytes: u64,
}

/// The record of one compaction, stored as `_sensorlake/compactions/<compaction:020>.json`;
/// its appearance is the compaction's commit point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompactionRecord {
    /// Format version; [`COMPACTION_RECORD_VERSION`].
    pub version: u32,
    /// The compaction number, counting from 0 per lake.
    pub compaction: u64,
    /// When the record was written (RFC 3339, UTC, milliseconds). For people.
    pub created_at: String,
    /// The table.
    pub table: Table,
    /// The partition folder, relative to the lake root.
    pub partition: String,
    /// The files merged, deleted by the swap.
    pub inputs: Vec<CompactionInput>,
    /// The files written, renamed into the partition by the swap.
    pub outputs: Vec<CompactionOutput>,
}

impl CompactionRecord {
    /// Rows in all inputs (equal to the rows in all outputs).
    pub fn rows(&self) -> u64 {
        self.inputs.iter().map(|f| f.rows).sum()
    }

    /// Checks the record agrees with its file name and names only files of its partition and
    /// its temporary folder, so that recovery never touches anything else.
    fn check(&self, compaction: u64) -> Result<(), String> {
        if self.version != COMPACTION_RECORD_VERSION {
            return Err(format!(
                "version {} is not supported (this build reads version {COMPACTION_RECORD_VERSION})",
                self.version
            ));
        }
        if self.compaction != compaction {
            return Err(format!(
                "it names compaction {} but its file name says {compaction}",
                self.compaction
            ));
        }
        if !layout::is_plain_relative(&self.partition)
            || !self
                .partition
                .starts_with(&format!("{}/", self.table.dir()))
        {
            return Err(format!(
                "partition `{}` is not a partition of the {} table",
                self.partition, self.table
            ));
        }
        let in_partition = |path: &str| {
            layout::is_plain_relative(path)
                && layout::parent(path) == self.partition
                && path.ends_with(".parquet")
        };
        if let Some(bad) = self.inputs.iter().find(|f| !in_partition(&f.path)) {
            return Err(format!(
                "input `{}` is not a file of `{}`",
                bad.path, self.partition
            ));
        }
        let tmp_prefix = format!("{}/", layout::compaction_tmp_files_dir(compaction));
        for f in &self.outputs {
            if !in_partition(&f.path) {
                return Err(format!(
                    "output `{}` is not a file of `{}`",
                    f.path, self.partition
                ));
            }
            let tmp_ok = f
                .tmp_path
                .strip_prefix(&tmp_prefix)
                .and_then(|name| name.strip_suffix(".parquet"))
                .is_some_and(|k| !k.is_empty() && k.bytes().all(|b| b.is_ascii_digit()));
            if !tmp_ok {
                return Err(format!(
                    "temporary path `{}` is outside `{tmp_prefix}`",
                    f.tmp_path
                ));
            }
        }
        Ok(())
    }
}

/// What [`Compactor::open`] found and repaired.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CompactRecovered {
    /// The interrupted compaction that recovery finished, if any.
    pub finished: Option<u64>,
    /// Outputs of it that recovery renamed into place.
    pub outputs_renamed: usize,
    /// Inputs of it that recovery deleted.
    pub inputs_deleted: usize,
    /// Temporary files of compactions that never reached their record, deleted.
    pub tmp_files_removed: usize,
}

/// One partition compacted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CompactedPartition {
    /// The compaction number (its record is `_sensorlake/compactions/<n:020>.json`).
    pub compaction: u64,
    /// The table.
    pub table: Table,
    /// The partition folder, relative to the lake root.
    pub partition: String,
    /// Files merged.
    pub files_in: usize,
    /// Files written.
    pub files_out: usize,
    /// Rows moved (the same in and out).
    pub rows: u64,
    /// Bytes of the files merged.
    pub bytes_in: u64,
    /// Bytes of the files written.
    pub bytes_out: u64,
}

/// A partition left as it was because one of its files cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SkippedPartition {
    /// The partition folder, relative to the lake root.
    pub partition: String,
    /// Why, naming the file.
    pub reason: String,
}

/// What one compaction run did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CompactSummary {
    /// What recovery repaired first.
    pub recovered: CompactRecovered,
    /// The partitions compacted, in the order they were.
    pub partitions: Vec<CompactedPartition>,
    /// Partitions with an unreadable input, left as they were.
    pub skipped: Vec<SkippedPartition>,
}

impl CompactSummary {
    /// Files merged, over all partitions.
    pub fn files_in(&self) -> usize {
        self.partitions.iter().map(|p| p.files_in).sum()
    }

    /// Files written, over all partitions.
    pub fn files_out(&self) -> usize {
        self.partitions.iter().map(|p| p.files_out).sum()
    }

    /// Rows moved, over all partitions.
    pub fn rows(&self) -> u64 {
        self.partitions.iter().map(|p| p.rows).sum()
    }

    /// Bytes merged, over all partitions.
    pub fn bytes_in(&self) -> u64 {
        self.partitions.iter().map(|p| p.bytes_in).sum()
    }

    /// Bytes written, over all partitions.
    pub fn bytes_out(&self) -> u64 {
        self.partitions.iter().map(|p| p.bytes_out).sum()
    }
}

/// Where [`Compactor::crash_after`] stops, to simulate a crash in tests. Each step is of the
/// first partition compacted.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompactStep {
    /// After step 3: outputs written under temporary names, no record.
    OutputsWritten,
    /// After step 4: record durable, nothing renamed.
    RecordWritten,
    /// In step 5: the first output renamed into place.
    OneOutputRenamed,
    /// In step 5: every output in place, no input deleted.
    OutputsRenamed,
    /// In step 5: the first input deleted.
    OneInputDeleted,
    /// After step 5: inputs deleted, temporary folder not yet removed.
    InputsDeleted,
}

/// Compacts the lake at `root` (a folder, `file://…` or `s3://bucket/prefix`, as for
/// [`Lake::open`](crate::Lake::open)): [`Compactor::open`], then [`Compactor::run`]. See the
/// [module docs](crate::compact) for what it compacts and what readers see meanwhile.
///
/// Blocking: async callers run it on a blocking thread.
///
/// # Errors
/// As [`Compactor::open`] and [`Compactor::run`].
///
/// # Example
/// ```
/// use std::sync::Arc;
/// use sensorlake_core::TelemetrySchema;
/// use sensorlake_sink::{CompactOptions, Lake, LakeOptions, compact};
///
/// let dir = tempfile::tempdir()?;
/// let schema = Arc::new(TelemetrySchema::v1_default());
/// drop(Lake::open(dir.path(), "w0", schema.clone(), LakeOptions::default())?);
///
/// let summary = compact(dir.path(), schema, &LakeOptions::default(), &CompactOptions::default())?;
/// assert!(summary.partitions.is_empty(), "a new lake has nothing to compact");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn compact(
    root: &Path,
    schema: Arc<TelemetrySchema>,
    options: &LakeOptions,
    opts: &CompactOptions,
) -> Result<CompactSummary, SinkError> {
    Compactor::open(root, schema, options)?.run(opts)
}

/// [`compact`] for a lake under `prefix` of an object store built by the caller; `url` names
/// it in messages.
///
/// # Errors
/// As [`Compactor::open`] and [`Compactor::run`].
pub fn compact_object_store(
    store: Arc<dyn object_store::ObjectStore>,
    prefix: &str,
    url: &str,
    schema: Arc<TelemetrySchema>,
    options: &LakeOptions,
    opts: &CompactOptions,
) -> Result<CompactSummary, SinkError> {
    Compactor::open_object_store(store, prefix, url, schema, options)?.run(opts)
}

/// A compaction run in progress: holds the lake's compactor lease from [`Compactor::open`]
/// until dropped.
pub struct Compactor {
    store: Store,
    schema: Arc<TelemetrySchema>,
    /// The lake's writer properties, so outputs are written like every other file.
    props: WriterProperties,
    /// The number the next compaction gets.
    next: u64,
    /// What recovery did, handed to the first run's summary.
    recovered: CompactRecovered,
    lease: Lease,
}

/// The compactor lease, released when the compactor drops.
#[derive(Debug)]
enum Lease {
    /// A file lock, released when the file closes (also by a crash).
    File(#[allow(dead_code, reason = "held, never read")] WriterLock),
    /// An object created with a conditional put, deleted on drop unless `kept` (a simulated
    /// crash leaves it, as a real one does).
    Object { kept: bool },
}

impl std::fmt::Debug for Compactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compactor")
            .field("root", &self.store.root())
            .field("next", &self.next)
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

impl Drop for Compactor {
    fn drop(&mut self) {
        if let Lease::Object { kept: false } = self.lease {
            let rel = layout::compactor_lease();
            if let Err(e) = self.store.remove_file(&rel) {
                tracing::warn!(lease = %self.store.abs(&rel).display(), error = %e, "Could not remove the compactor lease; delete it before the next compaction");
            }
        }
    }
}

/// A closed partition.
#[derive(Debug, Clone)]
struct Partition {
    table: Table,
    /// `telemetry/date=…/hour=…` or `dead_letter/date=…`.
    dir: String,
}

/// One input read into memory.
struct Source {
    path: String,
    bytes: Bytes,
    /// Its footer, parsed once.
    metadata: ArrowReaderMetadata,
}

/// A sorted run of batches: one input, read lazily, or sorted in memory.
type Run = Box<dyn Iterator<Item = Result<RecordBatch, ArrowError>> + Send>;

impl Compactor {
    /// Takes the compactor lease of the lake at `root` (see [`compact`]) and runs recovery
    /// (see the [module docs](crate::compact#recovery)).
    ///
    /// # Errors
    /// - [`SinkError::InvalidLake`] when there is no lake at `root` (no `_sensorlake/`), or the
    ///   URL cannot be used;
    /// - [`SinkError::CompactionLocked`] when another compaction holds the lease;
    /// - [`SinkError::CompactionBroken`], [`SinkError::CorruptCommitRecord`],
    ///   [`SinkError::InvalidCommitRecord`] when the last compaction record cannot be
    ///   finished or read;
    /// - [`SinkError::Io`] when the storage fails.
    pub fn open(
        root: &Path,
        schema: Arc<TelemetrySchema>,
        options: &LakeOptions,
    ) -> Result<Compactor, SinkError> {
        Self::open_in(Store::from_url(root, options)?, schema, options)
    }

    /// [`Compactor::open`] for a lake under `prefix` of an object store built by the caller;
    /// `url` names it in messages.
    ///
    /// # Errors
    /// As [`Compactor::open`].
    pub fn open_object_store(
        store: Arc<dyn object_store::ObjectStore>,
        prefix: &str,
        url: &str,
        schema: Arc<TelemetrySchema>,
        options: &LakeOptions,
    ) -> Result<Compactor, SinkError> {
        let store = Store::Object(ObjectStorage::new(store, prefix, url)?);
        Self::open_in(store, schema, options)
    }

    fn open_in(
        store: Store,
        schema: Arc<TelemetrySchema>,
        options: &LakeOptions,
    ) -> Result<Compactor, SinkError> {
        let props = writer_properties(options)?;
        if !store.exists(layout::META_DIR)? {
            return Err(SinkError::InvalidLake {
                url: store.root().display().to_string(),
                why: format!(
                    "there is no `{}/` in it: check the path; compaction runs on a lake that a writer has opened",
                    layout::META_DIR
                ),
            });
        }
        store.create_dir_all(layout::COMPACTIONS_DIR)?;
        let lease = take_lease(&store)?;
        let mut compactor = Compactor {
            store,
            schema,
            props,
            next: 0,
            recovered: CompactRecovered::default(),
            lease,
        };
        compactor.recovered = compactor.recover()?;
        Ok(compactor)
    }

    /// Compacts every closed partition with at least two small files (see the
    /// [module docs](crate::compact)) and returns what it did, including what recovery did
    /// at [`Compactor::open`].
    ///
    /// # Errors
    /// - [`SinkError::InvalidOptions`] for bad `opts`;
    /// - [`SinkError::CorruptCommitRecord`], [`SinkError::InvalidCommitRecord`] when a
    ///   writer's last commit record cannot be read (compaction cannot know which files to
    ///   leave alone);
    /// - [`SinkError::Io`], [`SinkError::Parquet`] when the storage fails. Partitions
    ///   compacted before the failure stay compacted; a compaction past its commit point is
    ///   finished by the next run.
    pub fn run(mut self, opts: &CompactOptions) -> Result<CompactSummary, SinkError> {
        self.run_until(opts, None)
    }

    /// Runs [`Compactor::run`] up to and including `step` of the first partition compacted,
    /// then drops the compactor as a crash would (a lease object is left behind). For crash
    /// tests only.
    ///
    /// # Errors
    /// As [`Compactor::run`].
    #[doc(hidden)]
    pub fn crash_after(
        mut self,
        opts: &CompactOptions,
        step: CompactStep,
    ) -> Result<CompactSummary, SinkError> {
        if let Lease::Object { kept } = &mut self.lease {
            *kept = true;
        }
        self.run_until(opts, Some(step))
    }

    fn run_until(
        &mut self,
        opts: &CompactOptions,
        stop: Option<CompactStep>,
    ) -> Result<CompactSummary, SinkError> {
        opts.validate()?;
        let mut summary = CompactSummary {
            recovered: std::mem::take(&mut self.recovered),
            ..CompactSummary::default()
        };
        let older_than = i64::try_from(opts.older_than.as_micros()).unwrap_or(i64::MAX);
        let cutoff = now_micros().saturating_sub(older_than);

        // (2) Plan: files first, then the writers' last commits.
        let mut plans = Vec::new();
        let partitions = self.closed_partitions(cutoff)?;
        for part in &partitions {
            let small: Vec<(String, u64)> = self
                .store
                .list_sizes(&part.dir)?
                .into_iter()
                .filter(|(name, bytes)| {
                    name.ends_with(".parquet") && *bytes < opts.target_size_bytes
                })
                .map(|(name, bytes)| (format!("{}/{name}", part.dir), bytes))
                .filter(|(path, _)| layout::is_plain_relative(path))
                .collect();
            if small.len() >= 2 {
                plans.push((part.clone(), small));
            }
        }
        tracing::info!(
            closed_partitions = partitions.len(),
            with_small_files = plans.len(),
            "Planned compaction"
        );
        if plans.is_empty() {
            return Ok(summary);
        }
        let protected: HashSet<String> = record::read_last_records(&self.store)?
            .into_iter()
            .flat_map(|r| r.files.into_iter().map(|f| f.path))
            .collect();

        for (part, mut files) in plans {
            files.retain(|(path, _)| !protected.contains(path));
            if files.len() < 2 {
                continue;
            }
            match self.compact_partition(&part, files, opts, stop)? {
                Outcome::Compacted(done) => summary.partitions.push(done),
                Outcome::Skipped(skipped) => summary.skipped.push(skipped),
                Outcome::Nothing => {}
                Outcome::Stopped(done) => {
                    summary.partitions.push(done);
                    return Ok(summary);
                }
            }
        }
        Ok(summary)
    }

    /// Telemetry hours and dead-letter days that ended at or before `cutoff` (µs since the
    /// epoch), in folder order. Folders that are not partition names are ignored.
    fn closed_partitions(&self, cutoff: i64) -> Result<Vec<Partition>, SinkError> {
        let mut closed = Vec::new();
        let telemetry = Table::Telemetry.dir();
        for date in self.store.list(telemetry)? {
            let Some(day) = layout::parse_date_dir(&date) else {
                continue;
            };
            // Not even the day's first hour has ended long enough ago.
            if day
                .saturating_mul(MICROS_PER_DAY)
                .saturating_add(MICROS_PER_HOUR)
                > cutoff
            {
                continue;
            }
            for hour in self.store.list(&format!("{telemetry}/{date}"))? {
                let Some(hour) = layout::parse_hour_dir(&hour) else {
                    continue;
                };
                let index = day * 24 + hour;
                if (index + 1).saturating_mul(MICROS_PER_HOUR) <= cutoff {
                    closed.push(Partition {
                        table: Table::Telemetry,
                        dir: layout::telemetry_partition(index),
                    });
                }
            }
        }
        for date in self.store.list(Table::DeadLetter.dir())? {
            let Some(day) = layout::parse_date_dir(&date) else {
                continue;
            };
            if (day + 1).saturating_mul(MICROS_PER_DAY) <= cutoff {
                closed.push(Partition {
                    table: Table::DeadLetter,
                    dir: layout::dead_letter_partition(day),
                });
            }
        }
        Ok(closed)
    }

    /// Steps 3-6 for one partition.
    fn compact_partition(
        &mut self,
        part: &Partition,
        files: Vec<(String, u64)>,
        opts: &CompactOptions,
        stop: Option<CompactStep>,
    ) -> Result<Outcome, SinkError> {
        let n = self.next;
        let tmp_dir = layout::compaction_tmp_files_dir(n);
        // Left by an earlier attempt at this number that failed.
        self.store.remove_dir_all(&tmp_dir)?;
        self.store.create_dir_all(&tmp_dir)?;

        // (3) Merge into temporary files.
        let (inputs, outputs) = match self.merge(part, files, opts, n) {
            Ok(merged) => merged,
            Err(e) => {
                self.remove_tmp_dir(n);
                return match e {
                    SinkError::ReadParquet { .. } => {
                        tracing::warn!(partition = %part.dir, error = %e, "Skipped a partition: one of its files cannot be read; it is left as it is");
                        Ok(Outcome::Skipped(SkippedPartition {
                            partition: part.dir.clone(),
                            reason: e.to_string(),
                        }))
                    }
                    e => Err(e),
                };
            }
        };
        if inputs.len() < 2 {
            self.remove_tmp_dir(n);
            return Ok(Outcome::Nothing);
        }
        self.store.sync_dir(&tmp_dir)?;
        let record = CompactionRecord {
            version: COMPACTION_RECORD_VERSION,
            compaction: n,
            created_at: format_rfc3339_millis(now_micros()),
            table: part.table,
            partition: part.dir.clone(),
            inputs,
            outputs,
        };
        let done = CompactedPartition {
            compaction: n,
            table: part.table,
            partition: part.dir.clone(),
            files_in: record.inputs.len(),
            files_out: record.outputs.len(),
            rows: record.rows(),
            bytes_in: record.inputs.iter().map(|f| f.bytes).sum(),
            bytes_out: record.outputs.iter().map(|f| f.bytes).sum(),
        };
        let stopped = |step: CompactStep| (stop == Some(step)).then(|| done.clone());
        if let Some(done) = stopped(CompactStep::OutputsWritten) {
            return Ok(Outcome::Stopped(done));
        }

        // (4) The commit point.
        let json = serde_json::to_vec(&record)
            .expect("a compaction record always serializes: derived impls only");
        match self.store.put_atomic(&layout::compaction_record(n), &json) {
            Ok(()) => {}
            Err(PutError::NotWritten(e)) => {
                self.remove_tmp_dir(n);
                return Err(e);
            }
            Err(PutError::Unknown(e)) => {
                tracing::error!(compaction = n, error = %e, "A compaction record may or may not be durable; the next run's recovery decides");
                return Err(e);
            }
        }
        self.next = n + 1;
        tracing::info!(compaction = n, partition = %part.dir, files_in = done.files_in, files_out = done.files_out, "Committed a compaction; swapping its files");
        if let Some(done) = stopped(CompactStep::RecordWritten) {
            return Ok(Outcome::Stopped(done));
        }

        // (5) The swap: every rename, then every delete, nothing in between.
        let swapped = (|| {
            self.store.create_dir_all(&part.dir)?;
            for (k, out) in record.outputs.iter().enumerate() {
                self.store.rename(&out.tmp_path, &out.path)?;
                if k == 0 && stop == Some(CompactStep::OneOutputRenamed) {
                    return Ok(true);
                }
            }
            if stop == Some(CompactStep::OutputsRenamed) {
                return Ok(true);
            }
            if stop == Some(CompactStep::OneInputDeleted) {
                self.store.remove_file(&record.inputs[0].path)?;
                return Ok(true);
            }
            let inputs: Vec<&str> = record.inputs.iter().map(|f| f.path.as_str()).collect();
            self.store.remove_files(&inputs)?;
            self.store.sync_dir(&part.dir)?;
            Ok::<bool, SinkError>(false)
        })();
        match swapped {
            Ok(true) => return Ok(Outcome::Stopped(done)),
            Ok(false) => {}
            Err(e) => {
                tracing::error!(compaction = n, partition = %part.dir, error = %e, "A committed compaction could not finish its swap; the next run finishes it");
                return Err(e);
            }
        }
        if let Some(done) = stopped(CompactStep::InputsDeleted) {
            return Ok(Outcome::Stopped(done));
        }

        // (6) Clean up.
        self.remove_tmp_dir(n);
        tracing::info!(
            compaction = n,
            partition = %done.partition,
            files_in = done.files_in,
            files_out = done.files_out,
            rows = done.rows,
            bytes_in = done.bytes_in,
            bytes_out = done.bytes_out,
            "Compacted a partition"
        );
        Ok(Outcome::Compacted(done))
    }

    /// Step 3: reads `files` in groups of at most `merge_memory_bytes`, merges each group into
    /// outputs under `_sensorlake/compactions/tmp/<n:020>/`, and returns the inputs merged and
    /// the outputs written. Files whose columns are not the table's are left out.
    fn merge(
        &self,
        part: &Partition,
        files: Vec<(String, u64)>,
        opts: &CompactOptions,
        n: u64,
    ) -> Result<(Vec<CompactionInput>, Vec<CompactionOutput>), SinkError> {
        let schema = match part.table {
            Table::Telemetry => self.schema.telemetry().clone(),
            Table::DeadLetter => self.schema.dead_letter().clone(),
        };
        let mut outputs = Outputs {
            store: &self.store,
            schema: schema.clone(),
            props: &self.props,
            target: opts.target_size_bytes,
            compaction: n,
            dir: &part.dir,
            batch_rows: OUT_BATCH_ROWS,
            shrink: 1.0,
            done: Vec::new(),
            open: None,
        };
        let mut inputs = Vec::new();
        for group in merge_groups(files, opts.merge_memory_bytes) {
            let mut sources = Vec::with_capacity(group.len());
            let (mut group_rows, mut group_bytes) = (0u64, 0u64);
            for (path, bytes) in group {
                let data = Bytes::from(self.store.read(&path)?);
                let metadata = ArrowReaderMetadata::load(&data, ArrowReaderOptions::default())
                    .map_err(|source| self.unreadable(&path, source))?;
                if metadata.schema().fields() != schema.fields() {
                    tracing::warn!(path = %self.store.abs(&path).display(), table = %part.table, "Left a file alone: its columns are not the lake's");
                    continue;
                }
                let rows = u64::try_from(metadata.metadata().file_metadata().num_rows())
                    .unwrap_or_default();
                group_rows += rows;
                group_bytes += bytes;
                inputs.push(CompactionInput {
                    path: path.clone(),
                    rows,
                    bytes,
                });
                sources.push(Source {
                    path,
                    bytes: data,
                    metadata,
                });
            }
            let batch_rows = (MERGE_ROWS_IN_MEMORY / sources.len().max(1))
                .clamp(MIN_IN_BATCH_ROWS, OUT_BATCH_ROWS);
            // Outputs are closed between batches: batches of about a quarter of an output,
            // estimated from the inputs (whose footers make it an underestimate), keep small
            // targets near their size.
            let rows_per_output = u128::from(opts.target_size_bytes) * u128::from(group_rows)
                / u128::from(group_bytes.max(1));
            outputs.batch_rows = usize::try_from(rows_per_output / 4)
                .unwrap_or(usize::MAX)
                .clamp(MIN_OUT_BATCH_ROWS, OUT_BATCH_ROWS);
            match part.table {
                Table::Telemetry => {
                    let mut runs = Vec::with_capacity(sources.len());
                    for source in &sources {
                        let run = self.sorted_run(source, &schema, batch_rows)?;
                        runs.push((source.path.clone(), run));
                    }
                    merge_runs(runs, &mut outputs).map_err(|e| match e {
                        MergeError::Read { path, source } => self.unreadable(&path, source),
                        MergeError::Write(e) => e,
                    })?;
                }
                Table::DeadLetter => {
                    for source in &sources {
                        for batch in self.read_run(source, outputs.batch_rows)? {
                            let batch =
                                batch.map_err(|e| self.unreadable(&source.path, e.into()))?;
                            outputs.write(&batch)?;
                        }
                    }
                }
            }
            // Each group's outputs are sorted on their own.
            outputs.close()?;
        }
        let rows_in: u64 = inputs.iter().map(|f| f.rows).sum();
        let rows_out: u64 = outputs.done.iter().map(|f| f.rows).sum();
        if rows_in != rows_out {
            return Err(self.unreadable(
                &part.dir,
                ParquetError::General(format!(
                    "the inputs' footers count {rows_in} rows but {rows_out} were read"
                )),
            ));
        }
        Ok((inputs, outputs.done))
    }

    /// A reader of `source`, `batch_rows` rows at a time.
    fn read_run(&self, source: &Source, batch_rows: usize) -> Result<Run, SinkError> {
        let reader = self
            .builder(source)
            .with_batch_size(batch_rows)
            .build()
            .map_err(|e| self.unreadable(&source.path, e))?;
        Ok(Box::new(reader))
    }

    /// `source` as a run in `(device_id, ts)` order: read lazily when its two key columns are
    /// in order (every file a writer or a compaction wrote), else decoded and sorted whole.
    fn sorted_run(
        &self,
        source: &Source,
        schema: &SchemaRef,
        batch_rows: usize,
    ) -> Result<Run, SinkError> {
        let fail = |e: ParquetError| self.unreadable(&source.path, e);
        let builder = self.builder(source);
        let keys =
            ProjectionMask::columns(builder.parquet_schema(), [columns::DEVICE_ID, columns::TS]);
        let key_batches: Vec<RecordBatch> = builder
            .with_projection(keys)
            .with_batch_size(64 * 1024)
            .build()
            .map_err(fail)?
            .collect::<Result<_, _>>()
            .map_err(|e| fail(e.into()))?;
        let sorted = match key_batches.first() {
            None => true,
            Some(first) => partition::is_sorted_by_device(&first.schema(), &key_batches)
                .map_err(|e| fail(e.into()))?,
        };
        drop(key_batches);
        if sorted {
            return self.read_run(source, batch_rows);
        }
        tracing::info!(path = %self.store.abs(&source.path).display(), "An input is not sorted by (device_id, ts); sorting it in memory");
        let batches: Vec<RecordBatch> = self
            .read_run(source, OUT_BATCH_ROWS)?
            .collect::<Result<_, _>>()
            .map_err(|e| fail(e.into()))?;
        let sorted = partition::sorted_by_device(schema, batches).map_err(|e| fail(e.into()))?;
        Ok(Box::new(sorted.into_iter().map(Ok)))
    }

    /// A reader of `source`, from its footer as read once.
    fn builder(&self, source: &Source) -> ParquetRecordBatchReaderBuilder<Bytes> {
        ParquetRecordBatchReaderBuilder::new_with_metadata(
            source.bytes.clone(),
            source.metadata.clone(),
        )
    }

    fn unreadable(&self, path: &str, source: ParquetError) -> SinkError {
        SinkError::ReadParquet {
            path: self.store.abs(path),
            source,
        }
    }

    /// Step 6, best effort: a leftover is inside `_sensorlake/`, where it harms no reader, and
    /// the next run's recovery removes it.
    fn remove_tmp_dir(&self, n: u64) {
        let dir = layout::compaction_tmp_files_dir(n);
        if let Err(e) = self.store.remove_dir_all(&dir) {
            tracing::warn!(compaction = n, error = %e, "Could not remove a temporary folder");
        }
    }

    /// Recovery; see the module docs.
    fn recover(&mut self) -> Result<CompactRecovered, SinkError> {
        let mut recovered = CompactRecovered::default();
        let dir = layout::COMPACTIONS_DIR;
        let names = self.store.list(dir)?;
        // Numbers come from every `<n:020>.json…` name, so that a record a human moved aside
        // as `<n:020>.json.<anything>` still keeps its number (and its outputs' names) taken.
        let numbered = |name: &String| {
            name.get(..25)
                .and_then(layout::parse_commit_record_name)
                .filter(|_| name.len() > 25)
        };
        let last = names
            .iter()
            .filter_map(|name| layout::parse_commit_record_name(name))
            .max();
        let highest = names.iter().filter_map(numbered).chain(last).max();
        if let Some(n) = last {
            let record = self.read_record(n)?;
            self.finish(&record, &mut recovered)?;
        }
        if let Some(highest) = highest {
            self.next = highest
                .checked_add(1)
                .ok_or_else(|| SinkError::InvalidCommitRecord {
                    path: self.store.abs(&layout::compaction_record(highest)),
                    why: "its compaction number is the largest possible".into(),
                })?;
        }

        // Temporary folders: compactions that never reached their record (and the emptied
        // folder of the last one).
        recovered.tmp_files_removed += self.store.clear_subfolders(&layout::compaction_tmp_dir())?;
        // Records that never got their final name.
        for name in &names {
            if name.ends_with(layout::RECORD_TMP_SUFFIX) && numbered(name).is_some() {
                self.store.remove_file(&format!("{dir}/{name}"))?;
            }
        }
        if recovered != CompactRecovered::default() {
            tracing::info!(
                finished = ?recovered.finished,
                outputs_renamed = recovered.outputs_renamed,
                inputs_deleted = recovered.inputs_deleted,
                tmp_files_removed = recovered.tmp_files_removed,
                "Recovered an interrupted compaction"
            );
        }
        Ok(recovered)
    }

    fn read_record(&self, n: u64) -> Result<CompactionRecord, SinkError> {
        let rel = layout::compaction_record(n);
        let bytes = self.store.read(&rel)?;
        let record: CompactionRecord =
            serde_json::from_slice(&bytes).map_err(|source| SinkError::CorruptCommitRecord {
                path: self.store.abs(&rel),
                source,
            })?;
        record
            .check(n)
            .map_err(|why| SinkError::InvalidCommitRecord {
                path: self.store.abs(&rel),
                why,
            })?;
        Ok(record)
    }

    /// Finishes the swap of `record` if it is unfinished; idempotent.
    fn finish(
        &self,
        record: &CompactionRecord,
        recovered: &mut CompactRecovered,
    ) -> Result<(), SinkError> {
        let mut present = Vec::new();
        for input in &record.inputs {
            if self.store.exists(&input.path)? {
                present.push(input.path.as_str());
            }
        }
        let mut to_rename = Vec::new();
        let mut missing = Vec::new();
        let mut in_place = Vec::new();
        for out in &record.outputs {
            if self.store.exists(&out.path)? {
                in_place.push(out.path.as_str());
            } else if self.store.exists(&out.tmp_path)? {
                to_rename.push(out);
            } else {
                missing.push(out.path.as_str());
            }
        }
        let path = self
            .store
            .abs(&layout::compaction_record(record.compaction));
        if let Some(lost) = missing.first() {
            if present.is_empty() && to_rename.is_empty() {
                // Finished long ago; the output was deleted since (a retention job, say).
                tracing::warn!(record = %path.display(), output = %lost, "An output of the last compaction is gone; the compaction had finished");
                return Ok(());
            }
            let why = if present.len() == record.inputs.len() {
                format!(
                    "output {lost} exists under neither its final nor its temporary name. Every input is still in place and holds every row, and the outputs already in place ({}) hold copies of some: delete those, then rename the record to end in `.json.resolved` and run compact again",
                    in_place.join(", ")
                )
            } else {
                format!(
                    "output {lost} exists under neither its final nor its temporary name, and {} of the {} inputs are already deleted, so the rows only that output held are gone from the lake (restore it from a backup if there is one). Inputs still present: {}. Resolve by hand, then rename the record to end in `.json.resolved`",
                    record.inputs.len() - present.len(),
                    record.inputs.len(),
                    present.join(", ")
                )
            };
            return Err(SinkError::CompactionBroken { record: path, why });
        }
        if present.is_empty() && to_rename.is_empty() {
            return Ok(());
        }
        self.store.create_dir_all(&record.partition)?;
        for out in &to_rename {
            self.store.rename(&out.tmp_path, &out.path)?;
        }
        self.store.remove_files(&present)?;
        self.store.sync_dir(&record.partition)?;
        self.remove_tmp_dir(record.compaction);
        recovered.finished = Some(record.compaction);
        recovered.outputs_renamed = to_rename.len();
        recovered.inputs_deleted = present.len();
        Ok(())
    }
}

/// How one partition went.
#[derive(Debug)]
enum Outcome {
    Compacted(CompactedPartition),
    Skipped(SkippedPartition),
    /// Fewer than two readable inputs: nothing to do.
    Nothing,
    /// A test's crash point was reached.
    Stopped(CompactedPartition),
}

/// Takes the compactor lease (see the module docs).
fn take_lease(store: &Store) -> Result<Lease, SinkError> {
    let rel = layout::compactor_lease();
    match store {
        Store::Local(_) => match store.try_lock(&rel)? {
            Some(lock) => Ok(Lease::File(lock)),
            None => Err(SinkError::CompactionLocked {
                lease: store.abs(&rel),
                why: "another compaction is running on this lake; wait for it to finish (the lock is released when that process ends)".into(),
            }),
        },
        Store::Object(_) => {
            // The token makes the bytes ours alone: a conditional put that finds an object
            // with the very same bytes counts as its own retry and succeeds.
            let token = {
                use std::hash::{BuildHasher, Hasher};
                // Randomly keyed per process.
                let mut h = std::collections::hash_map::RandomState::new().build_hasher();
                h.write_i64(now_micros());
                h.finish()
            };
            let ours = serde_json::json!({
                "pid": std::process::id(),
                "started_at": format_rfc3339_millis(now_micros()),
                "token": format!("{token:016x}"),
            })
            .to_string();
            let held = |store: &Store| {
                let holder = store
                    .read(&rel)
                    .ok()
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_default();
                SinkError::CompactionLocked {
                    lease: store.abs(&rel),
                    why: format!(
                        "another compaction took it ({holder}). If no compaction is running on this lake (one was killed or crashed), delete that object and run compact again"
                    ),
                }
            };
            match store.put_atomic(&rel, ours.as_bytes()) {
                Ok(()) => Ok(Lease::Object { kept: false }),
                Err(PutError::NotWritten(e)) => {
                    if store.exists(&rel)? {
                        Err(held(store))
                    } else {
                        Err(e)
                    }
                }
                // The put may have taken effect with its response lost: ours if it holds our
                // bytes.
                Err(PutError::Unknown(e)) => match store.read(&rel) {
                    Ok(bytes) if bytes == ours.as_bytes() => Ok(Lease::Object { kept: false }),
                    Ok(_) => Err(held(store)),
                    Err(_) => Err(e),
                },
            }
        }
    }
}

/// Splits `files` (in name order) into groups of at most `budget` bytes, each of at least one
/// file; a last group of a single file joins the one before (a merge of one file gains
/// nothing).
fn merge_groups(files: Vec<(String, u64)>, budget: u64) -> Vec<Vec<(String, u64)>> {
    let mut groups: Vec<Vec<(String, u64)>> = Vec::new();
    let mut current = Vec::new();
    let mut bytes = 0u64;
    for file in files {
        if !current.is_empty() && bytes.saturating_add(file.1) > budget {
            groups.push(std::mem::take(&mut current));
            bytes = 0;
        }
        bytes = bytes.saturating_add(file.1);
        current.push(file);
    }
    match (current.len(), groups.last_mut()) {
        (0, _) => {}
        (1, Some(last)) => last.append(&mut current),
        _ => groups.push(current),
    }
    groups
}

/// The outputs of one compaction: written one after the other, each closed once it reaches the
/// target size.
struct Outputs<'a> {
    store: &'a Store,
    schema: SchemaRef,
    props: &'a WriterProperties,
    target: u64,
    compaction: u64,
    dir: &'a str,
    /// Rows per batch the merge gathers.
    batch_rows: usize,
    /// Flushed size over estimated size of the last row group flushed to reach the target.
    shrink: f64,
    done: Vec<CompactionOutput>,
    open: Option<OpenOutput>,
}

struct OpenOutput {
    writer: ArrowWriter<StoreWriter>,
    tmp_path: String,
    rows: u64,
}

impl Outputs<'_> {
    /// Appends `batch` to the current output (opening one if needed), and closes it once it
    /// reaches the target size. The writer's estimate of its unfinished row group runs high
    /// (pages not yet compressed), so it is scaled by what the last flushed row group really
    /// came to; when the scaled estimate says "full" the row group is flushed and the exact
    /// size decides.
    fn write(&mut self, batch: &RecordBatch) -> Result<(), SinkError> {
        if self.open.is_none() {
            let tmp_path = layout::compaction_tmp_file(self.compaction, self.done.len());
            let out = self.store.create(&tmp_path)?;
            let writer = ArrowWriter::try_new(out, self.schema.clone(), Some(self.props.clone()))
                .map_err(|source| SinkError::Parquet {
                path: self.store.abs(&tmp_path),
                source,
            })?;
            self.open = Some(OpenOutput {
                writer,
                tmp_path,
                rows: 0,
            });
        }
        let open = self.open.as_mut().expect("opened above");
        let store = self.store;
        let fail = |source| SinkError::Parquet {
            path: store.abs(&open.tmp_path),
            source,
        };
        open.writer.write(batch).map_err(fail)?;
        open.rows += batch.num_rows() as u64;
        let target = self.target as f64;
        let written = open.writer.bytes_written();
        let estimate = open.writer.in_progress_size();
        if written as f64 + estimate as f64 * self.shrink >= target {
            open.writer.flush().map_err(fail)?;
            let flushed = open.writer.bytes_written() - written;
            if estimate > 0 && flushed > 0 {
                self.shrink = flushed as f64 / estimate as f64;
            }
            if open.writer.bytes_written() as f64 >= target {
                self.close()?;
            }
        }
        Ok(())
    }

    /// Finishes the current output, if any: footer, fsync (or upload), listed in `done`.
    fn close(&mut self) -> Result<(), SinkError> {
        let Some(open) = self.open.take() else {
            return Ok(());
        };
        let k = self.done.len();
        let out = open
            .writer
            .into_inner()
            .map_err(|source| SinkError::Parquet {
                path: self.store.abs(&open.tmp_path),
                source,
            })?;
        let bytes = out.finish()?;
        self.done.push(CompactionOutput {
            path: format!(
                "{}/{}",
                self.dir,
                layout::compact_file_name(self.compaction, k)
            ),
            tmp_path: open.tmp_path,
            rows: open.rows,
            bytes,
        });
        Ok(())
    }
}

/// Why a merge stopped.
enum MergeError {
    /// An input could not be decoded.
    Read { path: String, source: ParquetError },
    /// An output could not be written.
    Write(SinkError),
}

/// One run being merged: its current batch and row.
struct Cursor {
    /// The input, for messages.
    path: String,
    run: Run,
    batch: RecordBatch,
    ids: StringArray,
    ts: TimestampMicrosecondArray,
    row: usize,
    /// The index of `batch` in the merge's staged batches.
    staged: usize,
}

impl Cursor {
    /// Starts `run` at its first row; `None` when it has none.
    fn start(path: String, mut run: Run) -> Result<Option<Cursor>, MergeError> {
        let fail = |source| MergeError::Read {
            path: path.clone(),
            source,
        };
        let Some(batch) = next_batch(&mut run).map_err(fail)? else {
            return Ok(None);
        };
        let (ids, ts) = key_columns(&batch).map_err(fail)?;
        Ok(Some(Cursor {
            path,
            run,
            batch,
            ids,
            ts,
            row: 0,
            staged: 0,
        }))
    }

    fn key(&self) -> (&str, i64) {
        (self.ids.value(self.row), self.ts.value(self.row))
    }

    /// Moves to the next row, loading the run's next batch when this one is done. Returns
    /// whether there is a row, and whether it is in a new batch.
    fn advance(&mut self) -> Result<(bool, bool), MergeError> {
        self.row += 1;
        if self.row < self.batch.num_rows() {
            return Ok((true, false));
        }
        let fail = |source| MergeError::Read {
            path: self.path.clone(),
            source,
        };
        let Some(batch) = next_batch(&mut self.run).map_err(fail)? else {
            return Ok((false, false));
        };
        let (ids, ts) = key_columns(&batch).map_err(fail)?;
        (self.batch, self.ids, self.ts, self.row) = (batch, ids, ts, 0);
        Ok((true, true))
    }
}

/// The next non-empty batch of `run`.
fn next_batch(run: &mut Run) -> Result<Option<RecordBatch>, ParquetError> {
    for batch in run.by_ref() {
        let batch = batch?;
        if batch.num_rows() > 0 {
            return Ok(Some(batch));
        }
    }
    Ok(None)
}

/// The `device_id` and `ts` columns of `batch`.
fn key_columns(
    batch: &RecordBatch,
) -> Result<(StringArray, TimestampMicrosecondArray), ParquetError> {
    let column = |name: &str| {
        batch
            .column_by_name(name)
            .ok_or_else(|| ParquetError::General(format!("no `{name}` column")))
    };
    let ids = column(columns::DEVICE_ID)?
        .as_string_opt::<i32>()
        .ok_or_else(|| ParquetError::General("`device_id` is not a string".into()))?
        .clone();
    let ts = column(columns::TS)?
        .as_primitive_opt::<TimestampMicrosecondType>()
        .ok_or_else(|| ParquetError::General("`ts` is not a µs timestamp".into()))?
        .clone();
    Ok((ids, ts))
}

/// Merges `runs` (input path, rows in `(device_id, ts)` order) into `outputs` in that order:
/// a binary min-heap of run cursors, rows gathered `outputs.batch_rows` at a time with
/// `interleave`. Equal keys come out in run order, so the merge is deterministic.
fn merge_runs(runs: Vec<(String, Run)>, outputs: &mut Outputs<'_>) -> Result<(), MergeError> {
    let mut cursors = Vec::with_capacity(runs.len());
    for (path, run) in runs {
        if let Some(cursor) = Cursor::start(path, run)? {
            cursors.push(cursor);
        }
    }
    let less =
        |cursors: &[Cursor], a: usize, b: usize| (cursors[a].key(), a) < (cursors[b].key(), b);
    let mut heap: Vec<usize> = (0..cursors.len()).collect();
    for i in (0..heap.len() / 2).rev() {
        sift_down(&mut heap, i, |a, b| less(&cursors, a, b));
    }
    // The batches rows are taken from until the next output batch is gathered: every
    // cursor's current one, plus the ones cursors moved on from meanwhile.
    let mut staged: Vec<RecordBatch> = Vec::new();
    let restage = |cursors: &mut [Cursor], heap: &[usize], staged: &mut Vec<RecordBatch>| {
        staged.clear();
        for &i in heap {
            cursors[i].staged = staged.len();
            staged.push(cursors[i].batch.clone());
        }
    };
    restage(&mut cursors, &heap, &mut staged);
    let batch_rows = outputs.batch_rows;
    let mut indices: Vec<(usize, usize)> = Vec::with_capacity(batch_rows);
    let mut emit = |staged: &[RecordBatch], indices: &mut Vec<(usize, usize)>| {
        let refs: Vec<&RecordBatch> = staged.iter().collect();
        let batch = interleave_record_batch(&refs, indices).map_err(|e| {
            MergeError::Write(SinkError::Parquet {
                path: outputs.store.abs(layout::compaction_tmp_dir().as_str()),
                source: e.into(),
            })
        })?;
        indices.clear();
        outputs.write(&batch).map_err(MergeError::Write)
    };
    while let Some(&top) = heap.first() {
        let cursor = &mut cursors[top];
        indices.push((cursor.staged, cursor.row));
        match cursor.advance()? {
            (true, false) => {}
            (true, true) => {
                cursor.staged = staged.len();
                staged.push(cursor.batch.clone());
            }
            (false, _) => {
                let last = heap.len() - 1;
                heap.swap(0, last);
                heap.pop();
            }
        }
        if !heap.is_empty() {
            sift_down(&mut heap, 0, |a, b| less(&cursors, a, b));
        }
        if indices.len() == batch_rows {
            emit(&staged, &mut indices)?;
            restage(&mut cursors, &heap, &mut staged);
        }
    }
    if !indices.is_empty() {
        emit(&staged, &mut indices)?;
    }
    Ok(())
}

/// Restores the heap property below `i` (a min-heap under `less`).
fn sift_down(heap: &mut [usize], mut i: usize, less: impl Fn(usize, usize) -> bool) {
    loop {
        let (left, right) = (2 * i + 1, 2 * i + 2);
        let mut smallest = i;
        if left < heap.len() && less(heap[left], heap[smallest]) {
            smallest = left;
        }
        if right < heap.len() && less(heap[right], heap[smallest]) {
            smallest = right;
        }
        if smallest == i {
            return;
        }
        heap.swap(i, smallest);
        i = smallest;
    }
}

/// Now, in µs since the epoch.
fn now_micros() -> i64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_micros()).map_or(i64::MIN, |us| -us),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(sizes: &[u64]) -> Vec<(String, u64)> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, &b)| (format!("f{i}"), b))
            .collect()
    }

    fn group_sizes(groups: &[Vec<(String, u64)>]) -> Vec<Vec<u64>> {
        groups
            .iter()
            .map(|g| g.iter().map(|f| f.1).collect())
            .collect()
    }

    #[test]
    fn merge_groups_stay_within_the_memory_budget_in_name_order() {
        let groups = merge_groups(files(&[4, 4, 4, 4, 4, 4]), 10);
        assert_eq!(group_sizes(&groups), [vec![4, 4], vec![4, 4], vec![4, 4]]);
        let names: Vec<_> = groups.concat().into_iter().map(|f| f.0).collect();
        assert_eq!(names, ["f0", "f1", "f2", "f3", "f4", "f5"]);
    }

    #[test]
    fn merge_groups_fold_a_lone_last_file_into_the_group_before() {
        let groups = merge_groups(files(&[4, 4, 4]), 8);
        assert_eq!(group_sizes(&groups), [vec![4, 4, 4]]);
        let groups = merge_groups(files(&[20, 3]), 8);
        assert_eq!(
            group_sizes(&groups),
            [vec![20, 3]],
            "a file over budget still merges"
        );
        assert!(merge_groups(Vec::new(), 8).is_empty());
    }

    fn record() -> CompactionRecord {
        CompactionRecord {
            version: COMPACTION_RECORD_VERSION,
            compaction: 3,
            created_at: "2026-11-27T00:00:00.000Z".into(),
            table: Table::Telemetry,
            partition: "telemetry/date=2026-11-27/hour=15".into(),
            inputs: vec![CompactionInput {
                path: "telemetry/date=2026-11-27/hour=15/part-w0-0000000001-0000.parquet".into(),
                rows: 2,
                bytes: 100,
            }],
            outputs: vec![CompactionOutput {
                path: "telemetry/date=2026-11-27/hour=15/compact-0000000003-0000.parquet".into(),
                tmp_path: "_sensorlake/compactions/tmp/00000000000000000003/0.parquet".into(),
                rows: 2,
                bytes: 90,
            }],
        }
    }

    #[test]
    fn a_compaction_record_naming_paths_outside_its_partition_is_refused() {
        assert_eq!(record().check(3), Ok(()));
        assert!(record().check(4).is_err(), "the number must match its name");
        let mut r = record();
        r.inputs[0].path = "telemetry/date=2026-11-27/hour=16/x.parquet".into();
        assert!(r.check(3).unwrap_err().contains("input"));
        let mut r = record();
        r.outputs[0].path = "telemetry/date=2026-11-27/hour=15/../../../etc.parquet".into();
        assert!(r.check(3).unwrap_err().contains("output"));
        let mut r = record();
        r.outputs[0].tmp_path = "_sensorlake/tmp/w0/00000000000000000003/0.parquet".into();
        assert!(r.check(3).unwrap_err().contains("temporary"));
        let mut r = record();
        r.partition = "dead_letter/date=2026-11-27".into();
        assert!(r.check(3).unwrap_err().contains("partition"));
    }
}
