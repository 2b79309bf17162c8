//! Hot-path benchmarks on 1,000,000 simulator-generated telemetry v1 messages (seeded fleet of
//! 1,000 devices, 1% invalid input, no oversize payloads):
//!
//! - `transform/1_thread`, `transform/2_threads`: `Transformer::process` (decode + validate +
//!   de-duplicate + enrich into one Arrow batch) on a rayon pool of one and of two threads.
//! - `baseline/arrow_json_1_thread`: arrow-json decoding the same messages' valid lines as
//!   newline-delimited JSON into a batch of the same fields — the ceiling issue 3 measures the
//!   transform against (bad lines are left out: arrow-json stops at the first one).
//! - `sink/encode_1_thread`: the accepted rows planned into a flush's files (partition, split)
//!   and each encoded as Parquet (zstd, the lake's writer properties) into a discarding writer.
//! - `path/bytes_to_parquet_1_thread`: both, from payload bytes to Parquet bytes.
//!
//! Run: `cargo bench --bench transform`. Input generation is outside the measured closures.

use std::sync::{Arc, OnceLock};

use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, Field, Fields, Schema, TimeUnit};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use sensorlake_core::{RawRecord, SourceKind, TelemetrySchema};
use sensorlake_simulator::{Expect, Fleet, FleetSpec};
use sensorlake_sink::{LakeOptions, Table, encode_flush_discarding};
use sensorlake_transform::{Registry, TransformConfig, Transformer};

const READINGS: usize = 1_000_000;
const NOW_MS: i64 = 1_764_255_845_000;
/// Messages per flush in the pipeline by default: half of the MQTT 5 window it asks for
/// (Receive Maximum 65,535).
const FLUSH: usize = 32_768;

struct Input {
    records: Vec<RawRecord>,
    payload_bytes: u64,
    /// The valid messages as newline-delimited JSON, for the arrow-json baseline.
    valid_ndjson: Vec<u8>,
    valid_lines: u64,
}

fn input() -> Input {
    let mut fleet = Fleet::new(FleetSpec {
        devices: 1000,
        seed: 1,
        bad_ratio: 0.01,
        allow_oversize: false,
        ..FleetSpec::default()
    });
    let mut records = Vec::with_capacity(READINGS);
    let mut valid_ndjson = Vec::new();
    let mut valid_lines = 0;
    for i in 0..READINGS {
        // 30,000 readings per second of `ts`, about what one broker delivers here: 33 s of
        // traffic, within one hour partition.
        let m = fleet.next_message(NOW_MS + (i / 30) as i64);
        if matches!(m.expect, Expect::Valid { .. }) {
            valid_ndjson.extend_from_slice(&m.payload);
            valid_ndjson.push(b'\n');
            valid_lines += 1;
        }
        records.push(RawRecord {
            claimed_device_id: m.topic.rsplit('/').next().map(Box::from),
            position: m.topic.into_boxed_str(),
            payload: m.payload.into(),
            received_at_us: NOW_MS * 1000,
            rejected: None,
        });
    }
    let payload_bytes: u64 = records.iter().map(|r| r.payload.len() as u64).sum();
    println!(
        "input: {READINGS} messages, {payload_bytes} payload bytes ({:.1} per message); \
         multiply a readings/s figure by that for bytes/s",
        payload_bytes as f64 / READINGS as f64
    );
    Input {
        records,
        payload_bytes,
        valid_ndjson,
        valid_lines,
    }
}

fn transformer(schema: &Arc<TelemetrySchema>) -> Transformer {
    Transformer::new(
        schema.clone(),
        TransformConfig::default(),
        Arc::new(Registry::empty()),
    )
}

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("a rayon pool")
}

/// The fields of a telemetry v1 message, typed as the lake stores them.
fn message_schema(schema: &TelemetrySchema) -> Arc<Schema> {
    let metrics: Fields = schema
        .metric_columns()
        .iter()
        .map(|m| Field::new(m, DataType::Float64, true))
        .collect();
    Arc::new(Schema::new(vec![
        Field::new("device_id", DataType::Utf8, false),
        Field::new("type", DataType::Utf8, false),
        Field::new("seq", DataType::UInt64, false),
        Field::new(
            "ts",
            DataType::Timestamp(TimeUnit::Millisecond, None),
            false,
        ),
        Field::new("metrics", DataType::Struct(metrics), false),
    ]))
}

fn arrow_json_decode(schema: &Arc<Schema>, ndjson: &[u8]) -> usize {
    let mut decoder = arrow_json::ReaderBuilder::new(schema.clone())
        .with_batch_size(READINGS)
        .build_decoder()
        .expect("a decoder");
    let mut rest = ndjson;
    let mut rows = 0;
    while !rest.is_empty() {
        let used = decoder.decode(rest).expect("valid lines decode");
        rest = &rest[used..];
        if let Some(batch) = decoder.flush().expect("valid lines decode") {
            rows += batch.num_rows();
        }
    }
    if let Some(batch) = decoder.flush().expect("valid lines decode") {
        rows += batch.num_rows();
    }
    rows
}

/// The input, generated once per process (about 3 s) when the first selected bench needs it.
fn shared() -> &'static Input {
    static INPUT: OnceLock<Input> = OnceLock::new();
    INPUT.get_or_init(input)
}

/// The transform's clock: just after the last reading.
const NOW: i64 = NOW_MS + (READINGS / 30) as i64 + 1000;

// Each bench does its setup inside its `bench_function` closure, which criterion only calls
// when the bench is selected: `--bench transform -- sink` profiles the encoder alone.
fn bench(c: &mut Criterion) {
    let schema = Arc::new(TelemetrySchema::v1_default());
    let one = pool(1);
    let two = pool(2);
    let options = LakeOptions::default();

    let mut g = c.benchmark_group("transform");
    g.sample_size(10);
    g.throughput(Throughput::Elements(READINGS as u64));
    for (name, pool) in [("1_thread", &one), ("2_threads", &two)] {
        g.bench_function(name, |b| {
            let records = &shared().records;
            b.iter_batched(
                || transformer(&schema),
                |mut t| pool.install(|| t.process(SourceKind::Mqtt, records, NOW)),
                BatchSize::LargeInput,
            )
        });
    }
    g.finish();

    let mut g = c.benchmark_group("baseline");
    g.sample_size(10);
    g.throughput(Throughput::Elements(READINGS as u64));
    g.bench_function("arrow_json_1_thread", |b| {
        let input = shared();
        let message_schema = message_schema(&schema);
        b.iter(|| {
            let rows = arrow_json_decode(&message_schema, &input.valid_ndjson);
            assert_eq!(
                rows as u64, input.valid_lines,
                "arrow-json decodes every valid line"
            );
        })
    });
    g.finish();

    let mut g = c.benchmark_group("sink");
    g.sample_size(10);
    g.throughput(Throughput::Elements(READINGS as u64));
    g.bench_function("encode_flushes_1_thread", |b| {
        let input = shared();
        let out = transformer(&schema).process(SourceKind::Mqtt, &input.records, NOW);
        let rows = out.telemetry.num_rows();
        let flushes: Vec<_> = (0..rows)
            .step_by(FLUSH)
            .map(|start| [out.telemetry.slice(start, FLUSH.min(rows - start))])
            .collect();
        static REPORTED: std::sync::Once = std::sync::Once::new();
        REPORTED.call_once(|| {
            report_sizes(
                &schema,
                &flushes,
                &out.telemetry,
                &options,
                input.payload_bytes,
            );
        });
        b.iter(|| {
            let mut encoded = 0;
            for flush in &flushes {
                encoded +=
                    encode_flush_discarding(Table::Telemetry, schema.telemetry(), flush, &options)
                        .expect("the transform's batch encodes")
                        .0;
            }
            assert_eq!(encoded, rows as u64);
        })
    });
    g.finish();

    let mut g = c.benchmark_group("path");
    g.sample_size(10);
    g.throughput(Throughput::Elements(READINGS as u64));
    g.bench_function("bytes_to_parquet_flushes_1_thread", |b| {
        let records = &shared().records;
        b.iter_batched(
            || transformer(&schema),
            |mut t| {
                one.install(|| {
                    for flush in records.chunks(FLUSH) {
                        let out = t.process(SourceKind::Mqtt, flush, NOW);
                        encode_flush_discarding(
                            Table::Telemetry,
                            schema.telemetry(),
                            &[out.telemetry],
                            &options,
                        )
                        .expect("the transform's batch encodes");
                    }
                })
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

/// Prints the Parquet bytes of the 1M readings against their JSON bytes: as flushes of
/// [`FLUSH`] rows would write them, and as one file (what compaction approaches).
fn report_sizes(
    schema: &TelemetrySchema,
    flushes: &[[RecordBatch; 1]],
    all: &RecordBatch,
    options: &LakeOptions,
    json_bytes: u64,
) {
    let encode = |batches: &[RecordBatch]| {
        encode_flush_discarding(Table::Telemetry, schema.telemetry(), batches, options)
            .expect("the transform's batch encodes")
            .1
    };
    let in_flushes: u64 = flushes.iter().map(|f| encode(f)).sum();
    let one_file = encode(std::slice::from_ref(all));
    let ratio = |bytes: u64| bytes as f64 / json_bytes as f64;
    println!(
        "Parquet / JSON bytes: {:.4} in {} flushes of {FLUSH}, {:.4} as one file ({json_bytes} JSON bytes)",
        ratio(in_flushes),
        flushes.len(),
        ratio(one_file),
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
