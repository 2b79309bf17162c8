//! The command line as users script against it: exit codes and error messages.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;

#[test]
fn config_check_prints_the_effective_configuration_without_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("sensorlake.toml");
    std::fs::write(
        &conf,
        "[mqtt]\nurl = \"mqtt://broker:1884\"\n[flush]\nmax_age_ms = 250\n",
    )
    .unwrap();
    let out = bin()
        .args(["config", "check", "--config", conf.to_str().unwrap()])
        .env("SENSORLAKE_MQTT__PASSWORD", "hunter2")
        .env("SENSORLAKE_LAKE__WRITER_ID", "edge-7")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("url = \"mqtt://broker:1884\""), "{stdout}");
    assert!(stdout.contains("max_age_ms = 250"), "{stdout}");
    assert!(
        stdout.contains("writer_id = \"edge-7\""),
        "environment overrides apply: {stdout}"
    );
    assert!(!stdout.contains("hunter2"), "secrets are never printed");
}

#[test]
fn an_unknown_config_key_is_a_usage_error_that_names_the_key_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("bad.toml");
    std::fs::write(&conf, "[lake]\npaht = \"x\"\n").unwrap();
    let out = run_cmd(&["config", "check", "--config", conf.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("paht") && stderr.contains("bad.toml"),
        "{stderr}"
    );
}

#[test]
fn run_rejects_a_bad_broker_url_before_touching_anything() {
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let out = run_cmd(&[
        "run",
        "--mqtt",
        "http://broker",
        "--lake",
        lake.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("mqtt://HOST:PORT"),
        "the error says what is expected: {stderr}"
    );
    assert!(
        !lake.exists(),
        "nothing is created for an invalid configuration"
    );
}

#[test]
fn verify_of_a_lake_missing_readings_exits_1_with_a_summary() {
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("manifest.json");
    // Published, but no pipeline was running: the lake is empty.
    simulate(&broker.url(), 5, 50, 0.0, 1, &manifest);
    std::fs::create_dir_all(dir.path().join("lake/telemetry")).unwrap();
    let out = run_cmd(&[
        "verify",
        "--lake",
        dir.path().join("lake").to_str().unwrap(),
        "--manifest",
        manifest.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("missing 50"), "{stdout}");
}

#[test]
fn bench_reports_every_figure_and_writes_json() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let out = run_cmd(&[
        "bench",
        "--readings",
        "3000",
        "--devices",
        "30",
        "--json",
        json.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("null subscriber (ceiling)"), "{stdout}");
    let r: serde_json::Value = serde_json::from_str(&read(&json)).unwrap();
    assert_eq!(r["readings"], 3000);
    for key in [
        "ceiling_readings_per_sec",
        "pipeline_readings_per_sec",
        "cpu_seconds_per_million",
        "peak_rss_mib",
        "lake_to_json_ratio",
    ] {
        let v = r[key].as_f64().unwrap();
        assert!(v.is_finite() && v > 0.0, "{key} = {v}");
    }
    let p99 = r["latency_ms"][2].as_f64().unwrap();
    assert!(p99.is_finite() && p99 >= 0.0, "p99 latency {p99}");
    assert!(r["lake_bytes"].as_u64().unwrap() > 0);
}
