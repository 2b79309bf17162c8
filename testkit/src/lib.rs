//! Test support: the storage emulators sensorlake's tests talk to, each started on a free
//! loopback port and stopped when dropped. A test that needs one fails with a message naming
//! what to install (`scripts/test` installs them all); it never skips.
//!
//! - [`Moto`]: `moto_server` (PyPI `moto[server]`) as S3;
//! - [`Azurite`]: Azurite (npm `azurite`), Microsoft's Azure Blob Storage emulator;
//! - [`Kinesalite`]: kinesalite (npm `kinesalite`) as Amazon Kinesis, and
//!   [`KinesisFaultProxy`], which injects throttling and expired iterators in front of it
//!   (module [`kinesis`]).
//!
//! Plus [`RowChecksum`], for tests that check a rewrite kept the content of a table.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod kinesis;
pub use kinesis::{Kinesalite, KinesisFaultProxy, KinesisFaults, install_crypto_provider};

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Sends one plain HTTP/1.1 request (`Connection: close`) and returns the whole reply.
pub fn http(port: u16, request_head: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    write!(
        stream,
        "{request_head}\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    Ok(reply)
}

/// Retries `attempt` until it returns `Ok(reply)` starting with one of `ok`, for 30 s.
fn until_ok(what: &str, ok: &[&str], mut attempt: impl FnMut() -> std::io::Result<String>) {
    let started = Instant::now();
    loop {
        match attempt() {
            Ok(r) if ok.iter().any(|p| r.starts_with(p)) => return,
            other if started.elapsed() > Duration::from_secs(30) => {
                panic!("{what} did not succeed within 30 s: {other:?}")
            }
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// `moto_server` with one bucket.
#[derive(Debug)]
pub struct Moto {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
}

impl Moto {
    /// Starts `moto_server` and creates `bucket` (moto may accept connections before it serves
    /// them: CreateBucket, an unsigned PUT, is retried until it answers 200).
    pub fn start(bucket: &str) -> Self {
        let port = free_port();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "this test needs moto_server (`pip install 'moto[server]'`; scripts/test installs it): {e}"
                )
            });
        let moto = Moto {
            child,
            port,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        until_ok(
            &format!("creating bucket {bucket} on moto_server at 127.0.0.1:{port}"),
            &["HTTP/1.1 200"],
            || {
                http(
                    port,
                    &format!("PUT /{bucket} HTTP/1.1\r\nContent-Length: 0"),
                )
            },
        );
        moto
    }

    /// A client for `bucket`.
    pub fn store(&self, bucket: &str) -> object_store::aws::AmazonS3 {
        object_store::aws::AmazonS3Builder::new()
            .with_endpoint(&self.endpoint)
            .with_allow_http(true)
            .with_bucket_name(bucket)
            .with_region("us-east-1")
            .with_access_key_id("test")
            .with_secret_access_key("test")
            .build()
            .unwrap()
    }

    /// The environment that points sensorlake (and the AWS CLI) at this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ACCESS_KEY_ID", "test".into()),
            ("AWS_SECRET_ACCESS_KEY", "test".into()),
        ]
    }

    /// The multipart uploads open in `bucket` (ListMultipartUploads; moto does not check
    /// signatures).
    pub fn open_uploads(&self, bucket: &str) -> usize {
        let reply = http(self.port, &format!("GET /{bucket}?uploads HTTP/1.1")).unwrap();
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        reply.matches("<Upload>").count()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Azurite's documented, public development account and key.
pub const AZURITE_ACCOUNT: &str = "devstoreaccount1";
const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// Azurite's blob service with one container.
#[derive(Debug)]
pub struct Azurite {
    child: Child,
    _data: tempfile::TempDir,
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
}

/// `azurite-blob`: `$SENSORLAKE_AZURITE`, else where `scripts/test` installs it
/// (`~/.cache/sensorlake-npm`), else `PATH`.
fn azurite_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SENSORLAKE_AZURITE") {
        return p.into();
    }
    let cached = std::env::var_os("HOME").map(|h| {
        std::path::Path::new(&h).join(".cache/sensorlake-npm/node_modules/.bin/azurite-blob")
    });
    match cached {
        Some(p) if p.exists() => p,
        _ => "azurite-blob".into(),
    }
}

impl Azurite {
    /// Starts Azurite and creates `container` in it.
    pub fn start(container: &str) -> Self {
        let port = free_port();
        let data = tempfile::tempdir().unwrap();
        let child = Command::new(azurite_bin())
            .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
            .arg("--location")
            .arg(data.path())
            .args(["--skipApiVersionCheck", "--loose", "--disableTelemetry", "--silent"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "this test needs Azurite (`npm install --prefix ~/.cache/sensorlake-npm azurite@3`; \
                     scripts/test installs it, or set SENSORLAKE_AZURITE): {e}"
                )
            });
        let azurite = Azurite {
            child,
            _data: data,
            port,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        until_ok(
            &format!("creating container {container} on Azurite at 127.0.0.1:{port}"),
            &["HTTP/1.1 201", "HTTP/1.1 409"],
            || azurite.create_container(container),
        );
        azurite
    }

    /// Create Container, signed with Shared Key (Azurite checks signatures, unlike moto).
    fn create_container(&self, container: &str) -> std::io::Result<String> {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let date = httpdate::fmt_http_date(std::time::SystemTime::now());
        let version = "2021-08-06";
        // The verb, eleven standard headers (all empty here; a zero Content-Length is signed
        // as empty), the x-ms- headers, then the resource — on the emulator's path-style URLs
        // the account name appears twice — and the query parameters.
        let to_sign = format!(
            "PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{version}\n\
             /{AZURITE_ACCOUNT}/{AZURITE_ACCOUNT}/{container}\nrestype:container"
        );
        let key = ring::hmac::Key::new(
            ring::hmac::HMAC_SHA256,
            &b64.decode(AZURITE_KEY).expect("the key is base64"),
        );
        let signature = b64.encode(ring::hmac::sign(&key, to_sign.as_bytes()));
        http(
            self.port,
            &format!(
                "PUT /{AZURITE_ACCOUNT}/{container}?restype=container HTTP/1.1\r\n\
                 x-ms-date: {date}\r\nx-ms-version: {version}\r\n\
                 Authorization: SharedKey {AZURITE_ACCOUNT}:{signature}\r\nContent-Length: 0"
            ),
        )
    }

    /// A client for `container`.
    pub fn store(&self, container: &str) -> object_store::azure::MicrosoftAzure {
        object_store::azure::MicrosoftAzureBuilder::new()
            .with_account(AZURITE_ACCOUNT)
            .with_access_key(AZURITE_KEY)
            .with_endpoint(format!("{}/{AZURITE_ACCOUNT}", self.endpoint))
            .with_allow_http(true)
            .with_container_name(container)
            .build()
            .unwrap()
    }

    /// The environment that points sensorlake (and the Azure tools) at this emulator.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AZURE_STORAGE_USE_EMULATOR", "true".into()),
            ("AZURITE_BLOB_STORAGE_URL", self.endpoint.clone()),
        ]
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Rows and an order-independent checksum of them (the wrapping sum of a hash of each row's
/// values): equal before and after a rewrite that moves rows between files and reorders them,
/// different if a row is lost, doubled or changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RowChecksum {
    /// Rows seen.
    pub rows: usize,
    /// The wrapping sum of the rows' hashes.
    pub sum: u64,
}

impl RowChecksum {
    /// Adds every row of `batch`.
    pub fn add(&mut self, batch: &arrow::array::RecordBatch) {
        use std::hash::{DefaultHasher, Hasher};
        let fields = batch
            .schema()
            .fields()
            .iter()
            .map(|f| arrow::row::SortField::new(f.data_type().clone()))
            .collect();
        let converter = arrow::row::RowConverter::new(fields).unwrap();
        for row in converter.convert_columns(batch.columns()).unwrap().iter() {
            let mut hasher = DefaultHasher::new();
            hasher.write(row.as_ref());
            self.sum = self.sum.wrapping_add(hasher.finish());
            self.rows += 1;
        }
    }
}
