//! Writes the committed seed corpus, `fuzz/seeds/<target>/`, from the telemetry v1 spec
//! (`shared/spec/telemetry-v1.md`) and the KPL format (`ingest/src/kinesis/kpl.rs`).
//!
//! ```sh
//! cd fuzz && cargo run --example gen_seeds
//! ```
//!
//! Every seed is also run through the target's checks here, so a seed that breaks an invariant
//! fails the generator before it reaches the fuzzer. Rerun after changing the input layout of
//! a target; the files are replaced, not merged.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::Path;

use base64::Engine as _;
use md5::{Digest, Md5};
use sensorlake_fuzz::telemetry::{self, Context};
use sensorlake_ingest::kinesis::kpl::{MAGIC, aggregate};
use serde_json::{Value, json};

/// A `ts` one minute before `telemetry::NOW_MS`, as epoch ms and as RFC 3339.
const TS_MS: i64 = 1_764_255_845_123;
const TS: &str = "2025-11-27T15:04:05.123Z";

/// Claim indices into `telemetry::CLAIMED`.
const NO_CLAIM: usize = 0;
const CLAIM_ENV: usize = 1;
const CLAIM_PWR: usize = 2;
const CLAIM_HOSTILE: usize = 3;

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    let telemetry_seeds = telemetry_seeds();
    let kpl_seeds = kpl_seeds();
    let lambda_seeds = lambda_seeds();
    for (target, seeds, run) in [
        (
            "telemetry_decoder",
            telemetry_seeds,
            telemetry::run as fn(&[u8]),
        ),
        ("kpl_decoder", kpl_seeds, sensorlake_fuzz::kpl::run),
        ("lambda_event", lambda_seeds, sensorlake_fuzz::lambda::run),
    ] {
        let dir = root.join(target);
        if dir.exists() {
            fs::remove_dir_all(&dir).unwrap();
        }
        fs::create_dir_all(&dir).unwrap();
        for (name, bytes) in &seeds {
            run(bytes);
            fs::write(dir.join(name), bytes).unwrap();
        }
        println!("{}: {} seeds", dir.display(), seeds.len());
    }
    // What each telemetry seed comes to, to check that it reaches the rule it is named after.
    for (name, bytes) in self::telemetry_seeds() {
        if let Some(out) = telemetry::process(&bytes) {
            let c = &out.counts;
            println!(
                "  {name}: received {}, accepted {}, duplicates {}, rejected {:?}",
                c.received, c.accepted, c.duplicates, c.rejected
            );
        }
    }
}

/// A single-reading message.
fn reading(device: &str, ty: &str, ts: &str, seq: &str, metrics: &str) -> String {
    format!(r#"{{"device_id":{device},"type":"{ty}","ts":{ts},"seq":{seq},"metrics":{metrics}}}"#)
}

fn env(seq: u64) -> String {
    reading(
        r#""env-000042""#,
        "env",
        &format!(r#""{TS}""#),
        &seq.to_string(),
        r#"{"temperature_c":21.43,"humidity_pct":40.2,"battery_v":3.71}"#,
    )
}

/// An env reading with one metric's JSON text replaced.
fn env_metric(value: &str) -> String {
    reading(
        r#""env-000042""#,
        "env",
        &TS_MS.to_string(),
        "7",
        &format!(r#"{{"temperature_c":{value},"humidity_pct":40.2,"battery_v":3.71}}"#),
    )
}

/// An env reading with its `ts` JSON text replaced.
fn env_ts(ts: &str) -> String {
    reading(
        r#""env-000042""#,
        "env",
        ts,
        "7",
        r#"{"temperature_c":21.0,"humidity_pct":40.0,"battery_v":3.7}"#,
    )
}

/// An env reading from `device` (its JSON text).
fn env_device(device: &str) -> String {
    reading(
        device,
        "env",
        &TS_MS.to_string(),
        "1",
        r#"{"temperature_c":21.0}"#,
    )
}

fn power(seq: u64, energy: &str) -> String {
    reading(
        r#""pwr-000001""#,
        "power",
        &TS_MS.to_string(),
        &seq.to_string(),
        &format!(r#"{{"voltage_v":230.1,"current_a":4.2,"power_w":966.4,"energy_kwh":{energy}}}"#),
    )
}

fn one(context: Context, payload: impl AsRef<[u8]>) -> Vec<u8> {
    telemetry::encode(context, &[payload.as_ref()])
}

fn telemetry_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let c = Context::PLAIN;
    let mut seeds = vec![
        // Valid: each default device type, both sources, a batch, enrichment.
        ("valid_env", one(c.claiming(CLAIM_ENV), env(1842))),
        (
            "valid_vibration",
            one(
                c.claiming(NO_CLAIM),
                reading(
                    r#""vib-000007""#,
                    "vibration",
                    &TS_MS.to_string(),
                    "3",
                    r#"{"rms_mm_s":1.5,"peak_g":null,"temperature_c":40.5}"#,
                ),
            ),
        ),
        (
            "valid_power_kinesis",
            one(
                c.claiming(CLAIM_PWR).with(Context::KINESIS),
                power(11, "12.5"),
            ),
        ),
        (
            "valid_batch",
            one(
                c.claiming(CLAIM_ENV),
                format!(
                    r#"{{"device_id":"env-000042","type":"env","readings":[
  {{"ts":{TS_MS},"seq":1842,"metrics":{{"temperature_c":21.43,"humidity_pct":40.2,"battery_v":3.71}}}},
  {{"ts":"{TS}","seq":1843,"metrics":{{"temperature_c":21.5,"humidity_pct":null}}}},
  {{"ts":{TS_MS},"seq":1843,"metrics":{{"temperature_c":21.5}}}},
  {{"ts":{TS_MS},"metrics":{{}}}},
  [1,2],
  {{"ts":{TS_MS},"seq":1844,"seq":1845,"metrics":{{}}}}
]}}"#
                ),
            ),
        ),
        // Several records in one call: a repeat, out of order, energy going down and back up.
        (
            "records_dedup_and_monotonic",
            telemetry::encode(
                c,
                &[
                    power(10, "100.0").as_bytes(),
                    power(12, "101.0").as_bytes(),
                    power(10, "100.0").as_bytes(),
                    power(11, "102.0").as_bytes(),
                    power(13, "99.0").as_bytes(),
                    power(14, "null").as_bytes(),
                    power(200, "150.0").as_bytes(),
                    power(20, "120.0").as_bytes(),
                    env(1).as_bytes(),
                    env(1).as_bytes(),
                ],
            ),
        ),
        (
            "restored_state",
            telemetry::encode(
                c.with(Context::RESTORED),
                &[
                    env(100).as_bytes(),
                    env(99).as_bytes(),
                    env(101).as_bytes(),
                    power(5, "10.0").as_bytes(),
                    power(6, "9.0").as_bytes(),
                    power(7, "11.0").as_bytes(),
                ],
            ),
        ),
        (
            "unknown_device_rejected",
            telemetry::encode(
                c.with(Context::REJECT_UNKNOWN_DEVICES),
                &[env(1).as_bytes(), env_device(r#""env-999999""#).as_bytes()],
            ),
        ),
        (
            "unknown_metric",
            one(
                c,
                reading(
                    r#""env-000042""#,
                    "env",
                    &TS_MS.to_string(),
                    "1",
                    r#"{"temperature_c":1.0,"colour":"red","x\u202e":2}"#,
                ),
            ),
        ),
        (
            "unknown_metric_ignored",
            one(
                c.with(Context::IGNORE_UNKNOWN_METRICS),
                reading(
                    r#""env-000042""#,
                    "env",
                    &TS_MS.to_string(),
                    "1",
                    r#"{"temperature_c":1.0,"colour":"red"}"#,
                ),
            ),
        ),
        (
            "pre_rejected_corrupt_aggregate",
            telemetry::encode(
                c.with(Context::FIRST_PRE_REJECTED | Context::KINESIS),
                &[&[0xF3, 0x89, 0x9A, 0xC2, 0, 1, 2], env(2).as_bytes()],
            ),
        ),
        ("topic_mismatch", one(c.claiming(CLAIM_PWR), env(1))),
        // The envelope: empty, whitespace, truncated, BOM, bad UTF-8, not an object.
        ("empty", one(c, "")),
        ("whitespace", one(c, " \t\r\n ")),
        ("truncated_json", one(c, &env(1)[..40])),
        ("bom", one(c, format!("\u{feff}{}", env(1)))),
        ("invalid_utf8", {
            let mut p = env(1).into_bytes();
            p[16] = 0xFF;
            p.extend_from_slice(&[0xC3, 0x28]);
            one(c, p)
        }),
        ("lone_surrogate", one(c, env_device(r#""env-\ud800""#))),
        (
            "lone_surrogate_metric_name",
            one(c, env_metric(r#"1,"\udc00x":2"#)),
        ),
        ("not_an_object", one(c, "[1,2,3]")),
        ("a_number", one(c, "42")),
        (
            "deep_nesting",
            one(
                c,
                env_metric(&format!("{}{}", "[".repeat(200), "]".repeat(200))),
            ),
        ),
        (
            "deep_nesting_objects",
            one(c, "{\"a\":".repeat(150) + &"}".repeat(150)),
        ),
        // Numbers at the edges.
        ("metric_1e400", one(c, env_metric("1e400"))),
        ("metric_nan", one(c, env_metric("NaN"))),
        ("metric_negative_zero", one(c, env_metric("-0"))),
        (
            "seq_negative_zero",
            one(
                c,
                reading(r#""env-000042""#, "env", &TS_MS.to_string(), "-0", "{}"),
            ),
        ),
        (
            "seq_u64_overflow",
            one(
                c,
                reading(
                    r#""env-000042""#,
                    "env",
                    &TS_MS.to_string(),
                    "18446744073709551616",
                    "{}",
                ),
            ),
        ),
        (
            "seq_u64_max",
            one(
                c,
                reading(
                    r#""env-000042""#,
                    "env",
                    &TS_MS.to_string(),
                    "18446744073709551615",
                    r#"{"temperature_c":1}"#,
                ),
            ),
        ),
        (
            "seq_1e400",
            one(
                c,
                reading(r#""env-000042""#, "env", &TS_MS.to_string(), "1e400", "{}"),
            ),
        ),
        (
            "seq_fraction",
            one(
                c,
                reading(r#""env-000042""#, "env", &TS_MS.to_string(), "1.5", "{}"),
            ),
        ),
        (
            "duplicate_keys",
            one(
                c,
                r#"{"device_id":"env-000042","device_id":"env-000043","type":"env","ts":1764255845123,"seq":1,"metrics":{"temperature_c":1,"temperature_c":2}}"#,
            ),
        ),
        // Device ids.
        (
            "device_path_traversal",
            one(c.claiming(CLAIM_HOSTILE), env_device(r#""../../etc""#)),
        ),
        (
            "device_nul",
            one(c.claiming(CLAIM_HOSTILE), env_device(r#""dev\u0000""#)),
        ),
        (
            "device_rtl_override",
            one(c, env_device(r#""env-\u202e1""#)),
        ),
        (
            "device_too_long",
            one(c, env_device(&format!("\"{}\"", "a".repeat(65)))),
        ),
        ("device_number", one(c, env_device("42"))),
        // Timestamps: seconds, nanoseconds, year 3000, future, too old, strings.
        ("ts_seconds", one(c, env_ts("1764255845"))),
        ("ts_nanoseconds", one(c, env_ts("1764255845123000000"))),
        ("ts_year_3000", one(c, env_ts(r#""3000-01-01T00:00:00Z""#))),
        (
            "ts_future",
            one(c, env_ts(&(telemetry::NOW_MS + 600_000).to_string())),
        ),
        (
            "ts_too_old",
            one(c, env_ts(r#""2025-01-01T00:00:00+01:00""#)),
        ),
        ("ts_not_rfc3339", one(c, env_ts(r#""27/11/2025 15:04""#))),
        ("ts_float", one(c, env_ts("1764255845123.5"))),
        // Metrics of the wrong shape, out of range, missing fields, unknown type.
        ("metric_string", one(c, env_metric(r#""21.4""#))),
        ("metric_object", one(c, env_metric(r#"{"v":21.4}"#))),
        ("metric_null", one(c, env_metric("null"))),
        ("metric_out_of_range", one(c, env_metric("125.0001"))),
        (
            "metrics_not_an_object",
            one(
                c,
                reading(r#""env-000042""#, "env", &TS_MS.to_string(), "1", "[]"),
            ),
        ),
        (
            "missing_fields",
            one(c, r#"{"device_id":"env-000042","type":"env"}"#),
        ),
        (
            "unknown_type",
            one(c, reading(r#""env-000042""#, "gas", "1", "1", "{}")),
        ),
        (
            "empty_batch",
            one(
                c,
                r#"{"device_id":"env-000042","type":"env","readings":[]}"#,
            ),
        ),
    ];
    // The size and batch-length checks, under the tight limits (the defaults, 256 KiB and
    // 10,000 readings, would make the fuzzer carry 256 KiB inputs: a seed that size fills the
    // corpus with large copies of itself and cuts executions per second severalfold).
    let tight = c.with(Context::TIGHT_LIMITS).claiming(CLAIM_ENV);
    let mut oversize = env(1);
    oversize.insert_str(1, &format!(r#""pad":"{}","#, "x".repeat(1024)));
    seeds.push(("oversize_tight_limit", one(tight, oversize)));
    let item = format!(r#"{{"ts":{TS_MS},"seq":1,"metrics":{{}}}}"#);
    seeds.push((
        "too_many_readings_tight_limit",
        one(
            tight,
            format!(
                r#"{{"device_id":"env-000042","type":"env","readings":[{}]}}"#,
                vec![item; 5].join(",")
            ),
        ),
    ));
    seeds.push((
        "context_byte_only",
        vec![Context::PLAIN.claiming(NO_CLAIM).0],
    ));
    seeds
}

/// `MAGIC` + `body` + the MD5 of `body`: a hand-written protobuf, sealed.
fn seal(body: &[u8]) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(body);
    out.extend_from_slice(&Md5::digest(body));
    out
}

fn kpl_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let env1 = env(1);
    let env2 = env(2);
    let power1 = power(1, "3.5");
    let batch = aggregate(&[
        ("env-000042", env1.as_bytes()),
        ("pwr-000001", power1.as_bytes()),
        ("env-000042", env2.as_bytes()),
    ]);
    let mut bad_md5 = batch.clone();
    let last = bad_md5.len() - 1;
    bad_md5[last] ^= 0xFF;
    vec![
        (
            "aggregate_one",
            aggregate(&[("env-000042", env1.as_bytes())]),
        ),
        ("aggregate_three_two_keys", batch.clone()),
        (
            "aggregate_unicode_keys_empty_data",
            aggregate(&[
                ("ключ-😀", b""),
                ("", b"data under an empty key"),
                ("ключ-😀", b"x"),
            ]),
        ),
        (
            "aggregate_binary_data",
            aggregate(&[
                ("k", &[0u8, 0xFF, 0xF3, 0x89, 0x9A, 0xC2][..]),
                ("k", &[0x1E; 40][..]),
            ]),
        ),
        // Explicit hash keys, tags, unknown fields of every wire type, tables after records.
        (
            "aggregate_hash_keys_tags_unknown_fields",
            seal(&[
                0x12, 0x03, b'1', b'2', b'3', 0x1A, 0x0F, 0x10, 0x00, 0x22, 0x04, 0x0A, 0x02, b't',
                b'k', 0x1A, 0x01, b'x', 0x08, 0x00, 0x28, 0x07, 0x0A, 0x01, b'k', 0x39, 1, 2, 3, 4,
                5, 6, 7, 8, 0x45, 1, 2, 3, 4, 0x4A, 0x02, 0xFF, 0xFF,
            ]),
        ),
        ("plain_json", env1.clone().into_bytes()),
        ("plain_empty", Vec::new()),
        ("corrupt_md5", bad_md5),
        ("corrupt_truncated", batch[..batch.len() / 2].to_vec()),
        ("corrupt_magic_only", MAGIC.to_vec()),
        ("corrupt_no_records", seal(&[0x0A, 0x01, b'k'])),
        (
            "corrupt_key_index",
            seal(&[0x0A, 0x01, b'k', 0x1A, 0x04, 0x08, 0x01, 0x1A, 0x00]),
        ),
        (
            "corrupt_huge_length",
            seal(&[0x1A, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F]),
        ),
    ]
}

const ARN: &str = "arn:aws:kinesis:eu-west-1:123456789012:stream/telemetry";
const SEQ1: &str = "49590338271490256608559692538361571095921575989136588898";
const SEQ2: &str = "49590338271490256608559692540925702759324208523137515618";

/// One record of a Kinesis event, as an event source mapping sends it.
fn event_record(shard: &str, seq: &str, data: &[u8]) -> Value {
    json!({
        "kinesis": {
            "kinesisSchemaVersion": "1.0",
            "partitionKey": "env-000042",
            "sequenceNumber": seq,
            "data": base64::engine::general_purpose::STANDARD.encode(data),
            "approximateArrivalTimestamp": 1764255845.123
        },
        "eventSource": "aws:kinesis",
        "eventVersion": "1.0",
        "eventID": format!("{shard}:{seq}"),
        "eventName": "aws:kinesis:record",
        "invokeIdentityArn": "arn:aws:iam::123456789012:role/lambda-role",
        "awsRegion": "eu-west-1",
        "eventSourceARN": ARN
    })
}

fn lambda_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let shard = "shardId-000000000006";
    let packed = aggregate(&[
        ("env-000042", env(1).as_bytes()),
        ("env-000042", env(2).as_bytes()),
    ]);
    let kinesis = |records: Vec<Value>| json!({ "Records": records });
    let with = |mut r: Value, path: &[&str], v: Value| {
        let mut at = &mut r;
        for p in &path[..path.len() - 1] {
            at = &mut at[*p];
        }
        at[path[path.len() - 1]] = v;
        r
    };
    let good = event_record(shard, SEQ1, env(1).as_bytes());
    let seeds: Vec<(&'static str, Value)> = vec![
        ("kinesis_one", kinesis(vec![good.clone()])),
        (
            "kinesis_two_shards_unsorted_repeated_aggregate",
            kinesis(vec![
                event_record(shard, SEQ2, &packed),
                event_record("shardId-000000000001", "9", b"{}"),
                event_record(shard, SEQ1, env(1).as_bytes()),
                event_record(shard, SEQ2, &packed),
                event_record(shard, &format!("000{SEQ1}"), b""),
            ]),
        ),
        ("kinesis_empty", kinesis(vec![])),
        (
            "kinesis_consumer_arn",
            kinesis(vec![with(
                good.clone(),
                &["eventSourceARN"],
                json!("arn:aws:kinesis:eu-west-1:1:stream/telemetry/consumer/c1:1700000000"),
            )]),
        ),
        (
            "bad_event_id",
            kinesis(vec![with(good.clone(), &["eventID"], json!(SEQ1))]),
        ),
        (
            "bad_sequence",
            kinesis(vec![with(
                good.clone(),
                &["kinesis", "sequenceNumber"],
                json!("12x"),
            )]),
        ),
        (
            "bad_base64",
            kinesis(vec![with(
                good.clone(),
                &["kinesis", "data"],
                json!("not base64!"),
            )]),
        ),
        (
            "bad_arn",
            kinesis(vec![with(
                good.clone(),
                &["eventSourceARN"],
                json!("arn:aws:kinesis:eu-west-1:1:stream/a b"),
            )]),
        ),
        (
            "bad_arrival",
            kinesis(vec![with(
                good.clone(),
                &["kinesis", "approximateArrivalTimestamp"],
                json!(1e300),
            )]),
        ),
        (
            "record_missing_fields",
            json!({"Records": [{"eventID": "x"}]}),
        ),
        ("records_not_an_array", json!({"Records": {"a": 1}})),
        (
            "compact",
            json!({"action": "compact", "older_than_secs": 60}),
        ),
        (
            "compact_typo",
            json!({"action": "compact", "older_than": 5}),
        ),
        ("vacuum", json!({"action": "vacuum"})),
        (
            "scheduled",
            json!({
                "version": "0", "id": "x", "detail-type": "Scheduled Event", "source": "aws.events",
                "account": "123456789012", "time": "2026-11-27T15:00:00Z", "region": "eu-west-1",
                "resources": [], "detail": {}
            }),
        ),
        ("array", json!([1, 2])),
        ("string", json!("compact")),
    ];
    seeds
        .into_iter()
        .map(|(name, v)| (name, serde_json::to_vec_pretty(&v).unwrap()))
        .collect()
}
