//! Test support for the `sensorlake-lambda` binary: a Lambda Runtime API server on loopback,
//! the binary run against it as Lambda runs it, and Kinesis events built from the simulator's
//! fleet with the manifest `verify` checks the lake against.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, dead_code)]

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use sensorlake_core::TelemetrySchema;
use sensorlake_simulator::{Fleet, FleetSpec, Manifest, ManifestBuilder, VerifyReport};

// ---------------------------------------------------------------------------------------------
// The Runtime API
// ---------------------------------------------------------------------------------------------

/// What the function answered to one invocation.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// `POST /2018-06-01/runtime/invocation/{id}/response`.
    Response(serde_json::Value),
    /// `POST /2018-06-01/runtime/invocation/{id}/error`, with its
    /// `Lambda-Runtime-Function-Error-Type` header.
    Error {
        error_type: Option<String>,
        body: serde_json::Value,
    },
}

struct Queued {
    id: String,
    body: Vec<u8>,
    deadline_ms: u64,
}

#[derive(Default)]
struct ApiState {
    queue: VecDeque<Queued>,
    answers: HashMap<String, (Answer, Instant)>,
    init_error: Option<(Option<String>, serde_json::Value)>,
    /// `GET /next` requests received.
    polls: u64,
    closed: bool,
}

/// A Lambda Runtime API (the `2018-06-01` protocol) on a free loopback port: `GET
/// /runtime/invocation/next` long-polls for the next queued event; responses, errors and init
/// errors are recorded. HTTP/1.1 with keep-alive, as the runtime client pools connections.
pub struct RuntimeApi {
    port: u16,
    state: Arc<(Mutex<ApiState>, Condvar)>,
    next_id: Mutex<u64>,
}

impl RuntimeApi {
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new((Mutex::new(ApiState::default()), Condvar::new()));
        let s = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                if s.0.lock().unwrap().closed {
                    return;
                }
                let s = s.clone();
                std::thread::spawn(move || {
                    let _ = serve(conn, &s);
                });
            }
        });
        RuntimeApi {
            port,
            state,
            next_id: Mutex::new(0),
        }
    }

    /// `127.0.0.1:PORT`, the value of `AWS_LAMBDA_RUNTIME_API`.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Queues `event` with a deadline `timeout` from now and returns its request id.
    pub fn queue(&self, event: &serde_json::Value, timeout: Duration) -> String {
        let id = {
            let mut n = self.next_id.lock().unwrap();
            *n += 1;
            format!("00000000-0000-4000-8000-{:012}", *n)
        };
        let deadline_ms = (SystemTime::now() + timeout)
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let (lock, cv) = &*self.state;
        lock.lock().unwrap().queue.push_back(Queued {
            id: id.clone(),
            body: serde_json::to_vec(event).unwrap(),
            deadline_ms,
        });
        cv.notify_all();
        id
    }

    /// Waits for the answer to `id` (and when it arrived), failing the test with the
    /// function's log if it exits or `timeout` passes.
    pub fn wait(&self, id: &str, function: &mut Function, timeout: Duration) -> (Answer, Instant) {
        let started = Instant::now();
        let (lock, cv) = &*self.state;
        let mut st = lock.lock().unwrap();
        loop {
            if let Some(a) = st.answers.get(id) {
                return a.clone();
            }
            if let Some(status) = function.exited() {
                panic!(
                    "the function exited ({status}) before answering {id}; init error: {:?}\nlog:\n{}",
                    st.init_error,
                    function.log_text()
                );
            }
            if started.elapsed() > timeout {
                panic!(
                    "no answer to {id} within {timeout:?}; log:\n{}",
                    function.log_text()
                );
            }
            st = cv.wait_timeout(st, Duration::from_millis(50)).unwrap().0;
        }
    }

    /// Queues `event` and waits for its answer (120 s at most).
    pub fn invoke(&self, function: &mut Function, event: &serde_json::Value) -> Answer {
        let id = self.queue(event, Duration::from_secs(120));
        self.wait(&id, function, Duration::from_secs(120)).0
    }

    /// The init error the function reported, if any: (error type header, body).
    pub fn init_error(&self) -> Option<(Option<String>, serde_json::Value)> {
        self.state.0.lock().unwrap().init_error.clone()
    }

    /// `GET /next` requests so far.
    pub fn polls(&self) -> u64 {
        self.state.0.lock().unwrap().polls
    }
}

impl Drop for RuntimeApi {
    fn drop(&mut self) {
        let (lock, cv) = &*self.state;
        lock.lock().unwrap().closed = true;
        cv.notify_all();
        // Wake the accept loop so it sees `closed`.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// One request: method, path, lower-cased headers, body.
struct Request {
    method: String,
    path: String,
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

fn read_request(r: &mut BufReader<TcpStream>) -> std::io::Result<Option<Request>> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (
        parts.next().unwrap_or_default().to_owned(),
        parts.next().unwrap_or_default().to_owned(),
    );
    let mut headers = BTreeMap::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
    }
    let mut body = Vec::new();
    if headers
        .get("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        loop {
            let mut size = String::new();
            r.read_line(&mut size)?;
            let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or("0"), 16)
                .unwrap_or(0);
            if n == 0 {
                // Trailers, then the empty line.
                loop {
                    let mut t = String::new();
                    r.read_line(&mut t)?;
                    if t.trim_end().is_empty() {
                        break;
                    }
                }
                break;
            }
            let mut chunk = vec![0; n + 2];
            r.read_exact(&mut chunk)?;
            body.extend_from_slice(&chunk[..n]);
        }
    } else if let Some(n) = headers.get("content-length") {
        body = vec![0; n.parse().unwrap_or(0)];
        r.read_exact(&mut body)?;
    }
    Ok(Some(Request {
        method,
        path,
        headers,
        body,
    }))
}

fn serve(conn: TcpStream, state: &Arc<(Mutex<ApiState>, Condvar)>) -> std::io::Result<()> {
    conn.set_nodelay(true)?;
    let mut out = conn.try_clone()?;
    let mut reader = BufReader::new(conn);
    let (lock, cv) = &**state;
    while let Some(req) = read_request(&mut reader)? {
        const PREFIX: &str = "/2018-06-01/runtime/";
        let route = req
            .path
            .strip_prefix(PREFIX)
            .unwrap_or(&req.path)
            .to_owned();
        if req.method == "GET" && route == "invocation/next" {
            let next = {
                let mut st = lock.lock().unwrap();
                st.polls += 1;
                loop {
                    if st.closed {
                        return Ok(());
                    }
                    if let Some(q) = st.queue.pop_front() {
                        break q;
                    }
                    st = cv.wait_timeout(st, Duration::from_millis(200)).unwrap().0;
                }
            };
            let mut reply = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                 Lambda-Runtime-Aws-Request-Id: {}\r\nLambda-Runtime-Deadline-Ms: {}\r\n\
                 Lambda-Runtime-Invoked-Function-Arn: arn:aws:lambda:us-east-1:123456789012:function:sensorlake-test\r\n\
                 Lambda-Runtime-Trace-Id: Root=1-5bef4de7-ad49b0e87f6ef6c87fc2e700;Parent=9a9197af755a6419;Sampled=1\r\n\
                 Content-Length: {}\r\n\r\n",
                next.id,
                next.deadline_ms,
                next.body.len()
            )
            .into_bytes();
            reply.extend_from_slice(&next.body);
            // One write: small writes and delayed ACKs would add ~40 ms to what is measured.
            out.write_all(&reply)?;
            continue;
        }
        let body: serde_json::Value = if req.body.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&req.body).unwrap_or_else(|_| {
                serde_json::Value::String(String::from_utf8_lossy(&req.body).into_owned())
            })
        };
        let error_type = req
            .headers
            .get("lambda-runtime-function-error-type")
            .cloned();
        let known = {
            let mut st = lock.lock().unwrap();
            let now = Instant::now();
            let parts: Vec<&str> = route.split('/').collect();
            let known = match (req.method.as_str(), parts.as_slice()) {
                ("POST", ["invocation", id, "response"]) => {
                    st.answers
                        .insert((*id).to_owned(), (Answer::Response(body), now));
                    true
                }
                ("POST", ["invocation", id, "error"]) => {
                    st.answers
                        .insert((*id).to_owned(), (Answer::Error { error_type, body }, now));
                    true
                }
                ("POST", ["init", "error"]) => {
                    st.init_error = Some((error_type, body));
                    true
                }
                _ => false,
            };
            cv.notify_all();
            known
        };
        let (status, reply) = if known {
            ("202 Accepted", r#"{"status":"OK"}"#)
        } else {
            ("404 Not Found", r#"{"errorMessage":"unknown route"}"#)
        };
        out.write_all(
            format!(
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{reply}",
                reply.len()
            )
            .as_bytes(),
        )?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The function process
// ---------------------------------------------------------------------------------------------

/// The real `sensorlake-lambda` binary, started as Lambda starts a custom runtime.
pub struct Function {
    child: Child,
    log: PathBuf,
    _log_dir: tempfile::TempDir,
    /// When the process was spawned.
    pub spawned: Instant,
}

impl Function {
    /// Starts the binary against `api` with the Lambda environment plus `env` (the parent's
    /// `AWS_*` and `SENSORLAKE_*` variables are not passed on).
    pub fn start(api: &RuntimeApi, env: &[(&str, String)]) -> Self {
        let log_dir = tempfile::tempdir().unwrap();
        let log = log_dir.path().join("function.log");
        let file = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sensorlake-lambda"));
        for (k, _) in std::env::vars() {
            if k.starts_with("AWS_") || k.starts_with("SENSORLAKE_") || k == "RUST_LOG" {
                cmd.env_remove(k);
            }
        }
        cmd.env("AWS_LAMBDA_RUNTIME_API", api.address())
            .env("AWS_LAMBDA_FUNCTION_NAME", "sensorlake-test")
            .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "1024")
            .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
            .env("AWS_LAMBDA_LOG_STREAM_NAME", "2026/11/27/[$LATEST]test")
            .env("AWS_LAMBDA_LOG_GROUP_NAME", "/aws/lambda/sensorlake-test")
            .env("RUST_LOG", "info")
            // Tests only: the lake's files are not fsynced (as the service's tests do).
            .env("SENSORLAKE_LAKE__FSYNC", "false");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let spawned = Instant::now();
        let child = cmd
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        Function {
            child,
            log,
            _log_dir: log_dir,
            spawned,
        }
    }

    /// The exit status, if the process has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(s) = self.exited() {
                return s;
            }
            assert!(
                started.elapsed() < timeout,
                "the function did not exit within {timeout:?}; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything it logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Its log lines as JSON objects (lines that are not JSON are skipped).
    pub fn log_json(&self) -> Vec<serde_json::Value> {
        self.log_text()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Its peak resident set (VmHWM) in KiB, while it runs.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }
}

impl Drop for Function {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// Kinesis events from the simulator's fleet
// ---------------------------------------------------------------------------------------------

/// The stream of the tests.
pub const STREAM_ARN: &str = "arn:aws:kinesis:us-east-1:123456789012:stream/telemetry";
/// The shard of the tests.
pub const SHARD: &str = "shardId-000000000000";
/// Its lake writer id.
pub const WRITER: &str = "ks-telemetry-000000000000";

/// One Kinesis record as an event carries it.
#[derive(Debug, Clone)]
pub struct KRecord {
    pub sequence: String,
    pub partition_key: String,
    pub data: Vec<u8>,
    /// Seconds since the epoch, with milliseconds.
    pub arrival: f64,
}

impl KRecord {
    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "kinesis": {
                "kinesisSchemaVersion": "1.0",
                "partitionKey": self.partition_key,
                "sequenceNumber": self.sequence,
                "data": base64::engine::general_purpose::STANDARD.encode(&self.data),
                "approximateArrivalTimestamp": self.arrival,
            },
            "eventSource": "aws:kinesis",
            "eventVersion": "1.0",
            "eventID": format!("{SHARD}:{}", self.sequence),
            "eventName": "aws:kinesis:record",
            "invokeIdentityArn": "arn:aws:iam::123456789012:role/sensorlake-lambda",
            "awsRegion": "us-east-1",
            "eventSourceARN": STREAM_ARN,
        })
    }
}

/// A Kinesis event holding `records`.
pub fn event(records: &[KRecord]) -> serde_json::Value {
    serde_json::json!({ "Records": records.iter().map(KRecord::to_json).collect::<Vec<_>>() })
}

/// The simulator's fleet writing into one shard: every message becomes a Kinesis record
/// (partition key = the device its topic names), some packed into KPL aggregates, and is
/// recorded in the manifest.
pub struct Sim {
    fleet: Fleet,
    manifest: ManifestBuilder,
    /// The next sequence number's counter.
    next: u64,
    /// The readings' `ts`, advancing 1 ms per message.
    now_ms: i64,
    /// Arrival time of the next record (ms).
    arrival_ms: i64,
}

impl Sim {
    /// A fleet of `devices` with `bad_ratio` invalid messages, whose readings are stamped from
    /// `ts_ago` before now.
    pub fn new(devices: usize, seed: u64, bad_ratio: f64, ts_ago: Duration) -> Self {
        let mut spec = FleetSpec::new(devices, seed).with_bad_ratio(bad_ratio);
        // 300 KB payloads would make multi-megabyte events for nothing.
        spec.allow_oversize = false;
        let fleet = Fleet::new(spec);
        let manifest = ManifestBuilder::new(&fleet, 1);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        Sim {
            fleet,
            manifest,
            next: 1,
            now_ms: now - ts_ago.as_millis() as i64,
            arrival_ms: now - 60_000,
        }
    }

    /// A 56-digit sequence number (as Kinesis writes them), growing with each call.
    fn sequence(&mut self) -> String {
        let s = format!(
            "49590338271490256608559692538361571095921575{:012}",
            self.next * 7919
        );
        self.next += 1;
        s
    }

    fn arrival(&mut self) -> f64 {
        self.arrival_ms += 3;
        self.arrival_ms as f64 / 1000.0
    }

    /// The next message as (partition key, payload), recorded in the manifest as sent when
    /// `sent`, else as unconfirmed (may or may not be in the lake; the test checks it is not).
    fn message(&mut self, sent: bool) -> (String, Vec<u8>) {
        self.now_ms += 1;
        let m = self.fleet.next_message(self.now_ms);
        if sent {
            self.manifest.record(&m.expect);
        } else {
            self.manifest.record_unconfirmed(&m.expect);
        }
        let key = m.topic.rsplit('/').next().unwrap_or_default().to_owned();
        (key, m.payload)
    }

    /// `n` Kinesis records; every `kpl_every`-th one (if set) is a KPL aggregate of 4 messages.
    pub fn records(&mut self, n: usize, kpl_every: Option<usize>) -> Vec<KRecord> {
        (0..n)
            .map(|i| {
                if kpl_every.is_some_and(|k| i % k == k - 1) {
                    self.aggregate(4)
                } else {
                    let (partition_key, data) = self.message(true);
                    KRecord {
                        sequence: self.sequence(),
                        partition_key,
                        data,
                        arrival: self.arrival(),
                    }
                }
            })
            .collect()
    }

    /// One KPL aggregate of `n` messages (outer partition key: the first one's).
    pub fn aggregate(&mut self, n: usize) -> KRecord {
        let users: Vec<(String, Vec<u8>)> = (0..n).map(|_| self.message(true)).collect();
        let refs: Vec<(&str, &[u8])> = users
            .iter()
            .map(|(k, d)| (k.as_str(), d.as_slice()))
            .collect();
        let data = sensorlake_ingest::kinesis::kpl::aggregate(&refs);
        assert!(
            data.starts_with(&sensorlake_ingest::kinesis::kpl::MAGIC),
            "kpl::aggregate produced no aggregate"
        );
        KRecord {
            sequence: self.sequence(),
            partition_key: users[0].0.clone(),
            data,
            arrival: self.arrival(),
        }
    }

    /// A KPL aggregate of `n` messages whose MD5 is wrong; its readings are recorded in the
    /// manifest as unconfirmed (they must not reach the telemetry table: check
    /// `unconfirmed_found == 0`).
    pub fn corrupt_aggregate(&mut self, n: usize) -> KRecord {
        let users: Vec<(String, Vec<u8>)> = (0..n).map(|_| self.message(false)).collect();
        let refs: Vec<(&str, &[u8])> = users
            .iter()
            .map(|(k, d)| (k.as_str(), d.as_slice()))
            .collect();
        let mut data = sensorlake_ingest::kinesis::kpl::aggregate(&refs);
        let last = data.len() - 1;
        data[last] ^= 0xFF;
        KRecord {
            sequence: self.sequence(),
            partition_key: users[0].0.clone(),
            data,
            arrival: self.arrival(),
        }
    }

    /// A plain record holding `data`, not in the manifest.
    pub fn raw(&mut self, partition_key: &str, data: &[u8]) -> KRecord {
        KRecord {
            sequence: self.sequence(),
            partition_key: partition_key.into(),
            data: data.to_vec(),
            arrival: self.arrival(),
        }
    }

    /// What was sent so far.
    pub fn manifest(&self) -> Manifest {
        self.manifest.clone().build()
    }

    /// Messages recorded in the manifest so far.
    pub fn messages(&self) -> u64 {
        self.manifest.messages()
    }
}

/// `verify` of a local lake against `manifest`.
pub fn verify(lake: &Path, manifest: &Manifest) -> VerifyReport {
    sensorlake_simulator::verify(lake, manifest, &TelemetrySchema::v1_default()).unwrap()
}

/// Every file of a local lake with its bytes, by relative path (writer lock files left out:
/// they hold the pid of the last process that opened the writer).
pub fn lake_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_none_or(|e| e != "lock") {
                let rel = p.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

/// The names of the lake's Parquet files of `table` (`telemetry` or `dead_letter`).
pub fn parquet_names(files: &BTreeMap<String, Vec<u8>>, table: &str) -> Vec<String> {
    files
        .keys()
        .filter(|k| k.starts_with(&format!("{table}/")) && k.ends_with(".parquet"))
        .cloned()
        .collect()
}

/// A successful Kinesis answer's `batchItemFailures`.
pub fn failures(answer: &Answer) -> Vec<String> {
    match answer {
        Answer::Response(v) => v["batchItemFailures"]
            .as_array()
            .unwrap_or_else(|| panic!("not a batch response: {v}"))
            .iter()
            .map(|f| f["itemIdentifier"].as_str().unwrap().to_owned())
            .collect(),
        Answer::Error { .. } => panic!("the invocation failed: {answer:?}"),
    }
}

/// The environment for a lake at `lake`.
pub fn lake_env(lake: &Path) -> Vec<(&'static str, String)> {
    vec![("SENSORLAKE_LAKE__PATH", lake.to_str().unwrap().to_owned())]
}

// ---------------------------------------------------------------------------------------------
// S3 (moto) helpers
// ---------------------------------------------------------------------------------------------

/// The bucket of the S3 tests.
pub const BUCKET: &str = "lake";
/// The lake's prefix in it.
pub const PREFIX: &str = "sensorlake";

/// The environment that points the function at a lake in `moto`'s bucket through `endpoint`
/// (moto itself, or a proxy in front of it).
pub fn s3_env(moto: &sensorlake_testkit::Moto, endpoint: &str) -> Vec<(&'static str, String)> {
    let mut env: Vec<(&'static str, String)> = moto
        .env()
        .into_iter()
        .filter(|(k, _)| *k != "AWS_ENDPOINT_URL")
        .collect();
    env.push(("AWS_ENDPOINT_URL", endpoint.to_owned()));
    env.push(("SENSORLAKE_LAKE__PATH", format!("s3://{BUCKET}/{PREFIX}")));
    env
}

/// Every object under the lake's prefix with its bytes, by path relative to the prefix.
pub fn s3_files(moto: &sensorlake_testkit::Moto) -> BTreeMap<String, Vec<u8>> {
    use futures_util::TryStreamExt;
    use object_store::{ObjectStore, ObjectStoreExt};
    let store = moto.store(BUCKET);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let prefix = object_store::path::Path::from(PREFIX);
        let objects: Vec<_> = store.list(Some(&prefix)).try_collect().await.unwrap();
        let mut out = BTreeMap::new();
        for o in objects {
            let bytes = store.get(&o.location).await.unwrap().bytes().await.unwrap();
            let rel = o
                .location
                .as_ref()
                .strip_prefix(&format!("{PREFIX}/"))
                .unwrap()
                .to_owned();
            out.insert(rel, bytes.to_vec());
        }
        out
    })
}

/// Writes `files` under `dir` (a local copy of an S3 lake, for `verify`).
pub fn write_tree(files: &BTreeMap<String, Vec<u8>>, dir: &Path) {
    for (rel, bytes) in files {
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    }
}

/// An HTTP proxy in front of moto that, while `deny` is set, answers every upload under the
/// lake's `_sensorlake/tmp/` (a flush's files, written before its commit point) with 403
/// AccessDenied, as S3 does when a bucket policy or the role forbids the write. One request
/// per connection (`Connection: close`).
pub struct DenyProxy {
    port: u16,
    pub deny: Arc<std::sync::atomic::AtomicBool>,
    pub denied: Arc<std::sync::atomic::AtomicU64>,
    /// Requests forwarded, by method.
    pub forwarded: Arc<Mutex<BTreeMap<String, u64>>>,
}

impl DenyProxy {
    pub fn start(upstream_port: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let deny = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let denied = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let forwarded = Arc::new(Mutex::new(BTreeMap::new()));
        let (d, n, fw) = (deny.clone(), denied.clone(), forwarded.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (d, n, fw) = (d.clone(), n.clone(), fw.clone());
                std::thread::spawn(move || {
                    let _ = Self::serve(conn, upstream_port, &d, &n, &fw);
                });
            }
        });
        DenyProxy {
            port,
            deny,
            denied,
            forwarded,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Takes the forwarded-request counts, by method.
    pub fn take_forwarded(&self) -> BTreeMap<String, u64> {
        std::mem::take(&mut *self.forwarded.lock().unwrap())
    }

    fn serve(
        client: TcpStream,
        upstream_port: u16,
        deny: &std::sync::atomic::AtomicBool,
        denied: &std::sync::atomic::AtomicU64,
        forwarded: &Mutex<BTreeMap<String, u64>>,
    ) -> std::io::Result<()> {
        use std::sync::atomic::Ordering::Relaxed;
        let mut out = client.try_clone()?;
        let mut reader = BufReader::new(client);
        let Some(req) = read_request(&mut reader)? else {
            return Ok(());
        };
        let upload = matches!(req.method.as_str(), "PUT" | "POST");
        if upload && deny.load(Relaxed) && req.path.contains("/_sensorlake/tmp/") {
            denied.fetch_add(1, Relaxed);
            let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>AccessDenied</Code>\
                        <Message>Access Denied</Message></Error>";
            return write!(
                out,
                "HTTP/1.1 403 Forbidden\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
        *forwarded
            .lock()
            .unwrap()
            .entry(req.method.clone())
            .or_default() += 1;
        let mut upstream = TcpStream::connect(("127.0.0.1", upstream_port))?;
        let mut head = format!("{} {} HTTP/1.1\r\n", req.method, req.path);
        for (k, v) in &req.headers {
            if k != "connection" && k != "transfer-encoding" && k != "content-length" {
                head.push_str(&format!("{k}: {v}\r\n"));
            }
        }
        head.push_str(&format!(
            "content-length: {}\r\nconnection: close\r\n\r\n",
            req.body.len()
        ));
        upstream.write_all(head.as_bytes())?;
        upstream.write_all(&req.body)?;
        let mut response = Vec::new();
        upstream.read_to_end(&mut response)?;
        out.write_all(&response)
    }
}
