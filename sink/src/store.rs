//! Where a lake lives: a local folder ([`LocalStore`]: fsync and rename) or an object store
//! ([`ObjectStorage`]: conditional puts, copies, multipart uploads). The commit protocol in
//! [`lake`](crate::lake) is written once against [`Store`]'s operations.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::SinkError;
use crate::local::{LocalStore, LocalWriter, PutError};
use crate::object::{ObjectStorage, ObjectWriter};

/// A lake root.
#[derive(Debug, Clone)]
pub(crate) enum Store {
    Local(LocalStore),
    Object(ObjectStorage),
}

/// A file being written; [`StoreWriter::finish`] makes it durable (local) or uploads its end.
#[derive(Debug)]
pub(crate) enum StoreWriter {
    Local(LocalWriter),
    Object(ObjectWriter),
}

/// What keeps other writers with the same id away while the lake is open: an advisory file
/// lock locally; on an object store, nothing but the conditional commit record.
#[derive(Debug)]
pub(crate) enum WriterLock {
    File(#[allow(dead_code, reason = "held, never read")] File),
    None,
}

impl Store {
    pub(crate) fn root(&self) -> &Path {
        match self {
            Store::Local(s) => s.root(),
            Store::Object(s) => s.root(),
        }
    }

    pub(crate) fn abs(&self, rel: &str) -> PathBuf {
        match self {
            Store::Local(s) => s.abs(rel),
            Store::Object(s) => s.abs(rel),
        }
    }

    pub(crate) fn create_dir_all(&self, rel: &str) -> Result<(), SinkError> {
        match self {
            Store::Local(s) => s.create_dir_all(rel),
            Store::Object(_) => Ok(()),
        }
    }

    pub(crate) fn create(&self, rel: &str) -> Result<StoreWriter, SinkError> {
        match self {
            Store::Local(s) => s.create(rel).map(StoreWriter::Local),
            Store::Object(s) => Ok(StoreWriter::Object(s.create(rel))),
        }
    }

    pub(crate) fn put_atomic(&self, rel: &str, bytes: &[u8]) -> Result<(), PutError> {
        match self {
            Store::Local(s) => s.put_atomic(rel, bytes),
            Store::Object(s) => s.put_atomic(rel, bytes),
        }
    }

    pub(crate) fn rename(&self, from: &str, to: &str) -> Result<(), SinkError> {
        match self {
            Store::Local(s) => s.rename(from, to),
            Store::Object(s) => s.rename(from, to),
        }
    }

    pub(crate) fn sync_dir(&self, rel: &str) -> Result<(), SinkError> {
        match self {
            Store::Local(s) => s.sync_dir(rel),
            Store::Object(_) => Ok(()),
        }
    }

    pub(crate) fn exists(&self, rel: &str) -> Result<bool, SinkError> {
        match self {
            Store::Local(s) => s.exists(rel),
            Store::Object(s) => s.exists(rel),
        }
    }

    pub(crate) fn list(&self, rel: &str) -> Result<Vec<String>, SinkError> {
        match self {
            Store::Local(s) => s.list(rel),
            Store::Object(s) => s.list(rel),
        }
    }

    pub(crate) fn read(&self, rel: &str) -> Result<Vec<u8>, SinkError> {
        match self {
            Store::Local(s) => s.read(rel),
            Store::Object(s) => s.read(rel),
        }
    }

    pub(crate) fn remove_file(&self, rel: &str) -> Result<(), SinkError> {
        match self {
            Store::Local(s) => s.remove_file(rel),
            Store::Object(s) => s.remove_file(rel),
        }
    }

    pub(crate) fn remove_dir_all(&self, rel: &str) -> Result<(), SinkError> {
        match self {
            Store::Local(s) => s.remove_dir_all(rel),
            Store::Object(s) => s.remove_all(rel),
        }
    }

    pub(crate) fn remove_all(&self, rel: &str) -> Result<(), SinkError> {
        match self {
            Store::Local(s) => s.remove_all(rel),
            Store::Object(s) => s.remove_all(rel),
        }
    }

    pub(crate) fn try_lock(&self, rel: &str) -> Result<Option<WriterLock>, SinkError> {
        match self {
            Store::Local(s) => Ok(s.try_lock(rel)?.map(WriterLock::File)),
            Store::Object(_) => Ok(Some(WriterLock::None)),
        }
    }
}

impl StoreWriter {
    pub(crate) fn finish(self) -> Result<u64, SinkError> {
        match self {
            StoreWriter::Local(w) => w.finish(),
            StoreWriter::Object(w) => w.finish(),
        }
    }
}

impl Write for StoreWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            StoreWriter::Local(w) => w.write(buf),
            StoreWriter::Object(w) => w.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            StoreWriter::Local(w) => w.flush(),
            StoreWriter::Object(w) => w.flush(),
        }
    }
}
