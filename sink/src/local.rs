//! Storage on a local folder: the only module that touches the file system.
//!
//! The commit protocol needs a handful of operations — write a new file durably, put a small
//! object atomically, rename, list, delete, make a folder's entries durable — and this module
//! supplies them over `std::fs` for paths relative to the lake root (`/`-separated, as in
//! object-store keys). An object-store backend replaces this module later with the same
//! operations (a multipart upload for [`LocalStore::create`], a conditional put for
//! [`LocalStore::put_atomic`], no-ops for the directory syncs).
//!
//! With `fsync` off every sync is skipped; only tests do that.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, BufWriter, ErrorKind, Write};
use std::path::{Path, PathBuf};

use crate::SinkError;
use crate::layout;

/// A lake root on the local file system.
#[derive(Debug, Clone)]
pub(crate) struct LocalStore {
    root: PathBuf,
    fsync: bool,
}

/// Why [`LocalStore::put_atomic`] failed, which decides what the caller may do next.
#[derive(Debug)]
pub(crate) enum PutError {
    /// Nothing is visible under the final name; the put may be retried.
    NotWritten(SinkError),
    /// The object is visible under its final name, but whether that survives a crash is not
    /// known (the folder's fsync failed).
    Unknown(SinkError),
}

impl LocalStore {
    pub(crate) fn new(root: &Path, fsync: bool) -> Self {
        Self {
            root: root.to_path_buf(),
            fsync,
        }
    }

    /// The lake root.
    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    /// The absolute path of a relative one.
    pub(crate) fn abs(&self, rel: &str) -> PathBuf {
        let mut p = self.root.clone();
        p.extend(rel.split('/').filter(|s| !s.is_empty()));
        p
    }

    /// Creates the folder `rel` and any missing parents, and makes each new folder's entry
    /// durable by syncing the folder that holds it.
    pub(crate) fn create_dir_all(&self, rel: &str) -> Result<(), SinkError> {
        let mut cur = self.root.clone();
        let mut parents_to_sync = Vec::new();
        for seg in rel.split('/').filter(|s| !s.is_empty()) {
            let next = cur.join(seg);
            match fs::create_dir(&next) {
                Ok(()) => parents_to_sync.push(cur.clone()),
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                Err(e) => return Err(SinkError::io("create directory", next, e)),
            }
            cur = next;
        }
        for dir in parents_to_sync {
            self.sync_dir_abs(&dir)?;
        }
        Ok(())
    }

    /// Creates (or truncates) the file `rel` for writing; its folder must exist.
    /// [`LocalWriter::finish`] makes it durable.
    pub(crate) fn create(&self, rel: &str) -> Result<LocalWriter, SinkError> {
        let path = self.abs(rel);
        let file = File::create(&path).map_err(|e| SinkError::io("create", &path, e))?;
        Ok(LocalWriter {
            file: BufWriter::with_capacity(1 << 20, file),
            path,
            bytes: 0,
            fsync: self.fsync,
        })
    }

    /// Writes `bytes` as the file `rel` so that it appears complete or not at all: to
    /// `<rel>.tmp`, fsync, rename to `rel`, fsync the folder.
    pub(crate) fn put_atomic(&self, rel: &str, bytes: &[u8]) -> Result<(), PutError> {
        let tmp_rel = format!("{rel}.tmp");
        let tmp = self.abs(&tmp_rel);
        let dest = self.abs(rel);
        let written = (|| {
            let mut f = File::create(&tmp).map_err(|e| SinkError::io("create", &tmp, e))?;
            f.write_all(bytes)
                .map_err(|e| SinkError::io("write", &tmp, e))?;
            if self.fsync {
                f.sync_all().map_err(|e| SinkError::io("fsync", &tmp, e))?;
            }
            fs::rename(&tmp, &dest).map_err(|e| SinkError::io("rename", &dest, e))
        })();
        if let Err(e) = written {
            if let Err(cleanup) = self.remove_file(&tmp_rel) {
                tracing::warn!(error = %cleanup, "Could not remove a temporary commit record");
            }
            return Err(PutError::NotWritten(e));
        }
        self.sync_dir(layout::parent(rel))
            .map_err(PutError::Unknown)
    }

    /// Renames `from` to `to` (same file system, atomic); `to`'s folder must exist. Does not
    /// sync: the caller syncs `to`'s folder once for all the files it moved there.
    pub(crate) fn rename(&self, from: &str, to: &str) -> Result<(), SinkError> {
        let dest = self.abs(to);
        fs::rename(self.abs(from), &dest).map_err(|e| SinkError::io("rename", dest, e))
    }

    /// Makes the entries of folder `rel` (renames into it, files created in it) durable.
    pub(crate) fn sync_dir(&self, rel: &str) -> Result<(), SinkError> {
        self.sync_dir_abs(&self.abs(rel))
    }

    fn sync_dir_abs(&self, dir: &Path) -> Result<(), SinkError> {
        if !self.fsync {
            return Ok(());
        }
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| SinkError::io("fsync directory", dir, e))
    }

    /// Whether `rel` exists (file or folder).
    pub(crate) fn exists(&self, rel: &str) -> Result<bool, SinkError> {
        let path = self.abs(rel);
        path.try_exists()
            .map_err(|e| SinkError::io("check existence of", path, e))
    }

    /// The names in folder `rel`, sorted; empty when there is no folder `rel`.
    pub(crate) fn list(&self, rel: &str) -> Result<Vec<String>, SinkError> {
        let path = self.abs(rel);
        let mut names = Vec::new();
        for entry in read_dir_or_none(&path)? {
            let entry = entry.map_err(|e| SinkError::io("list", &path, e))?;
            // Names that are not UTF-8 were not made by the lake; they are skipped.
            if let Ok(name) = entry.file_name().into_string() {
                names.push(name);
            }
        }
        names.sort_unstable();
        Ok(names)
    }

    /// The files in folder `rel` with their sizes, sorted by name; sub-folders and names that
    /// are not UTF-8 are left out, and a missing folder has no files.
    pub(crate) fn list_sizes(&self, rel: &str) -> Result<Vec<(String, u64)>, SinkError> {
        let path = self.abs(rel);
        let mut files = Vec::new();
        for entry in read_dir_or_none(&path)? {
            let entry = entry.map_err(|e| SinkError::io("list", &path, e))?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            let meta = match entry.metadata() {
                Ok(meta) => meta,
                // Removed since it was listed.
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(SinkError::io("inspect", entry.path(), e)),
            };
            if meta.is_file() {
                files.push((name, meta.len()));
            }
        }
        files.sort_unstable();
        Ok(files)
    }

    /// The whole content of file `rel`.
    pub(crate) fn read(&self, rel: &str) -> Result<Vec<u8>, SinkError> {
        let path = self.abs(rel);
        fs::read(&path).map_err(|e| SinkError::io("read", path, e))
    }

    /// Removes file `rel`; a missing file is not an error.
    pub(crate) fn remove_file(&self, rel: &str) -> Result<(), SinkError> {
        let path = self.abs(rel);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != ErrorKind::NotFound => Err(SinkError::io("remove", path, e)),
            _ => Ok(()),
        }
    }

    /// Removes folder `rel` and everything in it; a missing folder is not an error.
    pub(crate) fn remove_dir_all(&self, rel: &str) -> Result<(), SinkError> {
        let path = self.abs(rel);
        match fs::remove_dir_all(&path) {
            Err(e) if e.kind() != ErrorKind::NotFound => {
                Err(SinkError::io("remove directory", path, e))
            }
            _ => Ok(()),
        }
    }

    /// Removes `rel`, a file or a folder with everything in it; a missing one is not an error.
    pub(crate) fn remove_all(&self, rel: &str) -> Result<(), SinkError> {
        let path = self.abs(rel);
        match fs::symlink_metadata(&path) {
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(SinkError::io("inspect", path, e)),
            Ok(meta) if meta.is_dir() => self.remove_dir_all(rel),
            Ok(_) => self.remove_file(rel),
        }
    }

    /// Takes an exclusive lock on file `rel` (created if needed) and writes this process's id
    /// into it for people looking. Returns `None` when someone else holds it. The lock lasts
    /// as long as the returned file is open; the file itself is never removed (removing a lock
    /// file races with the next process taking it).
    pub(crate) fn try_lock(&self, rel: &str) -> Result<Option<File>, SinkError> {
        let path = self.abs(rel);
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| SinkError::io("open lock file", &path, e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => return Ok(None),
            Err(TryLockError::Error(e)) => return Err(SinkError::io("lock", path, e)),
        }
        file.set_len(0)
            .and_then(|()| writeln!(file, "{}", std::process::id()))
            .map_err(|e| SinkError::io("write", &path, e))?;
        Ok(Some(file))
    }
}

/// A file being written by [`LocalStore::create`]; counts its bytes.
#[derive(Debug)]
pub(crate) struct LocalWriter {
    file: BufWriter<File>,
    path: PathBuf,
    bytes: u64,
    fsync: bool,
}

impl LocalWriter {
    /// Flushes and fsyncs the file; returns its size in bytes.
    pub(crate) fn finish(self) -> Result<u64, SinkError> {
        let file = self
            .file
            .into_inner()
            .map_err(|e| SinkError::io("write", &self.path, e.into_error()))?;
        if self.fsync {
            file.sync_all()
                .map_err(|e| SinkError::io("fsync", &self.path, e))?;
        }
        Ok(self.bytes)
    }
}

impl Write for LocalWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// The entries of folder `path`; none when there is no such folder.
fn read_dir_or_none(
    path: &Path,
) -> Result<impl Iterator<Item = std::io::Result<fs::DirEntry>>, SinkError> {
    match fs::read_dir(path) {
        Ok(entries) => Ok(Some(entries).into_iter().flatten()),
        Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory) => {
            Ok(None.into_iter().flatten())
        }
        Err(e) => Err(SinkError::io("list", path, e)),
    }
}
