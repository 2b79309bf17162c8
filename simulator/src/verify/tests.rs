//! Tests of `verify` against lakes written by hand: a tiny "perfect pipeline" decodes the
//! fleet's payloads with serde_json and writes the telemetry and dead-letter tables of
//! `TelemetrySchema::v1_default()` in the lake layout; each test then breaks one thing.

use std::collections::BTreeMap;
use std::fs::{self, File};

use arrow::array::{
    BinaryArray, Float64Array, StringArray, TimestampMicrosecondArray, UInt64Array,
};
use parquet::arrow::ArrowWriter;
use sensorlake_core::time::{parse_rfc3339, partition_of};
use serde_json::Value;

use super::*;
use crate::fleet::{Expect, Fleet, FleetSpec, Message};
use crate::manifest::ManifestBuilder;

const NOW_MS: i64 = 1_764_255_845_123;

#[derive(Debug, Clone)]
struct TelRow {
    device_id: String,
    device_type: String,
    ts_us: i64,
    seq: u64,
    /// By metric column index.
    metrics: Vec<Option<f64>>,
    topic: String,
}

#[derive(Debug, Clone)]
struct DlRow {
    reason: String,
    payload: Vec<u8>,
    device_id: Option<String>,
    seq: Option<u64>,
    topic: String,
}

/// What a correct pipeline writes for these messages.
#[derive(Debug, Clone)]
struct Lake {
    telemetry: Vec<TelRow>,
    dead: Vec<DlRow>,
}

fn decode(schema: &TelemetrySchema, m: &Message) -> TelRow {
    let v: Value = serde_json::from_slice(&m.payload).unwrap();
    let ty = v["type"].as_str().unwrap();
    let t = schema.type_index(ty).unwrap();
    let mut metrics = vec![None; schema.metric_columns().len()];
    for (spec, &slot) in schema.device_types()[t]
        .metrics
        .iter()
        .zip(schema.metric_slots(t))
    {
        metrics[slot] = v["metrics"][&spec.name].as_f64();
    }
    let ts_us = match &v["ts"] {
        Value::String(s) => parse_rfc3339(s).unwrap(),
        n => n.as_i64().unwrap() * 1000,
    };
    TelRow {
        device_id: v["device_id"].as_str().unwrap().to_owned(),
        device_type: ty.to_owned(),
        ts_us,
        seq: v["seq"].as_u64().unwrap(),
        metrics,
        topic: m.topic.clone(),
    }
}

/// A fleet run, its manifest, and the lake a correct pipeline would write.
fn scenario(devices: usize, messages: usize, bad_ratio: f64) -> (Manifest, Lake) {
    let schema = TelemetrySchema::v1_default();
    let mut fleet = Fleet::new(FleetSpec::new(devices, 17).with_bad_ratio(bad_ratio));
    let mut builder = ManifestBuilder::new(&fleet, 1);
    let mut lake = Lake {
        telemetry: Vec::new(),
        dead: Vec::new(),
    };
    for i in 0..messages {
        // Spread over two hours, so there are several partitions.
        let m = fleet.next_message(NOW_MS + i as i64 * 20_000);
        builder.record(&m.expect);
        match &m.expect {
            Expect::Valid { .. } => lake.telemetry.push(decode(&schema, &m)),
            Expect::Bad(b) => lake.dead.push(DlRow {
                reason: b.reason.clone(),
                payload: m.payload.clone(),
                device_id: b.device_id.clone(),
                seq: b.seq,
                topic: m.topic.clone(),
            }),
        }
    }
    (builder.build(), lake)
}

fn write_parquet(path: &Path, batch: &RecordBatch) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut w = ArrowWriter::try_new(File::create(path).unwrap(), batch.schema(), None).unwrap();
    w.write(batch).unwrap();
    w.close().unwrap();
}

fn telemetry_batch(schema: &TelemetrySchema, rows: &[TelRow]) -> RecordBatch {
    let strings = |f: &dyn Fn(&TelRow) -> String| -> ArrayRef {
        Arc::new(StringArray::from_iter_values(rows.iter().map(f)))
    };
    let ts = |f: &dyn Fn(&TelRow) -> i64| -> ArrayRef {
        Arc::new(
            TimestampMicrosecondArray::from_iter_values(rows.iter().map(f)).with_timezone("UTC"),
        )
    };
    let mut cols: Vec<ArrayRef> = vec![
        strings(&|r| r.device_id.clone()),
        strings(&|r| r.device_type.clone()),
        ts(&|r| r.ts_us),
        Arc::new(UInt64Array::from_iter_values(rows.iter().map(|r| r.seq))),
    ];
    for i in 0..schema.metric_columns().len() {
        cols.push(Arc::new(Float64Array::from_iter(
            rows.iter().map(|r| r.metrics[i]),
        )));
    }
    let none_str: ArrayRef = Arc::new(StringArray::from(vec![None::<&str>; rows.len()]));
    let none_f64: ArrayRef = Arc::new(Float64Array::from(vec![None; rows.len()]));
    cols.extend([
        Arc::clone(&none_str),
        Arc::clone(&none_str),
        none_str,
        Arc::clone(&none_f64),
        none_f64,
        ts(&|r| r.ts_us + 1_000),
        strings(&|_| "mqtt".into()),
        strings(&|r| r.topic.clone()),
    ]);
    RecordBatch::try_new(Arc::clone(schema.telemetry()), cols).unwrap()
}

fn dead_letter_batch(schema: &TelemetrySchema, rows: &[DlRow]) -> RecordBatch {
    let cols: Vec<ArrayRef> = vec![
        Arc::new(
            TimestampMicrosecondArray::from_iter_values(rows.iter().map(|_| NOW_MS * 1000))
                .with_timezone("UTC"),
        ),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|_| "mqtt"))),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.topic.as_str()),
        )),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.reason.as_str()),
        )),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| format!("rejected: {}", r.reason)),
        )),
        Arc::new(BinaryArray::from_iter_values(
            rows.iter().map(|r| r.payload.as_slice()),
        )),
        Arc::new(StringArray::from_iter(
            rows.iter().map(|r| r.device_id.as_deref()),
        )),
        Arc::new(UInt64Array::from_iter(rows.iter().map(|r| r.seq))),
    ];
    RecordBatch::try_new(Arc::clone(schema.dead_letter()), cols).unwrap()
}

/// Writes the lake in the sink's layout, two files per partition, plus the things `verify`
/// must skip: the commit log, an unfinished file, a non-Parquet file.
fn write_lake(dir: &Path, lake: &Lake) {
    let schema = TelemetrySchema::v1_default();
    let mut parts: BTreeMap<(String, u32), Vec<TelRow>> = BTreeMap::new();
    for r in &lake.telemetry {
        parts
            .entry(partition_of(r.ts_us))
            .or_default()
            .push(r.clone());
    }
    for ((date, hour), rows) in parts {
        let (a, b) = rows.split_at(rows.len() / 2);
        for (n, chunk) in [a, b].into_iter().enumerate() {
            let p = dir.join(format!(
                "telemetry/date={date}/hour={hour:02}/part-w1-000001-{n}.parquet"
            ));
            write_parquet(&p, &telemetry_batch(&schema, chunk));
        }
    }
    let (a, b) = lake.dead.split_at(lake.dead.len() / 2);
    for (n, chunk) in [a, b].into_iter().enumerate() {
        let (date, _) = partition_of(NOW_MS * 1000);
        let p = dir.join(format!(
            "dead_letter/date={date}/part-w1-000001-{n}.parquet"
        ));
        write_parquet(&p, &dead_letter_batch(&schema, chunk));
    }
    let commits = dir.join("_sensorlake/commits/w1");
    fs::create_dir_all(&commits).unwrap();
    fs::write(commits.join("000001.json"), b"{}").unwrap();
    fs::write(commits.join("junk.parquet"), b"not parquet").unwrap();
    let (date, hour) = partition_of(NOW_MS * 1000);
    let hidden = dir.join(format!("telemetry/date={date}/hour={hour:02}"));
    fs::write(hidden.join(".part-w1-000002-0.parquet.tmp"), b"half a file").unwrap();
    fs::write(hidden.join("_part-w1-000002-0.parquet"), b"half a file").unwrap();
    fs::write(hidden.join("README.txt"), b"not parquet").unwrap();
}

fn check(manifest: &Manifest, lake: &Lake) -> VerifyReport {
    let dir = tempfile::tempdir().unwrap();
    write_lake(dir.path(), lake);
    verify(dir.path(), manifest, &TelemetrySchema::v1_default()).unwrap()
}

#[test]
fn an_exact_lake_verifies_exact() {
    let (m, lake) = scenario(30, 800, 0.2);
    let r = check(&m, &lake);
    assert!(r.is_exact(), "{r}");
    assert_eq!(r.telemetry.expected, lake.telemetry.len() as u64);
    assert_eq!(r.telemetry.found, r.telemetry.expected);
    assert_eq!(r.dead_letters.expected, lake.dead.len() as u64);
    assert_eq!(r.dead_letters.found, r.dead_letters.expected);
    assert_eq!(r.rows_read, 800);
    assert!(
        r.files_read >= 6,
        "several partitions, two files each: {}",
        r.files_read
    );
    assert!(r.to_string().starts_with("EXACT"), "{r}");
}

#[test]
fn a_dropped_row_is_missing() {
    let (m, mut lake) = scenario(9, 300, 0.1);
    let gone = lake.telemetry.remove(40);
    let r = check(&m, &lake);
    assert!(!r.is_exact());
    assert_eq!(r.telemetry.missing, 1);
    assert_eq!(
        r.telemetry.missing_examples,
        [format!("{}/{}", gone.device_id, gone.seq)]
    );
    assert_eq!(r.telemetry.values_unchecked, 1);
    assert_eq!(r.telemetry.value_mismatches, 0);
    assert!(
        r.to_string()
            .contains(&format!("{}/{}", gone.device_id, gone.seq)),
        "{r}"
    );
}

#[test]
fn a_doubled_row_is_duplicated() {
    let (m, mut lake) = scenario(9, 300, 0.1);
    let twice = lake.telemetry[7].clone();
    lake.telemetry.push(twice.clone());
    let r = check(&m, &lake);
    assert!(!r.is_exact());
    assert_eq!(r.telemetry.duplicated, 1);
    assert_eq!(
        r.telemetry.duplicated_examples,
        [format!("{}/{} ×2", twice.device_id, twice.seq)]
    );
    assert_eq!((r.telemetry.missing, r.telemetry.value_mismatches), (0, 0));
}

#[test]
fn a_changed_value_is_a_mismatch_of_its_device() {
    let (m, mut lake) = scenario(9, 300, 0.1);
    let row = &mut lake.telemetry[11];
    let slot = row.metrics.iter().position(Option::is_some).unwrap();
    row.metrics[slot] = row.metrics[slot].map(|v| v + 0.01);
    let device = row.device_id.clone();
    let r = check(&m, &lake);
    assert!(!r.is_exact());
    assert_eq!(r.telemetry.value_mismatches, 1);
    assert_eq!(r.telemetry.value_mismatch_examples, [device]);
    assert_eq!(
        r.telemetry.missing + r.telemetry.duplicated + r.telemetry.unexpected,
        0
    );
}

#[test]
fn a_shifted_timestamp_is_a_mismatch_too() {
    let (m, mut lake) = scenario(9, 200, 0.0);
    lake.telemetry[3].ts_us += 1;
    let r = check(&m, &lake);
    assert_eq!(r.telemetry.value_mismatches, 1, "{r}");
}

#[test]
fn rows_that_were_never_sent_as_valid_are_unexpected() {
    let (m, mut lake) = scenario(9, 300, 0.3);
    let mut stranger = lake.telemetry[0].clone();
    stranger.device_id = "env-999999".into();
    lake.telemetry.push(stranger);
    let mut beyond = lake.telemetry[0].clone();
    beyond.seq = 10_000;
    lake.telemetry.push(beyond);
    // A bad reading that the pipeline wrongly accepted.
    let accepted = lake
        .dead
        .iter()
        .find(|d| d.reason.starts_with("out_of_range"))
        .unwrap()
        .clone();
    let schema = TelemetrySchema::v1_default();
    let mut row = decode(
        &schema,
        &Message {
            topic: accepted.topic.clone(),
            payload: accepted.payload.clone(),
            expect: Expect::Bad(m.bad[0].clone()),
        },
    );
    row.metrics = vec![None; row.metrics.len()];
    lake.telemetry.push(row);
    let r = check(&m, &lake);
    assert_eq!(r.telemetry.unexpected, 3, "{r}");
    let text = r.telemetry.unexpected_examples.join(" | ");
    assert!(
        text.contains("env-999999/")
            && text.contains("/10000")
            && text.contains("a bad reading accepted"),
        "{text}"
    );
}

#[test]
fn a_missing_dead_letter_is_reported() {
    let (m, mut lake) = scenario(9, 300, 0.3);
    let gone = lake.dead.iter().position(|d| d.seq.is_some()).unwrap();
    let gone = lake.dead.remove(gone);
    let r = check(&m, &lake);
    assert!(!r.is_exact());
    assert_eq!(r.dead_letters.missing, 1);
    assert_eq!(
        r.dead_letters.missing_examples,
        [format!("{}/{}", gone.device_id.unwrap(), gone.seq.unwrap())]
    );
}

#[test]
fn a_wrong_reason_shows_expected_and_found_codes() {
    let (m, mut lake) = scenario(9, 300, 0.3);
    let d = lake
        .dead
        .iter_mut()
        .find(|d| d.reason.starts_with("out_of_range:"))
        .unwrap();
    let expected = d.reason.clone();
    d.reason = "wrong_type:humidity_pct".into();
    let r = check(&m, &lake);
    assert!(!r.is_exact());
    assert_eq!(r.dead_letters.wrong_reason, 1);
    let w = &r.dead_letters.wrong_reason_examples[0];
    assert_eq!(
        (w.expected.as_str(), w.found.as_str()),
        (expected.as_str(), "wrong_type:humidity_pct")
    );
    assert!(
        r.to_string().contains(&format!(
            "expected {expected}, found wrong_type:humidity_pct"
        )),
        "{r}"
    );
}

#[test]
fn redelivered_envelope_rejects_are_allowed_but_deduplicated_ones_are_not() {
    let (m, mut lake) = scenario(9, 400, 0.3);
    let envelope = lake
        .dead
        .iter()
        .find(|d| d.reason == "json_syntax")
        .unwrap()
        .clone();
    lake.dead.push(envelope.clone());
    lake.dead.push(envelope);
    let r = check(&m, &lake);
    assert!(r.is_exact(), "{r}");
    assert_eq!(r.dead_letters.redelivered, 2);

    let gated = lake
        .dead
        .iter()
        .find(|d| d.reason == "ts_in_future")
        .unwrap()
        .clone();
    lake.dead.push(gated.clone());
    let r = check(&m, &lake);
    assert!(!r.is_exact());
    assert_eq!(r.dead_letters.duplicated, 1);
    let label = format!("{}/{} ×2", gated.device_id.unwrap(), gated.seq.unwrap());
    assert_eq!(r.dead_letters.duplicated_examples, [label]);
}

#[test]
fn dead_letters_without_device_and_seq_match_by_payload_hash() {
    let (m, mut lake) = scenario(9, 300, 0.3);
    for d in &mut lake.dead {
        d.device_id = None;
        d.seq = None;
    }
    let r = check(&m, &lake);
    assert!(r.is_exact(), "{r}");
}

#[test]
fn dead_letters_with_a_changed_payload_still_match_by_device_and_seq() {
    let (m, mut lake) = scenario(9, 300, 0.3);
    for d in lake.dead.iter_mut().filter(|d| d.seq.is_some()) {
        d.payload.truncate(10);
    }
    let r = check(&m, &lake);
    assert!(r.is_exact(), "{r}");
}

#[test]
fn a_dead_letter_that_matches_nothing_is_unexpected() {
    let (m, mut lake) = scenario(9, 300, 0.1);
    lake.dead.push(DlRow {
        reason: "json_syntax".into(),
        payload: b"{\"never".to_vec(),
        device_id: None,
        seq: None,
        topic: "telemetry/x/y/z".into(),
    });
    // A valid reading rejected.
    let v = lake.telemetry.remove(5);
    lake.dead.push(DlRow {
        reason: "out_of_range:temperature_c".into(),
        payload: b"{}".to_vec(),
        device_id: Some(v.device_id.clone()),
        seq: Some(v.seq),
        topic: v.topic.clone(),
    });
    let r = check(&m, &lake);
    assert_eq!(r.dead_letters.unexpected, 2, "{r}");
    assert_eq!(r.telemetry.missing, 1);
    let text = r.dead_letters.unexpected_examples.join(" | ");
    assert!(
        text.contains("a valid reading rejected as out_of_range:temperature_c"),
        "{text}"
    );
}

#[test]
fn unconfirmed_readings_may_be_present_or_absent() {
    let schema = TelemetrySchema::v1_default();
    let mut fleet = Fleet::new(FleetSpec::new(6, 3).with_bad_ratio(0.3));
    let mut b = ManifestBuilder::new(&fleet, 1);
    let mut lake = Lake {
        telemetry: Vec::new(),
        dead: Vec::new(),
    };
    for i in 0..200 {
        let m = fleet.next_message(NOW_MS + i * 1000);
        let unconfirmed = i % 10 == 0;
        if unconfirmed {
            b.record_unconfirmed(&m.expect);
        } else {
            b.record(&m.expect);
        }
        // Half of the unconfirmed ones reached the lake anyway.
        if unconfirmed && i % 20 == 0 {
            continue;
        }
        match &m.expect {
            Expect::Valid { .. } => lake.telemetry.push(decode(&schema, &m)),
            Expect::Bad(x) => lake.dead.push(DlRow {
                reason: x.reason.clone(),
                payload: m.payload.clone(),
                device_id: x.device_id.clone(),
                seq: x.seq,
                topic: m.topic.clone(),
            }),
        }
    }
    let manifest = b.build();
    let r = check(&manifest, &lake);
    assert!(r.is_exact(), "{r}");
    assert_eq!(
        r.telemetry.unconfirmed_found + r.dead_letters.unconfirmed_found,
        10
    );
}

#[test]
fn an_unreadable_file_is_named_in_the_error() {
    let (m, lake) = scenario(6, 50, 0.0);
    let dir = tempfile::tempdir().unwrap();
    write_lake(dir.path(), &lake);
    let bad = dir
        .path()
        .join("telemetry/date=2099-01-01/hour=00/part-broken.parquet");
    fs::create_dir_all(bad.parent().unwrap()).unwrap();
    fs::write(&bad, b"PAR1 this is not a parquet file").unwrap();
    let e = verify(dir.path(), &m, &TelemetrySchema::v1_default()).unwrap_err();
    assert!(matches!(e, SimError::ReadParquet { .. }), "{e}");
    assert!(e.to_string().contains("part-broken.parquet"), "{e}");
}

#[test]
fn a_file_without_the_needed_columns_is_named_in_the_error() {
    let (m, _) = scenario(3, 10, 0.0);
    let dir = tempfile::tempdir().unwrap();
    let schema = TelemetrySchema::v1_default();
    let p = dir
        .path()
        .join("telemetry/date=2025-11-27/hour=15/part-dl.parquet");
    write_parquet(&p, &dead_letter_batch(&schema, &[]));
    let e = verify(dir.path(), &m, &schema).unwrap_err();
    assert!(matches!(e, SimError::BadColumn { .. }), "{e}");
    let text = e.to_string();
    assert!(
        text.contains("part-dl.parquet") && text.contains("device_type"),
        "{text}"
    );
}

#[test]
fn a_missing_lake_is_an_error_and_an_empty_one_misses_everything() {
    let (m, _) = scenario(3, 30, 0.2);
    let dir = tempfile::tempdir().unwrap();
    let e = verify(&dir.path().join("nope"), &m, &TelemetrySchema::v1_default()).unwrap_err();
    assert!(
        matches!(e, SimError::LakeNotFound { .. }) && e.to_string().contains("nope"),
        "{e}"
    );
    let r = verify(dir.path(), &m, &TelemetrySchema::v1_default()).unwrap();
    assert_eq!(r.telemetry.missing, m.valid_count());
    assert_eq!(r.dead_letters.missing, m.bad.len() as u64);
    assert_eq!(r.files_read, 0);
}

#[test]
fn the_report_serializes_for_json_output() {
    let (m, mut lake) = scenario(6, 100, 0.2);
    lake.telemetry.pop();
    let r = check(&m, &lake);
    let json: Value = serde_json::to_value(&r).unwrap();
    assert_eq!(json["telemetry"]["missing"], 1);
    assert!(json["dead_letters"]["wrong_reason_examples"].is_array());
}

#[test]
fn timestamps_in_another_unit_and_zone_compare_equal() {
    use arrow::array::TimestampMillisecondArray;
    use arrow::datatypes::{Field, Schema};

    let (m, lake) = scenario(6, 120, 0.0);
    let schema = TelemetrySchema::v1_default();
    let batch = telemetry_batch(&schema, &lake.telemetry);
    let mut fields: Vec<Field> = batch
        .schema()
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    fields[2] = Field::new(
        columns::TS,
        DataType::Timestamp(TimeUnit::Millisecond, Some("+02:00".into())),
        false,
    );
    let mut cols = batch.columns().to_vec();
    cols[2] = Arc::new(
        TimestampMillisecondArray::from_iter_values(lake.telemetry.iter().map(|r| r.ts_us / 1000))
            .with_timezone("+02:00"),
    );
    let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_parquet(
        &dir.path()
            .join("telemetry/date=2025-11-27/hour=15/part-ms.parquet"),
        &batch,
    );
    let r = verify(dir.path(), &m, &schema).unwrap();
    assert!(r.is_exact(), "{r}");
}
