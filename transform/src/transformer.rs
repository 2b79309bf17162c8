//! The [`Transformer`]: a batch of raw records in, telemetry rows, dead letters, counts and
//! device checkpoints out. Runs phase 1 ([`crate::validate`]) over the records, in parallel for
//! large batches, then phase 2 here: in record order, the de-duplication gate, the
//! never-decreasing rule, the registry policy, and the Arrow builders.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;

use arrow::record_batch::RecordBatch;
use rayon::prelude::*;
use sensorlake_core::{
    DeviceCheckpoint, FlushCounts, RawRecord, Reason, SourceKind, TelemetrySchema,
};

use crate::build::{DeadLetter, DeadLetterBuilder, Row, TelemetryBuilder};
use crate::config::{TransformConfig, UnknownDevices};
use crate::decode::reading_spans;
use crate::dedup::SeqWindow;
use crate::registry::Registry;
use crate::validate::{
    Body, Decoded, Envelope, Message, Reject, Rules, TypePlan, Verdict, excerpt, number,
};

/// Below this many records a call decodes on the calling thread: handing work to rayon costs
/// more than it saves for small batches.
const PARALLEL_MIN_RECORDS: usize = 4096;
/// Records per parallel phase-1 task: large enough to amortise the task, small enough to
/// balance across cores.
const CHUNK_RECORDS: usize = 1024;

/// Validates, de-duplicates and enriches telemetry; see the [crate docs](crate).
///
/// Holds per-device state (the de-duplication window and the last never-decreasing value), so
/// one `Transformer` must see every record of the devices it serves, in source order.
#[derive(Debug)]
pub struct Transformer {
    schema: Arc<TelemetrySchema>,
    config: TransformConfig,
    registry: Arc<Registry>,
    types: Vec<TypePlan>,
    devices: Devices,
}

/// What one call to [`Transformer::process`] produced.
#[derive(Debug, Clone)]
pub struct TransformOutput {
    /// Accepted readings, with the schema `TelemetrySchema::telemetry()`.
    pub telemetry: RecordBatch,
    /// Rejected readings and messages, with the schema `TelemetrySchema::dead_letter()`.
    pub dead_letters: RecordBatch,
    /// Where each received reading went; `counts.adds_up()` always holds.
    pub counts: FlushCounts,
    /// The new state of every device whose state this call changed, to be committed with the
    /// batches and given back to [`Transformer::restore`] after a restart.
    pub devices: BTreeMap<String, DeviceCheckpoint>,
}

impl Transformer {
    /// A transformer for `schema`'s device types, with no device state.
    pub fn new(
        schema: Arc<TelemetrySchema>,
        config: TransformConfig,
        registry: Arc<Registry>,
    ) -> Self {
        let types = TypePlan::for_schema(&schema);
        Self {
            schema,
            config,
            registry,
            types,
            devices: Devices::default(),
        }
    }

    /// Restores committed device state at start-up (from the lake's commit records).
    ///
    /// Every `seq` up to a device's checkpoint counts as seen, so redelivered readings that
    /// were committed before the restart are dropped as duplicates. A device already tracked
    /// is overwritten.
    pub fn restore(&mut self, devices: impl IntoIterator<Item = (String, DeviceCheckpoint)>) {
        for (device_id, checkpoint) in devices {
            self.devices.restore(device_id, checkpoint);
        }
    }

    /// Transforms one batch of records from `source`. `now_ms` is the wall clock in epoch
    /// milliseconds, for the `ts` window (injected, so tests are deterministic).
    ///
    /// Never fails and never panics on bad input: every record ends up as telemetry rows, dead
    /// letters or duplicates, as `counts` shows.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use sensorlake_core::{RawRecord, SourceKind, TelemetrySchema};
    /// use sensorlake_transform::{Registry, TransformConfig, Transformer};
    ///
    /// let mut transformer = Transformer::new(
    ///     Arc::new(TelemetrySchema::v1_default()),
    ///     TransformConfig::default(),
    ///     Arc::new(Registry::empty()),
    /// );
    /// let payload = r#"{"device_id":"env-000042","type":"env","ts":1764255845123,"seq":1842,
    ///                   "metrics":{"temperature_c":21.43,"humidity_pct":40.2,"battery_v":3.71}}"#;
    /// let record = RawRecord {
    ///     payload: payload.into(),
    ///     claimed_device_id: Some("env-000042".into()),
    ///     position: "telemetry/plant-a/env/env-000042".into(),
    ///     received_at_us: 1_764_255_845_200_000,
    ///     rejected: None,
    /// };
    /// let now_ms = 1_764_255_846_000;
    /// let out = transformer.process(SourceKind::Mqtt, &[record.clone(), record], now_ms);
    /// assert_eq!(out.telemetry.num_rows(), 1);
    /// assert_eq!(out.counts.duplicates, 1);
    /// assert!(out.counts.adds_up());
    /// assert_eq!(out.devices["env-000042"].seq, 1842);
    /// ```
    pub fn process(
        &mut self,
        source: SourceKind,
        records: &[RawRecord],
        now_ms: i64,
    ) -> TransformOutput {
        let rules = Rules::new(
            &self.schema,
            &self.types,
            &self.config,
            &self.registry,
            now_ms,
        );
        let decoded: Vec<Decoded<'_>> = if records.len() >= PARALLEL_MIN_RECORDS {
            records
                .par_chunks(CHUNK_RECORDS)
                .map(|chunk| rules.decode(chunk))
                .collect()
        } else {
            vec![rules.decode(records)]
        };

        let rows = decoded.iter().map(|d| d.readings.len()).sum();
        self.devices.call += 1;
        let mut phase2 = Assembler {
            types: &self.types,
            reject_unknown_devices: self.config.unknown_devices == UnknownDevices::Reject,
            devices: &mut self.devices,
            telemetry: TelemetryBuilder::new(
                self.schema.metric_columns().len(),
                rows,
                source.as_str(),
            ),
            dead: DeadLetterBuilder::new(source.as_str()),
            counts: FlushCounts::default(),
            rejected: BTreeMap::new(),
            touched: Vec::new(),
        };
        for chunk in &decoded {
            for message in &chunk.messages {
                phase2.message(message, chunk);
            }
        }
        phase2.finish(&self.schema)
    }

    /// How many devices the de-duplication state tracks.
    pub fn devices_tracked(&self) -> usize {
        self.devices.states.len()
    }
}

/// The bytes to dead-letter for reading `i` of a message: the whole payload, or for a batch
/// the item's own JSON (its byte ranges are found once per message, on first need).
fn payload_of<'p>(
    record: &'p RawRecord,
    envelope: &Envelope<'_>,
    i: usize,
    spans: &mut Option<Option<Vec<Range<usize>>>>,
) -> &'p [u8] {
    if !envelope.batch {
        return &record.payload;
    }
    let spans = spans.get_or_insert_with(|| reading_spans(envelope.text));
    match spans.as_ref().and_then(|s| s.get(i)) {
        Some(span) => &record.payload[span.clone()],
        None => &record.payload,
    }
}

/// Per-device state, in a vector indexed through a map so that a lookup hands out an index
/// rather than a borrow. The map hashes with foldhash: one lookup per reading, and SipHash
/// was 7% of a single-threaded transform (BENCHMARKS.md).
#[derive(Debug, Default)]
struct Devices {
    index: foldhash::HashMap<Box<str>, usize>,
    states: Vec<DeviceState>,
    /// Counts calls to `process`, to list each touched device once per call.
    call: u64,
}

#[derive(Debug, Clone)]
struct DeviceState {
    window: SeqWindow,
    /// The never-decreasing metric's value at `energy_seq`: the accepted reading with the
    /// highest `seq` that carried a value (a null carries the last value forward).
    energy: Option<f64>,
    energy_seq: u64,
    /// The last call that changed this state.
    touched_in: u64,
}

impl Devices {
    fn restore(&mut self, device_id: String, checkpoint: DeviceCheckpoint) {
        let state = DeviceState {
            window: SeqWindow::restored(checkpoint.seq),
            energy: checkpoint.energy_kwh,
            energy_seq: checkpoint.seq,
            touched_in: 0,
        };
        match self.index.get(device_id.as_str()) {
            Some(&i) => self.states[i] = state,
            None => {
                self.index.insert(device_id.into(), self.states.len());
                self.states.push(state);
            }
        }
    }

    /// The de-duplication gate: the device's state index and whether `seq` is new. `cached`
    /// remembers the index across the readings of one message.
    fn admit(&mut self, device_id: &str, cached: &mut Option<usize>, seq: u64) -> (usize, bool) {
        let found = cached.or_else(|| self.index.get(device_id).copied());
        let i = match found {
            Some(i) => i,
            None => {
                let i = self.states.len();
                self.index.insert(device_id.into(), i);
                self.states.push(DeviceState {
                    window: SeqWindow::first(seq),
                    energy: None,
                    energy_seq: 0,
                    touched_in: 0,
                });
                *cached = Some(i);
                return (i, true);
            }
        };
        *cached = Some(i);
        (i, self.states[i].window.admit(seq))
    }
}

/// Phase 2 of one call: the stateful checks and the output, in record order.
struct Assembler<'s> {
    types: &'s [TypePlan],
    reject_unknown_devices: bool,
    devices: &'s mut Devices,
    telemetry: TelemetryBuilder,
    dead: DeadLetterBuilder,
    /// `rejected` is kept apart, keyed by the static class, until the end.
    counts: FlushCounts,
    rejected: BTreeMap<&'static str, u64>,
    /// Devices whose state this call changed, with their state index.
    touched: Vec<(String, usize)>,
}

impl Assembler<'_> {
    fn message(&mut self, message: &Message<'_>, chunk: &Decoded<'_>) {
        let record = message.record;
        match &message.body {
            Body::Rejected { reject, device_id } => {
                self.counts.received += 1;
                self.dead_letter(DeadLetter {
                    record,
                    reason: &reject.reason,
                    detail: &reject.detail,
                    payload: &record.payload,
                    device_id: device_id.as_deref(),
                    seq: None,
                });
            }
            Body::Readings(envelope) => self.readings(record, envelope, chunk),
        }
    }

    fn readings(&mut self, record: &RawRecord, envelope: &Envelope<'_>, chunk: &Decoded<'_>) {
        let types = self.types;
        let plan = &types[envelope.ty];
        let readings = &chunk.readings[envelope.readings.clone()];
        self.counts.received += readings.len() as u64;
        let device_id: &str = &envelope.device_id;
        let mut device = None;
        // A batch item's own bytes, found only if one is rejected.
        let mut spans = None;

        for (i, reading) in readings.iter().enumerate() {
            if let Verdict::BeforeGate(reject) = &reading.verdict {
                let payload = payload_of(record, envelope, i, &mut spans);
                self.reject(record, reject, payload, device_id, None);
                continue;
            }
            let (state, fresh) = self.devices.admit(device_id, &mut device, reading.seq);
            if !fresh {
                self.counts.duplicates += 1;
                continue;
            }
            self.touch(state, device_id);
            let rejected = match &reading.verdict {
                Verdict::AfterGate(reject) => Some(Cow::Borrowed(&**reject)),
                _ => {
                    let values = &chunk.values[reading.values..reading.values + plan.metrics.len()];
                    self.accept(
                        plan,
                        envelope,
                        record,
                        reading.seq,
                        reading.ts_us,
                        values,
                        state,
                    )
                    .err()
                    .map(Cow::Owned)
                }
            };
            if let Some(reject) = rejected {
                let payload = payload_of(record, envelope, i, &mut spans);
                self.reject(record, &reject, payload, device_id, Some(reading.seq));
            }
        }
    }

    /// The checks after the stateless ones (never-decreasing metric, registry), then the row.
    #[expect(
        clippy::too_many_arguments,
        reason = "one reading's parts, all borrowed from different owners"
    )]
    fn accept(
        &mut self,
        plan: &TypePlan,
        envelope: &Envelope<'_>,
        record: &RawRecord,
        seq: u64,
        ts_us: i64,
        values: &[Option<f64>],
        state: usize,
    ) -> Result<(), Reject> {
        let device = &mut self.devices.states[state];
        let energy = plan
            .never_decreasing
            .and_then(|m| values[m].map(|v| (m, v)));
        if let (Some((m, v)), Some(last)) = (energy, device.energy) {
            let name = &plan.metrics[m].name;
            let detail = if seq > device.energy_seq && v < last {
                Some(format!(
                    "{name} = {} is below {} at the earlier seq {}",
                    number(v),
                    number(last),
                    device.energy_seq
                ))
            } else if seq < device.energy_seq && v > last {
                Some(format!(
                    "{name} = {} is above {} at the later seq {}",
                    number(v),
                    number(last),
                    device.energy_seq
                ))
            } else {
                None
            };
            if let Some(detail) = detail {
                return Err(Reject {
                    reason: Reason::NotMonotonic(name.clone()),
                    detail,
                });
            }
        }
        if envelope.info.is_none() && self.reject_unknown_devices {
            return Err(Reject {
                reason: Reason::UnknownDevice,
                detail: format!(
                    "device `{}` is not in the registry",
                    excerpt(&envelope.device_id)
                ),
            });
        }
        if let Some((_, v)) = energy
            && (device.energy.is_none() || seq > device.energy_seq)
        {
            device.energy = Some(v);
            device.energy_seq = seq;
        }
        self.telemetry.push(&Row {
            device_id: &envelope.device_id,
            plan,
            ts_us,
            seq,
            values,
            info: envelope.info,
            record,
        });
        self.counts.accepted += 1;
        Ok(())
    }

    fn touch(&mut self, state: usize, device_id: &str) {
        let call = self.devices.call;
        let device = &mut self.devices.states[state];
        if device.touched_in != call {
            device.touched_in = call;
            self.touched.push((device_id.to_owned(), state));
        }
    }

    /// Dead-letters one reading of a message whose envelope passed.
    fn reject(
        &mut self,
        record: &RawRecord,
        reject: &Reject,
        payload: &[u8],
        device_id: &str,
        seq: Option<u64>,
    ) {
        self.dead_letter(DeadLetter {
            record,
            reason: &reject.reason,
            detail: &reject.detail,
            payload,
            device_id: Some(device_id),
            seq,
        });
    }

    fn dead_letter(&mut self, dead: DeadLetter<'_>) {
        *self.rejected.entry(dead.reason.class()).or_default() += 1;
        self.dead.push(&dead);
    }

    fn finish(self, schema: &TelemetrySchema) -> TransformOutput {
        let mut counts = self.counts;
        counts.rejected = self
            .rejected
            .into_iter()
            .map(|(class, n)| (class.to_owned(), n))
            .collect();
        let states = &self.devices.states;
        let devices = self
            .touched
            .into_iter()
            .map(|(device_id, i)| {
                let state = &states[i];
                let checkpoint = DeviceCheckpoint {
                    seq: state.window.high(),
                    energy_kwh: state.energy,
                };
                (device_id, checkpoint)
            })
            .collect();
        TransformOutput {
            telemetry: self.telemetry.finish(schema.telemetry()),
            dead_letters: self.dead.finish(schema.dead_letter()),
            counts,
            devices,
        }
    }
}

#[cfg(test)]
mod tests;
