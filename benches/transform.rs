//! Hot-path benchmarks: the transform (decode + validate + de-duplicate + enrich into Arrow)
//! on simulator-generated telemetry v1 with 1% bad input, and Parquet encoding of the result
//! into a discarding writer (so storage does not blur the number).
//!
//! Run: `cargo bench --bench transform`. Setup is kept out of the measured closures.

use std::sync::Arc;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use sensorlake_core::{RawRecord, SourceKind, TelemetrySchema};
use sensorlake_simulator::{Fleet, FleetSpec};
use sensorlake_sink::{LakeOptions, encode_parquet};
use sensorlake_transform::{Registry, TransformConfig, Transformer};

const READINGS: usize = 100_000;
const NOW_MS: i64 = 1_764_255_845_000;

fn records() -> Vec<RawRecord> {
    let mut fleet = Fleet::new(FleetSpec {
        devices: 1000,
        seed: 1,
        bad_ratio: 0.01,
        allow_oversize: false,
        ..FleetSpec::default()
    });
    (0..READINGS)
        .map(|i| {
            let m = fleet.next_message(NOW_MS + i as i64);
            RawRecord {
                claimed_device_id: m.topic.rsplit('/').next().map(Box::from),
                position: m.topic.into_boxed_str(),
                payload: m.payload.into(),
                received_at_us: NOW_MS * 1000,
            }
        })
        .collect()
}

fn transformer(schema: &Arc<TelemetrySchema>) -> Transformer {
    Transformer::new(
        schema.clone(),
        TransformConfig::default(),
        Arc::new(Registry::empty()),
    )
}

fn bench(c: &mut Criterion) {
    let schema = Arc::new(TelemetrySchema::v1_default());
    let records = records();
    let bytes: u64 = records.iter().map(|r| r.payload.len() as u64).sum();
    let now = NOW_MS + READINGS as i64;

    let mut g = c.benchmark_group("transform");
    g.sample_size(10);
    g.throughput(Throughput::Elements(READINGS as u64));
    g.bench_function("telemetry_v1_100k_readings", |b| {
        b.iter_batched(
            || transformer(&schema),
            |mut t| t.process(SourceKind::Mqtt, &records, now),
            BatchSize::LargeInput,
        )
    });
    g.throughput(Throughput::Bytes(bytes));
    g.bench_function("telemetry_v1_100k_bytes", |b| {
        b.iter_batched(
            || transformer(&schema),
            |mut t| t.process(SourceKind::Mqtt, &records, now),
            BatchSize::LargeInput,
        )
    });
    g.finish();

    let out = transformer(&schema).process(SourceKind::Mqtt, &records, now);
    let batch = [out.telemetry];
    let options = LakeOptions::default();
    let mut g = c.benchmark_group("sink");
    g.sample_size(10);
    g.throughput(Throughput::Elements(batch[0].num_rows() as u64));
    g.bench_function("parquet_zstd_encode_to_discard", |b| {
        b.iter(|| encode_parquet(std::io::sink(), schema.telemetry(), &batch, &options))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
