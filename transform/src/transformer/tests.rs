//! End-to-end tests of `Transformer::process`: payloads in, batches and counts out.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::compute::concat_batches;
use arrow::datatypes::{
    DataType, Field, Float64Type, Schema, TimestampMicrosecondType, UInt64Type,
};
use arrow::util::pretty::pretty_format_batches;
use sensorlake_core::{DeviceCheckpoint, RawRecord, SourceKind, TelemetrySchema};

use super::*;
use crate::config::{TransformConfig, UnknownDevices, UnknownMetrics};
use crate::registry::Registry;

/// The pipeline's clock in these tests: 2025-11-27T15:05:00Z.
const NOW_MS: i64 = 1_764_255_900_000;
/// A `ts` one minute before `NOW_MS`, as epoch ms and as RFC 3339.
const TS_MS: i64 = 1_764_255_845_123;
const TS: &str = "2025-11-27T15:04:05.123Z";

const REGISTRY: &str = "device_id,site,model,firmware,lat,lon,installed_at\n\
                        env-1,plant-a,EM-3,1.4.2,52.52,13.4,2025-01-15\n\
                        pwr-1,plant-b,PM-1,2.0.0,,,\n";

fn transformer_with(config: TransformConfig, registry: Registry) -> Transformer {
    Transformer::new(
        Arc::new(TelemetrySchema::v1_default()),
        config,
        Arc::new(registry),
    )
}

fn transformer() -> Transformer {
    transformer_with(TransformConfig::default(), Registry::empty())
}

fn record(payload: impl Into<Vec<u8>>) -> RawRecord {
    RawRecord {
        payload: payload.into().into(),
        claimed_device_id: None,
        position: "telemetry/plant-a/env/env-1".into(),
        received_at_us: NOW_MS * 1000,
        rejected: None,
    }
}

/// Processes payloads in one call and checks what must always hold.
fn run(t: &mut Transformer, payloads: &[&[u8]]) -> TransformOutput {
    let records: Vec<RawRecord> = payloads.iter().map(|p| record(p.to_vec())).collect();
    run_records(t, &records)
}

fn run_records(t: &mut Transformer, records: &[RawRecord]) -> TransformOutput {
    let out = t.process(SourceKind::Mqtt, records, NOW_MS);
    check_invariants(&out);
    out
}

fn check_invariants(out: &TransformOutput) {
    let c = &out.counts;
    assert!(c.adds_up(), "{c:?}");
    assert_eq!(c.accepted, out.telemetry.num_rows() as u64, "{c:?}");
    assert_eq!(
        c.rejected_total(),
        out.dead_letters.num_rows() as u64,
        "{c:?}"
    );
    let schema = TelemetrySchema::v1_default();
    assert_eq!(out.telemetry.schema(), *schema.telemetry());
    assert_eq!(out.dead_letters.schema(), *schema.dead_letter());
    for detail in strings(&out.dead_letters, "detail") {
        assert!(detail.len() <= 200, "{detail}");
        assert!(!detail.is_empty());
    }
}

fn strings(batch: &RecordBatch, column: &str) -> Vec<String> {
    let array = batch.column_by_name(column).unwrap().as_string::<i32>();
    array
        .iter()
        .map(|v| v.map_or("<null>".to_owned(), str::to_owned))
        .collect()
}

fn u64s(batch: &RecordBatch, column: &str) -> Vec<Option<u64>> {
    batch
        .column_by_name(column)
        .unwrap()
        .as_primitive::<UInt64Type>()
        .iter()
        .collect()
}

fn f64s(batch: &RecordBatch, column: &str) -> Vec<Option<f64>> {
    batch
        .column_by_name(column)
        .unwrap()
        .as_primitive::<Float64Type>()
        .iter()
        .collect()
}

fn payloads(batch: &RecordBatch) -> Vec<String> {
    let array = batch.column_by_name("payload").unwrap().as_binary::<i32>();
    array
        .iter()
        .map(|v| String::from_utf8_lossy(v.unwrap()).into_owned())
        .collect()
}

fn reasons(out: &TransformOutput) -> Vec<String> {
    strings(&out.dead_letters, "reason")
}

/// A single-reading env message.
fn env(seq: u64, metrics: &str) -> String {
    format!(r#"{{"device_id":"env-1","type":"env","ts":"{TS}","seq":{seq},"metrics":{metrics}}}"#)
}

/// A single-reading power message.
fn power(seq: u64, energy: &str) -> String {
    format!(
        r#"{{"device_id":"pwr-1","type":"power","ts":{TS_MS},"seq":{seq},"metrics":{{"energy_kwh":{energy}}}}}"#
    )
}

/// The reason a lone payload is rejected for (it must be rejected, as one dead letter).
fn rejection(payload: impl AsRef<[u8]>) -> String {
    rejection_with(TransformConfig::default(), payload)
}

fn rejection_with(config: TransformConfig, payload: impl AsRef<[u8]>) -> String {
    let out = run(
        &mut transformer_with(config, Registry::empty()),
        &[payload.as_ref()],
    );
    assert_eq!(out.counts.received, 1);
    let reasons = reasons(&out);
    assert_eq!(reasons.len(), 1, "{out:?}");
    reasons[0].clone()
}

/// The batch as a table. Timestamps are shown with the offset `+00:00`: arrow can display the
/// zone name `UTC` only with its `chrono-tz` feature.
fn pretty(batch: &RecordBatch) -> String {
    let columns = batch
        .columns()
        .iter()
        .map(|c| match c.as_primitive_opt::<TimestampMicrosecondType>() {
            Some(ts) => Arc::new(ts.clone().with_timezone("+00:00")) as ArrayRef,
            None => Arc::clone(c),
        })
        .collect();
    let fields: Vec<Field> = batch
        .schema()
        .fields()
        .iter()
        .map(|f| match f.data_type() {
            DataType::Timestamp(unit, Some(_)) => f
                .as_ref()
                .clone()
                .with_data_type(DataType::Timestamp(*unit, Some("+00:00".into()))),
            _ => f.as_ref().clone(),
        })
        .collect();
    let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).unwrap();
    pretty_format_batches(&[batch]).unwrap().to_string()
}

#[test]
fn accepts_readings_and_fills_every_column() {
    let registry = Registry::from_csv_reader(REGISTRY.as_bytes()).unwrap();
    let mut t = transformer_with(TransformConfig::default(), registry);
    let vibration = format!(
        r#"{{"device_id":"vib-9","type":"vibration","ts":{TS_MS},"seq":3,"metrics":{{"rms_mm_s":1.5,"peak_g":null}}}}"#
    );
    let out = run(
        &mut t,
        &[
            env(
                7,
                r#"{"temperature_c":21.43,"humidity_pct":40.2,"battery_v":3.71}"#,
            )
            .as_bytes(),
            vibration.as_bytes(),
        ],
    );
    let expected = "\
+-----------+-------------+--------------------------+-----+---------------+--------------+-----------+----------+--------+-----------+-----------+---------+------------+---------+-------+----------+-------+------+----------------------+--------+-----------------------------+
| device_id | device_type | ts                       | seq | temperature_c | humidity_pct | battery_v | rms_mm_s | peak_g | voltage_v | current_a | power_w | energy_kwh | site    | model | firmware | lat   | lon  | received_at          | source | source_position             |
+-----------+-------------+--------------------------+-----+---------------+--------------+-----------+----------+--------+-----------+-----------+---------+------------+---------+-------+----------+-------+------+----------------------+--------+-----------------------------+
| env-1     | env         | 2025-11-27T15:04:05.123Z | 7   | 21.43         | 40.2         | 3.71      |          |        |           |           |         |            | plant-a | EM-3  | 1.4.2    | 52.52 | 13.4 | 2025-11-27T15:05:00Z | mqtt   | telemetry/plant-a/env/env-1 |
| vib-9     | vibration   | 2025-11-27T15:04:05.123Z | 3   |               |              |           | 1.5      |        |           |           |         |            |         |       |          |       |      | 2025-11-27T15:05:00Z | mqtt   | telemetry/plant-a/env/env-1 |
+-----------+-------------+--------------------------+-----+---------------+--------------+-----------+----------+--------+-----------+-----------+---------+------------+---------+-------+----------+-------+------+----------------------+--------+-----------------------------+";
    assert_eq!(pretty(&out.telemetry), expected);
    assert_eq!(out.dead_letters.num_rows(), 0);
    assert_eq!(out.counts.received, 2);
    assert_eq!(out.counts.accepted, 2);
}

#[test]
fn dead_letters_carry_reason_detail_payload_and_what_could_be_read() {
    let mut t = transformer();
    let batch = format!(
        r#"{{"device_id":"env-1","type":"env","readings":[{{"ts":{TS_MS},"seq":1,"metrics":{{}}}},{{"ts":{TS_MS},"seq":2,"metrics":{{"humidity_pct":140}}}},{{"seq":-3}}]}}"#
    );
    let out = run(&mut t, &[b"{oops", batch.as_bytes()]);
    let expected = r#"
+----------------------+--------+-----------------------------+---------------------------+--------------------------------------------------+------------------------------------------------------------------------------------------------------------------------+-----------+-----+
| received_at          | source | source_position             | reason                    | detail                                           | payload                                                                                                                | device_id | seq |
+----------------------+--------+-----------------------------+---------------------------+--------------------------------------------------+------------------------------------------------------------------------------------------------------------------------+-----------+-----+
| 2025-11-27T15:05:00Z | mqtt   | telemetry/plant-a/env/env-1 | json_syntax               | key must be a string at line 1 column 2          | 7b6f6f7073                                                                                                             |           |     |
| 2025-11-27T15:05:00Z | mqtt   | telemetry/plant-a/env/env-1 | out_of_range:humidity_pct | humidity_pct = 140 is outside 0..=100            | 7b227473223a313736343235353834353132332c22736571223a322c226d657472696373223a7b2268756d69646974795f706374223a3134307d7d | env-1     | 2   |
| 2025-11-27T15:05:00Z | mqtt   | telemetry/plant-a/env/env-1 | wrong_type:seq            | seq must be an unsigned 64-bit integer, found -3 | 7b22736571223a2d337d                                                                                                   | env-1     |     |
+----------------------+--------+-----------------------------+---------------------------+--------------------------------------------------+------------------------------------------------------------------------------------------------------------------------+-----------+-----+"#;
    assert_eq!(pretty(&out.dead_letters), expected.trim_start());
    assert_eq!(
        payloads(&out.dead_letters),
        [
            "{oops".to_owned(),
            format!(r#"{{"ts":{TS_MS},"seq":2,"metrics":{{"humidity_pct":140}}}}"#),
            r#"{"seq":-3}"#.to_owned(),
        ]
    );
    assert_eq!(out.counts.received, 4);
    assert_eq!(out.counts.accepted, 1);
    assert_eq!(out.counts.rejected["json_syntax"], 1);
    assert_eq!(out.counts.rejected["out_of_range"], 1);
    assert_eq!(out.counts.rejected["wrong_type"], 1);
}

#[test]
fn accepts_rfc3339_and_epoch_millisecond_timestamps_alike() {
    let mut t = transformer();
    let rfc = env(1, "{}");
    let offset = rfc.replace(TS, "2025-11-27T17:04:05.123+02:00");
    let millis = rfc.replace(&format!("\"{TS}\""), &TS_MS.to_string());
    let millis = millis.replace("\"seq\":1", "\"seq\":3");
    let offset = offset.replace("\"seq\":1", "\"seq\":2");
    let out = run(
        &mut t,
        &[rfc.as_bytes(), offset.as_bytes(), millis.as_bytes()],
    );
    assert_eq!(out.counts.accepted, 3, "{:?}", reasons(&out));
    let ts = out.telemetry.column_by_name("ts").unwrap();
    let ts = ts.as_primitive::<TimestampMicrosecondType>();
    assert!(ts.iter().all(|v| v == Some(TS_MS * 1000)));
}

#[test]
fn accepts_a_batch_and_counts_each_reading() {
    let mut t = transformer();
    let batch = format!(
        r#"{{"device_id":"env-1","type":"env","readings":[
            {{"ts":{TS_MS},"seq":10,"metrics":{{"temperature_c":20}}}},
            {{"ts":"{TS}","seq":11,"metrics":{{"temperature_c":21}}}},
            {{"ts":{TS_MS},"seq":12,"metrics":{{"temperature_c":null}}}}]}}"#
    );
    let out = run(&mut t, &[batch.as_bytes()]);
    assert_eq!(out.counts.received, 3);
    assert_eq!(out.counts.accepted, 3);
    assert_eq!(u64s(&out.telemetry, "seq"), [Some(10), Some(11), Some(12)]);
    assert_eq!(
        f64s(&out.telemetry, "temperature_c"),
        [Some(20.0), Some(21.0), None]
    );
    assert_eq!(
        out.devices["env-1"],
        DeviceCheckpoint {
            seq: 12,
            energy_kwh: None
        }
    );
}

#[test]
fn stores_missing_and_null_metrics_as_null() {
    let out = run(
        &mut transformer(),
        &[env(1, r#"{"battery_v":null}"#).as_bytes()],
    );
    assert_eq!(out.counts.accepted, 1);
    assert_eq!(f64s(&out.telemetry, "battery_v"), [None]);
    assert_eq!(f64s(&out.telemetry, "temperature_c"), [None]);
}

#[test]
fn rejects_each_broken_envelope_with_its_reason() {
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let deep_object = format!(r#"{{"device_id":"env-1","x":{deep}}}"#);
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"\xff\xfe{}".to_vec(), "invalid_utf8"),
        (b"".to_vec(), "json_syntax"),
        (b"  \n\t ".to_vec(), "json_syntax"),
        (b"{\"device_id\":\"env-1\"} x".to_vec(), "json_syntax"),
        (b"{\"device_id\":\"env-1\"".to_vec(), "json_syntax"),
        ("\u{feff}{}".as_bytes().to_vec(), "json_syntax"),
        (deep.clone().into_bytes(), "json_syntax"),
        (deep_object.into_bytes(), "json_syntax"),
        (b"[1,2]".to_vec(), "not_an_object"),
        (b"\"env-1\"".to_vec(), "not_an_object"),
        (b"null".to_vec(), "not_an_object"),
        (
            br#"{"device_id":"env-1","device_id":"env-2"}"#.to_vec(),
            "duplicate_key:device_id",
        ),
        (
            br#"{"device_id":"env-1","metrics":{"a":{"b":1,"b":2}}}"#.to_vec(),
            "duplicate_key:b",
        ),
        (br#"{"type":"env"}"#.to_vec(), "missing_field:device_id"),
        (
            br#"{"device_id":42,"type":"env"}"#.to_vec(),
            "wrong_type:device_id",
        ),
        (
            br#"{"device_id":"a/b","type":"env"}"#.to_vec(),
            "invalid_device_id",
        ),
        (
            br#"{"device_id":"","type":"env"}"#.to_vec(),
            "invalid_device_id",
        ),
        (
            br#"{"device_id":".","type":"env"}"#.to_vec(),
            "invalid_device_id",
        ),
        (
            br#"{"device_id":"..","type":"env"}"#.to_vec(),
            "invalid_device_id",
        ),
        (br#"{"device_id":"env-1"}"#.to_vec(), "missing_field:type"),
        (
            br#"{"device_id":"env-1","type":["env"]}"#.to_vec(),
            "wrong_type:type",
        ),
        (
            br#"{"device_id":"env-1","type":"fridge"}"#.to_vec(),
            "unknown_device_type",
        ),
        (
            br#"{"device_id":"env-1","type":"env","readings":{}}"#.to_vec(),
            "wrong_type:readings",
        ),
        (
            br#"{"device_id":"env-1","type":"env","readings":[]}"#.to_vec(),
            "empty_batch",
        ),
    ];
    for (payload, code) in cases {
        let what = String::from_utf8_lossy(&payload[..payload.len().min(60)]).into_owned();
        assert_eq!(rejection(&payload), code, "{what}");
    }
}

#[test]
fn rejects_payloads_over_the_size_limit_without_parsing_them() {
    let config = TransformConfig {
        max_payload_bytes: 10,
        ..TransformConfig::default()
    };
    assert_eq!(
        rejection_with(config.clone(), b"{\"a\":\"12345\"}"),
        "too_large"
    );
    assert_eq!(rejection_with(config, b"not json!!"), "json_syntax");
}

#[test]
fn rejects_batches_over_the_reading_limit_as_one_message() {
    let config = TransformConfig {
        max_readings_per_message: 2,
        ..TransformConfig::default()
    };
    let item = format!(r#"{{"ts":{TS_MS},"seq":1,"metrics":{{}}}}"#);
    let batch =
        format!(r#"{{"device_id":"env-1","type":"env","readings":[{item},{item},{item}]}}"#);
    let mut t = transformer_with(config, Registry::empty());
    let out = run(&mut t, &[batch.as_bytes()]);
    assert_eq!(reasons(&out), ["too_many_readings"]);
    assert_eq!(out.counts.received, 1);
    assert_eq!(strings(&out.dead_letters, "device_id"), ["env-1"]);
    assert_eq!(payloads(&out.dead_letters), [batch]);
}

#[test]
fn rejects_a_payload_whose_device_id_differs_from_the_topic() {
    let mut t = transformer();
    let mut r = record(env(1, "{}"));
    r.claimed_device_id = Some("env-2".into());
    let out = run_records(&mut t, std::slice::from_ref(&r));
    assert_eq!(reasons(&out), ["topic_mismatch"]);
    assert_eq!(strings(&out.dead_letters, "device_id"), ["env-1"]);
    r.claimed_device_id = Some("env-1".into());
    let out = run_records(&mut t, &[r]);
    assert_eq!(out.counts.accepted, 1);
}

#[test]
fn rejects_each_bad_reading_field_with_its_reason() {
    let ts_reading = |ts: &str| {
        format!(r#"{{"device_id":"env-1","type":"env","ts":{ts},"seq":1,"metrics":{{}}}}"#)
    };
    let seq_reading = |seq: &str| {
        format!(r#"{{"device_id":"env-1","type":"env","ts":{TS_MS},"seq":{seq},"metrics":{{}}}}"#)
    };
    let cases: Vec<(String, &str)> = vec![
        (
            format!(r#"{{"device_id":"env-1","type":"env","ts":{TS_MS},"metrics":{{}}}}"#),
            "missing_field:seq",
        ),
        (seq_reading("-1"), "wrong_type:seq"),
        (seq_reading("-0"), "wrong_type:seq"),
        (seq_reading("1.5"), "wrong_type:seq"),
        (seq_reading("1e3"), "wrong_type:seq"),
        (seq_reading("\"7\""), "wrong_type:seq"),
        (seq_reading("null"), "wrong_type:seq"),
        // serde_json reports numbers beyond f64 as syntax errors outside metric values.
        (seq_reading("1e400"), "json_syntax"),
        (
            r#"{"device_id":"env-1","type":"env","seq":1,"metrics":{}}"#.to_owned(),
            "missing_field:ts",
        ),
        (ts_reading("true"), "wrong_type:ts"),
        (ts_reading("1764255845123.5"), "wrong_type:ts"),
        (ts_reading("{}"), "wrong_type:ts"),
        (ts_reading("\"yesterday\""), "invalid_ts"),
        (ts_reading("\"2025-11-27T15:04:05\""), "invalid_ts"),
        (ts_reading("1764255845"), "invalid_ts"),
        (ts_reading("1764255845123000000"), "invalid_ts"),
        (ts_reading("-1764255845123"), "invalid_ts"),
        (ts_reading("0"), "invalid_ts"),
        (ts_reading("99999999999999999999999"), "invalid_ts"),
        (ts_reading(&(TS_MS + 3_600_000).to_string()), "ts_in_future"),
        (ts_reading("\"2025-11-01T00:00:00Z\""), "ts_too_old"),
        (
            format!(r#"{{"device_id":"env-1","type":"env","ts":{TS_MS},"seq":1}}"#),
            "missing_field:metrics",
        ),
        (
            format!(r#"{{"device_id":"env-1","type":"env","ts":{TS_MS},"seq":1,"metrics":[1]}}"#),
            "wrong_type:metrics",
        ),
        (
            env(1, r#"{"temperature_c":20,"pressure_hpa":1013}"#),
            "unknown_metric:pressure_hpa",
        ),
        (env(1, r#"{"rms_mm_s":1}"#), "unknown_metric:rms_mm_s"),
        (
            env(1, r#"{"humidity_pct":"40"}"#),
            "wrong_type:humidity_pct",
        ),
        (
            env(1, r#"{"humidity_pct":true}"#),
            "wrong_type:humidity_pct",
        ),
        (
            env(1, r#"{"humidity_pct":140}"#),
            "out_of_range:humidity_pct",
        ),
        (env(1, r#"{"battery_v":1.99}"#), "out_of_range:battery_v"),
        (
            env(1, r#"{"temperature_c":1e400}"#),
            "out_of_range:temperature_c",
        ),
        (
            env(1, r#"{"temperature_c":-1e400}"#),
            "out_of_range:temperature_c",
        ),
    ];
    for (payload, code) in cases {
        assert_eq!(rejection(&payload), code, "{payload}");
    }
}

#[test]
fn rejects_seq_that_overflows_u64() {
    let payload = env(1, "{}").replace("\"seq\":1", "\"seq\":18446744073709551616");
    assert_eq!(rejection(payload), "wrong_type:seq");
    let payload = env(1, "{}").replace("\"seq\":1", "\"seq\":18446744073709551615");
    let out = run(&mut transformer(), &[payload.as_bytes()]);
    assert_eq!(u64s(&out.telemetry, "seq"), [Some(u64::MAX)]);
}

#[test]
fn accepts_timestamps_at_the_edges_of_the_window() {
    let at = |ms: i64| {
        format!(r#"{{"device_id":"env-1","type":"env","ts":{ms},"seq":1,"metrics":{{}}}}"#)
    };
    let skew = TransformConfig::default().max_future_skew_ms;
    let lateness = TransformConfig::default().lateness_ms;
    for ms in [NOW_MS + skew, NOW_MS - lateness] {
        let out = run(&mut transformer(), &[at(ms).as_bytes()]);
        assert_eq!(out.counts.accepted, 1, "{:?}", reasons(&out));
    }
    assert_eq!(rejection(at(NOW_MS + skew + 1)), "ts_in_future");
    assert_eq!(rejection(at(NOW_MS - lateness - 1)), "ts_too_old");
}

#[test]
fn reports_metric_problems_by_kind_whatever_their_order() {
    let payload = env(1, r#"{"humidity_pct":140,"battery_v":"x","foo":1}"#);
    assert_eq!(rejection(payload), "unknown_metric:foo");
    let payload = env(1, r#"{"humidity_pct":140,"battery_v":"x"}"#);
    assert_eq!(rejection(payload), "wrong_type:battery_v");
}

#[test]
fn checks_ts_before_metrics_and_seq_before_ts() {
    let payload = r#"{"device_id":"env-1","type":"env","ts":"bad","seq":1,"metrics":{"foo":1}}"#;
    assert_eq!(rejection(payload), "invalid_ts");
    let payload = r#"{"device_id":"env-1","type":"env","ts":"bad","seq":"1","metrics":{}}"#;
    assert_eq!(rejection(payload), "wrong_type:seq");
    let payload = r#"{"device_id":"env-1","type":"env","ts":"bad","seq":"1","x":1,"x":2}"#;
    assert_eq!(rejection(payload), "duplicate_key:x");
}

#[test]
fn ignores_unknown_metrics_when_configured_to() {
    let config = TransformConfig {
        unknown_metrics: UnknownMetrics::Ignore,
        ..TransformConfig::default()
    };
    let mut t = transformer_with(config, Registry::empty());
    let out = run(
        &mut t,
        &[env(
            1,
            r#"{"temperature_c":20,"pressure_hpa":"whatever","peak_g":1}"#,
        )
        .as_bytes()],
    );
    assert_eq!(out.counts.accepted, 1, "{:?}", reasons(&out));
    assert_eq!(f64s(&out.telemetry, "temperature_c"), [Some(20.0)]);
    assert_eq!(f64s(&out.telemetry, "peak_g"), [None]);
}

#[test]
fn rejects_bad_batch_items_one_by_one() {
    let batch = format!(
        r#"{{"device_id":"env-1","type":"env","readings":[
            {{"ts":{TS_MS},"seq":1,"metrics":{{}}}},
            42,
            {{"ts":{TS_MS},"seq":2,"seq":3,"metrics":{{}}}},
            {{"ts":{TS_MS},"metrics":{{}}}},
            {{"ts":{TS_MS},"seq":4,"metrics":{{}}}}]}}"#
    );
    let out = run(&mut transformer(), &[batch.as_bytes()]);
    assert_eq!(out.counts.received, 5);
    assert_eq!(u64s(&out.telemetry, "seq"), [Some(1), Some(4)]);
    assert_eq!(
        reasons(&out),
        ["not_an_object", "duplicate_key:seq", "missing_field:seq"]
    );
    assert_eq!(
        payloads(&out.dead_letters),
        [
            "42".to_owned(),
            format!(r#"{{"ts":{TS_MS},"seq":2,"seq":3,"metrics":{{}}}}"#),
            format!(r#"{{"ts":{TS_MS},"metrics":{{}}}}"#),
        ]
    );
    assert_eq!(u64s(&out.dead_letters, "seq"), [None, None, None]);
}

#[test]
fn drops_duplicates_within_one_call() {
    let mut t = transformer();
    let a = env(5, "{}");
    let out = run(
        &mut t,
        &[
            a.as_bytes(),
            a.as_bytes(),
            env(6, "{}").as_bytes(),
            a.as_bytes(),
        ],
    );
    assert_eq!(out.counts.accepted, 2);
    assert_eq!(out.counts.duplicates, 2);
    assert_eq!(out.devices["env-1"].seq, 6);
}

#[test]
fn drops_duplicates_across_calls_and_reports_only_changed_devices() {
    let mut t = transformer();
    let out = run(&mut t, &[env(5, "{}").as_bytes(), power(1, "1").as_bytes()]);
    assert_eq!(out.devices.len(), 2);
    let out = run(&mut t, &[env(5, "{}").as_bytes(), power(2, "1").as_bytes()]);
    assert_eq!(out.counts.duplicates, 1);
    assert_eq!(out.counts.accepted, 1);
    assert_eq!(out.devices.keys().collect::<Vec<_>>(), ["pwr-1"]);
    assert_eq!(t.devices_tracked(), 2);
}

#[test]
fn accepts_out_of_order_readings_once() {
    let mut t = transformer();
    let out = run(
        &mut t,
        &[
            env(10, "{}").as_bytes(),
            env(8, "{}").as_bytes(),
            env(9, "{}").as_bytes(),
            env(8, "{}").as_bytes(),
        ],
    );
    assert_eq!(u64s(&out.telemetry, "seq"), [Some(10), Some(8), Some(9)]);
    assert_eq!(out.counts.duplicates, 1);
    assert_eq!(out.devices["env-1"].seq, 10);
}

#[test]
fn drops_readings_committed_before_a_restart() {
    let mut t = transformer();
    t.restore([(
        "env-1".to_owned(),
        DeviceCheckpoint {
            seq: 100,
            energy_kwh: None,
        },
    )]);
    assert_eq!(t.devices_tracked(), 1);
    let out = run(
        &mut t,
        &[
            env(99, "{}").as_bytes(),
            env(100, "{}").as_bytes(),
            env(1, "{}").as_bytes(),
            env(101, "{}").as_bytes(),
        ],
    );
    assert_eq!(out.counts.duplicates, 3);
    assert_eq!(u64s(&out.telemetry, "seq"), [Some(101)]);
}

#[test]
fn dead_letters_a_reading_rejected_after_the_gate_only_once() {
    let mut t = transformer();
    let bad = env(7, r#"{"humidity_pct":140}"#);
    let out = run(&mut t, &[bad.as_bytes(), bad.as_bytes()]);
    assert_eq!(reasons(&out), ["out_of_range:humidity_pct"]);
    assert_eq!(out.counts.duplicates, 1);
    assert_eq!(
        out.devices["env-1"].seq, 7,
        "rejected after the gate, still seen"
    );
    let out = run(&mut t, &[bad.as_bytes()]);
    assert_eq!(out.counts.duplicates, 1);
    assert!(out.devices.is_empty());

    // Restarted from that commit, the redelivery is still a duplicate.
    let mut t = transformer();
    t.restore([(
        "env-1".to_owned(),
        DeviceCheckpoint {
            seq: 7,
            energy_kwh: None,
        },
    )]);
    let out = run(&mut t, &[bad.as_bytes()]);
    assert_eq!(out.counts.duplicates, 1);
}

#[test]
fn dead_letters_a_reading_rejected_before_the_gate_on_every_delivery() {
    let mut t = transformer();
    let bad = r#"{"device_id":"env-1","type":"env","seq":-1}"#;
    let out = run(&mut t, &[bad.as_bytes(), bad.as_bytes()]);
    assert_eq!(reasons(&out), ["wrong_type:seq", "wrong_type:seq"]);
    assert_eq!(out.counts.duplicates, 0);
    assert!(out.devices.is_empty());
    assert_eq!(t.devices_tracked(), 0);
}

#[test]
fn keeps_energy_from_decreasing_per_device() {
    let mut t = transformer();
    let out = run(
        &mut t,
        &[
            power(1, "10.5").as_bytes(),
            power(2, "10.5").as_bytes(),
            power(3, "10.4").as_bytes(),
            power(4, "null").as_bytes(),
            power(5, "11").as_bytes(),
        ],
    );
    assert_eq!(reasons(&out), ["not_monotonic:energy_kwh"]);
    assert_eq!(
        strings(&out.dead_letters, "detail"),
        ["energy_kwh = 10.4 is below 10.5 at the earlier seq 2"]
    );
    assert_eq!(
        u64s(&out.telemetry, "seq"),
        [Some(1), Some(2), Some(4), Some(5)]
    );
    assert_eq!(
        out.devices["pwr-1"],
        DeviceCheckpoint {
            seq: 5,
            energy_kwh: Some(11.0)
        }
    );
    // A late reading must not exceed what a later one already showed.
    let out = run(
        &mut t,
        &[
            power(7, "12").as_bytes(),
            power(6, "12.5").as_bytes(),
            power(8, "9").as_bytes(),
        ],
    );
    assert_eq!(
        reasons(&out),
        ["not_monotonic:energy_kwh", "not_monotonic:energy_kwh"]
    );
    assert_eq!(u64s(&out.dead_letters, "seq"), [Some(6), Some(8)]);
    let out = run(&mut t, &[power(9, "11.5").as_bytes()]);
    assert_eq!(reasons(&out), ["not_monotonic:energy_kwh"]);
}

#[test]
fn restores_the_last_energy_with_the_checkpoint() {
    let mut t = transformer();
    t.restore([(
        "pwr-1".to_owned(),
        DeviceCheckpoint {
            seq: 10,
            energy_kwh: Some(50.0),
        },
    )]);
    let out = run(
        &mut t,
        &[power(11, "49").as_bytes(), power(12, "50").as_bytes()],
    );
    assert_eq!(reasons(&out), ["not_monotonic:energy_kwh"]);
    assert_eq!(
        out.devices["pwr-1"],
        DeviceCheckpoint {
            seq: 12,
            energy_kwh: Some(50.0)
        }
    );
}

#[test]
fn keeps_unknown_devices_with_null_registry_columns_by_default() {
    let registry = Registry::from_csv_reader(REGISTRY.as_bytes()).unwrap();
    let mut t = transformer_with(TransformConfig::default(), registry);
    let stranger = env(1, "{}").replace("env-1", "env-77");
    let out = run(&mut t, &[stranger.as_bytes(), power(1, "1").as_bytes()]);
    assert_eq!(out.counts.accepted, 2);
    assert_eq!(strings(&out.telemetry, "site"), ["<null>", "plant-b"]);
    assert_eq!(f64s(&out.telemetry, "lat"), [None, None]);
}

#[test]
fn rejects_unknown_devices_when_configured_to() {
    let registry = Registry::from_csv_reader(REGISTRY.as_bytes()).unwrap();
    let config = TransformConfig {
        unknown_devices: UnknownDevices::Reject,
        ..TransformConfig::default()
    };
    let mut t = transformer_with(config, registry);
    let stranger = env(1, "{}").replace("env-1", "env-77");
    let out = run(&mut t, &[stranger.as_bytes(), env(1, "{}").as_bytes()]);
    assert_eq!(reasons(&out), ["unknown_device"]);
    assert_eq!(strings(&out.telemetry, "device_id"), ["env-1"]);
    // Rejected after the gate: a redelivery is a duplicate.
    let out = run(&mut t, &[stranger.as_bytes()]);
    assert_eq!(out.counts.duplicates, 1);
}

#[test]
fn hostile_inputs_never_panic_and_always_add_up() {
    let deep_object = format!("{}{}", "{\"a\":".repeat(40_000), "}".repeat(40_000));
    let deep_metric = env(
        1,
        &format!(r#"{{"temperature_c":{}}}"#, "[".repeat(100_000)),
    );
    let long_key = env(1, &format!(r#"{{"{}":1}}"#, "k".repeat(100_000)));
    let long_number = env(
        1,
        &format!(r#"{{"temperature_c":1{}}}"#, "0".repeat(100_000)),
    );
    let many_keys = format!(
        "{{{}\"device_id\":\"env-1\"}}",
        (0..10_000)
            .map(|i| format!("\"k{i}\":{i},"))
            .collect::<String>()
    );
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (vec![], "json_syntax"),
        (b" ".to_vec(), "json_syntax"),
        ("\u{feff}".as_bytes().to_vec(), "json_syntax"),
        (
            "\u{feff}{\"device_id\":\"env-1\"}".as_bytes().to_vec(),
            "json_syntax",
        ),
        (b"\0".to_vec(), "json_syntax"),
        ("[".repeat(100_000).into_bytes(), "json_syntax"),
        (deep_object.into_bytes(), "json_syntax"),
        (deep_metric.into_bytes(), "json_syntax"),
        (
            long_key.into_bytes(),
            "unknown_metric:kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk",
        ),
        (long_number.into_bytes(), "out_of_range:temperature_c"),
        (many_keys.into_bytes(), "missing_field:type"),
        (b"1e400".to_vec(), "json_syntax"),
        (b"-1e400".to_vec(), "json_syntax"),
        (b"NaN".to_vec(), "json_syntax"),
        (
            env(1, r#"{"temperature_c":NaN}"#).into_bytes(),
            "json_syntax",
        ),
        (
            env(1, r#"{"temperature_c":Infinity}"#).into_bytes(),
            "json_syntax",
        ),
        (b"-0".to_vec(), "not_an_object"),
        (br#""\ud800""#.to_vec(), "json_syntax"),
        (br#"{"device_id":"\ud800"}"#.to_vec(), "json_syntax"),
        (br#"{"\ud800":1}"#.to_vec(), "json_syntax"),
        (
            br#"{"device_id":"env-1","x":"\udc00\ud800"}"#.to_vec(),
            "json_syntax",
        ),
        (
            br#"{"device_id":"env-1","x":["\ud800"]}"#.to_vec(),
            "json_syntax",
        ),
        (
            env(1, r#"{"temperature_c":"\ud800"}"#).into_bytes(),
            "json_syntax",
        ),
        (b"123456789012345678901234567890".to_vec(), "not_an_object"),
        (
            br#"{"device_id":"env-1","type":"env","readings":[1e400]}"#.to_vec(),
            "json_syntax",
        ),
        (
            br#"{"device_id":"env-1","type":"env","readings":[[[[]]]],"seq":1}"#.to_vec(),
            "not_an_object",
        ),
        (
            br#"{"device_id":"env-1","type":"env","seq":99999999999999999999999999999999999999}"#
                .to_vec(),
            "wrong_type:seq",
        ),
        (b"\xed\xa0\x80".to_vec(), "invalid_utf8"),
        (b"{\"device_id\":\"env-1\xc0\"}".to_vec(), "invalid_utf8"),
    ];
    for (payload, code) in &cases {
        let what = String::from_utf8_lossy(&payload[..payload.len().min(60)]).into_owned();
        assert_eq!(&rejection(payload), code, "{what}");
    }
    // All at once, in one call: still one place for each.
    let refs: Vec<&[u8]> = cases.iter().map(|(p, _)| p.as_slice()).collect();
    let out = run(&mut transformer(), &refs);
    assert_eq!(out.counts.received, cases.len() as u64);
}

#[test]
fn accepts_negative_zero_and_underflowing_numbers_as_zero() {
    let out = run(
        &mut transformer(),
        &[
            env(1, r#"{"temperature_c":-0}"#).as_bytes(),
            env(2, r#"{"temperature_c":1e-400}"#).as_bytes(),
        ],
    );
    assert_eq!(out.counts.accepted, 2, "{:?}", reasons(&out));
    assert_eq!(
        f64s(&out.telemetry, "temperature_c"),
        [Some(-0.0), Some(0.0)]
    );
}

/// A tiny deterministic PRNG (xorshift64*), enough to mutate payloads reproducibly.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// `count` valid single and batch payloads of a few devices, most of them randomly mutated.
fn mutated_records(seed: u64, count: usize) -> Vec<RawRecord> {
    let interesting: &[&[u8]] = &[
        b"\"",
        b"{",
        b"}",
        b"[",
        b"]",
        b",",
        b":",
        b"\\",
        b"\\u",
        b"\\ud800",
        b"-",
        b"0",
        b"9",
        b"e",
        b".",
        b"null",
        b"1e400",
        b"\xff",
        b"\xc3",
        b"\"seq\":",
        b"\"ts\":",
    ];
    let mut rng = XorShift(seed);
    (0..count)
        .map(|_| {
            // Few devices and seqs, so that duplicates and out-of-order readings happen.
            let device = rng.below(10);
            let seq = rng.below(300);
            let energy = rng.below(300);
            let valid = match rng.below(3) {
                0 => env(seq as u64, r#"{"temperature_c":21.43,"humidity_pct":40.2,"battery_v":3.71}"#)
                    .replace("env-1", &format!("env-{device}")),
                1 => power(seq as u64, &energy.to_string()).replace("pwr-1", &format!("pwr-{device}")),
                _ => format!(
                    r#"{{"device_id":"env-{device}","type":"env","readings":[{{"ts":{TS_MS},"seq":{seq},"metrics":{{"temperature_c":1}}}},{{"ts":"{TS}","seq":{},"metrics":{{"humidity_pct":null}}}}]}}"#,
                    seq + 1
                ),
            };
            let mut bytes = valid.into_bytes();
            for _ in 0..rng.below(3) {
                let at = rng.below(bytes.len() + 1);
                match rng.below(3) {
                    0 if at < bytes.len() => bytes[at] = rng.next() as u8,
                    1 if at < bytes.len() => {
                        let end = (at + 1 + rng.below(8)).min(bytes.len());
                        bytes.drain(at..end);
                    }
                    _ => {
                        let piece = interesting[rng.below(interesting.len())];
                        bytes.splice(at..at, piece.iter().copied());
                    }
                }
            }
            record(bytes)
        })
        .collect()
}

#[test]
fn mutated_payloads_never_panic_and_always_add_up() {
    for seed in 1..=4 {
        let records = mutated_records(seed, 2000);
        let mut t = transformer();
        for chunk in records.chunks(37) {
            let out = run_records(&mut t, chunk);
            let received: u64 = out.counts.received;
            assert!(received >= chunk.len() as u64);
        }
    }
}

#[test]
fn parallel_decoding_gives_the_same_output_as_sequential() {
    let records = mutated_records(99, PARALLEL_MIN_RECORDS + 1500);
    let mut parallel = transformer();
    let all = run_records(&mut parallel, &records);

    let mut sequential = transformer();
    let mut counts = FlushCounts::default();
    let mut telemetry = Vec::new();
    let mut dead = Vec::new();
    let mut devices = BTreeMap::new();
    for chunk in records.chunks(500) {
        let out = run_records(&mut sequential, chunk);
        counts.add(&out.counts);
        telemetry.push(out.telemetry);
        dead.push(out.dead_letters);
        devices.extend(out.devices);
    }
    assert_eq!(all.counts, counts);
    let schema = TelemetrySchema::v1_default();
    assert_eq!(
        all.telemetry,
        concat_batches(schema.telemetry(), &telemetry).unwrap()
    );
    assert_eq!(
        all.dead_letters,
        concat_batches(schema.dead_letter(), &dead).unwrap()
    );
    assert_eq!(all.devices, devices);
    assert!(all.counts.accepted > 100, "{:?}", all.counts);
    assert!(all.counts.duplicates > 100, "{:?}", all.counts);
    assert!(all.counts.rejected_total() > 100, "{:?}", all.counts);
}

#[test]
fn writes_the_source_kind_given() {
    let mut t = transformer();
    let out = t.process(
        SourceKind::Kinesis,
        &[record(env(1, "{}")), record("x")],
        NOW_MS,
    );
    assert_eq!(strings(&out.telemetry, "source"), ["kinesis"]);
    assert_eq!(strings(&out.dead_letters, "source"), ["kinesis"]);
}

#[test]
fn empty_input_gives_empty_batches() {
    let out = run(&mut transformer(), &[]);
    assert_eq!(out.telemetry.num_rows(), 0);
    assert_eq!(out.dead_letters.num_rows(), 0);
    assert_eq!(out.counts, FlushCounts::default());
    assert!(out.devices.is_empty());
    assert_eq!(out.telemetry.column(0).null_count(), 0);
}
