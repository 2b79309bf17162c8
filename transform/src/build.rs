//! Arrow builders for the two output tables, filled row by row in phase 2 and finished into
//! record batches shaped exactly like `TelemetrySchema::telemetry()` and `dead_letter()`.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, BinaryBuilder, Float64Builder, StringBuilder, TimestampMicrosecondBuilder,
    UInt64Builder,
};
use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use sensorlake_core::{RawRecord, Reason};

use crate::registry::DeviceInfo;
use crate::validate::TypePlan;

const UTC: &str = "UTC";

/// The longest `detail` written, in bytes. Details quote payload text only in short excerpts,
/// so this only guards against a long serde_json message.
const MAX_DETAIL: usize = 200;

/// `s` cut to at most `max` bytes, on a character boundary.
fn clip(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// One accepted reading, as the telemetry table stores it.
pub(crate) struct Row<'r> {
    pub device_id: &'r str,
    pub plan: &'r TypePlan,
    pub ts_us: i64,
    pub seq: u64,
    /// One value per metric of the device type, in type order.
    pub values: &'r [Option<f64>],
    pub info: Option<&'r DeviceInfo>,
    pub record: &'r RawRecord,
}

/// The telemetry table under construction.
#[derive(Debug)]
pub(crate) struct TelemetryBuilder {
    device_id: StringBuilder,
    device_type: StringBuilder,
    ts: TimestampMicrosecondBuilder,
    seq: UInt64Builder,
    metrics: Vec<Float64Builder>,
    site: StringBuilder,
    model: StringBuilder,
    firmware: StringBuilder,
    lat: Float64Builder,
    lon: Float64Builder,
    received_at: TimestampMicrosecondBuilder,
    source: StringBuilder,
    source_position: StringBuilder,
    source_name: &'static str,
}

impl TelemetryBuilder {
    /// Room for `rows` rows with `metric_columns` metric columns.
    pub(crate) fn new(metric_columns: usize, rows: usize, source_name: &'static str) -> Self {
        let text = |bytes_per_row| StringBuilder::with_capacity(rows, rows * bytes_per_row);
        let float = || Float64Builder::with_capacity(rows);
        let time = || TimestampMicrosecondBuilder::with_capacity(rows).with_timezone(UTC);
        Self {
            device_id: text(16),
            device_type: text(8),
            ts: time(),
            seq: UInt64Builder::with_capacity(rows),
            metrics: (0..metric_columns).map(|_| float()).collect(),
            site: text(8),
            model: text(8),
            firmware: text(8),
            lat: float(),
            lon: float(),
            received_at: time(),
            source: text(source_name.len()),
            source_position: text(32),
            source_name,
        }
    }

    pub(crate) fn push(&mut self, row: &Row<'_>) {
        self.device_id.append_value(row.device_id);
        self.device_type.append_value(&row.plan.name);
        self.ts.append_value(row.ts_us);
        self.seq.append_value(row.seq);
        for (column, metric) in self.metrics.iter_mut().zip(&row.plan.column_metric) {
            column.append_option(metric.and_then(|m| row.values[m]));
        }
        let info = row.info;
        self.site
            .append_option(info.and_then(|i| i.site.as_deref()));
        self.model
            .append_option(info.and_then(|i| i.model.as_deref()));
        self.firmware
            .append_option(info.and_then(|i| i.firmware.as_deref()));
        self.lat.append_option(info.and_then(|i| i.lat));
        self.lon.append_option(info.and_then(|i| i.lon));
        self.received_at.append_value(row.record.received_at_us);
        self.source.append_value(self.source_name);
        self.source_position.append_value(&row.record.position);
    }

    pub(crate) fn finish(mut self, schema: &SchemaRef) -> RecordBatch {
        let mut columns: Vec<ArrayRef> = vec![
            Arc::new(self.device_id.finish()),
            Arc::new(self.device_type.finish()),
            Arc::new(self.ts.finish()),
            Arc::new(self.seq.finish()),
        ];
        columns.extend(
            self.metrics
                .iter_mut()
                .map(|m| Arc::new(m.finish()) as ArrayRef),
        );
        columns.extend([
            Arc::new(self.site.finish()) as ArrayRef,
            Arc::new(self.model.finish()),
            Arc::new(self.firmware.finish()),
            Arc::new(self.lat.finish()),
            Arc::new(self.lon.finish()),
            Arc::new(self.received_at.finish()),
            Arc::new(self.source.finish()),
            Arc::new(self.source_position.finish()),
        ]);
        RecordBatch::try_new(Arc::clone(schema), columns)
            .expect("the columns are built in the order and types of the telemetry schema")
    }
}

/// One rejected reading or message, as the dead-letter table stores it.
pub(crate) struct DeadLetter<'r> {
    pub record: &'r RawRecord,
    pub reason: &'r Reason,
    pub detail: &'r str,
    pub payload: &'r [u8],
    pub device_id: Option<&'r str>,
    pub seq: Option<u64>,
}

/// The dead-letter table under construction.
#[derive(Debug)]
pub(crate) struct DeadLetterBuilder {
    received_at: TimestampMicrosecondBuilder,
    source: StringBuilder,
    source_position: StringBuilder,
    reason: StringBuilder,
    detail: StringBuilder,
    payload: BinaryBuilder,
    device_id: StringBuilder,
    seq: UInt64Builder,
    source_name: &'static str,
}

impl DeadLetterBuilder {
    pub(crate) fn new(source_name: &'static str) -> Self {
        Self {
            received_at: TimestampMicrosecondBuilder::new().with_timezone(UTC),
            source: StringBuilder::new(),
            source_position: StringBuilder::new(),
            reason: StringBuilder::new(),
            detail: StringBuilder::new(),
            payload: BinaryBuilder::new(),
            device_id: StringBuilder::new(),
            seq: UInt64Builder::new(),
            source_name,
        }
    }

    pub(crate) fn push(&mut self, dead: &DeadLetter<'_>) {
        self.received_at.append_value(dead.record.received_at_us);
        self.source.append_value(self.source_name);
        self.source_position.append_value(&dead.record.position);
        self.reason.append_value(dead.reason.code());
        self.detail.append_value(clip(dead.detail, MAX_DETAIL));
        self.payload.append_value(dead.payload);
        self.device_id.append_option(dead.device_id);
        self.seq.append_option(dead.seq);
    }

    pub(crate) fn finish(mut self, schema: &SchemaRef) -> RecordBatch {
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.received_at.finish()),
            Arc::new(self.source.finish()),
            Arc::new(self.source_position.finish()),
            Arc::new(self.reason.finish()),
            Arc::new(self.detail.finish()),
            Arc::new(self.payload.finish()),
            Arc::new(self.device_id.finish()),
            Arc::new(self.seq.finish()),
        ];
        RecordBatch::try_new(Arc::clone(schema), columns)
            .expect("the columns are built in the order and types of the dead-letter schema")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clips_details_on_a_character_boundary() {
        assert_eq!(clip("abc", 5), "abc");
        assert_eq!(clip("abcdef", 3), "abc");
        assert_eq!(clip("aé", 2), "a");
    }
}
