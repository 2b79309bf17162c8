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
        let started = Instant::now();
        let mut stream = loop {
            match TcpStream::connect(("127.0.0.1", port)) {
                Ok(s) => break s,
                Err(e) if started.elapsed() > Duration::from_secs(30) => {
                    panic!("moto_server did not listen on 127.0.0.1:{port} within 30 s: {e}")
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        write!(
            stream,
            "PUT /{bucket} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut reply = String::new();
        let _ = stream.read_to_string(&mut reply);
        assert!(reply.starts_with("HTTP/1.1 200"), "CreateBucket: {reply}");
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
    wait_for("every reading on S3", Duration::from_secs(120), || {
        committed(&copy) >= SENT
    });
    assert!(
        p.terminate().success(),
        "SIGTERM must exit 0:\n{}",
        p.log_text()
    );
    mirror(&store, "site-a/lake", &copy);
    let (exact, report) = verify(&copy, &manifest);
    assert!(
        exact,
        "after a SIGKILL the S3 lake holds every reading once:\n{report}"
    );
    let stray = std::fs::read_dir(copy.join("_sensorlake/tmp/w0"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(stray, 0, "no temporary objects are left behind");
}
