//! KPL (Kinesis Producer Library) aggregation: many user records packed into one Kinesis
//! record as `F3 89 9A C2` + protobuf `AggregatedRecord` + MD5 of the protobuf.
//!
//! # The format
//! ```text
//! F3 89 9A C2 | AggregatedRecord (protobuf, proto2) | MD5 of the protobuf bytes (16 bytes)
//!
//! message AggregatedRecord {
//!   repeated string partition_key_table     = 1;
//!   repeated string explicit_hash_key_table = 2;
//!   repeated Record records                 = 3;
//! }
//! message Record {
//!   required uint64 partition_key_index     = 1;
//!   optional uint64 explicit_hash_key_index = 2;
//!   required bytes  data                    = 3;
//!   repeated Tag    tags                    = 4;
//! }
//! message Tag { required string key = 1; optional string value = 2; }
//! ```
//! Every user record of an aggregate lands on the shard of the *outer* Kinesis record's
//! partition key (or explicit hash key), whatever its own key says; its own key only tells the
//! consumer which device (here) it belongs to.
//!
//! The protobuf is decoded by hand: varints, length-delimited fields, and unknown fields of the
//! four wire types protobuf still uses skipped. Work is bounded by the input: no length read
//! from the input is trusted before it is checked against the bytes that remain, so nothing is
//! allocated for a claimed length, and user record data are zero-copy slices of the input.
//!
//! # What counts as corrupt
//! The KPL's own de-aggregators deliver a record that starts with the magic but fails the MD5
//! check as a plain record. We do not: a record that starts with [`MAGIC`] and does not decode
//! is an [`Err`], which [`records::expand`](super::records::expand) turns into one
//! `corrupt_aggregate` dead letter with the raw bytes. That includes a record that starts with
//! the magic but is too short to hold the MD5: no telemetry payload can start with those bytes
//! (`F3 89 9A C2` is not UTF-8: `C2` cannot continue the sequence `F3` opens), so such a record
//! was never a reading, and naming it a broken aggregate says more than `invalid_utf8` would.

use bytes::Bytes;
use md5::{Digest, Md5};

/// The four bytes every KPL aggregate starts with.
pub const MAGIC: [u8; 4] = [0xF3, 0x89, 0x9A, 0xC2];

/// Bytes of the MD5 digest at the end of an aggregate.
const DIGEST_LEN: usize = 16;

/// Protobuf wire types.
const VARINT: u8 = 0;
const I64: u8 = 1;
const LEN: u8 = 2;
const I32: u8 = 5;

/// One user record out of an aggregate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    /// Its partition key (from the aggregate's key table).
    pub partition_key: String,
    /// Its explicit hash key, if the producer set one.
    pub explicit_hash_key: Option<String>,
    /// Its data.
    pub data: Bytes,
}

/// Why a record that starts with [`MAGIC`] is not a valid aggregate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KplError {
    /// The MD5 at the end does not match the protobuf.
    #[error("the aggregate's MD5 does not match its content")]
    Checksum,
    /// The protobuf is malformed or breaks the aggregate's rules.
    #[error("the aggregate is malformed: {0}")]
    Malformed(String),
}

fn malformed(what: impl Into<String>) -> KplError {
    KplError::Malformed(what.into())
}

/// De-aggregates `record`: `Ok(None)` when it is not an aggregate (deliver it as it is),
/// `Ok(Some(records))` in order (the index is the sub-sequence number), `Err` when it starts
/// with [`MAGIC`] but is corrupt.
///
/// ```
/// use bytes::Bytes;
/// use sensorlake_ingest::kinesis::kpl::{aggregate, deaggregate};
///
/// let packed = Bytes::from(aggregate(&[("dev-1", b"{\"a\":1}"), ("dev-2", b"{\"b\":2}")]));
/// let users = deaggregate(&packed).unwrap().unwrap();
/// assert_eq!(users[1].partition_key, "dev-2");
/// assert_eq!(&users[1].data[..], b"{\"b\":2}");
/// assert_eq!(deaggregate(&Bytes::from_static(b"{\"plain\":true}")), Ok(None));
/// ```
///
/// # Errors
/// [`KplError`] for a corrupt aggregate (see the [module docs](self)): too short for its MD5,
/// an MD5 mismatch, a truncated or overlong varint or field, a wrong wire type for a known
/// field, a key index outside its table, a record without its partition key index or data,
/// a key that is not UTF-8, or no records at all.
pub fn deaggregate(record: &Bytes) -> Result<Option<Vec<UserRecord>>, KplError> {
    if !record.starts_with(&MAGIC) {
        return Ok(None);
    }
    if record.len() < MAGIC.len() + DIGEST_LEN {
        return Err(malformed(format!(
            "{} bytes start with the KPL magic but an aggregate needs at least {} (magic + MD5)",
            record.len(),
            MAGIC.len() + DIGEST_LEN
        )));
    }
    let body_end = record.len() - DIGEST_LEN;
    let body = &record[MAGIC.len()..body_end];
    if Md5::digest(body).as_slice() != &record[body_end..] {
        return Err(KplError::Checksum);
    }
    let parsed = parse_aggregate(body)?;
    if parsed.records.is_empty() {
        return Err(malformed("the aggregate holds no records"));
    }
    let mut out = Vec::with_capacity(parsed.records.len());
    for (i, r) in parsed.records.iter().enumerate() {
        let partition_key = lookup(&parsed.partition_keys, r.partition_key_index)
            .ok_or_else(|| {
                malformed(format!(
                    "record {i} names partition key {} of a table of {}",
                    r.partition_key_index,
                    parsed.partition_keys.len()
                ))
            })?
            .to_owned();
        let explicit_hash_key = match r.explicit_hash_key_index {
            None => None,
            Some(k) => Some(
                lookup(&parsed.explicit_hash_keys, k)
                    .ok_or_else(|| {
                        malformed(format!(
                            "record {i} names explicit hash key {k} of a table of {}",
                            parsed.explicit_hash_keys.len()
                        ))
                    })?
                    .to_owned(),
            ),
        };
        // The body starts MAGIC.len() bytes into the record.
        let data = record.slice(MAGIC.len() + r.data.start..MAGIC.len() + r.data.end);
        out.push(UserRecord {
            partition_key,
            explicit_hash_key,
            data,
        });
    }
    Ok(Some(out))
}

fn lookup<'a>(table: &[&'a str], index: u64) -> Option<&'a str> {
    usize::try_from(index)
        .ok()
        .and_then(|i| table.get(i))
        .copied()
}

/// Packs `records` (partition key, data) into one aggregate, as the KPL does: the partition
/// key table holds each distinct key once, in order of first use; no explicit hash keys and
/// no tags; fields in field-number order.
///
/// Every user record of the aggregate lands on the shard of the partition key the aggregate is
/// put with, so callers put it with one of the records' keys (the KPL uses the first) and
/// aggregate only records that may share a shard. An empty `records` gives an aggregate of no
/// records, which the KPL never produces and [`deaggregate`] rejects.
///
/// ```
/// use sensorlake_ingest::kinesis::kpl::{MAGIC, aggregate};
///
/// let packed = aggregate(&[("dev-1", b"one"), ("dev-1", b"two")]);
/// assert!(packed.starts_with(&MAGIC));
/// ```
pub fn aggregate(records: &[(&str, &[u8])]) -> Vec<u8> {
    let mut keys: Vec<&str> = Vec::new();
    let mut index_of: std::collections::HashMap<&str, u64> = std::collections::HashMap::new();
    let indices: Vec<u64> = records
        .iter()
        .map(|(key, _)| {
            *index_of.entry(*key).or_insert_with(|| {
                keys.push(key);
                keys.len() as u64 - 1
            })
        })
        .collect();

    let record_len = |index: u64, data: &[u8]| {
        1 + varint_len(index) + 1 + varint_len(data.len() as u64) + data.len()
    };
    let body_len: usize = keys
        .iter()
        .map(|k| 1 + varint_len(k.len() as u64) + k.len())
        .sum::<usize>()
        + records
            .iter()
            .zip(&indices)
            .map(|((_, data), &i)| {
                let n = record_len(i, data);
                1 + varint_len(n as u64) + n
            })
            .sum::<usize>();

    let mut out = Vec::with_capacity(MAGIC.len() + body_len + DIGEST_LEN);
    out.extend_from_slice(&MAGIC);
    for key in &keys {
        put_tag(&mut out, 1, LEN);
        put_varint(&mut out, key.len() as u64);
        out.extend_from_slice(key.as_bytes());
    }
    for ((_, data), &index) in records.iter().zip(&indices) {
        put_tag(&mut out, 3, LEN);
        put_varint(&mut out, record_len(index, data) as u64);
        put_tag(&mut out, 1, VARINT);
        put_varint(&mut out, index);
        put_tag(&mut out, 3, LEN);
        put_varint(&mut out, data.len() as u64);
        out.extend_from_slice(data);
    }
    let digest = Md5::digest(&out[MAGIC.len()..]);
    out.extend_from_slice(&digest);
    debug_assert_eq!(out.len(), MAGIC.len() + body_len + DIGEST_LEN);
    out
}

/// The bytes `put_varint` writes for `v`.
fn varint_len(v: u64) -> usize {
    // 7 bits per byte; 0 still takes one byte.
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Field tags of the fields `aggregate` writes fit one byte (field < 16).
fn put_tag(out: &mut Vec<u8>, field: u8, wire_type: u8) {
    out.push((field << 3) | wire_type);
}

/// The aggregate's tables and records, as offsets into the protobuf body.
#[derive(Debug, Default)]
struct Parsed<'a> {
    partition_keys: Vec<&'a str>,
    explicit_hash_keys: Vec<&'a str>,
    records: Vec<RecordRef>,
}

/// A `Record` whose key indices are not yet checked against the tables (the tables may come
/// after the records: protobuf does not order fields).
#[derive(Debug)]
struct RecordRef {
    partition_key_index: u64,
    explicit_hash_key_index: Option<u64>,
    /// Where its data sits in the protobuf body.
    data: std::ops::Range<usize>,
}

/// A cursor over protobuf bytes; positions are absolute within the body being decoded.
#[derive(Debug)]
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    end: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], start: usize, end: usize) -> Self {
        Self {
            buf,
            pos: start,
            end,
        }
    }

    fn at_end(&self) -> bool {
        self.pos >= self.end
    }

    fn varint(&mut self, what: &str) -> Result<u64, KplError> {
        let mut v: u64 = 0;
        for i in 0..10 {
            let Some(&b) = self.buf.get(self.pos).filter(|_| self.pos < self.end) else {
                return Err(malformed(format!(
                    "truncated varint ({what}) at byte {}",
                    self.pos
                )));
            };
            self.pos += 1;
            // The tenth byte holds bit 63 only.
            if i == 9 && b > 1 {
                return Err(malformed(format!(
                    "varint ({what}) longer than 64 bits at byte {}",
                    self.pos - 1
                )));
            }
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(malformed(format!(
            "varint ({what}) longer than 10 bytes at byte {}",
            self.pos
        )))
    }

    /// A field's number and wire type.
    fn tag(&mut self) -> Result<(u64, u8), KplError> {
        let at = self.pos;
        let key = self.varint("field tag")?;
        let field = key >> 3;
        if field == 0 {
            return Err(malformed(format!("field number 0 at byte {at}")));
        }
        Ok((field, (key & 7) as u8))
    }

    /// The range of a length-delimited field's content, checked against what remains.
    fn len_delimited(&mut self, what: &str) -> Result<std::ops::Range<usize>, KplError> {
        let n = self.varint(what)?;
        let remaining = self.end - self.pos;
        match usize::try_from(n) {
            Ok(n) if n <= remaining => {
                let start = self.pos;
                self.pos += n;
                Ok(start..self.pos)
            }
            _ => Err(malformed(format!(
                "{what} claims {n} bytes at byte {} but {remaining} remain",
                self.pos
            ))),
        }
    }

    fn skip(&mut self, field: u64, wire_type: u8) -> Result<(), KplError> {
        let fixed = |r: &mut Self, n: usize| {
            if r.end - r.pos < n {
                return Err(malformed(format!(
                    "truncated field {field} at byte {}",
                    r.pos
                )));
            }
            r.pos += n;
            Ok(())
        };
        match wire_type {
            VARINT => self.varint("unknown field").map(drop),
            I64 => fixed(self, 8),
            LEN => self.len_delimited("unknown field").map(drop),
            I32 => fixed(self, 4),
            other => Err(malformed(format!(
                "field {field} has wire type {other}, which protobuf does not use (or groups, \
                 which the KPL does not write) at byte {}",
                self.pos
            ))),
        }
    }

    fn str(&self, range: std::ops::Range<usize>, what: &str) -> Result<&'a str, KplError> {
        std::str::from_utf8(&self.buf[range.clone()])
            .map_err(|_| malformed(format!("{what} at byte {} is not UTF-8", range.start)))
    }
}

fn expect_wire(field: u64, got: u8, want: u8, what: &str) -> Result<(), KplError> {
    if got == want {
        Ok(())
    } else {
        Err(malformed(format!(
            "field {field} ({what}) has wire type {got}, expected {want}"
        )))
    }
}

fn parse_aggregate(body: &[u8]) -> Result<Parsed<'_>, KplError> {
    let mut r = Reader::new(body, 0, body.len());
    let mut parsed = Parsed::default();
    while !r.at_end() {
        let (field, wire) = r.tag()?;
        match field {
            1 => {
                expect_wire(field, wire, LEN, "partition key")?;
                let range = r.len_delimited("partition key")?;
                parsed.partition_keys.push(r.str(range, "partition key")?);
            }
            2 => {
                expect_wire(field, wire, LEN, "explicit hash key")?;
                let range = r.len_delimited("explicit hash key")?;
                parsed
                    .explicit_hash_keys
                    .push(r.str(range, "explicit hash key")?);
            }
            3 => {
                expect_wire(field, wire, LEN, "record")?;
                let range = r.len_delimited("record")?;
                let index = parsed.records.len();
                parsed.records.push(parse_record(body, range, index)?);
            }
            _ => r.skip(field, wire)?,
        }
    }
    Ok(parsed)
}

fn parse_record(
    body: &[u8],
    range: std::ops::Range<usize>,
    index: usize,
) -> Result<RecordRef, KplError> {
    let mut r = Reader::new(body, range.start, range.end);
    let (mut partition_key_index, mut explicit_hash_key_index, mut data) = (None, None, None);
    let in_record = |e: KplError| match e {
        KplError::Malformed(m) => malformed(format!("record {index}: {m}")),
        other => other,
    };
    while !r.at_end() {
        let (field, wire) = r.tag().map_err(in_record)?;
        match field {
            1 => {
                expect_wire(field, wire, VARINT, "partition key index").map_err(in_record)?;
                partition_key_index = Some(r.varint("partition key index").map_err(in_record)?);
            }
            2 => {
                expect_wire(field, wire, VARINT, "explicit hash key index").map_err(in_record)?;
                explicit_hash_key_index =
                    Some(r.varint("explicit hash key index").map_err(in_record)?);
            }
            3 => {
                expect_wire(field, wire, LEN, "data").map_err(in_record)?;
                data = Some(r.len_delimited("data").map_err(in_record)?);
            }
            4 => {
                // Tags: carried by the format, unused by sensorlake; their content is not read.
                expect_wire(field, wire, LEN, "tag").map_err(in_record)?;
                r.len_delimited("tag").map_err(in_record)?;
            }
            _ => r.skip(field, wire).map_err(in_record)?,
        }
    }
    let partition_key_index = partition_key_index.ok_or_else(|| {
        malformed(format!(
            "record {index} has no partition key index (a required field)"
        ))
    })?;
    let data =
        data.ok_or_else(|| malformed(format!("record {index} has no data (a required field)")))?;
    Ok(RecordRef {
        partition_key_index,
        explicit_hash_key_index,
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Wraps a protobuf body as an aggregate with a correct MD5.
    fn seal(body: &[u8]) -> Bytes {
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(body);
        out.extend_from_slice(&Md5::digest(body));
        Bytes::from(out)
    }

    fn body_of(aggregate: &[u8]) -> &[u8] {
        &aggregate[MAGIC.len()..aggregate.len() - DIGEST_LEN]
    }

    fn round_trip(records: &[(&str, &[u8])]) {
        let packed = Bytes::from(aggregate(records));
        let users = deaggregate(&packed).unwrap().unwrap();
        assert_eq!(users.len(), records.len());
        for (u, (key, data)) in users.iter().zip(records) {
            assert_eq!(u.partition_key, *key);
            assert_eq!(&u.data[..], *data);
            assert_eq!(u.explicit_hash_key, None);
        }
    }

    fn malformed_with(record: &Bytes, needle: &str) {
        match deaggregate(record) {
            Err(KplError::Malformed(m)) => assert!(m.contains(needle), "{needle:?} in {m:?}"),
            other => panic!("expected Malformed({needle:?}), got {other:?}"),
        }
    }

    /// xorshift64*, for the seeded loops.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[test]
    fn one_record_round_trips() {
        round_trip(&[("env-000001", b"{\"seq\":1}")]);
    }

    #[test]
    fn two_records_round_trip() {
        round_trip(&[("env-000001", b"first"), ("vib-000002", b"second")]);
    }

    #[test]
    fn five_hundred_records_round_trip() {
        let owned: Vec<(String, Vec<u8>)> = (0..500)
            .map(|i| {
                (
                    format!("dev-{}", i % 37),
                    format!("{{\"seq\":{i}}}").repeat(i % 5 + 1).into_bytes(),
                )
            })
            .collect();
        let records: Vec<(&str, &[u8])> = owned
            .iter()
            .map(|(k, d)| (k.as_str(), d.as_slice()))
            .collect();
        round_trip(&records);
    }

    #[test]
    fn empty_data_and_unicode_keys_round_trip() {
        round_trip(&[
            ("ключ-😀", b""),
            ("", b"data under an empty key"),
            ("日本語", b""),
            ("ключ-😀", b"again"),
        ]);
    }

    #[test]
    fn the_partition_key_table_holds_each_key_once_in_order_of_first_use() {
        let packed = aggregate(&[("b", b"1"), ("a", b"2"), ("b", b"3")]);
        let parsed = parse_aggregate(body_of(&packed)).unwrap();
        assert_eq!(parsed.partition_keys, ["b", "a"]);
        let indices: Vec<u64> = parsed
            .records
            .iter()
            .map(|r| r.partition_key_index)
            .collect();
        assert_eq!(indices, [0, 1, 0]);
    }

    #[test]
    fn user_record_data_shares_the_input_buffer() {
        let packed = Bytes::from(aggregate(&[("k", b"payload bytes")]));
        let users = deaggregate(&packed).unwrap().unwrap();
        let range = packed.as_ptr_range();
        assert!(range.contains(&users[0].data.as_ptr()), "a zero-copy slice");
    }

    /// Written out field by field from the format: keys "a" and "b"; records ("a", "hi") and
    /// ("b", "you"); the MD5 of the 23 body bytes computed independently (Python hashlib).
    const FIXTURE: [u8; 43] = [
        0xF3, 0x89, 0x9A, 0xC2, // magic
        0x0A, 0x01, b'a', // partition_key_table[0] = "a"   (field 1, LEN)
        0x0A, 0x01, b'b', // partition_key_table[1] = "b"
        0x1A, 0x06, // records[0]                              (field 3, LEN 6)
        0x08, 0x00, //   partition_key_index = 0               (field 1, VARINT)
        0x1A, 0x02, b'h', b'i', //   data = "hi"               (field 3, LEN)
        0x1A, 0x07, // records[1]                              (field 3, LEN 7)
        0x08, 0x01, //   partition_key_index = 1
        0x1A, 0x03, b'y', b'o', b'u', //   data = "you"
        // MD5
        0xa3, 0xbd, 0xf3, 0xe3, 0x71, 0xb4, 0xa8, 0xab, 0xfd, 0x03, 0x62, 0x6b, 0x14, 0xc7, 0x6f,
        0x95,
    ];

    #[test]
    fn a_fixture_written_from_the_spec_decodes_and_is_what_aggregate_writes() {
        let fixture = Bytes::from_static(&FIXTURE);
        let users = deaggregate(&fixture).unwrap().unwrap();
        assert_eq!(
            users,
            [
                UserRecord {
                    partition_key: "a".into(),
                    explicit_hash_key: None,
                    data: Bytes::from_static(b"hi"),
                },
                UserRecord {
                    partition_key: "b".into(),
                    explicit_hash_key: None,
                    data: Bytes::from_static(b"you"),
                },
            ]
        );
        assert_eq!(aggregate(&[("a", b"hi"), ("b", b"you")]), FIXTURE);
    }

    #[test]
    fn explicit_hash_keys_tags_and_unknown_fields_are_read_or_skipped() {
        let body = [
            0x12, 0x03, b'1', b'2', b'3', // explicit_hash_key_table[0] = "123" (before keys)
            0x1A, 0x0F, // records[0], LEN 15
            0x10, 0x00, //   explicit_hash_key_index = 0
            0x22, 0x04, 0x0A, 0x02, b't', b'k', //   tags[0] = {key: "tk"}
            0x1A, 0x01, b'x', //   data = "x"
            0x08, 0x00, //   partition_key_index = 0 (after data: any order)
            0x28, 0x07, //   field 5, VARINT: unknown
            0x1A, 0x02, 0x08, 0x00, // records[1]: no data yet…
            0x0A, 0x01, b'k', // partition_key_table[0] = "k" (after the records)
            0x39, 1, 2, 3, 4, 5, 6, 7, 8, // field 7, I64: unknown
            0x45, 1, 2, 3, 4, // field 8, I32: unknown
            0x4A, 0x02, 0xFF, 0xFF, // field 9, LEN: unknown, not UTF-8 (never read)
        ];
        // records[1] lacks data: a required field.
        malformed_with(&seal(&body), "record 1 has no data");
        // Without records[1], it decodes.
        let mut ok = body.to_vec();
        ok.drain(22..26);
        let users = deaggregate(&seal(&ok)).unwrap().unwrap();
        assert_eq!(
            users,
            [UserRecord {
                partition_key: "k".into(),
                explicit_hash_key: Some("123".into()),
                data: Bytes::from_static(b"x"),
            }]
        );
    }

    #[test]
    fn plain_records_are_not_aggregates() {
        for plain in [
            &b""[..],
            b"{\"device_id\":\"env-000001\"}",
            &MAGIC[..3],
            &[
                0xF3, 0x89, 0x9A, 0xC3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            ],
        ] {
            assert_eq!(deaggregate(&Bytes::copy_from_slice(plain)), Ok(None));
        }
    }

    #[test]
    fn the_magic_without_room_for_an_md5_is_corrupt() {
        for n in 4..MAGIC.len() + DIGEST_LEN {
            let mut short = MAGIC.to_vec();
            short.resize(n, 0);
            malformed_with(&Bytes::from(short), "at least 20");
        }
    }

    #[test]
    fn an_md5_mismatch_is_a_checksum_error() {
        let mut bad = FIXTURE;
        bad[FIXTURE.len() - 1] ^= 1;
        assert_eq!(
            deaggregate(&Bytes::copy_from_slice(&bad)),
            Err(KplError::Checksum)
        );
        let mut bad = FIXTURE;
        bad[6] = b'z'; // the content, under the old MD5
        assert_eq!(
            deaggregate(&Bytes::copy_from_slice(&bad)),
            Err(KplError::Checksum)
        );
    }

    #[test]
    fn an_aggregate_of_no_records_is_corrupt() {
        malformed_with(&seal(&[]), "no records");
        malformed_with(&seal(&[0x0A, 0x01, b'k']), "no records");
        malformed_with(&Bytes::from(aggregate(&[])), "no records");
    }

    #[test]
    fn truncated_varints_and_fields_are_corrupt() {
        malformed_with(&seal(&[0x0A]), "truncated varint");
        malformed_with(&seal(&[0x0A, 0x80]), "truncated varint");
        malformed_with(&seal(&[0x0A, 0x05, b'k']), "claims 5 bytes");
        malformed_with(&seal(&[0x1A, 0x02, 0x08]), "claims 2 bytes");
        malformed_with(&seal(&[0x1A, 0x01, 0x08]), "truncated varint");
        malformed_with(&seal(&[0x1A, 0x03, 0x1A, 0x05, b'x']), "claims 5 bytes");
        malformed_with(&seal(&[0x39, 1, 2, 3]), "truncated field 7");
        malformed_with(&seal(&[0x45, 1, 2]), "truncated field 8");
    }

    #[test]
    fn lengths_beyond_the_input_never_allocate() {
        // A record claiming 2^63 bytes, and a varint of 11 bytes.
        let mut huge = vec![0x1A];
        put_varint(&mut huge, 1 << 63);
        malformed_with(&seal(&huge), "remain");
        malformed_with(
            &seal(&[
                0x0A, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F,
            ]),
            "longer than 64 bits",
        );
        malformed_with(
            &seal(&[
                0x0A, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x81, 0x00,
            ]),
            "longer than",
        );
    }

    #[test]
    fn key_indices_outside_their_tables_are_corrupt() {
        // partition_key_index 1 of a table of 1.
        malformed_with(
            &seal(&[0x0A, 0x01, b'k', 0x1A, 0x04, 0x08, 0x01, 0x1A, 0x00]),
            "partition key 1 of a table of 1",
        );
        // No table at all.
        malformed_with(
            &seal(&[0x1A, 0x04, 0x08, 0x00, 0x1A, 0x00]),
            "of a table of 0",
        );
        // An index past usize on any platform.
        let mut body = vec![0x0A, 0x01, b'k', 0x1A, 0x0D, 0x08];
        put_varint(&mut body, u64::MAX);
        body.extend_from_slice(&[0x1A, 0x00]);
        malformed_with(&seal(&body), "of a table of 1");
        // explicit_hash_key_index 0 of an empty table.
        malformed_with(
            &seal(&[
                0x0A, 0x01, b'k', 0x1A, 0x06, 0x08, 0x00, 0x10, 0x00, 0x1A, 0x00,
            ]),
            "explicit hash key 0 of a table of 0",
        );
    }

    #[test]
    fn missing_required_fields_are_corrupt() {
        malformed_with(
            &seal(&[0x0A, 0x01, b'k', 0x1A, 0x02, 0x1A, 0x00]),
            "record 0 has no partition key index",
        );
        malformed_with(
            &seal(&[0x0A, 0x01, b'k', 0x1A, 0x02, 0x08, 0x00]),
            "record 0 has no data",
        );
    }

    #[test]
    fn wrong_wire_types_are_corrupt() {
        // partition_key_table as a varint.
        malformed_with(
            &seal(&[0x08, 0x01]),
            "field 1 (partition key) has wire type 0",
        );
        // records as a varint.
        malformed_with(&seal(&[0x18, 0x01]), "field 3 (record) has wire type 0");
        // partition_key_index as LEN.
        malformed_with(
            &seal(&[0x0A, 0x01, b'k', 0x1A, 0x05, 0x0A, 0x01, 0x00, 0x1A, 0x00]),
            "record 0: field 1 (partition key index) has wire type 2",
        );
        // data as a varint.
        malformed_with(
            &seal(&[0x0A, 0x01, b'k', 0x1A, 0x04, 0x08, 0x00, 0x18, 0x00]),
            "field 3 (data) has wire type 0",
        );
        // A group (wire type 3) and wire type 7 in unknown fields.
        malformed_with(&seal(&[0x2B]), "wire type 3");
        malformed_with(&seal(&[0x2F]), "wire type 7");
        // Field number 0.
        malformed_with(&seal(&[0x02, 0x00]), "field number 0");
    }

    #[test]
    fn keys_that_are_not_utf8_are_corrupt() {
        malformed_with(
            &seal(&[0x0A, 0x01, 0xFF, 0x1A, 0x04, 0x08, 0x00, 0x1A, 0x00]),
            "partition key at byte 2 is not UTF-8",
        );
    }

    #[test]
    fn truncation_at_every_byte_is_an_error_never_a_panic() {
        let full = aggregate(&[
            ("env-000001", b"{\"seq\":1}"),
            ("vib-000002", &[0u8; 200]),
            ("env-000001", b""),
        ]);
        for n in 0..full.len() {
            let cut = Bytes::copy_from_slice(&full[..n]);
            let got = deaggregate(&cut);
            if n < MAGIC.len() {
                assert_eq!(
                    got,
                    Ok(None),
                    "a {n}-byte prefix of the magic is no aggregate"
                );
            } else {
                assert!(got.is_err(), "cut at {n}: {got:?}");
            }
        }
        // Cut inside the protobuf and sealed again with a correct MD5: the parser itself
        // meets the truncation. A cut on a record boundary is a valid, shorter aggregate.
        let body = body_of(&full);
        let originals = deaggregate(&Bytes::from(full.clone())).unwrap().unwrap();
        for n in 0..body.len() {
            match deaggregate(&seal(&body[..n])) {
                Ok(Some(users)) => assert_eq!(users[..], originals[..users.len()], "cut at {n}"),
                Ok(None) => panic!("cut at {n}: a sealed body is an aggregate"),
                Err(_) => {}
            }
        }
    }

    #[test]
    fn random_aggregates_round_trip_and_random_damage_never_panics() {
        let mut rng = Rng(0x5EED_2026_1127);
        for round in 0..300 {
            let n = 1 + rng.below(40) as usize;
            let owned: Vec<(String, Vec<u8>)> = (0..n)
                .map(|_| {
                    let key = format!("dev-{}", rng.below(8));
                    let len = match rng.below(10) {
                        0 => 0,
                        1 => 200 + rng.below(2000) as usize,
                        _ => rng.below(60) as usize,
                    };
                    let data = (0..len).map(|_| rng.next() as u8).collect();
                    (key, data)
                })
                .collect();
            let records: Vec<(&str, &[u8])> = owned
                .iter()
                .map(|(k, d)| (k.as_str(), d.as_slice()))
                .collect();
            round_trip(&records);

            let packed = aggregate(&records);
            let body = body_of(&packed);
            for _ in 0..20 {
                let mut damaged = body.to_vec();
                for _ in 0..1 + rng.below(4) {
                    let at = rng.below(damaged.len() as u64) as usize;
                    match rng.below(3) {
                        0 => damaged[at] = rng.next() as u8,
                        1 => damaged[at] ^= 0x80,
                        _ => {
                            damaged.remove(at);
                            if damaged.is_empty() {
                                break;
                            }
                        }
                    }
                }
                // Sealed: the parser sees the damage. Unsealed: the MD5 catches it.
                let _ = deaggregate(&seal(&damaged));
                let mut unsealed = MAGIC.to_vec();
                unsealed.extend_from_slice(&damaged);
                unsealed.extend_from_slice(&packed[packed.len() - DIGEST_LEN..]);
                if damaged != body {
                    assert_eq!(
                        deaggregate(&Bytes::from(unsealed)),
                        Err(KplError::Checksum),
                        "round {round}"
                    );
                }
            }
        }
    }

    #[test]
    fn varint_lengths_match_what_is_written() {
        for v in [
            0,
            1,
            127,
            128,
            16_383,
            16_384,
            u64::from(u32::MAX),
            u64::MAX,
        ] {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            assert_eq!(out.len(), varint_len(v), "{v}");
            assert_eq!(Reader::new(&out, 0, out.len()).varint("v"), Ok(v));
        }
    }
}
