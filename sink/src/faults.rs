//! An object store that fails on purpose, for tests: a share of requests fails either before
//! reaching the inner store (nothing happened) or after it (the request took effect, its
//! response was lost), chosen by a seeded generator so a failing run can be replayed. No
//! emulator does this; S3 does, now and then.

use std::fmt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use async_trait::async_trait;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, Result,
};

/// When an injected failure happens.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// The request never reached the store.
    Before,
    /// The request took effect; its response was lost.
    After,
}

/// Wraps a store; fails `rate_per_mille` / 1000 of the requests.
#[derive(Debug)]
pub(crate) struct FaultyStore {
    inner: std::sync::Arc<dyn ObjectStore>,
    rng: Mutex<u64>,
    rate_per_mille: AtomicU32,
    /// Failures injected so far.
    pub(crate) injected: AtomicU64,
}

impl FaultyStore {
    pub(crate) fn new(
        inner: std::sync::Arc<dyn ObjectStore>,
        seed: u64,
        rate_per_mille: u32,
    ) -> Self {
        Self {
            inner,
            rng: Mutex::new(seed.max(1)),
            rate_per_mille: AtomicU32::new(rate_per_mille),
            injected: AtomicU64::new(0),
        }
    }

    /// Changes the failure rate (0 heals the store).
    pub(crate) fn set_rate(&self, rate_per_mille: u32) {
        self.rate_per_mille.store(rate_per_mille, Ordering::Relaxed);
    }

    fn roll(&self) -> Option<Fault> {
        let mut x = self.rng.lock().unwrap_or_else(|p| p.into_inner());
        // xorshift64
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        let r = *x;
        if (r % 1000) as u32 >= self.rate_per_mille.load(Ordering::Relaxed) {
            return None;
        }
        self.injected.fetch_add(1, Ordering::Relaxed);
        Some(if (r >> 32) & 1 == 0 {
            Fault::Before
        } else {
            Fault::After
        })
    }

    fn error(op: &str, fault: Fault) -> object_store::Error {
        object_store::Error::Generic {
            store: "FaultyStore",
            source: format!("injected failure of {op} ({fault:?})").into(),
        }
    }
}

impl fmt::Display for FaultyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FaultyStore({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for FaultyStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        match self.roll() {
            None => self.inner.put_opts(location, payload, opts).await,
            Some(Fault::Before) => Err(Self::error("put", Fault::Before)),
            Some(Fault::After) => {
                self.inner.put_opts(location, payload, opts).await?;
                Err(Self::error("put", Fault::After))
            }
        }
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        match self.roll() {
            Some(fault) => Err(Self::error("create multipart upload", fault)),
            None => self.inner.put_multipart_opts(location, opts).await,
        }
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        match self.roll() {
            Some(fault) => Err(Self::error("get", fault)),
            None => self.inner.get_opts(location, options).await,
        }
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        // Decide every item's fate up front (the stream outlives `&self`).
        let faults: Vec<Option<Fault>> = (0..64).map(|_| self.roll()).collect();
        let inner = self.inner.clone();
        locations
            .enumerate()
            .then(move |(i, location)| {
                let inner = inner.clone();
                let fault = faults[i % faults.len()];
                async move {
                    let location = location?;
                    match fault {
                        Some(Fault::Before) => Err(Self::error("delete", Fault::Before)),
                        None | Some(Fault::After) => {
                            let one = futures_util::stream::iter([Ok(location.clone())]).boxed();
                            if let Some(Err(e)) = inner.delete_stream(one).next().await {
                                return Err(e);
                            }
                            match fault {
                                Some(f) => Err(Self::error("delete", f)),
                                None => Ok(location),
                            }
                        }
                    }
                }
            })
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        match self.roll() {
            Some(fault) => futures_util::stream::iter([Err(Self::error("list", fault))]).boxed(),
            None => self.inner.list(prefix),
        }
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        match self.roll() {
            Some(fault) => Err(Self::error("list", fault)),
            None => self.inner.list_with_delimiter(prefix).await,
        }
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        match self.roll() {
            None => self.inner.copy_opts(from, to, options).await,
            Some(Fault::Before) => Err(Self::error("copy", Fault::Before)),
            Some(Fault::After) => {
                self.inner.copy_opts(from, to, options).await?;
                Err(Self::error("copy", Fault::After))
            }
        }
    }
}
