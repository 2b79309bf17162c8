//! Reading what a lake's readers see — the finished Parquet files of a table — wherever the
//! lake is (a folder or `s3://`), for tools such as `sensorlake verify`.

use std::path::{Path, PathBuf};

use crate::record::Table;
use crate::store::Store;
use crate::{LakeOptions, SinkError};

/// Read-only access to a lake's visible files. Takes no lock and changes nothing.
#[derive(Debug)]
pub struct LakeReader {
    store: Store,
}

impl LakeReader {
    /// The lake at `root`: a folder, `file://` or `s3://bucket/prefix` (configured by the
    /// standard `AWS_*` environment variables, as for `run`).
    ///
    /// # Errors
    /// [`SinkError::InvalidLake`] for an unsupported URL, an incomplete S3 configuration, or a
    /// local lake folder that does not exist.
    pub fn open(root: &Path) -> Result<Self, SinkError> {
        let store = Store::from_url(root, &LakeOptions::default())?;
        if matches!(store, Store::Local(_)) && !store.root().is_dir() {
            return Err(SinkError::InvalidLake {
                url: root.display().to_string(),
                why: "no such folder; pass the folder the pipeline writes to".into(),
            });
        }
        Ok(Self { store })
    }

    /// Every finished Parquet file of `table`, as paths relative to the lake root, sorted.
    /// Names starting with `.` or `_` (unfinished or internal) are skipped at every level.
    ///
    /// # Errors
    /// When listing fails.
    pub fn files(&self, table: Table) -> Result<Vec<String>, SinkError> {
        let mut out = Vec::new();
        let mut folders = vec![table.dir().to_owned()];
        while let Some(dir) = folders.pop() {
            for name in self.store.list(&dir)? {
                if name.starts_with('.') || name.starts_with('_') {
                    continue;
                }
                let rel = format!("{dir}/{name}");
                if name.ends_with(".parquet") {
                    out.push(rel);
                } else {
                    folders.push(rel);
                }
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    /// The whole content of file `rel`.
    ///
    /// # Errors
    /// When reading fails (a file deleted since it was listed included).
    pub fn read(&self, rel: &str) -> Result<Vec<u8>, SinkError> {
        self.store.read(rel)
    }

    /// The lake root, as given to [`LakeReader::open`].
    pub fn root(&self) -> &Path {
        self.store.root()
    }

    /// The full name of `rel` (`s3://bucket/prefix/telemetry/…` or a local path), for
    /// messages.
    pub fn full_name(&self, rel: &str) -> PathBuf {
        self.store.abs(rel)
    }
}
