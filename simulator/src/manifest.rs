//! The manifest: what a simulation run sent, in a form `verify` can check a lake against.
//!
//! It does not list every reading. Per device it keeps the range of seqs, how many valid
//! readings there were and the wrapping sum of their fingerprints; the valid seqs of a device
//! are `first_seq..=last_seq` minus the seqs of that device's bad readings (a bad reading with a
//! device id and seq consumes a seq) and minus its unconfirmed seqs. Bad readings are listed one
//! by one, since each must be found in the dead-letter table with its exact reason.
//!
//! Build one with a [`ManifestBuilder`] fed with the [`Expect`] of every message the broker
//! confirmed; `simulate` does that, and so can benchmarks or an in-process demo without MQTT:
//!
//! ```
//! use sensorlake_simulator::fleet::{Fleet, FleetSpec};
//! use sensorlake_simulator::manifest::ManifestBuilder;
//!
//! let mut fleet = Fleet::new(FleetSpec::new(6, 1).with_bad_ratio(0.1));
//! let mut builder = ManifestBuilder::new(&fleet, 1);
//! for i in 0..100 {
//!     let msg = fleet.next_message(1_764_255_845_000 + i);
//!     builder.record(&msg.expect);
//! }
//! let manifest = builder.build();
//! assert_eq!(manifest.messages, 100);
//! assert_eq!(manifest.valid_count() + manifest.bad.len() as u64, 100);
//! ```

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::SimError;
use crate::fleet::{BadReading, Expect, Fleet};

/// The manifest format version this build writes and reads.
pub const MANIFEST_VERSION: u32 = 1;

/// What a run sent and the broker confirmed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Format version, [`MANIFEST_VERSION`].
    pub version: u32,
    /// The fleet's seed.
    pub seed: u64,
    /// The fleet's number of devices.
    pub devices: usize,
    /// The QoS the run published with. With QoS 1 the manifest holds what the broker
    /// acknowledged; with QoS 0 what was written to the socket, which the broker may still
    /// have dropped.
    pub qos: u8,
    /// Confirmed messages (valid + bad).
    pub messages: u64,
    /// Valid readings per device id.
    pub valid: BTreeMap<String, DeviceManifest>,
    /// Every confirmed bad reading.
    pub bad: Vec<BadReading>,
    /// Seqs of valid readings handed to the client but never confirmed, per device: each may or
    /// may not be in the lake.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub unconfirmed_valid: BTreeMap<String, Vec<u64>>,
    /// Bad readings handed to the client but never confirmed: each may or may not be in the
    /// dead-letter table.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unconfirmed_bad: Vec<BadReading>,
}

/// The valid readings of one device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceManifest {
    /// The device type, e.g. `env`.
    pub device_type: String,
    /// The lowest seq of a valid reading.
    pub first_seq: u64,
    /// The highest seq of a valid reading.
    pub last_seq: u64,
    /// Number of valid readings.
    pub count: u64,
    /// Wrapping sum of the readings' fingerprints, 16 hex digits.
    pub fingerprint: String,
}

impl DeviceManifest {
    /// The fingerprint as a number.
    ///
    /// # Errors
    /// [`SimError::ManifestInconsistent`] when it is not hex.
    pub fn fingerprint_value(&self) -> Result<u64, SimError> {
        parse_hex(&self.fingerprint).ok_or_else(|| {
            SimError::ManifestInconsistent(format!(
                "fingerprint `{}` is not a hex number",
                self.fingerprint
            ))
        })
    }
}

impl Manifest {
    /// Writes the manifest as JSON, atomically (a temporary file renamed into place).
    ///
    /// # Errors
    /// [`SimError::ManifestIo`] naming the file.
    pub fn write(&self, path: impl AsRef<Path>) -> Result<(), SimError> {
        let path = path.as_ref();
        let tmp = tmp_path(path);
        let io = |op, p: &Path| {
            let p = p.to_path_buf();
            move |source| SimError::ManifestIo {
                op,
                path: p,
                source,
            }
        };
        let file = File::create(&tmp).map_err(io("create", &tmp))?;
        let mut w = BufWriter::new(file);
        serde_json::to_writer_pretty(&mut w, self)
            .map_err(std::io::Error::from)
            .map_err(io("write", &tmp))?;
        w.write_all(b"\n").map_err(io("write", &tmp))?;
        let file = w
            .into_inner()
            .map_err(|e| e.into_error())
            .map_err(io("write", &tmp))?;
        file.sync_all().map_err(io("sync", &tmp))?;
        drop(file);
        std::fs::rename(&tmp, path).map_err(io("rename into place", path))
    }

    /// Reads a manifest written by [`Manifest::write`].
    ///
    /// # Errors
    /// [`SimError::ManifestIo`], [`SimError::ManifestFormat`] or [`SimError::ManifestVersion`],
    /// naming the file.
    pub fn read(path: impl AsRef<Path>) -> Result<Self, SimError> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|source| SimError::ManifestIo {
            op: "open",
            path: path.to_path_buf(),
            source,
        })?;
        let m: Manifest = serde_json::from_reader(BufReader::new(file)).map_err(|source| {
            SimError::ManifestFormat {
                path: path.to_path_buf(),
                source,
            }
        })?;
        if m.version != MANIFEST_VERSION {
            return Err(SimError::ManifestVersion {
                path: path.to_path_buf(),
                found: m.version,
                supported: MANIFEST_VERSION,
            });
        }
        Ok(m)
    }

    /// Number of confirmed valid readings.
    pub fn valid_count(&self) -> u64 {
        self.valid.values().map(|d| d.count).sum()
    }

    /// Number of messages handed to the client but never confirmed.
    pub fn unconfirmed_count(&self) -> u64 {
        self.unconfirmed_valid
            .values()
            .map(|v| v.len() as u64)
            .sum::<u64>()
            + self.unconfirmed_bad.len() as u64
    }

    /// Checks that each device's count matches its seq range minus its bad and unconfirmed seqs.
    ///
    /// # Errors
    /// [`SimError::ManifestInconsistent`] naming the first device that does not add up.
    pub fn check_consistency(&self) -> Result<(), SimError> {
        let mut excluded: BTreeMap<&str, HashSet<u64>> = BTreeMap::new();
        for b in self.bad.iter().chain(&self.unconfirmed_bad) {
            if let (Some(d), Some(s)) = (&b.device_id, b.seq) {
                excluded.entry(d).or_default().insert(s);
            }
        }
        for (d, seqs) in &self.unconfirmed_valid {
            excluded.entry(d).or_default().extend(seqs);
        }
        if self.valid_count() + self.bad.len() as u64 != self.messages {
            return Err(SimError::ManifestInconsistent(format!(
                "it counts {} messages but lists {} valid and {} bad readings",
                self.messages,
                self.valid_count(),
                self.bad.len()
            )));
        }
        for (id, dm) in &self.valid {
            dm.fingerprint_value()?;
            if dm.first_seq > dm.last_seq {
                return Err(SimError::ManifestInconsistent(format!(
                    "device {id} has first_seq {} > last_seq {}",
                    dm.first_seq, dm.last_seq
                )));
            }
            let holes = excluded.get(id.as_str()).map_or(0, |s| {
                s.iter()
                    .filter(|x| (dm.first_seq..=dm.last_seq).contains(x))
                    .count()
            });
            let expected = dm.last_seq - dm.first_seq + 1 - holes as u64;
            if expected != dm.count {
                return Err(SimError::ManifestInconsistent(format!(
                    "device {id} has count {} but its seq range {}..={} minus {holes} bad or \
                     unconfirmed seqs holds {expected}",
                    dm.count, dm.first_seq, dm.last_seq
                )));
            }
        }
        Ok(())
    }
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Running totals of one device's valid readings.
#[derive(Debug, Clone, Copy)]
struct DeviceAcc {
    first_seq: u64,
    last_seq: u64,
    count: u64,
    fingerprint: u64,
}

/// Builds a [`Manifest`] one confirmed message at a time. See the [module docs](self).
#[derive(Debug, Clone)]
pub struct ManifestBuilder {
    seed: u64,
    qos: u8,
    /// (id, type) of each device, by index.
    devices: Vec<(String, &'static str)>,
    acc: Vec<Option<DeviceAcc>>,
    bad: Vec<BadReading>,
    messages: u64,
    unconfirmed_valid: BTreeMap<String, Vec<u64>>,
    unconfirmed_bad: Vec<BadReading>,
}

impl ManifestBuilder {
    /// An empty manifest for `fleet`'s devices, published with `qos`.
    pub fn new(fleet: &Fleet, qos: u8) -> Self {
        let devices: Vec<_> = fleet
            .devices()
            .iter()
            .map(|d| (d.id.clone(), d.device_type))
            .collect();
        Self {
            seed: fleet.spec().seed,
            qos,
            acc: vec![None; devices.len()],
            devices,
            bad: Vec::new(),
            messages: 0,
            unconfirmed_valid: BTreeMap::new(),
            unconfirmed_bad: Vec::new(),
        }
    }

    /// Records a message the broker confirmed.
    ///
    /// # Panics
    /// When a valid reading names a device index the fleet does not have (an `Expect` from
    /// another fleet).
    pub fn record(&mut self, expect: &Expect) {
        self.messages += 1;
        match expect {
            Expect::Valid {
                device,
                seq,
                fingerprint,
            } => {
                let acc = self
                    .acc
                    .get_mut(*device)
                    .expect("the Expect comes from this builder's fleet");
                match acc {
                    None => {
                        *acc = Some(DeviceAcc {
                            first_seq: *seq,
                            last_seq: *seq,
                            count: 1,
                            fingerprint: *fingerprint,
                        });
                    }
                    Some(a) => {
                        a.first_seq = a.first_seq.min(*seq);
                        a.last_seq = a.last_seq.max(*seq);
                        a.count += 1;
                        a.fingerprint = a.fingerprint.wrapping_add(*fingerprint);
                    }
                }
            }
            Expect::Bad(b) => self.bad.push(b.clone()),
        }
    }

    /// Records a message handed to the client that was never confirmed: it may or may not
    /// have reached the pipeline.
    pub fn record_unconfirmed(&mut self, expect: &Expect) {
        match expect {
            Expect::Valid { device, seq, .. } => self
                .unconfirmed_valid
                .entry(self.devices[*device].0.clone())
                .or_default()
                .push(*seq),
            Expect::Bad(b) => self.unconfirmed_bad.push(b.clone()),
        }
    }

    /// Confirmed messages so far.
    pub fn messages(&self) -> u64 {
        self.messages
    }

    /// Unconfirmed messages so far.
    pub fn unconfirmed(&self) -> u64 {
        self.unconfirmed_valid
            .values()
            .map(|v| v.len() as u64)
            .sum::<u64>()
            + self.unconfirmed_bad.len() as u64
    }

    /// The manifest.
    pub fn build(self) -> Manifest {
        let valid = self
            .devices
            .iter()
            .zip(&self.acc)
            .filter_map(|((id, ty), acc)| {
                acc.map(|a| {
                    (
                        id.clone(),
                        DeviceManifest {
                            device_type: (*ty).to_owned(),
                            first_seq: a.first_seq,
                            last_seq: a.last_seq,
                            count: a.count,
                            fingerprint: format_hex(a.fingerprint),
                        },
                    )
                })
            })
            .collect();
        let mut unconfirmed_valid = self.unconfirmed_valid;
        for seqs in unconfirmed_valid.values_mut() {
            seqs.sort_unstable();
        }
        Manifest {
            version: MANIFEST_VERSION,
            seed: self.seed,
            devices: self.devices.len(),
            qos: self.qos,
            messages: self.messages,
            valid,
            bad: self.bad,
            unconfirmed_valid,
            unconfirmed_bad: self.unconfirmed_bad,
        }
    }
}

/// 16 lower-case hex digits.
pub(crate) fn format_hex(v: u64) -> String {
    format!("{v:016x}")
}

/// Hex digits, with or without `0x`.
pub(crate) fn parse_hex(s: &str) -> Option<u64> {
    let digits = s.strip_prefix("0x").unwrap_or(s);
    if digits.is_empty() || digits.len() > 16 {
        return None;
    }
    u64::from_str_radix(digits, 16).ok()
}

/// Serde for a `u64` written as 16 hex digits: JSON readers that use doubles (jq, JavaScript)
/// would otherwise round it.
pub(crate) mod hex_u64 {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub(crate) fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_hex(*v))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let s = String::deserialize(d)?;
        super::parse_hex(&s).ok_or_else(|| D::Error::custom(format!("`{s}` is not a hex u64")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::FleetSpec;

    fn built(n: usize) -> (Manifest, Vec<Expect>) {
        let mut fleet = Fleet::new(FleetSpec::new(9, 4).with_bad_ratio(0.3));
        let mut b = ManifestBuilder::new(&fleet, 1);
        let mut expects = Vec::new();
        for i in 0..n {
            let m = fleet.next_message(1_764_255_845_000 + i as i64 * 100);
            b.record(&m.expect);
            expects.push(m.expect);
        }
        (b.build(), expects)
    }

    #[test]
    fn builder_sums_fingerprints_and_ranges_per_device() {
        let (m, expects) = built(500);
        assert_eq!(m.messages, 500);
        let valid = expects
            .iter()
            .filter(|e| matches!(e, Expect::Valid { .. }))
            .count();
        assert_eq!(m.valid_count(), valid as u64);
        assert_eq!(m.bad.len(), 500 - valid);
        m.check_consistency().unwrap();
        let dm = &m.valid["env-000001"];
        assert_eq!(dm.device_type, "env");
        let fp = expects
            .iter()
            .filter_map(|e| match e {
                Expect::Valid {
                    device: 0,
                    fingerprint,
                    ..
                } => Some(*fingerprint),
                _ => None,
            })
            .fold(0u64, u64::wrapping_add);
        assert_eq!(dm.fingerprint_value().unwrap(), fp);
    }

    #[test]
    fn manifest_round_trips_through_a_file() {
        let (m, _) = built(300);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("manifest.json");
        m.write(&path).unwrap();
        assert!(!dir.path().join("manifest.json.tmp").exists());
        let back = Manifest::read(&path).unwrap();
        assert_eq!(back, m);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("\"payload_hash\": \""),
            "hashes are hex strings"
        );
    }

    #[test]
    fn reading_reports_the_file_and_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.json");
        let e = Manifest::read(&missing).unwrap_err();
        assert!(e.to_string().contains("nope.json"), "{e}");
        let garbage = dir.path().join("garbage.json");
        std::fs::write(&garbage, b"{\"version\":1").unwrap();
        let e = Manifest::read(&garbage).unwrap_err();
        assert!(matches!(e, SimError::ManifestFormat { .. }), "{e}");
        let (mut m, _) = built(10);
        m.version = 99;
        let future = dir.path().join("future.json");
        m.write(&future).unwrap();
        assert!(matches!(
            Manifest::read(&future).unwrap_err(),
            SimError::ManifestVersion { found: 99, .. }
        ));
    }

    #[test]
    fn unconfirmed_readings_leave_holes_that_still_add_up() {
        let mut fleet = Fleet::new(FleetSpec::new(1, 4));
        let mut b = ManifestBuilder::new(&fleet, 1);
        for i in 0..10 {
            let m = fleet.next_message(1_764_255_845_000 + i);
            if i == 4 {
                b.record_unconfirmed(&m.expect);
            } else {
                b.record(&m.expect);
            }
        }
        assert_eq!(b.unconfirmed(), 1);
        let m = b.build();
        assert_eq!(m.valid["env-000001"].count, 9);
        assert_eq!(m.unconfirmed_valid["env-000001"], vec![5]);
        m.check_consistency().unwrap();
        let mut broken = m.clone();
        broken.unconfirmed_valid.clear();
        assert!(broken.check_consistency().is_err());
    }

    #[test]
    fn hex_parsing_accepts_prefix_and_rejects_junk() {
        assert_eq!(parse_hex("00000000000000ff"), Some(255));
        assert_eq!(parse_hex("0xff"), Some(255));
        assert_eq!(parse_hex(""), None);
        assert_eq!(parse_hex("xyz"), None);
        assert_eq!(parse_hex("1ffffffffffffffff"), None);
    }
}
