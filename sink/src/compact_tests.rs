//! Compaction on every kind of store (the conformance fixture and its `on_every_store!`), plus
//! local-only cases that plant hand-made files in a partition.

use std::sync::Arc;

use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::TimestampMicrosecondType;
use futures_util::TryStreamExt;
use object_store::{ObjectStore, ObjectStoreExt};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use sensorlake_core::columns;
use sensorlake_testkit::RowChecksum;

use crate::conformance::{Backend, Fx, on_every_store};
use crate::test_util::{DAY_US, HOUR_US, T0, fast_options, telemetry_batch};
use crate::{
    CompactOptions, CompactStep, CompactSummary, Compactor, LakeOptions, SinkError, Table,
};

/// 2026-10-28T15:00Z: an hour long closed.
const OLD: i64 = T0 - 30 * DAY_US;
const OLD_HOUR: &str = "telemetry/date=2026-10-28/hour=15";
const OLD_DAY: &str = "dead_letter/date=2026-10-28";

/// The options compaction writes with: small row groups, so that sizes are exact early.
fn options() -> LakeOptions {
    LakeOptions {
        row_group_rows: 4096,
        ..fast_options()
    }
}

fn opts(target_size_bytes: u64) -> CompactOptions {
    CompactOptions {
        target_size_bytes,
        ..CompactOptions::default()
    }
}

fn try_compactor(fx: &Fx) -> Result<Compactor, SinkError> {
    match &fx.backend {
        Backend::Local(dir) => Compactor::open(dir.path(), fx.schema.clone(), &options()),
        Backend::Object {
            store, prefix, url, ..
        } => {
            Compactor::open_object_store(store.clone(), prefix, url, fx.schema.clone(), &options())
        }
    }
}

fn compact(fx: &Fx, opts: &CompactOptions) -> CompactSummary {
    try_compactor(fx).unwrap().run(opts).unwrap()
}

/// What a human does after a killed compaction on an object store.
fn remove_lease(fx: &Fx) {
    if let Backend::Object {
        store, prefix, rt, ..
    } = &fx.backend
    {
        let key = [*prefix, "_sensorlake/compactions/compactor.lease"]
            .iter()
            .filter(|p| !p.is_empty())
            .copied()
            .collect::<Vec<_>>()
            .join("/");
        rt.block_on(store.delete(&object_store::path::Path::from(key)))
            .unwrap();
    }
}

/// A generator of test data, seeded.
struct Rng(u64);

impl Rng {
    fn next(&mut self, below: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % below
    }
}

/// Commits `commits` flushes as `writer`, each of `files` files of `rows` readings in the hour
/// starting at `hour` (devices and times scattered, so files overlap), plus with `dead` one
/// dead letter per commit in `OLD`'s day; then an empty commit, so that no file of these is in
/// the writer's last commit.
fn small_commits(
    fx: &Fx,
    writer: &str,
    hour: i64,
    commits: usize,
    files: usize,
    rows: usize,
    dead: bool,
) {
    let options = LakeOptions {
        max_rows_per_file: rows,
        ..fast_options()
    };
    let (mut lake, _) = fx.try_open_with(writer, options).unwrap();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ hour as u64 ^ writer.len() as u64);
    for _ in 0..commits {
        let owned: Vec<(String, i64, u64)> = (0..files * rows)
            .map(|_| {
                let device = format!("dev-{:02}", rng.next(37));
                let ts = hour + rng.next(HOUR_US as u64) as i64;
                (device, ts, rng.next(1 << 40))
            })
            .collect();
        let readings: Vec<(&str, i64, u64)> =
            owned.iter().map(|(d, t, s)| (d.as_str(), *t, *s)).collect();
        // Anywhere in OLD's day.
        let day = OLD - OLD.rem_euclid(DAY_US);
        let dead_letters = if dead {
            vec![day + rng.next(DAY_US as u64) as i64]
        } else {
            Vec::new()
        };
        let summary = lake
            .commit(&fx.flush(&readings, &dead_letters).flush())
            .unwrap();
        assert_eq!(summary.files.len(), files + usize::from(dead));
    }
    lake.commit(&fx.flush(&[], &[]).flush()).unwrap();
}

/// Rows and an order-independent checksum (the wrapping sum of a hash of each row's values)
/// of every file below `dir`; every file must open.
fn content(fx: &Fx, dir: &str) -> (usize, u64) {
    let mut sum = RowChecksum::default();
    for file in fx.files(dir) {
        for batch in read(fx, &file) {
            sum.add(&batch);
        }
    }
    (sum.rows, sum.sum)
}

/// Both tables.
fn lake_content(fx: &Fx) -> [(usize, u64); 2] {
    [content(fx, "telemetry"), content(fx, "dead_letter")]
}

fn read(fx: &Fx, file: &str) -> Vec<RecordBatch> {
    ParquetRecordBatchReaderBuilder::try_new(fx.read(file))
        .unwrap_or_else(|e| panic!("{file}: {e}"))
        .build()
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// `(device_id, ts)` of every row of `file`, in file order.
fn keys(fx: &Fx, file: &str) -> Vec<(String, i64)> {
    let mut keys = Vec::new();
    for batch in read(fx, file) {
        let ids = batch
            .column_by_name(columns::DEVICE_ID)
            .unwrap()
            .as_string::<i32>();
        let ts = batch
            .column_by_name(columns::TS)
            .unwrap()
            .as_primitive::<TimestampMicrosecondType>();
        keys.extend((0..batch.num_rows()).map(|r| (ids.value(r).to_owned(), ts.value(r))));
    }
    keys
}

fn is_compact_output(path: &str) -> bool {
    path.rsplit('/')
        .next()
        .is_some_and(|name| name.starts_with("compact-"))
}

fn now_us() -> i64 {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    since.as_micros() as i64
}

/// Copies every object of the in-memory lake `from` into the object-store lake `to`.
fn copy_lake(from: &Fx, to: &Fx) {
    let (
        Backend::Object { store: src, rt, .. },
        Backend::Object {
            store: dst, prefix, ..
        },
    ) = (&from.backend, &to.backend)
    else {
        unreachable!("object stores only")
    };
    rt.block_on(async {
        let objects: Vec<_> = src.list(None).try_collect().await.unwrap();
        for meta in objects {
            let bytes = src
                .get(&meta.location)
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
            let key = object_store::path::Path::from(format!("{prefix}/{}", meta.location));
            dst.put(&key, bytes.into()).await.unwrap();
        }
    });
}

fn two_hundred_small_files_become_a_few_sorted_ones(fx: Fx) {
    if let Backend::Object {
        server: Some(_), ..
    } = &fx.backend
    {
        // The writer's protocol takes ~6 requests a file; on an emulator (moto: 9 s) for these 220
        // files. The same commits on an in-memory store, copied over, take one PUT each.
        let memory = Fx::memory();
        small_commits(&memory, "w0", OLD, 20, 10, 50, true);
        copy_lake(&memory, &fx);
    } else {
        small_commits(&fx, "w0", OLD, 20, 10, 50, true);
    }
    // Two small files in the hour still open: not to be touched.
    let now = now_us();
    let current = fx.flush(&[("a", now, 1)], &[]);
    let (mut lake, _) = fx.open("w1");
    lake.commit(&current.flush()).unwrap();
    lake.commit(&current.flush()).unwrap();
    lake.commit(&fx.flush(&[], &[]).flush()).unwrap();
    drop(lake);
    assert_eq!(fx.files(OLD_HOUR).len(), 200);
    assert_eq!(fx.files(OLD_DAY).len(), 20);
    let open_files: Vec<String> = fx
        .files("telemetry")
        .into_iter()
        .filter(|f| !f.starts_with(OLD_HOUR))
        .collect();
    assert_eq!(open_files.len(), 2);
    let before = lake_content(&fx);
    assert_eq!((before[0].0, before[1].0), (10_002, 20));

    let target = 32 << 10;
    let summary = compact(&fx, &opts(target));

    let done: Vec<_> = summary
        .partitions
        .iter()
        .map(|p| (p.table, p.partition.as_str(), p.files_in, p.rows))
        .collect();
    assert_eq!(
        done,
        [
            (Table::Telemetry, OLD_HOUR, 200, 10_000),
            (Table::DeadLetter, OLD_DAY, 20, 20)
        ]
    );
    assert_eq!(lake_content(&fx), before, "the same rows, each once");
    let outputs = fx.files(OLD_HOUR);
    assert!(
        (2..=5).contains(&outputs.len()) && outputs.iter().all(|f| is_compact_output(f)),
        "{outputs:?}"
    );
    assert_eq!(summary.files_out(), outputs.len() + 1);
    for file in &outputs[..outputs.len() - 1] {
        assert!(
            fx.read(file).len() as u64 >= target,
            "{file} reaches the target size"
        );
    }
    let all: Vec<(String, i64)> = outputs.iter().flat_map(|f| keys(&fx, f)).collect();
    assert!(
        all.is_sorted(),
        "sorted by (device_id, ts) within and across the outputs"
    );
    assert_eq!(fx.files(OLD_DAY).len(), 1);
    let still_open: Vec<String> = fx
        .files("telemetry")
        .into_iter()
        .filter(|f| !f.starts_with(OLD_HOUR))
        .collect();
    assert_eq!(still_open, open_files, "the open hour is left alone");
    assert!(fx.files("_sensorlake/compactions/tmp").is_empty());
    let mut records = fx.files("_sensorlake/compactions");
    if let Backend::Local(_) = fx.backend {
        // A lock file stays (unlocked), as a writer's does; an object store's lease goes.
        let lock = records.pop();
        assert_eq!(
            lock.as_deref(),
            Some("_sensorlake/compactions/compactor.lease")
        );
    }
    assert_eq!(
        records,
        [
            "_sensorlake/compactions/00000000000000000000.json",
            "_sensorlake/compactions/00000000000000000001.json"
        ],
        "two records, no lease left"
    );

    let visible = fx.visible();
    let again = compact(&fx, &opts(target));
    assert!(
        again.partitions.is_empty() && again.skipped.is_empty(),
        "{again:?}"
    );
    assert_eq!(fx.visible(), visible, "a second run changes nothing");
}

fn files_of_a_writers_last_commit_are_left_alone(fx: Fx) {
    let (mut w0, _) = fx.open("w0");
    for i in 0..4 {
        w0.commit(&fx.flush(&[("a", OLD + i, i as u64)], &[]).flush())
            .unwrap();
    }
    let (mut w1, _) = fx.open("w1");
    for i in 0..3 {
        w1.commit(
            &fx.flush(&[("b", OLD + i, i as u64), ("c", OLD + i, 1)], &[])
                .flush(),
        )
        .unwrap();
    }
    let last = [
        format!("{OLD_HOUR}/part-w0-0000000003-0000.parquet"),
        format!("{OLD_HOUR}/part-w1-0000000002-0000.parquet"),
    ];
    let last_bytes: Vec<_> = last.iter().map(|f| fx.read(f)).collect();
    let before = lake_content(&fx);
    assert_eq!(fx.files(OLD_HOUR).len(), 7);

    let summary = compact(&fx, &opts(1 << 20));
    assert_eq!(summary.files_in(), 5, "{summary:?}");
    let after = fx.files(OLD_HOUR);
    assert_eq!(after.len(), 3, "{after:?}");
    for (file, bytes) in last.iter().zip(&last_bytes) {
        assert_eq!(&fx.read(file), bytes, "{file} untouched");
    }
    assert_eq!(lake_content(&fx), before);

    // The writers' recovery finds every file of their last commits in place.
    drop((w0, w1));
    let (_, r0) = fx.open("w0");
    let (_, r1) = fx.open("w1");
    assert_eq!((r0.files_made_visible, r1.files_made_visible), (0, 0));
    assert_eq!(fx.files(OLD_HOUR), after);
    assert_eq!(lake_content(&fx), before);
}

const STEPS: [CompactStep; 6] = [
    CompactStep::OutputsWritten,
    CompactStep::RecordWritten,
    CompactStep::OneOutputRenamed,
    CompactStep::OutputsRenamed,
    CompactStep::OneInputDeleted,
    CompactStep::InputsDeleted,
];

fn a_crash_at_any_step_is_finished_by_the_next_run(fx: Fx) {
    let target = 16 << 10;
    for (i, step) in STEPS.into_iter().enumerate() {
        let hour = OLD + (i as i64 + 1) * HOUR_US;
        small_commits(&fx, "w0", hour, 2, 4, 200, false);
        let before = lake_content(&fx);
        let n = i as u64;

        let crashed = try_compactor(&fx)
            .unwrap()
            .crash_after(&opts(target), step)
            .unwrap();
        let [part] = crashed.partitions.as_slice() else {
            panic!("{step:?}: {crashed:?}")
        };
        assert_eq!((part.compaction, part.files_in), (n, 8), "{step:?}");
        assert!(part.files_out >= 2, "{step:?}: several outputs, {part:?}");
        let record = format!("_sensorlake/compactions/{n:020}.json");
        let has_record = fx.files("_sensorlake/compactions").contains(&record);
        assert_eq!(has_record, step != CompactStep::OutputsWritten, "{step:?}");
        let rows = lake_content(&fx)[0].0;
        match step {
            CompactStep::OutputsWritten | CompactStep::RecordWritten => {
                assert!(!fx.files("_sensorlake/compactions/tmp").is_empty());
                assert_eq!(
                    lake_content(&fx),
                    before,
                    "{step:?}: readers see the old files"
                );
            }
            CompactStep::OneOutputRenamed
            | CompactStep::OutputsRenamed
            | CompactStep::OneInputDeleted => {
                // The window the docs describe: a directory reader sees some rows twice.
                assert!(rows > before[0].0, "{step:?}: {rows}");
            }
            CompactStep::InputsDeleted => {
                assert_eq!(lake_content(&fx), before, "{step:?}: the swap is done");
            }
        }

        if let Backend::Object { .. } = fx.backend {
            let err = try_compactor(&fx).unwrap_err();
            let text = err.to_string();
            assert!(
                matches!(err, SinkError::CompactionLocked { .. })
                    && text.contains("_sensorlake/compactions/compactor.lease")
                    && text.contains("delete that object"),
                "{step:?}: {text}"
            );
            remove_lease(&fx);
        }

        let summary = compact(&fx, &opts(target));
        let recovered = &summary.recovered;
        match step {
            CompactStep::OutputsWritten => {
                assert!(recovered.tmp_files_removed >= 2, "{step:?}: {recovered:?}");
                assert_eq!(summary.partitions.len(), 1, "compacted again, from scratch");
            }
            CompactStep::InputsDeleted => {
                assert_eq!(recovered.finished, None, "{step:?}: nothing left to finish");
                assert!(summary.partitions.is_empty());
            }
            _ => {
                assert_eq!(recovered.finished, Some(n), "{step:?}: {recovered:?}");
                assert_eq!(
                    recovered.inputs_deleted > 0,
                    step != CompactStep::InputsDeleted
                );
                assert!(summary.partitions.is_empty(), "{step:?}: {summary:?}");
            }
        }
        assert_eq!(
            lake_content(&fx),
            before,
            "{step:?}: exact after the re-run"
        );
        assert!(
            fx.files("_sensorlake/compactions/tmp").is_empty(),
            "{step:?}: {:?}",
            fx.files("_sensorlake/compactions/tmp")
        );
        let dir = crate::layout::telemetry_partition(hour.div_euclid(HOUR_US));
        let files = fx.files(&dir);
        assert!(
            files.iter().all(|f| is_compact_output(f)),
            "{step:?}: {files:?}"
        );
    }
}

fn only_one_compaction_runs_at_a_time(fx: Fx) {
    small_commits(&fx, "w0", OLD, 1, 1, 1, false);
    let first = try_compactor(&fx).unwrap();
    let err = try_compactor(&fx).unwrap_err();
    assert!(
        matches!(err, SinkError::CompactionLocked { .. })
            && err.to_string().contains("compactor.lease"),
        "{err}"
    );
    drop(first);
    drop(try_compactor(&fx).unwrap());
}

on_every_store!(
    two_hundred_small_files_become_a_few_sorted_ones,
    files_of_a_writers_last_commit_are_left_alone,
    a_crash_at_any_step_is_finished_by_the_next_run,
    only_one_compaction_runs_at_a_time,
);

/// A local lake's root.
fn root(fx: &Fx) -> &std::path::Path {
    match &fx.backend {
        Backend::Local(dir) => dir.path(),
        Backend::Object { .. } => unreachable!("local tests"),
    }
}

/// Writes `batch` as file `name` of partition `dir`, as some other tool might.
fn plant(fx: &Fx, dir: &str, name: &str, batch: &RecordBatch) {
    let file = std::fs::File::create(root(fx).join(dir).join(name)).unwrap();
    crate::encode_parquet(
        file,
        batch.schema_ref(),
        std::slice::from_ref(batch),
        &LakeOptions::default(),
    )
    .unwrap();
}

#[test]
fn an_unsorted_input_is_sorted_before_the_merge() {
    let fx = Fx::local();
    small_commits(&fx, "w0", OLD, 2, 1, 30, false);
    let unsorted = telemetry_batch(
        &fx.schema,
        &[
            ("z", OLD + 5, 1),
            ("a", OLD + 9, 2),
            ("m", OLD, 3),
            ("a", OLD + 1, 4),
        ],
    );
    plant(&fx, OLD_HOUR, "elsewhere.parquet", &unsorted);
    let before = lake_content(&fx);

    let summary = compact(&fx, &opts(1 << 20));
    assert_eq!(summary.files_in(), 3);
    let files = fx.files(OLD_HOUR);
    assert_eq!(files.len(), 1);
    assert!(keys(&fx, &files[0]).is_sorted());
    assert_eq!(lake_content(&fx), before);
}

#[test]
fn a_file_of_other_columns_is_left_alone() {
    let fx = Fx::local();
    small_commits(&fx, "w0", OLD, 3, 1, 10, false);
    let schema = Arc::new(arrow::datatypes::Schema::new(vec![
        arrow::datatypes::Field::new("x", arrow::datatypes::DataType::Int64, false),
    ]));
    let foreign = RecordBatch::try_new(
        schema,
        vec![Arc::new(arrow::array::Int64Array::from(vec![1, 2]))],
    )
    .unwrap();
    plant(&fx, OLD_HOUR, "foreign.parquet", &foreign);
    let foreign_path = format!("{OLD_HOUR}/foreign.parquet");
    let foreign_bytes = fx.read(&foreign_path);

    let summary = compact(&fx, &opts(1 << 20));
    assert_eq!(summary.files_in(), 3);
    assert_eq!(fx.read(&foreign_path), foreign_bytes);
    assert_eq!(fx.files(OLD_HOUR).len(), 2);
}

#[test]
fn a_partition_with_an_unreadable_file_is_skipped_and_reported() {
    let fx = Fx::local();
    small_commits(&fx, "w0", OLD, 3, 1, 10, false);
    small_commits(&fx, "w0", OLD + HOUR_US, 3, 1, 10, false);
    std::fs::write(
        root(&fx).join(OLD_HOUR).join("broken.parquet"),
        b"not parquet at all",
    )
    .unwrap();
    let old_hour_files = fx.files(OLD_HOUR);

    let summary = compact(&fx, &opts(1 << 20));
    assert_eq!(summary.skipped.len(), 1, "{summary:?}");
    assert_eq!(summary.skipped[0].partition, OLD_HOUR);
    assert!(
        summary.skipped[0].reason.contains("broken.parquet"),
        "{summary:?}"
    );
    assert_eq!(fx.files(OLD_HOUR), old_hour_files, "left as it was");
    assert_eq!(summary.partitions.len(), 1, "the next hour is compacted");
    assert!(fx.files("_sensorlake/compactions/tmp").is_empty());
}

#[test]
fn a_partition_over_the_merge_memory_is_merged_in_groups() {
    let fx = Fx::local();
    small_commits(&fx, "w0", OLD, 4, 5, 40, false);
    let before = lake_content(&fx);
    let sizes: Vec<u64> = fx
        .files(OLD_HOUR)
        .iter()
        .map(|f| fx.read(f).len() as u64)
        .collect();
    let merge_memory_bytes = sizes.iter().sum::<u64>() / 3;

    let summary = compact(
        &fx,
        &CompactOptions {
            merge_memory_bytes,
            ..opts(1 << 30)
        },
    );
    assert_eq!(summary.files_in(), 20);
    let files = fx.files(OLD_HOUR);
    assert!(
        (3..=4).contains(&files.len()),
        "one output per group: {files:?}"
    );
    for file in &files {
        assert!(keys(&fx, file).is_sorted(), "{file}");
    }
    assert_eq!(lake_content(&fx), before);
}

/// A local lake of three small files in an old hour whose compaction crashed right after
/// writing its record: outputs under temporary names, inputs in place.
fn compaction_interrupted_at_its_commit_point() -> Fx {
    let fx = Fx::local();
    small_commits(&fx, "w0", OLD, 3, 1, 10, false);
    try_compactor(&fx)
        .unwrap()
        .crash_after(&opts(1 << 20), CompactStep::RecordWritten)
        .unwrap();
    fx
}

#[test]
fn an_output_lost_after_the_commit_point_stops_compaction_for_a_human() {
    let fx = compaction_interrupted_at_its_commit_point();
    std::fs::remove_file(
        root(&fx).join("_sensorlake/compactions/tmp/00000000000000000000/0.parquet"),
    )
    .unwrap();
    let before = fx.visible();

    let err = try_compactor(&fx).unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, SinkError::CompactionBroken { .. })
            && text.contains("compact-0000000000-0000.parquet")
            && text.contains("Every input is still in place"),
        "{text}"
    );
    assert_eq!(fx.visible(), before, "nothing touched");

    // The human's fix: the record moved aside. Its number stays taken.
    std::fs::rename(
        root(&fx).join("_sensorlake/compactions/00000000000000000000.json"),
        root(&fx).join("_sensorlake/compactions/00000000000000000000.json.resolved"),
    )
    .unwrap();
    let summary = compact(&fx, &opts(1 << 20));
    assert_eq!(summary.partitions[0].compaction, 1);
    assert_eq!(fx.files(OLD_HOUR).len(), 1);
}

#[test]
fn compacting_a_folder_that_is_no_lake_fails_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("typo");
    let schema = Arc::new(sensorlake_core::TelemetrySchema::v1_default());
    let err = Compactor::open(&missing, schema, &options()).unwrap_err();
    assert!(matches!(err, SinkError::InvalidLake { .. }), "{err}");
    assert!(!missing.exists());
}

#[test]
fn a_file_that_lands_during_a_compaction_is_left_alone() {
    let fx = compaction_interrupted_at_its_commit_point();
    // A late reading for the old hour, committed after the compaction's plan.
    let (mut lake, _) = fx.open("w1");
    lake.commit(&fx.flush(&[("late", OLD + 7, 1)], &[]).flush())
        .unwrap();
    let late = format!("{OLD_HOUR}/part-w1-0000000000-0000.parquet");
    let before = lake_content(&fx);

    let summary = compact(&fx, &opts(1 << 20));
    assert_eq!(summary.recovered.inputs_deleted, 3, "{summary:?}");
    assert!(
        fx.files(OLD_HOUR).contains(&late),
        "{:?}",
        fx.files(OLD_HOUR)
    );
    assert_eq!(fx.files(OLD_HOUR).len(), 2, "the output and the late file");
    assert_eq!(
        lake_content(&fx),
        before,
        "every row once, the late one included"
    );
}
