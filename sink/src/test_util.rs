//! Test helpers: hand-built batches of the default schema, and reading files back.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{
    ArrayRef, BinaryArray, RecordBatch, StringArray, TimestampMicrosecondArray, UInt64Array,
    new_null_array,
};
use arrow::datatypes::DataType;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use sensorlake_core::{TelemetrySchema, columns};

use crate::{Flush, LakeOptions};
use sensorlake_core::{DeviceCheckpoint, FlushCounts};
use std::collections::BTreeMap;

/// 2026-11-27T15:00:00Z in µs.
pub(crate) const T0: i64 = 1_795_791_600_000_000;
/// One hour in µs.
pub(crate) const HOUR_US: i64 = 3_600_000_000;
/// One day in µs.
pub(crate) const DAY_US: i64 = 24 * HOUR_US;

/// Options for fast tests: no fsync.
pub(crate) fn fast_options() -> LakeOptions {
    LakeOptions {
        fsync: false,
        ..LakeOptions::default()
    }
}

fn timestamps(values: Vec<i64>) -> ArrayRef {
    Arc::new(TimestampMicrosecondArray::from(values).with_timezone("UTC"))
}

/// A telemetry batch of `(device_id, ts_us, seq)` rows: type `env`, source `mqtt`,
/// `received_at` = `ts`, metrics and registry columns null.
pub(crate) fn telemetry_batch(schema: &TelemetrySchema, rows: &[(&str, i64, u64)]) -> RecordBatch {
    let n = rows.len();
    let schema = schema.telemetry().clone();
    let columns: Vec<ArrayRef> = schema
        .fields()
        .iter()
        .map(|f| -> ArrayRef {
            match f.name().as_str() {
                columns::DEVICE_ID => {
                    Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0)))
                }
                columns::DEVICE_TYPE => {
                    Arc::new(StringArray::from_iter_values(std::iter::repeat_n("env", n)))
                }
                columns::TS | columns::RECEIVED_AT => {
                    timestamps(rows.iter().map(|r| r.1).collect())
                }
                columns::SEQ => Arc::new(UInt64Array::from_iter_values(rows.iter().map(|r| r.2))),
                columns::SOURCE => Arc::new(StringArray::from_iter_values(std::iter::repeat_n(
                    "mqtt", n,
                ))),
                columns::SOURCE_POSITION => Arc::new(StringArray::from_iter_values(
                    rows.iter().map(|r| format!("telemetry/s1/env/{}", r.0)),
                )),
                _ => {
                    assert!(f.is_nullable(), "column {} needs a value", f.name());
                    new_null_array(f.data_type(), n)
                }
            }
        })
        .collect();
    RecordBatch::try_new(schema, columns).unwrap()
}

/// A dead-letter batch with one `json_syntax` row per `received_at`.
pub(crate) fn dead_letter_batch(schema: &TelemetrySchema, received_at: &[i64]) -> RecordBatch {
    let n = received_at.len();
    let schema = schema.dead_letter().clone();
    let columns: Vec<ArrayRef> = schema
        .fields()
        .iter()
        .map(|f| -> ArrayRef {
            match (f.name().as_str(), f.data_type()) {
                (columns::RECEIVED_AT, _) => timestamps(received_at.to_vec()),
                (columns::SOURCE, _) => Arc::new(StringArray::from_iter_values(
                    std::iter::repeat_n("mqtt", n),
                )),
                (columns::SOURCE_POSITION, _) => Arc::new(StringArray::from_iter_values(
                    std::iter::repeat_n("telemetry/s1/env/x", n),
                )),
                (columns::REASON, _) => Arc::new(StringArray::from_iter_values(
                    std::iter::repeat_n("json_syntax", n),
                )),
                (columns::DETAIL, _) => Arc::new(StringArray::from_iter_values(
                    std::iter::repeat_n("expected value at line 1 column 1", n),
                )),
                (columns::PAYLOAD, DataType::Binary) => Arc::new(BinaryArray::from_iter_values(
                    std::iter::repeat_n(b"{not json".as_slice(), n),
                )),
                _ => {
                    assert!(f.is_nullable(), "column {} needs a value", f.name());
                    new_null_array(f.data_type(), n)
                }
            }
        })
        .collect();
    RecordBatch::try_new(schema, columns).unwrap()
}

/// Every batch of the Parquet file at `path`.
pub(crate) fn read_parquet(path: &Path) -> Vec<RecordBatch> {
    let reader = ParquetRecordBatchReaderBuilder::try_new(File::open(path).unwrap())
        .unwrap()
        .build()
        .unwrap();
    reader.map(Result::unwrap).collect()
}

/// Every file under `dir` (recursively), as paths relative to `dir` with `/`, sorted.
pub(crate) fn list_files(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(base, &path, out);
            } else {
                let rel = path.strip_prefix(base).unwrap();
                let parts: Vec<_> = rel.iter().map(|s| s.to_str().unwrap()).collect();
                out.push(parts.join("/"));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// A flush that owns its parts.
pub(crate) struct TestFlush {
    pub(crate) telemetry: Vec<RecordBatch>,
    pub(crate) dead_letters: Vec<RecordBatch>,
    pub(crate) counts: FlushCounts,
    pub(crate) devices: BTreeMap<String, DeviceCheckpoint>,
    pub(crate) sources: serde_json::Value,
}

impl TestFlush {
    /// Telemetry `rows` and one dead letter per `dead` time; counts and checkpoints to match.
    pub(crate) fn new(schema: &TelemetrySchema, rows: &[(&str, i64, u64)], dead: &[i64]) -> Self {
        let mut devices = BTreeMap::new();
        for &(device, _, seq) in rows {
            let cp = devices
                .entry(device.to_owned())
                .or_insert(DeviceCheckpoint {
                    seq,
                    energy_kwh: None,
                });
            cp.seq = cp.seq.max(seq);
        }
        let mut counts = FlushCounts {
            received: (rows.len() + dead.len()) as u64,
            accepted: rows.len() as u64,
            ..FlushCounts::default()
        };
        if !dead.is_empty() {
            counts
                .rejected
                .insert("json_syntax".into(), dead.len() as u64);
        }
        Self {
            telemetry: if rows.is_empty() {
                Vec::new()
            } else {
                vec![telemetry_batch(schema, rows)]
            },
            dead_letters: if dead.is_empty() {
                Vec::new()
            } else {
                vec![dead_letter_batch(schema, dead)]
            },
            counts,
            devices,
            sources: serde_json::Value::Null,
        }
    }

    pub(crate) fn flush(&self) -> Flush<'_> {
        Flush {
            telemetry: &self.telemetry,
            dead_letters: &self.dead_letters,
            counts: &self.counts,
            devices: &self.devices,
            sources: &self.sources,
        }
    }
}
