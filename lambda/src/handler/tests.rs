#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;

use bytes::Bytes;
use sensorlake_core::time::format_rfc3339_millis;

use super::*;
use crate::event::ShardEventRecord;

const SHARD: &str = "shardId-000000000001";

/// A 56-digit sequence number that grows with `n`.
fn seq(n: u64) -> SequenceNumber {
    SequenceNumber::parse(&format!("4959033827149025660855969253836157109592{n:016}")).unwrap()
}

/// A valid env reading of `device` with `seq`.
fn reading(device: &str, s: u64) -> Bytes {
    let ts = format_rfc3339_millis((now_ms() - 60_000) * 1000);
    Bytes::from(format!(
        r#"{{"device_id":"{device}","type":"env","ts":"{ts}","seq":{s},"metrics":{{"temperature_c":21.5,"humidity_pct":40.0,"battery_v":3.7}}}}"#
    ))
}

fn record(n: u64, device: &str, data: Bytes) -> ShardEventRecord {
    ShardEventRecord {
        sequence: seq(n),
        partition_key: device.into(),
        data,
        arrival_us: 1_764_255_845_000_000 + n as i64 * 1000,
    }
}

/// Records `from..to`, each a reading of `env-00000<n % 3>` with seq `n`.
fn batch(from: u64, to: u64) -> ShardBatch {
    ShardBatch {
        stream: "telemetry".into(),
        shard: SHARD.into(),
        records: (from..to)
            .map(|n| {
                let device = format!("env-00000{}", n % 3);
                record(n, &device, reading(&device, n))
            })
            .collect(),
    }
}

fn handler(lake: &Path) -> Handler {
    let mut config = Config::default();
    config.lake.path = lake.to_owned();
    config.lake.fsync = false;
    Handler::new(Settings::from_config(&config, Some(1024)).unwrap())
}

fn later() -> Instant {
    Instant::now() + Duration::from_secs(60)
}

/// Every file under `dir` with its bytes, by relative path.
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
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

fn committed(report: &ShardReport) -> (&FlushCounts, &ShardCheckpoint) {
    match &report.outcome {
        ShardOutcome::Committed {
            counts, checkpoint, ..
        } => (counts, checkpoint),
        other => panic!("expected a commit, got {other:?}"),
    }
}

#[tokio::test]
async fn a_redelivered_batch_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let h = handler(dir.path());
    let first = h.shard(batch(0, 30), later()).await.unwrap();
    let (counts, checkpoint) = committed(&first);
    assert_eq!(counts.accepted, 30);
    assert_eq!(checkpoint.sequence, Some(seq(29)));
    assert_eq!(first.writer, "ks-telemetry-000000000001");
    let before = snapshot(dir.path());

    let again = h.shard(batch(0, 30), later()).await.unwrap();
    assert_eq!(again.outcome, ShardOutcome::UpToDate);
    assert_eq!(again.new_user_records, 0);
    assert_eq!(snapshot(dir.path()), before, "not one byte changed");
}

#[tokio::test]
async fn a_batch_straddling_the_checkpoint_commits_only_its_tail() {
    let dir = tempfile::tempdir().unwrap();
    let h = handler(dir.path());
    committed(&h.shard(batch(0, 20), later()).await.unwrap());
    let report = h.shard(batch(10, 40), later()).await.unwrap();
    assert_eq!(report.records, 30);
    assert_eq!(report.new_user_records, 20);
    let (counts, checkpoint) = committed(&report);
    assert_eq!(
        (counts.received, counts.accepted, counts.duplicates),
        (20, 20, 0)
    );
    assert_eq!(checkpoint.sequence, Some(seq(39)));
}

#[tokio::test]
async fn bad_records_are_dead_letters_not_failures() {
    let dir = tempfile::tempdir().unwrap();
    let h = handler(dir.path());
    let mut b = batch(0, 5);
    b.records
        .push(record(5, "env-000001", Bytes::from_static(b"{not json")));
    b.records.push(record(
        6,
        "env-000002",
        Bytes::from_static(&[0xF3, 0x89, 0x9A, 0xC2, 1, 2, 3]),
    ));
    b.records
        .push(record(7, "env-000009", reading("env-000001", 7)));
    let report = h.shard(b, later()).await.unwrap();
    let (counts, checkpoint) = committed(&report);
    assert_eq!(counts.accepted, 5);
    assert_eq!(counts.rejected_total(), 3, "{counts:?}");
    assert_eq!(
        counts.rejected.get("topic_mismatch"),
        Some(&1),
        "{counts:?}"
    );
    assert_eq!(
        checkpoint.sequence,
        Some(seq(7)),
        "the checkpoint passes the bad records"
    );
}

#[tokio::test]
async fn a_lake_that_cannot_be_opened_fails_the_batch_from_its_first_record() {
    let dir = tempfile::tempdir().unwrap();
    let h = handler(dir.path());
    committed(&h.shard(batch(0, 10), later()).await.unwrap());
    // A directory where the writer's lock file must be: opening fails, also as root.
    let lock = dir
        .path()
        .join("_sensorlake/locks/ks-telemetry-000000000001.lock");
    std::fs::remove_file(&lock).unwrap();
    std::fs::create_dir_all(lock.join("x")).unwrap();
    let event_records = batch(5, 15);
    let report = h.shard(event_records, later()).await.unwrap();
    match &report.outcome {
        ShardOutcome::Failed {
            first_uncommitted,
            error,
        } => {
            // The checkpoint could not be read, so the whole batch is reported.
            assert_eq!(first_uncommitted, &seq(5));
            assert!(error.contains("lock"), "{error}");
        }
        other => panic!("{other:?}"),
    }

    std::fs::remove_dir_all(&lock).unwrap();
    let retry = h.shard(batch(5, 15), later()).await.unwrap();
    let (counts, _) = committed(&retry);
    assert_eq!(counts.accepted, 5, "records 5..10 were committed before");
}

#[tokio::test]
async fn kinesis_answers_name_the_first_uncommitted_record_per_failed_shard() {
    let dir = tempfile::tempdir().unwrap();
    let h = handler(dir.path());
    let event: KinesisEvent = serde_json::from_value(serde_json::json!({"Records": []})).unwrap();
    assert_eq!(
        h.kinesis(&event, later()).await.unwrap(),
        BatchResponse::default()
    );
    let answer = h
        .invoke(serde_json::json!({"Records": []}), later())
        .await
        .unwrap();
    assert_eq!(answer, serde_json::json!({"batchItemFailures": []}));
    let err = h
        .invoke(serde_json::json!({"hello": "world"}), later())
        .await
        .unwrap_err();
    let diag: lambda_runtime::Diagnostic = err.into();
    assert_eq!(diag.error_type, "sensorlake.BadEvent");
}

#[test]
fn configuration_comes_from_the_environment_like_the_service() {
    let dir = tempfile::tempdir().unwrap();
    let env = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let lake = dir.path().join("lake");
    let (s, config) = Settings::load(env(&[
        ("SENSORLAKE_LAKE__PATH", lake.to_str().unwrap()),
        ("SENSORLAKE_LAKE__ZSTD_LEVEL", "5"),
        ("SENSORLAKE_MQTT__PASSWORD", "s3cret"),
        ("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "512"),
    ]))
    .unwrap();
    assert_eq!(s.lake, lake);
    assert_eq!(s.lake_options.zstd_level, 5);
    assert_eq!(s.memory_mb, Some(512));
    assert!(
        !serde_json::to_string(&config.lake)
            .unwrap()
            .contains("s3cret")
    );
    let opts = s.compact_options(&CompactRequest::default());
    assert_eq!(opts.merge_memory_bytes, 128 << 20, "a quarter of 512 MiB");
    assert_eq!(opts.older_than, Duration::from_secs(7200));

    let bad = Settings::load(env(&[("SENSORLAKE_LAKE__ZSTD_LEVEL", "99")])).unwrap_err();
    assert!(bad.to_string().contains("zstd_level"), "{bad}");
    let file = dir.path().join("c.toml");
    std::fs::write(&file, "[lake]\npth = 1\n").unwrap();
    let bad = Settings::load(env(&[(CONFIG_ENV, file.to_str().unwrap())])).unwrap_err();
    assert!(bad.to_string().contains("pth"), "{bad}");
}

#[test]
fn lake_urls_are_logged_without_credentials() {
    assert_eq!(
        redact_lake(Path::new("s3://AKIA:secret@bucket/prefix")),
        "s3://***@bucket/prefix"
    );
    assert_eq!(
        redact_lake(Path::new("s3://bucket/prefix")),
        "s3://bucket/prefix"
    );
    assert_eq!(redact_lake(Path::new("/tmp/lake")), "/tmp/lake");
}

#[tokio::test]
async fn compaction_before_the_first_batch_has_nothing_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let h = handler(&dir.path().join("no-lake-yet"));
    let summary = h.compact(&CompactRequest::default()).await.unwrap();
    assert!(summary.partitions.is_empty());
    let answer = h
        .invoke(serde_json::json!({"action": "compact"}), later())
        .await
        .unwrap();
    assert_eq!(answer["partitions"], serde_json::json!([]));

    // With data, a lake whose only hour is still open is left alone.
    committed(&h.shard(batch(0, 10), later()).await.unwrap());
    let summary = h.compact(&CompactRequest::default()).await.unwrap();
    assert!(summary.partitions.is_empty(), "{summary:?}");
}
