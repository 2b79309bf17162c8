//! Phase 1 of a batch: every rule that needs no per-device state, applied to each message on
//! its own (and so in parallel over chunks of messages).
//!
//! For each message this module produces either one whole-message rejection or the validated
//! envelope plus one [`DecodedReading`] per reading. A reading carries its `seq` and a
//! [`Verdict`]: rejected before the de-duplication gate (the `seq` itself is unusable), rejected
//! after it (bad `ts`, bad metrics), or valid so far. Phase 2 (`transformer.rs`) runs the gate,
//! the never-decreasing rule and the registry policy in record order, so the contract's check
//! order (see `Reason::is_deduplicated`) holds even though the checks are split in two.

use std::borrow::Cow;
use std::ops::Range;

use sensorlake_core::time::{format_rfc3339_millis, parse_rfc3339};
use sensorlake_core::{MetricSpec, RawRecord, Reason, TelemetrySchema};

use crate::config::{TransformConfig, UnknownMetrics};
use crate::decode::{
    self, Item, Kind, MetricEntry, MetricValue, Metrics, RawReading, Readings, Val,
};
use crate::registry::{DeviceInfo, Registry, is_valid_device_id};

/// The earliest plausible epoch-millisecond `ts`: 1971-01-01T00:00:00Z.
///
/// Year 1970 itself is excluded on purpose: a seconds-since-epoch value sent by mistake
/// (`1764255845`) reads as a date in January 1970 when taken as milliseconds, and any such
/// value before the year 2969 is caught by this bound.
pub(crate) const MIN_TS_MS: i64 = 31_536_000_000;
/// The latest plausible epoch-millisecond `ts`: 9999-12-31T23:59:59.999Z. Microsecond and
/// nanosecond values sent by mistake land far beyond it.
pub(crate) const MAX_TS_MS: i64 = 253_402_300_799_999;

/// Why a reading or a message goes to the dead-letter table: the reason code and a short
/// sentence for humans. The sentence quotes payload text only through [`excerpt`].
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Reject {
    pub reason: Reason,
    pub detail: String,
}

impl Reject {
    fn new(reason: Reason, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
        }
    }

    fn missing(field: &'static str) -> Self {
        Self::new(
            Reason::MissingField(Cow::Borrowed(field)),
            format!("{field} is missing"),
        )
    }

    fn wrong_type(field: &'static str, expected: &str, found: Kind) -> Self {
        Self::new(
            Reason::WrongType(Cow::Borrowed(field)),
            format!("{field} must be {expected}, found {}", found.described()),
        )
    }
}

/// Up to 40 characters of untrusted text for a detail sentence: printable ASCII is kept,
/// anything else becomes `?`, and longer text is cut with `...`.
pub(crate) fn excerpt(s: &str) -> String {
    const MAX: usize = 40;
    let mut out: String = s
        .chars()
        .take(MAX)
        .map(|c| {
            if c == ' ' || c.is_ascii_graphic() {
                c
            } else {
                '?'
            }
        })
        .collect();
    if s.chars().nth(MAX).is_some() {
        out.push_str("...");
    }
    out
}

/// A number for a detail sentence, in a bounded number of characters.
pub(crate) fn number(x: f64) -> String {
    if x == 0.0 || (1e-6..1e15).contains(&x.abs()) || !x.is_finite() {
        format!("{x}")
    } else {
        format!("{x:e}")
    }
}

/// A device type laid out for the hot path.
#[derive(Debug, Clone)]
pub(crate) struct TypePlan {
    /// The `type` value, written to the `device_type` column.
    pub name: String,
    /// The type's metrics, in configuration order.
    pub metrics: Vec<MetricSpec>,
    /// For each metric column of the telemetry schema, the index of this type's metric that
    /// fills it (none: the column is null for this type).
    pub column_metric: Vec<Option<usize>>,
    /// The type's first never-decreasing metric: the one the device checkpoint's
    /// `energy_kwh` holds.
    pub never_decreasing: Option<usize>,
}

impl TypePlan {
    /// One plan per device type of `schema`, indexed like `schema.device_types()`.
    pub(crate) fn for_schema(schema: &TelemetrySchema) -> Vec<TypePlan> {
        let columns = schema.metric_columns().len();
        schema
            .device_types()
            .iter()
            .enumerate()
            .map(|(ty, spec)| {
                let mut column_metric = vec![None; columns];
                for (m, &slot) in schema.metric_slots(ty).iter().enumerate() {
                    column_metric[slot] = Some(m);
                }
                TypePlan {
                    name: spec.name.clone(),
                    metrics: spec.metrics.clone(),
                    column_metric,
                    never_decreasing: spec.metrics.iter().position(|m| m.never_decreasing),
                }
            })
            .collect()
    }

    fn metric_index(&self, name: &str) -> Option<usize> {
        self.metrics.iter().position(|m| m.name == name)
    }
}

/// Where a reading stands after phase 1.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Verdict {
    /// Passed every stateless check.
    Valid,
    /// Rejected before the de-duplication gate: bad `seq`, or a bad batch item.
    BeforeGate(Box<Reject>),
    /// Rejected by a check after the gate (`ts`, metrics): it still goes through the gate.
    AfterGate(Box<Reject>),
}

/// One reading after phase 1.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct DecodedReading {
    /// Valid unless the verdict is [`Verdict::BeforeGate`].
    pub seq: u64,
    /// Event time in µs; valid if the verdict is [`Verdict::Valid`].
    pub ts_us: i64,
    /// Where the reading's metric values start in [`Decoded::values`] (one per metric of the
    /// device type, in type order); valid if the verdict is [`Verdict::Valid`].
    pub values: usize,
    pub verdict: Verdict,
}

/// A message whose envelope passed.
#[derive(Debug)]
pub(crate) struct Envelope<'a> {
    /// The payload as text (to find a batch item's bytes when it is rejected).
    pub text: &'a str,
    pub device_id: Cow<'a, str>,
    /// Index into the device types.
    pub ty: usize,
    /// The registry's entry for the device.
    pub info: Option<&'a DeviceInfo>,
    /// A batch message (`readings`), whose rejected readings are dead-lettered with their own
    /// bytes.
    pub batch: bool,
    /// This message's readings in [`Decoded::readings`].
    pub readings: Range<usize>,
}

/// What phase 1 made of one message.
#[derive(Debug)]
pub(crate) enum Body<'a> {
    /// Rejected whole (counted as one reading).
    Rejected {
        reject: Box<Reject>,
        /// The payload's `device_id`, when it was a string passing the rule.
        device_id: Option<Cow<'a, str>>,
    },
    Readings(Envelope<'a>),
}

/// One message after phase 1.
#[derive(Debug)]
pub(crate) struct Message<'a> {
    pub record: &'a RawRecord,
    pub body: Body<'a>,
}

/// Phase 1's output for a run of consecutive records.
#[derive(Debug, Default)]
pub(crate) struct Decoded<'a> {
    pub messages: Vec<Message<'a>>,
    pub readings: Vec<DecodedReading>,
    pub values: Vec<Option<f64>>,
}

/// The stateless rules, with everything they need for one call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rules<'r> {
    pub schema: &'r TelemetrySchema,
    pub types: &'r [TypePlan],
    pub config: &'r TransformConfig,
    pub registry: &'r Registry,
    /// The latest acceptable `ts`, µs (now + skew).
    pub newest_us: i64,
    /// The earliest acceptable `ts`, µs (now − lateness).
    pub oldest_us: i64,
}

/// A whole-message rejection on its way out of the envelope checks.
struct MessageReject<'a> {
    reject: Reject,
    device_id: Option<Cow<'a, str>>,
}

impl From<Reject> for MessageReject<'_> {
    fn from(reject: Reject) -> Self {
        Self {
            reject,
            device_id: None,
        }
    }
}

impl<'r> Rules<'r> {
    /// The rules for a call at `now_ms`.
    pub(crate) fn new(
        schema: &'r TelemetrySchema,
        types: &'r [TypePlan],
        config: &'r TransformConfig,
        registry: &'r Registry,
        now_ms: i64,
    ) -> Self {
        let to_us = |ms: i64| ms.saturating_mul(1000);
        Self {
            schema,
            types,
            config,
            registry,
            newest_us: to_us(now_ms.saturating_add(config.max_future_skew_ms)),
            oldest_us: to_us(now_ms.saturating_sub(config.lateness_ms)),
        }
    }

    /// Applies the stateless rules to consecutive records.
    pub(crate) fn decode<'a>(&self, records: &'a [RawRecord]) -> Decoded<'a>
    where
        'r: 'a,
    {
        let mut out = Decoded {
            messages: Vec::with_capacity(records.len()),
            readings: Vec::with_capacity(records.len()),
            values: Vec::with_capacity(records.len() * 4),
        };
        let mut scratch = decode::Scratch::default();
        for record in records {
            let body = match self.envelope(record, &mut scratch, &mut out) {
                Ok(envelope) => Body::Readings(envelope),
                Err(MessageReject { reject, device_id }) => Body::Rejected {
                    reject: Box::new(reject),
                    device_id,
                },
            };
            out.messages.push(Message { record, body });
        }
        out
    }

    /// The envelope checks, in contract order; on success the readings are in `out`.
    fn envelope<'a>(
        &self,
        record: &'a RawRecord,
        scratch: &mut decode::Scratch<'a>,
        out: &mut Decoded<'a>,
    ) -> Result<Envelope<'a>, MessageReject<'a>>
    where
        'r: 'a,
    {
        if let Some(rejected) = &record.rejected {
            let (reason, detail) = &**rejected;
            return Err(Reject::new(reason.clone(), detail.clone()).into());
        }
        let payload: &'a [u8] = &record.payload;
        let limit = self.config.max_payload_bytes;
        if payload.len() > limit {
            return Err(Reject::new(
                Reason::TooLarge,
                format!(
                    "the payload has {} bytes, the limit is {limit}",
                    payload.len()
                ),
            )
            .into());
        }
        let text = std::str::from_utf8(payload).map_err(|e| {
            Reject::new(
                Reason::InvalidUtf8,
                format!("the payload is not UTF-8 (at byte {})", e.valid_up_to()),
            )
        })?;
        let max_items = self.config.max_readings_per_message;
        match decode::parse(text, scratch, max_items) {
            Ok(None) => {}
            Ok(Some(kind)) => {
                let detail = format!("the payload is {}, not a JSON object", kind.described());
                return Err(Reject::new(Reason::NotAnObject, detail).into());
            }
            Err(e) => return Err(Reject::new(Reason::JsonSyntax, e.to_string()).into()),
        }
        let msg = std::mem::take(&mut scratch.message);

        // From here on a valid device id goes to the dead letter with the rejection.
        let valid_id = match &msg.device_id {
            Some(Val::Str(id)) if is_valid_device_id(id) => Some(id.clone()),
            _ => None,
        };
        if let Some(key) = msg.duplicate_key {
            let reject = duplicate_key(&key);
            let device_id = valid_id.filter(|_| key != "device_id");
            return Err(MessageReject { reject, device_id });
        }
        let device_id = match (msg.device_id, valid_id) {
            (_, Some(id)) => id,
            (None, _) => return Err(Reject::missing("device_id").into()),
            (Some(Val::Str(_)), None) => {
                let detail =
                    "device_id must be 1-64 characters of A-Z a-z 0-9 _ . : - (and not . or ..)";
                return Err(Reject::new(Reason::InvalidDeviceId, detail).into());
            }
            (Some(v), None) => {
                return Err(Reject::wrong_type("device_id", "a string", v.kind()).into());
            }
        };
        let fail = |reject: Reject, device_id: &Cow<'a, str>| MessageReject {
            reject,
            device_id: Some(device_id.clone()),
        };
        if let Some(claimed) = record.claimed_device_id.as_deref()
            && claimed != device_id
        {
            let detail = format!(
                "the payload's device_id `{device_id}` differs from `{}` named by the transport",
                excerpt(claimed)
            );
            return Err(fail(Reject::new(Reason::TopicMismatch, detail), &device_id));
        }
        let ty = match &msg.device_type {
            None => return Err(fail(Reject::missing("type"), &device_id)),
            Some(Val::Str(name)) => match self.type_index(name) {
                Some(ty) => ty,
                None => {
                    let detail = format!("`{}` is not a configured device type", excerpt(name));
                    return Err(fail(
                        Reject::new(Reason::UnknownDeviceType, detail),
                        &device_id,
                    ));
                }
            },
            Some(v) => {
                let reject = Reject::wrong_type("type", "a string", v.kind());
                return Err(fail(reject, &device_id));
            }
        };
        let plan = &self.types[ty];

        let start = out.readings.len();
        let batch = match msg.readings {
            None => {
                let reading = self.reading(&msg.reading, plan, &scratch.metrics, &mut out.values);
                out.readings.push(reading);
                false
            }
            Some(Readings::Other(kind)) => {
                let reject = Reject::wrong_type("readings", "an array", kind);
                return Err(fail(reject, &device_id));
            }
            Some(Readings::Array { len: 0 }) => {
                let reject = Reject::new(Reason::EmptyBatch, "the batch's readings array is empty");
                return Err(fail(reject, &device_id));
            }
            Some(Readings::Array { len }) if len > max_items => {
                let detail = format!("the batch has {len} readings, the limit is {max_items}");
                return Err(fail(
                    Reject::new(Reason::TooManyReadings, detail),
                    &device_id,
                ));
            }
            Some(Readings::Array { .. }) => {
                for (i, item) in scratch.items.iter().enumerate() {
                    let reading = match item {
                        Item::Reading(r) => {
                            self.reading(r, plan, &scratch.metrics, &mut out.values)
                        }
                        Item::Other(kind) => before_gate(Reject::new(
                            Reason::NotAnObject,
                            format!(
                                "reading {i} of the batch is {}, not an object",
                                kind.described()
                            ),
                        )),
                    };
                    out.readings.push(reading);
                }
                true
            }
        };
        Ok(Envelope {
            text,
            info: self.registry.get(&device_id),
            device_id,
            ty,
            batch,
            readings: start..out.readings.len(),
        })
    }

    /// The index of a device type. A linear scan beats hashing for the few types there
    /// usually are.
    fn type_index(&self, name: &str) -> Option<usize> {
        if self.types.len() <= 8 {
            self.types.iter().position(|t| t.name == name)
        } else {
            self.schema.type_index(name)
        }
    }

    /// The reading checks that need no state: `seq`, then (past the gate) `ts` and metrics.
    fn reading(
        &self,
        r: &RawReading<'_>,
        plan: &TypePlan,
        entries: &[MetricEntry<'_>],
        values: &mut Vec<Option<f64>>,
    ) -> DecodedReading {
        if let Some(key) = &r.duplicate_key {
            return before_gate(duplicate_key(key));
        }
        let seq = match seq(r.seq.as_ref()) {
            Ok(seq) => seq,
            Err(reject) => return before_gate(reject),
        };
        let mut reading = DecodedReading {
            seq,
            ts_us: 0,
            values: values.len(),
            verdict: Verdict::Valid,
        };
        let checked = self.ts(r.ts.as_ref()).and_then(|ts_us| {
            reading.ts_us = ts_us;
            self.metrics(r.metrics.as_ref(), plan, entries, values)
        });
        if let Err(reject) = checked {
            reading.verdict = Verdict::AfterGate(Box::new(reject));
        }
        reading
    }

    /// `ts`: RFC 3339 or integer epoch milliseconds, inside the accepted window. In µs.
    fn ts(&self, value: Option<&Val<'_>>) -> Result<i64, Reject> {
        const EXPECTED: &str = "an RFC 3339 string or integer epoch milliseconds";
        let ts_us = match value {
            None => return Err(Reject::missing("ts")),
            Some(Val::Str(s)) => parse_rfc3339(s).ok_or_else(|| {
                let detail = format!("ts `{}` is not an RFC 3339 date-time", excerpt(s));
                Reject::new(Reason::InvalidTimestamp, detail)
            })?,
            Some(&Val::U64(ms)) if ms <= MAX_TS_MS as u64 && ms >= MIN_TS_MS as u64 => {
                ms as i64 * 1000
            }
            Some(Val::U64(ms)) => return Err(implausible_ts(&ms.to_string())),
            Some(Val::I64(ms)) => return Err(implausible_ts(&ms.to_string())),
            // serde_json turns integers beyond 64 bits into floats.
            Some(&Val::F64(v)) if v.fract() == 0.0 && v.abs() >= 9.2e18 => {
                return Err(implausible_ts(&number(v)));
            }
            Some(Val::F64(v)) => {
                let detail = format!("ts must be {EXPECTED}, found {}", number(*v));
                return Err(Reject::new(Reason::WrongType(Cow::Borrowed("ts")), detail));
            }
            Some(v) => return Err(Reject::wrong_type("ts", EXPECTED, v.kind())),
        };
        if ts_us > self.newest_us {
            let detail = format!(
                "ts {} is more than {} ms ahead of the pipeline's clock",
                format_rfc3339_millis(ts_us),
                self.config.max_future_skew_ms
            );
            return Err(Reject::new(Reason::TsInFuture, detail));
        }
        if ts_us < self.oldest_us {
            let detail = format!(
                "ts {} is more than {} ms behind the pipeline's clock",
                format_rfc3339_millis(ts_us),
                self.config.lateness_ms
            );
            return Err(Reject::new(Reason::TsTooOld, detail));
        }
        Ok(ts_us)
    }

    /// `metrics`: writes one value per metric of the type to `values` (nulls for missing
    /// ones), or reports the first problem: an unknown name, then a wrong type, then a value
    /// out of range, whatever their order in the payload.
    fn metrics(
        &self,
        value: Option<&Metrics>,
        plan: &TypePlan,
        entries: &[MetricEntry<'_>],
        values: &mut Vec<Option<f64>>,
    ) -> Result<(), Reject> {
        let range = match value {
            None => return Err(Reject::missing("metrics")),
            Some(Metrics::Other(kind)) => {
                return Err(Reject::wrong_type("metrics", "an object", *kind));
            }
            Some(Metrics::Object(range)) => range.clone(),
        };
        let reject_unknown = self.config.unknown_metrics == UnknownMetrics::Reject;
        let base = values.len();
        values.resize(base + plan.metrics.len(), None);
        let mut unknown = None;
        let mut wrong_type = None;
        let mut out_of_range = None;
        for entry in &entries[range] {
            let Some(m) = plan.metric_index(&entry.name) else {
                if reject_unknown && unknown.is_none() {
                    unknown = Some(&entry.name);
                }
                continue;
            };
            match &entry.value {
                MetricValue::Other(Kind::Null) => {}
                MetricValue::Number(text) => match parse_f64(text) {
                    Some(v) if plan.metrics[m].in_range(v) => values[base + m] = Some(v),
                    Some(v) => {
                        out_of_range.get_or_insert((m, v));
                    }
                    None => {
                        wrong_type.get_or_insert((m, Kind::Number));
                    }
                },
                MetricValue::Other(kind) => {
                    wrong_type.get_or_insert((m, *kind));
                }
            }
        }
        let reject = if let Some(name) = unknown {
            let detail = format!(
                "metric `{}` is not defined for device type {}",
                excerpt(name),
                plan.name
            );
            Reject::new(Reason::UnknownMetric(name.to_string()), detail)
        } else if let Some((m, kind)) = wrong_type {
            let name = &plan.metrics[m].name;
            let detail = format!(
                "{name} must be a number or null, found {}",
                kind.described()
            );
            Reject::new(Reason::WrongType(Cow::Owned(name.clone())), detail)
        } else if let Some((m, v)) = out_of_range {
            let spec = &plan.metrics[m];
            let detail = if v.is_finite() {
                format!(
                    "{} = {} is outside {}",
                    spec.name,
                    number(v),
                    range_of(spec)
                )
            } else {
                format!("{} is too large to be a finite number", spec.name)
            };
            Reject::new(Reason::OutOfRange(spec.name.clone()), detail)
        } else {
            return Ok(());
        };
        values.truncate(base);
        Err(reject)
    }
}

/// A JSON number's text as the nearest `f64` (infinite beyond its range), exactly as
/// `str::parse` would, with a fast path for the short decimals sensors send.
fn parse_f64(text: &str) -> Option<f64> {
    short_decimal(text).or_else(|| text.parse().ok())
}

/// `-?digits(.digits)?` with at most 15 digits, else `None`. Exact: the digits form an
/// integer below 2^53 and the divisor a power of ten below 10^22, both exactly representable,
/// and IEEE division rounds correctly (Clinger's fast path, which `str::parse` takes too).
fn short_decimal(text: &str) -> Option<f64> {
    const POW10: [f64; 16] = [
        1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
    ];
    let bytes = text.as_bytes();
    let (negative, digits) = match bytes.split_first()? {
        (b'-', rest) => (true, rest),
        _ => (false, bytes),
    };
    let mut mantissa: u64 = 0;
    let mut count = 0;
    let mut fraction_digits = 0;
    let mut in_fraction = false;
    for &b in digits {
        match b {
            b'0'..=b'9' => {
                mantissa = mantissa * 10 + u64::from(b - b'0');
                count += 1;
                fraction_digits += usize::from(in_fraction);
            }
            b'.' if !in_fraction => in_fraction = true,
            _ => return None,
        }
        if count > 15 {
            return None;
        }
    }
    if count == 0 {
        return None;
    }
    let v = mantissa as f64 / POW10[fraction_digits];
    Some(if negative { -v } else { v })
}

fn before_gate(reject: Reject) -> DecodedReading {
    DecodedReading {
        seq: 0,
        ts_us: 0,
        values: 0,
        verdict: Verdict::BeforeGate(Box::new(reject)),
    }
}

fn duplicate_key(key: &str) -> Reject {
    let detail = format!("key `{}` appears twice in one object", excerpt(key));
    Reject::new(Reason::DuplicateKey(key.to_owned()), detail)
}

/// `seq`: an unsigned integer that fits in 64 bits.
fn seq(value: Option<&Val<'_>>) -> Result<u64, Reject> {
    const EXPECTED: &str = "an unsigned 64-bit integer";
    let found = match value {
        None => return Err(Reject::missing("seq")),
        Some(&Val::U64(seq)) => return Ok(seq),
        Some(Val::I64(v)) => v.to_string(),
        Some(Val::F64(v)) => number(*v),
        Some(v) => return Err(Reject::wrong_type("seq", EXPECTED, v.kind())),
    };
    let detail = format!("seq must be {EXPECTED}, found {found}");
    Err(Reject::new(Reason::WrongType(Cow::Borrowed("seq")), detail))
}

fn implausible_ts(found: &str) -> Reject {
    let detail = format!("ts {found} is not epoch milliseconds between 1971 and 9999");
    Reject::new(Reason::InvalidTimestamp, detail)
}

/// A metric's valid range for a detail sentence: `0..=100`, `0..`.
fn range_of(spec: &MetricSpec) -> String {
    let bound = |b: Option<f64>| b.map(number).unwrap_or_default();
    match spec.max {
        Some(_) => format!("{}..={}", bound(spec.min), bound(spec.max)),
        None => format!("{}..", bound(spec.min)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sensorlake_core::time::days_from_civil;

    #[test]
    fn plausible_ts_bounds_are_the_documented_dates() {
        assert_eq!(MIN_TS_MS, days_from_civil(1971, 1, 1) * 86_400_000);
        assert_eq!(MAX_TS_MS, days_from_civil(10_000, 1, 1) * 86_400_000 - 1);
    }

    #[test]
    fn excerpts_are_short_and_printable() {
        assert_eq!(excerpt("abc"), "abc");
        assert_eq!(excerpt("a\nb\u{202e}"), "a?b?");
        let long = excerpt(&"x".repeat(10_000));
        assert_eq!(long.len(), 43);
        assert!(long.ends_with("..."));
    }

    #[test]
    fn numbers_in_details_stay_short() {
        assert_eq!(number(140.0), "140");
        assert_eq!(number(-0.5), "-0.5");
        assert_eq!(number(1e300), "1e300");
        assert_eq!(number(f64::INFINITY), "inf");
    }

    #[test]
    fn reads_seq_only_as_an_unsigned_64_bit_integer() {
        assert_eq!(seq(Some(&Val::U64(u64::MAX))), Ok(u64::MAX));
        for bad in [
            Val::I64(-1),
            Val::F64(-0.0),
            Val::F64(1.5),
            Val::F64(1.8446744073709552e19),
        ] {
            let err = seq(Some(&bad)).unwrap_err();
            assert_eq!(err.reason.code(), "wrong_type:seq", "{bad:?}");
        }
        let err = seq(Some(&Val::Str("1".into()))).unwrap_err();
        assert_eq!(
            err.detail,
            "seq must be an unsigned 64-bit integer, found a string"
        );
        let err = seq(Some(&Val::I64(-3))).unwrap_err();
        assert_eq!(
            err.detail,
            "seq must be an unsigned 64-bit integer, found -3"
        );
        assert_eq!(seq(None).unwrap_err().reason.code(), "missing_field:seq");
    }

    #[test]
    fn parses_metric_numbers_exactly_like_the_standard_library() {
        for text in [
            "0",
            "-0",
            "-0.0",
            "21.43",
            "40.2",
            "3.71",
            "0.1",
            "-40",
            "100000",
            "1e3",
            "1E-3",
            "1e400",
            "-1e400",
            "1e-400",
            "123456789012345",
            "1234567890123456",
            "0.30000000000000004",
            "9007199254740993",
            "2.2250738585072011e-308",
            "4.9e-324",
            "0.000000000000001",
        ] {
            let expected: f64 = text.parse().unwrap();
            let got = parse_f64(text).unwrap();
            assert_eq!(got.to_bits(), expected.to_bits(), "{text}");
        }
        // Random short decimals, the fast path's domain.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let digits = (x % 1_000_000_000_000_000) / 10u64.pow((x >> 60) as u32 % 16);
            let point = (x >> 40) as usize % 17;
            let mut text = digits.to_string();
            if point < text.len() {
                text.insert(point.max(1), '.');
            }
            if x & 1 == 1 {
                text.insert(0, '-');
            }
            let expected: f64 = text.parse().unwrap();
            assert_eq!(
                parse_f64(&text).unwrap().to_bits(),
                expected.to_bits(),
                "{text}"
            );
        }
    }

    #[test]
    fn describes_ranges() {
        let spec = |min, max| MetricSpec {
            name: "x".into(),
            min,
            max,
            never_decreasing: false,
        };
        assert_eq!(range_of(&spec(Some(0.0), Some(100.0))), "0..=100");
        assert_eq!(range_of(&spec(Some(0.0), None)), "0..");
        assert_eq!(range_of(&spec(None, Some(2.5))), "..=2.5");
    }
}
