//! Where a lake lives: a local folder ([`LocalStore`]: fsync and rename) or an object store
//! ([`ObjectStorage`]: conditional puts, copies, multipart uploads). The commit protocol in
//! [`lake`](crate::lake) is written once against [`Store`]'s operations.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::local::{LocalStore, LocalWriter, PutError};
use crate::object::{ObjectStorage, ObjectWriter};
use crate::{LakeOptions, SinkError};

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
    /// The store a lake location names: `s3://bucket/prefix` (or `s3a://`), `az://container/prefix`
    /// (or `azure://`), `gs://bucket/prefix`, `file:///path`, or a plain path. Each cloud is
    /// configured by its standard environment variables (`AWS_*`, `AZURE_STORAGE_*`,
    /// `GOOGLE_*`/`SERVICE_ACCOUNT`), as its own CLI is; S3 also by the AWS CLI's profile
    /// files (`aws_profile`). Creates nothing; see
    /// [`Store::create_root`].
    ///
    /// # Errors
    /// [`SinkError::InvalidLake`] for another scheme, or a configuration the environment does
    /// not complete (no region, no account, a bad endpoint).
    pub(crate) fn from_url(root: &Path, options: &LakeOptions) -> Result<Store, SinkError> {
        let local = |path: &Path| Store::Local(LocalStore::new(path, options.fsync));
        let url = root.to_string_lossy().into_owned();
        let invalid = |why: String| SinkError::InvalidLake {
            url: url.clone(),
            why,
        };
        let Some((scheme, rest)) = url.split_once("://") else {
            return Ok(local(root));
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if !matches!(scheme, "file") && bucket.is_empty() {
            return Err(invalid(format!(
                "no bucket or container: write `{scheme}://NAME/optional/prefix`"
            )));
        }
        match scheme {
            "file" => Ok(local(Path::new(rest))),
            "s3" | "s3a" => {
                // Environment first, then the AWS CLI's profile for what it leaves unset.
                let env = |k: &str| std::env::var(k).ok();
                let s3 = crate::aws_profile::AwsProfile::load(&env)
                    .apply(&env, object_store::aws::AmazonS3Builder::from_env())
                    .with_bucket_name(bucket)
                    .build()
                    .map_err(|e| invalid(e.to_string()))?;
                Self::cloud(Arc::new(s3), prefix, &url)
            }
            "az" | "azure" => {
                let az = object_store::azure::MicrosoftAzureBuilder::from_env()
                    .with_container_name(bucket)
                    .build()
                    .map_err(|e| invalid(e.to_string()))?;
                Self::cloud(Arc::new(az), prefix, &url)
            }
            "gs" => {
                let gs = object_store::gcp::GoogleCloudStorageBuilder::from_env()
                    .with_bucket_name(bucket)
                    .build()
                    .map_err(|e| invalid(e.to_string()))?;
                Self::cloud(Arc::new(gs), prefix, &url)
            }
            _ => Err(invalid(format!(
                "`{scheme}://` lakes are not supported; use a local path, file://, s3://, az:// or gs://"
            ))),
        }
    }

    /// A lake on a cloud store, with tracked multipart uploads.
    fn cloud<S>(store: Arc<S>, prefix: &str, url: &str) -> Result<Store, SinkError>
    where
        S: object_store::ObjectStore + object_store::multipart::MultipartStore,
    {
        Ok(Store::Object(ObjectStorage::with_multipart(
            store.clone(),
            Some(store),
            prefix,
            url,
        )?))
    }

    /// Creates the lake's root folder (and its parents) if it is local; nothing on an object
    /// store, where folders do not exist.
    pub(crate) fn create_root(&self) -> Result<(), SinkError> {
        match self {
            Store::Local(s) => std::fs::create_dir_all(s.root())
                .map_err(|e| SinkError::io("create directory", s.root(), e)),
            Store::Object(_) => Ok(()),
        }
    }

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

    /// Writes `bytes` as `rel` all at once. On an object store it is a conditional put: an
    /// object already there counts as written when it has the same bytes.
    pub(crate) fn put_atomic(&self, rel: &str, bytes: &[u8]) -> Result<(), PutError> {
        self.put_atomic_like(rel, bytes, &|_| false)
    }

    /// As [`Store::put_atomic`], an existing object also counting as written when `same`
    /// says its bytes mean the same (a commit record differing only in `created_at`).
    pub(crate) fn put_atomic_like(
        &self,
        rel: &str,
        bytes: &[u8],
        same: &dyn Fn(&[u8]) -> bool,
    ) -> Result<(), PutError> {
        match self {
            Store::Local(s) => s.put_atomic(rel, bytes),
            Store::Object(s) => s.put_atomic(rel, bytes, same),
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

    /// The files directly below folder `rel` with their sizes in bytes, sorted by name
    /// (sub-folders left out); empty when there is no such folder.
    pub(crate) fn list_sizes(&self, rel: &str) -> Result<Vec<(String, u64)>, SinkError> {
        match self {
            Store::Local(s) => s.list_sizes(rel),
            Store::Object(s) => s.list_sizes(rel),
        }
    }

    /// Removes every folder directly below `rel` (temporary folders of unfinished work,
    /// aborting any multipart upload recorded in them) and returns how many `.parquet` files
    /// they held.
    pub(crate) fn clear_subfolders(&self, rel: &str) -> Result<usize, SinkError> {
        let mut parquet = 0;
        for name in self.list(rel)? {
            let sub = format!("{rel}/{name}");
            parquet += self
                .list(&sub)?
                .iter()
                .filter(|f| f.ends_with(".parquet"))
                .count();
            self.remove_all(&sub)?;
        }
        Ok(parquet)
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

    /// Deletes the files `rels`, missing ones included; on an object store in bulk requests.
    pub(crate) fn remove_files(&self, rels: &[&str]) -> Result<(), SinkError> {
        match self {
            Store::Local(s) => rels.iter().try_for_each(|rel| s.remove_file(rel)),
            Store::Object(s) => s.remove_files(rels),
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
