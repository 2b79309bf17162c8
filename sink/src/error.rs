//! The sink's errors: one variant per cause, each naming the operation and the path involved.

use std::io;
use std::path::PathBuf;

use crate::record::Table;

/// Everything that can go wrong while opening, writing or reading a lake.
///
/// Only [`SinkError::NotVisible`] means the flush was committed; after any other error of
/// [`Lake::commit`](crate::Lake::commit) the flush is not in the lake and its sources must not be
/// acknowledged.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// A file-system operation failed. `op` says which (`create`, `write`, `fsync`, `rename`,
    /// ...), `path` is the absolute path it was applied to. For a failed rename, `path` is the
    /// destination.
    #[error("failed to {op} {}: {source}", path.display())]
    Io {
        /// The operation, as a verb phrase: "fsync", "create directory", ...
        op: &'static str,
        /// The file or directory it was applied to.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },

    /// Encoding a Parquet file of a commit failed (a batch that does not fit the schema, or an
    /// I/O error surfaced by the Parquet writer). Nothing of the flush was committed.
    #[error("failed to write Parquet file {}: {source}", path.display())]
    Parquet {
        /// The temporary file being written.
        path: PathBuf,
        /// The Parquet writer's error.
        #[source]
        source: parquet::errors::ParquetError,
    },

    /// [`encode_parquet`](crate::encode_parquet) failed; the output is unusable.
    #[error("failed to encode Parquet: {source}")]
    Encode {
        /// The Parquet writer's error.
        #[source]
        source: parquet::errors::ParquetError,
    },

    /// Splitting a batch into partitions failed (an Arrow kernel error). Nothing was written.
    #[error("failed to partition {table} batch: {source}")]
    Partition {
        /// The table the batch belongs to.
        table: Table,
        /// The Arrow error.
        #[source]
        source: arrow::error::ArrowError,
    },

    /// Another process (or another [`Lake`](crate::Lake) in this one) holds the writer's lock.
    /// Two instances with one writer id would overwrite each other's files and commit records.
    #[error(
        "writer id `{writer}` is already in use: another process holds the lock {}; give each instance its own writer id",
        lock_path.display()
    )]
    Locked {
        /// The writer id asked for.
        writer: String,
        /// The lock file held by the other instance.
        lock_path: PathBuf,
    },

    /// A lake location that cannot be used: an unsupported scheme, or an object store the
    /// environment does not configure (no region, no credentials, a bad endpoint).
    #[error("cannot use the lake {url}: {why}")]
    InvalidLake {
        /// The location as given.
        url: String,
        /// What is wrong, and what to set.
        why: String,
    },

    /// A writer id that is empty, longer than 64 characters, or has characters outside
    /// `A-Z a-z 0-9 _ -`. Writer ids become part of file names, so nothing else is allowed.
    #[error("writer id {id:?} is not valid: use 1-64 characters of A-Z a-z 0-9 _ -")]
    InvalidWriterId {
        /// The rejected id.
        id: String,
    },

    /// A [`LakeOptions`](crate::LakeOptions) value out of range.
    #[error("lake option `{field}` {why}")]
    InvalidOptions {
        /// The option's name.
        field: &'static str,
        /// What is wrong with it.
        why: String,
    },

    /// A batch handed to [`Lake::commit`](crate::Lake::commit) does not have the lake's schema
    /// for its table. Nothing was written.
    #[error("a {table} batch does not match the lake's {table} schema: {why}")]
    SchemaMismatch {
        /// The table.
        table: Table,
        /// The first difference found.
        why: String,
    },

    /// A commit record that is not valid JSON of the expected shape. Recovery stops here rather
    /// than guess; the file needs a human (restore it from a backup, or move it away if its
    /// flush is known to be lost).
    #[error("commit record {} is corrupt: {source}", path.display())]
    CorruptCommitRecord {
        /// The record's file.
        path: PathBuf,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },

    /// A commit record that parses but contradicts its file name, has an unsupported version,
    /// or names a path outside the lake's layout. Recovery refuses to act on it.
    #[error("commit record {} is not valid: {why}", path.display())]
    InvalidCommitRecord {
        /// The record's file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },

    /// The commit point was passed (the commit record is durable) but making the files visible
    /// failed. The flush **is committed**: its sources may be acknowledged. The lake finishes
    /// the job at the next [`Lake::commit`](crate::Lake::commit) (a retry with the same flush
    /// returns this commit's summary and writes nothing new) or at the next
    /// [`Lake::open`](crate::Lake::open).
    #[error(
        "commit {commit} is durable but making its files visible failed; the next commit (or recovery at the next open) finishes it, and retrying this flush writes nothing twice: {source}"
    )]
    NotVisible {
        /// The commit number.
        commit: u64,
        /// What failed.
        #[source]
        source: Box<SinkError>,
    },

    /// Another compaction holds the lake's compactor lease: locally a file lock, released
    /// when that process ends; on an object store an object that a killed compaction leaves
    /// behind. `why` says which, and what to do.
    #[error("cannot compact: the compactor lease {} is held; {why}", lease.display())]
    CompactionLocked {
        /// The lock file or lease object.
        lease: PathBuf,
        /// Who holds it, as far as known, and what to do.
        why: String,
    },

    /// A Parquet file that compaction was to merge cannot be read (damaged, or not Parquet).
    /// The file and its partition are left as they are.
    #[error("failed to read Parquet file {}: {source}", path.display())]
    ReadParquet {
        /// The file.
        path: PathBuf,
        /// The Parquet reader's error.
        #[source]
        source: parquet::errors::ParquetError,
    },

    /// The last compaction record cannot be finished without losing or doubling rows: one of
    /// its outputs exists under neither its final nor its temporary name (deleted by hand, or
    /// lost by the storage). Nothing more is changed and compaction refuses to run until a
    /// human resolves it; `why` says what is where and what to do.
    #[error("compaction record {} cannot be finished: {why}", record.display())]
    CompactionBroken {
        /// The compaction record.
        record: PathBuf,
        /// What is missing, what is still there, and what to do.
        why: String,
    },

    /// Writing the commit record failed in a way that leaves its durability unknown (the record
    /// was renamed into place but fsyncing its directory failed). The lake accepts no more
    /// commits; drop it and open the lake again (restart), and recovery decides from what is on
    /// disk. The flush's sources must not be acknowledged: a redelivered reading that did get
    /// committed is dropped as a duplicate by the recovered device checkpoints.
    #[error(
        "commit {commit} may or may not be durable ({cause}); this lake accepts no more commits: reopen it so recovery can decide"
    )]
    Poisoned {
        /// The commit whose record may or may not be durable.
        commit: u64,
        /// The error that left it so, as text.
        cause: String,
    },
}

impl SinkError {
    /// Whether the flush this error came from is durably committed (its sources may be
    /// acknowledged): true only for [`SinkError::NotVisible`].
    pub fn is_committed(&self) -> bool {
        matches!(self, SinkError::NotVisible { .. })
    }

    /// Whether another process already committed this commit number as this writer (the
    /// commit record's conditional write found a different record): this process no longer
    /// owns the writer, and retrying cannot succeed.
    pub fn is_commit_conflict(&self) -> bool {
        matches!(self, SinkError::Io { source, .. } if source.kind() == io::ErrorKind::AlreadyExists)
    }

    /// Whether the cause, anywhere down the chain of sources (the Parquet writer wraps its
    /// I/O errors), is a full file system or an exhausted quota (`ENOSPC`, `EDQUOT`). The
    /// remedy is outside sensorlake — free space where the lake is — so callers say so.
    pub fn is_storage_full(&self) -> bool {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(e) = cause {
            if let Some(io) = e.downcast_ref::<io::Error>()
                && matches!(
                    io.kind(),
                    io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
                )
            {
                return true;
            }
            cause = e.source();
        }
        false
    }

    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        SinkError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_is_recognised_through_the_parquet_writer() {
        let enospc = || io::Error::from_raw_os_error(28);
        assert!(SinkError::io("write", "/lake/x", enospc()).is_storage_full());
        let wrapped = SinkError::Parquet {
            path: "/lake/x".into(),
            source: parquet::errors::ParquetError::External(Box::new(enospc())),
        };
        assert!(wrapped.is_storage_full(), "{wrapped}");
        let denied = SinkError::io("write", "/lake/x", io::Error::from_raw_os_error(13));
        assert!(!denied.is_storage_full());
    }
}
