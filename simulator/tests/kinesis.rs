//! `simulate` into a real Kinesis server (kinesalite), through a proxy that fails single
//! PutRecords entries: every reading of the manifest is in the stream exactly once, each
//! device's in order, some inside KPL aggregates; and the errors a person meets first (no
//! stream, no endpoint, no credentials) say what to do.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use aws_sdk_kinesis::Client;
use bytes::Bytes;
use sensorlake_core::fingerprint::payload_hash;
use sensorlake_ingest::kinesis::kpl;
use sensorlake_simulator::publish::kinesis::KinesisClient;
use sensorlake_simulator::{
    FleetSpec, KinesisOptions, Manifest, SimError, SimStats, SimulateOptions, simulate,
};
use sensorlake_testkit::{Kinesalite, KinesisFaultProxy};

/// One user record read back: its partition key, its data, and whether it came in an
/// aggregate.
struct Read {
    key: String,
    data: Bytes,
    aggregated: bool,
}

/// Every user record of every shard, in shard order (sequence, then sub-sequence).
async fn read_stream(client: &Client, stream: &str) -> Vec<Read> {
    let mut out = Vec::new();
    for r in sensorlake_testkit::kinesis::read_stream(client, stream).await {
        let data = Bytes::from(r.data);
        match kpl::deaggregate(&data).unwrap() {
            Some(users) => {
                for u in users {
                    assert_eq!(
                        u.partition_key, r.partition_key,
                        "an aggregate holds one device's readings under its key"
                    );
                    out.push(Read {
                        key: u.partition_key,
                        data: u.data,
                        aggregated: true,
                    });
                }
            }
            None => out.push(Read {
                key: r.partition_key,
                data,
                aggregated: false,
            }),
        }
    }
    out
}

/// Checks `read` against `manifest`: each message once, each device's readings in seq order.
fn check_against_manifest(manifest: &Manifest, read: &[Read]) {
    assert_eq!(
        read.len() as u64,
        manifest.messages,
        "every confirmed message once"
    );
    assert_eq!(manifest.unconfirmed_count(), 0);
    let bad: HashMap<u64, _> = manifest.bad.iter().map(|b| (b.payload_hash, b)).collect();
    let mut bad_seen = 0;
    // (device, seq) in read order, for records whose device is their key.
    let mut by_device: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut valid: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for r in read {
        let (device, seq) = match bad.get(&payload_hash(&r.data)) {
            Some(b) => {
                bad_seen += 1;
                match (&b.device_id, b.seq) {
                    (Some(d), Some(s)) => (d.clone(), s),
                    _ => continue,
                }
            }
            None => {
                let v: serde_json::Value = serde_json::from_slice(&r.data).unwrap();
                let d = v["device_id"].as_str().unwrap().to_owned();
                let s = v["seq"].as_u64().unwrap();
                valid.entry(d.clone()).or_default().push(s);
                (d, s)
            }
        };
        if device == r.key {
            by_device.entry(device).or_default().push(seq);
        }
    }
    assert_eq!(bad_seen, manifest.bad.len(), "every bad reading once");
    for (device, seqs) in &by_device {
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "device {device} read out of order: {seqs:?}"
        );
    }
    assert_eq!(
        valid.keys().collect::<Vec<_>>(),
        manifest.valid.keys().collect::<Vec<_>>()
    );
    for (device, dm) in &manifest.valid {
        let seqs = &valid[device];
        assert_eq!(seqs.len() as u64, dm.count, "device {device}");
        assert_eq!(
            (seqs.iter().min().copied(), seqs.iter().max().copied()),
            (Some(dm.first_seq), Some(dm.last_seq)),
            "device {device}"
        );
    }
}

fn options(stream: &str, client: KinesisClient, readings: u64) -> SimulateOptions {
    SimulateOptions {
        fleet: FleetSpec::new(40, 11).with_bad_ratio(0.05),
        readings: Some(readings),
        kinesis: Some(KinesisOptions {
            kpl_share: 0.5,
            kpl_max_records: 8,
            linger: Duration::from_millis(20),
            client: Some(client),
            ..KinesisOptions::new(stream)
        }),
        ..SimulateOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_reading_arrives_once_in_device_order_though_entries_fail() {
    sensorlake_testkit::install_crypto_provider();
    let k = Kinesalite::start();
    k.create_stream("telemetry", 4).await;
    let proxy = KinesisFaultProxy::start(k.port(), 20261127);
    proxy.faults().put_fail_pct.store(15, Relaxed);
    let client = KinesisClient {
        client: proxy.client(),
        endpoint: proxy.endpoint(),
    };
    let stats = Arc::new(SimStats::default());
    let manifest = simulate(options("telemetry", client, 3000), stats.clone())
        .await
        .unwrap();
    manifest.check_consistency().unwrap();
    assert_eq!(manifest.messages, 3000);
    assert_eq!(stats.acked.load(Relaxed), 3000);
    assert!(
        proxy.faults().put_entries_failed_total() > 50,
        "the proxy failed entries: {}",
        proxy.faults().put_entries_failed_total()
    );

    let read = read_stream(&k.client(), "telemetry").await;
    let aggregated = read.iter().filter(|r| r.aggregated).count();
    assert!(
        (900..=2100).contains(&aggregated),
        "about half of 3000 readings in aggregates: {aggregated}"
    );
    check_against_manifest(&manifest, &read);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_stream_says_how_to_create_it() {
    let k = Kinesalite::start();
    let client = KinesisClient {
        client: k.client(),
        endpoint: k.endpoint(),
    };
    let e = simulate(options("nowhere", client, 10), Arc::default())
        .await
        .unwrap_err();
    assert!(matches!(e, SimError::KinesisStreamNotFound { .. }), "{e}");
    let text = e.to_string();
    assert!(
        text.contains("nowhere") && text.contains(&k.endpoint()) && text.contains("create-stream"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_endpoint_is_named_with_what_to_check() {
    let endpoint = format!("http://127.0.0.1:{}", sensorlake_testkit::free_port());
    let client = KinesisClient {
        client: sensorlake_testkit::kinesis::kinesis_client(&endpoint),
        endpoint: endpoint.clone(),
    };
    let e = simulate(options("telemetry", client, 10), Arc::default())
        .await
        .unwrap_err();
    assert!(matches!(e, SimError::KinesisUnreachable { .. }), "{e}");
    let text = e.to_string();
    assert!(
        text.contains(&endpoint) && text.contains("AWS_ENDPOINT_URL_KINESIS"),
        "{text}"
    );
}

/// The standard AWS environment, in a child process (the test binary runs itself, since a
/// test cannot change its own environment): with `Kinesalite::env` it publishes; without
/// credentials it says how to give them. IMDS stays off, so nothing leaves the machine.
#[test]
fn the_standard_environment_is_read_and_missing_credentials_are_named() {
    if let Some(stream) = std::env::var_os("SENSORLAKE_SIM_CHILD_STREAM") {
        let stream = stream.to_string_lossy().into_owned();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let opts = SimulateOptions {
            fleet: FleetSpec::new(5, 3),
            readings: Some(50),
            kinesis: Some(KinesisOptions::new(stream)),
            ..SimulateOptions::default()
        };
        match rt.block_on(simulate(opts, Arc::default())) {
            Ok(m) => println!("CHILD-OK {}", m.messages),
            Err(e) => println!("CHILD-ERR {e}"),
        }
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let k = Kinesalite::start();
    rt.block_on(k.create_stream("from-env", 1));
    let run = |env: &[(&str, String)]| {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap());
        child
            .args([
                "the_standard_environment_is_read_and_missing_credentials_are_named",
                "--exact",
                "--nocapture",
            ])
            .env("SENSORLAKE_SIM_CHILD_STREAM", "from-env")
            .env("HOME", "/nonexistent");
        for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("AWS_")) {
            child.env_remove(key);
        }
        child.envs(env.iter().map(|(k, v)| (*k, v.as_str())));
        let out = child.output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let out = run(&k.env());
    assert!(out.contains("CHILD-OK 50"), "{out}");

    let no_credentials: Vec<_> = k
        .env()
        .into_iter()
        .filter(|(key, _)| !key.starts_with("AWS_ACCESS") && !key.starts_with("AWS_SECRET"))
        .collect();
    let out = run(&no_credentials);
    assert!(
        out.contains("CHILD-ERR no AWS credentials for Kinesis stream from-env")
            && out.contains("AWS_ACCESS_KEY_ID"),
        "{out}"
    );

    let no_region: Vec<_> = k
        .env()
        .into_iter()
        .filter(|(key, _)| *key != "AWS_REGION")
        .collect();
    let out = run(&no_region);
    assert!(out.contains("CHILD-ERR no AWS region"), "{out}");
}
