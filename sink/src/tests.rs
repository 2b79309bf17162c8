//! Tests of the lake as a whole: the commit protocol, recovery, locking, the file format.

use std::fs;
use std::path::Path;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, TimeUnit};
use arrow::util::pretty::pretty_format_batches;
use parquet::basic::{Compression, LogicalType};
use parquet::file::reader::{FileReader, SerializedFileReader};
use sensorlake_core::{DeviceCheckpoint, TelemetrySchema};
use serde_json::json;
use tempfile::TempDir;

use crate::lake::Failpoint;
use crate::test_util::{
    DAY_US, HOUR_US, T0, TestFlush, fast_options, list_files, read_parquet, telemetry_batch,
};
use crate::{
    CommitStep, Lake, LakeOptions, Recovered, SinkError, Table, encode_parquet, read_commit_records,
};

struct Fixture {
    dir: TempDir,
    schema: Arc<TelemetrySchema>,
}

impl Fixture {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            schema: Arc::new(TelemetrySchema::v1_default()),
        }
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    fn open(&self, writer: &str) -> (Lake, Recovered) {
        self.try_open(writer).unwrap()
    }

    fn try_open(&self, writer: &str) -> Result<(Lake, Recovered), SinkError> {
        Lake::open(self.root(), writer, self.schema.clone(), fast_options())
    }

    fn flush(&self, rows: &[(&str, i64, u64)], dead: &[i64]) -> TestFlush {
        TestFlush::new(&self.schema, rows, dead)
    }

    /// Visible table files, relative to the root, sorted.
    fn visible(&self) -> Vec<String> {
        let mut files = Vec::new();
        for table in [Table::Telemetry, Table::DeadLetter] {
            files.extend(
                list_files(&self.root().join(table.dir()))
                    .into_iter()
                    .map(|f| format!("{}/{f}", table.dir())),
            );
        }
        files.sort();
        files
    }

    fn tmp_files(&self) -> Vec<String> {
        list_files(&self.root().join("_sensorlake/tmp"))
    }

    /// Rows in all visible telemetry files.
    fn telemetry_rows(&self) -> usize {
        self.visible()
            .iter()
            .filter(|f| f.starts_with("telemetry/"))
            .flat_map(|f| read_parquet(&self.root().join(f)))
            .map(|b| b.num_rows())
            .sum()
    }
}

fn recovered_nothing(r: &Recovered) -> bool {
    r.files_made_visible == 0 && r.files_removed == 0
}

#[test]
fn round_trip_writes_hive_partitions_with_utc_micros_and_zstd() {
    let fx = Fixture::new();
    let options = LakeOptions::default(); // fsync on: exercises the durable path
    let (mut lake, recovered) = Lake::open(fx.root(), "w0", fx.schema.clone(), options).unwrap();
    assert_eq!(recovered, Recovered::default());

    let t = fx.flush(
        &[
            ("a", T0 + 10, 1),
            ("b", T0 + HOUR_US + 20, 5),
            ("a", T0 + DAY_US, 2),
            ("b", T0 + 30, 4),
        ],
        &[T0, T0 + DAY_US + 1],
    );
    let summary = lake.commit(&t.flush()).unwrap();
    assert_eq!(summary.commit, 0);
    assert_eq!(summary.rows, 6);
    assert_eq!(
        summary.bytes,
        summary.files.iter().map(|f| f.bytes).sum::<u64>()
    );
    let paths: Vec<_> = summary
        .files
        .iter()
        .map(|f| (f.table, f.path.as_str(), f.rows))
        .collect();
    assert_eq!(
        paths,
        [
            (
                Table::Telemetry,
                "telemetry/date=2026-11-27/hour=15/part-w0-0000000000-0000.parquet",
                2
            ),
            (
                Table::Telemetry,
                "telemetry/date=2026-11-27/hour=16/part-w0-0000000000-0001.parquet",
                1
            ),
            (
                Table::Telemetry,
                "telemetry/date=2026-11-28/hour=15/part-w0-0000000000-0002.parquet",
                1
            ),
            (
                Table::DeadLetter,
                "dead_letter/date=2026-11-27/part-w0-0000000000-0003.parquet",
                1
            ),
            (
                Table::DeadLetter,
                "dead_letter/date=2026-11-28/part-w0-0000000000-0004.parquet",
                1
            ),
        ]
    );
    let mut expected_visible: Vec<_> = summary.files.iter().map(|f| f.path.clone()).collect();
    expected_visible.sort();
    assert_eq!(fx.visible(), expected_visible);
    assert_eq!(fx.tmp_files(), Vec::<String>::new());
    for f in &summary.files {
        let len = fs::metadata(fx.root().join(&f.path)).unwrap().len();
        assert_eq!(len, f.bytes, "{}", f.path);
    }

    // Rows come back as written.
    let first = read_parquet(&fx.root().join(&summary.files[0].path));
    // Pretty-printing knows offsets, not zone names (no chrono-tz): show `ts` at +00:00.
    let projected: Vec<_> = first
        .iter()
        .map(|b| {
            let b = b.project(&[0, 2, 3]).unwrap();
            let plus0 = DataType::Timestamp(TimeUnit::Microsecond, Some("+00:00".into()));
            let mut columns = b.columns().to_vec();
            columns[1] = arrow::compute::cast(&columns[1], &plus0).unwrap();
            RecordBatch::try_from_iter(["device_id", "ts", "seq"].into_iter().zip(columns)).unwrap()
        })
        .collect();
    assert_eq!(
        pretty_format_batches(&projected).unwrap().to_string(),
        [
            "+-----------+-----------------------------+-----+",
            "| device_id | ts                          | seq |",
            "+-----------+-----------------------------+-----+",
            "| a         | 2026-11-27T15:00:00.000010Z | 1   |",
            "| b         | 2026-11-27T15:00:00.000030Z | 4   |",
            "+-----------+-----------------------------+-----+",
        ]
        .join("\n")
    );
    assert_eq!(
        first[0].schema().field(2).data_type(),
        &DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
    );
    let dead = read_parquet(&fx.root().join(&summary.files[4].path));
    assert_eq!(dead[0].schema(), *fx.schema.dead_letter());

    // The Parquet schema says UTC micros; the chunks are zstd with statistics.
    let reader =
        SerializedFileReader::new(fs::File::open(fx.root().join(&summary.files[0].path)).unwrap())
            .unwrap();
    let meta = reader.metadata();
    let ts = meta.file_metadata().schema_descr().column(2);
    assert_eq!(ts.name(), "ts");
    assert_eq!(
        ts.logical_type_ref(),
        Some(&LogicalType::timestamp(
            true,
            parquet::basic::TimeUnit::MICROS
        ))
    );
    let chunk = meta.row_group(0).column(2);
    assert!(matches!(chunk.compression(), Compression::ZSTD(_)));
    assert!(chunk.statistics().is_some(), "statistics are written");
    assert!(
        meta.file_metadata()
            .created_by()
            .is_some_and(|c| c.starts_with("sensorlake"))
    );

    // The commit record names the files and carries the counts.
    let records = read_commit_records(fx.root()).unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].writer, "w0");
    assert_eq!(records[0].version, 1);
    assert_eq!(records[0].counts, t.counts);
    assert_eq!(records[0].devices, t.devices);
    assert_eq!(records[0].files.len(), 5);
    assert_eq!(
        records[0].files[0].tmp_path,
        "_sensorlake/tmp/w0/00000000000000000000/0.parquet"
    );
    assert!(
        sensorlake_core::time::parse_rfc3339(&records[0].created_at).is_some(),
        "{}",
        records[0].created_at
    );
}

#[test]
fn a_partition_over_max_rows_per_file_is_split_into_several_files() {
    let fx = Fixture::new();
    let options = LakeOptions {
        max_rows_per_file: 4,
        row_group_rows: 2,
        ..fast_options()
    };
    let (mut lake, _) = Lake::open(fx.root(), "w0", fx.schema.clone(), options).unwrap();
    let rows: Vec<_> = (0..10).map(|i| ("a", T0 + i, i as u64)).collect();
    let summary = lake.commit(&fx.flush(&rows, &[]).flush()).unwrap();
    let sizes: Vec<_> = summary.files.iter().map(|f| f.rows).collect();
    assert_eq!(sizes, [4, 4, 2]);
    assert!(
        summary
            .files
            .iter()
            .all(|f| f.path.starts_with("telemetry/date=2026-11-27/hour=15/"))
    );
    assert_eq!(fx.telemetry_rows(), 10);
    let reader =
        SerializedFileReader::new(fs::File::open(fx.root().join(&summary.files[0].path)).unwrap())
            .unwrap();
    assert_eq!(
        reader.metadata().num_row_groups(),
        2,
        "row groups of 2 rows"
    );
}

#[test]
fn an_empty_flush_writes_a_commit_record_without_files() {
    let fx = Fixture::new();
    let (mut lake, _) = fx.open("w0");
    let mut t = fx.flush(&[], &[]);
    t.counts.received = 3;
    t.counts.duplicates = 3;
    let summary = lake.commit(&t.flush()).unwrap();
    assert_eq!((summary.commit, summary.rows, summary.bytes), (0, 0, 0));
    assert!(summary.files.is_empty());
    assert_eq!(lake.next_commit(), 1);
    assert_eq!(lake.commit(&t.flush()).unwrap().commit, 1);
    assert_eq!(lake.next_commit(), 2);
    assert!(fx.visible().is_empty());
    drop(lake);

    let (_, recovered) = fx.open("w0");
    assert_eq!(recovered.last_commit, Some(1));
    assert_eq!(recovered.totals.duplicates, 6);
}

#[test]
fn recovery_removes_the_files_of_a_flush_that_crashed_before_its_commit_point() {
    let fx = Fixture::new();
    let (mut lake, _) = fx.open("w0");
    lake.commit(&fx.flush(&[("a", T0, 1)], &[]).flush())
        .unwrap();
    let t = fx.flush(&[("a", T0 + 1, 2), ("b", T0 + HOUR_US, 1)], &[T0]);
    lake.crash_after(&t.flush(), CommitStep::FilesWritten)
        .unwrap();
    assert_eq!(fx.tmp_files().len(), 3, "the crashed flush left its files");
    assert_eq!(fx.visible().len(), 1);

    let (lake, recovered) = fx.open("w0");
    assert_eq!(recovered.last_commit, Some(0));
    assert_eq!(recovered.files_made_visible, 0);
    assert_eq!(recovered.files_removed, 3);
    assert_eq!(
        recovered.devices["a"].seq, 1,
        "the crashed flush is not counted"
    );
    assert!(!recovered.devices.contains_key("b"));
    assert_eq!(
        fx.visible().len(),
        1,
        "nothing of the crashed flush is visible"
    );
    assert!(fx.tmp_files().is_empty());
    assert_eq!(lake.next_commit(), 1, "the commit number is reused");
}

#[test]
fn recovery_after_the_files_are_visible_has_nothing_to_do() {
    let fx = Fixture::new();
    let (lake, _) = fx.open("w0");
    let t = fx.flush(&[("a", T0, 1)], &[]);
    lake.crash_after(&t.flush(), CommitStep::FilesVisible)
        .unwrap();
    assert_eq!(fx.visible().len(), 1);

    let (lake, recovered) = fx.open("w0");
    assert_eq!(recovered.last_commit, Some(0));
    assert!(recovered_nothing(&recovered), "{recovered:?}");
    assert!(fx.tmp_files().is_empty());
    assert!(
        !fx.root()
            .join("_sensorlake/tmp/w0/00000000000000000000")
            .exists(),
        "the emptied temporary folder is gone"
    );
    assert_eq!(lake.next_commit(), 1);
}

#[test]
fn recovery_folds_devices_and_totals_across_commits_and_keeps_the_last_sources() {
    let fx = Fixture::new();
    let (mut lake, _) = fx.open("w0");
    let mut t1 = fx.flush(&[("a", T0, 1), ("b", T0, 7)], &[T0]);
    t1.sources = json!([{"shard": "s-0", "sequence": "1"}]);
    lake.commit(&t1.flush()).unwrap();
    let mut t2 = fx.flush(&[("a", T0 + 1, 3)], &[]);
    t2.devices.get_mut("a").unwrap().energy_kwh = Some(4.5);
    t2.sources = json!([{"shard": "s-0", "sequence": "9"}, {"shard": "s-1", "sequence": "2"}]);
    lake.commit(&t2.flush()).unwrap();
    drop(lake);

    let (lake, recovered) = fx.open("w0");
    assert_eq!(recovered.last_commit, Some(1));
    assert_eq!(
        recovered.devices["a"],
        DeviceCheckpoint {
            seq: 3,
            energy_kwh: Some(4.5)
        }
    );
    assert_eq!(recovered.devices["b"].seq, 7);
    let mut totals = t1.counts.clone();
    totals.add(&t2.counts);
    assert_eq!(recovered.totals, totals);
    assert!(recovered.totals.adds_up());
    assert_eq!(
        recovered.sources,
        [
            json!({"shard": "s-0", "sequence": "9"}),
            json!({"shard": "s-1", "sequence": "2"})
        ]
    );
    assert_eq!(lake.next_commit(), 2);
}

/// Every few commits (4 in tests, 1,000 in builds) the writer snapshots its folded state, and
/// recovery starts from the newest snapshot: with the records it summarises deleted, the
/// recovered state is the same, so those records were not read. A damaged snapshot is
/// skipped for an older one.
#[test]
fn recovery_starts_from_the_newest_snapshot_and_reads_only_the_records_after_it() {
    let fx = Fixture::new();
    let (mut lake, _) = fx.open("w0");
    let mut expected_totals = sensorlake_core::FlushCounts::default();
    for i in 0..10u64 {
        let t = fx.flush(
            &[("a", T0 + i as i64, i + 1), (&format!("d{i}"), T0, 1)],
            &[],
        );
        expected_totals.add(&t.counts);
        lake.commit(&t.flush()).unwrap();
    }
    drop(lake);
    let snapshots = fx.root().join("_sensorlake/snapshots/w0");
    assert_eq!(
        list_files(&snapshots),
        ["00000000000000000003.json", "00000000000000000007.json"]
    );
    let (lake, full) = fx.open("w0");
    drop(lake);
    assert_eq!(full.totals, expected_totals);
    assert_eq!(full.devices.len(), 11);
    assert_eq!(full.devices["a"].seq, 10);

    // Records 0..=6 are summarised by snapshot 7: recovery must not need them.
    for c in 0..7 {
        fs::remove_file(
            fx.root()
                .join(format!("_sensorlake/commits/w0/{c:020}.json")),
        )
        .unwrap();
    }
    let (lake, from_snapshot) = fx.open("w0");
    drop(lake);
    assert_eq!(from_snapshot, full);

    // A damaged newest snapshot: the older one is used (and records 4..=6 are gone, so the
    // fold now lacks them — which shows the older snapshot was the one read).
    fs::write(snapshots.join("00000000000000000007.json"), b"{oops").unwrap();
    let (lake, older) = fx.open("w0");
    assert_eq!(older.last_commit, Some(9));
    assert_eq!(lake.next_commit(), 10);
    assert!(older.devices.contains_key("d3") && !older.devices.contains_key("d4"));
    assert!(older.devices.contains_key("d7"));
}

#[test]
fn reopening_twice_is_idempotent() {
    let fx = Fixture::new();
    let (mut lake, _) = fx.open("w0");
    lake.commit(&fx.flush(&[("a", T0, 1)], &[T0]).flush())
        .unwrap();
    lake.crash_after(
        &fx.flush(&[("a", T0, 2)], &[]).flush(),
        CommitStep::RecordWritten,
    )
    .unwrap();
    let (lake, first) = fx.open("w0");
    let visible = fx.visible();
    drop(lake);
    let (lake, second) = fx.open("w0");
    assert_eq!(first.files_made_visible, 1);
    assert!(recovered_nothing(&second));
    assert_eq!(
        Recovered {
            files_made_visible: 0,
            ..first
        },
        second
    );
    assert_eq!(fx.visible(), visible);
    assert_eq!(lake.next_commit(), 2);
}

#[test]
fn a_second_open_of_the_same_writer_fails_while_the_first_is_alive() {
    let fx = Fixture::new();
    let (lake, _) = fx.open("w0");
    match fx.try_open("w0") {
        Err(SinkError::Locked { writer, lock_path }) => {
            assert_eq!(writer, "w0");
            assert_eq!(lock_path, fx.root().join("_sensorlake/locks/w0.lock"));
        }
        other => panic!("expected Locked, got {other:?}"),
    }
    let message = fx.try_open("w0").unwrap_err().to_string();
    assert!(message.contains("w0.lock"), "{message}");
    assert!(message.contains("own writer id"), "{message}");
    drop(lake);
    fx.open("w0");
}

#[test]
fn different_writers_coexist_and_never_collide_on_file_names() {
    let fx = Fixture::new();
    let (mut w0, _) = fx.open("w0");
    let (mut w1, _) = fx.open("w1");
    let t = fx.flush(&[("a", T0, 1)], &[T0]);
    let s0 = w0.commit(&t.flush()).unwrap();
    let s1 = w1.commit(&t.flush()).unwrap();
    assert_eq!((s0.commit, s1.commit), (0, 0));
    assert_eq!(fx.visible().len(), 4, "same commit number, distinct files");
    assert!(s0.files.iter().all(|f| f.path.contains("part-w0-")));
    assert!(s1.files.iter().all(|f| f.path.contains("part-w1-")));

    let records = read_commit_records(fx.root()).unwrap();
    let ids: Vec<_> = records
        .iter()
        .map(|r| (r.writer.as_str(), r.commit))
        .collect();
    assert_eq!(ids, [("w0", 0), ("w1", 0)]);

    // Recovery of one writer leaves the other's temporary files alone.
    drop(w1);
    w0.crash_after(&t.flush(), CommitStep::FilesWritten)
        .unwrap();
    let (_, r1) = fx.open("w1");
    assert_eq!(r1.files_removed, 0);
    assert_eq!(
        fx.tmp_files().len(),
        2,
        "w0's crashed flush is w0's to clean up"
    );
}

#[test]
fn open_rejects_invalid_writer_ids() {
    let fx = Fixture::new();
    let long = "x".repeat(65);
    for bad in ["../x", "a/b", "", long.as_str()] {
        assert!(
            matches!(fx.try_open(bad), Err(SinkError::InvalidWriterId { .. })),
            "{bad:?}"
        );
    }
    assert!(
        !fx.root().join("_sensorlake").exists(),
        "nothing is created for an invalid id"
    );
}

#[test]
fn a_failure_before_the_commit_point_removes_what_was_written_and_a_retry_succeeds() {
    let fx = Fixture::new();
    let (mut lake, _) = fx.open("w0");
    let t = fx.flush(&[("a", T0, 1), ("a", T0 + HOUR_US, 2)], &[T0]);
    lake.set_failpoint(Some(Failpoint::TmpFile(1)));
    let err = lake.commit(&t.flush()).unwrap_err();
    assert!(!err.is_committed());
    assert!(err.to_string().contains("injected failure"), "{err}");
    assert!(
        err.to_string()
            .contains("_sensorlake/tmp/w0/00000000000000000000/1.parquet"),
        "{err}"
    );
    assert_eq!(lake.next_commit(), 0);
    assert!(fx.tmp_files().is_empty(), "file 0 was removed");
    assert!(fx.visible().is_empty());
    assert!(read_commit_records(fx.root()).unwrap().is_empty());

    lake.set_failpoint(None);
    let summary = lake.commit(&t.flush()).unwrap();
    assert_eq!(summary.commit, 0, "the retry gets the same commit number");
    assert_eq!(fx.visible().len(), 3);
    assert_eq!(fx.telemetry_rows(), 2);
}

#[test]
fn a_failure_while_publishing_is_finished_by_a_retry_without_duplicating_rows() {
    let fx = Fixture::new();
    let (mut lake, _) = fx.open("w0");
    let t = fx.flush(&[("a", T0, 1), ("a", T0 + DAY_US, 2)], &[]);
    // A file where the second partition's date folder belongs makes step 4 fail.
    fs::create_dir_all(fx.root().join("telemetry")).unwrap();
    let blocker = fx.root().join("telemetry/date=2026-11-28");
    fs::write(&blocker, b"in the way").unwrap();

    let err = lake.commit(&t.flush()).unwrap_err();
    assert!(err.is_committed(), "{err}");
    assert!(matches!(err, SinkError::NotVisible { commit: 0, .. }));
    assert!(err.to_string().contains("durable"), "{err}");
    assert_eq!(lake.next_commit(), 1);
    assert_eq!(read_commit_records(fx.root()).unwrap().len(), 1);

    // Still blocked: the retry reports the same.
    assert!(matches!(
        lake.commit(&t.flush()),
        Err(SinkError::NotVisible { commit: 0, .. })
    ));

    fs::remove_file(&blocker).unwrap();
    let summary = lake.commit(&t.flush()).unwrap();
    assert_eq!(summary.commit, 0, "the retry is recognised");
    assert_eq!(summary.rows, 2);
    assert_eq!(lake.next_commit(), 1);
    assert_eq!(fx.telemetry_rows(), 2, "no row twice");
    assert_eq!(read_commit_records(fx.root()).unwrap().len(), 1);
    assert!(fx.tmp_files().is_empty());
}

#[test]
fn a_failure_while_publishing_is_finished_before_the_next_flush() {
    let fx = Fixture::new();
    let (mut lake, _) = fx.open("w0");
    let t1 = fx.flush(&[("a", T0, 1), ("a", T0 + DAY_US, 2)], &[]);
    fs::create_dir_all(fx.root().join("telemetry")).unwrap();
    let blocker = fx.root().join("telemetry/date=2026-11-28");
    fs::write(&blocker, b"in the way").unwrap();
    assert!(lake.commit(&t1.flush()).unwrap_err().is_committed());
    fs::remove_file(&blocker).unwrap();

    let t2 = fx.flush(&[("a", T0 + 5, 3)], &[]);
    let summary = lake.commit(&t2.flush()).unwrap();
    assert_eq!(summary.commit, 1, "a different flush gets its own commit");
    assert_eq!(fx.telemetry_rows(), 3);
    assert_eq!(fx.visible().len(), 3);
}

#[test]
fn a_commit_record_of_unknown_durability_poisons_the_lake_until_reopened() {
    let fx = Fixture::new();
    let (mut lake, _) = fx.open("w0");
    let t = fx.flush(&[("a", T0, 1)], &[]);
    lake.set_failpoint(Some(Failpoint::RecordDirSync));
    let err = lake.commit(&t.flush()).unwrap_err();
    assert!(
        matches!(err, SinkError::Poisoned { commit: 0, .. }),
        "{err}"
    );
    assert!(!err.is_committed());
    lake.set_failpoint(None);
    assert!(matches!(
        lake.commit(&t.flush()),
        Err(SinkError::Poisoned { commit: 0, .. })
    ));
    assert!(fx.visible().is_empty());
    drop(lake);

    // Here the record did survive, so recovery finishes the commit.
    let (lake, recovered) = fx.open("w0");
    assert_eq!(recovered.last_commit, Some(0));
    assert_eq!(recovered.files_made_visible, 1);
    assert_eq!(lake.next_commit(), 1);
}

#[test]
fn batches_of_the_wrong_schema_are_rejected_before_anything_is_written() {
    let fx = Fixture::new();
    let (mut lake, _) = fx.open("w0");
    let mut t = fx.flush(&[("a", T0, 1)], &[]);
    t.dead_letters = t.telemetry.clone();
    let err = lake.commit(&t.flush()).unwrap_err();
    assert!(
        matches!(
            err,
            SinkError::SchemaMismatch {
                table: Table::DeadLetter,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(lake.next_commit(), 0);
    assert!(fx.visible().is_empty() && fx.tmp_files().is_empty());
}

#[test]
fn stray_commit_record_temporaries_are_removed_at_open() {
    let fx = Fixture::new();
    let (mut lake, _) = fx.open("w0");
    lake.commit(&fx.flush(&[("a", T0, 1)], &[]).flush())
        .unwrap();
    drop(lake);
    let stray = fx
        .root()
        .join("_sensorlake/commits/w0/00000000000000000001.json.tmp");
    fs::write(&stray, b"{\"version\": 1, \"wri").unwrap();
    let (lake, recovered) = fx.open("w0");
    assert!(!stray.exists());
    assert_eq!(recovered.last_commit, Some(0));
    assert_eq!(lake.next_commit(), 1);
}

#[test]
fn recovery_refuses_a_commit_record_that_points_outside_the_lake() {
    let fx = Fixture::new();
    let (lake, _) = fx.open("w0");
    lake.crash_after(
        &fx.flush(&[("a", T0, 1)], &[]).flush(),
        CommitStep::RecordWritten,
    )
    .unwrap();
    let record = fx
        .root()
        .join("_sensorlake/commits/w0/00000000000000000000.json");
    let text = fs::read_to_string(&record).unwrap();
    let tampered = text.replace("\"path\":\"telemetry/", "\"path\":\"telemetry/../../");
    assert_ne!(text, tampered);
    fs::write(&record, tampered).unwrap();
    match fx.try_open("w0") {
        Err(SinkError::InvalidCommitRecord { path, why }) => {
            assert_eq!(path, record);
            assert!(why.contains("not a file of the telemetry table"), "{why}");
        }
        other => panic!("expected InvalidCommitRecord, got {other:?}"),
    }

    fs::write(&record, b"{ not json").unwrap();
    assert!(matches!(
        fx.try_open("w0"),
        Err(SinkError::CorruptCommitRecord { .. })
    ));
}

#[test]
fn encode_parquet_into_a_discarding_writer_returns_the_rows() {
    let schema = TelemetrySchema::v1_default();
    let rows: Vec<_> = (0..1000).map(|i| ("dev", T0 + i, i as u64)).collect();
    let batch = telemetry_batch(&schema, &rows);
    let n = encode_parquet(
        std::io::sink(),
        schema.telemetry(),
        &[batch.clone(), batch],
        &LakeOptions::default(),
    )
    .unwrap();
    assert_eq!(n, 2000);

    let bad = LakeOptions {
        zstd_level: 0,
        ..LakeOptions::default()
    };
    assert!(matches!(
        encode_parquet(std::io::sink(), schema.telemetry(), &[], &bad),
        Err(SinkError::InvalidOptions {
            field: "zstd_level",
            ..
        })
    ));
}

#[test]
fn lake_urls_that_cannot_work_are_refused_with_what_to_write_instead() {
    let schema = Arc::new(TelemetrySchema::v1_default());
    for (url, says) in [
        (
            "ftp://host/lake",
            "use a local path, file://, s3://, az:// or gs://",
        ),
        ("s3://", "no bucket or container"),
        ("gs:///prefix", "no bucket or container"),
        ("az://", "no bucket or container"),
    ] {
        match Lake::open(Path::new(url), "w0", schema.clone(), fast_options()) {
            Err(e @ SinkError::InvalidLake { .. }) => {
                let text = e.to_string();
                assert!(text.contains(url) && text.contains(says), "{url}: {text}");
            }
            other => panic!("{url}: {other:?}"),
        }
    }
}
