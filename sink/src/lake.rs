//! The lake and its commit protocol: how one flush becomes durable, visible Parquet files
//! exactly once, across crashes.
//!
//! # The commit protocol
//!
//! [`Lake::commit`] writes one flush (telemetry rows, dead letters, counts, device checkpoints,
//! source positions) as commit number `c` of writer `w`:
//!
//! 0. A flush without rows still makes a commit: a record with its counts and checkpoints (all
//!    duplicates, say) and no files.
//! 1. **Plan.** Telemetry rows are grouped by the hour of `ts`, dead letters by the day of
//!    `received_at` (on an integer per row), and each group is split into files of at most
//!    `max_rows_per_file` rows, numbered `n = 0, 1, …` across the commit.
//! 2. **Write.** Each file is encoded to `_sensorlake/tmp/<w>/<c:020>/<n>.parquet` and fsynced,
//!    then the temporary folder is fsynced. Nothing a reader globs sees these names.
//! 3. **Commit point.** The commit record (files with final and temporary paths, rows, bytes,
//!    counts, device checkpoints, sources) is written to a temporary name, fsynced, renamed to
//!    `_sensorlake/commits/<w>/<c:020>.json`, and the folder is fsynced. From here on the flush
//!    is part of the lake, whatever happens.
//! 4. **Publish.** Each temporary file is renamed to its final
//!    `telemetry/date=…/hour=…/part-<w>-<c:010>-<n:04>.parquet` (or `dead_letter/…`); new
//!    partition folders are created and their parents fsynced, then each destination folder is
//!    fsynced.
//! 5. **Clean up.** The empty temporary folder is removed, and `commit` returns. Only now may
//!    the caller acknowledge the flush's sources.
//!
//! The commit number advances only when step 3 completes. A failure before it removes what was
//! written and returns the error: the flush is not in the lake, and a retry (same flush, same
//! commit number, same deterministic names) starts clean. A failure in step 4 returns
//! [`SinkError::NotVisible`]: the flush *is* committed. The lake remembers the commit and
//! finishes step 4 first thing in the next `commit`; if that next call carries the same flush
//! (a retry), it returns the earlier commit's summary and writes nothing, so a retry can never
//! duplicate rows. If fsyncing the commits folder fails right after the rename in step 3,
//! nobody can say whether the record survives a crash: the lake refuses further commits
//! ([`SinkError::Poisoned`]) and must be reopened, and recovery decides from what is on disk.
//!
//! Within a commit, files appear one rename at a time; a reader listing the folders during step
//! 4 may see some of a commit's files and not yet the others, but never part of a file.
//!
//! # On an object store
//!
//! The same steps, with object semantics (`object.rs`): fsyncs and folder creation do
//! nothing, a file is uploaded (multipart past 8 MiB) and visible once its upload completes,
//! the commit record is a conditional put (a second process with the same writer id fails
//! there, since object stores have no locks), and step 4's renames are copies followed by
//! deletes.
//!
//! # Recovery
//!
//! [`Lake::open`] takes the writer's lock (`_sensorlake/locks/<w>.lock`), then reads the
//! writer's commit records. For the last one it renames every file whose temporary name exists
//! and final name does not (a crash between steps 3 and 5), and fsyncs the folders. It then
//! deletes every temporary folder of the writer (flushes that never reached step 3; their
//! sources were never acknowledged, so they are redelivered or re-read) and any commit record
//! left under its temporary name. Only the last commit can be unfinished, because each commit
//! finishes (or is finished by recovery) before the next one starts.
//!
//! The device checkpoints and counts of all the writer's records are folded into
//! [`Recovered`], and the next commit number is the last one plus one. So that start-up does
//! not read every record a long-running writer ever wrote, the writer snapshots the folded
//! state after every 1,000th commit (`_sensorlake/snapshots/<w>/<c:020>.json`, best effort);
//! recovery starts from the newest readable snapshot and reads only the records after it
//! (plus the one it ends at). Listing the writer's records is still proportional to their
//! number, one name each.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use arrow::array::RecordBatch;
use parquet::file::properties::WriterProperties;
use sensorlake_core::time::format_rfc3339_millis;
use sensorlake_core::{DeviceCheckpoint, FlushCounts, TelemetrySchema};
use serde::Serialize;

use crate::encode::{self, writer_properties};
use crate::failpoint;
use crate::layout;
use crate::local::PutError;
use crate::object::ObjectStorage;
use crate::partition::{self, PlannedFile};
use crate::record::{self, COMMIT_RECORD_VERSION, CommitRecord, CommittedFile, FileEntry, Table};
use crate::store::{Store, WriterLock};
use crate::{LakeOptions, SinkError, WriterId};

/// One flush, borrowed from the caller for the duration of [`Lake::commit`].
#[derive(Debug, Clone, Copy)]
pub struct Flush<'a> {
    /// Accepted readings, each batch of [`TelemetrySchema::telemetry`].
    pub telemetry: &'a [RecordBatch],
    /// Rejected input, each batch of [`TelemetrySchema::dead_letter`].
    pub dead_letters: &'a [RecordBatch],
    /// What the flush accounted for; summed into [`Recovered::totals`].
    pub counts: &'a FlushCounts,
    /// The checkpoint of every device the flush touched.
    pub devices: &'a BTreeMap<String, DeviceCheckpoint>,
    /// The sources' positions after this flush, opaque to the sink; `Null` for MQTT.
    pub sources: &'a serde_json::Value,
}

/// What one commit wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CommitSummary {
    /// The commit number.
    pub commit: u64,
    /// The files made visible, telemetry first.
    pub files: Vec<FileEntry>,
    /// Rows in all files.
    pub rows: u64,
    /// Bytes in all files.
    pub bytes: u64,
}

impl CommitSummary {
    fn of(record: &CommitRecord) -> Self {
        Self {
            commit: record.commit,
            files: record.files.iter().map(CommittedFile::entry).collect(),
            rows: record.rows(),
            bytes: record.bytes(),
        }
    }
}

/// What [`Lake::open`] found and repaired.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Recovered {
    /// The writer's last commit, `None` for a new writer.
    pub last_commit: Option<u64>,
    /// What the last commit wrote: tells a caller whose commit ended in
    /// [`SinkError::Poisoned`] whether (and what) it committed after all.
    pub last_summary: Option<CommitSummary>,
    /// The device checkpoints folded over all the writer's commit records, later commits
    /// winning per device: what the transform's de-duplication starts from.
    pub devices: BTreeMap<String, DeviceCheckpoint>,
    /// The `sources` of the last commit as a list: its elements when it is a JSON array,
    /// nothing when it is `null` (MQTT) or there is no commit, else the value itself.
    pub sources: Vec<serde_json::Value>,
    /// The counts of all the writer's commits, summed.
    pub totals: FlushCounts,
    /// Files of the last commit that recovery renamed to their final names.
    pub files_made_visible: usize,
    /// Temporary files of flushes that never reached their commit point, deleted.
    pub files_removed: usize,
}

/// Where [`Lake::crash_after`] stops, to simulate a crash in tests.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitStep {
    /// After step 2: temporary files written, no commit record.
    FilesWritten,
    /// After step 3: commit record durable, files still under temporary names.
    RecordWritten,
    /// After step 4: files visible, temporary folder not yet removed.
    FilesVisible,
}

/// The lake, opened by one writer: writes flushes with the commit protocol.
///
/// Blocking: every method does synchronous file I/O, so async callers run [`Lake::commit`] on a
/// blocking thread. The writer's lock is held until the `Lake` is dropped.
#[derive(Debug)]
pub struct Lake {
    store: Store,
    writer: WriterId,
    schema: Arc<TelemetrySchema>,
    options: LakeOptions,
    /// Built once from `options`.
    props: WriterProperties,
    next_commit: u64,
    state: State,
    /// Device checkpoints and counts folded over every commit so far, for snapshots.
    folded: Folded,
    /// Held for the lake's lifetime; dropping it releases the writer lock.
    _lock: WriterLock,
    #[cfg(test)]
    failpoint: Option<Failpoint>,
}

/// A writer's state folded over its commits: what a snapshot holds.
#[derive(Debug, Default)]
struct Folded {
    devices: BTreeMap<String, DeviceCheckpoint>,
    totals: FlushCounts,
}

impl Folded {
    fn add(&mut self, flush: &Flush<'_>) {
        self.totals.add(flush.counts);
        self.devices
            .extend(flush.devices.iter().map(|(k, v)| (k.clone(), *v)));
    }
}

/// Whether the lake can take the next flush as it is.
#[derive(Debug)]
enum State {
    /// Every commit so far is complete.
    Ready,
    /// The last commit passed its commit point but not all its files are visible.
    Pending(Box<Pending>),
    /// The last commit record's durability is unknown; no more commits until reopened.
    Poisoned { commit: u64, cause: String },
}

/// A committed flush whose files still need publishing, and the flush itself, to recognise a
/// retry.
#[derive(Debug)]
struct Pending {
    record: CommitRecord,
    flush: OwnedFlush,
}

/// A copy of a [`Flush`] (batches are reference-counted, so this copies no rows).
#[derive(Debug)]
struct OwnedFlush {
    telemetry: Vec<RecordBatch>,
    dead_letters: Vec<RecordBatch>,
    counts: FlushCounts,
    devices: BTreeMap<String, DeviceCheckpoint>,
    sources: serde_json::Value,
}

impl OwnedFlush {
    fn of(flush: &Flush<'_>) -> Self {
        Self {
            telemetry: flush.telemetry.to_vec(),
            dead_letters: flush.dead_letters.to_vec(),
            counts: flush.counts.clone(),
            devices: flush.devices.clone(),
            sources: flush.sources.clone(),
        }
    }

    /// Whether `flush` carries the same rows, counts, checkpoints and positions.
    fn is(&self, flush: &Flush<'_>) -> bool {
        self.counts == *flush.counts
            && self.devices == *flush.devices
            && self.sources == *flush.sources
            && self.telemetry == flush.telemetry
            && self.dead_letters == flush.dead_letters
    }
}

/// Failures injected by unit tests.
#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failpoint {
    /// Writing temporary file `n` fails.
    TmpFile(usize),
    /// Fsyncing the commits folder after the record's rename fails.
    RecordDirSync,
}

impl Lake {
    /// Opens (creating if needed) the lake at `root` for `writer_id`: takes the writer lock,
    /// then runs recovery (see the [module docs](crate::lake#recovery)).
    ///
    /// Recovery reads the writer's newest snapshot and at most 1,000 commit records after it
    /// (it lists every record's name).
    ///
    /// # Errors
    /// - [`SinkError::InvalidWriterId`], [`SinkError::InvalidOptions`] for bad arguments;
    /// - [`SinkError::Locked`] when another process (or another open `Lake`) holds this
    ///   writer's lock: give each instance its own writer id;
    /// - [`SinkError::CorruptCommitRecord`], [`SinkError::InvalidCommitRecord`] for a damaged
    ///   record;
    /// - [`SinkError::Io`] when the file system fails.
    ///
    /// # Example
    /// ```
    /// use std::collections::BTreeMap;
    /// use std::sync::Arc;
    /// use sensorlake_core::{FlushCounts, TelemetrySchema};
    /// use sensorlake_sink::{Flush, Lake, LakeOptions};
    ///
    /// let dir = tempfile::tempdir()?;
    /// let schema = Arc::new(TelemetrySchema::v1_default());
    /// let (mut lake, recovered) = Lake::open(dir.path(), "w0", schema, LakeOptions::default())?;
    /// assert_eq!(recovered.last_commit, None);
    ///
    /// let counts = FlushCounts { received: 2, duplicates: 2, ..FlushCounts::default() };
    /// let summary = lake.commit(&Flush {
    ///     telemetry: &[],
    ///     dead_letters: &[],
    ///     counts: &counts,
    ///     devices: &BTreeMap::new(),
    ///     sources: &serde_json::Value::Null,
    /// })?;
    /// assert_eq!((summary.commit, summary.rows), (0, 0));
    /// assert_eq!(lake.next_commit(), 1);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn open(
        root: &Path,
        writer_id: &str,
        schema: Arc<TelemetrySchema>,
        options: LakeOptions,
    ) -> Result<(Lake, Recovered), SinkError> {
        let store = Store::from_url(root, &options)?;
        store.create_root()?;
        Self::open_in(store, writer_id, schema, options)
    }

    /// Opens a lake under `prefix` of an object store built by the caller (an in-memory store
    /// in tests, a store with custom client options). `url` names it in messages.
    ///
    /// # Errors
    /// As [`Lake::open`].
    pub fn open_object_store(
        store: Arc<dyn object_store::ObjectStore>,
        prefix: &str,
        url: &str,
        writer_id: &str,
        schema: Arc<TelemetrySchema>,
        options: LakeOptions,
    ) -> Result<(Lake, Recovered), SinkError> {
        let store = Store::Object(ObjectStorage::new(store, prefix, url)?);
        Self::open_in(store, writer_id, schema, options)
    }

    fn open_in(
        store: Store,
        writer_id: &str,
        schema: Arc<TelemetrySchema>,
        options: LakeOptions,
    ) -> Result<(Lake, Recovered), SinkError> {
        let writer = WriterId::try_new(writer_id)?;
        let props = writer_properties(&options)?;
        store.create_dir_all(&layout::locks_dir())?;
        let lock_rel = layout::lock_file(&writer);
        let lock = store
            .try_lock(&lock_rel)?
            .ok_or_else(|| SinkError::Locked {
                writer: writer.to_string(),
                lock_path: store.abs(&lock_rel),
            })?;
        for dir in [
            layout::commits_dir(&writer),
            layout::tmp_writer_dir(&writer),
            Table::Telemetry.dir().to_owned(),
            Table::DeadLetter.dir().to_owned(),
        ] {
            store.create_dir_all(&dir)?;
        }
        let mut lake = Lake {
            store,
            writer,
            schema,
            options,
            props,
            next_commit: 0,
            state: State::Ready,
            folded: Folded::default(),
            _lock: lock,
            #[cfg(test)]
            failpoint: None,
        };
        let recovered = lake.recover()?;
        Ok((lake, recovered))
    }

    /// Writes one flush atomically with the commit protocol (see the
    /// [module docs](crate::lake)) and returns what it wrote. When this returns `Ok`, every row
    /// of the flush is durable and visible, and the flush's sources may be acknowledged.
    ///
    /// # Errors
    /// - [`SinkError::SchemaMismatch`] when a batch does not have its table's schema;
    /// - [`SinkError::Io`], [`SinkError::Parquet`] when writing fails before the commit point:
    ///   nothing was committed, and the same flush may be retried;
    /// - [`SinkError::NotVisible`] when the flush was committed but publishing its files
    ///   failed: the flush is durable ([`SinkError::is_committed`]); the next `commit` (or
    ///   `open`) finishes publishing, and retrying the same flush returns this commit's
    ///   summary without writing anything again;
    /// - [`SinkError::Poisoned`] when the commit record's durability is unknown: drop the lake
    ///   and open it again, without acknowledging the flush.
    pub fn commit(&mut self, flush: &Flush<'_>) -> Result<CommitSummary, SinkError> {
        if let Some(summary) = self.settle(flush)? {
            return Ok(summary);
        }
        self.write_commit(flush, None)
    }

    /// Runs [`Lake::commit`] up to and including `step`, then drops the lake as a crash would
    /// (releasing the lock). For crash tests only.
    ///
    /// # Errors
    /// As [`Lake::commit`].
    #[doc(hidden)]
    pub fn crash_after(
        mut self,
        flush: &Flush<'_>,
        step: CommitStep,
    ) -> Result<CommitSummary, SinkError> {
        if let Some(summary) = self.settle(flush)? {
            return Ok(summary);
        }
        self.write_commit(flush, Some(step))
    }

    /// The lake root, as given to [`Lake::open`].
    pub fn root(&self) -> &Path {
        self.store.root()
    }

    /// This lake's writer id.
    pub fn writer_id(&self) -> &str {
        self.writer.as_str()
    }

    /// The number the next commit will get.
    pub fn next_commit(&self) -> u64 {
        self.next_commit
    }

    /// The schema batches must have.
    pub fn schema(&self) -> &Arc<TelemetrySchema> {
        &self.schema
    }

    /// The options files are written with.
    pub fn options(&self) -> &LakeOptions {
        &self.options
    }

    /// Whether the lake is on an object store rather than a local folder. After a
    /// [`SinkError::Poisoned`] commit only an object store can be reopened in-process to learn
    /// the outcome; on a folder the cause is a failed fsync, which nothing can undo.
    pub fn is_object_store(&self) -> bool {
        matches!(self.store, Store::Object(_))
    }

    #[cfg(test)]
    pub(crate) fn set_failpoint(&mut self, failpoint: Option<Failpoint>) {
        self.failpoint = failpoint;
    }

    /// Deals with an unfinished earlier commit before a new one. Returns the earlier commit's
    /// summary when `flush` is a retry of it.
    fn settle(&mut self, flush: &Flush<'_>) -> Result<Option<CommitSummary>, SinkError> {
        match std::mem::replace(&mut self.state, State::Ready) {
            State::Ready => Ok(None),
            State::Poisoned { commit, cause } => {
                self.state = State::Poisoned {
                    commit,
                    cause: cause.clone(),
                };
                Err(SinkError::Poisoned { commit, cause })
            }
            State::Pending(pending) => {
                let commit = pending.record.commit;
                if let Err(e) = self.publish(&pending.record, false) {
                    self.state = State::Pending(pending);
                    return Err(SinkError::NotVisible {
                        commit,
                        source: Box::new(e),
                    });
                }
                self.remove_tmp_commit_dir(commit);
                tracing::info!(writer = %self.writer, commit, "Finished publishing a commit");
                Ok(pending
                    .flush
                    .is(flush)
                    .then(|| CommitSummary::of(&pending.record)))
            }
        }
    }

    /// Steps 1-5 of the protocol, stopping after `stop` if given.
    fn write_commit(
        &mut self,
        flush: &Flush<'_>,
        stop: Option<CommitStep>,
    ) -> Result<CommitSummary, SinkError> {
        let commit = self.next_commit;
        let max_rows = self.options.max_rows_per_file;

        // (1) Plan the files.
        let mut planned = partition::plan_files(
            Table::Telemetry,
            self.schema.telemetry(),
            flush.telemetry,
            max_rows,
        )?;
        planned.extend(partition::plan_files(
            Table::DeadLetter,
            self.schema.dead_letter(),
            flush.dead_letters,
            max_rows,
        )?);

        // (2) Write them under temporary names.
        let files = match self.write_tmp_files(commit, &planned) {
            Ok(files) => files,
            Err(e) => {
                self.remove_tmp_commit_dir(commit);
                return Err(e);
            }
        };
        drop(planned);
        if !files.is_empty() {
            failpoint::hit("files_written");
        }
        let record = CommitRecord {
            version: COMMIT_RECORD_VERSION,
            writer: self.writer.to_string(),
            commit,
            created_at: now_rfc3339(),
            files,
            counts: flush.counts.clone(),
            devices: flush.devices.clone(),
            sources: flush.sources.clone(),
        };
        let summary = CommitSummary::of(&record);
        if stop == Some(CommitStep::FilesWritten) {
            return Ok(summary);
        }

        // (3) The commit point.
        let json = serde_json::to_vec(&record)
            .expect("a commit record always serializes: string map keys, derived impls only");
        let put = self.store.put_atomic_like(
            &layout::commit_record(&self.writer, commit),
            &json,
            &|existing| record.same_commit_as(existing),
        );
        #[cfg(test)]
        let put = match (put, self.failpoint) {
            (Ok(()), Some(Failpoint::RecordDirSync)) => Err(PutError::Unknown(SinkError::io(
                "fsync directory",
                self.store.abs(&layout::commits_dir(&self.writer)),
                std::io::Error::other("injected failure"),
            ))),
            (put, _) => put,
        };
        match put {
            Ok(()) => {}
            Err(PutError::NotWritten(e)) => {
                self.remove_tmp_commit_dir(commit);
                return Err(e);
            }
            Err(PutError::Unknown(e)) => {
                let cause = e.to_string();
                tracing::error!(writer = %self.writer, commit, error = %e, "Commit record may not be durable; the lake stops taking commits");
                self.state = State::Poisoned {
                    commit,
                    cause: cause.clone(),
                };
                return Err(SinkError::Poisoned { commit, cause });
            }
        }
        self.next_commit = commit + 1;
        self.folded.add(flush);
        if stop == Some(CommitStep::RecordWritten) {
            return Ok(summary);
        }
        if !record.files.is_empty() {
            failpoint::hit("record_written");
        }

        // (4) Publish.
        if let Err(e) = self.publish(&record, true) {
            tracing::warn!(writer = %self.writer, commit, error = %e, "Commit is durable but publishing its files failed; the next commit retries");
            self.state = State::Pending(Box::new(Pending {
                record,
                flush: OwnedFlush::of(flush),
            }));
            return Err(SinkError::NotVisible {
                commit,
                source: Box::new(e),
            });
        }
        if stop == Some(CommitStep::FilesVisible) {
            return Ok(summary);
        }
        if !record.files.is_empty() {
            failpoint::hit("files_visible");
        }

        // (5) Clean up.
        self.remove_tmp_commit_dir(commit);
        if (commit + 1).is_multiple_of(self.options.snapshot_every.max(1)) {
            self.write_snapshot(commit);
        }
        tracing::debug!(
            writer = %self.writer,
            commit,
            files = summary.files.len(),
            rows = summary.rows,
            bytes = summary.bytes,
            "Committed a flush"
        );
        Ok(summary)
    }

    /// Step 2: encodes each planned file to its temporary name and fsyncs it, then fsyncs the
    /// temporary folder.
    fn write_tmp_files(
        &self,
        commit: u64,
        planned: &[PlannedFile],
    ) -> Result<Vec<CommittedFile>, SinkError> {
        if planned.is_empty() {
            return Ok(Vec::new());
        }
        let dir = layout::tmp_commit_dir(&self.writer, commit);
        // Left by an earlier attempt at this commit number that failed.
        self.store.remove_dir_all(&dir)?;
        self.store.create_dir_all(&dir)?;
        let mut files = Vec::with_capacity(planned.len());
        for (n, file) in planned.iter().enumerate() {
            let tmp_path = layout::tmp_file(&self.writer, commit, n);
            #[cfg(test)]
            if self.failpoint == Some(Failpoint::TmpFile(n)) {
                return Err(SinkError::io(
                    "create",
                    self.store.abs(&tmp_path),
                    std::io::Error::other("injected failure"),
                ));
            }
            let schema = match file.table {
                Table::Telemetry => self.schema.telemetry(),
                Table::DeadLetter => self.schema.dead_letter(),
            };
            let mut out = self.store.create(&tmp_path)?;
            let rows = encode::write_file(&mut out, schema, &file.batches, self.props.clone())
                .map_err(|source| SinkError::Parquet {
                    path: self.store.abs(&tmp_path),
                    source,
                })?;
            debug_assert_eq!(rows, file.rows as u64, "the writer wrote every planned row");
            let bytes = out.finish()?;
            files.push(CommittedFile {
                table: file.table,
                path: format!(
                    "{}/{}",
                    file.dir,
                    layout::part_file_name(&self.writer, commit, n)
                ),
                tmp_path,
                rows,
                bytes,
            });
        }
        self.store.sync_dir(&dir)?;
        Ok(files)
    }

    /// Step 4, idempotent: renames every file of `record` whose final name does not exist yet,
    /// then fsyncs the destination folders. Returns how many files it renamed. `in_commit`:
    /// called by the commit itself (not recovery), where the crash point between renames is.
    fn publish(&self, record: &CommitRecord, in_commit: bool) -> Result<usize, SinkError> {
        let mut dirs = BTreeSet::new();
        let mut renamed = 0;
        for file in &record.files {
            let dir = layout::parent(&file.path);
            if dirs.insert(dir) {
                self.store.create_dir_all(dir)?;
            }
            if self.store.exists(&file.path)? {
                continue;
            }
            if !self.store.exists(&file.tmp_path)? {
                tracing::error!(
                    writer = %self.writer,
                    commit = record.commit,
                    path = %self.store.abs(&file.path).display(),
                    tmp_path = %self.store.abs(&file.tmp_path).display(),
                    "A committed file is missing under both its names; its rows are lost"
                );
                continue;
            }
            self.store.rename(&file.tmp_path, &file.path)?;
            renamed += 1;
            if in_commit && renamed == 1 {
                failpoint::hit("one_file_visible");
            }
        }
        for dir in dirs {
            self.store.sync_dir(dir)?;
        }
        Ok(renamed)
    }

    /// Writes the snapshot of commits `0..=commit`, best effort: without it recovery reads
    /// more records, nothing else.
    fn write_snapshot(&self, commit: u64) {
        let snapshot = record::Snapshot {
            version: COMMIT_RECORD_VERSION,
            writer: self.writer.to_string(),
            commit,
            devices: self.folded.devices.clone(),
            totals: self.folded.totals.clone(),
        };
        let json = serde_json::to_vec(&snapshot)
            .expect("a snapshot always serializes: string map keys, derived impls only");
        let dir = layout::snapshots_dir(&self.writer);
        let written = self
            .store
            .create_dir_all(&dir)
            .map_err(|e| e.to_string())
            .and_then(|()| {
                match self
                    .store
                    .put_atomic(&layout::snapshot(&self.writer, commit), &json)
                {
                    Ok(()) => Ok(()),
                    Err(PutError::NotWritten(e) | PutError::Unknown(e)) => Err(e.to_string()),
                }
            });
        match written {
            Ok(()) => tracing::debug!(writer = %self.writer, commit, "Wrote a recovery snapshot"),
            Err(e) => tracing::warn!(writer = %self.writer, commit, error = %e,
                                     "Could not write a recovery snapshot; recovery will read more records"),
        }
    }

    /// Step 5, best effort: the folder is inside `_sensorlake/tmp/`, where a leftover harms no
    /// reader, and recovery removes it at the next open.
    fn remove_tmp_commit_dir(&self, commit: u64) {
        if let Err(e) = self
            .store
            .remove_dir_all(&layout::tmp_commit_dir(&self.writer, commit))
        {
            tracing::warn!(writer = %self.writer, commit, error = %e, "Could not remove a temporary folder");
        }
    }

    /// Recovery; see the module docs.
    fn recover(&mut self) -> Result<Recovered, SinkError> {
        let mut recovered = Recovered::default();
        let last = fold_writer(&self.store, &self.writer, &mut recovered)?;
        self.folded = Folded {
            devices: recovered.devices.clone(),
            totals: recovered.totals.clone(),
        };
        if let Some(last) = &last {
            recovered.last_commit = Some(last.commit);
            recovered.last_summary = Some(CommitSummary::of(last));
            recovered.sources = match &last.sources {
                serde_json::Value::Null => Vec::new(),
                serde_json::Value::Array(items) => items.clone(),
                other => vec![other.clone()],
            };
            recovered.files_made_visible = self.publish(last, false)?;
            self.next_commit =
                last.commit
                    .checked_add(1)
                    .ok_or_else(|| SinkError::InvalidCommitRecord {
                        path: self
                            .store
                            .abs(&layout::commit_record(&self.writer, last.commit)),
                        why: "its commit number is the largest possible".into(),
                    })?;
        }

        // Temporary folders: flushes that never reached their commit point (and the emptied
        // folder of the last commit).
        recovered.files_removed += self
            .store
            .clear_subfolders(&layout::tmp_writer_dir(&self.writer))?;
        // Commit records that never got their final name.
        let commits_dir = layout::commits_dir(&self.writer);
        for name in self.store.list(&commits_dir)? {
            if name.ends_with(layout::RECORD_TMP_SUFFIX) {
                self.store.remove_file(&format!("{commits_dir}/{name}"))?;
            }
        }

        tracing::info!(
            writer = %self.writer,
            last_commit = ?recovered.last_commit,
            devices = recovered.devices.len(),
            files_made_visible = recovered.files_made_visible,
            files_removed = recovered.files_removed,
            "Recovered the lake"
        );
        Ok(recovered)
    }
}

/// Folds `writer`'s commit records (from its newest snapshot on) into `recovered`'s devices
/// and totals, and returns its last record. Reads only.
fn fold_writer(
    store: &Store,
    writer: &WriterId,
    recovered: &mut Recovered,
) -> Result<Option<CommitRecord>, SinkError> {
    let mut last: Option<CommitRecord> = None;
    // The newest snapshot spares reading the records it folds; the record it ends at is
    // still read, as the last one may need publishing.
    let newest = record::numbers_in(store, &layout::commits_dir(writer))?
        .last()
        .copied();
    let snapshot = newest.and_then(|n| record::read_snapshot(store, writer, n));
    let from = match &snapshot {
        Some(s) => {
            recovered.devices = s.devices.clone();
            recovered.totals = s.totals.clone();
            s.commit
        }
        None => 0,
    };
    for mut record in record::read_writer_records_from(store, writer, from)? {
        if snapshot.as_ref().is_none_or(|s| record.commit > s.commit) {
            recovered.totals.add(&record.counts);
            recovered.devices.append(&mut record.devices);
        }
        last = Some(record);
    }
    Ok(last)
}

/// What another writer has committed, read without its lock and without repairing anything
/// (its process may be running): the device checkpoints folded over its commits, its totals
/// and the `sources` of its last commit (`last_commit`, `last_summary`, `sources`, `devices`,
/// `totals` of a [`Recovered`]; the repair counts stay zero).
///
/// Used to hand state from one writer to the next, such as a closed Kinesis shard's final
/// checkpoint and device states to its children.
///
/// # Errors
/// As [`Lake::open`], less the lock.
pub fn peek_writer(
    root: &Path,
    writer_id: &str,
    options: &LakeOptions,
) -> Result<Recovered, SinkError> {
    let writer = WriterId::try_new(writer_id)?;
    let store = Store::from_url(root, options)?;
    let mut recovered = Recovered::default();
    let last = fold_writer(&store, &writer, &mut recovered)?;
    if let Some(last) = last {
        recovered.last_commit = Some(last.commit);
        recovered.last_summary = Some(CommitSummary::of(&last));
        recovered.sources = match &last.sources {
            serde_json::Value::Null => Vec::new(),
            serde_json::Value::Array(items) => items.clone(),
            other => vec![other.clone()],
        };
    }
    Ok(recovered)
}

/// Now, as RFC 3339 with milliseconds.
fn now_rfc3339() -> String {
    let us = match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_micros()).map_or(i64::MIN, |us| -us),
    };
    format_rfc3339_millis(us)
}
