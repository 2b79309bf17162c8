//! The `telemetry_decoder` target: arbitrary bytes as MQTT or Kinesis payloads through
//! [`Transformer::process`], twice (a redelivery), checking that every reading is accounted
//! for and that nothing is accepted twice.
//!
//! # Input layout
//! Byte 0 is the [`Context`]: the source, the device id the transport claims, the transform's
//! policies. The rest is the payloads of one batch, separated by [`SEPARATOR`] (one payload
//! when the byte does not occur), so that de-duplication state carries across the records of a
//! call. An input of one byte is one empty payload; an empty input is skipped.

use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock};

use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::UInt64Type;
use bytes::Bytes;
use sensorlake_core::reason::code_is_deduplicated;
use sensorlake_core::{DeviceCheckpoint, RawRecord, Reason, SourceKind, TelemetrySchema, columns};
use sensorlake_transform::{
    Registry, TransformConfig, TransformOutput, Transformer, UnknownDevices, UnknownMetrics,
};

/// The pipeline's clock: 2025-11-27T15:05:00Z (the transform tests' `NOW_MS`). Seeds carry
/// timestamps near it.
pub const NOW_MS: i64 = 1_764_255_900_000;

/// Splits the input into the payloads of one call: ASCII RS, a control character that is
/// never valid raw in JSON, so cutting on it loses no valid payload.
pub const SEPARATOR: u8 = 0x1E;

/// The device ids a record's transport may claim (bits 1-2 of the context byte): none (as for
/// an MQTT topic that does not name one), two of the seeds' devices, and a hostile one.
pub const CLAIMED: [Option<&str>; 4] = [
    None,
    Some("env-000042"),
    Some("pwr-000001"),
    Some("../../etc\u{0}\u{202e}"),
];

/// `max_payload_bytes` with [`Context::TIGHT_LIMITS`]: small enough that short inputs reach
/// the size check, which the default (256 KiB) puts beyond what the fuzzer usually generates.
pub const TIGHT_MAX_PAYLOAD_BYTES: usize = 1024;
/// `max_readings_per_message` with [`Context::TIGHT_LIMITS`], for the same reason (the
/// default is 10,000).
pub const TIGHT_MAX_READINGS: usize = 4;

/// Registry rows for two of the claimable devices, so enrichment and `unknown_devices =
/// "reject"` both run.
const REGISTRY: &str = "device_id,site,model,firmware,lat,lon,installed_at\n\
                        env-000042,plant-a,EM-3,1.4.2,52.52,13.4,2025-01-15\n\
                        pwr-000001,plant-b,PM-1,2.0.0,,,\n";

static SCHEMA: LazyLock<Arc<TelemetrySchema>> =
    LazyLock::new(|| Arc::new(TelemetrySchema::v1_default()));
static REGISTRY_LOADED: LazyLock<Arc<Registry>> = LazyLock::new(|| {
    Arc::new(Registry::from_csv_reader(REGISTRY.as_bytes()).expect("the fuzz registry is valid"))
});

/// What byte 0 of an input selects, one bit or field each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Context(pub u8);

impl Context {
    /// Bit 0: Kinesis instead of MQTT (the `source` column, the position's shape).
    pub const KINESIS: u8 = 1;
    /// Bits 1-2: an index into [`CLAIMED`].
    pub const CLAIM_SHIFT: u8 = 1;
    /// Bit 3: [`TIGHT_MAX_PAYLOAD_BYTES`] and [`TIGHT_MAX_READINGS`] instead of the defaults.
    pub const TIGHT_LIMITS: u8 = 1 << 3;
    /// Bit 4: `unknown_devices = "reject"`.
    pub const REJECT_UNKNOWN_DEVICES: u8 = 1 << 4;
    /// Bit 5: `unknown_metrics = "ignore"`.
    pub const IGNORE_UNKNOWN_METRICS: u8 = 1 << 5;
    /// Bit 6: the first record comes marked as a corrupt KPL aggregate, as
    /// `kinesis::records::expand` marks one.
    pub const FIRST_PRE_REJECTED: u8 = 1 << 6;
    /// Bit 7: device state restored from a commit first (`env-000042` at seq 100,
    /// `pwr-000001` at seq 5 with 10 kWh), as after a restart.
    pub const RESTORED: u8 = 1 << 7;

    /// A context with MQTT, no claimed device id, the default policies and no state.
    pub const PLAIN: Context = Context(0);

    /// The context that claims `CLAIMED[index]`, other bits as in `self`.
    pub fn claiming(self, index: usize) -> Self {
        let index = u8::try_from(index % CLAIMED.len()).expect("below 4");
        Context((self.0 & !(0b11 << Self::CLAIM_SHIFT)) | (index << Self::CLAIM_SHIFT))
    }

    /// `self` with `bits` set.
    pub fn with(self, bits: u8) -> Self {
        Context(self.0 | bits)
    }

    fn has(self, bit: u8) -> bool {
        self.0 & bit != 0
    }

    fn source(self) -> SourceKind {
        if self.has(Self::KINESIS) {
            SourceKind::Kinesis
        } else {
            SourceKind::Mqtt
        }
    }

    fn claimed(self) -> Option<&'static str> {
        CLAIMED[usize::from((self.0 >> Self::CLAIM_SHIFT) & 0b11)]
    }

    fn transformer(self) -> Transformer {
        let mut config = TransformConfig {
            unknown_devices: if self.has(Self::REJECT_UNKNOWN_DEVICES) {
                UnknownDevices::Reject
            } else {
                UnknownDevices::Keep
            },
            unknown_metrics: if self.has(Self::IGNORE_UNKNOWN_METRICS) {
                UnknownMetrics::Ignore
            } else {
                UnknownMetrics::Reject
            },
            ..TransformConfig::default()
        };
        if self.has(Self::TIGHT_LIMITS) {
            config.max_payload_bytes = TIGHT_MAX_PAYLOAD_BYTES;
            config.max_readings_per_message = TIGHT_MAX_READINGS;
        }
        let mut t = Transformer::new(Arc::clone(&SCHEMA), config, Arc::clone(&REGISTRY_LOADED));
        if self.has(Self::RESTORED) {
            t.restore([
                (
                    "env-000042".to_owned(),
                    DeviceCheckpoint {
                        seq: 100,
                        energy_kwh: None,
                    },
                ),
                (
                    "pwr-000001".to_owned(),
                    DeviceCheckpoint {
                        seq: 5,
                        energy_kwh: Some(10.0),
                    },
                ),
            ]);
        }
        t
    }

    fn record(self, i: usize, payload: &[u8]) -> RawRecord {
        let position = match self.source() {
            SourceKind::Mqtt => format!(
                "telemetry/plant-a/env/{}",
                self.claimed().unwrap_or("no-device")
            ),
            SourceKind::Kinesis => format!("shardId-000000000000/{}", 1000 + i),
        };
        let rejected = (i == 0 && self.has(Self::FIRST_PRE_REJECTED)).then(|| {
            Box::new((
                Reason::CorruptAggregate,
                "the aggregate's MD5 does not match its content".to_owned(),
            ))
        });
        RawRecord {
            payload: Bytes::copy_from_slice(payload),
            claimed_device_id: self.claimed().map(Into::into),
            position: position.into_boxed_str(),
            received_at_us: NOW_MS * 1000,
            rejected,
        }
    }
}

/// An input for [`run`]: `context`, then `payloads` joined by [`SEPARATOR`].
pub fn encode(context: Context, payloads: &[&[u8]]) -> Vec<u8> {
    let mut out = vec![context.0];
    for (i, p) in payloads.iter().enumerate() {
        if i > 0 {
            out.push(SEPARATOR);
        }
        out.extend_from_slice(p);
    }
    out
}

/// Runs one input (see the [module docs](self)) and panics when an invariant breaks.
pub fn run(data: &[u8]) {
    process(data);
}

/// [`run`], returning what the first call to `process` gave (`None` for an empty input).
pub fn process(data: &[u8]) -> Option<TransformOutput> {
    let (&control, rest) = data.split_first()?;
    let context = Context(control);
    let records: Vec<RawRecord> = rest
        .split(|&b| b == SEPARATOR)
        .enumerate()
        .map(|(i, payload)| context.record(i, payload))
        .collect();
    let mut transformer = context.transformer();
    let first = transformer.process(context.source(), &records, NOW_MS);
    check_invariants(&first);
    check_checkpoints(&first);
    // The same records again, as after a lost acknowledgement.
    let again = transformer.process(context.source(), &records, NOW_MS);
    check_invariants(&again);
    check_redelivery(&first, &again);
    Some(first)
}

/// What `transform/src/transformer/tests.rs`'s `check_invariants` asserts: every reading has
/// exactly one place, the batches hold what the counts say, and the schemas are the ones the
/// sink expects.
///
/// # Panics
/// When one of those does not hold.
pub fn check_invariants(out: &TransformOutput) {
    let c = &out.counts;
    assert!(c.adds_up(), "counts do not add up: {c:?}");
    assert_eq!(c.accepted, out.telemetry.num_rows() as u64, "{c:?}");
    assert_eq!(
        c.rejected_total(),
        out.dead_letters.num_rows() as u64,
        "{c:?}"
    );
    assert_eq!(out.telemetry.schema(), *SCHEMA.telemetry());
    assert_eq!(out.dead_letters.schema(), *SCHEMA.dead_letter());
    for detail in strings(&out.dead_letters, columns::DETAIL) {
        let detail = detail.expect("detail is not nullable");
        assert!(detail.len() <= 200, "a detail over 200 bytes: {detail}");
        assert!(!detail.is_empty(), "an empty detail");
    }
}

/// Every accepted reading's `seq` is covered by its device's checkpoint, which is what a
/// restart restores.
fn check_checkpoints(out: &TransformOutput) {
    let devices = strings(&out.telemetry, columns::DEVICE_ID);
    let seqs = out
        .telemetry
        .column_by_name(columns::SEQ)
        .expect("telemetry has a seq column")
        .as_primitive::<UInt64Type>();
    for (device, seq) in devices.iter().zip(seqs.iter()) {
        let device = device.expect("device_id is not nullable");
        let seq = seq.expect("seq is not nullable");
        let checkpoint = out
            .devices
            .get(device)
            .unwrap_or_else(|| panic!("accepted {device}/{seq} but no checkpoint names it"));
        assert!(
            checkpoint.seq >= seq,
            "checkpoint {checkpoint:?} of {device} is below its accepted seq {seq}"
        );
    }
}

/// Delivering the same records again accepts nothing, changes no device state, and
/// dead-letters again exactly the readings rejected before the de-duplication gate (those the
/// transform cannot recognise; `Reason::is_deduplicated`).
fn check_redelivery(first: &TransformOutput, again: &TransformOutput) {
    assert_eq!(again.counts.received, first.counts.received);
    assert_eq!(
        again.counts.accepted, 0,
        "a redelivered reading was accepted twice: first {:?}, again {:?}",
        first.counts, again.counts
    );
    assert_eq!(
        again.devices,
        BTreeMap::new(),
        "a redelivery moved a checkpoint"
    );
    let mut repeated: BTreeMap<String, u64> = BTreeMap::new();
    for code in strings(&first.dead_letters, columns::REASON) {
        let code = code.expect("reason is not nullable");
        if !code_is_deduplicated(code) {
            *repeated.entry(code.to_owned()).or_default() += 1;
        }
    }
    let mut got: BTreeMap<String, u64> = BTreeMap::new();
    for code in strings(&again.dead_letters, columns::REASON) {
        *got.entry(code.expect("reason is not nullable").to_owned())
            .or_default() += 1;
    }
    assert_eq!(
        got, repeated,
        "a redelivery dead-lettered other readings than those rejected before the gate"
    );
}

fn strings<'b>(batch: &'b RecordBatch, column: &str) -> Vec<Option<&'b str>> {
    let array = batch
        .column_by_name(column)
        .unwrap_or_else(|| panic!("no column {column}"));
    array.as_string::<i32>().iter().collect()
}
