//! The shape of the lake's tables, derived from the configured device types.
//!
//! The telemetry table has a fixed prefix, one nullable `Float64` column per distinct metric
//! name across all device types (in the order they are first defined), then the registry and
//! provenance columns. Hive partition columns (`date`, `hour`) live in the path, not the file.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use serde::{Deserialize, Serialize};

/// Column names shared by the writer (transform, sink) and the readers (verify, query).
pub mod columns {
    /// Device id, as sent and validated.
    pub const DEVICE_ID: &str = "device_id";
    /// Device type (`type` in the payload).
    pub const DEVICE_TYPE: &str = "device_type";
    /// Event time, µs UTC.
    pub const TS: &str = "ts";
    /// Per-device sequence number.
    pub const SEQ: &str = "seq";
    /// Registry: site.
    pub const SITE: &str = "site";
    /// Registry: model.
    pub const MODEL: &str = "model";
    /// Registry: firmware.
    pub const FIRMWARE: &str = "firmware";
    /// Registry: latitude.
    pub const LAT: &str = "lat";
    /// Registry: longitude.
    pub const LON: &str = "lon";
    /// When the source received the message, µs UTC.
    pub const RECEIVED_AT: &str = "received_at";
    /// `mqtt` or `kinesis`.
    pub const SOURCE: &str = "source";
    /// Topic, or `shard/sequence`.
    pub const SOURCE_POSITION: &str = "source_position";
    /// Dead letters: the stable reason code.
    pub const REASON: &str = "reason";
    /// Dead letters: a human-readable explanation.
    pub const DETAIL: &str = "detail";
    /// Dead letters: the raw payload (for one bad reading inside a batch, that reading's JSON).
    pub const PAYLOAD: &str = "payload";
    /// Dead letters: device id when it could be read (nullable), to find a device's rejects.
    pub const DL_DEVICE_ID: &str = "device_id";
    /// Dead letters: seq when it could be read (nullable).
    pub const DL_SEQ: &str = "seq";
}

/// One metric of a device type: its column name and valid range.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricSpec {
    /// Column name, e.g. `temperature_c`.
    pub name: String,
    /// Smallest valid value (inclusive); none means unbounded.
    #[serde(default)]
    pub min: Option<f64>,
    /// Largest valid value (inclusive); none means unbounded.
    #[serde(default)]
    pub max: Option<f64>,
    /// The value may never decrease from one reading of a device to the next (energy meters).
    #[serde(default)]
    pub never_decreasing: bool,
}

impl MetricSpec {
    fn new(name: &str, min: f64, max: Option<f64>) -> Self {
        Self {
            name: name.to_owned(),
            min: Some(min),
            max,
            never_decreasing: false,
        }
    }

    /// Whether `v` is finite and inside the valid range.
    pub fn in_range(&self, v: f64) -> bool {
        v.is_finite() && self.min.is_none_or(|m| v >= m) && self.max.is_none_or(|m| v <= m)
    }
}

/// A device type and the metrics its readings carry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceTypeSpec {
    /// The `type` value in payloads and topics, e.g. `env`.
    pub name: String,
    /// The metrics a reading of this type may carry.
    pub metrics: Vec<MetricSpec>,
}

impl DeviceTypeSpec {
    /// The three device types of telemetry v1, with the spec's valid ranges.
    pub fn defaults() -> Vec<DeviceTypeSpec> {
        vec![
            DeviceTypeSpec {
                name: "env".into(),
                metrics: vec![
                    MetricSpec::new("temperature_c", -40.0, Some(125.0)),
                    MetricSpec::new("humidity_pct", 0.0, Some(100.0)),
                    MetricSpec::new("battery_v", 2.0, Some(4.5)),
                ],
            },
            DeviceTypeSpec {
                name: "vibration".into(),
                metrics: vec![
                    MetricSpec::new("rms_mm_s", 0.0, Some(100.0)),
                    MetricSpec::new("peak_g", 0.0, Some(50.0)),
                    MetricSpec::new("temperature_c", -40.0, Some(125.0)),
                ],
            },
            DeviceTypeSpec {
                name: "power".into(),
                metrics: vec![
                    MetricSpec::new("voltage_v", 0.0, Some(500.0)),
                    MetricSpec::new("current_a", 0.0, Some(200.0)),
                    MetricSpec::new("power_w", 0.0, Some(100_000.0)),
                    MetricSpec {
                        never_decreasing: true,
                        ..MetricSpec::new("energy_kwh", 0.0, None)
                    },
                ],
            },
        ]
    }
}

/// Errors in a set of device types.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SchemaError {
    /// Two device types share a name.
    #[error("device type `{0}` is defined twice")]
    DuplicateType(String),
    /// A device type lists one metric twice.
    #[error("device type `{ty}` lists metric `{metric}` twice")]
    DuplicateMetric {
        /// The device type.
        ty: String,
        /// The metric.
        metric: String,
    },
    /// A metric name would collide with a fixed column or is not a plain identifier.
    #[error(
        "metric name `{0}` is not allowed: use 1-64 of a-z 0-9 _ starting with a letter, and no fixed column name"
    )]
    BadMetricName(String),
    /// A device type name is not a plain identifier.
    #[error("device type name `{0}` is not allowed: use 1-64 of a-z A-Z 0-9 _ -")]
    BadTypeName(String),
    /// No device types at all.
    #[error("at least one device type must be configured")]
    NoTypes,
}

/// The telemetry and dead-letter table schemas for a set of device types.
#[derive(Debug, Clone)]
pub struct TelemetrySchema {
    device_types: Vec<DeviceTypeSpec>,
    type_index: HashMap<String, usize>,
    metric_columns: Vec<String>,
    /// For each device type, for each of its metrics, the metric column index.
    metric_slots: Vec<Vec<usize>>,
    telemetry: SchemaRef,
    dead_letter: SchemaRef,
}

const FIXED_COLUMNS: &[&str] = &[
    columns::DEVICE_ID,
    columns::DEVICE_TYPE,
    columns::TS,
    columns::SEQ,
    columns::SITE,
    columns::MODEL,
    columns::FIRMWARE,
    columns::LAT,
    columns::LON,
    columns::RECEIVED_AT,
    columns::SOURCE,
    columns::SOURCE_POSITION,
    "date",
    "hour",
];

/// The timestamp type of every time column: µs, UTC (readable by DuckDB, Spark and Athena).
pub fn timestamp_type() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

impl TelemetrySchema {
    /// Builds the schemas for these device types.
    ///
    /// # Errors
    /// When names repeat, collide with fixed columns, or are not plain identifiers.
    pub fn try_new(device_types: Vec<DeviceTypeSpec>) -> Result<Self, SchemaError> {
        if device_types.is_empty() {
            return Err(SchemaError::NoTypes);
        }
        let mut type_index = HashMap::new();
        let mut metric_columns: Vec<String> = Vec::new();
        let mut metric_slots = Vec::new();
        for (i, t) in device_types.iter().enumerate() {
            let name_ok = !t.name.is_empty()
                && t.name.len() <= 64
                && t.name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            if !name_ok {
                return Err(SchemaError::BadTypeName(t.name.clone()));
            }
            if type_index.insert(t.name.clone(), i).is_some() {
                return Err(SchemaError::DuplicateType(t.name.clone()));
            }
            let mut slots = Vec::new();
            for m in &t.metrics {
                let ok = !m.name.is_empty()
                    && m.name.len() <= 64
                    && m.name.starts_with(|c: char| c.is_ascii_lowercase())
                    && m.name
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                    && !FIXED_COLUMNS.contains(&m.name.as_str());
                if !ok {
                    return Err(SchemaError::BadMetricName(m.name.clone()));
                }
                let slot = match metric_columns.iter().position(|c| c == &m.name) {
                    Some(s) => s,
                    None => {
                        metric_columns.push(m.name.clone());
                        metric_columns.len() - 1
                    }
                };
                if slots.contains(&slot) {
                    return Err(SchemaError::DuplicateMetric {
                        ty: t.name.clone(),
                        metric: m.name.clone(),
                    });
                }
                slots.push(slot);
            }
            metric_slots.push(slots);
        }

        let ts = timestamp_type();
        let mut fields = vec![
            Field::new(columns::DEVICE_ID, DataType::Utf8, false),
            Field::new(columns::DEVICE_TYPE, DataType::Utf8, false),
            Field::new(columns::TS, ts.clone(), false),
            Field::new(columns::SEQ, DataType::UInt64, false),
        ];
        fields.extend(
            metric_columns
                .iter()
                .map(|m| Field::new(m, DataType::Float64, true)),
        );
        fields.extend([
            Field::new(columns::SITE, DataType::Utf8, true),
            Field::new(columns::MODEL, DataType::Utf8, true),
            Field::new(columns::FIRMWARE, DataType::Utf8, true),
            Field::new(columns::LAT, DataType::Float64, true),
            Field::new(columns::LON, DataType::Float64, true),
            Field::new(columns::RECEIVED_AT, ts.clone(), false),
            Field::new(columns::SOURCE, DataType::Utf8, false),
            Field::new(columns::SOURCE_POSITION, DataType::Utf8, false),
        ]);
        let telemetry = Arc::new(Schema::new(fields));
        let dead_letter = Arc::new(Schema::new(vec![
            Field::new(columns::RECEIVED_AT, ts, false),
            Field::new(columns::SOURCE, DataType::Utf8, false),
            Field::new(columns::SOURCE_POSITION, DataType::Utf8, false),
            Field::new(columns::REASON, DataType::Utf8, false),
            Field::new(columns::DETAIL, DataType::Utf8, false),
            Field::new(columns::PAYLOAD, DataType::Binary, false),
            Field::new(columns::DL_DEVICE_ID, DataType::Utf8, true),
            Field::new(columns::DL_SEQ, DataType::UInt64, true),
        ]));
        Ok(Self {
            device_types,
            type_index,
            metric_columns,
            metric_slots,
            telemetry,
            dead_letter,
        })
    }

    /// The schema for the default device types of telemetry v1.
    pub fn v1_default() -> Self {
        Self::try_new(DeviceTypeSpec::defaults()).expect("the built-in device types are valid")
    }

    /// The configured device types, in configuration order.
    pub fn device_types(&self) -> &[DeviceTypeSpec] {
        &self.device_types
    }

    /// The index of a device type by name.
    pub fn type_index(&self, name: &str) -> Option<usize> {
        self.type_index.get(name).copied()
    }

    /// The metric column names, in column order.
    pub fn metric_columns(&self) -> &[String] {
        &self.metric_columns
    }

    /// For device type `ty` (an index), the metric column index of each of its metrics.
    pub fn metric_slots(&self, ty: usize) -> &[usize] {
        &self.metric_slots[ty]
    }

    /// Index of the first metric column in the telemetry schema.
    pub const FIRST_METRIC_COLUMN: usize = 4;

    /// The telemetry table's Arrow schema.
    pub fn telemetry(&self) -> &SchemaRef {
        &self.telemetry
    }

    /// The dead-letter table's Arrow schema.
    pub fn dead_letter(&self) -> &SchemaRef {
        &self.dead_letter
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_schema_has_one_column_per_distinct_metric() {
        let s = TelemetrySchema::v1_default();
        assert_eq!(
            s.metric_columns(),
            [
                "temperature_c",
                "humidity_pct",
                "battery_v",
                "rms_mm_s",
                "peak_g",
                "voltage_v",
                "current_a",
                "power_w",
                "energy_kwh"
            ]
        );
        let vib = s.type_index("vibration").unwrap();
        assert_eq!(s.metric_slots(vib), [3, 4, 0]);
        assert_eq!(
            s.telemetry()
                .field(TelemetrySchema::FIRST_METRIC_COLUMN)
                .name(),
            "temperature_c"
        );
        assert_eq!(s.telemetry().fields().len(), 4 + 9 + 8);
    }

    #[test]
    fn rejects_metric_names_that_collide_with_fixed_columns() {
        let mut t = DeviceTypeSpec::defaults();
        t[0].metrics[0].name = "date".into();
        assert_eq!(
            TelemetrySchema::try_new(t).unwrap_err(),
            SchemaError::BadMetricName("date".into())
        );
    }

    #[test]
    fn range_check_rejects_non_finite_values() {
        let m = MetricSpec::new("x", 0.0, None);
        assert!(m.in_range(1e300));
        assert!(!m.in_range(f64::INFINITY));
        assert!(!m.in_range(f64::NAN));
        assert!(!m.in_range(-0.5));
    }
}
