//! `sensorlake verify`: checking a lake against the manifest of what was sent.
//!
//! Reads every finished Parquet file under `<lake>/telemetry/` and `<lake>/dead_letter/`
//! (recursively; names starting with `.` or `_` are skipped, they are unfinished or internal,
//! and `<lake>/_sensorlake/` is never read) — from a folder, or from wherever a
//! [`LakeSource`] reads (the binary passes one for `s3://` lakes) — and checks the promises
//! of the pipeline:
//!
//! - every valid reading of the manifest is in the telemetry table exactly once, and nothing
//!   else is (no rows for seqs or devices that were not sent as valid);
//! - per device, the wrapping sum of the rows' fingerprints (seq, ts, metric values) equals the
//!   manifest's, so every value arrived unchanged;
//! - every bad reading is in the dead-letter table with exactly its reason. A dead letter is
//!   matched by the hash of its `payload` column, or else by its (device_id, seq). A reason
//!   that is de-duplicated ([`code_is_deduplicated`]) must appear exactly once; any other may
//!   appear more than once after a crash between commit and acknowledgement — those extra rows
//!   are reported as `redelivered` and are not a failure;
//! - no dead letter matches nothing in the manifest.
//!
//! Readings the manifest lists as unconfirmed may be present or absent; when present they are
//! counted, never failed.
//!
//! Payload hashes are checked first because they identify a message exactly even where the
//! pipeline could not read its device id or seq (and a dead letter's `device_id` may be the id
//! the topic claims rather than the payload's).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Float64Type, TimeUnit, TimestampMicrosecondType, UInt64Type};
use bytes::Bytes;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use sensorlake_core::TelemetrySchema;
use sensorlake_core::fingerprint::{payload_hash, reading_fingerprint};
use sensorlake_core::reason::code_is_deduplicated;
use sensorlake_core::schema::columns;
use serde::Serialize;

use crate::error::SimError;
use crate::fleet::BadReading;
use crate::manifest::Manifest;

/// Examples kept per kind of problem.
pub const MAX_EXAMPLES: usize = 10;
/// Rows per Arrow batch when reading.
const BATCH_ROWS: usize = 8192;
/// The telemetry table's directory under the lake.
pub const TELEMETRY_DIR: &str = "telemetry";
/// The dead-letter table's directory under the lake.
pub const DEAD_LETTER_DIR: &str = "dead_letter";

/// What `verify` found. [`VerifyReport::is_exact`] says whether the lake matches the manifest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// Parquet files read (both tables).
    pub files_read: u64,
    /// Rows read (both tables).
    pub rows_read: u64,
    /// The telemetry table.
    pub telemetry: TelemetryCheck,
    /// The dead-letter table.
    pub dead_letters: DeadLetterCheck,
}

/// The telemetry table against the manifest's valid readings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TelemetryCheck {
    /// Files read.
    pub files: u64,
    /// Rows read.
    pub rows: u64,
    /// Valid readings in the manifest.
    pub expected: u64,
    /// Of those, how many are in the table (at least once).
    pub found: u64,
    /// Valid readings not in the table.
    pub missing: u64,
    /// Up to [`MAX_EXAMPLES`] of them, `device/seq`.
    pub missing_examples: Vec<String>,
    /// Valid readings in the table more than once.
    pub duplicated: u64,
    /// Up to [`MAX_EXAMPLES`] of them, `device/seq ×n`.
    pub duplicated_examples: Vec<String>,
    /// Rows that match no valid reading (unknown device, seq out of range, a bad reading's seq).
    pub unexpected: u64,
    /// Up to [`MAX_EXAMPLES`] of them.
    pub unexpected_examples: Vec<String>,
    /// Devices whose rows are all present but whose values differ from what was sent.
    pub value_mismatches: u64,
    /// Up to [`MAX_EXAMPLES`] of them.
    pub value_mismatch_examples: Vec<String>,
    /// Devices with missing rows, whose values therefore could not be compared.
    pub values_unchecked: u64,
    /// Rows of readings the manifest lists as unconfirmed (allowed).
    pub unconfirmed_found: u64,
}

/// The dead-letter table against the manifest's bad readings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DeadLetterCheck {
    /// Files read.
    pub files: u64,
    /// Rows read.
    pub rows: u64,
    /// Bad readings in the manifest.
    pub expected: u64,
    /// Of those, how many are in the table (at least once).
    pub found: u64,
    /// Bad readings not in the table.
    pub missing: u64,
    /// Up to [`MAX_EXAMPLES`] of them.
    pub missing_examples: Vec<String>,
    /// Bad readings found with another reason than expected.
    pub wrong_reason: u64,
    /// Up to [`MAX_EXAMPLES`] of them.
    pub wrong_reason_examples: Vec<ReasonMismatch>,
    /// Bad readings with a de-duplicated reason found more than once (a failure).
    pub duplicated: u64,
    /// Up to [`MAX_EXAMPLES`] of them.
    pub duplicated_examples: Vec<String>,
    /// Extra rows of bad readings rejected before de-duplication: allowed after a crash.
    pub redelivered: u64,
    /// Dead letters that match nothing in the manifest.
    pub unexpected: u64,
    /// Up to [`MAX_EXAMPLES`] of them.
    pub unexpected_examples: Vec<String>,
    /// Rows of bad readings the manifest lists as unconfirmed (allowed).
    pub unconfirmed_found: u64,
}

/// A bad reading found with another reason than expected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReasonMismatch {
    /// `device/seq`, or the kind and payload hash when the reading has no seq.
    pub reading: String,
    /// The reason code the manifest expects.
    pub expected: String,
    /// The reason code in the table.
    pub found: String,
}

impl VerifyReport {
    /// Whether the lake holds exactly what the manifest says: nothing missing, duplicated,
    /// unexpected, changed or rejected for the wrong reason (redelivered non-de-duplicated
    /// dead letters and unconfirmed readings are allowed).
    pub fn is_exact(&self) -> bool {
        let t = &self.telemetry;
        let d = &self.dead_letters;
        t.missing == 0
            && t.duplicated == 0
            && t.unexpected == 0
            && t.value_mismatches == 0
            && d.missing == 0
            && d.wrong_reason == 0
            && d.duplicated == 0
            && d.unexpected == 0
    }
}

fn examples(list: &[String]) -> String {
    if list.is_empty() {
        String::new()
    } else {
        format!(" (e.g. {})", list.join(", "))
    }
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = &self.telemetry;
        let d = &self.dead_letters;
        if self.is_exact() {
            writeln!(
                f,
                "EXACT: all {} valid readings and {} dead letters match the manifest",
                t.expected, d.expected
            )?;
        } else {
            writeln!(f, "MISMATCH: the lake does not match the manifest")?;
        }
        writeln!(
            f,
            "  telemetry:    expected {}, found {}, missing {}{}, duplicated {}{}, unexpected rows {}{}, devices with changed values {}{}{}",
            t.expected,
            t.found,
            t.missing,
            examples(&t.missing_examples),
            t.duplicated,
            examples(&t.duplicated_examples),
            t.unexpected,
            examples(&t.unexpected_examples),
            t.value_mismatches,
            examples(&t.value_mismatch_examples),
            if t.values_unchecked > 0 {
                format!(
                    " ({} devices with missing rows not compared)",
                    t.values_unchecked
                )
            } else {
                String::new()
            },
        )?;
        let wrong: Vec<String> = d
            .wrong_reason_examples
            .iter()
            .map(|w| format!("{}: expected {}, found {}", w.reading, w.expected, w.found))
            .collect();
        writeln!(
            f,
            "  dead letters: expected {}, found {}, missing {}{}, wrong reason {}{}, duplicated {}{}, unexpected {}{}, redelivered {}",
            d.expected,
            d.found,
            d.missing,
            examples(&d.missing_examples),
            d.wrong_reason,
            examples(&wrong),
            d.duplicated,
            examples(&d.duplicated_examples),
            d.unexpected,
            examples(&d.unexpected_examples),
            d.redelivered,
        )?;
        if t.unconfirmed_found + d.unconfirmed_found > 0 {
            writeln!(
                f,
                "  unconfirmed readings found: {} rows, {} dead letters",
                t.unconfirmed_found, d.unconfirmed_found
            )?;
        }
        write!(
            f,
            "  read {} files, {} rows",
            self.files_read, self.rows_read
        )
    }
}

/// Where `verify` reads a lake's finished Parquet files from: a folder ([`LocalLake`]) or,
/// implemented by the caller, an object store.
pub trait LakeSource {
    /// The finished Parquet files of a table (`telemetry` or `dead_letter`), sorted, as names
    /// that [`LakeSource::read`] takes and messages show. None when the table is absent.
    ///
    /// # Errors
    /// When the table cannot be listed.
    fn parquet_files(&self, table: &str) -> Result<Vec<PathBuf>, SimError>;

    /// The bytes of one of those files.
    ///
    /// # Errors
    /// When the file cannot be read.
    fn read(&self, file: &Path) -> Result<Bytes, SimError>;
}

/// A lake in a local folder.
#[derive(Debug, Clone)]
pub struct LocalLake(PathBuf);

impl LocalLake {
    /// The lake at `root`, which must be a folder.
    ///
    /// # Errors
    /// [`SimError::LakeNotFound`] when it is not.
    pub fn new(root: &Path) -> Result<Self, SimError> {
        if !root.is_dir() {
            return Err(SimError::LakeNotFound {
                path: root.to_path_buf(),
            });
        }
        Ok(LocalLake(root.to_path_buf()))
    }
}

impl LakeSource for LocalLake {
    fn parquet_files(&self, table: &str) -> Result<Vec<PathBuf>, SimError> {
        parquet_files(&self.0.join(table))
    }

    fn read(&self, file: &Path) -> Result<Bytes, SimError> {
        std::fs::read(file)
            .map(Bytes::from)
            .map_err(|e| SimError::ReadParquet {
                path: file.to_path_buf(),
                source: Box::new(e),
            })
    }
}

/// Checks the lake at `lake` (a folder) against `manifest`. See the [module docs](self).
///
/// ```no_run
/// use std::path::Path;
/// use sensorlake_core::TelemetrySchema;
/// use sensorlake_simulator::{Manifest, verify};
///
/// let manifest = Manifest::read("manifest.json")?;
/// let report = verify(Path::new("lake"), &manifest, &TelemetrySchema::v1_default())?;
/// println!("{report}");
/// assert!(report.is_exact());
/// # Ok::<(), sensorlake_simulator::SimError>(())
/// ```
///
/// # Errors
/// [`SimError::ManifestInconsistent`] for a manifest that does not add up;
/// [`SimError::LakeNotFound`]; [`SimError::ReadDir`], [`SimError::ReadParquet`] or
/// [`SimError::BadColumn`] naming the directory or file that could not be read.
pub fn verify(
    lake: &Path,
    manifest: &Manifest,
    schema: &TelemetrySchema,
) -> Result<VerifyReport, SimError> {
    manifest.check_consistency()?;
    verify_source(&LocalLake::new(lake)?, manifest, schema)
}

/// [`verify`] for a lake anywhere a [`LakeSource`] reads from.
///
/// # Errors
/// As [`verify`], with the source's own errors.
pub fn verify_source(
    lake: &dyn LakeSource,
    manifest: &Manifest,
    schema: &TelemetrySchema,
) -> Result<VerifyReport, SimError> {
    manifest.check_consistency()?;
    let mut check = Check::new(manifest, schema)?;
    let mut report = VerifyReport::default();

    for path in lake.parquet_files(TELEMETRY_DIR)? {
        let rows = check.read_telemetry(&path, lake.read(&path)?)?;
        report.telemetry.files += 1;
        report.telemetry.rows += rows;
    }
    for path in lake.parquet_files(DEAD_LETTER_DIR)? {
        let rows = check.read_dead_letters(&path, lake.read(&path)?)?;
        report.dead_letters.files += 1;
        report.dead_letters.rows += rows;
    }
    check.finish(&mut report);
    report.files_read = report.telemetry.files + report.dead_letters.files;
    report.rows_read = report.telemetry.rows + report.dead_letters.rows;
    Ok(report)
}

/// Finished Parquet files under `dir`, recursively, sorted; none when `dir` does not exist.
fn parquet_files(dir: &Path) -> Result<Vec<PathBuf>, SimError> {
    let mut out = Vec::new();
    if dir.is_dir() {
        walk(dir, &mut out)?;
    }
    out.sort();
    Ok(out)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), SimError> {
    let read_dir = |source| SimError::ReadDir {
        path: dir.to_path_buf(),
        source,
    };
    for entry in std::fs::read_dir(dir).map_err(read_dir)? {
        let entry = entry.map_err(read_dir)?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || name.starts_with('_') {
            continue;
        }
        let path = entry.path();
        let meta = std::fs::metadata(&path).map_err(|source| SimError::ReadDir {
            path: path.clone(),
            source,
        })?;
        if meta.is_dir() {
            walk(&path, out)?;
        } else if meta.is_file() && name.ends_with(".parquet") {
            out.push(path);
        }
    }
    Ok(())
}

/// The valid readings of one device and what was found of them.
#[derive(Debug)]
struct DeviceCheck {
    first_seq: u64,
    last_seq: u64,
    type_name: String,
    /// Rows found per seq (saturating), indexed by `seq - first_seq`.
    counts: Vec<u8>,
    expected_fp: u64,
    /// Sum of the fingerprints of the first row of each seq.
    found_fp: u64,
    /// A row had another device type than the manifest's, or one the schema does not know.
    wrong_type: bool,
}

/// A bad reading of the manifest and the dead letters matched to it.
#[derive(Debug)]
struct ExpectedBad<'m> {
    reading: &'m BadReading,
    /// Whether the broker confirmed it (unconfirmed ones may be absent).
    confirmed: bool,
    found: u32,
    /// The first reason found that differs from the expected one.
    wrong: Option<String>,
}

impl ExpectedBad<'_> {
    fn label(&self) -> String {
        label(self.reading)
    }
}

fn label(b: &BadReading) -> String {
    match (&b.device_id, b.seq) {
        (Some(d), Some(s)) => format!("{d}/{s}"),
        (Some(d), None) => format!("{} from {d} (payload {:016x})", b.reason, b.payload_hash),
        _ => format!("{} (payload {:016x})", b.reason, b.payload_hash),
    }
}

fn push_example(list: &mut Vec<String>, example: impl FnOnce() -> String) {
    if list.len() < MAX_EXAMPLES {
        list.push(example());
    }
}

/// The state of one verification.
struct Check<'m> {
    schema: &'m TelemetrySchema,
    devices: HashMap<String, DeviceCheck>,
    /// Seqs of bad readings (confirmed or not), per device: never valid rows.
    bad_seqs: HashMap<String, HashSet<u64>>,
    unconfirmed_valid: HashMap<String, HashSet<u64>>,
    bad: Vec<ExpectedBad<'m>>,
    by_hash: HashMap<u64, Vec<usize>>,
    by_key: HashMap<(String, u64), usize>,
    telemetry: TelemetryCheck,
    dead: DeadLetterCheck,
}

impl<'m> Check<'m> {
    fn new(manifest: &'m Manifest, schema: &'m TelemetrySchema) -> Result<Self, SimError> {
        let mut devices = HashMap::with_capacity(manifest.valid.len());
        for (id, dm) in &manifest.valid {
            let span = dm.last_seq - dm.first_seq + 1;
            let span = usize::try_from(span).map_err(|_| {
                SimError::ManifestInconsistent(format!("device {id} spans {span} seqs"))
            })?;
            devices.insert(
                id.clone(),
                DeviceCheck {
                    first_seq: dm.first_seq,
                    last_seq: dm.last_seq,
                    type_name: dm.device_type.clone(),
                    counts: vec![0; span],
                    expected_fp: dm.fingerprint_value()?,
                    found_fp: 0,
                    wrong_type: false,
                },
            );
        }
        let mut bad_seqs: HashMap<String, HashSet<u64>> = HashMap::new();
        let mut bad = Vec::new();
        let mut by_hash: HashMap<u64, Vec<usize>> = HashMap::new();
        let mut by_key = HashMap::new();
        let all = manifest
            .bad
            .iter()
            .map(|b| (b, true))
            .chain(manifest.unconfirmed_bad.iter().map(|b| (b, false)));
        for (i, (b, confirmed)) in all.enumerate() {
            if let (Some(d), Some(s)) = (&b.device_id, b.seq) {
                bad_seqs.entry(d.clone()).or_default().insert(s);
                by_key.insert((d.clone(), s), i);
            }
            by_hash.entry(b.payload_hash).or_default().push(i);
            bad.push(ExpectedBad {
                reading: b,
                confirmed,
                found: 0,
                wrong: None,
            });
        }
        let unconfirmed_valid = manifest
            .unconfirmed_valid
            .iter()
            .map(|(d, s)| (d.clone(), s.iter().copied().collect()))
            .collect();
        Ok(Self {
            schema,
            devices,
            bad_seqs,
            unconfirmed_valid,
            bad,
            by_hash,
            by_key,
            telemetry: TelemetryCheck {
                expected: manifest.valid_count(),
                ..TelemetryCheck::default()
            },
            dead: DeadLetterCheck {
                expected: manifest.bad.len() as u64,
                ..DeadLetterCheck::default()
            },
        })
    }

    fn read_telemetry(&mut self, path: &Path, bytes: Bytes) -> Result<u64, SimError> {
        let metric_names: Vec<&str> = self
            .schema
            .metric_columns()
            .iter()
            .map(String::as_str)
            .collect();
        let mut wanted = vec![
            columns::DEVICE_ID,
            columns::DEVICE_TYPE,
            columns::TS,
            columns::SEQ,
        ];
        wanted.extend(&metric_names);
        let required = [
            columns::DEVICE_ID,
            columns::DEVICE_TYPE,
            columns::TS,
            columns::SEQ,
        ];
        read_parquet(path, bytes, "telemetry", &wanted, &required, |batch| {
            let col = Columns {
                batch,
                path,
                table: "telemetry",
            };
            let ids = col.get(columns::DEVICE_ID, &DataType::Utf8)?;
            let ids = ids.as_string::<i32>();
            let types = col.get(columns::DEVICE_TYPE, &DataType::Utf8)?;
            let types = types.as_string::<i32>();
            // Keep the column's time zone: casting it away would shift the values.
            let tz = match batch.column_by_name(columns::TS).map(|a| a.data_type()) {
                Some(DataType::Timestamp(_, tz)) => tz.clone(),
                _ => None,
            };
            let ts = col.get(columns::TS, &DataType::Timestamp(TimeUnit::Microsecond, tz))?;
            let ts = ts.as_primitive::<TimestampMicrosecondType>();
            let seqs = col.get(columns::SEQ, &DataType::UInt64)?;
            let seqs = seqs.as_primitive::<UInt64Type>();
            let metrics: Vec<Option<ArrayRef>> = metric_names
                .iter()
                .map(|m| col.optional(m, &DataType::Float64))
                .collect::<Result<_, _>>()?;
            let metrics: Vec<Option<&arrow::array::PrimitiveArray<Float64Type>>> = metrics
                .iter()
                .map(|a| a.as_ref().map(|a| a.as_primitive::<Float64Type>()))
                .collect();
            let mut values = Vec::new();
            for row in 0..batch.num_rows() {
                let (id, seq) = (
                    ids.is_valid(row).then(|| ids.value(row)),
                    seqs.is_valid(row).then(|| seqs.value(row)),
                );
                let (Some(id), Some(seq)) = (id, seq) else {
                    self.telemetry.unexpected += 1;
                    push_example(&mut self.telemetry.unexpected_examples, || {
                        format!("row without device_id or seq in {}", path.display())
                    });
                    continue;
                };
                if self
                    .unconfirmed_valid
                    .get(id)
                    .is_some_and(|s| s.contains(&seq))
                {
                    self.telemetry.unconfirmed_found += 1;
                    continue;
                }
                let is_bad_seq = self.bad_seqs.get(id).is_some_and(|s| s.contains(&seq));
                let dev = self
                    .devices
                    .get_mut(id)
                    .filter(|d| !is_bad_seq && (d.first_seq..=d.last_seq).contains(&seq));
                let Some(dev) = dev else {
                    self.telemetry.unexpected += 1;
                    push_example(&mut self.telemetry.unexpected_examples, || {
                        let why = if is_bad_seq {
                            "a bad reading accepted"
                        } else if self.devices.contains_key(id) {
                            "seq never sent as valid"
                        } else {
                            "device has no valid readings in the manifest"
                        };
                        format!("{id}/{seq} ({why})")
                    });
                    continue;
                };
                let slot = &mut dev.counts[(seq - dev.first_seq) as usize];
                *slot = slot.saturating_add(1);
                if *slot > 1 {
                    continue;
                }
                let ty = types.is_valid(row).then(|| types.value(row));
                let ty = ty
                    .filter(|t| *t == dev.type_name)
                    .and_then(|t| self.schema.type_index(t));
                let (Some(ty), true) = (ty, ts.is_valid(row)) else {
                    dev.wrong_type = true;
                    continue;
                };
                values.clear();
                values.extend(self.schema.metric_slots(ty).iter().map(|&slot| {
                    metrics[slot].and_then(|a| a.is_valid(row).then(|| a.value(row)))
                }));
                dev.found_fp =
                    dev.found_fp
                        .wrapping_add(reading_fingerprint(seq, ts.value(row), &values));
            }
            Ok(())
        })
    }

    fn read_dead_letters(&mut self, path: &Path, bytes: Bytes) -> Result<u64, SimError> {
        let wanted = [
            columns::REASON,
            columns::PAYLOAD,
            columns::DL_DEVICE_ID,
            columns::DL_SEQ,
        ];
        let required = [columns::REASON, columns::PAYLOAD];
        read_parquet(path, bytes, "dead-letter", &wanted, &required, |batch| {
            let col = Columns {
                batch,
                path,
                table: "dead-letter",
            };
            let reasons = col.get(columns::REASON, &DataType::Utf8)?;
            let reasons = reasons.as_string::<i32>();
            let payloads = col.get(columns::PAYLOAD, &DataType::Binary)?;
            let payloads = payloads.as_binary::<i32>();
            let ids = col.optional(columns::DL_DEVICE_ID, &DataType::Utf8)?;
            let ids = ids.as_ref().map(|a| a.as_string::<i32>());
            let seqs = col.optional(columns::DL_SEQ, &DataType::UInt64)?;
            let seqs = seqs.as_ref().map(|a| a.as_primitive::<UInt64Type>());
            for row in 0..batch.num_rows() {
                let reason = if reasons.is_valid(row) {
                    reasons.value(row)
                } else {
                    ""
                };
                let payload = if payloads.is_valid(row) {
                    payloads.value(row)
                } else {
                    &[]
                };
                let id = ids.and_then(|a| a.is_valid(row).then(|| a.value(row)));
                let seq = seqs.and_then(|a| a.is_valid(row).then(|| a.value(row)));
                self.match_dead_letter(reason, payload, id, seq);
            }
            Ok(())
        })
    }

    fn match_dead_letter(
        &mut self,
        reason: &str,
        payload: &[u8],
        id: Option<&str>,
        seq: Option<u64>,
    ) {
        let hash = payload_hash(payload);
        let by_hash = self.by_hash.get(&hash).and_then(|c| {
            let bad = &self.bad;
            let score = |&i: &usize| {
                let b = &bad[i];
                (b.found == 0, b.reading.reason == reason)
            };
            c.iter().copied().max_by_key(|i| score(i))
        });
        let found = by_hash.or_else(|| {
            let key = (id?.to_owned(), seq?);
            self.by_key.get(&key).copied()
        });
        let Some(i) = found else {
            self.dead.unexpected += 1;
            push_example(&mut self.dead.unexpected_examples, || {
                let valid = match (id, seq) {
                    (Some(d), Some(s)) => self
                        .devices
                        .get(d)
                        .is_some_and(|dev| (dev.first_seq..=dev.last_seq).contains(&s)),
                    _ => false,
                };
                match (id, seq) {
                    (Some(d), Some(s)) if valid => {
                        format!("{d}/{s}: a valid reading rejected as {reason}")
                    }
                    (Some(d), Some(s)) => format!("{d}/{s}: {reason}"),
                    _ => format!("{reason} (payload {hash:016x})"),
                }
            });
            return;
        };
        let b = &mut self.bad[i];
        b.found += 1;
        if b.reading.reason != reason && b.wrong.is_none() {
            b.wrong = Some(reason.to_owned());
        }
    }

    fn finish(mut self, report: &mut VerifyReport) {
        let mut ids: Vec<&String> = self.devices.keys().collect();
        ids.sort();
        for id in ids {
            let dev = &self.devices[id];
            let bad = self.bad_seqs.get(id.as_str());
            let unconfirmed = self.unconfirmed_valid.get(id.as_str());
            let mut missing = 0;
            for (i, &n) in dev.counts.iter().enumerate() {
                let seq = dev.first_seq + i as u64;
                if bad.is_some_and(|s| s.contains(&seq))
                    || unconfirmed.is_some_and(|s| s.contains(&seq))
                {
                    continue;
                }
                match n {
                    0 => {
                        missing += 1;
                        push_example(&mut self.telemetry.missing_examples, || {
                            format!("{id}/{seq}")
                        });
                    }
                    1 => self.telemetry.found += 1,
                    _ => {
                        self.telemetry.found += 1;
                        self.telemetry.duplicated += 1;
                        push_example(&mut self.telemetry.duplicated_examples, || {
                            let times = if n == u8::MAX {
                                "255 or more".into()
                            } else {
                                n.to_string()
                            };
                            format!("{id}/{seq} ×{times}")
                        });
                    }
                }
            }
            self.telemetry.missing += missing;
            if missing > 0 {
                self.telemetry.values_unchecked += 1;
            } else if dev.wrong_type || dev.found_fp != dev.expected_fp {
                self.telemetry.value_mismatches += 1;
                push_example(&mut self.telemetry.value_mismatch_examples, || {
                    if dev.wrong_type {
                        format!("{id} (rows with another device type or no ts)")
                    } else {
                        id.clone()
                    }
                });
            }
        }

        for b in &self.bad {
            if !b.confirmed {
                self.dead.unconfirmed_found += u64::from(b.found);
                continue;
            }
            if b.found == 0 {
                self.dead.missing += 1;
                push_example(&mut self.dead.missing_examples, || b.label());
                continue;
            }
            self.dead.found += 1;
            if let Some(wrong) = &b.wrong {
                self.dead.wrong_reason += 1;
                if self.dead.wrong_reason_examples.len() < MAX_EXAMPLES {
                    self.dead.wrong_reason_examples.push(ReasonMismatch {
                        reading: b.label(),
                        expected: b.reading.reason.clone(),
                        found: wrong.clone(),
                    });
                }
            }
            if b.found > 1 {
                if code_is_deduplicated(&b.reading.reason) {
                    self.dead.duplicated += 1;
                    push_example(&mut self.dead.duplicated_examples, || {
                        format!("{} ×{}", b.label(), b.found)
                    });
                } else {
                    self.dead.redelivered += u64::from(b.found - 1);
                }
            }
        }
        let (files, rows) = (report.telemetry.files, report.telemetry.rows);
        report.telemetry = TelemetryCheck {
            files,
            rows,
            ..self.telemetry
        };
        let (files, rows) = (report.dead_letters.files, report.dead_letters.rows);
        report.dead_letters = DeadLetterCheck {
            files,
            rows,
            ..self.dead
        };
    }
}

/// Column access by name for one batch, with errors that name the file.
struct Columns<'a> {
    batch: &'a RecordBatch,
    path: &'a Path,
    table: &'static str,
}

impl Columns<'_> {
    /// The column cast to `to`; a missing column is an error.
    fn get(&self, name: &str, to: &DataType) -> Result<ArrayRef, SimError> {
        self.optional(name, to)?.ok_or_else(|| SimError::BadColumn {
            path: self.path.to_path_buf(),
            table: self.table,
            column: name.to_owned(),
            detail: "missing".into(),
        })
    }

    /// The column cast to `to`, or `None` when the file lacks it.
    fn optional(&self, name: &str, to: &DataType) -> Result<Option<ArrayRef>, SimError> {
        let Some(a) = self.batch.column_by_name(name) else {
            return Ok(None);
        };
        if a.data_type() == to {
            return Ok(Some(Arc::clone(a)));
        }
        cast(a, to).map(Some).map_err(|e| SimError::BadColumn {
            path: self.path.to_path_buf(),
            table: self.table,
            column: name.to_owned(),
            detail: format!("type {} cannot be read as {to}: {e}", a.data_type()),
        })
    }
}

/// Reads `bytes` (the file `path`) in batches of the `wanted` columns (those present), calling
/// `each` per batch; returns the number of rows.
fn read_parquet(
    path: &Path,
    bytes: Bytes,
    table: &'static str,
    wanted: &[&str],
    required: &[&str],
    mut each: impl FnMut(&RecordBatch) -> Result<(), SimError>,
) -> Result<u64, SimError> {
    let fail = |e: Box<dyn std::error::Error + Send + Sync>| SimError::ReadParquet {
        path: path.to_path_buf(),
        source: e,
    };
    let builder = ParquetRecordBatchReaderBuilder::try_new(bytes).map_err(|e| fail(Box::new(e)))?;
    for name in required {
        if builder.schema().field_with_name(name).is_err() {
            return Err(SimError::BadColumn {
                path: path.to_path_buf(),
                table,
                column: (*name).to_owned(),
                detail: "missing".into(),
            });
        }
    }
    let mask = ProjectionMask::columns(builder.parquet_schema(), wanted.iter().copied());
    let reader = builder
        .with_projection(mask)
        .with_batch_size(BATCH_ROWS)
        .build()
        .map_err(|e| fail(Box::new(e)))?;
    let mut rows = 0;
    for batch in reader {
        let batch = batch.map_err(|e| fail(Box::new(e)))?;
        rows += batch.num_rows() as u64;
        each(&batch)?;
    }
    Ok(rows)
}

#[cfg(test)]
mod tests;
