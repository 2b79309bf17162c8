//! Storage on an object store (S3 and S3-compatible, or in memory for tests) through
//! `object_store`: the same operations as [`LocalStore`](crate::local::LocalStore), with
//! object semantics.
//!
//! - A new file is buffered up to [`PART_BYTES`] and sent with one PUT; a bigger one goes up
//!   as a multipart upload, part by part, so memory never holds more than one part. On S3 the
//!   upload's id is recorded in `<object>.upload` next to the temporary object before the
//!   first part; removing a temporary folder (cleanup, recovery) aborts every upload recorded
//!   in it, so a crash mid-upload leaves no open upload behind once the lake is reopened.
//! - [`ObjectStorage::put_atomic`] is a conditional put (`If-None-Match: *`): two processes
//!   writing as one writer id cannot both create a commit record; a record that already exists
//!   with the same bytes (the client retried a request whose response was lost) counts as
//!   written. A failure that may have written it (a timeout, a 5xx) is reported as unknown,
//!   which makes the lake refuse further commits until it is reopened and recovered.
//! - A rename is a copy and a delete: the object appears whole under its new name.
//! - Folders do not exist: creating and syncing them does nothing, and a folder "exists" when
//!   some object's key starts with it.
//! - There are no locks; the conditional commit record is the guard.
//!
//! The lake's API is blocking, so this module runs requests on a runtime of its own (one
//! worker thread for the process, see [`runtime`]) and blocks on each. It must not be called from inside an async task (callers use a
//! blocking thread, as for the local store).

use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::Arc;

use futures_util::TryStreamExt;
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path as Key;
use object_store::{
    MultipartId, MultipartUpload, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload,
};

use crate::SinkError;
use crate::local::PutError;

/// Files up to this size go up in one PUT; bigger ones in multipart parts of this size
/// (S3's minimum part is 5 MiB).
pub(crate) const PART_BYTES: usize = 8 << 20;

/// A lake root on an object store.
#[derive(Clone)]
pub(crate) struct ObjectStorage {
    store: Arc<dyn ObjectStore>,
    /// The same store's multipart API, when it has one (S3 does): uploads are then started
    /// with an id we record, so that cleanup can abort one a crash left open.
    multipart: Option<Arc<dyn MultipartStore>>,
    /// The lake's key prefix ("" for the bucket root).
    prefix: String,
    /// The root as people know it (`s3://bucket/prefix`), for messages.
    url: PathBuf,
    rt: &'static tokio::runtime::Runtime,
}

impl std::fmt::Debug for ObjectStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectStorage")
            .field("store", &self.store)
            .field("tracked_uploads", &self.multipart.is_some())
            .field("prefix", &self.prefix)
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

/// The runtime every object store request runs on: one worker thread for the whole process,
/// never shut down. One runtime, not one per lake, because an HTTP client keeps pooled
/// connections whose driving tasks live on the runtime that opened them: a client shared by
/// two lakes (the caller's `Arc<dyn ObjectStore>`) would otherwise reuse a connection whose
/// runtime is gone or idle, and wait for its timeout. Never shut down, so dropping a lake on
/// an async task (where a blocking runtime shutdown panics) is fine.
fn runtime() -> Result<&'static tokio::runtime::Runtime, String> {
    static RT: std::sync::OnceLock<Result<tokio::runtime::Runtime, String>> =
        std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("sensorlake-object-store")
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
    })
    .as_ref()
    .map_err(Clone::clone)
}

impl ObjectStorage {
    pub(crate) fn new(
        store: Arc<dyn ObjectStore>,
        prefix: &str,
        url: &str,
    ) -> Result<Self, SinkError> {
        Self::with_multipart(store, None, prefix, url)
    }

    /// As [`ObjectStorage::new`], with the store's multipart API for tracked uploads.
    pub(crate) fn with_multipart(
        store: Arc<dyn ObjectStore>,
        multipart: Option<Arc<dyn MultipartStore>>,
        prefix: &str,
        url: &str,
    ) -> Result<Self, SinkError> {
        let rt = runtime().map_err(|e| {
            SinkError::io(
                "start the object store's runtime for",
                url,
                io::Error::other(e),
            )
        })?;
        Ok(Self {
            store,
            multipart,
            prefix: prefix.trim_matches('/').to_owned(),
            url: PathBuf::from(url.trim_end_matches('/')),
            rt,
        })
    }

    /// The lake root, for messages.
    pub(crate) fn root(&self) -> &std::path::Path {
        &self.url
    }

    /// The full name of `rel`, for messages.
    pub(crate) fn abs(&self, rel: &str) -> PathBuf {
        PathBuf::from(format!("{}/{}", self.url.display(), rel.trim_matches('/')))
    }

    fn key(&self, rel: &str) -> Key {
        let rel = rel.trim_matches('/');
        if self.prefix.is_empty() {
            Key::from(rel)
        } else {
            Key::from(format!("{}/{rel}", self.prefix))
        }
    }

    fn fail(&self, op: &'static str, rel: &str, e: object_store::Error) -> SinkError {
        SinkError::io(op, self.abs(rel), io::Error::other(e))
    }

    /// Starts writing object `rel`; [`ObjectWriter::finish`] uploads the rest and completes it.
    pub(crate) fn create(&self, rel: &str) -> ObjectWriter {
        ObjectWriter {
            storage: self.clone(),
            rel: rel.to_owned(),
            buf: Vec::new(),
            upload: None,
            bytes: 0,
        }
    }

    /// Creates object `rel` with `bytes` unless it exists (a conditional put).
    pub(crate) fn put_atomic(
        &self,
        rel: &str,
        bytes: &[u8],
        same: &dyn Fn(&[u8]) -> bool,
    ) -> Result<(), PutError> {
        let key = self.key(rel);
        let options = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        let payload = PutPayload::from(bytes.to_vec());
        match self
            .rt
            .block_on(self.store.put_opts(&key, payload, options))
        {
            Ok(_) => Ok(()),
            Err(object_store::Error::AlreadyExists { .. }) => {
                // Ours, if a retried request (or an earlier attempt whose outcome was unknown)
                // already created it; another process's otherwise. `same` decides, since an
                // earlier attempt at the same content may differ in incidental fields.
                let existing = self.read(rel).map_err(PutError::NotWritten)?;
                if existing == bytes || same(&existing) {
                    return Ok(());
                }
                Err(PutError::NotWritten(SinkError::io(
                    "create",
                    self.abs(rel),
                    io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        "another process already committed under this name: two instances share one writer id; give each its own",
                    ),
                )))
            }
            // Refused outright: nothing was written.
            Err(
                e @ (object_store::Error::PermissionDenied { .. }
                | object_store::Error::Unauthenticated { .. }
                | object_store::Error::NotSupported { .. }
                | object_store::Error::NotImplemented { .. }
                | object_store::Error::InvalidPath { .. }),
            ) => Err(PutError::NotWritten(self.fail("put", rel, e))),
            // A timeout, a reset, a 5xx after the client's own retries: the record may have
            // been created with its response lost. Retrying would write a record with other
            // bytes (a new `created_at`) and find this one, and cleaning up the flush's files
            // would leave a committed record without them; so the outcome is unknown and
            // recovery decides from what is in the store.
            Err(e) => Err(PutError::Unknown(self.fail("put", rel, e))),
        }
    }

    /// Copies `from` to `to`, then deletes `from`.
    pub(crate) fn rename(&self, from: &str, to: &str) -> Result<(), SinkError> {
        self.rt
            .block_on(self.store.copy(&self.key(from), &self.key(to)))
            .map_err(|e| self.fail("copy to", to, e))?;
        self.remove_file(from)
    }

    /// Whether object `rel` exists, or any object below `rel/`.
    pub(crate) fn exists(&self, rel: &str) -> Result<bool, SinkError> {
        match self.rt.block_on(self.store.head(&self.key(rel))) {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(!self.list(rel)?.is_empty()),
            Err(e) => Err(self.fail("check existence of", rel, e)),
        }
    }

    /// The names directly below `rel/` (objects and "folders"), sorted.
    pub(crate) fn list(&self, rel: &str) -> Result<Vec<String>, SinkError> {
        let key = self.key(rel);
        let listed = self
            .rt
            .block_on(self.store.list_with_delimiter(Some(&key)))
            .map_err(|e| self.fail("list", rel, e))?;
        let mut names: Vec<String> = listed
            .objects
            .iter()
            .map(|o| &o.location)
            .chain(listed.common_prefixes.iter())
            .filter_map(|p| p.filename().map(str::to_owned))
            .collect();
        names.sort_unstable();
        names.dedup();
        Ok(names)
    }

    /// The objects directly below `rel/` with their sizes, sorted by name ("folders" left
    /// out).
    pub(crate) fn list_sizes(&self, rel: &str) -> Result<Vec<(String, u64)>, SinkError> {
        let key = self.key(rel);
        let listed = self
            .rt
            .block_on(self.store.list_with_delimiter(Some(&key)))
            .map_err(|e| self.fail("list", rel, e))?;
        let mut files: Vec<(String, u64)> = listed
            .objects
            .iter()
            .filter_map(|o| o.location.filename().map(|name| (name.to_owned(), o.size)))
            .collect();
        files.sort_unstable();
        Ok(files)
    }

    /// The whole content of object `rel`.
    pub(crate) fn read(&self, rel: &str) -> Result<Vec<u8>, SinkError> {
        let key = self.key(rel);
        self.rt
            .block_on(async { self.store.get(&key).await?.bytes().await })
            .map(|b| b.to_vec())
            .map_err(|e| self.fail("read", rel, e))
    }

    /// Deletes object `rel`; a missing one is not an error.
    pub(crate) fn remove_file(&self, rel: &str) -> Result<(), SinkError> {
        match self.rt.block_on(self.store.delete(&self.key(rel))) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.fail("delete", rel, e)),
        }
    }

    /// Deletes the objects `rels` (missing ones are not an error) in as few requests as the
    /// store allows: S3 deletes up to 1,000 keys per request.
    pub(crate) fn remove_files(&self, rels: &[&str]) -> Result<(), SinkError> {
        use futures_util::StreamExt;
        let keys: Vec<object_store::Result<Key>> = rels.iter().map(|r| Ok(self.key(r))).collect();
        let results: Vec<object_store::Result<Key>> = self.rt.block_on(
            self.store
                .delete_stream(futures_util::stream::iter(keys).boxed())
                .collect(),
        );
        for result in results {
            match result {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => {
                    let rel = rels.first().copied().unwrap_or_default();
                    return Err(self.fail("delete", rel, e));
                }
            }
        }
        Ok(())
    }

    /// Deletes object `rel` and every object below `rel/`.
    pub(crate) fn remove_all(&self, rel: &str) -> Result<(), SinkError> {
        let key = self.key(rel);
        let below: Vec<Key> = self
            .rt
            .block_on(
                self.store
                    .list(Some(&key))
                    .map_ok(|o| o.location)
                    .try_collect(),
            )
            .map_err(|e| self.fail("list", rel, e))?;
        // Uploads left open by a crash: abort them before their records go.
        for location in below.iter().filter(|l| l.as_ref().ends_with(UPLOAD_SUFFIX)) {
            self.abort_recorded_upload(location);
        }
        for location in below {
            match self.rt.block_on(self.store.delete(&location)) {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.fail("delete", location.as_ref(), e)),
            }
        }
        self.remove_file(rel)
    }
}

/// The suffix of the object that records an open multipart upload: `<object>.upload` holds
/// the upload id of `<object>` while its parts go up.
pub(crate) const UPLOAD_SUFFIX: &str = ".upload";

impl ObjectStorage {
    /// Aborts the multipart upload recorded in object `record` (best effort: one that was
    /// completed or aborted already is gone, which is what we want).
    fn abort_recorded_upload(&self, record: &Key) {
        let Some(mp) = &self.multipart else { return };
        let Some(target) = record.as_ref().strip_suffix(UPLOAD_SUFFIX) else {
            return;
        };
        let id = match self
            .rt
            .block_on(async { self.store.get(record).await?.bytes().await })
        {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(_) => return,
        };
        let target = Key::from(target);
        match self.rt.block_on(mp.abort_multipart(&target, &id)) {
            Ok(()) => {
                tracing::info!(object = %target, "Aborted a multipart upload left open by a crash")
            }
            Err(e) => {
                tracing::debug!(object = %target, error = %e, "Recorded multipart upload not aborted (probably finished)")
            }
        }
    }
}

/// A multipart upload in progress.
enum Upload {
    /// Through the store's multipart API: the id is recorded in `<object>.upload`.
    Tracked { id: MultipartId, parts: Vec<PartId> },
    /// Through `put_multipart` (stores without the multipart API, e.g. test wrappers): aborted
    /// on error, but one a crash leaves open cannot be found again.
    Untracked(Box<dyn MultipartUpload>),
}

/// An object being written by [`ObjectStorage::create`]; counts its bytes.
pub(crate) struct ObjectWriter {
    storage: ObjectStorage,
    rel: String,
    buf: Vec<u8>,
    /// Started once more than one part's worth has been written.
    upload: Option<Upload>,
    bytes: u64,
}

impl std::fmt::Debug for ObjectWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectWriter")
            .field("rel", &self.rel)
            .field("bytes", &self.bytes)
            .field("multipart", &self.upload.is_some())
            .finish_non_exhaustive()
    }
}

impl ObjectWriter {
    fn record_key(&self) -> Key {
        self.storage.key(&format!("{}{UPLOAD_SUFFIX}", self.rel))
    }

    /// Starts the multipart upload: with the multipart API, records its id first thing, so
    /// that a crash from here on leaves something for cleanup to abort.
    fn start_upload(&self) -> io::Result<Upload> {
        let storage = &self.storage;
        let key = storage.key(&self.rel);
        let Some(mp) = &storage.multipart else {
            return storage
                .rt
                .block_on(storage.store.put_multipart(&key))
                .map(Upload::Untracked)
                .map_err(io::Error::other);
        };
        let id = storage
            .rt
            .block_on(mp.create_multipart(&key))
            .map_err(io::Error::other)?;
        let recorded = storage.rt.block_on(storage.store.put(
            &self.record_key(),
            PutPayload::from(id.clone().into_bytes()),
        ));
        if let Err(e) = recorded {
            let _ = storage.rt.block_on(mp.abort_multipart(&key, &id));
            return Err(io::Error::other(e));
        }
        Ok(Upload::Tracked {
            id,
            parts: Vec::new(),
        })
    }

    /// Sends the buffered part of a multipart upload (starting the upload first if needed).
    fn send_part(&mut self) -> io::Result<()> {
        let part = PutPayload::from(std::mem::take(&mut self.buf));
        if self.upload.is_none() {
            self.upload = Some(self.start_upload()?);
        }
        let storage = &self.storage;
        let key = storage.key(&self.rel);
        match self.upload.as_mut().expect("started above") {
            Upload::Tracked { id, parts } => {
                let mp = storage.multipart.as_ref().expect("tracked uploads have it");
                let part = storage
                    .rt
                    .block_on(mp.put_part(&key, id, parts.len(), part))
                    .map_err(io::Error::other)?;
                parts.push(part);
                Ok(())
            }
            Upload::Untracked(upload) => storage
                .rt
                .block_on(upload.put_part(part))
                .map_err(io::Error::other),
        }
    }

    /// Uploads what is left and makes the object visible; returns its size in bytes.
    pub(crate) fn finish(mut self) -> Result<u64, SinkError> {
        let rel = self.rel.clone();
        let fail =
            |storage: &ObjectStorage, e: io::Error| SinkError::io("upload", storage.abs(&rel), e);
        if self.upload.is_none() {
            let payload = PutPayload::from(std::mem::take(&mut self.buf));
            let key = self.storage.key(&rel);
            self.storage
                .rt
                .block_on(self.storage.store.put(&key, payload))
                .map_err(|e| fail(&self.storage, io::Error::other(e)))?;
            return Ok(self.bytes);
        }
        if !self.buf.is_empty() {
            self.send_part().map_err(|e| fail(&self.storage, e))?;
        }
        let key = self.storage.key(&rel);
        let completed = match self.upload.as_mut().expect("checked above") {
            Upload::Tracked { id, parts } => {
                let mp = self
                    .storage
                    .multipart
                    .as_ref()
                    .expect("tracked uploads have it");
                self.storage
                    .rt
                    .block_on(mp.complete_multipart(&key, id, std::mem::take(parts)))
                    .map(|_| ())
            }
            Upload::Untracked(upload) => self.storage.rt.block_on(upload.complete()).map(|_| ()),
        };
        // On failure, dropping `self` aborts the upload.
        completed.map_err(|e| fail(&self.storage, io::Error::other(e)))?;
        if let Some(Upload::Tracked { .. }) = self.upload.take() {
            // Best effort: a leftover record names a finished upload, which cleanup ignores.
            let _ = self
                .storage
                .rt
                .block_on(self.storage.store.delete(&self.record_key()));
        }
        Ok(self.bytes)
    }
}

impl Write for ObjectWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let room = PART_BYTES - self.buf.len();
        let n = buf.len().min(room);
        self.buf.extend_from_slice(&buf[..n]);
        self.bytes += n as u64;
        if self.buf.len() == PART_BYTES {
            self.send_part()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for ObjectWriter {
    /// An upload abandoned on an error path is aborted, so no incomplete upload is left.
    fn drop(&mut self) {
        match self.upload.take() {
            None => {}
            Some(Upload::Untracked(mut upload)) => {
                let _ = self.storage.rt.block_on(upload.abort());
            }
            Some(Upload::Tracked { id, .. }) => {
                let key = self.storage.key(&self.rel);
                if let Some(mp) = &self.storage.multipart {
                    let _ = self.storage.rt.block_on(mp.abort_multipart(&key, &id));
                }
                let _ = self
                    .storage
                    .rt
                    .block_on(self.storage.store.delete(&self.record_key()));
            }
        }
    }
}
