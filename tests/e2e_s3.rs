//! The pipeline with its lake on S3, as `moto_server` (PyPI `moto[server]`) serves it on a
//! free loopback port (and once on Azure Blob, as Azurite serves it): MQTT in through Mosquitto, `--lake s3://bucket/prefix` configured only
//! by the standard AWS environment variables, SIGKILLs mid-stream, a store that fails 30% of
//! requests or is down for a minute (a fault-injecting HTTP proxy in front of moto), and
//! `verify` exact on a copy of the bucket.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use futures_util::TryStreamExt;
use object_store::{ObjectStore, ObjectStoreExt};
use sensorlake_testkit::{Azurite, Moto};

/// Copies every object under `prefix/` into `dir`, keeping the relative paths; returns how
/// many were listed. Objects the pipeline removes meanwhile are skipped.
fn mirror(store: &Arc<dyn ObjectStore>, prefix: &str, dir: &Path) -> usize {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _ = std::fs::remove_dir_all(dir);
    let key = object_store::path::Path::from(prefix);
    let objects: Vec<_> = rt
        .block_on(store.list(Some(&key)).try_collect::<Vec<_>>())
        .unwrap();
    for o in &objects {
        let full = o.location.to_string();
        let rel = full.strip_prefix(&format!("{prefix}/")).unwrap();
        let bytes = match rt.block_on(async { store.get(&o.location).await?.bytes().await }) {
            Ok(bytes) => bytes,
            // Renamed or deleted by the pipeline since the listing.
            Err(object_store::Error::NotFound { .. }) => continue,
            Err(e) => panic!("cannot read {}: {e}", o.location),
        };
        let path = dir.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
    objects.len()
}

/// Mirrors the bucket into `copy` until `verify` finds it exact or `timeout` passes; returns
/// the last verdict and report. (Counting committed readings is not enough: after a crash,
/// redelivered duplicates count as received too.)
fn verify_s3_eventually(
    store: &Arc<dyn ObjectStore>,
    prefix: &str,
    copy: &Path,
    manifest: &Path,
    timeout: Duration,
) -> (bool, String) {
    let start = Instant::now();
    loop {
        mirror(store, prefix, copy);
        let (exact, report) = verify(copy, manifest);
        if exact || start.elapsed() > timeout {
            return (exact, report);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A seeded xorshift64, for kill moments that a failing run can replay.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What both tests start from: moto with one bucket, Mosquitto, a scratch folder (the
/// pipeline's log, the manifest, and the bucket's local copy for `verify`).
struct S3Scenario {
    moto: Moto,
    store: Arc<dyn ObjectStore>,
    broker: Mosquitto,
    dir: tempfile::TempDir,
    copy: std::path::PathBuf,
    manifest: std::path::PathBuf,
}

impl S3Scenario {
    const BUCKET: &str = "telemetry-lake";

    fn new() -> Self {
        let moto = Moto::start(Self::BUCKET);
        let dir = tempfile::tempdir().unwrap();
        S3Scenario {
            store: Arc::new(moto.store(Self::BUCKET)),
            moto,
            broker: Mosquitto::start(),
            copy: dir.path().join("copy"),
            manifest: dir.path().join("manifest.json"),
            dir,
        }
    }

    /// `sensorlake run --lake s3://<bucket>/<prefix>`, configured only by the AWS variables
    /// (plus `env`), logging to one file across restarts; subscribed when this returns.
    fn pipeline(&self, prefix: &str, env: &[(&str, &str)]) -> Pipeline {
        let aws = self.moto.env();
        let mut all: Vec<(&str, &str)> = aws.iter().map(|(k, v)| (*k, v.as_str())).collect();
        all.extend_from_slice(env);
        let (url, lake) = (self.broker.url(), format!("s3://{}/{prefix}", Self::BUCKET));
        let args = ["--mqtt", url.as_str(), "--lake", lake.as_str()];
        Pipeline::start(&args, &self.dir.path().join("pipeline.log"), &all)
    }

    /// `sensorlake simulate` in the background.
    fn simulate(&self, devices: u32, readings: u64, seed: u64, extra: &[&str]) -> Child {
        let url = self.broker.url();
        bin()
            .args(simulate_args(
                &url,
                devices,
                readings,
                0.02,
                seed,
                &self.manifest,
                extra,
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    }

    fn verify_eventually(&self, prefix: &str, timeout: Duration) -> (bool, String) {
        verify_s3_eventually(&self.store, prefix, &self.copy, &self.manifest, timeout)
    }

    /// Temporary objects of writer w0 under `prefix`, in a fresh copy of the bucket. Call it
    /// once the pipeline has stopped: a running commit has temporary objects, of course.
    fn stray_tmp(&self, prefix: &str) -> usize {
        mirror(&self.store, prefix, &self.copy);
        std::fs::read_dir(self.copy.join("_sensorlake/tmp/w0"))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// What every S3 test ends with: the pipeline stops on SIGTERM with status 0, `verify`
    /// found the lake under `prefix` exact, and no temporary object or open multipart upload
    /// is left. `what` opens every message (the seed, the faults).
    fn assert_ends_clean(
        &self,
        p: &mut Pipeline,
        prefix: &str,
        (exact, report): (bool, String),
        what: &str,
    ) {
        assert!(
            p.terminate().success(),
            "{what}: SIGTERM must exit 0:\n{}",
            p.log_text()
        );
        assert!(
            exact,
            "{what}: the lake holds every reading once:\n{report}"
        );
        assert_eq!(
            self.stray_tmp(prefix),
            0,
            "{what}: temporary objects left behind: {:?}\n{}",
            walk_names(&self.copy.join("_sensorlake/tmp")),
            p.log_text()
                .lines()
                .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        assert_eq!(
            self.moto.open_uploads(Self::BUCKET),
            0,
            "{what}: multipart uploads left open"
        );
    }
}

/// A crash at each named point of the commit protocol, then SIGKILLs at seeded random moments
/// while readings stream in and while the backlog drains, each followed by a restart, then
/// `verify` must be exact: nothing lost, nothing twice, every
/// file opens, no temporary object left. `SENSORLAKE_TEST_KILLS` (default 8),
/// `SENSORLAKE_TEST_READINGS` (default 50,000) and `SENSORLAKE_TEST_SEED` scale it up by
/// hand; the seed is in every failure message.
#[test]
fn a_lake_on_s3_survives_sigkills_at_random_moments_and_ends_exact() {
    let seed = env_u64("SENSORLAKE_TEST_SEED", 20261127);
    let kills = env_u64("SENSORLAKE_TEST_KILLS", 8);
    let sent_target = env_u64("SENSORLAKE_TEST_READINGS", 50_000);
    let mut rng = Rng(seed.max(1));
    let sc = S3Scenario::new();
    let env = [
        ("SENSORLAKE_FLUSH__MAX_AGE_MS", "200"),
        ("SENSORLAKE_FLUSH__MAX_MESSAGES", "2000"),
    ];

    let mut p = sc.pipeline("kills", &env);
    let mut sim = sc.simulate(300, sent_target, seed, &["--rate", "10000"]);
    // Once at each named point of the commit protocol: a build with the `failpoints` feature
    // aborts there (as abruptly as SIGKILL) the first time a commit with files reaches it.
    for step in sensorlake_sink::failpoint::STEPS {
        p.kill9();
        let mut armed = env.to_vec();
        armed.push(("SENSORLAKE_FAILPOINT", step));
        p = sc.pipeline("kills", &armed);
        let status = p.wait_exit(Duration::from_secs(30)).unwrap_or_else(|| {
            panic!(
                "seed {seed}: sensorlake did not crash at failpoint {step} within 30 s. Was it \
                 built without the `failpoints` feature? Run `cargo test --features failpoints` \
                 (scripts/test does)"
            )
        });
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            status.signal(),
            Some(6),
            "seed {seed}: expected an abort at failpoint {step}, got {status}"
        );
        assert!(
            p.log_text().contains(&format!("failpoint {step} reached")),
            "seed {seed}: {step}"
        );
        p = sc.pipeline("kills", &env);
    }
    for _ in 0..kills {
        std::thread::sleep(Duration::from_millis(100 + rng.below(1400)));
        p.kill9();
        p = sc.pipeline("kills", &env);
    }
    assert!(
        sim.wait().unwrap().success(),
        "seed {seed}: the simulator failed"
    );
    let sent = manifest_messages(&sc.manifest);
    assert_eq!(sent, sent_target, "seed {seed}");
    let verdict = sc.verify_eventually("kills", Duration::from_secs(180));
    sc.assert_ends_clean(
        &mut p,
        "kills",
        verdict,
        &format!("seed {seed}, after {kills} SIGKILLs"),
    );
    eprintln!(
        "seed {seed}: a crash at each of {:?}, {kills} SIGKILLs, {sent} readings, exact",
        sensorlake_sink::failpoint::STEPS
    );
}

#[test]
fn a_lake_on_s3_survives_a_sigkill_and_ends_exact() {
    let sc = S3Scenario::new();
    let env = [("SENSORLAKE_FLUSH__MAX_AGE_MS", "200")];
    let mut p = sc.pipeline("site-a/lake", &env);

    const SENT: u64 = 20_000;
    let mut sim = sc.simulate(200, SENT, 31, &[]);
    wait_for("some commits on S3", Duration::from_secs(60), || {
        mirror(&sc.store, "site-a/lake", &sc.copy);
        committed_readings(&sc.copy) > 0
    });
    p.kill9();
    assert!(sim.wait().unwrap().success(), "the simulator failed");
    assert_eq!(manifest_messages(&sc.manifest), SENT);

    let mut p = sc.pipeline("site-a/lake", &env);
    let verdict = sc.verify_eventually("site-a/lake", Duration::from_secs(120));
    let report = verdict.1.clone();
    sc.assert_ends_clean(&mut p, "site-a/lake", verdict, "after a SIGKILL");

    // `verify` reads the bucket itself — configured this time by an AWS CLI profile alone
    // (`~/.aws/config` and `~/.aws/credentials`, no AWS_* variable), as `aws s3` would be.
    let home = sc.dir.path().join("home");
    std::fs::create_dir_all(home.join(".aws")).unwrap();
    std::fs::write(
        home.join(".aws/config"),
        format!(
            "[default]\nregion = eu-north-1\n\n[profile moto]\nregion = us-east-1\nendpoint_url = {}\n",
            sc.moto.endpoint
        ),
    )
    .unwrap();
    std::fs::write(
        home.join(".aws/credentials"),
        "[moto]\naws_access_key_id = test\naws_secret_access_key = test\n",
    )
    .unwrap();
    let lake = format!("s3://{}/site-a/lake", S3Scenario::BUCKET);
    let mut verify = bin();
    verify
        .args(["verify", "--lake", &lake, "--manifest"])
        .arg(&sc.manifest)
        .env("HOME", &home)
        .env("AWS_PROFILE", "moto");
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("AWS_")) {
        verify.env_remove(k);
    }
    let out = verify.output().unwrap();
    let direct = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "verify --lake {lake} exits 0 on an exact lake:\n{direct}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        report.contains(direct.trim()),
        "verify on s3:// reports what it reports on a copy:\n{direct}\nvs\n{report}"
    );
}

/// What the fault proxy does to each request.
#[derive(Debug, Default)]
struct Faults {
    /// Percent of requests answered 503 SlowDown without reaching the store.
    fail_pct: std::sync::atomic::AtomicU64,
    /// Percent of requests the store executes whose response is then lost (the connection
    /// drops): the client cannot know whether they took effect.
    lost_pct: std::sync::atomic::AtomicU64,
    /// The store is unreachable: every connection is closed at once, or answered 503.
    down: std::sync::atomic::AtomicBool,
    rng: std::sync::Mutex<u64>,
    forwarded: std::sync::atomic::AtomicU64,
    failed: std::sync::atomic::AtomicU64,
    lost: std::sync::atomic::AtomicU64,
    refused: std::sync::atomic::AtomicU64,
}

/// An HTTP proxy between sensorlake and moto that injects what no emulator does: throttling
/// and 5xx answers, lost responses and outages, by a seed. It sits below the client's retries
/// (sensorlake only sees a different `AWS_ENDPOINT_URL`), so it tests the real retry path.
/// One request per connection (`Connection: close`), which the S3 client handles as any
/// server closing idle connections.
struct FaultProxy {
    port: u16,
    faults: Arc<Faults>,
}

impl FaultProxy {
    fn start(upstream_port: u16, seed: u64) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let faults = Arc::new(Faults {
            rng: std::sync::Mutex::new(seed.max(1)),
            ..Faults::default()
        });
        let f = faults.clone();
        // Lives as long as the test process; the listener goes with it.
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let f = f.clone();
                std::thread::spawn(move || {
                    let _ = Self::serve(conn, upstream_port, &f);
                });
            }
        });
        FaultProxy { port, faults }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn roll(f: &Faults) -> u64 {
        let mut r = f.rng.lock().unwrap();
        *r ^= *r << 13;
        *r ^= *r >> 7;
        *r ^= *r << 17;
        *r % 100
    }

    fn serve(mut client: TcpStream, upstream_port: u16, f: &Faults) -> std::io::Result<()> {
        use std::sync::atomic::Ordering::Relaxed;
        // The request head, then its body by Content-Length (the S3 client sends no chunked
        // bodies; a request that does fails loudly below).
        let mut buf = Vec::new();
        let mut chunk = [0u8; 16 * 1024];
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = client.read(&mut chunk)?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let mut length = 0usize;
        let mut lines = Vec::new();
        for line in head.split("\r\n").filter(|l| !l.is_empty()) {
            let lower = line.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                length = v.trim().parse().unwrap();
            }
            assert!(
                !lower.starts_with("transfer-encoding"),
                "the fault proxy handles Content-Length bodies only: {line}"
            );
            if !lower.starts_with("connection:") {
                lines.push(line.to_owned());
            }
        }
        while buf.len() < head_end + length {
            let n = client.read(&mut chunk)?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let body = &buf[head_end..head_end + length];

        if f.down.load(Relaxed) {
            f.refused.fetch_add(1, Relaxed);
            // Half the time a dead connection, half the time the 503 of an overloaded front.
            if Self::roll(f) < 50 {
                return Ok(());
            }
            return Self::slow_down(&mut client);
        }
        let roll = Self::roll(f);
        let fail = f.fail_pct.load(Relaxed);
        if roll < fail {
            f.failed.fetch_add(1, Relaxed);
            return Self::slow_down(&mut client);
        }
        let mut upstream = TcpStream::connect(("127.0.0.1", upstream_port))?;
        let mut request = lines.join("\r\n").into_bytes();
        request.extend_from_slice(b"\r\nConnection: close\r\n\r\n");
        request.extend_from_slice(body);
        upstream.write_all(&request)?;
        let mut response = Vec::new();
        upstream.read_to_end(&mut response)?;
        if roll < fail + f.lost_pct.load(Relaxed) {
            f.lost.fetch_add(1, Relaxed);
            // Executed by the store, never answered.
            let _ = client.shutdown(std::net::Shutdown::Both);
            return Ok(());
        }
        f.forwarded.fetch_add(1, Relaxed);
        client.write_all(&response)
    }

    fn slow_down(client: &mut TcpStream) -> std::io::Result<()> {
        let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>SlowDown</Code>\
                    <Message>Please reduce your request rate.</Message></Error>";
        write!(
            client,
            "HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    }

    fn counts(&self) -> String {
        use std::sync::atomic::Ordering::Relaxed;
        format!(
            "forwarded {}, failed {}, lost {}, refused {}",
            self.faults.forwarded.load(Relaxed),
            self.faults.failed.load(Relaxed),
            self.faults.lost.load(Relaxed),
            self.faults.refused.load(Relaxed)
        )
    }
}

/// Peak RSS the pipeline may reach with the test's flush settings (2,000 messages per flush,
/// the default 8,192-message channel) whatever the store does: it holds at most one flush and
/// the channel, however many readings wait at the broker.
const RSS_BOUND: u64 = 160 << 20;

/// Flushes small and often, so that many requests meet the faults.
const FAULT_ENV: [(&str, &str); 2] = [
    ("SENSORLAKE_FLUSH__MAX_AGE_MS", "200"),
    ("SENSORLAKE_FLUSH__MAX_MESSAGES", "2000"),
];

/// 20% of requests answered 503 SlowDown and 10% executed but never answered, seeded; the
/// run must end exact, with nothing left in temporary names and memory bounded.
#[test]
fn a_lake_on_s3_ends_exact_with_30pct_of_requests_failing() {
    use std::sync::atomic::Ordering::Relaxed;
    let seed = env_u64("SENSORLAKE_TEST_SEED", 20261127);
    let sc = S3Scenario::new();
    let proxy = FaultProxy::start(sc.moto.port, seed);
    proxy.faults.fail_pct.store(20, Relaxed);
    proxy.faults.lost_pct.store(10, Relaxed);
    let endpoint = proxy.endpoint();
    let mut env = vec![("AWS_ENDPOINT_URL", endpoint.as_str())];
    env.extend_from_slice(&FAULT_ENV);
    let mut p = sc.pipeline("flaky", &env);

    const SENT: u64 = 30_000;
    let mut sim = sc.simulate(200, SENT, seed, &["--rate", "5000"]);
    assert!(
        sim.wait().unwrap().success(),
        "seed {seed}: the simulator failed"
    );
    let verdict = sc.verify_eventually("flaky", Duration::from_secs(180));
    let peak = p.peak_rss();
    let counts = proxy.counts();
    let log = p.log_text();
    let (failed_commits, reopened) = (
        log.matches("Commit failed").count(),
        log.matches("Lake reopened").count(),
    );
    sc.assert_ends_clean(
        &mut p,
        "flaky",
        verdict,
        &format!("seed {seed}, 30% of requests failing ({counts})"),
    );
    assert!(
        proxy.faults.failed.load(Relaxed) >= 50 && proxy.faults.lost.load(Relaxed) >= 20,
        "seed {seed}: too few faults injected to mean anything: {counts}"
    );
    assert!(
        peak < RSS_BOUND,
        "seed {seed}: peak RSS {} MiB over the {} MiB bound",
        peak >> 20,
        RSS_BOUND >> 20
    );
    eprintln!(
        "seed {seed}: 30% faults ({counts}; {failed_commits} commits failed and were retried, \
         {reopened} reopened the lake), {SENT} readings exact, peak RSS {} MiB",
        peak >> 20
    );
}

/// The store is unreachable for a minute (`SENSORLAKE_TEST_OUTAGE_SECS`, default 60) while
/// readings keep arriving: nothing is acknowledged, memory stays bounded, and once the store
/// is back every reading lands exactly once.
#[test]
fn a_lake_on_s3_rides_out_a_store_outage_with_bounded_memory() {
    use std::sync::atomic::Ordering::Relaxed;
    let outage = Duration::from_secs(env_u64("SENSORLAKE_TEST_OUTAGE_SECS", 60));
    let sc = S3Scenario::new();
    let proxy = FaultProxy::start(sc.moto.port, 7);
    let endpoint = proxy.endpoint();
    let mut env = vec![("AWS_ENDPOINT_URL", endpoint.as_str())];
    env.extend_from_slice(&FAULT_ENV);
    let mut p = sc.pipeline("outage", &env);

    // 2,000 readings a second: some before the outage, most during it, the rest after.
    let sent = 2_000 * (outage.as_secs() + 10);
    let mut sim = sc.simulate(300, sent, 41, &["--rate", "2000"]);
    std::thread::sleep(Duration::from_secs(3));
    proxy.faults.down.store(true, Relaxed);
    let before = mirror(&sc.store, "outage", &sc.copy);
    std::thread::sleep(outage);
    let during = mirror(&sc.store, "outage", &sc.copy);
    let peak_during = p.peak_rss();
    proxy.faults.down.store(false, Relaxed);
    assert!(sim.wait().unwrap().success(), "the simulator failed");
    assert_eq!(manifest_messages(&sc.manifest), sent);

    let verdict = sc.verify_eventually("outage", Duration::from_secs(180));
    let peak = p.peak_rss();
    let counts = proxy.counts();
    assert_eq!(
        before, during,
        "nothing can be written while the store is down ({counts})"
    );
    assert!(
        proxy.faults.refused.load(Relaxed) > 0,
        "the pipeline kept trying during the outage: {counts}"
    );
    sc.assert_ends_clean(
        &mut p,
        "outage",
        verdict,
        &format!("after a {outage:?} outage ({counts})"),
    );
    assert!(
        peak < RSS_BOUND,
        "peak RSS {} MiB (during the outage {} MiB) over the {} MiB bound",
        peak >> 20,
        peak_during >> 20,
        RSS_BOUND >> 20
    );
    eprintln!(
        "{outage:?} outage ({counts}): {sent} readings exact, peak RSS {} MiB (during the outage {} MiB)",
        peak >> 20,
        peak_during >> 20
    );
}

/// Every file under `dir`, relative to it.
fn walk_names(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.path().is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path().strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out
}

/// `--lake az://container/prefix`, configured only by the standard Azure variables (here the
/// emulator's), through a SIGKILL; `verify --lake az://…` reads the container directly.
#[test]
fn a_lake_on_azure_blob_survives_a_sigkill_and_verifies_in_place() {
    let azurite = Azurite::start("lake");
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("manifest.json");
    let env = azurite.env();
    let mut all: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    all.push(("SENSORLAKE_FLUSH__MAX_AGE_MS", "200"));
    let (url, lake) = (broker.url(), "az://lake/telemetry-lake");
    let args = ["--mqtt", url.as_str(), "--lake", lake];
    let log = dir.path().join("pipeline.log");
    let mut p = Pipeline::start(&args, &log, &all);

    const SENT: u64 = 10_000;
    let mut sim = bin()
        .args(simulate_args(&url, 100, SENT, 0.02, 43, &manifest, &[]))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    p.kill9();
    let mut p = Pipeline::start(&args, &log, &all);
    assert!(sim.wait().unwrap().success(), "the simulator failed");

    let verify_in_place = || {
        let out = bin()
            .args(["verify", "--lake", lake, "--manifest"])
            .arg(&manifest)
            .envs(azurite.env())
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let started = Instant::now();
    let (exact, report) = loop {
        let (exact, report) = verify_in_place();
        if exact || started.elapsed() > Duration::from_secs(120) {
            break (exact, report);
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(
        p.terminate().success(),
        "SIGTERM must exit 0:\n{}",
        p.log_text()
    );
    assert!(
        exact,
        "after a SIGKILL the Azure lake holds every reading once:\n{report}\n{}",
        p.log_text()
    );
}
