//! End-to-end tests through a real Mosquitto broker and the real `sensorlake` binary:
//! exactness, ack-after-commit across SIGKILL, 100 % bad input, a broker restart, the demo,
//! and the lake read by DuckDB and pyarrow.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Writes the fleet's registry CSV (a simulation of zero readings) and returns its path.
fn write_registry(url: &str, dir: &Path, devices: u32, seed: u64) -> String {
    let reg = dir.join("registry.csv");
    let args = simulate_args(
        url,
        devices,
        0,
        0.0,
        seed,
        &dir.join("empty-manifest.json"),
        &["--registry-out", reg.to_str().unwrap()],
    );
    let out = bin().args(&args).output().unwrap();
    assert!(
        out.status.success(),
        "simulate --readings 0 failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    reg.to_str().unwrap().to_owned()
}

#[test]
fn end_to_end_100k_readings_with_2pct_bad_are_exact_and_readable_by_duckdb_and_pyarrow() {
    let sc = Scenario::new();
    let broker = &sc.broker;
    let dir = &sc.dir;
    let (lake, manifest) = (sc.lake.clone(), sc.manifest.clone());
    let reg = write_registry(&broker.url(), dir.path(), 300, 7);
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let mut p = sc.pipeline(
        "pipeline",
        &["--registry", &reg, "--metrics-addr", &metrics_addr],
        &[("SENSORLAKE_FLUSH__MAX_AGE_MS", "200")],
    );
    simulate(&broker.url(), 300, 100000, 0.02, 7, &manifest);
    let sent = manifest_messages(&manifest);
    assert_eq!(sent, 100_000, "the broker acknowledged every QoS 1 publish");
    // The metrics are updated right after each commit's acknowledgements: wait for them, not
    // for the commit records, so the scrape below sees the last commit.
    wait_for(
        "every reading to be committed",
        Duration::from_secs(120),
        || {
            committed_readings(&lake) >= sent
                && metric(&metrics_addr, "sensorlake_readings_received_total") >= sent as f64
        },
    );

    // The counters add up, and nothing is left in flight once everything is committed.
    let received = metric(&metrics_addr, "sensorlake_readings_received_total");
    let accepted = metric(&metrics_addr, "sensorlake_readings_accepted_total");
    let rejected = metric(&metrics_addr, "sensorlake_readings_rejected_total");
    let duplicates = metric(&metrics_addr, "sensorlake_readings_duplicate_total");
    assert_eq!(received, sent as f64);
    assert_eq!(received, accepted + rejected + duplicates);
    assert!(rejected >= 1000.0, "2% of 100,000 are bad: {rejected}");
    assert_eq!(metric(&metrics_addr, "sensorlake_messages_in_flight"), 0.0);

    assert!(
        p.terminate().success(),
        "SIGTERM must exit 0; log:\n{}",
        p.log_text()
    );
    let (exact, report) = verify(&lake, &manifest);
    assert!(exact, "verify must be exact:\n{report}");

    // DuckDB and pyarrow read the lake: row counts, partition columns, aggregates.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(&lake)
        .arg(&manifest)
        .arg(&reg)
        .output()
        .expect("python3 is needed for the interop test");
    assert!(
        out.status.success(),
        "DuckDB/pyarrow interop failed (install with `pip install duckdb pyarrow`; scripts/test does):\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn sigkill_mid_stream_and_restart_loses_nothing_and_duplicates_nothing() {
    let sc = Scenario::new();
    let broker = &sc.broker;
    let dir = &sc.dir;
    let (lake, manifest) = (sc.lake.clone(), sc.manifest.clone());
    let log = dir.path().join("pipeline.log");
    let reg = write_registry(&broker.url(), dir.path(), 200, 11);
    let args = ["--registry", reg.as_str()];
    let env = [
        ("SENSORLAKE_FLUSH__MAX_AGE_MS", "100"),
        ("SENSORLAKE_FLUSH__MAX_MESSAGES", "2000"),
    ];
    let mut p = sc.pipeline("pipeline", &args, &env);

    let mut sim = bin()
        .args(simulate_args(
            &broker.url(),
            200,
            60_000,
            0.02,
            11,
            &manifest,
            &["--rate", "15000"],
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    for round in 1..=3u64 {
        wait_for(
            "some commits before the kill",
            Duration::from_secs(60),
            || committed_readings(&lake) >= round * 9_000,
        );
        p.kill9();
        p = sc.pipeline("pipeline", &args, &env);
    }
    let status = sim.wait().unwrap();
    assert!(status.success(), "the simulator failed");

    let sent = manifest_messages(&manifest);
    let (exact, report) = verify_eventually(&lake, &manifest, Duration::from_secs(90));
    assert!(
        exact,
        "after 3 SIGKILLs the lake must hold exactly the {sent} readings sent:\n{report}"
    );
    assert!(p.terminate().success());
    let (exact, report) = verify(&lake, &manifest);
    assert!(exact, "{report}");
    let text = read(&log);
    assert!(
        text.contains("files_made_visible"),
        "recovery ran at each restart"
    );
}

#[test]
fn all_bad_input_is_dead_lettered_and_acknowledged_without_leaking_in_flight_messages() {
    let sc = Scenario::new();
    let broker = &sc.broker;
    let (lake, manifest) = (sc.lake.clone(), sc.manifest.clone());
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let mut p = sc.pipeline(
        "pipeline",
        &["--metrics-addr", &metrics_addr],
        &[("SENSORLAKE_FLUSH__MAX_AGE_MS", "200")],
    );
    simulate(&broker.url(), 50, 8000, 1.0, 3, &manifest);
    let sent = manifest_messages(&manifest);
    // The metrics are updated right after each commit's acknowledgements: wait for them, not
    // for the commit records, so the scrape below sees the last commit.
    wait_for(
        "every bad reading to be committed",
        Duration::from_secs(120),
        || {
            committed_readings(&lake) >= sent
                && metric(&metrics_addr, "sensorlake_readings_received_total") >= sent as f64
        },
    );
    let valid: serde_json::Value = serde_json::from_str(&read(&manifest)).unwrap();
    let valid: u64 = valid["valid"]
        .as_object()
        .unwrap()
        .values()
        .map(|d| d["count"].as_u64().unwrap())
        .sum();
    // The simulator sends one valid power reading so that `not_monotonic` can be provoked.
    assert!(valid <= 1, "{valid}");
    assert_eq!(
        metric(&metrics_addr, "sensorlake_readings_accepted_total"),
        valid as f64
    );
    assert_eq!(
        metric(&metrics_addr, "sensorlake_readings_rejected_total"),
        (sent - valid) as f64
    );
    // Every message was acknowledged once its dead letter was committed.
    assert_eq!(metric(&metrics_addr, "sensorlake_messages_in_flight"), 0.0);
    assert!(p.terminate().success());
    let (exact, report) = verify(&lake, &manifest);
    assert!(exact, "{report}");
}

#[test]
fn demo_runs_with_no_setup_and_passes_its_own_verify() {
    let dir = tempfile::tempdir().unwrap();
    let demo = dir.path().join("demo");
    let out = run_cmd(&[
        "demo",
        "--lake",
        demo.to_str().unwrap(),
        "--readings",
        "20000",
        "--devices",
        "100",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("verify: exact"), "{stdout}");
    assert!(
        stdout.contains("read_parquet"),
        "the summary shows how to query the lake"
    );
    // A second run replaces the previous demo lake instead of failing verify on old rows.
    let out = run_cmd(&[
        "demo",
        "--lake",
        demo.to_str().unwrap(),
        "--readings",
        "2000",
        "--devices",
        "20",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn a_broker_restart_mid_stream_loses_nothing_the_broker_confirmed() {
    let mut sc = Scenario::new();
    let (lake, manifest) = (sc.lake.clone(), sc.manifest.clone());
    let mut p = sc.pipeline(
        "pipeline",
        &[],
        &[
            ("SENSORLAKE_FLUSH__MAX_AGE_MS", "100"),
            ("SENSORLAKE_MQTT__RECONNECT_MAX_MS", "500"),
        ],
    );
    let mut sim = bin()
        .args(simulate_args(
            &sc.broker.url(),
            100,
            40_000,
            0.0,
            21,
            &manifest,
            &["--rate", "10000"],
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(
        "some commits before the restart",
        Duration::from_secs(60),
        || committed_readings(&lake) >= 5_000,
    );
    sc.broker.restart();
    // The simulator's own connection broke: it stops and writes what the broker confirmed.
    let _ = sim.wait().unwrap();
    assert!(
        manifest.exists(),
        "the simulator writes a partial manifest when its connection breaks"
    );
    let confirmed = manifest_messages(&manifest);
    assert!(confirmed >= 5_000, "{confirmed}");

    let (exact, report) = verify_eventually(&lake, &manifest, Duration::from_secs(60));
    assert!(
        exact,
        "after a broker restart every confirmed reading is in the lake once:\n{report}\nlog:\n{}\nbroker log:\n{}",
        p.log_text(),
        sc.broker.log()
    );
    assert!(
        p.log_text().contains("MQTT connection failed"),
        "the disconnect was noticed and retried"
    );
    assert!(p.terminate().success());
}

#[test]
fn two_instances_sharing_one_subscription_write_each_reading_exactly_once() {
    let sc = Scenario::new();
    let broker = &sc.broker;
    let (lake, manifest) = (sc.lake.clone(), sc.manifest.clone());
    let start = |writer: &str| {
        sc.pipeline(
            writer,
            &["--topic", "$share/lake/telemetry/#", "--writer-id", writer],
            &[("SENSORLAKE_FLUSH__MAX_AGE_MS", "200")],
        )
    };
    let mut a = start("a");
    let mut b = start("b");
    simulate(&broker.url(), 100, 20_000, 0.02, 13, &manifest);
    let (exact, report) = verify_eventually(&lake, &manifest, Duration::from_secs(60));
    assert!(exact, "{report}");
    assert!(a.terminate().success() && b.terminate().success());
    let records = sensorlake_sink::read_commit_records(&lake).unwrap();
    let by_a: u64 = records
        .iter()
        .filter(|r| r.writer == "a")
        .map(|r| r.counts.received)
        .sum();
    let by_b: u64 = records
        .iter()
        .filter(|r| r.writer == "b")
        .map(|r| r.counts.received)
        .sum();
    assert_eq!(by_a + by_b, 20_000);
    assert!(
        by_a > 0 && by_b > 0,
        "the broker shared the load: a={by_a} b={by_b}"
    );
}

#[test]
fn a_failing_lake_acknowledges_nothing_keeps_memory_bounded_and_loses_nothing_once_it_heals() {
    let sc = Scenario::new();
    let broker = &sc.broker;
    let (lake, manifest) = (sc.lake.clone(), sc.manifest.clone());
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let mut p = sc.pipeline(
        "pipeline",
        &["--metrics-addr", &metrics_addr],
        &[("SENSORLAKE_FLUSH__MAX_AGE_MS", "200")],
    );
    // Break the lake: the writer's temporary folder becomes a file, so every commit fails
    // before its commit point (even for root, unlike permissions).
    let tmp = lake.join("_sensorlake/tmp/w0");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(tmp.parent().unwrap()).unwrap();
    std::fs::write(&tmp, b"not a folder").unwrap();

    let baseline = p.peak_rss();
    const SENT: u64 = 100_000;
    simulate(&broker.url(), 500, SENT, 0.0, 17, &manifest);
    wait_for(
        "the failing commit to be reported",
        Duration::from_secs(30),
        || p.log_text().contains("Commit failed"),
    );
    // Everything was published and acknowledged by the broker; the pipeline could commit
    // nothing, so it acknowledged nothing and stopped reading.
    assert_eq!(committed_readings(&lake), 0);
    assert_eq!(
        metric(&metrics_addr, "sensorlake_readings_received_total"),
        0.0
    );
    let in_flight = metric(&metrics_addr, "sensorlake_messages_in_flight");
    assert!(in_flight > 0.0, "the failing batch is still in flight");
    let peak = p.peak_rss();
    eprintln!(
        "peak RSS {} MiB (baseline {} MiB) with {SENT} readings held back by a failing lake, {in_flight} in flight",
        peak >> 20,
        baseline >> 20
    );
    // Bounded by the flush batch, the 8,192-message channel and the socket buffers — not by
    // the 100,000 readings (~23 MB of JSON, ~35 MB as records) the broker holds for us.
    // (More readings would make the point louder, but Mosquitto 2.0 drains a long queue
    // slowly after an outage, which would only slow this test down.)
    assert!(
        peak - baseline < 20 << 20,
        "memory grew by {} MiB while the lake was failing",
        (peak - baseline) >> 20
    );

    std::fs::remove_file(&tmp).unwrap();
    let (exact, report) = verify_eventually(&lake, &manifest, Duration::from_secs(120));
    assert!(
        exact,
        "once the lake heals every reading lands exactly once:\n{report}"
    );
    assert!(p.terminate().success());
}

#[test]
fn mqtt_311_with_several_topic_filters_is_exact_too() {
    let sc = Scenario::new();
    let broker = &sc.broker;
    let (lake, manifest) = (sc.lake.clone(), sc.manifest.clone());
    // The simulator spreads a fleet over sites; three filters by device type cover them all.
    let mut p = sc.pipeline(
        "pipeline",
        &[
            "--protocol",
            "v4",
            "--topic",
            "telemetry/+/env/#",
            "--topic",
            "telemetry/+/vibration/#",
            "--topic",
            "telemetry/+/power/#",
        ],
        &[("SENSORLAKE_FLUSH__MAX_AGE_MS", "200")],
    );
    simulate(&broker.url(), 60, 10_000, 0.02, 19, &manifest);
    let (exact, report) = verify_eventually(&lake, &manifest, Duration::from_secs(60));
    assert!(exact, "{report}\n{}", p.log_text());
    assert!(p.terminate().success());
}

/// A tmpfs mounted for one test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Self {
        std::fs::create_dir_all(at).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .expect("the `mount` command");
        assert!(
            out.status.success(),
            "this test mounts a small tmpfs as a full disk and needs root (or CAP_SYS_ADMIN): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(at.to_path_buf())
    }

    fn resize(&self, size: &str) {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_acknowledges_nothing_names_the_cause_and_recovers_when_space_returns() {
    let sc = Scenario::new();
    let broker = &sc.broker;
    let (lake, manifest) = (sc.lake.clone(), sc.manifest.clone());
    // Room for the lake's first commits (records of ~500 device checkpoints, small Parquet
    // files) but not for 30,000 readings committed every 200 ms.
    let disk = Tmpfs::mount(&lake, "256k");
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let mut p = sc.pipeline(
        "pipeline",
        &["--metrics-addr", &metrics_addr],
        &[("SENSORLAKE_FLUSH__MAX_AGE_MS", "200")],
    );
    simulate(&broker.url(), 500, 30_000, 0.01, 23, &manifest);
    wait_for(
        "a commit to fail on the full disk",
        Duration::from_secs(60),
        || metric(&metrics_addr, "sensorlake_commit_storage_full_total") > 0.0,
    );
    let log = p.log_text();
    assert!(
        log.contains("the file system holding the lake is full. Free space there"),
        "the log names the cause and the remedy:\n{log}"
    );
    // Whatever was committed before the disk filled is acknowledged; the rest is not, and
    // stays with the broker.
    let (exact, report) = verify(&lake, &manifest);
    assert!(
        !exact,
        "the disk filled before everything was committed:\n{report}"
    );
    assert!(metric(&metrics_addr, "sensorlake_messages_in_flight") > 0.0);

    disk.resize("64m");
    let (exact, report) = verify_eventually(&lake, &manifest, Duration::from_secs(120));
    assert!(
        exact,
        "once space returns every reading lands exactly once:\n{report}"
    );
    assert!(p.terminate().success());
    drop(disk);
}

#[test]
fn with_a_retry_budget_a_lake_that_keeps_failing_ends_the_process_with_status_1() {
    let sc = Scenario::new();
    let mut p = sc.pipeline(
        "pipeline",
        &[],
        &[
            ("SENSORLAKE_FLUSH__MAX_AGE_MS", "200"),
            ("SENSORLAKE_LAKE__RETRY_BUDGET_SECS", "2"),
        ],
    );
    // Break the lake as in the test above: every commit fails before its commit point.
    let tmp = sc.lake.join("_sensorlake/tmp/w0");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::write(&tmp, b"not a folder").unwrap();
    simulate(&sc.broker.url(), 20, 2_000, 0.0, 23, &sc.manifest);
    let status = p
        .wait_exit(Duration::from_secs(60))
        .expect("the process gives up once the budget is spent");
    let log = p.log_text();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains("longer than lake.retry_budget_secs"),
        "the log says why it stopped:\n{log}"
    );
    assert_eq!(committed_readings(&sc.lake), 0);
}

/// SIGTERM while readings stream in: intake stops, what was received is committed and
/// acknowledged, the process exits 0 well within `shutdown.timeout_secs`; what the broker
/// still holds goes to the next run, and the end result is exact.
#[test]
fn sigterm_mid_stream_drains_commits_and_exits_0_within_the_timeout() {
    let sc = Scenario::new();
    let env = [("SENSORLAKE_SHUTDOWN__TIMEOUT_SECS", "10")];
    let mut p = sc.pipeline("pipeline", &[], &env);
    const SENT: u64 = 30_000;
    let url = sc.broker.url();
    let mut sim = bin()
        .args(simulate_args(
            &url,
            100,
            SENT,
            0.02,
            29,
            &sc.manifest,
            &["--rate", "5000"],
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Mid-stream, with a flush pending (the 5 s age limit has not fired yet).
    std::thread::sleep(Duration::from_secs(2));
    let asked = Instant::now();
    let status = p.terminate();
    let took = asked.elapsed();
    let log = p.log_text();
    assert!(status.success(), "SIGTERM must exit 0:\n{log}");
    assert!(
        took < Duration::from_secs(10),
        "stopped in {took:?}, past shutdown.timeout_secs (10 s)"
    );
    assert!(
        log.contains("Shutting down") && log.contains("Stopped"),
        "{log}"
    );
    let committed_at_exit = committed_readings(&sc.lake);
    assert!(
        committed_at_exit > 0,
        "the pending flush was committed on the way out"
    );

    let mut p = sc.pipeline("pipeline", &[], &env);
    assert!(sim.wait().unwrap().success(), "the simulator failed");
    let (exact, report) = verify_eventually(&sc.lake, &sc.manifest, Duration::from_secs(60));
    assert!(p.terminate().success());
    assert!(exact, "after a SIGTERM mid-stream and a restart:\n{report}");
    eprintln!(
        "SIGTERM answered in {took:?}; {committed_at_exit} readings committed on the way out"
    );
}

/// SIGTERM while every commit fails: the retries stop after `shutdown.timeout_secs`, the
/// process exits non-zero without acknowledging anything, and once the lake works again a
/// restart loses nothing.
#[test]
fn sigterm_with_a_failing_lake_gives_up_after_the_timeout_and_acknowledges_nothing() {
    let sc = Scenario::new();
    let env = [
        ("SENSORLAKE_SHUTDOWN__TIMEOUT_SECS", "3"),
        ("SENSORLAKE_FLUSH__MAX_AGE_MS", "200"),
    ];
    let mut p = sc.pipeline("pipeline", &[], &env);
    let tmp = sc.lake.join("_sensorlake/tmp/w0");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::write(&tmp, b"not a folder").unwrap();
    simulate(&sc.broker.url(), 20, 2_000, 0.0, 31, &sc.manifest);
    wait_for("a failing commit", Duration::from_secs(30), || {
        p.log_text().contains("Commit failed")
    });
    let asked = Instant::now();
    let status = p.terminate();
    let took = asked.elapsed();
    let log = p.log_text();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(15),
        "gave up after {took:?}; shutdown.timeout_secs is 3 s"
    );
    assert!(log.contains("gave up committing"), "{log}");
    assert_eq!(committed_readings(&sc.lake), 0);

    std::fs::remove_file(&tmp).unwrap();
    let mut p = sc.pipeline("pipeline", &[], &env);
    let (exact, report) = verify_eventually(&sc.lake, &sc.manifest, Duration::from_secs(60));
    assert!(p.terminate().success());
    assert!(exact, "nothing acknowledged was lost:\n{report}");
}
