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
    let moto = Moto::start("telemetry-lake");
    let store = moto.store("telemetry-lake");
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let (copy, manifest) = (dir.path().join("copy"), dir.path().join("manifest.json"));
    let env_owned = moto.env();
    let mut env: Vec<(&str, &str)> = env_owned.iter().map(|(k, v)| (*k, v.as_str())).collect();
    env.push(("SENSORLAKE_FLUSH__MAX_AGE_MS", "200"));
    env.push(("SENSORLAKE_FLUSH__MAX_MESSAGES", "2000"));
    let url = broker.url();
    let args = ["--mqtt", &url, "--lake", "s3://telemetry-lake/kills"];
    let log = dir.path().join("pipeline.log");

    let mut p = Pipeline::start(&args, &log, &env);
    let mut sim = bin()
        .args(simulate_args(
            &url,
            300,
            sent_target,
            0.02,
            seed,
            &manifest,
            &["--rate", "10000"],
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..kills {
        std::thread::sleep(Duration::from_millis(100 + rng.below(1400)));
        p.kill9();
        p = Pipeline::start(&args, &log, &env);
    }
    assert!(
        sim.wait().unwrap().success(),
        "seed {seed}: the simulator failed"
    );
    let sent = manifest_messages(&manifest);
    assert_eq!(sent, sent_target, "seed {seed}");
    let (exact, report) =
        verify_s3_eventually(&store, "kills", &copy, &manifest, Duration::from_secs(180));
    assert!(
        p.terminate().success(),
        "seed {seed}: SIGTERM must exit 0:\n{}",
        p.log_text()
    );
    assert!(
        exact,
        "seed {seed}: after {kills} SIGKILLs the S3 lake holds every reading once:\n{report}"
    );
    let stray = std::fs::read_dir(copy.join("_sensorlake/tmp/w0"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(stray, 0, "seed {seed}: temporary objects left behind");
    eprintln!("seed {seed}: {kills} SIGKILLs, {sent} readings, exact");
}

#[test]
fn a_lake_on_s3_survives_a_sigkill_and_ends_exact() {
    let moto = Moto::start("telemetry-lake");
    let store = moto.store("telemetry-lake");
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let (copy, manifest) = (dir.path().join("copy"), dir.path().join("manifest.json"));
    let env_owned = moto.env();
    let mut env: Vec<(&str, &str)> = env_owned.iter().map(|(k, v)| (*k, v.as_str())).collect();
    env.push(("SENSORLAKE_FLUSH__MAX_AGE_MS", "200"));
    let url = broker.url();
    let args = ["--mqtt", &url, "--lake", "s3://telemetry-lake/site-a/lake"];
    let log = dir.path().join("pipeline.log");
    let mut p = Pipeline::start(&args, &log, &env);

    const SENT: u64 = 20_000;
    let sim = bin()
        .args(simulate_args(&url, 200, SENT, 0.02, 31, &manifest, &[]))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let committed = |copy: &Path| {
        mirror(&store, "site-a/lake", copy);
        committed_readings(copy)
    };
    wait_for("some commits on S3", Duration::from_secs(60), || {
        committed(&copy) > 0
    });
    p.kill9();
    let mut sim = sim;
    assert!(sim.wait().unwrap().success(), "the simulator failed");
    assert_eq!(manifest_messages(&manifest), SENT);

    let mut p = Pipeline::start(&args, &log, &env);
    let (exact, report) = verify_s3_eventually(
        &store,
        "site-a/lake",
        &copy,
        &manifest,
        Duration::from_secs(120),
    );
    assert!(
        p.terminate().success(),
        "SIGTERM must exit 0:\n{}",
        p.log_text()
    );
    assert!(
        exact,
        "after a SIGKILL the S3 lake holds every reading once:\n{report}"
    );
    let stray = std::fs::read_dir(copy.join("_sensorlake/tmp/w0"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(stray, 0, "no temporary objects are left behind");
}
