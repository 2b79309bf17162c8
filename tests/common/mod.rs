//! Shared helpers for integration tests: a real Mosquitto broker on a free loopback port with
//! the project's own configuration, and the `sensorlake` binary run as a user runs it.
//!
//! Everything a test starts is stopped when its handle drops.

#![allow(dead_code, clippy::unwrap_used)]

pub mod certs;

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

fn mosquitto_binary() -> PathBuf {
    sensorlake::bench::mosquitto_binary().unwrap_or_else(|| {
        panic!(
            "mosquitto is not installed: these tests need the real broker. Install it with \
             `apt-get install mosquitto` (scripts/test does this for you)."
        )
    })
}

/// A free TCP port on 127.0.0.1 (bound, read, released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until `cond` holds, panicking with `what` after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A Mosquitto broker owned by a test.
pub struct Mosquitto {
    pub port: u16,
    /// The second listener's port (see [`Mosquitto::start_with_second_listener`]), else 0.
    pub second_port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    extra: String,
    /// Settings of the second listener, if any.
    second: Option<String>,
}

impl Mosquitto {
    /// Starts Mosquitto with the project's configuration.
    pub fn start() -> Self {
        Self::start_with(sensorlake::bench::MOSQUITTO_SETTINGS)
    }

    /// Starts Mosquitto with `conf` (a listener and persistence location are added).
    pub fn start_with(conf: &str) -> Self {
        Self::start_inner(conf, None)
    }

    /// Starts Mosquitto with `conf` for the plain listener (as [`Mosquitto::start_with`]) and
    /// a second listener on its own free loopback port ([`Mosquitto::second_port`]) configured
    /// by `second` (e.g. `cafile`, `certfile`, `keyfile` for TLS). With `per_listener_settings
    /// true` in `conf`, authentication settings apply per listener.
    pub fn start_with_second_listener(conf: &str, second: &str) -> Self {
        Self::start_inner(conf, Some(second.to_owned()))
    }

    fn start_inner(conf: &str, second: Option<String>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        // Mosquitto started as root drops to the `mosquitto` user: let it write its
        // persistence file here.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        }
        let mut m = Mosquitto {
            port: 0,
            second_port: 0,
            dir,
            child: None,
            extra: conf.to_owned(),
            second,
        };
        for _ in 0..5 {
            m.port = free_port();
            if m.second.is_some() {
                m.second_port = free_port();
            }
            if m.spawn() {
                return m;
            }
        }
        panic!(
            "mosquitto failed to start 5 times; see {}",
            m.log_path().display()
        );
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("mosquitto.log")
    }

    fn spawn(&mut self) -> bool {
        let conf = self.dir.path().join("mosquitto.conf");
        let mut text = format!(
            "listener {} 127.0.0.1\npersistence_location {}/\n{}",
            self.port,
            self.dir.path().display(),
            self.extra
        );
        if let Some(second) = &self.second {
            text.push_str(&format!(
                "\nlistener {} 127.0.0.1\n{second}\n",
                self.second_port
            ));
        }
        std::fs::write(&conf, text).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let child = Command::new(mosquitto_binary())
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("failed to run mosquitto");
        self.child = Some(child);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok()
                && (self.second.is_none()
                    || TcpStream::connect(("127.0.0.1", self.second_port)).is_ok())
            {
                return true;
            }
            if let Some(Ok(Some(_))) = self.child.as_mut().map(|c| c.try_wait()) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// The broker's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// `mqtt://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// Stops the broker (SIGTERM, so it saves its persistence file) and starts it again on the
    /// same port with the same state.
    pub fn restart(&mut self) {
        self.stop();
        assert!(
            self.spawn(),
            "mosquitto did not come back on port {}",
            self.port
        );
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(c.id(), "TERM");
            let start = Instant::now();
            while c.try_wait().unwrap().is_none() {
                if start.elapsed() > Duration::from_secs(10) {
                    let _ = c.kill();
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Sends a signal by name to a process.
pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

/// The `sensorlake` binary under test.
pub fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sensorlake"));
    c.env("RUST_LOG", "info");
    c.env_remove("SENSORLAKE_MQTT__URL");
    c
}

/// A running `sensorlake run`, its stderr captured to a file.
pub struct Pipeline {
    child: Option<Child>,
    pub log: PathBuf,
}

impl Pipeline {
    /// Starts `sensorlake run ARGS`, logging to `log`, and waits until it has subscribed.
    pub fn start(args: &[&str], log: &Path, env: &[(&str, &str)]) -> Self {
        Self::start_until(args, log, env, "Subscribed to MQTT topics")
    }

    /// Starts `sensorlake run ARGS`, logging to `log`, and waits until its log (what this
    /// process appended) contains `ready`.
    pub fn start_until(args: &[&str], log: &Path, env: &[(&str, &str)], ready: &str) -> Self {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let mut cmd = bin();
        cmd.arg("run").args(args).stdout(Stdio::null()).stderr(file);
        for (k, v) in env {
            cmd.env(k, v);
        }
        // The log is shared by restarts: only what this process appends counts.
        let offset = std::fs::metadata(log).map_or(0, |m| m.len() as usize);
        let child = cmd.spawn().unwrap();
        let p = Pipeline {
            child: Some(child),
            log: log.to_owned(),
        };
        let start = Instant::now();
        loop {
            let text = std::fs::read(log).unwrap_or_default();
            let ours = String::from_utf8_lossy(text.get(offset..).unwrap_or_default());
            if ours.contains(ready) {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "sensorlake did not log {ready:?} within 30 s; its log:\n{ours}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        p
    }

    /// The process id of the running pipeline.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the pipeline is running").id()
    }

    /// Peak resident memory so far (VmHWM), in bytes.
    pub fn peak_rss(&self) -> u64 {
        sensorlake::bench::peak_rss_bytes(self.pid()).unwrap()
    }

    /// SIGKILL: no shutdown, no flush, no acknowledgement.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, and the exit status once it has stopped.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("the pipeline is running");
        signal(c.id(), "TERM");
        let start = Instant::now();
        loop {
            if let Some(s) = c.try_wait().unwrap() {
                return s;
            }
            if start.elapsed() > Duration::from_secs(60) {
                let _ = c.kill();
                panic!(
                    "sensorlake did not stop within 60 s of SIGTERM; log: {}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits up to `timeout` for the process to end by itself; its exit status, or `None` if
    /// it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let c = self.child.as_mut().expect("the pipeline is running");
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Some(s) = c.try_wait().unwrap() {
                self.child = None;
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Runs a `sensorlake` subcommand to completion.
pub fn run_cmd(args: &[&str]) -> Output {
    bin().args(args).output().unwrap()
}

/// Readings committed to the lake so far (sum of `counts.received` of all commit records).
pub fn committed_readings(lake: &Path) -> u64 {
    match sensorlake_sink::read_commit_records(lake) {
        Ok(records) => records.iter().map(|r| r.counts.received).sum(),
        Err(_) => 0,
    }
}

/// Reads a whole file as a string (empty when missing).
pub fn read(path: &Path) -> String {
    let mut s = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let _ = f.read_to_string(&mut s);
    }
    s
}

/// The arguments of `sensorlake simulate` for a seeded fleet; extra flags are appended.
pub fn simulate_args(
    url: &str,
    devices: u32,
    readings: u64,
    bad_ratio: f64,
    seed: u64,
    manifest: &Path,
    extra: &[&str],
) -> Vec<String> {
    let mut args: Vec<String> = [
        "simulate",
        "--mqtt",
        url,
        "--devices",
        &devices.to_string(),
        "--readings",
        &readings.to_string(),
        "--bad-ratio",
        &bad_ratio.to_string(),
        "--seed",
        &seed.to_string(),
        "--manifest",
        manifest.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Runs `sensorlake simulate` to completion and asserts it succeeded.
pub fn simulate(
    url: &str,
    devices: u32,
    readings: u64,
    bad_ratio: f64,
    seed: u64,
    manifest: &Path,
) {
    let args = simulate_args(url, devices, readings, bad_ratio, seed, manifest, &[]);
    let out = bin().args(&args).output().unwrap();
    assert!(
        out.status.success(),
        "sensorlake simulate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `sensorlake verify`: whether it was exact, and its report.
pub fn verify(lake: &Path, manifest: &Path) -> (bool, String) {
    let out = run_cmd(&[
        "verify",
        "--lake",
        lake.to_str().unwrap(),
        "--manifest",
        manifest.to_str().unwrap(),
    ]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Runs `verify` every half second until it is exact or `timeout` passes (redeliveries after
/// a restart arrive at the broker's pace); returns the last result.
pub fn verify_eventually(lake: &Path, manifest: &Path, timeout: Duration) -> (bool, String) {
    let start = Instant::now();
    loop {
        let (exact, report) = verify(lake, manifest);
        if exact || start.elapsed() >= timeout {
            return (exact, report);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The number of messages a manifest says the broker confirmed.
pub fn manifest_messages(path: &Path) -> u64 {
    let v: serde_json::Value = serde_json::from_str(&read(path)).unwrap();
    v["messages"].as_u64().unwrap()
}

/// Scrapes `/metrics` and returns the value of one sample (summing over label sets).
pub fn metric(addr: &str, name: &str) -> f64 {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split([' ', '{']).next() == Some(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// What most end-to-end tests start from: a Mosquitto broker, a scratch folder, and the lake
/// and manifest paths inside it.
pub struct Scenario {
    pub broker: Mosquitto,
    pub dir: tempfile::TempDir,
    pub lake: PathBuf,
    pub manifest: PathBuf,
}

impl Scenario {
    /// A broker with the project's settings and an empty scratch folder.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        Scenario {
            lake: dir.path().join("lake"),
            manifest: dir.path().join("manifest.json"),
            broker: Mosquitto::start(),
            dir,
        }
    }

    /// `sensorlake run --mqtt <broker> --lake <lake> EXTRA...`, logging to
    /// `<dir>/<name>.log`, subscribed when this returns.
    pub fn pipeline(&self, name: &str, extra: &[&str], env: &[(&str, &str)]) -> Pipeline {
        let url = self.broker.url();
        let mut args = vec!["--mqtt", &url, "--lake", self.lake.to_str().unwrap()];
        args.extend_from_slice(extra);
        Pipeline::start(&args, &self.dir.path().join(format!("{name}.log")), env)
    }
}
