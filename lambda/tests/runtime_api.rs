//! The real `sensorlake-lambda` binary, run as Lambda runs a custom runtime against a Lambda
//! Runtime API on loopback (`common::RuntimeApi`), fed Kinesis events built from the
//! simulator's fleet (part KPL-aggregated, part invalid), its lake checked with `verify`
//! against the simulator's manifest: redelivery, failed commits, bad records, bisected
//! retries, S3 on moto, compaction, init errors, and (ignored by default) cold start.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use common::*;
use sensorlake_testkit::Moto;

/// Asserts `report` is exact, printing it and the function's log otherwise.
fn assert_exact(report: &sensorlake_simulator::VerifyReport, f: &Function) {
    assert!(
        report.is_exact(),
        "verify must be exact:\n{report}\nlog:\n{}",
        f.log_text()
    );
}

#[test]
fn the_same_batch_delivered_twice_leaves_identical_files_and_an_exact_lake() {
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let api = RuntimeApi::start();
    let mut f = Function::start(&api, &lake_env(&lake));
    let mut sim = Sim::new(60, 7, 0.05, Duration::from_secs(60));
    let batch1 = sim.records(400, Some(5));
    let batch2 = sim.records(300, Some(7));

    let answer = api.invoke(&mut f, &event(&batch1));
    assert_eq!(failures(&answer), Vec::<String>::new());
    let after_first = lake_files(&lake);
    assert!(!parquet_names(&after_first, "telemetry").is_empty());
    assert!(!parquet_names(&after_first, "dead_letter").is_empty());

    // The event source mapping delivers the same batch again (a retry after a timeout, say).
    let answer = api.invoke(&mut f, &event(&batch1));
    assert_eq!(failures(&answer), Vec::<String>::new());
    let after_second = lake_files(&lake);
    assert_eq!(
        after_second.keys().collect::<Vec<_>>(),
        after_first.keys().collect::<Vec<_>>(),
        "the same file names"
    );
    assert!(after_second == after_first, "the same bytes in every file");
    let log = f.log_text();
    assert!(
        log.contains("already in the lake"),
        "the second delivery was recognised: {log}"
    );

    let answer = api.invoke(&mut f, &event(&batch2));
    assert_eq!(failures(&answer), Vec::<String>::new());
    let report = verify(&lake, &sim.manifest());
    assert_exact(&report, &f);
    assert_eq!(
        report.telemetry.found + report.dead_letters.found,
        sim.messages(),
        "{report}"
    );
    assert!(report.dead_letters.expected > 10, "{report}");

    // Logs are JSON lines, and name the writer of the shard.
    let lines = f.log_json();
    assert!(
        lines
            .iter()
            .any(|l| l["fields"]["writer"] == WRITER && l["level"] == "INFO"),
        "{}",
        f.log_text()
    );

    // An event the function does not handle is a function error, with its own type.
    let answer = api.invoke(&mut f, &serde_json::json!({"hello": "world"}));
    match answer {
        Answer::Error { body, .. } => {
            assert_eq!(body["errorType"], "sensorlake.BadEvent", "{body}");
            assert!(
                body["errorMessage"]
                    .as_str()
                    .unwrap()
                    .contains("unrecognised event"),
                "{body}"
            );
        }
        other => panic!("expected a function error, got {other:?}"),
    }
}

#[test]
fn a_commit_that_fails_is_reported_from_the_first_uncommitted_record_and_the_retry_is_exact() {
    let moto = Moto::start(BUCKET);
    let proxy = DenyProxy::start(moto.port);
    let api = RuntimeApi::start();
    let mut f = Function::start(&api, &s3_env(&moto, &proxy.endpoint()));
    let mut sim = Sim::new(40, 11, 0.03, Duration::from_secs(60));
    let records = sim.records(300, Some(6));
    let (head, tail) = records.split_at(120);

    assert_eq!(
        failures(&api.invoke(&mut f, &event(head))),
        Vec::<String>::new()
    );
    let committed = s3_files(&moto);

    // The store refuses the flush's uploads: the whole batch comes again, of which the first
    // 120 records are committed and the rest cannot be.
    proxy.deny.store(true, Relaxed);
    let answer = api.invoke(&mut f, &event(&records));
    assert_eq!(
        failures(&answer),
        vec![tail[0].sequence.clone()],
        "the first record not committed; log:\n{}",
        f.log_text()
    );
    assert!(proxy.denied.load(Relaxed) >= 2, "the commit was retried");
    assert!(
        s3_files(&moto) == committed,
        "nothing of the failed batch is in the lake"
    );
    let log = f.log_text();
    assert!(log.contains("Commit failed; retrying"), "{log}");

    // The store recovers; the event source mapping retries from the reported record.
    proxy.deny.store(false, Relaxed);
    assert_eq!(
        failures(&api.invoke(&mut f, &event(tail))),
        Vec::<String>::new()
    );

    let copy = tempfile::tempdir().unwrap();
    write_tree(&s3_files(&moto), copy.path());
    let report = verify(copy.path(), &sim.manifest());
    assert_exact(&report, &f);
}

#[test]
fn bad_records_and_a_corrupt_kpl_aggregate_are_dead_letters_and_not_failures() {
    use arrow::array::{Array, AsArray};
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let api = RuntimeApi::start();
    let mut f = Function::start(&api, &lake_env(&lake));
    // A fifth of the fleet's messages invalid, in every way the simulator knows.
    let mut sim = Sim::new(30, 5, 0.2, Duration::from_secs(60));
    let mut records = sim.records(100, Some(4));
    let corrupt = sim.corrupt_aggregate(3);
    records.insert(50, corrupt.clone());
    records.extend(sim.records(50, None));

    let answer = api.invoke(&mut f, &event(&records));
    assert_eq!(
        failures(&answer),
        Vec::<String>::new(),
        "bad input is never a failure"
    );

    let report = verify(&lake, &sim.manifest());
    let (t, d) = (&report.telemetry, &report.dead_letters);
    assert!(
        t.missing == 0
            && t.duplicated == 0
            && t.unexpected == 0
            && t.value_mismatches == 0
            && t.unconfirmed_found == 0,
        "telemetry exact, nothing of the corrupt aggregate in it:\n{report}"
    );
    assert!(
        d.missing == 0 && d.wrong_reason == 0 && d.duplicated == 0,
        "every bad reading dead-lettered with its reason:\n{report}"
    );
    assert!(d.expected >= 20, "{report}");
    assert_eq!(d.unexpected, 1, "only the corrupt aggregate:\n{report}");

    // The aggregate is one dead letter, with its bytes and position.
    let mut found = Vec::new();
    for (rel, bytes) in lake_files(&lake) {
        if !(rel.starts_with("dead_letter/") && rel.ends_with(".parquet")) {
            continue;
        }
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
            bytes::Bytes::from(bytes),
        )
        .unwrap()
        .build()
        .unwrap();
        for batch in reader {
            let batch = batch.unwrap();
            let reason = batch.column_by_name("reason").unwrap().as_string::<i32>();
            let payload = batch.column_by_name("payload").unwrap().as_binary::<i32>();
            let position = batch
                .column_by_name("source_position")
                .unwrap()
                .as_string::<i32>();
            for i in 0..batch.num_rows() {
                if reason.value(i) == "corrupt_aggregate" {
                    assert!(!payload.is_null(i));
                    found.push((payload.value(i).to_vec(), position.value(i).to_owned()));
                }
            }
        }
    }
    assert_eq!(
        found,
        vec![(
            corrupt.data.clone(),
            format!("{SHARD}/{}", corrupt.sequence)
        )]
    );
}

#[test]
fn a_bisected_redelivery_of_a_committed_batch_adds_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let api = RuntimeApi::start();
    let mut f = Function::start(&api, &lake_env(&lake));
    let mut sim = Sim::new(50, 3, 0.02, Duration::from_secs(60));
    let records = sim.records(500, Some(3));

    assert_eq!(
        failures(&api.invoke(&mut f, &event(&records))),
        Vec::<String>::new()
    );
    let committed = lake_files(&lake);
    // After a timeout that came too late (the batch was committed), bisect-on-error retries
    // the first half, then the second.
    let (first, second) = records.split_at(records.len() / 2);
    for half in [first, second] {
        assert_eq!(
            failures(&api.invoke(&mut f, &event(half))),
            Vec::<String>::new()
        );
    }
    assert!(
        lake_files(&lake) == committed,
        "not one byte added or changed"
    );
    assert_exact(&verify(&lake, &sim.manifest()), &f);

    // Batch boundaries that differ from the committed ones: a batch starting inside committed
    // records writes only what is new.
    let more = sim.records(200, Some(4));
    let mut straddling = second[100..].to_vec();
    straddling.extend_from_slice(&more);
    assert_eq!(
        failures(&api.invoke(&mut f, &event(&straddling))),
        Vec::<String>::new()
    );
    assert_exact(&verify(&lake, &sim.manifest()), &f);
}

#[test]
fn an_s3_lake_on_moto_works_end_to_end_with_scheduled_compaction() {
    let moto = Moto::start(BUCKET);
    let api = RuntimeApi::start();
    let mut f = Function::start(&api, &s3_env(&moto, &moto.endpoint));
    // Readings from three hours ago, so their hour is closed and compaction takes it. All
    // valid: the fleet's `ts_in_future` readings (an hour ahead of their `ts` clock) would be
    // valid against the real clock. Bad records on S3: the failed-commit test.
    let mut sim = Sim::new(80, 21, 0.0, Duration::from_secs(3 * 3600));
    let batches: Vec<_> = (0..3).map(|_| sim.records(250, Some(5))).collect();
    for b in &batches {
        assert_eq!(
            failures(&api.invoke(&mut f, &event(b))),
            Vec::<String>::new()
        );
    }
    let before = s3_files(&moto);
    assert!(
        before
            .keys()
            .any(|k| k.starts_with(&format!("_sensorlake/commits/{WRITER}/"))),
        "{:?}",
        before.keys()
    );

    // The template's schedule sends this.
    let answer = api.invoke(
        &mut f,
        &serde_json::json!({"action": "compact", "older_than_secs": 3600}),
    );
    let Answer::Response(summary) = answer else {
        panic!("compaction failed: {answer:?}\n{}", f.log_text());
    };
    let partitions = summary["partitions"].as_array().unwrap();
    assert!(!partitions.is_empty(), "{summary}");
    let after = s3_files(&moto);
    assert!(
        parquet_names(&after, "telemetry")
            .iter()
            .any(|n| n.contains("/compact-")),
        "{:?}",
        parquet_names(&after, "telemetry")
    );

    // A redelivery after compaction still writes nothing (the checkpoint, not file names,
    // says what is committed).
    assert_eq!(
        failures(&api.invoke(&mut f, &event(&batches[0]))),
        Vec::<String>::new()
    );
    assert!(s3_files(&moto) == after);

    let copy = tempfile::tempdir().unwrap();
    write_tree(&after, copy.path());
    assert_exact(&verify(copy.path(), &sim.manifest()), &f);
}

#[test]
fn an_invalid_configuration_is_reported_as_an_init_error() {
    let api = RuntimeApi::start();
    let mut f = Function::start(&api, &[("SENSORLAKE_LAKE__ZSTD_LEVEL", "99".into())]);
    let status = f.wait_exit(Duration::from_secs(30));
    assert!(!status.success());
    let (error_type, body) = api
        .init_error()
        .unwrap_or_else(|| panic!("no init error reported; log:\n{}", f.log_text()));
    assert_eq!(error_type.as_deref(), Some("Runtime.InitError"));
    assert_eq!(body["errorType"], "sensorlake.InvalidConfiguration");
    assert!(
        body["errorMessage"]
            .as_str()
            .unwrap()
            .contains("zstd_level"),
        "{body}"
    );
    assert_eq!(api.polls(), 0, "it never asked for an invocation");
}

/// Cold start: process start to the first response POSTed, the first invocation writing a
/// batch of 200 records (one KPL aggregate in five) to a new lake. Prints the median of 10
/// starts on a local lake and 10 on moto's S3, and the process's peak RSS.
///
/// `cargo test -p sensorlake-lambda --release --test runtime_api -- --ignored --nocapture cold_start`
#[test]
#[ignore = "a measurement; run it by name"]
fn cold_start() {
    const STARTS: usize = 10;
    let moto = Moto::start(BUCKET);
    for kind in ["local", "s3"] {
        let mut times = Vec::new();
        let mut rss = Vec::new();
        for i in 0..STARTS {
            let dir = tempfile::tempdir().unwrap();
            let mut sim = Sim::new(100, i as u64 + 1, 0.02, Duration::from_secs(60));
            let records = sim.records(200, Some(5));
            let env = match kind {
                "local" => lake_env(&dir.path().join("lake")),
                _ => {
                    let mut env = s3_env(&moto, &moto.endpoint);
                    for (k, v) in &mut env {
                        if *k == "SENSORLAKE_LAKE__PATH" {
                            *v = format!("s3://{BUCKET}/cold-{i}");
                        }
                    }
                    env
                }
            };
            let api = RuntimeApi::start();
            let id = api.queue(&event(&records), Duration::from_secs(60));
            let mut f = Function::start(&api, &env);
            let (answer, at) = api.wait(&id, &mut f, Duration::from_secs(60));
            assert_eq!(failures(&answer), Vec::<String>::new());
            times.push(at.duration_since(f.spawned));
            rss.push(f.peak_rss_kib().unwrap_or(0));
        }
        times.sort();
        rss.sort_unstable();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        println!(
            "cold start ({kind} lake, {STARTS} starts, 200 records incl. 40 KPL aggregates of 4): \
             median {:.1} ms, min {:.1} ms, max {:.1} ms; peak RSS median {} KiB, max {} KiB",
            ms(times[STARTS / 2]),
            ms(times[0]),
            ms(times[STARTS - 1]),
            rss[STARTS / 2],
            rss[STARTS - 1]
        );
    }
    // The S3 requests of one invocation: on a new lake, then on a lake with one commit.
    {
        let proxy = DenyProxy::start(moto.port);
        let api = RuntimeApi::start();
        let mut env = s3_env(&moto, &proxy.endpoint());
        for (k, v) in &mut env {
            if *k == "SENSORLAKE_LAKE__PATH" {
                *v = format!("s3://{BUCKET}/requests");
            }
        }
        let mut f = Function::start(&api, &env);
        let mut sim = Sim::new(100, 77, 0.02, Duration::from_secs(60));
        for when in ["new lake", "second batch"] {
            let batch = event(&sim.records(200, Some(5)));
            assert_eq!(failures(&api.invoke(&mut f, &batch)), Vec::<String>::new());
            println!(
                "S3 requests of one invocation ({when}): {:?}",
                proxy.take_forwarded()
            );
        }
    }

    // What every invocation pays to open the lake as the shard's writer on S3, as the
    // writer's commits since its last snapshot (one per 1,000 commits) grow.
    lake_open_cost(&moto);

    // Warm invocations, for comparison (each one on a lake with one more commit).
    for kind in ["local", "s3"] {
        let dir = tempfile::tempdir().unwrap();
        let env = match kind {
            "local" => lake_env(&dir.path().join("lake")),
            _ => {
                let mut env = s3_env(&moto, &moto.endpoint);
                for (k, v) in &mut env {
                    if *k == "SENSORLAKE_LAKE__PATH" {
                        *v = format!("s3://{BUCKET}/warm");
                    }
                }
                env
            }
        };
        let api = RuntimeApi::start();
        let mut f = Function::start(&api, &env);
        let mut sim = Sim::new(100, 99, 0.02, Duration::from_secs(60));
        api.invoke(&mut f, &event(&sim.records(200, Some(5))));
        let mut warm = Vec::new();
        for _ in 0..STARTS {
            let batch = event(&sim.records(200, Some(5)));
            let started = Instant::now();
            let answer = api.invoke(&mut f, &batch);
            assert_eq!(failures(&answer), Vec::<String>::new());
            warm.push(started.elapsed());
        }
        warm.sort();
        println!(
            "warm invocation ({kind} lake, 200 records): median {:.1} ms, max {:.1} ms; peak RSS {} KiB",
            warm[STARTS / 2].as_secs_f64() * 1000.0,
            warm[STARTS - 1].as_secs_f64() * 1000.0,
            f.peak_rss_kib().unwrap_or(0)
        );
    }
}

/// Times `Lake::open` on moto's S3 for a writer with 10, 500 and 999 commits (each commit
/// record carrying a checkpoint and 100 device states, as the function's do).
fn lake_open_cost(moto: &Moto) {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use sensorlake_core::{DeviceCheckpoint, FlushCounts, TelemetrySchema};
    use sensorlake_ingest::kinesis::{SequenceNumber, ShardCheckpoint};
    use sensorlake_sink::{Flush, Lake, LakeOptions};

    let store: Arc<dyn object_store::ObjectStore> = Arc::new(moto.store(BUCKET));
    let schema = Arc::new(TelemetrySchema::v1_default());
    let open = || {
        let started = Instant::now();
        let opened = Lake::open_object_store(
            store.clone(),
            "open-cost",
            "s3://lake/open-cost",
            WRITER,
            schema.clone(),
            LakeOptions::default(),
        )
        .unwrap();
        (opened, started.elapsed())
    };
    let devices: BTreeMap<String, DeviceCheckpoint> = (0..100)
        .map(|i| {
            (
                format!("env-{i:06}"),
                DeviceCheckpoint {
                    seq: 1000 + i,
                    energy_kwh: None,
                },
            )
        })
        .collect();
    let mut checkpoint = ShardCheckpoint::new("telemetry", SHARD);
    let mut commits = 0u64;
    for target in [10u64, 500, 999] {
        let ((mut lake, _), _) = open();
        while commits < target {
            commits += 1;
            let seq =
                SequenceNumber::parse(&format!("4959033827149025660855969253836157{commits:022}"))
                    .unwrap();
            checkpoint.advance(&seq, None, true);
            lake.commit(&Flush {
                telemetry: &[],
                dead_letters: &[],
                counts: &FlushCounts::default(),
                devices: &devices,
                sources: &checkpoint.to_sources(),
            })
            .unwrap();
        }
        drop(lake);
        let mut took: Vec<Duration> = (0..3).map(|_| open().1).collect();
        took.sort();
        println!(
            "Lake::open on moto S3 with {commits} commits since the last snapshot: median of 3 {:.0} ms",
            took[1].as_secs_f64() * 1000.0
        );
    }
}
