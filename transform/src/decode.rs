//! Reading one payload's JSON into borrowed, loosely typed parts: the first half of phase 1.
//!
//! This module knows JSON, not telemetry rules. It walks the whole document once with
//! `serde_json` and hands [`validate`](crate::validate) what it needs to apply the rules in the
//! contract's order: the envelope fields, the reading fields, the metric entries, the first
//! duplicate key and the JSON type of every value that might be wrong. Nothing here fails
//! except on what serde_json calls a syntax error, so that `json_syntax` always wins over every
//! later check.
//!
//! How values are read:
//! - Strings borrow from the payload unless they hold an escape (`Cow`).
//! - `device_id`, `type`, `seq` and `ts` are read as serde_json parses them: strings, `u64`,
//!   `i64`, or `f64` for anything else (a fraction, an exponent, `-0`, or an integer beyond 64
//!   bits such as `18446744073709551616`). So `seq` can tell `7` from `7.0`.
//! - Metric values are taken as their JSON text ([`RawValue`]) and parsed with
//!   `str::parse::<f64>`. It rounds correctly, where serde_json's default float parser may be
//!   one unit in the last place off for long mantissas (so a value would not survive the
//!   round trip through the lake), and it turns `1e400` into infinity, which validation
//!   rejects as `out_of_range`. Anywhere else serde_json parses numbers itself and reports a
//!   number beyond `f64` as a syntax error ("number out of range").
//! - Objects and arrays that no rule reads (inside unknown keys, or where a scalar was
//!   expected) are walked only to find duplicate keys and to enforce serde_json's nesting limit
//!   of 128, which turns a 100,000-deep `[[[[` into a syntax error instead of a stack overflow.
//!
//! Duplicate keys are compared after unescaping (`"a"` and `"\u0061"` are the same key): known
//! field names with a bit mask, other keys linearly for small objects and with a hash set past
//! [`LINEAR_KEYS`] keys, so a hostile object with 40,000 keys costs linear time.

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;
use std::ops::Range;

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

/// Objects with up to this many keys are checked for duplicates by comparing with each earlier
/// key; bigger ones move their keys into a hash set.
const LINEAR_KEYS: usize = 16;

/// The JSON type of a value, for `wrong_type` details.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Null,
    Bool,
    Number,
    String,
    Array,
    Object,
}

impl Kind {
    /// The type with its article, for sentences: "found an array".
    pub(crate) fn described(self) -> &'static str {
        match self {
            Kind::Null => "null",
            Kind::Bool => "a boolean",
            Kind::Number => "a number",
            Kind::String => "a string",
            Kind::Array => "an array",
            Kind::Object => "an object",
        }
    }
}

/// The value of `device_id`, `type`, `seq` or `ts`, as serde_json parsed it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Val<'a> {
    /// A string, unescaped.
    Str(Cow<'a, str>),
    /// A non-negative integer.
    U64(u64),
    /// A negative integer.
    I64(i64),
    /// Any other number: with a fraction or an exponent, `-0`, or an integer beyond 64 bits.
    F64(f64),
    /// Null, a boolean, an array or an object.
    Other(Kind),
}

impl Val<'_> {
    /// The JSON type of the value.
    pub(crate) fn kind(&self) -> Kind {
        match self {
            Val::Str(_) => Kind::String,
            Val::U64(_) | Val::I64(_) | Val::F64(_) => Kind::Number,
            Val::Other(k) => *k,
        }
    }
}

/// The value of one metric.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum MetricValue<'a> {
    /// A number, as its JSON text (`21.43`, `-1e400`).
    Number(&'a str),
    /// Anything else, `null` included.
    Other(Kind),
}

/// One `name: value` entry of a `metrics` object.
#[derive(Debug)]
pub(crate) struct MetricEntry<'a> {
    pub name: Cow<'a, str>,
    pub value: MetricValue<'a>,
}

/// The `metrics` field: its entries in [`Scratch::metrics`], or the type it had instead.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Metrics {
    Object(Range<usize>),
    Other(Kind),
}

/// The fields of one reading (the top level of a single-reading message, or one batch item).
#[derive(Debug, Default)]
pub(crate) struct RawReading<'a> {
    pub seq: Option<Val<'a>>,
    pub ts: Option<Val<'a>>,
    pub metrics: Option<Metrics>,
    /// The first key found twice in one object of this batch item. (At the top level of a
    /// message, duplicates go to [`RawMessage::duplicate_key`].)
    pub duplicate_key: Option<Cow<'a, str>>,
}

/// One element of a batch's `readings` array.
#[derive(Debug)]
pub(crate) enum Item<'a> {
    Reading(RawReading<'a>),
    /// Not an object.
    Other(Kind),
}

/// The `readings` field: an array of `len` items (the first ones in [`Scratch::items`]), or
/// the type it had instead.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Readings {
    Array { len: usize },
    Other(Kind),
}

/// A payload whose top level is an object.
#[derive(Debug, Default)]
pub(crate) struct RawMessage<'a> {
    pub device_id: Option<Val<'a>>,
    pub device_type: Option<Val<'a>>,
    /// The reading fields found at the top level (a single-reading message).
    pub reading: RawReading<'a>,
    pub readings: Option<Readings>,
    /// The first key found twice in one object, anywhere outside the batch items.
    pub duplicate_key: Option<Cow<'a, str>>,
}

/// Buffers reused from one message to the next, so that parsing does not allocate per
/// message once they have grown.
#[derive(Debug, Default)]
pub(crate) struct Scratch<'a> {
    /// The message being read.
    pub message: RawMessage<'a>,
    /// The unknown keys of the objects being read, innermost last (see [`ObjectKeys`]).
    keys: Vec<Cow<'a, str>>,
    /// The metric entries of every reading of the current message.
    pub metrics: Vec<MetricEntry<'a>>,
    /// The batch items of the current message (at most the configured limit).
    pub items: Vec<Item<'a>>,
}

/// Parses one payload into `scratch` (its `message`, `metrics` and `items`). `max_items`
/// bounds how many batch items are kept: a longer batch is still read to the end (to find
/// syntax errors) and its length reported.
///
/// Returns `None` for an object, else the type the payload has instead.
///
/// # Errors
/// What serde_json reports: bad syntax, trailing characters, nesting deeper than 128, a lone
/// surrogate escape in a string that is read, a number beyond `f64` outside metric values.
pub(crate) fn parse<'a>(
    text: &'a str,
    scratch: &mut Scratch<'a>,
    max_items: usize,
) -> Result<Option<Kind>, serde_json::Error> {
    scratch.message = RawMessage::default();
    scratch.keys.clear();
    scratch.metrics.clear();
    scratch.items.clear();
    let mut de = serde_json::Deserializer::from_str(text);
    let not_object = de.deserialize_any(AnyVisitor(Top { scratch, max_items }))?;
    de.end()?;
    Ok(not_object)
}

/// The byte range of each element of a batch's `readings` array in `text`, for dead-lettering
/// one reading with its own bytes. `None` if `text` is not such a batch.
///
/// Computed only when a reading of a batch is rejected, so the common path parses once.
pub(crate) fn reading_spans(text: &str) -> Option<Vec<Range<usize>>> {
    #[derive(Deserialize)]
    struct Batch<'a> {
        #[serde(borrow)]
        readings: Vec<&'a RawValue>,
    }
    let batch: Batch<'_> = serde_json::from_str(text).ok()?;
    let base = text.as_ptr() as usize;
    Some(
        batch
            .readings
            .iter()
            .map(|r| {
                let start = r.get().as_ptr() as usize - base;
                start..start + r.get().len()
            })
            .collect(),
    )
}

/// A serde_json error's message without its position, for errors that happen while reading a
/// value's text on its own (the outer parse adds the position in the payload).
fn message_of(e: &serde_json::Error) -> String {
    let full = e.to_string();
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    match full.strip_suffix(&suffix) {
        Some(m) => m.to_owned(),
        None => full,
    }
}

/// The unknown keys of one object being read, kept on [`Scratch::keys`] above those of the
/// enclosing objects (an inner object always ends before its parent reads its next key).
struct ObjectKeys<'a> {
    start: usize,
    /// The keys known to the reader of this object that were seen, one bit each.
    known: u8,
    set: Option<HashSet<Cow<'a, str>>>,
}

impl<'a> ObjectKeys<'a> {
    fn begin(scratch: &Scratch<'a>) -> Self {
        Self {
            start: scratch.keys.len(),
            known: 0,
            set: None,
        }
    }

    /// Records a known key, identified by `bit`.
    fn insert_known(&mut self, bit: u8, name: &'static str, dup: &mut Option<Cow<'a, str>>) {
        if self.known & bit != 0 && dup.is_none() {
            *dup = Some(Cow::Borrowed(name));
        }
        self.known |= bit;
    }

    /// Records `key`; if the object already had it and no duplicate was found before, it
    /// becomes `dup`.
    fn insert(
        &mut self,
        scratch: &mut Scratch<'a>,
        key: Cow<'a, str>,
        dup: &mut Option<Cow<'a, str>>,
    ) {
        let repeated = match &mut self.set {
            Some(set) => set.replace(key),
            None => {
                let seen = &scratch.keys[self.start..];
                if seen.contains(&key) {
                    Some(key)
                } else if seen.len() < LINEAR_KEYS {
                    scratch.keys.push(key);
                    None
                } else {
                    let mut set: HashSet<_> = scratch.keys.drain(self.start..).collect();
                    set.insert(key);
                    self.set = Some(set);
                    None
                }
            }
        };
        if dup.is_none() {
            *dup = repeated;
        }
    }

    fn end(self, scratch: &mut Scratch<'a>) {
        scratch.keys.truncate(self.start);
    }
}

/// What to do with each kind of JSON value: [`AnyVisitor`] dispatches serde's callbacks here.
trait Handler<'de>: Sized {
    type Value;
    fn map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error>;
    fn seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error>;
    fn scalar(self, kind: Kind) -> Self::Value;
    /// A scalar with its value; by default only its type matters.
    fn value(self, value: Val<'de>) -> Self::Value {
        self.scalar(value.kind())
    }
    /// A string that held escapes (so it cannot be borrowed).
    fn unescaped(self, _: &str) -> Self::Value {
        self.scalar(Kind::String)
    }
}

/// A visitor that accepts any JSON value and hands it to a [`Handler`].
struct AnyVisitor<H>(H);

impl<'de, H: Handler<'de>> Visitor<'de> for AnyVisitor<H> {
    type Value = H::Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(self.0.scalar(Kind::Bool))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(self.0.value(Val::I64(v)))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(self.0.value(Val::U64(v)))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(self.0.value(Val::F64(v)))
    }
    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(self.0.value(Val::Str(Cow::Borrowed(v))))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(self.0.unescaped(v))
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(self.0.scalar(Kind::Null))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        self.0.seq(seq)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        self.0.map(map)
    }
}

/// An object key, borrowed unless it holds an escape.
struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Cow<'de, str>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object key")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Cow::Borrowed(v))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Cow::Owned(v.to_owned()))
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

/// Any value, only checked for duplicate keys and nesting.
struct Walk<'s, 'a> {
    scratch: &'s mut Scratch<'a>,
    dup: &'s mut Option<Cow<'a, str>>,
}

impl<'de> DeserializeSeed<'de> for Walk<'_, 'de> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(AnyVisitor(self))
    }
}

impl<'de> Handler<'de> for Walk<'_, 'de> {
    type Value = ();

    fn map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Walk { scratch, dup } = self;
        let mut keys = ObjectKeys::begin(scratch);
        while let Some(key) = map.next_key_seed(KeySeed)? {
            keys.insert(scratch, key, dup);
            map.next_value_seed(Walk {
                scratch: &mut *scratch,
                dup: &mut *dup,
            })?;
        }
        keys.end(scratch);
        Ok(())
    }

    fn seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Walk { scratch, dup } = self;
        while seq
            .next_element_seed(Walk {
                scratch: &mut *scratch,
                dup: &mut *dup,
            })?
            .is_some()
        {}
        Ok(())
    }

    fn scalar(self, _: Kind) {}
}

/// The value of `device_id`, `type`, `seq` or `ts`.
struct ScalarSeed<'s, 'a> {
    scratch: &'s mut Scratch<'a>,
    dup: &'s mut Option<Cow<'a, str>>,
}

impl<'de> DeserializeSeed<'de> for ScalarSeed<'_, 'de> {
    type Value = Val<'de>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Val<'de>, D::Error> {
        d.deserialize_any(AnyVisitor(self))
    }
}

impl<'de> Handler<'de> for ScalarSeed<'_, 'de> {
    type Value = Val<'de>;

    fn map<A: MapAccess<'de>>(self, map: A) -> Result<Val<'de>, A::Error> {
        Walk {
            scratch: self.scratch,
            dup: self.dup,
        }
        .map(map)?;
        Ok(Val::Other(Kind::Object))
    }

    fn seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Val<'de>, A::Error> {
        Walk {
            scratch: self.scratch,
            dup: self.dup,
        }
        .seq(seq)?;
        Ok(Val::Other(Kind::Array))
    }

    fn scalar(self, kind: Kind) -> Val<'de> {
        Val::Other(kind)
    }

    fn value(self, value: Val<'de>) -> Val<'de> {
        value
    }

    fn unescaped(self, v: &str) -> Val<'de> {
        Val::Str(Cow::Owned(v.to_owned()))
    }
}

/// Bits of [`ObjectKeys::known`] for the fields of an envelope or a reading.
mod field {
    pub const DEVICE_ID: u8 = 1;
    pub const TYPE: u8 = 2;
    pub const READINGS: u8 = 4;
    pub const SEQ: u8 = 8;
    pub const TS: u8 = 16;
    pub const METRICS: u8 = 32;
}

/// The payload's top level, read into [`Scratch::message`].
struct Top<'s, 'a> {
    scratch: &'s mut Scratch<'a>,
    max_items: usize,
}

impl<'de> Handler<'de> for Top<'_, 'de> {
    /// `None` for an object, else what the payload is instead.
    type Value = Option<Kind>;

    fn map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<Kind>, A::Error> {
        let scratch = self.scratch;
        let mut msg = std::mem::take(&mut scratch.message);
        let mut keys = ObjectKeys::begin(scratch);
        while let Some(key) = map.next_key_seed(KeySeed)? {
            let dup = &mut msg.duplicate_key;
            match &*key {
                "device_id" => {
                    keys.insert_known(field::DEVICE_ID, "device_id", dup);
                    msg.device_id = Some(map.next_value_seed(ScalarSeed { scratch, dup })?);
                }
                "type" => {
                    keys.insert_known(field::TYPE, "type", dup);
                    msg.device_type = Some(map.next_value_seed(ScalarSeed { scratch, dup })?);
                }
                "readings" => {
                    keys.insert_known(field::READINGS, "readings", dup);
                    let seed = ReadingsSeed {
                        scratch,
                        dup,
                        max_items: self.max_items,
                    };
                    msg.readings = Some(map.next_value_seed(seed)?);
                }
                _ => reading_field(key, &mut map, &mut msg.reading, &mut keys, scratch, dup)?,
            }
        }
        keys.end(scratch);
        scratch.message = msg;
        Ok(None)
    }

    fn seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Option<Kind>, A::Error> {
        // Not an object, which is checked before duplicate keys: only syntax matters here.
        let mut ignored = None;
        Walk {
            scratch: self.scratch,
            dup: &mut ignored,
        }
        .seq(seq)?;
        Ok(Some(Kind::Array))
    }

    fn scalar(self, kind: Kind) -> Option<Kind> {
        Some(kind)
    }
}

/// Reads the value of `key` into `reading` if it is a reading field, else walks it.
fn reading_field<'de, A: MapAccess<'de>>(
    key: Cow<'de, str>,
    map: &mut A,
    reading: &mut RawReading<'de>,
    keys: &mut ObjectKeys<'de>,
    scratch: &mut Scratch<'de>,
    dup: &mut Option<Cow<'de, str>>,
) -> Result<(), A::Error> {
    match &*key {
        "seq" => {
            keys.insert_known(field::SEQ, "seq", dup);
            reading.seq = Some(map.next_value_seed(ScalarSeed { scratch, dup })?);
        }
        "ts" => {
            keys.insert_known(field::TS, "ts", dup);
            reading.ts = Some(map.next_value_seed(ScalarSeed { scratch, dup })?);
        }
        "metrics" => {
            keys.insert_known(field::METRICS, "metrics", dup);
            reading.metrics = Some(map.next_value_seed(MetricsSeed { scratch, dup })?);
        }
        _ => {
            keys.insert(scratch, key, dup);
            map.next_value_seed(Walk { scratch, dup })?;
        }
    }
    Ok(())
}

/// A `metrics` value.
struct MetricsSeed<'s, 'a> {
    scratch: &'s mut Scratch<'a>,
    dup: &'s mut Option<Cow<'a, str>>,
}

impl<'de> DeserializeSeed<'de> for MetricsSeed<'_, 'de> {
    type Value = Metrics;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Metrics, D::Error> {
        d.deserialize_any(AnyVisitor(self))
    }
}

impl<'de> Handler<'de> for MetricsSeed<'_, 'de> {
    type Value = Metrics;

    fn map<A: MapAccess<'de>>(self, mut map: A) -> Result<Metrics, A::Error> {
        let Self { scratch, dup } = self;
        let start = scratch.metrics.len();
        // Metric names are checked for duplicates against the entries themselves.
        let mut big: Option<HashSet<Cow<'de, str>>> = None;
        while let Some(name) = map.next_key_seed(KeySeed)? {
            let seen = &scratch.metrics[start..];
            let repeated = match &mut big {
                Some(set) => !set.insert(name.clone()),
                None if seen.len() < LINEAR_KEYS => seen.iter().any(|e| e.name == name),
                None => {
                    let mut set: HashSet<_> = seen.iter().map(|e| e.name.clone()).collect();
                    let repeated = !set.insert(name.clone());
                    big = Some(set);
                    repeated
                }
            };
            if repeated && dup.is_none() {
                *dup = Some(name.clone());
            }
            let raw = map.next_value::<&'de RawValue>()?.get();
            let value = match raw.as_bytes().first() {
                Some(b'-' | b'0'..=b'9') => MetricValue::Number(raw),
                Some(b'n') => MetricValue::Other(Kind::Null),
                Some(b't' | b'f') => MetricValue::Other(Kind::Bool),
                // Strings, objects and arrays are read again only to check their syntax and
                // keys the way the rest of the payload is checked.
                _ => {
                    let mut de = serde_json::Deserializer::from_str(raw);
                    let seed = ScalarSeed {
                        scratch: &mut *scratch,
                        dup: &mut *dup,
                    };
                    let kind = seed
                        .deserialize(&mut de)
                        .map_err(|e| de::Error::custom(message_of(&e)))?
                        .kind();
                    MetricValue::Other(kind)
                }
            };
            scratch.metrics.push(MetricEntry { name, value });
        }
        Ok(Metrics::Object(start..scratch.metrics.len()))
    }

    fn seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Metrics, A::Error> {
        Walk {
            scratch: self.scratch,
            dup: self.dup,
        }
        .seq(seq)?;
        Ok(Metrics::Other(Kind::Array))
    }

    fn scalar(self, kind: Kind) -> Metrics {
        Metrics::Other(kind)
    }
}

/// A batch's `readings` value; its items go to [`Scratch::items`].
struct ReadingsSeed<'s, 'a> {
    scratch: &'s mut Scratch<'a>,
    dup: &'s mut Option<Cow<'a, str>>,
    max_items: usize,
}

impl<'de> DeserializeSeed<'de> for ReadingsSeed<'_, 'de> {
    type Value = Readings;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Readings, D::Error> {
        d.deserialize_any(AnyVisitor(self))
    }
}

impl<'de> Handler<'de> for ReadingsSeed<'_, 'de> {
    type Value = Readings;

    fn map<A: MapAccess<'de>>(self, map: A) -> Result<Readings, A::Error> {
        Walk {
            scratch: self.scratch,
            dup: self.dup,
        }
        .map(map)?;
        Ok(Readings::Other(Kind::Object))
    }

    fn seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Readings, A::Error> {
        let scratch = self.scratch;
        let mut len = 0;
        loop {
            let more = if len < self.max_items {
                seq.next_element_seed(ItemSeed {
                    scratch: &mut *scratch,
                })?
            } else {
                // Past the limit the whole message is rejected; only syntax still matters.
                let mut ignored = None;
                let walk = Walk {
                    scratch: &mut *scratch,
                    dup: &mut ignored,
                };
                seq.next_element_seed(walk)?
            };
            if more.is_none() {
                break;
            }
            len += 1;
        }
        Ok(Readings::Array { len })
    }

    fn scalar(self, kind: Kind) -> Readings {
        Readings::Other(kind)
    }
}

/// One element of `readings`, pushed to [`Scratch::items`].
struct ItemSeed<'s, 'a> {
    scratch: &'s mut Scratch<'a>,
}

impl<'de> DeserializeSeed<'de> for ItemSeed<'_, 'de> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(AnyVisitor(self))
    }
}

impl<'de> Handler<'de> for ItemSeed<'_, 'de> {
    type Value = ();

    fn map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let scratch = self.scratch;
        let mut reading = RawReading::default();
        let mut dup = None;
        let mut keys = ObjectKeys::begin(scratch);
        while let Some(key) = map.next_key_seed(KeySeed)? {
            reading_field(key, &mut map, &mut reading, &mut keys, scratch, &mut dup)?;
        }
        keys.end(scratch);
        reading.duplicate_key = dup;
        scratch.items.push(Item::Reading(reading));
        Ok(())
    }

    fn seq<A: SeqAccess<'de>>(self, seq: A) -> Result<(), A::Error> {
        // Not an object, which is all that will be said about it.
        let mut ignored = None;
        Walk {
            scratch: &mut *self.scratch,
            dup: &mut ignored,
        }
        .seq(seq)?;
        self.scratch.items.push(Item::Other(Kind::Array));
        Ok(())
    }

    fn scalar(self, kind: Kind) {
        self.scratch.items.push(Item::Other(kind));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_ok(text: &str) -> Scratch<'_> {
        let mut scratch = Scratch::default();
        assert_eq!(parse(text, &mut scratch, 100).unwrap(), None, "an object");
        scratch
    }

    #[test]
    fn reads_a_single_reading_with_borrowed_strings() {
        let text = r#"{"device_id":"env-1","type":"env","ts":"2026-11-27T15:04:05Z","seq":7,
            "metrics":{"temperature_c":21.5,"humidity_pct":null}}"#;
        let scratch = parse_ok(text);
        let m = &scratch.message;
        assert!(matches!(
            m.device_id,
            Some(Val::Str(Cow::Borrowed("env-1")))
        ));
        assert_eq!(m.device_type, Some(Val::Str("env".into())));
        assert_eq!(m.reading.seq, Some(Val::U64(7)));
        assert_eq!(m.reading.ts, Some(Val::Str("2026-11-27T15:04:05Z".into())));
        assert_eq!(m.reading.metrics, Some(Metrics::Object(0..2)));
        assert_eq!(scratch.metrics[0].name, "temperature_c");
        assert_eq!(scratch.metrics[0].value, MetricValue::Number("21.5"));
        assert_eq!(scratch.metrics[1].value, MetricValue::Other(Kind::Null));
        assert!(m.readings.is_none());
        assert!(m.duplicate_key.is_none());
    }

    #[test]
    fn tells_what_a_payload_is_when_not_an_object() {
        let mut scratch = Scratch::default();
        assert_eq!(parse("[1]", &mut scratch, 1).unwrap(), Some(Kind::Array));
        assert_eq!(parse(" 7 ", &mut scratch, 1).unwrap(), Some(Kind::Number));
        assert_eq!(parse("null", &mut scratch, 1).unwrap(), Some(Kind::Null));
    }

    #[test]
    fn unescapes_strings_that_hold_escapes() {
        let scratch = parse_ok(r#"{"device_id":"env\u002d1"}"#);
        assert_eq!(scratch.message.device_id, Some(Val::Str("env-1".into())));
    }

    #[test]
    fn reads_numbers_as_serde_json_does_except_metric_values() {
        let scratch = parse_ok(
            r#"{"seq":18446744073709551616,"ts":-0,"x":-5,"metrics":{"a":1e400,"b":-0.0}}"#,
        );
        let m = &scratch.message;
        assert_eq!(m.reading.seq, Some(Val::F64(18446744073709551616.0)));
        assert_eq!(m.reading.ts, Some(Val::F64(-0.0)));
        assert_eq!(scratch.metrics[0].value, MetricValue::Number("1e400"));
        assert_eq!(scratch.metrics[1].value, MetricValue::Number("-0.0"));
        let mut scratch = Scratch::default();
        assert!(parse(r#"{"seq":1e400}"#, &mut scratch, 1).is_err());
    }

    #[test]
    fn finds_duplicate_keys_in_nested_objects_after_unescaping() {
        let scratch = parse_ok(r#"{"x":{"y":[{"a":1,"\u0061":2}]}}"#);
        assert_eq!(scratch.message.duplicate_key.as_deref(), Some("a"));
        let scratch = parse_ok(r#"{"metrics":{"t":1,"u":2,"t":3}}"#);
        assert_eq!(scratch.message.duplicate_key.as_deref(), Some("t"));
        let scratch = parse_ok(r#"{"metrics":{"t":{"v":1,"v":2}}}"#);
        assert_eq!(scratch.message.duplicate_key.as_deref(), Some("v"));
        let scratch = parse_ok(r#"{"seq":1,"ts":2,"seq":3}"#);
        assert_eq!(scratch.message.duplicate_key.as_deref(), Some("seq"));
        let scratch = parse_ok(r#"{"a":{"seq":1},"seq":{"a":1},"b":[{"a":{}}]}"#);
        assert_eq!(scratch.message.duplicate_key, None);
    }

    #[test]
    fn finds_duplicate_keys_in_big_objects() {
        let mut object = String::from("{");
        for i in 0..1000 {
            object.push_str(&format!("\"k{i}\":{i},"));
        }
        object.push_str("\"k500\":0}");
        for text in [object.clone(), format!(r#"{{"metrics":{object}}}"#)] {
            let scratch = parse_ok(&text);
            assert_eq!(scratch.message.duplicate_key.as_deref(), Some("k500"));
        }
    }

    #[test]
    fn keeps_duplicate_keys_of_batch_items_with_the_item() {
        let scratch = parse_ok(r#"{"readings":[{"seq":1},{"seq":2,"seq":3},7],"type":"env"}"#);
        assert!(scratch.message.duplicate_key.is_none());
        assert_eq!(scratch.message.readings, Some(Readings::Array { len: 3 }));
        assert!(
            matches!(&scratch.items[1], Item::Reading(r) if r.duplicate_key.as_deref() == Some("seq"))
        );
        assert!(matches!(scratch.items[2], Item::Other(Kind::Number)));
    }

    #[test]
    fn stops_keeping_batch_items_past_the_limit_but_counts_them() {
        let mut scratch = Scratch::default();
        parse(r#"{"readings":[{},{},{},{}]}"#, &mut scratch, 2).unwrap();
        assert_eq!(scratch.message.readings, Some(Readings::Array { len: 4 }));
        assert_eq!(scratch.items.len(), 2);
    }

    #[test]
    fn reports_deep_nesting_as_an_error_without_overflowing_the_stack() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let mut scratch = Scratch::default();
        let err = parse(&deep, &mut scratch, 10).unwrap_err();
        assert!(err.to_string().contains("recursion limit"), "{err}");
        let inside = format!(r#"{{"seq":{deep}}}"#);
        assert!(parse(&inside, &mut scratch, 10).is_err());
        let in_metric = format!(r#"{{"metrics":{{"a":{deep}}}}}"#);
        assert!(parse(&in_metric, &mut scratch, 10).is_err());
    }

    #[test]
    fn rejects_lone_surrogates_in_strings() {
        let mut scratch = Scratch::default();
        for text in [
            r#"{"device_id":"\ud800"}"#,
            r#"{"x":["\ud800"]}"#,
            r#"{"metrics":{"a":"\ud800"}}"#,
        ] {
            let err = parse(text, &mut scratch, 10).unwrap_err();
            assert!(err.to_string().contains("hex escape"), "{err}");
            assert_eq!(err.to_string().matches(" at line ").count(), 1, "{err}");
        }
    }

    #[test]
    fn finds_the_byte_ranges_of_batch_items() {
        let text = r#"{"type":"env", "readings": [ {"seq":1} ,7,{"seq":[2]}]}"#;
        let spans = reading_spans(text).unwrap();
        let items: Vec<&str> = spans.into_iter().map(|r| &text[r]).collect();
        assert_eq!(items, [r#"{"seq":1}"#, "7", r#"{"seq":[2]}"#]);
    }
}
