//! The pipeline with its lake on S3, as `moto_server` (PyPI `moto[server]`) serves it on a
//! free loopback port: MQTT in through Mosquitto, `--lake s3://bucket/prefix` configured only
//! by the standard AWS environment variables, a SIGKILL mid-stream, and `verify` exact on a
//! copy of the bucket.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use futures_util::TryStreamExt;
use object_store::{ObjectStore, ObjectStoreExt};

/// `moto_server` on a free port with one bucket, killed when dropped.
struct Moto {
    child: Child,
    endpoint: String,
}

impl Moto {
    fn start(bucket: &str) -> Self {
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
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        // Moto may accept connections before it serves them: retry CreateBucket (one plain,
        // unsigned PUT; moto does not check signatures) until it answers 200.
        let started = Instant::now();
        loop {
            let reply = TcpStream::connect(("127.0.0.1", port)).and_then(|mut stream| {
                write!(
                    stream,
                    "PUT /{bucket} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                )?;
                let mut reply = String::new();
                stream.read_to_string(&mut reply)?;
                Ok(reply)
            });
            match reply {
                Ok(r) if r.starts_with("HTTP/1.1 200") => break,
                other if started.elapsed() > Duration::from_secs(30) => {
                    panic!(
                        "moto_server on 127.0.0.1:{port} did not create bucket {bucket} within 30 s: {other:?}"
                    )
                }
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
        moto
    }

    /// The environment that points sensorlake (and the AWS CLI) at this server.
    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ACCESS_KEY_ID", "test".into()),
            ("AWS_SECRET_ACCESS_KEY", "test".into()),
        ]
    }

    fn store(&self, bucket: &str) -> Arc<dyn ObjectStore> {
        Arc::new(
            object_store::aws::AmazonS3Builder::new()
                .with_endpoint(&self.endpoint)
                .with_allow_http(true)
                .with_bucket_name(bucket)
                .with_region("us-east-1")
                .with_access_key_id("test")
                .with_secret_access_key("test")
                .build()
                .unwrap(),
        )
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

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
            store: moto.store(Self::BUCKET),
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

    /// Temporary objects of writer w0 in the last copy.
    fn stray_tmp(&self) -> usize {
        std::fs::read_dir(self.copy.join("_sensorlake/tmp/w0"))
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

/// SIGKILLs at seeded random moments while readings stream in and while the backlog drains,
/// each followed by a restart, then `verify` must be exact: nothing lost, nothing twice, every
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
    let (exact, report) = sc.verify_eventually("kills", Duration::from_secs(180));
    assert!(
        p.terminate().success(),
        "seed {seed}: SIGTERM must exit 0:\n{}",
        p.log_text()
    );
    assert!(
        exact,
        "seed {seed}: after {kills} SIGKILLs the S3 lake holds every reading once:\n{report}"
    );
    assert_eq!(
        sc.stray_tmp(),
        0,
        "seed {seed}: temporary objects left behind"
    );
    eprintln!("seed {seed}: {kills} SIGKILLs, {sent} readings, exact");
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
    let (exact, report) = sc.verify_eventually("site-a/lake", Duration::from_secs(120));
    assert!(
        p.terminate().success(),
        "SIGTERM must exit 0:\n{}",
        p.log_text()
    );
    assert!(
        exact,
        "after a SIGKILL the S3 lake holds every reading once:\n{report}"
    );
    assert_eq!(sc.stray_tmp(), 0, "no temporary objects are left behind");
}
