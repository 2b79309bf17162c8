//! Parquet encoding with the lake's writer properties.
//!
//! One function turns batches into one Parquet file on any `Write`: the commit protocol calls it
//! with a temporary file, benchmarks with a writer that discards its output, so that the number
//! they measure is encoding alone.

use std::io::Write;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, Encoding, ZstdLevel};
use parquet::errors::ParquetError;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;
use sensorlake_core::columns;

use crate::{LakeOptions, SinkError};

/// The `created_by` written into every file's footer, in Parquet's `<app> version <v>` form.
pub(crate) const CREATED_BY: &str = concat!("sensorlake version ", env!("CARGO_PKG_VERSION"));

/// Columns whose values rarely repeat but change in small steps from row to row once a file is
/// sorted by device: timestamps and sequence numbers. They skip the dictionary (whose hashing
/// was the largest cost of encoding them, for no size gain) and use `DELTA_BINARY_PACKED`.
/// Measured on 1M simulated readings, sorted (issue 3, BENCHMARKS.md): encoding 1.5× faster and
/// the file 10% smaller than with dictionaries. Floats keep the dictionary: sensor values with
/// few decimals repeat, and `BYTE_STREAM_SPLIT` made them almost twice as big.
const DELTA_COLUMNS: [&str; 3] = [columns::TS, columns::SEQ, columns::RECEIVED_AT];

/// The writer properties of every lake file: zstd, page statistics (with the page index, so
/// engines skip pages by `ts` and `device_id`), dictionaries except for [`DELTA_COLUMNS`], row
/// groups of `options.row_group_rows`. Both tables name their columns so that one set of
/// properties serves both.
pub(crate) fn writer_properties(options: &LakeOptions) -> Result<WriterProperties, SinkError> {
    options.validate()?;
    let level = ZstdLevel::try_new(options.zstd_level).map_err(|e| SinkError::InvalidOptions {
        field: "zstd_level",
        why: e.to_string(),
    })?;
    let mut builder = WriterProperties::builder()
        .set_compression(Compression::ZSTD(level))
        .set_statistics_enabled(EnabledStatistics::Page)
        .set_dictionary_enabled(true)
        .set_max_row_group_row_count(Some(options.row_group_rows))
        .set_created_by(CREATED_BY.to_owned());
    for name in DELTA_COLUMNS {
        let column = ColumnPath::from(name);
        builder = builder
            .set_column_dictionary_enabled(column.clone(), false)
            .set_column_encoding(column, Encoding::DELTA_BINARY_PACKED);
    }
    Ok(builder.build())
}

/// Writes `batches` as one Parquet file to `w` and returns the rows written.
pub(crate) fn write_file<W: Write + Send>(
    w: W,
    schema: &SchemaRef,
    batches: &[RecordBatch],
    props: WriterProperties,
) -> Result<u64, ParquetError> {
    let mut writer = ArrowWriter::try_new(w, schema.clone(), Some(props))?;
    let mut rows = 0u64;
    for batch in batches {
        writer.write(batch)?;
        rows += batch.num_rows() as u64;
    }
    writer.close()?;
    Ok(rows)
}

/// Encodes `batches` into one Parquet file written to `w`, with the lake's writer properties
/// (zstd at `options.zstd_level`, statistics, dictionaries, row groups of
/// `options.row_group_rows`). Returns the rows written. `commit` writes every file through this
/// function; benchmarks pass [`std::io::sink()`] to time encoding without storage.
///
/// # Errors
/// [`SinkError::InvalidOptions`] for out-of-range options, [`SinkError::Encode`] when a batch
/// does not match `schema` or `w` fails.
///
/// # Example
/// ```
/// use std::sync::Arc;
/// use arrow::array::{Int64Array, RecordBatch};
/// use arrow::datatypes::{DataType, Field, Schema};
/// use sensorlake_sink::{LakeOptions, encode_parquet};
///
/// let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)]));
/// let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(Int64Array::from(vec![1, 2, 3]))])?;
/// let rows = encode_parquet(std::io::sink(), &schema, &[batch], &LakeOptions::default())?;
/// assert_eq!(rows, 3);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn encode_parquet<W: Write + Send>(
    w: W,
    schema: &SchemaRef,
    batches: &[RecordBatch],
    options: &LakeOptions,
) -> Result<u64, SinkError> {
    let props = writer_properties(options)?;
    write_file(w, schema, batches, props).map_err(|source| SinkError::Encode { source })
}

/// Plans `batches` of `table` into the files one flush would write (grouped by partition,
/// sorted, split at `options.max_rows_per_file`) and encodes each into a writer that only
/// counts bytes. Returns the rows and bytes encoded. For benchmarks: the CPU work of a
/// commit without its storage.
///
/// # Errors
/// As [`encode_parquet`], and [`SinkError::SchemaMismatch`] when a batch is not of `schema`.
#[doc(hidden)]
pub fn encode_flush_discarding(
    table: crate::Table,
    schema: &SchemaRef,
    batches: &[RecordBatch],
    options: &LakeOptions,
) -> Result<(u64, u64), SinkError> {
    let props = writer_properties(options)?;
    let mut out = ByteCounter(0);
    let mut rows = 0;
    for file in crate::partition::plan_files(table, schema, batches, options.max_rows_per_file)? {
        rows += write_file(&mut out, schema, &file.batches, props.clone())
            .map_err(|source| SinkError::Encode { source })?;
    }
    Ok((rows, out.0))
}

/// A writer that keeps only the number of bytes written to it.
struct ByteCounter(u64);

impl Write for ByteCounter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
