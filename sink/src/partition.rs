//! Planning a flush's files: rows grouped by Hive partition, groups split by row limit.
//!
//! Pure: batches in, a list of planned files (partition folder + batches) out, no I/O. Rows are
//! grouped on an integer per row — hours since the epoch of `ts` for telemetry, days since the
//! epoch of `received_at` for dead letters — so no string is built per row; the partition
//! folder is formatted once per group. A batch whose rows all fall in one partition (the common
//! case) is passed through without copying. Telemetry rows are then ordered by
//! `(device_id, ts)` within their partition, so every file is sorted that way.

use std::collections::{BTreeMap, HashMap};

use arrow::array::{AsArray, RecordBatch, UInt64Array};
use arrow::compute::{interleave_record_batch, take_record_batch};
use arrow::datatypes::{SchemaRef, TimestampMicrosecondType};
use sensorlake_core::columns;
use sensorlake_core::time::{MICROS_PER_DAY, MICROS_PER_HOUR};

use crate::SinkError;
use crate::layout;
use crate::record::Table;

/// One file to write: its partition folder and the rows that go in it.
#[derive(Debug)]
pub(crate) struct PlannedFile {
    /// The table.
    pub(crate) table: Table,
    /// The partition folder, relative to the lake root (`telemetry/date=…/hour=…`).
    pub(crate) dir: String,
    /// The rows, as zero-copy slices of the grouped batches.
    pub(crate) batches: Vec<RecordBatch>,
    /// Rows in `batches`, at most the row limit.
    pub(crate) rows: usize,
}

/// Groups the rows of `batches` (all of `schema`) by partition, in partition order, and splits
/// each partition into files of at most `max_rows` rows.
///
/// # Errors
/// [`SinkError::SchemaMismatch`] when a batch's schema is not `schema`,
/// [`SinkError::Partition`] when an Arrow kernel fails.
pub(crate) fn plan_files(
    table: Table,
    schema: &SchemaRef,
    batches: &[RecordBatch],
    max_rows: usize,
) -> Result<Vec<PlannedFile>, SinkError> {
    debug_assert!(max_rows > 0, "validated by LakeOptions::validate");
    let (time_column, unit) = match table {
        Table::Telemetry => (columns::TS, MICROS_PER_HOUR),
        Table::DeadLetter => (columns::RECEIVED_AT, MICROS_PER_DAY),
    };
    let time_index = schema
        .index_of(time_column)
        .map_err(|_| SinkError::SchemaMismatch {
            table,
            why: format!("the schema has no `{time_column}` column"),
        })?;

    let mut groups: BTreeMap<i64, Vec<RecordBatch>> = BTreeMap::new();
    for batch in batches {
        check_schema(table, schema, batch)?;
        let times = batch
            .column(time_index)
            .as_primitive_opt::<TimestampMicrosecondType>()
            .ok_or_else(|| SinkError::SchemaMismatch {
                table,
                why: format!("`{time_column}` is not a µs timestamp"),
            })?;
        let keys: Vec<i64> = times.values().iter().map(|t| t.div_euclid(unit)).collect();
        group_rows(batch, &keys, &mut groups)
            .map_err(|source| SinkError::Partition { table, source })?;
    }

    let mut files = Vec::new();
    for (key, parts) in groups {
        let parts = match table {
            Table::Telemetry => sorted_by_device(schema, parts)
                .map_err(|source| SinkError::Partition { table, source })?,
            Table::DeadLetter => parts,
        };
        let dir = match table {
            Table::Telemetry => layout::telemetry_partition(key),
            Table::DeadLetter => layout::dead_letter_partition(key),
        };
        let mut current = Vec::new();
        let mut rows = 0;
        for part in parts {
            let mut offset = 0;
            while offset < part.num_rows() {
                let len = (max_rows - rows).min(part.num_rows() - offset);
                current.push(part.slice(offset, len));
                rows += len;
                offset += len;
                if rows == max_rows {
                    files.push(PlannedFile {
                        table,
                        dir: dir.clone(),
                        batches: std::mem::take(&mut current),
                        rows,
                    });
                    rows = 0;
                }
            }
        }
        if rows > 0 {
            files.push(PlannedFile {
                table,
                dir,
                batches: current,
                rows,
            });
        }
    }
    Ok(files)
}

/// The rows of one telemetry partition in `(device_id, ts)` order, gathered into one batch (or
/// `parts` unchanged when they are in that order already).
///
/// Rows of one device next to each other, in time order, is what makes a file small (`seq` and
/// `ts` become small deltas, the enrichment columns long runs, a device's metric values
/// neighbours) and per-device scans cheap (the page index on `device_id` prunes). Device ids
/// are ranked once per distinct id, so the sort compares integers, not strings; the gather is
/// one copy of the flush's rows, small beside encoding them (BENCHMARKS.md).
pub(crate) fn sorted_by_device(
    schema: &SchemaRef,
    parts: Vec<RecordBatch>,
) -> Result<Vec<RecordBatch>, arrow::error::ArrowError> {
    let mut keys = ranked_keys(schema, &parts)?;
    if keys.is_sorted() {
        return Ok(parts);
    }
    keys.sort_unstable();
    if let [batch] = parts.as_slice() {
        // The common case, one batch per flush: `take` is faster than `interleave`.
        let rows: Vec<u64> = keys.iter().map(|k| k.3 as u64).collect();
        return Ok(vec![take_record_batch(batch, &UInt64Array::from(rows))?]);
    }
    let indices: Vec<(usize, usize)> = keys.iter().map(|k| (k.2, k.3)).collect();
    let batches: Vec<&RecordBatch> = parts.iter().collect();
    Ok(vec![interleave_record_batch(&batches, &indices)?])
}

/// Whether the rows of `parts` (batches of `schema`, which needs only the `device_id` and `ts`
/// columns) are in `(device_id, ts)` order, read one batch after the other.
pub(crate) fn is_sorted_by_device(
    schema: &SchemaRef,
    parts: &[RecordBatch],
) -> Result<bool, arrow::error::ArrowError> {
    Ok(ranked_keys(schema, parts)?.is_sorted())
}

/// The sort key of every row of `parts`: (rank of its device id among the distinct ids, ts,
/// batch, row), in reading order.
fn ranked_keys(
    schema: &SchemaRef,
    parts: &[RecordBatch],
) -> Result<Vec<(usize, i64, usize, usize)>, arrow::error::ArrowError> {
    let column = |name: &str| {
        schema
            .index_of(name)
            .map_err(|_| arrow::error::ArrowError::SchemaError(format!("no `{name}` column")))
    };
    let (id_index, ts_index) = (column(columns::DEVICE_ID)?, column(columns::TS)?);
    // (device rank, ts, part, row); the rank is the order of first appearance until fixed up.
    let mut keys: Vec<(usize, i64, usize, usize)> = Vec::new();
    let mut first_seen: HashMap<&str, usize> = HashMap::new();
    for (part, batch) in parts.iter().enumerate() {
        let ids = batch
            .column(id_index)
            .as_string_opt::<i32>()
            .ok_or_else(|| {
                arrow::error::ArrowError::SchemaError("`device_id` is not a string".into())
            })?;
        let ts = batch
            .column(ts_index)
            .as_primitive_opt::<TimestampMicrosecondType>()
            .ok_or_else(|| {
                arrow::error::ArrowError::SchemaError("`ts` is not a µs timestamp".into())
            })?;
        keys.reserve(batch.num_rows());
        for row in 0..batch.num_rows() {
            let next = first_seen.len();
            let seen = *first_seen.entry(ids.value(row)).or_insert(next);
            keys.push((seen, ts.value(row), part, row));
        }
    }
    let mut by_name: Vec<(&str, usize)> = first_seen.into_iter().collect();
    by_name.sort_unstable();
    let mut rank = vec![0; by_name.len()];
    for (position, (_, seen)) in by_name.into_iter().enumerate() {
        rank[seen] = position;
    }
    for key in &mut keys {
        key.0 = rank[key.0];
    }
    Ok(keys)
}

/// Adds the rows of `batch` to `groups` by their key (`keys[i]` is row `i`'s partition).
fn group_rows(
    batch: &RecordBatch,
    keys: &[i64],
    groups: &mut BTreeMap<i64, Vec<RecordBatch>>,
) -> Result<(), arrow::error::ArrowError> {
    let Some(&first) = keys.first() else {
        return Ok(());
    };
    if keys.iter().all(|&k| k == first) {
        groups.entry(first).or_default().push(batch.clone());
        return Ok(());
    }
    // Row indices per key; runs of equal keys (rows mostly arrive in time order) cost one map
    // lookup per run.
    let mut indices: BTreeMap<i64, Vec<u64>> = BTreeMap::new();
    let mut start = 0;
    for i in 1..=keys.len() {
        if i == keys.len() || keys[i] != keys[start] {
            indices
                .entry(keys[start])
                .or_default()
                .extend(start as u64..i as u64);
            start = i;
        }
    }
    for (key, rows) in indices {
        let taken = take_record_batch(batch, &UInt64Array::from(rows))?;
        groups.entry(key).or_default().push(taken);
    }
    Ok(())
}

/// Checks `batch` has exactly the columns of `schema` (names, types, nullability).
fn check_schema(table: Table, schema: &SchemaRef, batch: &RecordBatch) -> Result<(), SinkError> {
    let expected = schema.fields();
    let found = batch.schema_ref().fields();
    if expected == found {
        return Ok(());
    }
    let describe = |f: &arrow::datatypes::Field| {
        format!(
            "`{}` {}{}",
            f.name(),
            f.data_type(),
            if f.is_nullable() { " (nullable)" } else { "" }
        )
    };
    let why = if expected.len() != found.len() {
        format!("expected {} columns, found {}", expected.len(), found.len())
    } else {
        expected
            .iter()
            .zip(found.iter())
            .enumerate()
            .find(|(_, (e, f))| e != f)
            .map_or_else(
                || "the columns differ in metadata".to_owned(),
                |(i, (e, f))| {
                    format!(
                        "column {i}: expected {}, found {}",
                        describe(e),
                        describe(f)
                    )
                },
            )
    };
    Err(SinkError::SchemaMismatch { table, why })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{HOUR_US, T0, telemetry_batch};
    use sensorlake_core::TelemetrySchema;

    #[test]
    fn groups_rows_by_hour_in_partition_order() {
        let schema = TelemetrySchema::v1_default();
        let batch = telemetry_batch(
            &schema,
            &[
                ("a", T0 + HOUR_US, 2),
                ("a", T0, 1),
                ("b", T0 + HOUR_US + 5, 7),
                ("b", T0 + 1, 3),
            ],
        );
        let files = plan_files(Table::Telemetry, schema.telemetry(), &[batch], 100).unwrap();
        let dirs: Vec<_> = files.iter().map(|f| (f.dir.as_str(), f.rows)).collect();
        assert_eq!(
            dirs,
            [
                ("telemetry/date=2026-11-27/hour=15", 2),
                ("telemetry/date=2026-11-27/hour=16", 2)
            ]
        );
    }

    /// `(device_id, ts)` of every row of `file`, in file order.
    fn keys(file: &PlannedFile) -> Vec<(String, i64)> {
        let mut keys = Vec::new();
        for batch in &file.batches {
            let ids = batch.column(0).as_string::<i32>();
            let ts = batch.column(2).as_primitive::<TimestampMicrosecondType>();
            keys.extend((0..batch.num_rows()).map(|r| (ids.value(r).to_owned(), ts.value(r))));
        }
        keys
    }

    #[test]
    fn splits_a_partition_over_the_row_limit_across_batches() {
        let schema = TelemetrySchema::v1_default();
        let rows: Vec<_> = (0..5).map(|i| ("a", T0 + i, i as u64)).collect();
        let b1 = telemetry_batch(&schema, &rows);
        let b2 = telemetry_batch(&schema, &rows[..2]);
        let files = plan_files(Table::Telemetry, schema.telemetry(), &[b1, b2], 3).unwrap();
        let sizes: Vec<_> = files.iter().map(|f| f.rows).collect();
        assert_eq!(sizes, [3, 3, 1]);
        let ts: Vec<i64> = files.iter().flat_map(keys).map(|(_, t)| t - T0).collect();
        assert_eq!(
            ts,
            [0, 0, 1, 1, 2, 3, 4],
            "both batches' rows, merged in ts order"
        );
    }

    #[test]
    fn orders_telemetry_rows_by_device_then_ts_in_every_file() {
        let schema = TelemetrySchema::v1_default();
        let batch = telemetry_batch(
            &schema,
            &[
                ("b", T0 + 2, 1),
                ("a", T0 + 3, 2),
                ("b", T0 + 1, 3),
                ("c", T0, 4),
                ("a", T0 + 1, 5),
            ],
        );
        let files = plan_files(Table::Telemetry, schema.telemetry(), &[batch], 3).unwrap();
        let keys: Vec<Vec<(String, i64)>> = files.iter().map(keys).collect();
        let key = |d: &str, t: i64| (d.to_owned(), T0 + t);
        assert_eq!(
            keys,
            [
                vec![key("a", 1), key("a", 3), key("b", 1)],
                vec![key("b", 2), key("c", 0)]
            ]
        );
    }

    #[test]
    fn passes_rows_already_in_order_through_without_copying() {
        let schema = TelemetrySchema::v1_default();
        let batch = telemetry_batch(&schema, &[("a", T0, 1), ("a", T0 + 1, 2), ("b", T0, 1)]);
        let files = plan_files(
            Table::Telemetry,
            schema.telemetry(),
            std::slice::from_ref(&batch),
            10,
        )
        .unwrap();
        assert_eq!(files.len(), 1);
        assert_eq!(
            files[0].batches[0].column(0).to_data().buffers()[1].as_ptr(),
            batch.column(0).to_data().buffers()[1].as_ptr(),
            "the same string buffer, not a copy"
        );
    }

    #[test]
    fn rejects_a_batch_of_another_schema() {
        let schema = TelemetrySchema::v1_default();
        let batch = telemetry_batch(&schema, &[("a", T0, 1)]);
        let err = plan_files(Table::DeadLetter, schema.dead_letter(), &[batch], 10).unwrap_err();
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
    }
}
