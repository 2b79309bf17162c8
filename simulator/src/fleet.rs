//! The device fleet: a pure, seeded generator of telemetry v1 messages, good and bad.
//!
//! A [`Fleet`] owns a set of [`Device`]s and, on each [`Fleet::next_message`], picks a device at
//! random and produces one MQTT message for it, together with what the pipeline is expected to
//! do with it ([`Expect`]): accept it (and with which fingerprint) or reject it (and with which
//! reason code). It does no I/O and never reads a clock: the wall-clock time is passed in, so
//! the same seed and the same times give the same bytes.
//!
//! # Bad messages
//! With probability [`FleetSpec::bad_ratio`] a message is bad. The fleet cycles through every
//! [`BadKind`] in rounds (each round a seeded shuffle of all kinds), so every kind occurs
//! equally often. Each bad payload is built to trip exactly one check of the pipeline, and
//! nothing before it in the order the pipeline checks: the envelope (size, UTF-8, JSON, object,
//! duplicate keys, `device_id`, topic match, `type`), then `seq`, then the de-duplication gate
//! on (device_id, seq), then `ts`, metrics and the never-decreasing rule.
//!
//! A bad payload that still carries a valid `device_id` and `seq` (all kinds from
//! `topic_mismatch` on, except the `seq` faults) consumes the device's next `seq`, exactly like
//! a good reading; the [`BadReading`] then records both, so `verify` can find it by them.
//!
//! `not_monotonic:energy_kwh` needs a power device that already sent a valid reading. When it
//! is due and there is none yet, the fleet sends one valid reading of a power device first (so
//! with `bad_ratio` 1.0 a run still contains that one valid reading).
//!
//! ```
//! use sensorlake_simulator::fleet::{Expect, Fleet, FleetSpec};
//!
//! let mut fleet = Fleet::new(FleetSpec::new(30, 7));
//! let msg = fleet.next_message(1_764_255_845_123);
//! assert!(msg.topic.starts_with("telemetry/site-001/"));
//! assert!(matches!(msg.expect, Expect::Valid { seq: 1, .. }));
//! ```

use std::collections::VecDeque;
use std::io::{self, Write};

use sensorlake_core::DeviceTypeSpec;
use sensorlake_core::fingerprint::{payload_hash, reading_fingerprint};
use sensorlake_core::reason::Reason;
use sensorlake_core::time::{days_from_civil, format_rfc3339_millis};
use serde::{Deserialize, Serialize};

use crate::error::SimError;
use crate::rng::Rng;
use crate::signals::{Model, SignalState, round_to};

/// The largest payload the pipeline accepts by default (bytes); `too_large` payloads exceed it.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 262_144;
/// The size of a `too_large` payload: comfortably past the default limit.
pub const OVERSIZE_PAYLOAD_BYTES: usize = 300_000;
/// Devices per site when [`FleetSpec::sites`] is left at 0.
pub const DEVICES_PER_SITE: usize = 50;

/// Id prefixes of the default device types, in `DeviceTypeSpec::defaults()` order.
const ID_PREFIXES: [&str; 3] = ["env", "vib", "pwr"];
/// Type names of the default device types, in `DeviceTypeSpec::defaults()` order.
const TYPE_NAMES: [&str; 3] = ["env", "vibration", "power"];
/// Hardware models per device type.
const MODELS: [[&str; 2]; 3] = [
    ["EnvSense-200", "ClimaNode-3"],
    ["VibraTrack-X1", "MotorGuard-5"],
    ["PowerMeter-PM3", "GridSense-E4"],
];
/// Metric names no default device type defines, for `unknown_metric`.
const UNKNOWN_METRICS: [&str; 3] = ["co2_ppm", "pm25_ug_m3", "noise_db"];
const MS_PER_DAY: i64 = 86_400_000;

/// What fleet to simulate.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetSpec {
    /// Number of devices (at least 1); a third each of `env`, `vibration` and `power`.
    pub devices: usize,
    /// Seed of every random choice: the same seed and clock give the same messages.
    pub seed: u64,
    /// Share of bad messages, 0.0–1.0.
    pub bad_ratio: f64,
    /// Number of sites the devices are spread over; 0 (the default) means one site per
    /// [`DEVICES_PER_SITE`] devices, rounded up ([`FleetSpec::effective_sites`]), so that
    /// `FleetSpec { devices: 1000, ..FleetSpec::default() }` gets 20 sites.
    pub sites: usize,
    /// Whether to emit `too_large` payloads (300 KB each); turn off for brokers or links that
    /// cannot carry them.
    pub allow_oversize: bool,
}

impl FleetSpec {
    /// A fleet of `devices` devices seeded with `seed`, all messages valid, default sites.
    pub fn new(devices: usize, seed: u64) -> Self {
        Self {
            devices,
            seed,
            bad_ratio: 0.0,
            sites: 0,
            allow_oversize: true,
        }
    }

    /// The number of sites: [`FleetSpec::sites`], or the default for the device count when 0.
    pub fn effective_sites(&self) -> usize {
        if self.sites == 0 {
            Self::default_sites(self.devices)
        } else {
            self.sites
        }
    }

    /// The same spec with a share of bad messages.
    pub fn with_bad_ratio(mut self, bad_ratio: f64) -> Self {
        self.bad_ratio = bad_ratio;
        self
    }

    /// One site per [`DEVICES_PER_SITE`] devices, rounded up, at least one.
    pub fn default_sites(devices: usize) -> usize {
        devices.div_ceil(DEVICES_PER_SITE).max(1)
    }

    /// Checks the spec.
    ///
    /// # Errors
    /// [`SimError::InvalidOptions`] when there are no devices or `bad_ratio` is not in 0–1.
    pub fn validate(&self) -> Result<(), SimError> {
        if self.devices == 0 {
            return Err(SimError::InvalidOptions(
                "the fleet needs at least one device (devices = 0)".into(),
            ));
        }
        if !(0.0..=1.0).contains(&self.bad_ratio) {
            return Err(SimError::InvalidOptions(format!(
                "bad_ratio must be between 0.0 and 1.0, got {}",
                self.bad_ratio
            )));
        }
        Ok(())
    }
}

impl Default for FleetSpec {
    /// 100 devices, seed 1, no bad messages.
    fn default() -> Self {
        Self::new(100, 1)
    }
}

/// One simulated device, as the registry describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct Device {
    /// Device id, e.g. `env-000042`: only `A-Za-z0-9_.:-`.
    pub id: String,
    /// Device type name: `env`, `vibration` or `power`.
    pub device_type: &'static str,
    /// Index of the type in `DeviceTypeSpec::defaults()` (and `TelemetrySchema::v1_default()`).
    pub type_index: usize,
    /// Site id, e.g. `site-003`.
    pub site: String,
    /// Hardware model.
    pub model: &'static str,
    /// Firmware version.
    pub firmware: String,
    /// Latitude, degrees.
    pub lat: f64,
    /// Longitude, degrees.
    pub lon: f64,
    /// Installation time, RFC 3339.
    pub installed_at: String,
    /// The MQTT topic the device publishes on: `telemetry/{site}/{type}/{id}`.
    pub topic: String,
}

/// One message to publish, and what the pipeline must do with it.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// MQTT topic, `telemetry/{site}/{type}/{device_id}` (another device's for `topic_mismatch`).
    pub topic: String,
    /// The message body.
    pub payload: Vec<u8>,
    /// The pipeline's expected outcome.
    pub expect: Expect,
}

/// What the pipeline is expected to do with a message.
#[derive(Debug, Clone, PartialEq)]
pub enum Expect {
    /// Accept it into the telemetry table.
    Valid {
        /// Index of the device in [`Fleet::devices`].
        device: usize,
        /// The reading's `seq`.
        seq: u64,
        /// `reading_fingerprint(seq, ts_us, metrics in type order)` of the reading.
        fingerprint: u64,
    },
    /// Reject it into the dead-letter table.
    Bad(BadReading),
}

/// A message the pipeline must dead-letter, and how `verify` recognises it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BadReading {
    /// The device id, when the payload carries a valid one that the pipeline can read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    /// The seq, when the payload carries a valid device id and seq (the seq is then consumed:
    /// no valid reading of the device carries it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// The exact reason code the pipeline must write, e.g. `out_of_range:humidity_pct`.
    pub reason: String,
    /// `payload_hash` (FNV-1a 64) of the payload, written as 16 hex digits.
    #[serde(with = "crate::manifest::hex_u64")]
    pub payload_hash: u64,
}

/// The kinds of bad message the fleet produces, each with a fixed expected reason code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BadKind {
    /// A truncated reading: `json_syntax`.
    JsonSyntax,
    /// A 0xFF byte inside a string: `invalid_utf8`.
    InvalidUtf8,
    /// A reading padded to 300 KB: `too_large` (only when [`FleetSpec::allow_oversize`]).
    TooLarge,
    /// A JSON array: `not_an_object`.
    NotAnObject,
    /// No `device_id`: `missing_field:device_id`.
    MissingDeviceId,
    /// A numeric `device_id`: `wrong_type:device_id`.
    WrongTypeDeviceId,
    /// `device_id` `../../etc`: `invalid_device_id`.
    InvalidDeviceId,
    /// Published on another device's topic: `topic_mismatch`.
    TopicMismatch,
    /// No `type`: `missing_field:type`.
    MissingType,
    /// `type` `toaster`: `unknown_device_type`.
    UnknownDeviceType,
    /// No `seq`: `missing_field:seq`.
    MissingSeq,
    /// `seq` as a string: `wrong_type:seq`.
    WrongTypeSeq,
    /// No `ts`: `missing_field:ts`.
    MissingTs,
    /// `ts` `"yesterday"` or epoch seconds: `invalid_ts`.
    InvalidTs,
    /// `ts` one hour ahead: `ts_in_future`.
    TsInFuture,
    /// `ts` 30 days old: `ts_too_old`.
    TsTooOld,
    /// No `metrics`: `missing_field:metrics`.
    MissingMetrics,
    /// An extra metric such as `co2_ppm`: `unknown_metric:<name>`.
    UnknownMetric,
    /// A metric as a string: `wrong_type:<metric>`.
    WrongTypeMetric,
    /// A metric above its range (humidity 140): `out_of_range:<metric>`.
    OutOfRange,
    /// Energy below the device's last valid reading: `not_monotonic:energy_kwh`.
    NotMonotonic,
    /// `"seq":1,"seq":2`: `duplicate_key:seq`.
    DuplicateKeySeq,
}

impl BadKind {
    /// Every kind, in the order the pipeline's checks meet them.
    pub const ALL: [BadKind; 22] = [
        BadKind::TooLarge,
        BadKind::InvalidUtf8,
        BadKind::JsonSyntax,
        BadKind::NotAnObject,
        BadKind::DuplicateKeySeq,
        BadKind::MissingDeviceId,
        BadKind::WrongTypeDeviceId,
        BadKind::InvalidDeviceId,
        BadKind::TopicMismatch,
        BadKind::MissingType,
        BadKind::UnknownDeviceType,
        BadKind::MissingSeq,
        BadKind::WrongTypeSeq,
        BadKind::MissingTs,
        BadKind::InvalidTs,
        BadKind::TsInFuture,
        BadKind::TsTooOld,
        BadKind::MissingMetrics,
        BadKind::UnknownMetric,
        BadKind::WrongTypeMetric,
        BadKind::OutOfRange,
        BadKind::NotMonotonic,
    ];

    /// The reason code, with `<name>`/`<metric>` standing for the detail where it varies.
    pub fn code_pattern(self) -> &'static str {
        match self {
            BadKind::JsonSyntax => "json_syntax",
            BadKind::InvalidUtf8 => "invalid_utf8",
            BadKind::TooLarge => "too_large",
            BadKind::NotAnObject => "not_an_object",
            BadKind::MissingDeviceId => "missing_field:device_id",
            BadKind::WrongTypeDeviceId => "wrong_type:device_id",
            BadKind::InvalidDeviceId => "invalid_device_id",
            BadKind::TopicMismatch => "topic_mismatch",
            BadKind::MissingType => "missing_field:type",
            BadKind::UnknownDeviceType => "unknown_device_type",
            BadKind::MissingSeq => "missing_field:seq",
            BadKind::WrongTypeSeq => "wrong_type:seq",
            BadKind::MissingTs => "missing_field:ts",
            BadKind::InvalidTs => "invalid_ts",
            BadKind::TsInFuture => "ts_in_future",
            BadKind::TsTooOld => "ts_too_old",
            BadKind::MissingMetrics => "missing_field:metrics",
            BadKind::UnknownMetric => "unknown_metric:<name>",
            BadKind::WrongTypeMetric => "wrong_type:<metric>",
            BadKind::OutOfRange => "out_of_range:<metric>",
            BadKind::NotMonotonic => "not_monotonic:energy_kwh",
            BadKind::DuplicateKeySeq => "duplicate_key:seq",
        }
    }

    /// The kind whose code (or code pattern) matches `code`, e.g. `out_of_range:x` → `OutOfRange`.
    pub fn of_code(code: &str) -> Option<BadKind> {
        let class = code.split_once(':').map_or(code, |(c, _)| c);
        BadKind::ALL.into_iter().find(|k| {
            let p = k.code_pattern();
            p == code || (p.ends_with('>') && p.split_once(':').is_some_and(|(c, _)| c == class))
        })
    }

    /// Whether the payload keeps a valid device id and seq, so the kind consumes a seq.
    fn consumes_seq(self) -> bool {
        !matches!(
            self,
            BadKind::JsonSyntax
                | BadKind::InvalidUtf8
                | BadKind::TooLarge
                | BadKind::NotAnObject
                | BadKind::MissingDeviceId
                | BadKind::WrongTypeDeviceId
                | BadKind::InvalidDeviceId
                | BadKind::MissingSeq
                | BadKind::WrongTypeSeq
                | BadKind::DuplicateKeySeq
        )
    }

    fn index(self) -> usize {
        BadKind::ALL
            .iter()
            .position(|k| *k == self)
            .expect("ALL lists every kind")
    }
}

/// The mutable state of one device.
#[derive(Debug, Clone)]
struct DeviceState {
    /// The seq of the device's next reading (valid, or bad with a seq).
    next_seq: u64,
    signal: SignalState,
    /// `energy_kwh` of the device's last valid reading (power devices).
    last_valid_energy: Option<f64>,
}

/// A seeded fleet of devices producing telemetry v1 messages. See the [module docs](self).
#[derive(Debug, Clone)]
pub struct Fleet {
    spec: FleetSpec,
    rng: Rng,
    types: Vec<DeviceTypeSpec>,
    devices: Vec<Device>,
    states: Vec<DeviceState>,
    /// Bad kinds still due in the current round.
    round: VecDeque<BadKind>,
    /// Power devices that have sent a valid reading (candidates for `not_monotonic`).
    monotonic_eligible: Vec<usize>,
    power_devices: Vec<usize>,
    /// How many bad messages of each kind were made, to vary their details.
    kind_counts: [u64; BadKind::ALL.len()],
    bad_total: u64,
}

/// A JSON object under construction: keys with already-rendered JSON values, in order, and
/// duplicates allowed (for `duplicate_key`).
#[derive(Debug, Clone, Default)]
struct Draft {
    fields: Vec<(&'static str, String)>,
}

impl Draft {
    fn push(&mut self, key: &'static str, raw: String) -> &mut Self {
        self.fields.push((key, raw));
        self
    }

    fn set(&mut self, key: &str, raw: String) {
        if let Some(f) = self.fields.iter_mut().find(|(k, _)| *k == key) {
            f.1 = raw;
        }
    }

    fn remove(&mut self, key: &str) {
        self.fields.retain(|(k, _)| *k != key);
    }

    fn render(&self) -> String {
        let mut out = String::with_capacity(160);
        out.push('{');
        for (i, (k, v)) in self.fields.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push('"');
            out.push_str(k);
            out.push_str("\":");
            out.push_str(v);
        }
        out.push('}');
        out
    }
}

/// A JSON string literal of text that needs no escaping (ids, names, timestamps).
fn quoted(s: &str) -> String {
    debug_assert!(!s.contains(['"', '\\']) && !s.chars().any(char::is_control));
    format!("\"{s}\"")
}

/// A metric value as JSON: the shortest text that parses back to the same `f64`, always with
/// a fraction or exponent so that it reads as a float.
fn number(v: f64) -> String {
    format!("{v:?}")
}

fn metrics_object(names: &[&str], values: &[String]) -> String {
    let mut out = String::from("{");
    for (i, (n, v)) in names.iter().zip(values).enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('"');
        out.push_str(n);
        out.push_str("\":");
        out.push_str(v);
    }
    out.push('}');
    out
}

impl Fleet {
    /// Builds the fleet: devices, sites, models and signal characters all drawn from the seed.
    ///
    /// # Panics
    /// When the spec is invalid (see [`FleetSpec::validate`]); use [`Fleet::try_new`] to get an
    /// error instead.
    pub fn new(spec: FleetSpec) -> Self {
        match Self::try_new(spec) {
            Ok(f) => f,
            Err(e) => panic!("invalid fleet spec: {e}"),
        }
    }

    /// Builds the fleet, or says why the spec is invalid.
    ///
    /// # Errors
    /// [`SimError::InvalidOptions`] as [`FleetSpec::validate`].
    pub fn try_new(spec: FleetSpec) -> Result<Self, SimError> {
        spec.validate()?;
        let mut rng = Rng::new(spec.seed);
        let sites = spec.effective_sites();
        let site_centers: Vec<(f64, f64)> = (0..sites)
            .map(|_| (rng.range(-50.0, 62.0), rng.range(-170.0, 170.0)))
            .collect();
        let install_base_ms = days_from_civil(2023, 1, 1) * MS_PER_DAY;

        let mut devices = Vec::with_capacity(spec.devices);
        let mut states = Vec::with_capacity(spec.devices);
        let mut power_devices = Vec::new();
        for i in 0..spec.devices {
            let ty = i % 3;
            let site_index = i % sites;
            let (clat, clon) = site_centers[site_index];
            let lat = round_to(clat + rng.range(-0.02, 0.02), 5);
            let lon = round_to(clon + rng.range(-0.02, 0.02), 5);
            let site = format!("site-{:03}", site_index + 1);
            let id = format!("{}-{:06}", ID_PREFIXES[ty], i + 1);
            let installed_ms = install_base_ms
                + rng.below(3 * 365) as i64 * MS_PER_DAY
                + rng.below(86_400) as i64 * 1000;
            let firmware = format!("{}.{}.{}", 1 + rng.below(3), rng.below(10), rng.below(20));
            let model = MODELS[ty][rng.below(2)];
            let signal = SignalState::new(Model::of_type_index(ty), lon, &mut rng);
            devices.push(Device {
                topic: format!("telemetry/{site}/{}/{id}", TYPE_NAMES[ty]),
                id,
                device_type: TYPE_NAMES[ty],
                type_index: ty,
                site,
                model,
                firmware,
                lat,
                lon,
                installed_at: format_rfc3339_millis(installed_ms * 1000),
            });
            states.push(DeviceState {
                next_seq: 1,
                signal,
                last_valid_energy: None,
            });
            if ty == 2 {
                power_devices.push(i);
            }
        }
        Ok(Self {
            spec,
            rng,
            types: DeviceTypeSpec::defaults(),
            devices,
            states,
            round: VecDeque::new(),
            monotonic_eligible: Vec::new(),
            power_devices,
            kind_counts: [0; BadKind::ALL.len()],
            bad_total: 0,
        })
    }

    /// The spec the fleet was built from.
    pub fn spec(&self) -> &FleetSpec {
        &self.spec
    }

    /// The devices, in id order.
    pub fn devices(&self) -> &[Device] {
        &self.devices
    }

    /// The device types the fleet's readings follow (`DeviceTypeSpec::defaults()`).
    pub fn device_types(&self) -> &[DeviceTypeSpec] {
        &self.types
    }

    /// The next message; `now_ms` is the wall clock in ms since the epoch (a valid reading's
    /// `ts` is `now_ms`).
    pub fn next_message(&mut self, now_ms: i64) -> Message {
        let dev = self.rng.below(self.devices.len());
        let bad = self.spec.bad_ratio > 0.0 && self.rng.chance(self.spec.bad_ratio);
        if bad {
            match self.next_bad_kind() {
                Some(Some(kind)) => return self.bad_message(kind, dev, now_ms),
                Some(None) => {
                    // `not_monotonic` is due but no power device has a valid reading yet.
                    let p = self.power_devices[self.rng.below(self.power_devices.len())];
                    return self.valid_message(p, now_ms);
                }
                None => {}
            }
        }
        self.valid_message(dev, now_ms)
    }

    /// Writes the device registry CSV: `device_id,site,model,firmware,lat,lon,installed_at`.
    ///
    /// # Errors
    /// When writing to `w` fails.
    pub fn write_registry_csv<W: Write>(&self, mut w: W) -> io::Result<()> {
        writeln!(w, "device_id,site,model,firmware,lat,lon,installed_at")?;
        for d in &self.devices {
            writeln!(
                w,
                "{},{},{},{},{},{},{}",
                d.id, d.site, d.model, d.firmware, d.lat, d.lon, d.installed_at
            )?;
        }
        w.flush()
    }

    /// The next bad kind of the current round: `Some(Some(kind))`, `Some(None)` when a priming
    /// valid power reading must come first, `None` when no kind applies at all.
    fn next_bad_kind(&mut self) -> Option<Option<BadKind>> {
        if self.round.is_empty() {
            let mut kinds: Vec<BadKind> = BadKind::ALL
                .into_iter()
                .filter(|k| match k {
                    BadKind::TooLarge => self.spec.allow_oversize,
                    BadKind::NotMonotonic => !self.power_devices.is_empty(),
                    _ => true,
                })
                .collect();
            self.rng.shuffle(&mut kinds);
            self.round.extend(kinds);
        }
        let kind = self.round.pop_front()?;
        if kind == BadKind::NotMonotonic && self.monotonic_eligible.is_empty() {
            self.round.push_front(kind);
            return Some(None);
        }
        Some(Some(kind))
    }

    fn take_seq(&mut self, dev: usize) -> u64 {
        let s = &mut self.states[dev];
        let seq = s.next_seq;
        s.next_seq += 1;
        seq
    }

    /// A `ts` value: RFC 3339 with ms or integer epoch ms, chosen at random.
    fn ts_raw(&mut self, ts_ms: i64) -> String {
        if self.rng.chance(0.5) {
            quoted(&format_rfc3339_millis(ts_ms * 1000))
        } else {
            ts_ms.to_string()
        }
    }

    /// A complete, valid reading of `dev` as a draft, plus its metric values.
    fn draft(&mut self, dev: usize, seq: u64, now_ms: i64) -> (Draft, Vec<f64>) {
        let values = self.states[dev].signal.sample(now_ms, &mut self.rng);
        let ts = self.ts_raw(now_ms);
        let d = &self.devices[dev];
        let names: Vec<&str> = self.types[d.type_index]
            .metrics
            .iter()
            .map(|m| m.name.as_str())
            .collect();
        let rendered: Vec<String> = values.iter().map(|v| number(*v)).collect();
        let mut draft = Draft::default();
        draft
            .push("device_id", quoted(&d.id))
            .push("type", quoted(d.device_type))
            .push("ts", ts)
            .push("seq", seq.to_string())
            .push("metrics", metrics_object(&names, &rendered));
        (draft, values)
    }

    fn valid_message(&mut self, dev: usize, now_ms: i64) -> Message {
        let seq = self.take_seq(dev);
        let (draft, values) = self.draft(dev, seq, now_ms);
        let metrics: Vec<Option<f64>> = values.iter().copied().map(Some).collect();
        let fingerprint = reading_fingerprint(seq, now_ms * 1000, &metrics);
        if self.devices[dev].type_index == 2 {
            let energy = values[3];
            if self.states[dev].last_valid_energy.replace(energy).is_none() {
                self.monotonic_eligible.push(dev);
            }
        }
        Message {
            topic: self.devices[dev].topic.clone(),
            payload: draft.render().into_bytes(),
            expect: Expect::Valid {
                device: dev,
                seq,
                fingerprint,
            },
        }
    }

    /// A metrics object like `dev`'s valid one, with metric `which` rendered as `raw`.
    fn metrics_with(&self, dev: usize, values: &[f64], which: usize, raw: String) -> String {
        let spec = &self.types[self.devices[dev].type_index];
        let names: Vec<&str> = spec.metrics.iter().map(|m| m.name.as_str()).collect();
        let mut rendered: Vec<String> = values.iter().map(|v| number(*v)).collect();
        rendered[which] = raw;
        metrics_object(&names, &rendered)
    }

    fn bad_message(&mut self, kind: BadKind, dev: usize, now_ms: i64) -> Message {
        let dev = if kind == BadKind::NotMonotonic {
            self.monotonic_eligible[self.rng.below(self.monotonic_eligible.len())]
        } else {
            dev
        };
        let nth = self.kind_counts[kind.index()];
        self.kind_counts[kind.index()] += 1;
        self.bad_total += 1;

        let seq = if kind.consumes_seq() {
            self.take_seq(dev)
        } else {
            // Carried in the payload where it fits, but not consumed.
            self.states[dev].next_seq
        };
        let (mut draft, values) = self.draft(dev, seq, now_ms);
        let ty = self.devices[dev].type_index;
        let id = self.devices[dev].id.clone();
        let mut topic = self.devices[dev].topic.clone();

        let reason: Reason = match kind {
            BadKind::JsonSyntax => Reason::JsonSyntax,
            BadKind::InvalidUtf8 => Reason::InvalidUtf8,
            BadKind::TooLarge => {
                let pad = OVERSIZE_PAYLOAD_BYTES.saturating_sub(draft.render().len() + 16);
                draft.push("padding", format!("\"{}\"", "x".repeat(pad)));
                Reason::TooLarge
            }
            BadKind::NotAnObject => Reason::NotAnObject,
            BadKind::MissingDeviceId => {
                draft.remove("device_id");
                Reason::MissingField("device_id".into())
            }
            BadKind::WrongTypeDeviceId => {
                draft.set("device_id", (dev + 1).to_string());
                Reason::WrongType("device_id".into())
            }
            BadKind::InvalidDeviceId => {
                draft.set("device_id", quoted("../../etc"));
                Reason::InvalidDeviceId
            }
            BadKind::TopicMismatch => {
                let n = self.devices.len();
                topic = if n > 1 {
                    let other = (dev + 1 + self.rng.below(n - 1)) % n;
                    self.devices[other].topic.clone()
                } else {
                    format!("{topic}-other")
                };
                Reason::TopicMismatch
            }
            BadKind::MissingType => {
                draft.remove("type");
                Reason::MissingField("type".into())
            }
            BadKind::UnknownDeviceType => {
                draft.set("type", quoted("toaster"));
                Reason::UnknownDeviceType
            }
            BadKind::MissingSeq => {
                draft.remove("seq");
                Reason::MissingField("seq".into())
            }
            BadKind::WrongTypeSeq => {
                draft.set("seq", quoted(&seq.to_string()));
                Reason::WrongType("seq".into())
            }
            BadKind::MissingTs => {
                draft.remove("ts");
                Reason::MissingField("ts".into())
            }
            BadKind::InvalidTs => {
                let raw = if nth.is_multiple_of(2) {
                    quoted("yesterday")
                } else {
                    // Epoch seconds where epoch milliseconds belong.
                    (now_ms / 1000).to_string()
                };
                draft.set("ts", raw);
                Reason::InvalidTimestamp
            }
            BadKind::TsInFuture => {
                let raw = self.ts_raw(now_ms + 3_600_000);
                draft.set("ts", raw);
                Reason::TsInFuture
            }
            BadKind::TsTooOld => {
                let raw = self.ts_raw(now_ms - 30 * MS_PER_DAY);
                draft.set("ts", raw);
                Reason::TsTooOld
            }
            BadKind::MissingMetrics => {
                draft.remove("metrics");
                Reason::MissingField("metrics".into())
            }
            BadKind::UnknownMetric => {
                let name = UNKNOWN_METRICS[(nth % UNKNOWN_METRICS.len() as u64) as usize];
                let spec = &self.types[ty];
                let mut names: Vec<&str> = spec.metrics.iter().map(|m| m.name.as_str()).collect();
                let mut rendered: Vec<String> = values.iter().map(|v| number(*v)).collect();
                names.push(name);
                rendered.push(number(round_to(self.rng.range(350.0, 900.0), 1)));
                draft.set("metrics", metrics_object(&names, &rendered));
                Reason::UnknownMetric(name.into())
            }
            BadKind::WrongTypeMetric => {
                let which = (nth % values.len() as u64) as usize;
                let raw = quoted(&number(values[which]));
                draft.set("metrics", self.metrics_with(dev, &values, which, raw));
                Reason::WrongType(self.types[ty].metrics[which].name.clone().into())
            }
            BadKind::OutOfRange => {
                let bounded: Vec<usize> = (0..values.len())
                    .filter(|&i| self.types[ty].metrics[i].max.is_some())
                    .collect();
                let which = bounded[(nth % bounded.len() as u64) as usize];
                let spec = &self.types[ty].metrics[which];
                let max = spec.max.expect("only bounded metrics are chosen");
                let v = round_to(max * 1.4 + 1.0, 2);
                debug_assert!(!spec.in_range(v));
                draft.set("metrics", self.metrics_with(dev, &values, which, number(v)));
                Reason::OutOfRange(spec.name.clone())
            }
            BadKind::NotMonotonic => {
                let last = self.states[dev]
                    .last_valid_energy
                    .expect("eligible devices have a valid reading");
                let lower = if last > 2.0 {
                    round_to(last - self.rng.range(1.0, 2.0), 3)
                } else {
                    round_to(last / 2.0, 3)
                };
                debug_assert!(lower < last && lower >= 0.0);
                draft.set("metrics", self.metrics_with(dev, &values, 3, number(lower)));
                Reason::NotMonotonic("energy_kwh".into())
            }
            BadKind::DuplicateKeySeq => {
                let pos = draft
                    .fields
                    .iter()
                    .position(|(k, _)| *k == "seq")
                    .expect("a draft has a seq");
                draft.fields.insert(pos + 1, ("seq", (seq + 1).to_string()));
                Reason::DuplicateKey("seq".into())
            }
        };

        let payload: Vec<u8> = match kind {
            BadKind::JsonSyntax => {
                let mut text = draft.render().into_bytes();
                // Any proper prefix of an object is invalid JSON; all of it is ASCII.
                text.truncate((text.len() * 2 / 3).max(1));
                text
            }
            BadKind::InvalidUtf8 => {
                let text = draft.render().into_bytes();
                let at = find(&text, b"\"type\":\"").expect("a draft has a type") + 9;
                let mut bytes = text[..at].to_vec();
                bytes.push(0xFF);
                bytes.extend_from_slice(&text[at..]);
                bytes
            }
            BadKind::NotAnObject => format!("[1,2,3,{}]", self.bad_total).into_bytes(),
            _ => draft.render().into_bytes(),
        };
        let (device_id, seq) = if kind.consumes_seq() {
            (Some(id), Some(seq))
        } else if matches!(
            kind,
            BadKind::MissingSeq | BadKind::WrongTypeSeq | BadKind::DuplicateKeySeq
        ) {
            (Some(id), None)
        } else {
            (None, None)
        };
        Message {
            topic,
            expect: Expect::Bad(BadReading {
                device_id,
                seq,
                reason: reason.code(),
                payload_hash: payload_hash(&payload),
            }),
            payload,
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap, HashSet};

    use sensorlake_core::time::parse_rfc3339;
    use serde_json::Value;

    use super::*;

    const NOW: i64 = 1_764_255_845_123;

    fn run(spec: FleetSpec, n: usize) -> (Fleet, Vec<Message>) {
        let mut fleet = Fleet::new(spec);
        let msgs = (0..n)
            .map(|i| fleet.next_message(NOW + i as i64 * 250))
            .collect();
        (fleet, msgs)
    }

    /// The ts of a payload in µs, as the pipeline reads it.
    fn ts_us(v: &Value) -> i64 {
        match &v["ts"] {
            Value::String(s) => parse_rfc3339(s).expect("rfc3339"),
            Value::Number(n) => n.as_i64().expect("integer ms") * 1000,
            other => panic!("ts {other}"),
        }
    }

    #[test]
    fn same_seed_gives_an_identical_byte_stream() {
        let spec = FleetSpec::new(20, 99).with_bad_ratio(0.2);
        let (_, a) = run(spec.clone(), 500);
        let (_, b) = run(spec.clone(), 500);
        assert_eq!(a, b);
        let (_, c) = run(FleetSpec { seed: 100, ..spec }, 500);
        assert_ne!(a, c);
    }

    #[test]
    fn devices_are_a_third_of_each_type_with_safe_ids() {
        let fleet = Fleet::new(FleetSpec::new(120, 1));
        let mut per_type: HashMap<&str, usize> = HashMap::new();
        for d in fleet.devices() {
            *per_type.entry(d.device_type).or_default() += 1;
            assert!(
                d.id.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_.:-".contains(c))
            );
            assert_eq!(
                d.topic,
                format!("telemetry/{}/{}/{}", d.site, d.device_type, d.id)
            );
            assert!(parse_rfc3339(&d.installed_at).is_some());
        }
        assert_eq!(per_type["env"], 40);
        assert_eq!(per_type["vibration"], 40);
        assert_eq!(per_type["power"], 40);
        assert_eq!(fleet.devices()[40].id, "vib-000041");
        assert_eq!(fleet.devices()[41].id, "pwr-000042");
        let sites: HashSet<&str> = fleet.devices().iter().map(|d| d.site.as_str()).collect();
        assert_eq!(sites.len(), 3, "120 devices at 50 per site make 3 sites");
        let spec = FleetSpec {
            devices: 1000,
            ..FleetSpec::default()
        };
        assert_eq!(spec.effective_sites(), 20);
        assert_eq!(FleetSpec { sites: 4, ..spec }.effective_sites(), 4);
    }

    #[test]
    fn every_bad_kind_appears_when_all_messages_are_bad() {
        let (_, msgs) = run(FleetSpec::new(30, 3).with_bad_ratio(1.0), 300);
        let mut seen: BTreeMap<&'static str, usize> = BTreeMap::new();
        let mut valid = 0;
        for m in &msgs {
            match &m.expect {
                Expect::Bad(b) => {
                    let kind =
                        BadKind::of_code(&b.reason).unwrap_or_else(|| panic!("{}", b.reason));
                    *seen.entry(kind.code_pattern()).or_default() += 1;
                    assert_eq!(b.payload_hash, payload_hash(&m.payload));
                }
                Expect::Valid { .. } => valid += 1,
            }
        }
        assert_eq!(seen.len(), BadKind::ALL.len(), "{seen:?}");
        assert!(
            valid <= 1,
            "only the priming reading for not_monotonic is valid"
        );
        let (min, max) = (seen.values().min().unwrap(), seen.values().max().unwrap());
        assert!(max - min <= 1, "kinds cycle fairly: {seen:?}");
    }

    #[test]
    fn oversize_payloads_are_only_made_when_allowed() {
        let spec = FleetSpec {
            allow_oversize: false,
            ..FleetSpec::new(9, 4).with_bad_ratio(1.0)
        };
        let (_, msgs) = run(spec, 200);
        assert!(
            msgs.iter()
                .all(|m| m.payload.len() < DEFAULT_MAX_PAYLOAD_BYTES)
        );
        let (_, msgs) = run(FleetSpec::new(9, 4).with_bad_ratio(1.0), 200);
        let big: Vec<&Message> = msgs
            .iter()
            .filter(|m| m.payload.len() > DEFAULT_MAX_PAYLOAD_BYTES)
            .collect();
        assert!(!big.is_empty());
        for m in big {
            assert!(matches!(&m.expect, Expect::Bad(b) if b.reason == "too_large"));
            assert!(m.payload.len() >= OVERSIZE_PAYLOAD_BYTES - 32);
            serde_json::from_slice::<Value>(&m.payload).expect("valid-looking JSON");
        }
    }

    #[test]
    fn valid_payloads_round_trip_and_lie_in_range() {
        let (fleet, msgs) = run(FleetSpec::new(30, 5).with_bad_ratio(0.1), 3000);
        let mut formats = HashSet::new();
        for m in &msgs {
            let Expect::Valid {
                device,
                seq,
                fingerprint,
            } = m.expect
            else {
                continue;
            };
            let d = &fleet.devices()[device];
            assert_eq!(m.topic, d.topic);
            let v: Value = serde_json::from_slice(&m.payload).unwrap();
            assert_eq!(v.as_object().unwrap().len(), 5);
            assert_eq!(v["device_id"], d.id.as_str());
            assert_eq!(v["type"], d.device_type);
            assert_eq!(v["seq"].as_u64(), Some(seq));
            formats.insert(v["ts"].is_string());
            let spec = &fleet.device_types()[d.type_index];
            let metrics = v["metrics"].as_object().unwrap();
            assert_eq!(metrics.len(), spec.metrics.len());
            let values: Vec<Option<f64>> = spec
                .metrics
                .iter()
                .map(|ms| {
                    let x = metrics[&ms.name].as_f64().unwrap();
                    assert!(ms.in_range(x), "{} = {x}", ms.name);
                    Some(x)
                })
                .collect();
            assert_eq!(reading_fingerprint(seq, ts_us(&v), &values), fingerprint);
        }
        assert_eq!(formats.len(), 2, "both ts formats are used");
    }

    #[test]
    fn energy_never_decreases_in_valid_readings() {
        let (fleet, msgs) = run(FleetSpec::new(12, 6).with_bad_ratio(0.3), 4000);
        let mut last: HashMap<usize, f64> = HashMap::new();
        let mut checked = 0;
        for m in &msgs {
            let Expect::Valid { device, .. } = m.expect else {
                continue;
            };
            if fleet.devices()[device].device_type != "power" {
                continue;
            }
            let v: Value = serde_json::from_slice(&m.payload).unwrap();
            let e = v["metrics"]["energy_kwh"].as_f64().unwrap();
            if let Some(prev) = last.insert(device, e) {
                assert!(e >= prev, "{prev} -> {e}");
                checked += 1;
            }
        }
        assert!(checked > 500);
    }

    #[test]
    fn per_device_seqs_have_no_gaps_across_valid_and_bad_readings() {
        let (fleet, msgs) = run(FleetSpec::new(15, 8).with_bad_ratio(0.4), 3000);
        let mut seqs: HashMap<String, Vec<u64>> = HashMap::new();
        for m in &msgs {
            match &m.expect {
                Expect::Valid { device, seq, .. } => seqs
                    .entry(fleet.devices()[*device].id.clone())
                    .or_default()
                    .push(*seq),
                Expect::Bad(BadReading {
                    device_id: Some(d),
                    seq: Some(s),
                    ..
                }) => seqs.entry(d.clone()).or_default().push(*s),
                Expect::Bad(_) => {}
            }
        }
        assert_eq!(seqs.len(), 15);
        for (d, s) in seqs {
            let n = s.len() as u64;
            assert_eq!(s, (1..=n).collect::<Vec<_>>(), "device {d}");
        }
    }

    /// A bad payload must fail only at its intended check; everything before it must pass.
    #[test]
    fn bad_payloads_trip_only_their_intended_check() {
        let (fleet, msgs) = run(FleetSpec::new(30, 9).with_bad_ratio(1.0), 600);
        let types = DeviceTypeSpec::defaults();
        let by_id: HashMap<&str, &Device> =
            fleet.devices().iter().map(|d| (d.id.as_str(), d)).collect();
        for m in &msgs {
            let Expect::Bad(b) = &m.expect else { continue };
            let kind = BadKind::of_code(&b.reason).unwrap();
            let stage = |k: BadKind| BadKind::ALL.iter().position(|x| *x == k).unwrap();
            // What passes before the failing check.
            if stage(kind) > stage(BadKind::TooLarge) {
                assert!(m.payload.len() <= DEFAULT_MAX_PAYLOAD_BYTES, "{}", b.reason);
            }
            if stage(kind) > stage(BadKind::InvalidUtf8) {
                std::str::from_utf8(&m.payload).unwrap();
            }
            if stage(kind) > stage(BadKind::JsonSyntax) && kind != BadKind::TooLarge {
                let v: Value = serde_json::from_slice(&m.payload).unwrap();
                if stage(kind) > stage(BadKind::NotAnObject) {
                    assert!(v.is_object());
                }
            }
            if stage(kind) <= stage(BadKind::InvalidDeviceId) {
                continue;
            }
            let text = std::str::from_utf8(&m.payload).unwrap();
            assert_eq!(
                text.matches("\"seq\":").count(),
                usize::from(kind != BadKind::MissingSeq)
            );
            let v: Value = serde_json::from_str(text).unwrap();
            let id = v["device_id"].as_str().unwrap();
            let dev = by_id[id];
            let claimed = m.topic.rsplit('/').next().unwrap();
            assert_eq!(
                claimed == id,
                kind != BadKind::TopicMismatch,
                "{}",
                b.reason
            );
            if kind == BadKind::TopicMismatch {
                continue;
            }
            if stage(kind) > stage(BadKind::UnknownDeviceType) {
                assert_eq!(v["type"], dev.device_type);
            }
            if stage(kind) <= stage(BadKind::WrongTypeSeq) {
                continue;
            }
            assert_eq!(v["seq"].as_u64(), b.seq, "{}", b.reason);
            assert_eq!(b.device_id.as_deref(), Some(id));
            if stage(kind) > stage(BadKind::TsTooOld) {
                let ts = ts_us(&v);
                assert!((ts / 1000 - NOW).abs() < 3_600_000, "{}", b.reason);
            }
            if stage(kind) <= stage(BadKind::MissingMetrics) {
                continue;
            }
            let spec = &types[dev.type_index];
            let metrics = v["metrics"].as_object().unwrap();
            let faulty: Vec<&String> = metrics
                .iter()
                .filter(
                    |(k, x)| match spec.metrics.iter().find(|ms| &ms.name == *k) {
                        None => true,
                        Some(ms) => !x.as_f64().is_some_and(|f| ms.in_range(f)),
                    },
                )
                .map(|(k, _)| k)
                .collect();
            match kind {
                BadKind::NotMonotonic => assert!(faulty.is_empty()),
                _ => {
                    assert_eq!(faulty.len(), 1, "{} {text}", b.reason);
                    assert!(b.reason.ends_with(faulty[0].as_str()));
                }
            }
        }
    }

    #[test]
    fn not_monotonic_goes_below_the_last_valid_energy_and_leaves_the_counter_alone() {
        let (fleet, msgs) = run(FleetSpec::new(6, 10).with_bad_ratio(0.5), 2000);
        let mut last_valid: HashMap<String, f64> = HashMap::new();
        let mut seen = 0;
        for m in &msgs {
            let v: Value = match serde_json::from_slice(&m.payload) {
                Ok(v) => v,
                Err(_) => continue,
            };
            let energy = v["metrics"]["energy_kwh"].as_f64();
            match &m.expect {
                Expect::Valid { device, .. } => {
                    if let Some(e) = energy {
                        last_valid.insert(fleet.devices()[*device].id.clone(), e);
                    }
                }
                Expect::Bad(b) if b.reason == "not_monotonic:energy_kwh" => {
                    let id = b.device_id.as_ref().unwrap();
                    assert!(energy.unwrap() < last_valid[id]);
                    seen += 1;
                }
                Expect::Bad(_) => {}
            }
        }
        assert!(seen > 5);
    }

    #[test]
    fn registry_csv_lists_every_device() {
        let fleet = Fleet::new(FleetSpec::new(7, 2));
        let mut out = Vec::new();
        fleet.write_registry_csv(&mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "device_id,site,model,firmware,lat,lon,installed_at"
        );
        assert_eq!(lines.len(), 8);
        for (line, d) in lines[1..].iter().zip(fleet.devices()) {
            let cols: Vec<&str> = line.split(',').collect();
            assert_eq!(cols.len(), 7);
            assert_eq!(cols[0], d.id);
            assert_eq!(cols[4].parse::<f64>().unwrap(), d.lat);
        }
    }

    #[test]
    fn invalid_specs_are_rejected_with_a_reason() {
        assert!(Fleet::try_new(FleetSpec::new(0, 1)).is_err());
        let e = Fleet::try_new(FleetSpec::new(3, 1).with_bad_ratio(1.5)).unwrap_err();
        assert!(e.to_string().contains("bad_ratio"));
    }

    #[test]
    fn tiny_fleets_without_power_devices_still_cycle() {
        let (_, msgs) = run(FleetSpec::new(1, 1).with_bad_ratio(1.0), 100);
        assert!(msgs.iter().all(|m| matches!(m.expect, Expect::Bad(_))));
        assert!(
            msgs.iter()
                .any(|m| matches!(&m.expect, Expect::Bad(b) if b.reason == "topic_mismatch"))
        );
    }
}
