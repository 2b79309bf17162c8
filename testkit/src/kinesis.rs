//! Amazon Kinesis for tests: [`Kinesalite`], a Kinesis server on loopback, and
//! [`KinesisFaultProxy`], an HTTP proxy in front of it that injects what kinesalite never does
//! (throttling, expired iterators, partly failed PutRecords).
//!
//! # What kinesalite (3.3.3) does and does not do
//! Checked by `testkit/tests/kinesis.rs` where marked ✓; the rest is read from kinesalite's
//! source (`actions/*.js`, `index.js`).
//! - **Protocol** ✓: it speaks AWS JSON 1.1 (`application/x-amz-json-1.1`) and CBOR; the Rust
//!   SDK (`aws-sdk-kinesis` 1.130) sends JSON 1.1, so it just works. It checks that a request
//!   is signed (an `Authorization` header of the right shape) but never checks the signature:
//!   any credentials do, and a proxy may rewrite bodies.
//! - **CreateStream / DescribeStreamSummary / ListStreams** ✓ (and DescribeStream,
//!   DeleteStream), with the delays this fixture sets to 0 (a new stream is ACTIVE at once, a
//!   split or merge is done at once) and up to 100 shards.
//! - **PutRecord / PutRecords** ✓: up to 500 entries and 1 MiB per record. It never fails
//!   single entries (no `FailedRecordCount` > 0: use [`KinesisFaultProxy`] for that). It takes
//!   `StreamName` only: a request with `StreamARN` and no name is rejected (unknown fields are
//!   silently dropped), so tests address streams by name.
//! - **ListShards** ✓: by `StreamName`, honours `ExclusiveStartShardId`, ignores `MaxResults`
//!   and `ShardFilter` (it always returns every shard, open and closed, and never a
//!   `NextToken`). A request with `NextToken` (and so no name) **crashes kinesalite**: node
//!   exits on an uncaught levelup error and every later request is refused. A consumer that
//!   sends `NextToken` only when one was returned never does that here.
//! - **SplitShard / MergeShards** ✓: parents get an `EndingSequenceNumber` and stop taking
//!   records; children carry `ParentShardId` / `AdjacentParentShardId` and start empty.
//! - **GetShardIterator** ✓: `TRIM_HORIZON`, `LATEST`, `AT_SEQUENCE_NUMBER`,
//!   `AFTER_SEQUENCE_NUMBER` and `AT_TIMESTAMP`. Beware: `AT_TIMESTAMP` when no record of the
//!   shard arrived at or after that time never answers (the request hangs until the client
//!   times out). Sequence numbers are 56-digit decimals, as in the real service.
//! - **GetRecords** ✓: on a closed shard, the call that reaches past its last record returns no
//!   records and no `NextShardIterator` (the signal that the shard is done); calls before that
//!   return one, even with no records. It never throttles: 5 calls per second per shard are not
//!   enforced (use [`KinesisFaultProxy`]).
//! - **Iterators expire** 5 minutes after they were made (`ExpiredIteratorException`), as in
//!   the real service; a test cannot wait that long, so [`KinesisFaultProxy`] injects it.
//! - **Persistence** ✓: with a LevelDB directory, streams and records survive a restart on the
//!   same directory ([`Kinesalite::restart`]).
//! - Not supported: enhanced fan-out (SubscribeToShard, RegisterStreamConsumer), stream ARNs,
//!   encryption, on-demand streams, UpdateShardCount.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_kinesis::config::{BehaviorVersion, Credentials, Region};

/// The region every fixture client and [`Kinesalite::env`] use.
pub const REGION: &str = "us-east-1";

/// Installs rustls' aws-lc-rs crypto provider as the process default, once. Processes that use
/// the AWS SDK must do this before any TLS (several rustls providers are compiled into the
/// workspace, so rustls cannot pick one itself); with an `http://` endpoint no TLS happens,
/// but tests call it anyway so that they run the code paths the binaries run.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// An SDK configuration for a Kinesis endpoint on loopback: fixed test credentials and region,
/// nothing read from the environment or profile files. Change retries or timeouts on it.
pub fn kinesis_config(endpoint: &str) -> aws_sdk_kinesis::config::Builder {
    install_crypto_provider();
    aws_sdk_kinesis::config::Builder::new()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(REGION))
        .credentials_provider(Credentials::new("test", "test", None, None, "testkit"))
        .endpoint_url(endpoint)
}

/// A Kinesis client for `endpoint` (see [`kinesis_config`]).
pub fn kinesis_client(endpoint: &str) -> aws_sdk_kinesis::Client {
    aws_sdk_kinesis::Client::from_conf(kinesis_config(endpoint).build())
}

/// The kinesalite package: `$SENSORLAKE_KINESALITE` (a package directory), else where
/// `scripts/test` installs it (`~/.cache/sensorlake-npm/node_modules/kinesalite`).
fn kinesalite_package() -> PathBuf {
    if let Some(p) = std::env::var_os("SENSORLAKE_KINESALITE") {
        return p.into();
    }
    let home = std::env::var_os("HOME").unwrap_or_default();
    Path::new(&home).join(".cache/sensorlake-npm/node_modules/kinesalite")
}

const INSTALL_HINT: &str = "scripts/test installs it: `npm install --prefix ~/.cache/sensorlake-npm \
                            kinesalite@3` (needs node and npm: `apt-get install nodejs npm`), or set \
                            SENSORLAKE_KINESALITE to a kinesalite package directory";

/// A kinesalite server (npm `kinesalite`) on 127.0.0.1, run by `node` through kinesalite's Node
/// API, with its streams in a LevelDB directory; killed when dropped. See the
/// [module docs](self) for what it supports.
///
/// The node process also exits when the test process dies (it watches its stdin), so a
/// killed test leaves no server behind.
#[derive(Debug)]
pub struct Kinesalite {
    child: Option<Child>,
    /// Closing it tells node to exit; kept open while the server should run.
    stdin: Option<ChildStdin>,
    dir: PathBuf,
    port: u16,
    _temp: Option<tempfile::TempDir>,
}

impl Kinesalite {
    /// Starts kinesalite on a free port, with its data in a temporary directory it owns.
    ///
    /// # Panics
    /// When node or kinesalite is missing, or the server does not answer within 30 s; the
    /// message says how to install them.
    pub fn start() -> Self {
        let temp = tempfile::tempdir().expect("a temporary directory");
        let mut k = Self::start_at(temp.path(), crate::free_port());
        k._temp = Some(temp);
        k
    }

    /// Starts kinesalite on `port` with its data under `dir` (LevelDB in `dir/leveldb`, the
    /// server's output in `dir/kinesalite.log`); what a previous server left there is kept.
    ///
    /// # Panics
    /// As [`Kinesalite::start`].
    pub fn start_at(dir: &Path, port: u16) -> Self {
        let mut k = Self {
            child: None,
            stdin: None,
            dir: dir.to_path_buf(),
            port,
            _temp: None,
        };
        k.spawn();
        k
    }

    /// Stops the server and starts it again on the same directory and port: streams and
    /// records persist, iterators stay valid (they are not stored server-side).
    ///
    /// # Panics
    /// As [`Kinesalite::start`].
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Stops the server (a restart starts it again); requests meanwhile are refused.
    pub fn stop(&mut self) {
        self.stdin = None;
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn spawn(&mut self) {
        let package = kinesalite_package();
        assert!(
            package.join("package.json").exists(),
            "this test needs kinesalite, the Kinesis server of the tests, and it is not at {}; {INSTALL_HINT}",
            package.display()
        );
        let db = self.dir.join("leveldb");
        std::fs::create_dir_all(&db).expect("the kinesalite data directory");
        let log_path = self.dir.join("kinesalite.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("the kinesalite log file");
        // JSON string literals for the script (paths may hold quotes or backslashes).
        let js = |p: &Path| serde_json::to_string(&p.to_string_lossy()).expect("a string");
        let script = format!(
            "const server = require({package})({{path: {db}, createStreamMs: 0, deleteStreamMs: 0, \
             updateStreamMs: 0, shardLimit: 100}});\n\
             server.on('error', e => {{ console.error('kinesalite: ' + e.message); process.exit(1); }});\n\
             server.listen({port}, '127.0.0.1', () => console.error('kinesalite listening on 127.0.0.1:{port}'));\n\
             process.stdin.on('end', () => process.exit(0));\n\
             process.stdin.on('error', () => process.exit(0));\n\
             process.stdin.resume();\n",
            package = js(&package),
            db = js(&db),
            port = self.port,
        );
        let mut child = Command::new("node")
            .arg("-e")
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(log.try_clone().expect("the kinesalite log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("this test needs node (Node.js) to run kinesalite: {e}; {INSTALL_HINT}")
            });
        self.stdin = child.stdin.take();
        self.child = Some(child);
        self.wait_until_ready(&log_path);
    }

    /// Retries ListStreams until it answers 200, for 30 s; fails early when node exits.
    fn wait_until_ready(&mut self, log_path: &Path) {
        let started = Instant::now();
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                let log = std::fs::read_to_string(log_path).unwrap_or_default();
                panic!(
                    "kinesalite exited at start ({status}) on 127.0.0.1:{}; its output:\n{log}\n{INSTALL_HINT}",
                    self.port
                );
            }
            match json_request(self.port, "ListStreams", "{}") {
                Ok(reply) if reply.starts_with("HTTP/1.1 200") => return,
                other if started.elapsed() > Duration::from_secs(30) => {
                    let log = std::fs::read_to_string(log_path).unwrap_or_default();
                    panic!(
                        "kinesalite did not answer on 127.0.0.1:{} within 30 s: {other:?}; its output:\n{log}",
                        self.port
                    )
                }
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Its port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The environment that points a process using the AWS SDK's standard configuration
    /// (`aws_config::load_defaults`) at this server, without reading IMDS or needing a profile.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        endpoint_env(&self.endpoint())
    }

    /// A client for this server (see [`kinesis_config`]).
    pub fn client(&self) -> aws_sdk_kinesis::Client {
        kinesis_client(&self.endpoint())
    }

    /// Creates stream `name` with `shards` shards and waits until it is ACTIVE.
    ///
    /// # Panics
    /// When kinesalite refuses (the name is taken, more than 100 shards) or the stream is
    /// not ACTIVE within 10 s.
    pub async fn create_stream(&self, name: &str, shards: i32) {
        create_stream(&self.client(), name, shards).await;
    }
}

impl Drop for Kinesalite {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The environment for a process whose Kinesis endpoint is `endpoint` (kinesalite or a
/// [`KinesisFaultProxy`]): test credentials, the region, the endpoint, and IMDS off.
pub fn endpoint_env(endpoint: &str) -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ACCESS_KEY_ID", "test".into()),
        ("AWS_SECRET_ACCESS_KEY", "test".into()),
        ("AWS_REGION", REGION.into()),
        ("AWS_ENDPOINT_URL_KINESIS", endpoint.to_owned()),
        ("AWS_EC2_METADATA_DISABLED", "true".into()),
    ]
}

/// Creates stream `name` with `shards` shards through `client` and waits until it is ACTIVE.
///
/// # Panics
/// When the service refuses, or the stream is not ACTIVE within 10 s.
pub async fn create_stream(client: &aws_sdk_kinesis::Client, name: &str, shards: i32) {
    client
        .create_stream()
        .stream_name(name)
        .shard_count(shards)
        .send()
        .await
        .unwrap_or_else(|e| panic!("creating stream {name}: {}", error_chain(&e)));
    wait_active(client, name).await;
}

/// Waits until stream `name` is ACTIVE (after a create, split or merge).
///
/// # Panics
/// When it is not ACTIVE within 10 s.
pub async fn wait_active(client: &aws_sdk_kinesis::Client, name: &str) {
    use aws_sdk_kinesis::types::StreamStatus;
    let started = Instant::now();
    loop {
        let status = client
            .describe_stream_summary()
            .stream_name(name)
            .send()
            .await
            .map(|r| r.stream_description_summary.map(|s| s.stream_status));
        if let Ok(Some(StreamStatus::Active)) = status {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "stream {name} is not ACTIVE after 10 s: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One Kinesis record as a consumer gets it.
#[derive(Debug, Clone)]
pub struct StreamRecord {
    /// Its shard.
    pub shard: String,
    /// Its sequence number.
    pub sequence: String,
    /// Its (outer) partition key.
    pub partition_key: String,
    /// Its data: a reading, or a KPL aggregate of readings.
    pub data: Vec<u8>,
}

/// Every record of every shard of `stream` (open shards to their current end), each shard in
/// sequence order, shards in ListShards order.
///
/// # Panics
/// When a call fails.
pub async fn read_stream(client: &aws_sdk_kinesis::Client, stream: &str) -> Vec<StreamRecord> {
    use aws_sdk_kinesis::types::ShardIteratorType;
    let shards = client
        .list_shards()
        .stream_name(stream)
        .send()
        .await
        .unwrap_or_else(|e| panic!("ListShards of {stream}: {}", error_chain(&e)))
        .shards
        .unwrap_or_default();
    let mut out = Vec::new();
    for shard in shards {
        let mut iterator = client
            .get_shard_iterator()
            .stream_name(stream)
            .shard_id(&shard.shard_id)
            .shard_iterator_type(ShardIteratorType::TrimHorizon)
            .send()
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "GetShardIterator of {}: {}",
                    shard.shard_id,
                    error_chain(&e)
                )
            })
            .shard_iterator;
        while let Some(it) = iterator {
            let page = client
                .get_records()
                .shard_iterator(it)
                .send()
                .await
                .unwrap_or_else(|e| {
                    panic!("GetRecords of {}: {}", shard.shard_id, error_chain(&e))
                });
            if page.records.is_empty() {
                break;
            }
            out.extend(page.records.into_iter().map(|r| StreamRecord {
                shard: shard.shard_id.clone(),
                sequence: r.sequence_number,
                partition_key: r.partition_key.unwrap_or_default(),
                data: r.data.into_inner(),
            }));
            iterator = page.next_shard_iterator;
        }
    }
    out
}

/// An error and its sources, on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Sends one signed-looking JSON 1.1 request (kinesalite checks the shape of the signature,
/// never its value) on a new connection and returns the whole reply.
fn json_request(port: u16, operation: &str, body: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    write!(
        stream,
        "POST / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\
         X-Amz-Target: Kinesis_20131202.{operation}\r\n\
         Content-Type: application/x-amz-json-1.1\r\nX-Amz-Date: 20260101T000000Z\r\n\
         Authorization: AWS4-HMAC-SHA256 Credential=test/20260101/{REGION}/kinesis/aws4_request, \
         SignedHeaders=host, Signature=0\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    Ok(reply)
}

/// What a [`KinesisFaultProxy`] injects, and what it counted. Change the settings at any time
/// through the `Arc` the proxy hands out; they apply from the next request on.
///
/// Percentages are of the calls (or PutRecords entries) that reach the proxy, drawn from the
/// proxy's seeded generator; the `*_next` one-shots fire first, on the next calls.
#[derive(Debug, Default)]
pub struct KinesisFaults {
    /// Percent (0–100) of GetRecords calls answered `400 ProvisionedThroughputExceededException`
    /// without reaching kinesalite.
    pub throttle_pct: AtomicU64,
    /// The next this many GetRecords calls are answered so, whatever `throttle_pct` says.
    pub throttle_next: AtomicU64,
    /// Percent (0–100) of GetRecords calls answered `400 ExpiredIteratorException` without
    /// reaching kinesalite (the consumer must get a new iterator).
    pub expire_pct: AtomicU64,
    /// The next this many GetRecords calls are answered so, whatever `expire_pct` says.
    pub expire_next: AtomicU64,
    /// The next this many GetRecords calls are answered `400 AccessDeniedException`: an error
    /// waiting does not fix, which ends the consumer's shard reader (it must be restarted).
    pub deny_next: AtomicU64,
    /// Percent (0–100) of PutRecords *entries* failed with `ProvisionedThroughputExceededException`
    /// in a `200` answer (`FailedRecordCount` > 0), as the service does under load: those entries
    /// never reach kinesalite, the others do.
    pub put_fail_pct: AtomicU64,
    rng: Mutex<u64>,
    get_records: AtomicU64,
    throttled: AtomicU64,
    expired: AtomicU64,
    put_entries_failed: AtomicU64,
    forwarded: AtomicU64,
    /// GetRecords calls per `stream/shard`.
    per_shard: Mutex<HashMap<String, u64>>,
    /// The live iterators the proxy has seen handed out, to their `stream/shard`.
    iterators: Mutex<HashMap<String, String>>,
}

impl KinesisFaults {
    /// GetRecords calls received (forwarded or answered with a fault).
    pub fn get_records_total(&self) -> u64 {
        self.get_records.load(Relaxed)
    }

    /// GetRecords calls per `stream/shardId-…`, for iterators obtained through the proxy
    /// (GetShardIterator, or a previous GetRecords' `NextShardIterator`); others count under
    /// `unknown`.
    pub fn get_records_by_shard(&self) -> std::collections::BTreeMap<String, u64> {
        lock(&self.per_shard)
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }

    /// GetRecords calls answered ProvisionedThroughputExceededException.
    pub fn throttled_total(&self) -> u64 {
        self.throttled.load(Relaxed)
    }

    /// GetRecords calls answered ExpiredIteratorException.
    pub fn expired_total(&self) -> u64 {
        self.expired.load(Relaxed)
    }

    /// PutRecords entries failed by the proxy.
    pub fn put_entries_failed_total(&self) -> u64 {
        self.put_entries_failed.load(Relaxed)
    }

    /// Every fault injected: throttled and expired calls plus failed entries.
    pub fn faults_total(&self) -> u64 {
        self.throttled_total() + self.expired_total() + self.put_entries_failed_total()
    }

    /// Requests forwarded to kinesalite.
    pub fn forwarded_total(&self) -> u64 {
        self.forwarded.load(Relaxed)
    }

    /// A number in 0..100 from the seeded xorshift generator.
    fn roll(&self) -> u64 {
        let mut r = lock(&self.rng);
        *r ^= *r << 13;
        *r ^= *r >> 7;
        *r ^= *r << 17;
        *r % 100
    }

    /// Whether to fire a fault with this one-shot counter and percentage.
    fn fire(&self, next: &AtomicU64, pct: &AtomicU64) -> bool {
        let one_shot = next
            .fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1))
            .is_ok();
        one_shot || self.roll() < pct.load(Relaxed)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// An HTTP/1.1 proxy in front of kinesalite that injects the faults of [`KinesisFaults`], for
/// consumers and producers (the SDK, or a child process given [`KinesisFaultProxy::env`]).
///
/// It speaks the JSON protocol (the operation is the `X-Amz-Target` header), one request per
/// connection (`Connection: close`, which the SDK's HTTP client handles as any server closing
/// idle connections), and sits below the SDK's retries, so it tests the real retry path. It
/// rewrites PutRecords bodies, which only works because kinesalite does not check signatures.
/// Runs on its own threads, independent of any async runtime; stops when dropped.
#[derive(Debug)]
pub struct KinesisFaultProxy {
    port: u16,
    faults: Arc<KinesisFaults>,
    closed: Arc<AtomicBool>,
}

impl KinesisFaultProxy {
    /// A proxy on a free loopback port in front of kinesalite at `upstream_port`, drawing its
    /// faults from `seed`; it injects nothing until told to.
    pub fn start(upstream_port: u16, seed: u64) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a loopback port");
        let port = listener.local_addr().expect("a bound listener").port();
        let faults = Arc::new(KinesisFaults {
            rng: Mutex::new(seed.max(1)),
            ..KinesisFaults::default()
        });
        let closed = Arc::new(AtomicBool::new(false));
        let (f, c) = (faults.clone(), closed.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if c.load(Relaxed) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let f = f.clone();
                std::thread::spawn(move || {
                    let _ = serve(conn, upstream_port, &f);
                });
            }
        });
        Self {
            port,
            faults,
            closed,
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Its port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The settings and counters, shared with the proxy's threads.
    pub fn faults(&self) -> &Arc<KinesisFaults> {
        &self.faults
    }

    /// The environment that points a process at kinesalite through this proxy.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        endpoint_env(&self.endpoint())
    }

    /// A client that talks through this proxy (see [`kinesis_config`]).
    pub fn client(&self) -> aws_sdk_kinesis::Client {
        kinesis_client(&self.endpoint())
    }
}

impl Drop for KinesisFaultProxy {
    fn drop(&mut self) {
        self.closed.store(true, Relaxed);
        // Wakes the accept loop, which then sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// One parsed HTTP request.
struct Request {
    /// Header lines without `Connection` and `Content-Length`.
    headers: Vec<String>,
    operation: String,
    body: Vec<u8>,
}

/// Reads one request: its head, then its body by Content-Length. `None` when the client
/// closed the connection first.
fn read_request(client: &mut TcpStream) -> std::io::Result<Option<Request>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = client.read(&mut chunk)?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let (mut length, mut operation, mut headers) = (0usize, String::new(), Vec::new());
    for line in head.split("\r\n").filter(|l| !l.is_empty()) {
        let lower = line.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            length = v.trim().parse().map_err(std::io::Error::other)?;
            continue;
        }
        if lower.starts_with("transfer-encoding") {
            return Err(std::io::Error::other(format!(
                "the Kinesis fault proxy handles Content-Length bodies only: {line}"
            )));
        }
        if lower.starts_with("x-amz-target:") {
            // `Kinesis_20131202.GetRecords` → `GetRecords`.
            operation = line
                .rsplit_once('.')
                .map(|(_, op)| op.trim().to_owned())
                .unwrap_or_default();
        }
        if !lower.starts_with("connection:") {
            headers.push(line.to_owned());
        }
    }
    while buf.len() < head_end + length {
        let n = client.read(&mut chunk)?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    buf.truncate(head_end + length);
    Ok(Some(Request {
        headers,
        operation,
        body: buf.split_off(head_end),
    }))
}

/// Forwards `headers` + `body` to kinesalite and returns its status code and body.
fn forward(upstream_port: u16, headers: &[String], body: &[u8]) -> std::io::Result<(u16, Vec<u8>)> {
    let mut upstream = TcpStream::connect(("127.0.0.1", upstream_port))?;
    let mut request = headers.join("\r\n").into_bytes();
    request.extend_from_slice(
        format!(
            "\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    request.extend_from_slice(body);
    upstream.write_all(&request)?;
    let mut response = Vec::new();
    upstream.read_to_end(&mut response)?;
    let head_end = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("kinesalite sent no complete response head"))?;
    let status = String::from_utf8_lossy(&response[..head_end])
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("kinesalite sent no status code"))?;
    let body = response.split_off(head_end + 4);
    Ok((status, body))
}

fn respond(client: &mut TcpStream, status: u16, body: &[u8]) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        _ => "Error",
    };
    write!(
        client,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/x-amz-json-1.1\r\n\
         x-amzn-RequestId: 00000000-0000-0000-0000-000000000000\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    )?;
    client.write_all(body)?;
    client.flush()
}

fn error_body(kind: &str, message: &str) -> Vec<u8> {
    serde_json::json!({ "__type": kind, "message": message })
        .to_string()
        .into_bytes()
}

/// The string value of `"key":"…"` in a JSON body, without parsing it all (GetRecords answers
/// can be megabytes of records).
fn json_string_field(body: &[u8], key: &str) -> Option<String> {
    let needle = format!("\"{key}\":\"");
    let text = std::str::from_utf8(body).ok()?;
    let start = text.find(&needle)? + needle.len();
    let len = text[start..].find('"')?;
    Some(text[start..start + len].to_owned())
}

fn serve(mut client: TcpStream, upstream_port: u16, f: &KinesisFaults) -> std::io::Result<()> {
    let Some(req) = (match read_request(&mut client) {
        Ok(r) => r,
        Err(e) => {
            let body = error_body("SerializationException", &e.to_string());
            return respond(&mut client, 400, &body);
        }
    }) else {
        return Ok(());
    };
    match req.operation.as_str() {
        "GetShardIterator" => {
            let (status, body) = forward(upstream_port, &req.headers, &req.body)?;
            f.forwarded.fetch_add(1, Relaxed);
            if status == 200
                && let Some(iterator) = json_string_field(&body, "ShardIterator")
                && let Ok(r) = serde_json::from_slice::<serde_json::Value>(&req.body)
            {
                let stream = r["StreamName"].as_str().unwrap_or("?");
                let shard = r["ShardId"].as_str().unwrap_or("?");
                lock(&f.iterators).insert(iterator, format!("{stream}/{shard}"));
            }
            respond(&mut client, status, &body)
        }
        "GetRecords" => get_records(client, upstream_port, f, &req),
        "PutRecords" => put_records(client, upstream_port, f, &req),
        _ => {
            let (status, body) = forward(upstream_port, &req.headers, &req.body)?;
            f.forwarded.fetch_add(1, Relaxed);
            respond(&mut client, status, &body)
        }
    }
}

fn get_records(
    mut client: TcpStream,
    upstream_port: u16,
    f: &KinesisFaults,
    req: &Request,
) -> std::io::Result<()> {
    f.get_records.fetch_add(1, Relaxed);
    let iterator = json_string_field(&req.body, "ShardIterator").unwrap_or_default();
    let shard = lock(&f.iterators)
        .get(&iterator)
        .cloned()
        .unwrap_or_else(|| "unknown".to_owned());
    *lock(&f.per_shard).entry(shard.clone()).or_default() += 1;
    let (stream, shard_id) = shard.split_once('/').unwrap_or(("?", shard.as_str()));

    if f.fire(&f.throttle_next, &f.throttle_pct) {
        f.throttled.fetch_add(1, Relaxed);
        let body = error_body(
            "ProvisionedThroughputExceededException",
            &format!(
                "Rate exceeded for shard {shard_id} in stream {stream} under account 000000000000."
            ),
        );
        return respond(&mut client, 400, &body);
    }
    if f.deny_next
        .fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1))
        .is_ok()
    {
        let body = error_body(
            "AccessDeniedException",
            &format!("injected by the test's fault proxy for shard {shard_id}"),
        );
        return respond(&mut client, 400, &body);
    }
    if f.fire(&f.expire_next, &f.expire_pct) {
        f.expired.fetch_add(1, Relaxed);
        let body = error_body(
            "ExpiredIteratorException",
            "Iterator expired. The iterator was created at a time further in the past than the \
             tolerated delay of 300000 milliseconds (injected by the test's fault proxy).",
        );
        return respond(&mut client, 400, &body);
    }
    let (status, body) = forward(upstream_port, &req.headers, &req.body)?;
    f.forwarded.fetch_add(1, Relaxed);
    if status == 200 {
        let mut iterators = lock(&f.iterators);
        if let Some(known) = iterators.remove(&iterator)
            && let Some(next) = json_string_field(&body, "NextShardIterator")
        {
            iterators.insert(next, known);
        }
    }
    respond(&mut client, status, &body)
}

fn put_records(
    mut client: TcpStream,
    upstream_port: u16,
    f: &KinesisFaults,
    req: &Request,
) -> std::io::Result<()> {
    let pct = f.put_fail_pct.load(Relaxed);
    let parsed = serde_json::from_slice::<serde_json::Value>(&req.body).ok();
    let Some(mut request) = parsed.filter(|_| pct > 0) else {
        let (status, body) = forward(upstream_port, &req.headers, &req.body)?;
        f.forwarded.fetch_add(1, Relaxed);
        return respond(&mut client, status, &body);
    };
    let stream = request["StreamName"].as_str().unwrap_or("?").to_owned();
    let entries = request["Records"].as_array().cloned().unwrap_or_default();
    let failed: Vec<bool> = entries.iter().map(|_| f.roll() < pct).collect();
    let kept: Vec<serde_json::Value> = entries
        .iter()
        .zip(&failed)
        .filter(|(_, failed)| !**failed)
        .map(|(e, _)| e.clone())
        .collect();
    let injected = failed.iter().filter(|x| **x).count();
    f.put_entries_failed.fetch_add(injected as u64, Relaxed);

    let mut upstream_results = Vec::new().into_iter();
    let mut upstream_failed = 0;
    if !kept.is_empty() {
        request["Records"] = serde_json::Value::Array(kept);
        let (status, body) = forward(upstream_port, &req.headers, request.to_string().as_bytes())?;
        f.forwarded.fetch_add(1, Relaxed);
        if status != 200 {
            // The whole call failed upstream: pass that on as it is.
            return respond(&mut client, status, &body);
        }
        let answer: serde_json::Value =
            serde_json::from_slice(&body).map_err(std::io::Error::other)?;
        upstream_failed = answer["FailedRecordCount"].as_u64().unwrap_or(0);
        upstream_results = answer["Records"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter();
    }
    let mut results = Vec::with_capacity(entries.len());
    for failed in failed {
        if failed {
            results.push(serde_json::json!({
                "ErrorCode": "ProvisionedThroughputExceededException",
                "ErrorMessage": format!(
                    "Rate exceeded for shard shardId-000000000000 in stream {stream} under \
                     account 000000000000 (injected by the test's fault proxy)."
                ),
            }));
        } else {
            results.push(upstream_results.next().unwrap_or_else(|| {
                serde_json::json!({ "ErrorCode": "InternalFailure", "ErrorMessage": "proxy: missing upstream result" })
            }));
        }
    }
    let body = serde_json::json!({
        "FailedRecordCount": upstream_failed + injected as u64,
        "Records": results,
    })
    .to_string();
    respond(&mut client, 200, body.as_bytes())
}
