#![allow(clippy::unwrap_used)]
//! Hostile input, end to end (issue 6): every trick on the list goes through a real Mosquitto
//! into the real `sensorlake run`, on a local lake and on S3 (moto_server), and must come out as
//! a dead letter with its stable reason, an accepted reading stored verbatim, or a counted
//! duplicate. Afterwards nothing may exist outside the lake, and inside it only the layout's
//! own paths: `telemetry/date=…/hour=…/part-….parquet`, `dead_letter/date=…/part-….parquet` and
//! `_sensorlake/…` — no extra partition level, whatever the device ids said.
//!
//! The per-rule details (every reason for every field) are unit-tested in the transform
//! (`transform/src/transformer/tests.rs`); this test proves the whole path: MQTT framing, a
//! 100 MiB message passed over without being buffered, the commit, the acknowledgement, the
//! de-duplication across a restart, and the paths.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arrow::array::{Array, AsArray, RecordBatch};
use bytes::Bytes;
use common::{Mosquitto, Pipeline, free_port, metric, wait_for};
use futures_util::TryStreamExt;
use object_store::{ObjectStore, ObjectStoreExt};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use sensorlake_testkit::Moto;

/// What must become of one trick.
#[derive(Debug, Clone, PartialEq)]
enum Expect {
    /// A dead letter with this reason code.
    Dead(&'static str),
    /// An accepted reading of this device and seq.
    Accepted(String, u64),
    /// Counted as a duplicate, written nowhere.
    Duplicate,
}

/// One message to publish.
#[derive(Debug)]
struct Trick {
    name: &'static str,
    topic: String,
    payload: Vec<u8>,
    expect: Expect,
}

/// The payload limit (`transform.max_payload_bytes`, default 256 KiB).
const LIMIT: usize = 256 * 1024;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn topic(device: &str) -> String {
    format!("telemetry/site-a/env/{device}")
}

/// A valid env reading of `device`, with `ts`, `seq` and `metrics` as JSON text.
fn reading(device: &str, ts: &str, seq: &str, metrics: &str) -> String {
    format!(r#"{{"device_id":"{device}","type":"env","ts":{ts},"seq":{seq},"metrics":{metrics}}}"#)
}

/// A valid reading of `device` with `seq`, at the current time.
fn good(device: &str, seq: u64) -> String {
    reading(
        device,
        &now_ms().to_string(),
        &seq.to_string(),
        r#"{"temperature_c":21.5}"#,
    )
}

/// A valid reading padded with an unknown top-level key (ignored) to exactly `len` bytes.
fn padded(device: &str, seq: u64, len: usize) -> String {
    let base = good(device, seq);
    let empty = format!(r#"{},"pad":""}}"#, &base[..base.len() - 1]);
    let pad = "x".repeat(len - empty.len());
    let s = format!(r#"{},"pad":"{pad}"}}"#, &base[..base.len() - 1]);
    assert_eq!(s.len(), len);
    s
}

/// Every trick of the issue's list, with the outcome it must have.
fn tricks() -> Vec<Trick> {
    let now = now_ms();
    let ts = now.to_string();
    let mut t = Vec::new();
    let mut add = |name, topic: String, payload: Vec<u8>, expect| {
        t.push(Trick {
            name,
            topic,
            payload,
            expect,
        });
    };
    let dead = Expect::Dead;
    let ok = |d: &str, s| Expect::Accepted(d.to_owned(), s);

    // Not JSON, or not one JSON object.
    add("empty", topic("h-1"), vec![], dead("json_syntax"));
    add(
        "whitespace",
        topic("h-1"),
        b" \n\t ".to_vec(),
        dead("json_syntax"),
    );
    let g = good("h-1", 1);
    add(
        "truncated",
        topic("h-1"),
        g.as_bytes()[..g.len() / 2].to_vec(),
        dead("json_syntax"),
    );
    add(
        "invalid json",
        topic("h-1"),
        b"{device_id: h-1}".to_vec(),
        dead("json_syntax"),
    );
    add(
        "byte order mark",
        topic("h-1"),
        format!("\u{feff}{g}").into_bytes(),
        dead("json_syntax"),
    );
    let mut bad_utf8 = good("h-1", 2).into_bytes();
    bad_utf8.splice(2..2, [0xff, 0xfe]);
    add(
        "invalid utf-8",
        topic("h-1"),
        bad_utf8,
        dead("invalid_utf8"),
    );
    add(
        "lone surrogate",
        topic("h-1"),
        reading(r"\ud800", &ts, "3", "{}").into_bytes(),
        dead("json_syntax"),
    );
    add(
        "nesting 100,000 deep",
        topic("h-1"),
        format!(
            r#"{{"device_id":"h-1","x":{}{}}}"#,
            "[".repeat(100_000),
            "]".repeat(100_000)
        )
        .into_bytes(),
        dead("json_syntax"),
    );

    // Numbers.
    add(
        "1e400",
        topic("h-2"),
        reading("h-2", &ts, "1", r#"{"temperature_c":1e400}"#).into_bytes(),
        dead("out_of_range:temperature_c"),
    );
    add(
        "NaN",
        topic("h-2"),
        reading("h-2", &ts, "2", r#"{"temperature_c":NaN}"#).into_bytes(),
        dead("json_syntax"),
    );
    add(
        "-0 as a metric",
        topic("h-2"),
        reading("h-2", &ts, "3", r#"{"temperature_c":-0}"#).into_bytes(),
        ok("h-2", 3),
    );
    add(
        "-0 as seq",
        topic("h-2"),
        reading("h-2", &ts, "-0", "{}").into_bytes(),
        dead("wrong_type:seq"),
    );
    add(
        "seq 2^64",
        topic("h-2"),
        reading("h-2", &ts, "18446744073709551616", "{}").into_bytes(),
        dead("wrong_type:seq"),
    );
    add(
        "missing seq",
        topic("h-2"),
        format!(r#"{{"device_id":"h-2","type":"env","ts":{ts},"metrics":{{}}}}"#).into_bytes(),
        dead("missing_field:seq"),
    );
    add(
        "duplicate keys",
        topic("h-2"),
        format!(r#"{{"device_id":"h-2","type":"env","ts":{ts},"seq":4,"seq":5,"metrics":{{}}}}"#)
            .into_bytes(),
        dead("duplicate_key:seq"),
    );

    // Sizes: at the limit, one byte over, 100 MiB (over the 1 MiB packet limit too: passed
    // over on the connection, its first 4 KiB kept).
    add(
        "at the size limit",
        topic("h-3"),
        padded("h-3", 1, LIMIT).into_bytes(),
        ok("h-3", 1),
    );
    add(
        "one byte over",
        topic("h-3"),
        padded("h-3", 2, LIMIT + 1).into_bytes(),
        dead("too_large"),
    );
    add(
        "100 MiB",
        topic("h-3"),
        padded("h-3", 3, 100 << 20).into_bytes(),
        dead("too_large"),
    );
    // gzip is not accepted: a gzip member is not UTF-8 (its magic bytes are 1f 8b).
    add(
        "gzip",
        topic("h-3"),
        vec![
            0x1f, 0x8b, 0x08, 0, 0, 0, 0, 0, 0, 0x03, 0x03, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ],
        dead("invalid_utf8"),
    );

    // Device ids. The topic carries the same text where a topic level can hold it.
    let long = "d".repeat(1000);
    for (name, id, topic_device) in [
        ("device ../../etc", "../../etc", "etc"),
        ("device ..", "..", ".."),
        ("device .", ".", "."),
        ("device a/b", "a/b", "b"),
        ("device %2e%2e", "%2e%2e", "%2e%2e"),
        ("device NUL", r"dev\u0000", "dev"),
        ("device newline", r"dev\n", "dev"),
        (
            "device with partition",
            "device=evil/date=2020-01-01",
            "date=2020-01-01",
        ),
        ("device 1,000 chars", long.as_str(), long.as_str()),
        ("device empty", "", "x"),
        ("device right-to-left override", "dev\u{202e}fdp.exe", "dev"),
    ] {
        add(
            name,
            topic(topic_device),
            reading(id, &ts, "1", "{}").into_bytes(),
            dead("invalid_device_id"),
        );
    }
    // Valid by the spec (1-64 of A-Z a-z 0-9 _ . : -): stored as data, never part of a path.
    add(
        "device CON",
        topic("CON"),
        good("CON", 1).into_bytes(),
        ok("CON", 1),
    );
    add(
        "device with a leading -",
        topic("-h-4"),
        good("-h-4", 1).into_bytes(),
        ok("-h-4", 1),
    );
    add(
        "topic differs from payload",
        topic("h-5"),
        good("h-6", 1).into_bytes(),
        dead("topic_mismatch"),
    );

    // Timestamps.
    let ts_cases: [(&str, String, &str); 6] = [
        ("ts negative", "-1764255845123".into(), "invalid_ts"),
        ("ts in seconds", (now / 1000).to_string(), "invalid_ts"),
        (
            "ts in nanoseconds",
            (u128::from(now) * 1_000_000).to_string(),
            "invalid_ts",
        ),
        (
            "ts in year 3000",
            "\"3000-01-01T00:00:00Z\"".into(),
            "ts_in_future",
        ),
        (
            "ts not RFC 3339",
            "\"2026-12-03 10:00\"".into(),
            "invalid_ts",
        ),
        ("ts not a date", "\"yesterday\"".into(), "invalid_ts"),
    ];
    for (seq, (name, ts_json, code)) in (1u64..).zip(ts_cases) {
        add(
            name,
            topic("h-7"),
            reading("h-7", &ts_json, &seq.to_string(), "{}").into_bytes(),
            dead(code),
        );
    }
    add(
        "ts missing",
        topic("h-7"),
        r#"{"device_id":"h-7","type":"env","seq":7,"metrics":{}}"#
            .as_bytes()
            .to_vec(),
        dead("missing_field:ts"),
    );

    // Metrics.
    for (seq, (name, value, expect)) in (1u64..).zip([
        (
            "metric as a string",
            r#""21.5""#,
            dead("wrong_type:temperature_c"),
        ),
        (
            "metric as an object",
            r#"{"v":1}"#,
            dead("wrong_type:temperature_c"),
        ),
        ("metric null", "null", ok("h-8", 3)),
    ]) {
        add(
            name,
            topic("h-8"),
            reading(
                "h-8",
                &ts,
                &seq.to_string(),
                &format!(r#"{{"temperature_c":{value}}}"#),
            )
            .into_bytes(),
            expect,
        );
    }
    add(
        "unknown metric",
        topic("h-8"),
        reading("h-8", &ts, "4", r#"{"pressure_hpa":1013}"#).into_bytes(),
        dead("unknown_metric:pressure_hpa"),
    );

    // The same (device_id, seq) twice in one message, and in two messages.
    let item = |seq: u64| format!(r#"{{"ts":{ts},"seq":{seq},"metrics":{{"temperature_c":20}}}}"#);
    add(
        "same seq twice in one batch",
        topic("h-9"),
        format!(
            r#"{{"device_id":"h-9","type":"env","readings":[{},{}]}}"#,
            item(1),
            item(1)
        )
        .into_bytes(),
        ok("h-9", 1),
    );
    add(
        "same seq in a second message",
        topic("h-9"),
        good("h-9", 1).into_bytes(),
        Expect::Duplicate,
    );
    t
}

/// The one reading counted for each message besides the batch with a repeated reading.
fn readings_of(tricks: &[Trick]) -> u64 {
    tricks.len() as u64 + 1
}

/// Publishes every message at QoS 1 (MQTT 3.1.1) and waits for every PUBACK.
fn publish(port: u16, messages: &[(String, Vec<u8>)]) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut o =
            rumqttc::MqttOptions::new(format!("hostile-{}", free_port()), "127.0.0.1", port);
        o.set_max_packet_size(200 << 20, 200 << 20);
        o.set_keep_alive(Duration::from_secs(60));
        let (client, mut el) = rumqttc::AsyncClient::new(o, messages.len() + 10);
        for (topic, payload) in messages {
            client
                .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload.clone())
                .await
                .unwrap();
        }
        let mut acked = 0;
        while acked < messages.len() {
            let ev = tokio::time::timeout(Duration::from_secs(60), el.poll())
                .await
                .expect("the broker acknowledged every publish within 60 s")
                .unwrap_or_else(|e| panic!("publishing failed: {e}"));
            if let rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) = ev {
                acked += 1;
            }
        }
        client.disconnect().await.unwrap();
    });
}

/// What a dead letter keeps of `payload`: all of it, or the first 4 KiB of a message over the
/// 1 MiB MQTT packet limit (`mqtt.max_packet_bytes`).
fn kept(payload: &[u8]) -> &[u8] {
    if payload.len() > 1 << 20 {
        &payload[..4096]
    } else {
        payload
    }
}

/// Every object under the store's root, as `(path, bytes)`.
fn objects(store: &Arc<dyn ObjectStore>) -> Vec<(String, Bytes)> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let metas: Vec<_> = store.list(None).try_collect().await.unwrap();
        let mut out = Vec::new();
        for m in metas {
            let bytes = store.get(&m.location).await.unwrap().bytes().await.unwrap();
            out.push((m.location.to_string(), bytes));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    })
}

fn read_parquet(bytes: Bytes) -> Vec<RecordBatch> {
    ParquetRecordBatchReaderBuilder::try_new(bytes)
        .unwrap()
        .build()
        .unwrap()
        .map(|b| b.unwrap())
        .collect()
}

/// Whether `rel` (relative to the lake root) is one of the layout's own paths.
fn is_layout_path(rel: &str) -> bool {
    let parts: Vec<&str> = rel.split('/').collect();
    let date = |s: &str| {
        s.strip_prefix("date=").is_some_and(|d| {
            d.len() == 10
                && d.bytes().enumerate().all(|(i, b)| {
                    if i == 4 || i == 7 {
                        b == b'-'
                    } else {
                        b.is_ascii_digit()
                    }
                })
        })
    };
    let hour = |s: &str| {
        s.strip_prefix("hour=")
            .is_some_and(|h| h.len() == 2 && h.bytes().all(|b| b.is_ascii_digit()))
    };
    let file = |s: &str| {
        (s.starts_with("part-") || s.starts_with("compact-"))
            && s.ends_with(".parquet")
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    };
    match parts.as_slice() {
        ["telemetry", d, h, f] => date(d) && hour(h) && file(f),
        ["dead_letter", d, f] => date(d) && file(f),
        ["_sensorlake", rest @ ..] => rest.iter().all(|p| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
                && *p != "."
                && *p != ".."
        }),
        _ => false,
    }
}

/// What the lake holds: dead letters as (reason, payload) and accepted (device, seq).
#[derive(Debug, Default)]
struct LakeContent {
    dead: Vec<(String, Vec<u8>)>,
    accepted: Vec<(String, u64)>,
}

/// Reads the lake under `prefix` of `store`, asserting on the way that every object of the
/// store is inside the lake and on one of the layout's paths.
fn read_lake(store: &Arc<dyn ObjectStore>, prefix: &str) -> LakeContent {
    let mut content = LakeContent::default();
    let all = objects(store);
    assert!(!all.is_empty(), "the store is empty");
    for (path, bytes) in all {
        let rel = path
            .strip_prefix(&format!("{prefix}/"))
            .unwrap_or_else(|| panic!("`{path}` exists outside the lake `{prefix}/`"));
        assert!(
            is_layout_path(rel),
            "`{rel}` is not a path of the lake's layout"
        );
        if rel.starts_with("dead_letter/") {
            for b in read_parquet(bytes) {
                let reasons = b.column_by_name("reason").unwrap().as_string::<i32>();
                let payloads = b.column_by_name("payload").unwrap().as_binary::<i32>();
                for i in 0..b.num_rows() {
                    content
                        .dead
                        .push((reasons.value(i).to_owned(), payloads.value(i).to_vec()));
                }
            }
        } else if rel.starts_with("telemetry/") {
            for b in read_parquet(bytes) {
                let ids = b.column_by_name("device_id").unwrap().as_string::<i32>();
                let seqs = b
                    .column_by_name("seq")
                    .unwrap()
                    .as_primitive::<arrow::datatypes::UInt64Type>();
                for i in 0..b.num_rows() {
                    assert!(ids.is_valid(i));
                    content
                        .accepted
                        .push((ids.value(i).to_owned(), seqs.value(i)));
                }
            }
        }
    }
    content
}

/// The broker for these tests: the project's settings without a message size limit, so that
/// a 100 MiB message reaches sensorlake.
fn broker() -> Mosquitto {
    let conf = sensorlake::bench::MOSQUITTO_SETTINGS
        .lines()
        .filter(|l| !l.starts_with("message_size_limit"))
        .collect::<Vec<_>>()
        .join("\n");
    Mosquitto::start_with(&format!("{conf}\n"))
}

/// Runs every trick against the lake at `lake_url`, with a restart in the middle, and checks
/// what the lake holds afterwards through `store` (whose root holds the lake at `prefix`).
fn run_tricks(lake_url: &str, env: &[(&str, &str)], store: Arc<dyn ObjectStore>, prefix: &str) {
    let broker = broker();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("pipeline.log");
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let mut env: Vec<(&str, &str)> = env.to_vec();
    env.push(("SENSORLAKE_FLUSH__MAX_AGE_MS", "200"));
    let url = broker.url();
    let args = [
        "--mqtt",
        url.as_str(),
        "--lake",
        lake_url,
        "--metrics-addr",
        metrics_addr.as_str(),
    ];
    let mut p = Pipeline::start(&args, &log, &env);

    let tricks = tricks();
    let messages: Vec<_> = tricks
        .iter()
        .map(|t| (t.topic.clone(), t.payload.clone()))
        .collect();
    publish(broker.port, &messages);
    let expected = readings_of(&tricks);
    wait_for(
        "every trick to be committed and acknowledged",
        Duration::from_secs(60),
        || {
            metric(&metrics_addr, "sensorlake_readings_received_total") >= expected as f64
                && metric(&metrics_addr, "sensorlake_messages_in_flight") == 0.0
        },
    );
    assert_eq!(
        metric(&metrics_addr, "sensorlake_readings_received_total"),
        expected as f64,
        "{}",
        p.log_text()
    );
    // The repeated batch item and the repeated message.
    assert_eq!(
        metric(&metrics_addr, "sensorlake_readings_duplicate_total"),
        2.0
    );
    let rss = p.peak_rss();
    eprintln!("peak RSS after the tricks: {} MiB", rss >> 20);
    assert!(
        rss < 100 << 20,
        "a 100 MiB message must not be buffered: peak RSS {} MiB",
        rss >> 20
    );
    assert!(p.terminate().success(), "{}", p.log_text());
    // The broker reads our last acknowledgements and DISCONNECT when it gets to them: a new
    // connection that takes the session over first gets the messages those acknowledge
    // redelivered (counted as duplicates, early rejects dead-lettered again), which is
    // allowed but not what this test measures.
    wait_for(
        "the broker to process the first session's DISCONNECT",
        Duration::from_secs(30),
        || broker.log().contains("sensorlake-w0 disconnected"),
    );

    // Across a restart: the same (device_id, seq) again is a duplicate, a new one is accepted.
    let mut p = Pipeline::start(&args, &log, &env);
    publish(
        broker.port,
        &[
            (topic("h-9"), good("h-9", 1).into_bytes()),
            (topic("h-9"), good("h-9", 2).into_bytes()),
        ],
    );
    wait_for(
        "the readings after the restart to be committed",
        Duration::from_secs(60),
        || {
            metric(&metrics_addr, "sensorlake_readings_received_total") >= 2.0
                && metric(&metrics_addr, "sensorlake_messages_in_flight") == 0.0
        },
    );
    assert_eq!(
        metric(&metrics_addr, "sensorlake_readings_duplicate_total"),
        1.0,
        "{}\n{}",
        p.log_text(),
        broker.log()
    );
    assert!(p.terminate().success(), "{}", p.log_text());

    let content = read_lake(&store, prefix);
    let mut want_dead: Vec<(String, Vec<u8>)> = Vec::new();
    let mut want_ok: Vec<(String, u64)> = vec![("h-9".into(), 2)];
    for t in &tricks {
        match &t.expect {
            Expect::Dead(code) => {
                want_dead.push(((*code).to_owned(), kept(&t.payload).to_vec()));
            }
            Expect::Accepted(d, s) => want_ok.push((d.clone(), *s)),
            Expect::Duplicate => {}
        }
    }
    // Name each trick whose outcome is wrong, not only the multiset difference.
    let mut got_dead: BTreeMap<Vec<u8>, Vec<String>> = BTreeMap::new();
    for (reason, payload) in &content.dead {
        got_dead
            .entry(payload.clone())
            .or_default()
            .push(reason.clone());
    }
    for t in &tricks {
        if let Expect::Dead(code) = &t.expect {
            let reasons = got_dead.get(kept(&t.payload)).cloned().unwrap_or_default();
            assert!(
                reasons.iter().any(|r| r == code),
                "trick `{}`: expected a `{code}` dead letter, found {reasons:?}",
                t.name
            );
        }
    }
    want_dead.sort();
    let mut got = content.dead.clone();
    got.sort();
    assert_eq!(got.len(), want_dead.len(), "dead letters");
    assert!(
        got == want_dead,
        "the dead letters are not exactly the expected ones"
    );
    want_ok.sort();
    let mut accepted = content.accepted;
    accepted.sort();
    assert_eq!(accepted, want_ok, "accepted readings");
}

#[test]
fn every_trick_on_a_local_lake_is_a_dead_letter_an_accepted_row_or_a_duplicate_and_nothing_escapes()
{
    let outer = tempfile::tempdir().unwrap();
    let lake = outer.path().join("lake");
    run_tricks(
        lake.to_str().unwrap(),
        &[],
        Arc::new(object_store::local::LocalFileSystem::new_with_prefix(outer.path()).unwrap()),
        "lake",
    );
    // Nothing beside the lake in its parent folder.
    let siblings: Vec<_> = std::fs::read_dir(outer.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(siblings, ["lake"]);
}

#[test]
fn every_trick_on_an_s3_lake_is_a_dead_letter_an_accepted_row_or_a_duplicate_and_nothing_escapes() {
    const BUCKET: &str = "hostile";
    let moto = Moto::start(BUCKET);
    let env = moto.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    run_tricks(
        &format!("s3://{BUCKET}/site/lake"),
        &env,
        Arc::new(moto.store(BUCKET)),
        "site/lake",
    );
}

/// How long the all-bad run lasts (`SENSORLAKE_TEST_BAD_SECONDS`, default 60).
fn bad_seconds() -> String {
    std::env::var("SENSORLAKE_TEST_BAD_SECONDS").unwrap_or_else(|_| "60".into())
}

#[test]
fn a_minute_of_only_bad_traffic_at_full_rate_is_all_accounted_for_and_leaks_nothing() {
    let sc = common::Scenario::new();
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let mut p = sc.pipeline(
        "pipeline",
        &["--metrics-addr", &metrics_addr],
        &[("SENSORLAKE_FLUSH__MAX_AGE_MS", "500")],
    );
    let seconds = bad_seconds();
    let url = sc.broker.url();
    let duration = format!("{seconds}s");
    let args = [
        "simulate",
        "--mqtt",
        url.as_str(),
        "--devices",
        "200",
        "--duration",
        duration.as_str(),
        "--bad-ratio",
        "1.0",
        "--seed",
        "11",
        "--manifest",
        sc.manifest.to_str().unwrap(),
    ];
    let started = std::time::Instant::now();
    let out = common::bin().args(args).output().unwrap();
    assert!(
        out.status.success(),
        "sensorlake simulate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sent = common::manifest_messages(&sc.manifest);
    wait_for(
        "every bad message to be committed",
        Duration::from_secs(300),
        || metric(&metrics_addr, "sensorlake_readings_received_total") >= sent as f64,
    );
    let elapsed = started.elapsed().as_secs_f64();
    wait_for(
        "every message to be acknowledged",
        Duration::from_secs(30),
        || metric(&metrics_addr, "sensorlake_messages_in_flight") == 0.0,
    );
    eprintln!(
        "{sent} bad messages in {elapsed:.1} s ({:.0}/s) for {seconds} s of publishing; peak RSS {} MiB",
        sent as f64 / elapsed,
        p.peak_rss() >> 20
    );
    assert!(sent > 10_000, "the simulator sent only {sent} messages");
    assert_eq!(
        metric(&metrics_addr, "sensorlake_readings_received_total"),
        sent as f64
    );
    // The simulator's only valid reading is one power reading that provokes `not_monotonic`.
    assert!(metric(&metrics_addr, "sensorlake_readings_accepted_total") <= 1.0);
    // Bounded by the delivery channel (64 MiB), the flush buffer (64 MiB of payloads, some of
    // them 300 KB `too_large` ones) and the dead-letter batch built from it: 240-275 MiB
    // measured for 10, 20 and 60 s alike.
    let rss = p.peak_rss();
    assert!(
        rss < 384 << 20,
        "peak RSS {} MiB: memory must not grow with bad traffic",
        rss >> 20
    );
    assert!(p.terminate().success(), "{}", p.log_text());
    let (exact, report) = common::verify(&sc.lake, &sc.manifest);
    assert!(exact, "{report}");
}
