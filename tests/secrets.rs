//! Secrets stay secret: sentinel values as the MQTT password (from the environment and from
//! `password_file`), as the AWS secret key of an S3 lake, and as the contents of client key
//! files, with `RUST_LOG=trace` and both log formats, through a run that succeeds (mutual TLS
//! plus username and password, lake on S3 as moto serves it), refused passwords, a broker that
//! is down, bad TLS files at start-up, and `config check`. No sentinel and no line of a key
//! may appear in any log line, any error, stdout, or any byte of any file in the lake.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::certs::Certs;
use common::*;
use futures_util::TryStreamExt;
use object_store::{ObjectStore, ObjectStoreExt};
use sensorlake_testkit::Moto;

/// The broker's password for user `sensorlake`, given through `SENSORLAKE_MQTT__PASSWORD`.
const PASSWORD_OK: &str = "SLSENTINEL-password-env-7f3a9c51";
/// A wrong password, through the environment.
const PASSWORD_ENV_WRONG: &str = "SLSENTINEL-password-env-wrong-2b8e41";
/// A wrong password, through `mqtt.password_file`.
const PASSWORD_FILE_WRONG: &str = "SLSENTINEL-password-file-91c0de";
/// The S3 lake's `AWS_SECRET_ACCESS_KEY`.
const AWS_SECRET: &str = "SLSENTINEL-aws-secret-key-5d17aa";
/// The body of a key file that is not a usable key.
const KEY_BODY: &str = "SLSENTINELkeyMaterial0c0ffee0badc0de";

const BUCKET: &str = "lake";

/// A `sensorlake` process with stdout and stderr captured to files.
struct Run {
    name: String,
    child: Option<Child>,
    out: PathBuf,
    err: PathBuf,
}

impl Run {
    /// Starts `sensorlake ARGS` with `env` (RUST_LOG=trace unless `env` says otherwise).
    fn start(dir: &Path, name: &str, args: &[&str], env: &[(&str, &str)]) -> Run {
        let out = dir.join(format!("{name}.stdout"));
        let err = dir.join(format!("{name}.stderr"));
        let mut cmd = bin();
        cmd.env("RUST_LOG", "trace")
            .env_remove("SENSORLAKE_MQTT__PASSWORD")
            .args(args)
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .stdin(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        Run {
            name: name.into(),
            child: Some(cmd.spawn().unwrap()),
            out,
            err,
        }
    }

    fn stderr(&self) -> String {
        read(&self.err)
    }

    /// Waits until stderr contains every one of `needles`.
    fn wait_for(&self, needles: &[&str]) {
        let start = Instant::now();
        loop {
            let text = self.stderr();
            if needles.iter().all(|n| text.contains(n)) {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{}: {needles:?} not logged within 30 s:\n{}",
                self.name,
                tail(&text)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the process to exit by itself; its exit code.
    fn exit_code(&mut self) -> i32 {
        let status = self.child.take().unwrap().wait().unwrap();
        status.code().unwrap_or(-1)
    }

    /// SIGKILL, if it still runs.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait.
    fn terminate(&mut self) -> i32 {
        let mut c = self.child.take().unwrap();
        signal(c.id(), "TERM");
        c.wait().unwrap().code().unwrap_or(-1)
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The last lines of a log, for failure messages (trace logs are long).
fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Copies every object of the bucket into `dir`; returns how many.
fn mirror(store: &Arc<dyn ObjectStore>, dir: &Path) -> usize {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let objects: Vec<_> = rt
        .block_on(store.list(None).try_collect::<Vec<_>>())
        .unwrap();
    for o in &objects {
        let Ok(bytes) = rt.block_on(async { store.get(&o.location).await?.bytes().await }) else {
            continue; // renamed or removed since the listing
        };
        let path = dir.join(o.location.to_string());
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
    objects.len()
}

/// Every file under `dir`, recursively.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// The first of `needles` found in the bytes of the file at `path`.
fn leaked(path: &Path, needles: &[String]) -> Option<String> {
    let bytes = std::fs::read(path).unwrap();
    needles
        .iter()
        .find(|n| bytes.windows(n.len()).any(|w| w == n.as_bytes()))
        .cloned()
}

/// The base64 lines of a PEM key file: any one of them in an output means the key leaked.
fn key_lines(path: &Path) -> Vec<String> {
    read(path)
        .lines()
        .filter(|l| !l.starts_with("-----") && l.len() >= 16)
        .map(str::to_owned)
        .collect()
}

#[test]
fn sentinel_secrets_appear_in_no_log_no_error_no_output_and_no_lake_file() {
    let certs = Certs::generate();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    // The broker: the plain listener for the simulator (anonymous), and a TLS listener that
    // wants a client certificate *and* a username and password.
    let passwd = d.join("mosquitto.passwd");
    let made = std::process::Command::new("mosquitto_passwd")
        .args(["-b", "-c"])
        .arg(&passwd)
        .args(["sensorlake", PASSWORD_OK])
        .output()
        .unwrap_or_else(|e| {
            panic!("mosquitto_passwd (Debian package mosquitto; scripts/test installs it): {e}")
        });
    assert!(made.status.success(), "{made:?}");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&passwd, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let broker = Mosquitto::start_with_second_listener(
        &format!(
            "per_listener_settings true\n{}",
            sensorlake::bench::MOSQUITTO_SETTINGS
        ),
        &certs.mosquitto_listener(&format!(
            "require_certificate true\npassword_file {}\nallow_anonymous false",
            passwd.display()
        )),
    );
    let tls_url = format!("mqtts://localhost:{}", broker.second_port);

    let password_file = d.join("password");
    std::fs::write(&password_file, format!("{PASSWORD_FILE_WRONG}\n")).unwrap();
    let bad_key = d.join("bad.key");
    std::fs::write(
        &bad_key,
        format!("-----BEGIN PRIVATE KEY-----\n{KEY_BODY}\n-----END PRIVATE KEY-----\n"),
    )
    .unwrap();
    let config = |name: &str, url: &str, with_password_file: bool, key: &Path, cert: &str| {
        let mut text = format!("[mqtt]\nurl = {url:?}\nusername = \"sensorlake\"\n");
        if with_password_file {
            text.push_str(&format!("password_file = {password_file:?}\n"));
        }
        text.push_str(&format!(
            "[mqtt.tls]\nca_file = {:?}\nclient_cert_file = {:?}\nclient_key_file = {key:?}\n",
            certs.file("ca.pem"),
            certs.file(cert),
        ));
        let path = d.join(format!("{name}.toml"));
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let client_key = certs.path("client.key");
    let lake = |name: &str| d.join(format!("lake-{name}")).to_str().unwrap().to_owned();
    let mut runs = Vec::new();

    // 1. Success: mutual TLS + password from the environment (password_file set too: the
    //    environment wins), lake on S3 with a sentinel secret key, trace logging.
    let moto = Moto::start(BUCKET);
    let mut aws: Vec<(&str, String)> = moto.env();
    for (k, v) in &mut aws {
        if *k == "AWS_SECRET_ACCESS_KEY" {
            *v = AWS_SECRET.into();
        }
    }
    let mut env: Vec<(&str, &str)> = aws.iter().map(|(k, v)| (*k, v.as_str())).collect();
    env.push(("SENSORLAKE_MQTT__PASSWORD", PASSWORD_OK));
    env.push(("SENSORLAKE_FLUSH__MAX_AGE_MS", "200"));
    let ok_config = config("ok", &tls_url, true, &client_key, "client.pem");
    let s3_lake = format!("s3://{BUCKET}/lake");
    let mut ok = Run::start(
        d,
        "ok",
        &["run", "-c", &ok_config, "--lake", &s3_lake],
        &env,
    );
    ok.wait_for(&["Subscribed to MQTT topics"]);
    let manifest = d.join("manifest.json");
    simulate(&broker.url(), 20, 500, 0.05, 3, &manifest);
    let sent = manifest_messages(&manifest);
    let store: Arc<dyn ObjectStore> = Arc::new(moto.store(BUCKET));
    let copy = d.join("s3-copy");
    let start = Instant::now();
    while committed_readings(&copy.join("lake")) < sent {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the readings did not reach the S3 lake:\n{}",
            tail(&ok.stderr())
        );
        std::thread::sleep(Duration::from_millis(200));
        mirror(&store, &copy);
    }
    assert_eq!(ok.terminate(), 0, "{}", tail(&ok.stderr()));
    let _ = std::fs::remove_dir_all(&copy);
    assert!(mirror(&store, &copy) > 0);
    runs.push(ok);

    // 2. A wrong password from the environment: refused, JSON logs.
    let refused_env = config("refused-env", &tls_url, false, &client_key, "client.pem");
    let r = Run::start(
        d,
        "refused-env",
        &[
            "--log-format",
            "json",
            "run",
            "-c",
            &refused_env,
            "--lake",
            &lake("refused-env"),
        ],
        &[("SENSORLAKE_MQTT__PASSWORD", PASSWORD_ENV_WRONG)],
    );
    r.wait_for(&[
        "MQTT connection failed",
        "the broker refused the connection",
    ]);
    runs.push(r);

    // 3. A wrong password from password_file: refused, text logs.
    let refused_file = config("refused-file", &tls_url, true, &client_key, "client.pem");
    let r = Run::start(
        d,
        "refused-file",
        &["run", "-c", &refused_file, "--lake", &lake("refused-file")],
        &[],
    );
    r.wait_for(&[
        "MQTT connection failed",
        "the broker refused the connection",
    ]);
    runs.push(r);

    // 4. The broker is down (nothing listens on the port), both secrets configured.
    let down = config(
        "down",
        &format!("mqtts://localhost:{}", free_port()),
        true,
        &client_key,
        "client.pem",
    );
    for format in ["text", "json"] {
        let name = format!("down-{format}");
        let r = Run::start(
            d,
            &name,
            &[
                "--log-format",
                format,
                "run",
                "-c",
                &down,
                "--lake",
                &lake(&name),
            ],
            &[("SENSORLAKE_MQTT__PASSWORD", PASSWORD_OK)],
        );
        r.wait_for(&["MQTT connection failed"]);
        runs.push(r);
    }

    // 5. Bad TLS files at start-up: a key file that is not a key, and a real key that is not
    //    the certificate's. Both stop the start with exit code 2.
    let bad = config("bad-key", &tls_url, true, &bad_key, "client.pem");
    let mismatch = config(
        "mismatch",
        &tls_url,
        true,
        &certs.path("rogue.key"),
        "client.pem",
    );
    for (name, cfg, expected) in [
        ("bad-key", &bad, "mqtt.tls.client_key_file"),
        ("mismatch", &mismatch, "does not belong to the certificate"),
    ] {
        for format in ["text", "json"] {
            let name = format!("{name}-{format}");
            let mut r = Run::start(
                d,
                &name,
                &[
                    "--log-format",
                    format,
                    "run",
                    "-c",
                    cfg,
                    "--lake",
                    &lake(&name),
                ],
                &[("SENSORLAKE_MQTT__PASSWORD", PASSWORD_OK)],
            );
            assert_eq!(r.exit_code(), 2, "{name}: {}", r.stderr());
            assert!(r.stderr().contains(expected), "{name}: {}", r.stderr());
            runs.push(r);
        }
    }

    // 6. Everything that prints the effective configuration.
    for (name, cfg) in [("check-ok", &ok_config), ("check-refused", &refused_file)] {
        let mut r = Run::start(
            d,
            name,
            &["config", "check", "-c", cfg],
            &[("SENSORLAKE_MQTT__PASSWORD", PASSWORD_OK)],
        );
        assert_eq!(r.exit_code(), 0, "{name}: {}", r.stderr());
        assert!(read(&r.out).contains("[mqtt.tls]"), "{}", read(&r.out));
        runs.push(r);
    }
    for r in &mut runs {
        r.kill();
    }
    drop(broker);

    // The scan. The sentinels must be in what the runs were given, so that their absence from
    // what came out means something.
    assert!(read(&password_file).contains(PASSWORD_FILE_WRONG));
    let mut needles: Vec<String> = [
        PASSWORD_OK,
        PASSWORD_ENV_WRONG,
        PASSWORD_FILE_WRONG,
        AWS_SECRET,
        KEY_BODY,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for key in ["client.key", "rogue.key"] {
        let lines = key_lines(&certs.path(key));
        assert!(!lines.is_empty(), "{key} has a body");
        needles.extend(lines);
    }
    let mut scanned = Vec::new();
    for r in &runs {
        scanned.push(r.out.clone());
        scanned.push(r.err.clone());
        scanned.extend(files(Path::new(&lake(&r.name))));
    }
    let lake_files = files(&copy);
    assert!(
        lake_files
            .iter()
            .any(|p| p.extension().is_some_and(|e| e == "parquet")),
        "the S3 lake has Parquet files to scan"
    );
    scanned.extend(lake_files);
    // The scanner finds what it looks for: in the files the secrets came from.
    assert_eq!(
        leaked(&password_file, &needles).as_deref(),
        Some(PASSWORD_FILE_WRONG)
    );
    assert!(leaked(&certs.path("client.key"), &needles).is_some());
    let mut log_lines = 0usize;
    for path in &scanned {
        log_lines += read(path).lines().count();
        if let Some(n) = leaked(path, &needles) {
            panic!("a secret ({}…) appears in {}", &n[..12], path.display());
        }
    }
    // Trace logging was on, and the JSON runs wrote JSON: there was plenty to leak into.
    assert!(
        runs[0].stderr().contains("TRACE"),
        "{}",
        tail(&runs[0].stderr())
    );
    // (Start-up errors are printed as plain text whatever the log format.)
    for r in runs
        .iter()
        .filter(|r| ["refused-env", "down-json"].contains(&r.name.as_str()))
    {
        assert!(r.stderr().starts_with('{'), "{}: {}", r.name, r.stderr());
    }
    assert!(log_lines > 200, "only {log_lines} lines scanned");
}
