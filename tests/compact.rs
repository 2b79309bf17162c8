//! `sensorlake compact` as a user runs it: a partition of 200 small files becomes a few sorted
//! ones with the same rows, and a SIGKILL at any moment — timed, or right after the commit
//! point — leaves a lake that the next run finishes exactly.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{
    ArrayRef, RecordBatch, StringArray, TimestampMicrosecondArray, UInt64Array, new_null_array,
};
use arrow::array::{Float64Array, as_string_array};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use sensorlake_core::{DeviceCheckpoint, FlushCounts, TelemetrySchema, columns};
use sensorlake_sink::{Flush, Lake, LakeOptions};
use sensorlake_testkit::RowChecksum;

/// 2020-01-01T10:00:00Z, an hour long closed.
const HOUR: i64 = 1_577_872_800_000_000;
const HOUR_US: i64 = 3_600_000_000;
const PARTITION: &str = "telemetry/date=2020-01-01/hour=10";
const TMP: &str = "_sensorlake/compactions/tmp";
const RECORDS: &str = "_sensorlake/compactions";

fn compact(lake: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sensorlake"));
    cmd.args(["compact", "--lake"])
        .arg(lake)
        .args(["--older-than", "1h", "--target-size", "16KiB"])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null());
    cmd
}

fn run_to_end(lake: &Path) -> Output {
    let out = compact(lake).output().unwrap();
    assert!(
        out.status.success(),
        "compact failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A reading: device, ts, seq, temperature.
type Row = (String, i64, u64, f64);

/// A telemetry batch of the default schema.
fn batch(schema: &TelemetrySchema, rows: &[Row]) -> RecordBatch {
    let schema = schema.telemetry().clone();
    let n = rows.len();
    let ts = |f: fn(&Row) -> i64| -> ArrayRef {
        Arc::new(
            TimestampMicrosecondArray::from_iter_values(rows.iter().map(f)).with_timezone("UTC"),
        )
    };
    let strings = |f: &dyn Fn(&Row) -> String| -> ArrayRef {
        Arc::new(StringArray::from_iter_values(rows.iter().map(f)))
    };
    let columns: Vec<ArrayRef> = schema
        .fields()
        .iter()
        .map(|field| match field.name().as_str() {
            columns::DEVICE_ID => strings(&|r| r.0.clone()),
            columns::DEVICE_TYPE => strings(&|_| "env".into()),
            columns::TS => ts(|r| r.1),
            columns::RECEIVED_AT => ts(|r| r.1 + 1_000),
            columns::SEQ => Arc::new(UInt64Array::from_iter_values(rows.iter().map(|r| r.2))),
            "temperature_c" => Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.3))),
            columns::SOURCE => strings(&|_| "mqtt".into()),
            columns::SOURCE_POSITION => strings(&|r| format!("telemetry/s1/env/{}", r.0)),
            _ => new_null_array(field.data_type(), n),
        })
        .collect();
    RecordBatch::try_new(schema, columns).unwrap()
}

/// A lake with one old hour of 200 small files (40 commits of 5 files, rows of 37 devices
/// scattered over the hour), then an empty commit so that none is in the writer's last one.
fn build_lake(root: &Path) {
    let schema = Arc::new(TelemetrySchema::v1_default());
    let options = LakeOptions {
        max_rows_per_file: 20,
        fsync: false,
        ..LakeOptions::default()
    };
    let (mut lake, _) = Lake::open(root, "w0", schema.clone(), options).unwrap();
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let mut next = |below: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % below
    };
    let sources = serde_json::Value::Null;
    for _ in 0..40 {
        let rows: Vec<Row> = (0..100)
            .map(|_| {
                let device = format!("dev-{:02}", next(37));
                let ts = HOUR + next(HOUR_US as u64) as i64;
                (device, ts, next(1 << 40), next(4000) as f64 / 100.0)
            })
            .collect();
        let mut devices = BTreeMap::new();
        for (d, _, seq, _) in &rows {
            let cp = devices.entry(d.clone()).or_insert(DeviceCheckpoint {
                seq: *seq,
                energy_kwh: None,
            });
            cp.seq = cp.seq.max(*seq);
        }
        let counts = FlushCounts {
            received: 100,
            accepted: 100,
            ..FlushCounts::default()
        };
        let summary = lake
            .commit(&Flush {
                telemetry: &[batch(&schema, &rows)],
                dead_letters: &[],
                counts: &counts,
                devices: &devices,
                sources: &sources,
            })
            .unwrap();
        assert_eq!(summary.files.len(), 5);
    }
    lake.commit(&Flush {
        telemetry: &[],
        dead_letters: &[],
        counts: &FlushCounts::default(),
        devices: &BTreeMap::new(),
        sources: &sources,
    })
    .unwrap();
}

/// Every file below `dir`, recursively, sorted.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files(&path));
        } else {
            out.push(path);
        }
    }
    out.sort();
    out
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let dest = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &dest);
        } else {
            std::fs::copy(entry.path(), dest).unwrap();
        }
    }
}

/// Rows and an order-independent checksum (wrapping sum of a hash of each row's values) of
/// every Parquet file of the telemetry table; each must open.
fn content(lake: &Path) -> (usize, u64) {
    let mut sum = RowChecksum::default();
    for file in files(&lake.join("telemetry")) {
        let reader = ParquetRecordBatchReaderBuilder::try_new(File::open(&file).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
            .build()
            .unwrap();
        for batch in reader {
            sum.add(&batch.unwrap());
        }
    }
    (sum.rows, sum.sum)
}

/// `(device_id, ts)` of every row of the partition, file after file in name order.
fn partition_keys(lake: &Path) -> Vec<(String, i64)> {
    let mut keys = Vec::new();
    for file in files(&lake.join(PARTITION)) {
        let reader = ParquetRecordBatchReaderBuilder::try_new(File::open(&file).unwrap())
            .unwrap()
            .build()
            .unwrap();
        for batch in reader {
            let batch = batch.unwrap();
            let ids = as_string_array(batch.column_by_name(columns::DEVICE_ID).unwrap());
            let ts = batch
                .column_by_name(columns::TS)
                .unwrap()
                .as_any()
                .downcast_ref::<TimestampMicrosecondArray>()
                .unwrap();
            keys.extend((0..batch.num_rows()).map(|r| (ids.value(r).to_owned(), ts.value(r))));
        }
    }
    keys
}

/// Where a killed run stopped, judged from what it left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Left {
    /// Nothing of a compaction in progress: killed before it started one, or after it ended.
    Nothing,
    /// A temporary folder without its record: killed while merging, before the commit point;
    /// with this many output files written (the merge reads every input before the first).
    BeforeCommit(usize),
    /// A record whose swap is unfinished: killed after the commit point.
    AfterCommit,
}

fn left(lake: &Path) -> Left {
    let records: Vec<PathBuf> = std::fs::read_dir(lake.join(RECORDS))
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    for record in records
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
    {
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(record).unwrap()).unwrap();
        let exists = |list: &str, key: &str| {
            json[list]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| lake.join(f[key].as_str().unwrap()).exists())
        };
        if exists("inputs", "path") || exists("outputs", "tmp_path") {
            return Left::AfterCommit;
        }
    }
    let tmp_folders = std::fs::read_dir(lake.join(TMP)).map_or(0, |d| d.count());
    if tmp_folders > 0 {
        Left::BeforeCommit(files(&lake.join(TMP)).len())
    } else {
        Left::Nothing
    }
}

/// After the re-run: the same rows, few sorted files, nothing temporary.
fn assert_exact(lake: &Path, expected: (usize, u64), what: &str) {
    assert_eq!(content(lake), expected, "{what}: rows and checksum");
    let parts = files(&lake.join(PARTITION));
    assert!(
        (2..=8).contains(&parts.len())
            && parts.iter().all(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("compact-")
            }),
        "{what}: {parts:?}"
    );
    assert!(
        partition_keys(lake).is_sorted(),
        "{what}: sorted by (device_id, ts)"
    );
    assert!(
        files(&lake.join(TMP)).is_empty(),
        "{what}: {:?}",
        files(&lake.join(TMP))
    );
}

#[test]
fn compact_merges_200_small_files_exactly_and_survives_sigkill_anywhere() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    build_lake(&base);
    assert_eq!(files(&base.join(PARTITION)).len(), 200);
    let expected = content(&base);
    assert_eq!(expected.0, 4000);

    // Uninterrupted: 200 files become a few; a second run does nothing. Its log times the
    // merge: from "Planned compaction" to "Committed a compaction".
    let whole = dir.path().join("whole");
    copy_dir(&base, &whole);
    let (_, log) = run_logged(&whole, Kill::Never);
    let at = |what: &str| {
        log.iter()
            .find(|(line, _)| line.contains(what))
            .unwrap_or_else(|| panic!("no `{what}` in the log: {log:?}"))
            .1
    };
    let (planned, committed, took) = (
        at("Planned compaction"),
        at("Committed a compaction"),
        log.last().unwrap().1,
    );
    assert_exact(&whole, expected, "uninterrupted");
    let again = run_to_end(&whole);
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("nothing to compact"),
        "{}",
        String::from_utf8_lossy(&again.stdout)
    );

    // SIGKILLs: during the merge (after "Planned", at a share of the merge's duration), right
    // at the commit point, or after a delay from the start; until kills have landed both
    // before and after the commit point. Each is followed by a run to the end, exact.
    let merge = committed.saturating_sub(planned);
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let shares = [0.3, 0.9, 0.97, 0.6, 0.99];
    for attempt in 0..15 {
        let share = shares[attempt / 3 % shares.len()];
        let kill = match attempt % 3 {
            0 => Kill::After("Planned compaction", merge.mul_f64(share)),
            1 => Kill::After("Committed a compaction", Duration::ZERO),
            _ => Kill::FromStart(took.mul_f64(share)),
        };
        let lake = dir.path().join(format!("kill-{attempt}"));
        copy_dir(&base, &lake);
        let (killed, _) = run_logged(&lake, kill);
        let landed = if killed { left(&lake) } else { Left::Nothing };
        let kind = match landed {
            Left::BeforeCommit(0) => "before the commit point, no output yet",
            Left::BeforeCommit(_) => "before the commit point, outputs half written",
            Left::AfterCommit => "after the commit point, mid-swap",
            Left::Nothing => "outside a compaction",
        };
        *seen.entry(kind.to_owned()).or_default() += 1;
        let out = run_to_end(&lake);
        if landed == Left::AfterCommit {
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(stdout.contains("recovery: finished"), "{stdout}");
        }
        assert_exact(
            &lake,
            expected,
            &format!("attempt {attempt}: {kill:?}, {landed:?}"),
        );
        std::fs::remove_dir_all(&lake).unwrap();
        let mid_swap = seen.contains_key("after the commit point, mid-swap");
        let mid_merge = seen
            .keys()
            .any(|k| k.starts_with("before the commit point"));
        if mid_swap && mid_merge {
            break;
        }
    }
    eprintln!("merge took {merge:?} of {took:?}; kills landed: {seen:#?}");
    assert!(
        seen.keys().any(|k| k != "outside a compaction"),
        "no kill landed in the middle of a compaction: {seen:?}"
    );
}

/// When [`run_logged`] SIGKILLs the compaction.
#[derive(Debug, Clone, Copy)]
enum Kill {
    Never,
    /// This long after the log line containing the text.
    After(&'static str, Duration),
    /// This long after the start.
    FromStart(Duration),
}

/// Runs a compaction of `lake`, reading its log as it comes, and SIGKILLs it as `kill` says.
/// Returns whether it was killed (rather than ending first) and each log line with when it
/// was read.
fn run_logged(lake: &Path, kill: Kill) -> (bool, Vec<(String, Duration)>) {
    let started = Instant::now();
    let mut child = compact(lake)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            if tx.send((line.unwrap(), started.elapsed())).is_err() {
                return;
            }
        }
    });
    let mut log = Vec::new();
    let mut deadline = match kill {
        Kill::FromStart(delay) => Some(started + delay),
        _ => None,
    };
    let killed = loop {
        let next = match deadline {
            Some(at) => rx.recv_timeout(at.saturating_duration_since(Instant::now())),
            None => rx
                .recv()
                .map_err(|_| std::sync::mpsc::RecvTimeoutError::Disconnected),
        };
        match next {
            Ok((line, at)) => {
                if let Kill::After(what, delay) = kill
                    && deadline.is_none()
                    && line.contains(what)
                {
                    deadline = Some(Instant::now() + delay);
                }
                log.push((line, at));
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                // Killing a process that already exited (not yet reaped) is harmless.
                let ended = child.try_wait().unwrap().is_some();
                child.kill().unwrap();
                break !ended;
            }
            // The log closed: the process is ending on its own.
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break false,
        }
    };
    let status = child.wait().unwrap();
    reader.join().unwrap();
    if !killed {
        assert!(status.success(), "compact failed: {log:?}");
    }
    (killed, log)
}
