//! Commit records: the JSON file per commit that makes a flush part of the lake, and reading
//! them back.
//!
//! A record lists the flush's files (final and temporary paths, rows, bytes), its
//! [`FlushCounts`], the [`DeviceCheckpoint`] of every device it touched, and the opaque
//! positions of its sources. Its appearance under `_sensorlake/commits/<writer>/` is the commit
//! point; see [`crate::lake`].

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use sensorlake_core::{DeviceCheckpoint, FlushCounts};
use serde::{Deserialize, Serialize};

use crate::SinkError;
use crate::layout;
use crate::local::LocalStore;
use crate::store::Store;
use crate::writer_id::{self, WriterId};

/// The commit record format this crate writes and reads.
pub const COMMIT_RECORD_VERSION: u32 = 1;

/// The lake's tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Table {
    /// Accepted readings, partitioned by `ts` into `telemetry/date=…/hour=…/`.
    Telemetry,
    /// Rejected input, partitioned by `received_at` into `dead_letter/date=…/`.
    DeadLetter,
}

impl Table {
    /// The table's folder under the lake root, which is also its name.
    pub fn dir(self) -> &'static str {
        match self {
            Table::Telemetry => "telemetry",
            Table::DeadLetter => "dead_letter",
        }
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.dir())
    }
}

/// One visible file of a commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// The table the file belongs to.
    pub table: Table,
    /// Path relative to the lake root, `/`-separated, e.g.
    /// `telemetry/date=2026-11-27/hour=15/part-w0-0000000007-0000.parquet`.
    pub path: String,
    /// Rows in the file.
    pub rows: u64,
    /// Size of the file in bytes.
    pub bytes: u64,
}

/// One file as the commit record lists it: where it ends up and where it waits until then.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommittedFile {
    /// The table the file belongs to.
    pub table: Table,
    /// The final path, relative to the lake root.
    pub path: String,
    /// The temporary path it is written to first, relative to the lake root
    /// (`_sensorlake/tmp/<writer>/<commit:020>/<n>.parquet`).
    pub tmp_path: String,
    /// Rows in the file.
    pub rows: u64,
    /// Size of the file in bytes.
    pub bytes: u64,
}

impl CommittedFile {
    /// The file as a [`FileEntry`] (without its temporary path).
    pub fn entry(&self) -> FileEntry {
        FileEntry {
            table: self.table,
            path: self.path.clone(),
            rows: self.rows,
            bytes: self.bytes,
        }
    }
}

/// The record of one commit, stored as `_sensorlake/commits/<writer>/<commit:020>.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommitRecord {
    /// Format version; [`COMMIT_RECORD_VERSION`].
    pub version: u32,
    /// The writer id that made the commit.
    pub writer: String,
    /// The commit number, counting from 0 per writer.
    pub commit: u64,
    /// When the record was written (RFC 3339, UTC, milliseconds). For people; nothing depends
    /// on it.
    pub created_at: String,
    /// The files of the flush, telemetry first, in partition order.
    pub files: Vec<CommittedFile>,
    /// What the flush accounted for.
    pub counts: FlushCounts,
    /// The checkpoint of every device the flush touched.
    pub devices: BTreeMap<String, DeviceCheckpoint>,
    /// The sources' positions after this flush, opaque to the sink (`null` for MQTT).
    #[serde(default)]
    pub sources: serde_json::Value,
}

impl CommitRecord {
    /// Whether `existing` (a stored record's bytes) is this same commit, written by an earlier
    /// attempt of the same flush: equal in everything but `created_at`. An attempt whose
    /// outcome was unknown may have landed after the lake was reopened; its retry must
    /// recognise it rather than fail as "another writer".
    pub(crate) fn same_commit_as(&self, existing: &[u8]) -> bool {
        serde_json::from_slice::<CommitRecord>(existing).is_ok_and(|other| {
            CommitRecord {
                created_at: self.created_at.clone(),
                ..other
            } == *self
        })
    }

    /// Rows in all files.
    pub fn rows(&self) -> u64 {
        self.files.iter().map(|f| f.rows).sum()
    }

    /// Bytes in all files.
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.bytes).sum()
    }

    /// Checks the record agrees with where it was found and names only paths of the lake's
    /// layout, so that recovery can act on it without ever touching anything else.
    fn check(&self, writer: &WriterId, commit: u64) -> Result<(), String> {
        if self.version != COMMIT_RECORD_VERSION {
            return Err(format!(
                "version {} is not supported (this build reads version {COMMIT_RECORD_VERSION})",
                self.version
            ));
        }
        if self.writer != writer.as_str() {
            return Err(format!(
                "it names writer `{}` but lies in the folder of writer `{writer}`",
                self.writer
            ));
        }
        if self.commit != commit {
            return Err(format!(
                "it names commit {} but its file name says {commit}",
                self.commit
            ));
        }
        let tmp_prefix = format!("{}/", layout::tmp_commit_dir(writer, commit));
        for f in &self.files {
            let tmp_ok = f
                .tmp_path
                .strip_prefix(&tmp_prefix)
                .and_then(|name| name.strip_suffix(".parquet"))
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
            if !tmp_ok {
                return Err(format!(
                    "temporary path `{}` is outside `{tmp_prefix}`",
                    f.tmp_path
                ));
            }
            let final_ok = layout::is_plain_relative(&f.path)
                && f.path.starts_with(&format!("{}/", f.table.dir()))
                && f.path.ends_with(".parquet");
            if !final_ok {
                return Err(format!(
                    "path `{}` is not a file of the {} table",
                    f.path, f.table
                ));
            }
        }
        Ok(())
    }
}

/// A writer's state folded over its commits `0..=commit`: written every
/// `LakeOptions::snapshot_every` commits so that recovery reads the latest snapshot and only the records
/// after it, however long the writer has been running.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Snapshot {
    pub version: u32,
    pub writer: String,
    /// The last commit folded in.
    pub commit: u64,
    /// Device checkpoints, later commits winning per device.
    pub devices: BTreeMap<String, DeviceCheckpoint>,
    /// The counts of commits `0..=commit`, summed.
    pub totals: FlushCounts,
}

/// The commit numbers of `writer`'s records (or, with `dir` = its snapshots folder, of its
/// snapshots), sorted.
pub(crate) fn numbers_in(store: &Store, dir: &str) -> Result<Vec<u64>, SinkError> {
    let mut numbered: Vec<u64> = store
        .list(dir)?
        .iter()
        .filter_map(|name| layout::parse_commit_record_name(name))
        .collect();
    numbered.sort_unstable();
    Ok(numbered)
}

/// The newest snapshot of `writer` at or below commit `at_most` that reads back whole and
/// agrees with its name; `None` if there is none (a damaged one is skipped with a warning:
/// the records it summarises are still there).
pub(crate) fn read_snapshot(store: &Store, writer: &WriterId, at_most: u64) -> Option<Snapshot> {
    let numbers = numbers_in(store, &layout::snapshots_dir(writer)).ok()?;
    for commit in numbers.into_iter().rev().filter(|c| *c <= at_most) {
        let rel = layout::snapshot(writer, commit);
        let parsed = store
            .read(&rel)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<Snapshot>(&b).map_err(|e| e.to_string()));
        match parsed {
            Ok(s) if s.commit == commit && s.writer == writer.as_str() => return Some(s),
            Ok(_) => {
                tracing::warn!(path = %store.abs(&rel).display(), "Snapshot does not match its name; ignored")
            }
            Err(e) => {
                tracing::warn!(path = %store.abs(&rel).display(), error = %e, "Unreadable snapshot; ignored")
            }
        }
    }
    None
}

/// Reads the commit records of `writer` numbered `from` and above, in commit order, checking
/// each.
pub(crate) fn read_writer_records_from(
    store: &Store,
    writer: &WriterId,
    from: u64,
) -> Result<Vec<CommitRecord>, SinkError> {
    numbers_in(store, &layout::commits_dir(writer))?
        .into_iter()
        .filter(|c| *c >= from)
        .map(|commit| read_record(store, writer, commit))
        .collect()
}

/// Reads every commit record of `writer`, in commit order, checking each.
pub(crate) fn read_writer_records(
    store: &Store,
    writer: &WriterId,
) -> Result<Vec<CommitRecord>, SinkError> {
    let dir = layout::commits_dir(writer);
    let mut numbered: Vec<u64> = store
        .list(&dir)?
        .iter()
        .filter_map(|name| layout::parse_commit_record_name(name))
        .collect();
    numbered.sort_unstable();
    numbered
        .into_iter()
        .map(|commit| read_record(store, writer, commit))
        .collect()
}

/// The last commit record of every writer in the lake, writers in name order (folders under
/// `_sensorlake/commits/` that are not valid writer ids skipped, writers without a record left
/// out). Reads one record per writer, whatever the number of commits.
pub(crate) fn read_last_records(store: &Store) -> Result<Vec<CommitRecord>, SinkError> {
    let mut last = Vec::new();
    for name in store.list(layout::COMMITS_DIR)? {
        if !writer_id::is_valid(&name) {
            continue;
        }
        let writer = WriterId::try_new(&name)?;
        let newest = store
            .list(&layout::commits_dir(&writer))?
            .iter()
            .filter_map(|name| layout::parse_commit_record_name(name))
            .max();
        if let Some(commit) = newest {
            last.push(read_record(store, &writer, commit)?);
        }
    }
    Ok(last)
}

fn read_record(store: &Store, writer: &WriterId, commit: u64) -> Result<CommitRecord, SinkError> {
    let rel = layout::commit_record(writer, commit);
    let bytes = store.read(&rel)?;
    let record: CommitRecord =
        serde_json::from_slice(&bytes).map_err(|source| SinkError::CorruptCommitRecord {
            path: store.abs(&rel),
            source,
        })?;
    record
        .check(writer, commit)
        .map_err(|why| SinkError::InvalidCommitRecord {
            path: store.abs(&rel),
            why,
        })?;
    Ok(record)
}

/// Reads every commit record of every writer in the lake at `root`: writers in name order, each
/// writer's records in commit order. For `verify` and status tools; it takes no lock and
/// changes nothing, so it may run while writers are committing (a record being written is not
/// seen until its rename).
///
/// Folders under `_sensorlake/commits/` whose names are not valid writer ids are skipped.
///
/// # Errors
/// [`SinkError::Io`] when a folder or record cannot be read,
/// [`SinkError::CorruptCommitRecord`] / [`SinkError::InvalidCommitRecord`] for a damaged
/// record.
pub fn read_commit_records(root: &Path) -> Result<Vec<CommitRecord>, SinkError> {
    let store = Store::Local(LocalStore::new(root, false));
    let mut all = Vec::new();
    for name in store.list(layout::COMMITS_DIR)? {
        if !writer_id::is_valid(&name) {
            continue;
        }
        let writer = WriterId::try_new(&name)?;
        all.extend(read_writer_records(&store, &writer)?);
    }
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(created_at: &str, rows: u64) -> CommitRecord {
        CommitRecord {
            version: COMMIT_RECORD_VERSION,
            writer: "w0".into(),
            commit: 7,
            created_at: created_at.into(),
            files: vec![CommittedFile {
                table: Table::Telemetry,
                path: "telemetry/date=2026-11-27/hour=15/part-w0-0000000007-0000.parquet".into(),
                tmp_path: "_sensorlake/tmp/w0/00000000000000000007/0.parquet".into(),
                rows,
                bytes: 1234,
            }],
            counts: FlushCounts::default(),
            devices: BTreeMap::new(),
            sources: serde_json::Value::Null,
        }
    }

    #[test]
    fn a_record_is_the_same_commit_whatever_its_creation_time_and_only_then() {
        let first = serde_json::to_vec(&record("2026-11-27T15:00:00.000Z", 10)).unwrap();
        assert!(record("2026-11-27T15:00:09.999Z", 10).same_commit_as(&first));
        assert!(!record("2026-11-27T15:00:00.000Z", 11).same_commit_as(&first));
        assert!(!record("2026-11-27T15:00:00.000Z", 10).same_commit_as(b"{not json"));
    }
}
