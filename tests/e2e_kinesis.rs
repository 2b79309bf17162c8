//! The Kinesis consumer end to end, against kinesalite (a Kinesis server on loopback): the
//! simulator puts telemetry into a stream (part of it KPL-aggregated, some of it bad), the
//! real `sensorlake run --kinesis` binary reads it while the test splits and merges shards and
//! SIGKILLs the consumer, and `sensorlake verify` must find the lake exact.
//!
//! Full size (the "done when"): `SENSORLAKE_TEST_READINGS=200000 SENSORLAKE_TEST_KILLS=5
//! scripts/test --test e2e_kinesis`. CI runs a smaller stream with the same steps.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_kinesis::Client;
use common::{Pipeline, bin, verify_eventually};
use sensorlake_testkit::kinesis::{Kinesalite, KinesisFaultProxy, install_crypto_provider};

const STREAM: &str = "telemetry";

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A kinesalite server with one stream, a scratch folder, the lake and manifest paths.
struct KinesisScenario {
    server: Kinesalite,
    rt: tokio::runtime::Runtime,
    dir: tempfile::TempDir,
    lake: PathBuf,
    manifest: PathBuf,
}

impl KinesisScenario {
    fn new(shards: i32) -> Self {
        install_crypto_provider();
        let server = Kinesalite::start();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(server.create_stream(STREAM, shards));
        let dir = tempfile::tempdir().unwrap();
        KinesisScenario {
            lake: dir.path().join("lake"),
            manifest: dir.path().join("manifest.json"),
            server,
            rt,
            dir,
        }
    }

    fn env(&self) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = self
            .server
            .env()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        // Quick rounds so that new shards are found within a second of a split.
        env.push((
            "SENSORLAKE_KINESIS__DISCOVERY_INTERVAL_SECS".into(),
            "1".into(),
        ));
        env.push(("SENSORLAKE_FLUSH__MAX_AGE_MS".into(), "500".into()));
        env
    }

    /// `sensorlake run --kinesis telemetry --lake <lake> EXTRA`, reading when this returns.
    fn consumer(&self, name: &str, extra: &[&str], env: &[(&str, &str)]) -> Pipeline {
        let mut args = vec!["--kinesis", STREAM, "--lake", self.lake.to_str().unwrap()];
        args.extend_from_slice(extra);
        let owned = self.env();
        let mut all: Vec<(&str, &str)> = owned
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        all.extend_from_slice(env);
        Pipeline::start_until(
            &args,
            &self.dir.path().join(format!("{name}.log")),
            &all,
            "Starting Kinesis consumer",
        )
    }

    /// Starts `sensorlake simulate --kinesis telemetry` in the background.
    fn simulate(&self, readings: u64, rate: u64, seed: u64, kpl_share: f64) -> Child {
        self.simulate_with(readings, rate, seed, kpl_share, &[])
    }

    fn simulate_with(
        &self,
        readings: u64,
        rate: u64,
        seed: u64,
        kpl_share: f64,
        env: &[(&str, &str)],
    ) -> Child {
        let mut cmd: Command = bin();
        cmd.args([
            "simulate",
            "--kinesis",
            STREAM,
            "--devices",
            "200",
            "--readings",
            &readings.to_string(),
            "--rate",
            &rate.to_string(),
            "--bad-ratio",
            "0.02",
            "--seed",
            &seed.to_string(),
            "--kpl-share",
            &kpl_share.to_string(),
            "--manifest",
            self.manifest.to_str().unwrap(),
        ]);
        for (k, v) in self.env() {
            cmd.env(k, v);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let log = std::fs::File::create(self.dir.path().join("simulate.log")).unwrap();
        cmd.stdout(Stdio::null()).stderr(log).spawn().unwrap()
    }

    fn simulate_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("simulate.log")).unwrap_or_default()
    }

    fn client(&self) -> Client {
        self.server.client()
    }
}

/// Open shards with their hash key ranges, sorted by range start.
async fn open_shards(client: &Client) -> Vec<(String, u128, u128)> {
    let out = client
        .list_shards()
        .stream_name(STREAM)
        .send()
        .await
        .unwrap();
    let mut open: Vec<(String, u128, u128)> = out
        .shards
        .unwrap_or_default()
        .into_iter()
        .filter(|s| {
            s.sequence_number_range
                .as_ref()
                .is_some_and(|r| r.ending_sequence_number.is_none())
        })
        .map(|s| {
            let r = s.hash_key_range.expect("a hash key range");
            (
                s.shard_id,
                r.starting_hash_key.parse().unwrap(),
                r.ending_hash_key.parse().unwrap(),
            )
        })
        .collect();
    open.sort_by_key(|s| s.1);
    open
}

/// Splits the widest open shard in the middle of its hash key range; returns the parent.
async fn split_one(client: &Client) -> String {
    let open = open_shards(client).await;
    let (id, lo, hi) = open
        .iter()
        .max_by_key(|(_, lo, hi)| hi - lo)
        .cloned()
        .unwrap();
    let mid = lo + (hi - lo) / 2;
    client
        .split_shard()
        .stream_name(STREAM)
        .shard_to_split(&id)
        .new_starting_hash_key(mid.to_string())
        .send()
        .await
        .unwrap();
    id
}

/// Merges the first two adjacent open shards; returns them.
async fn merge_two(client: &Client) -> (String, String) {
    let open = open_shards(client).await;
    let (a, b) = open
        .windows(2)
        .find(|w| w[0].2.checked_add(1) == Some(w[1].1))
        .map(|w| (w[0].0.clone(), w[1].0.clone()))
        .expect("two adjacent open shards");
    client
        .merge_shards()
        .stream_name(STREAM)
        .shard_to_merge(&a)
        .adjacent_shard_to_merge(&b)
        .send()
        .await
        .unwrap();
    (a, b)
}

fn wait_child(child: &mut Child, timeout: Duration, what: &str, log: impl Fn() -> String) {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "{what} failed ({status}): {}", log());
            return;
        }
        assert!(
            start.elapsed() < timeout,
            "{what} did not finish in {timeout:?}: {}",
            log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn assert_exact(lake: &Path, manifest: &Path, logs: impl Fn() -> String) {
    let (exact, report) = verify_eventually(lake, manifest, Duration::from_secs(90));
    assert!(exact, "verify is not exact:\n{report}\nlogs:\n{}", logs());
}

/// The scenario, sized by SENSORLAKE_TEST_READINGS / _KILLS / _SEED: 4 shards, part
/// of the stream KPL-aggregated, 2% bad readings, a split and a merge while the consumer
/// reads, and SIGKILLs of the consumer, each followed by a restart. Exact at the end.
#[test]
fn resharding_and_sigkills_end_exact() {
    let readings = env_u64("SENSORLAKE_TEST_READINGS", 40_000);
    let kills = env_u64("SENSORLAKE_TEST_KILLS", 3);
    let seed = env_u64("SENSORLAKE_TEST_SEED", 7);
    let s = KinesisScenario::new(4);
    // The stream is put over ~12 s (longer at full size), while the consumer is killed.
    let rate = (readings / 12).max(1_000);
    let mut sim = s.simulate(readings, rate, seed, 0.5);
    let mut consumer = s.consumer("consumer", &[], &[]);
    let client = s.client();
    let run_secs = readings as f64 / rate as f64;
    let mut rng = seed.max(1);
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let started = Instant::now();
    let (mut split, mut merged) = (None, None);
    let mut killed = 0;
    let mut peak_rss = 0;
    while killed < kills || split.is_none() || merged.is_none() {
        let elapsed = started.elapsed().as_secs_f64();
        if split.is_none() && elapsed > run_secs * 0.25 {
            split = Some(s.rt.block_on(split_one(&client)));
        } else if merged.is_none() && elapsed > run_secs * 0.5 {
            merged = Some(s.rt.block_on(merge_two(&client)));
        } else if killed < kills {
            // Spread the kills over the run; some land after the simulator finished.
            std::thread::sleep(Duration::from_millis(
                (run_secs * 1000.0 / kills as f64) as u64 / 2 + next() % 1_000,
            ));
            peak_rss = peak_rss.max(consumer.peak_rss());
            consumer.kill9();
            killed += 1;
            consumer = s.consumer("consumer", &[], &[]);
        } else {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    wait_child(
        &mut sim,
        Duration::from_secs(600),
        "sensorlake simulate --kinesis",
        || s.simulate_log(),
    );
    let log_path = consumer.log.clone();
    assert_exact(&s.lake, &s.manifest, || {
        std::fs::read_to_string(&log_path).unwrap_or_default()
    });
    let log = consumer.log_text();
    peak_rss = peak_rss.max(consumer.peak_rss());
    assert!(
        consumer.terminate().success(),
        "the consumer did not stop cleanly: {log}"
    );
    // The parents were read to their ends and committed as such; their children were read.
    let records = sensorlake_sink::read_commit_records(&s.lake).unwrap();
    let ended = |shard: &str| {
        records.iter().any(|r| {
            r.sources["kinesis"]["shard"] == shard && r.sources["kinesis"]["ended"] == true
        })
    };
    let (a, b) = merged.unwrap();
    for parent in [split.unwrap(), a, b] {
        assert!(
            ended(&parent),
            "parent {parent} has no ended checkpoint: {log}"
        );
    }
    let shards: std::collections::BTreeSet<&str> = records
        .iter()
        .filter_map(|r| r.sources["kinesis"]["shard"].as_str())
        .collect();
    assert_eq!(
        shards.len(),
        7,
        "4 shards, 2 split children and 1 merge child committed: {shards:?}"
    );
    assert!(
        peak_rss < 300 << 20,
        "a consumer's peak RSS was {} MiB",
        peak_rss >> 20
    );
}

/// A consumer stopped with SIGTERM commits what it read and exits 0; the next one resumes
/// after the committed checkpoints and reads nothing twice.
#[test]
fn sigterm_commits_and_a_restart_resumes_after_the_checkpoint() {
    let s = KinesisScenario::new(2);
    let mut sim = s.simulate(5_000, 5_000, 3, 0.3);
    wait_child(&mut sim, Duration::from_secs(120), "simulate", || {
        s.simulate_log()
    });
    let mut first = s.consumer("first", &[], &[]);
    assert_exact(&s.lake, &s.manifest, || first.log_text());
    assert!(first.terminate().success(), "{}", first.log_text());
    let before = common::committed_readings(&s.lake);
    let mut second = s.consumer("second", &[], &[]);
    std::thread::sleep(Duration::from_secs(3));
    assert!(second.terminate().success(), "{}", second.log_text());
    assert_eq!(
        common::committed_readings(&s.lake),
        before,
        "the restarted consumer read records again: {}",
        second.log_text()
    );
    let (exact, report) = common::verify(&s.lake, &s.manifest);
    assert!(exact, "{report}");
}

/// One lease-holding interval of one process: (shard, from µs, to µs).
type Hold = (String, i64, i64);

/// The lease intervals in a JSON log: from "Took a shard lease" to the next release, loss or
/// finish of that shard, or to `end_us` (the process was killed or stopped).
fn holds(log: &str, end_us: i64) -> Vec<Hold> {
    let mut open: std::collections::HashMap<String, i64> = std::collections::HashMap::new();
    let mut out = Vec::new();
    for line in log.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(ts), Some(msg), Some(shard)) = (
            v["timestamp"].as_str(),
            v["fields"]["message"].as_str(),
            v["fields"]["shard"].as_str(),
        ) else {
            continue;
        };
        let t = sensorlake_core::time::parse_rfc3339(ts).expect("an RFC 3339 log timestamp");
        if msg.starts_with("Took a shard lease") {
            open.entry(shard.to_owned()).or_insert(t);
        } else if (msg.starts_with("Released a shard lease")
            || msg.starts_with("Lost a shard lease")
            || msg.starts_with("Shard finished"))
            && let Some(from) = open.remove(shard)
        {
            out.push((shard.to_owned(), from, t));
        }
    }
    out.extend(open.into_iter().map(|(s, from)| (s, from, end_us)));
    out
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
}

/// Two consumers share a 4-shard stream through a DynamoDB lease table (moto_server): the
/// second one gets its share by hand-off, takes over the first one's shards when that is
/// SIGKILLed, and shares again when it comes back. No shard is ever held by both at once
/// (from their logs), and the lake is exact.
#[test]
fn two_consumers_with_leases_never_read_one_shard_together() {
    let s = KinesisScenario::new(4);
    let moto = sensorlake_testkit::Moto::start("unused");
    let ddb = moto.endpoint.clone();
    let common_env = |worker: &'static str| {
        vec![
            ("AWS_ENDPOINT_URL_DYNAMODB", ddb.clone()),
            ("SENSORLAKE_KINESIS__LEASE_DURATION_SECS", "3".to_owned()),
            ("SENSORLAKE_KINESIS__WORKER_ID", worker.to_owned()),
        ]
    };
    let args = ["--lease-table", "sensorlake-leases", "--log-format", "json"];
    let start = |name: &str, worker: &'static str| {
        let env = common_env(worker);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        s.consumer(name, &args, &env)
    };
    let mut sim = s.simulate(30_000, 2_000, 11, 0.3);
    let mut a = start("a1", "a");
    std::thread::sleep(Duration::from_secs(3));
    let mut b = start("b", "b");
    std::thread::sleep(Duration::from_secs(5));
    let b_log = b.log_text();
    assert!(
        b_log.contains("Took a shard lease"),
        "the second consumer got no shard by hand-off: {b_log}\nfirst: {}",
        a.log_text()
    );
    a.kill9();
    let a1_end = now_us();
    let a1_log = a.log_text();
    std::thread::sleep(Duration::from_secs(6));
    let mut a = start("a2", "a");
    wait_child(&mut sim, Duration::from_secs(300), "simulate", || {
        s.simulate_log()
    });
    assert_exact(&s.lake, &s.manifest, || {
        format!("a:\n{}\nb:\n{}", a.log_text(), b.log_text())
    });
    assert!(a.terminate().success(), "{}", a.log_text());
    let a2_end = now_us();
    assert!(b.terminate().success(), "{}", b.log_text());
    let b_end = now_us();

    let a2_log = std::fs::read_to_string(s.dir.path().join("a2.log")).unwrap();
    let b_log = b.log_text();
    let mut all: Vec<(&str, Hold)> = Vec::new();
    all.extend(holds(&a1_log, a1_end).into_iter().map(|h| ("a1", h)));
    all.extend(holds(&a2_log, a2_end).into_iter().map(|h| ("a2", h)));
    all.extend(holds(&b_log, b_end).into_iter().map(|h| ("b", h)));
    assert!(
        all.iter().any(|(p, _)| *p == "b") && all.iter().any(|(p, _)| *p == "a1"),
        "both consumers held leases: {all:?}"
    );
    for (i, (p, (shard, from, to))) in all.iter().enumerate() {
        for (q, (shard2, from2, to2)) in &all[i + 1..] {
            if shard == shard2 && p != q {
                assert!(
                    to <= from2 || to2 <= from,
                    "{p} and {q} both held {shard}: {from}..{to} and {from2}..{to2}"
                );
            }
        }
    }
    assert!(
        all.iter()
            .any(|(p, (_, from, _))| *p == "b" && *from > a1_end),
        "b did not take over a shard of the killed consumer: {all:?}"
    );
}

/// Below the SDK, a proxy throttles 30% of GetRecords calls, expires 10% of the iterators and
/// fails 10% of the simulator's PutRecords entries: nothing is lost or duplicated, and no shard
/// is polled faster than the service's 5 calls per second.
#[test]
fn throttling_expired_iterators_and_failed_puts_lose_nothing() {
    let s = KinesisScenario::new(2);
    let proxy = KinesisFaultProxy::start(s.server.port(), 5);
    let f = proxy.faults();
    f.throttle_pct
        .store(30, std::sync::atomic::Ordering::Relaxed);
    f.expire_pct.store(10, std::sync::atomic::Ordering::Relaxed);
    f.put_fail_pct
        .store(10, std::sync::atomic::Ordering::Relaxed);
    let endpoint = proxy.endpoint();
    let env = [("AWS_ENDPOINT_URL_KINESIS", endpoint.as_str())];
    let started = Instant::now();
    let mut sim = s.simulate_with(10_000, 2_000, 9, 0.3, &env);
    let mut consumer = s.consumer("consumer", &[], &env);
    wait_child(&mut sim, Duration::from_secs(120), "simulate", || {
        s.simulate_log()
    });
    assert_exact(&s.lake, &s.manifest, || consumer.log_text());
    assert!(consumer.terminate().success(), "{}", consumer.log_text());
    let secs = started.elapsed().as_secs_f64();
    assert!(
        f.throttled_total() > 0 && f.expired_total() > 0,
        "no faults injected"
    );
    assert!(
        f.put_entries_failed_total() > 0,
        "no PutRecords entry failed"
    );
    for (shard, calls) in f.get_records_by_shard() {
        let rate = calls as f64 / secs;
        assert!(
            rate <= 5.0,
            "{shard} was polled {calls} times in {secs:.1} s ({rate:.1}/s): over the 5 calls/s limit"
        );
    }
}

/// A stream that does not exist stops `run` at once with an error that names the stream and
/// says what to check.
#[test]
fn a_missing_stream_is_a_clear_error() {
    let s = KinesisScenario::new(1);
    let mut cmd = bin();
    cmd.args([
        "run",
        "--kinesis",
        "no-such-stream",
        "--lake",
        s.lake.to_str().unwrap(),
    ]);
    for (k, v) in s.env() {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot list the shards of Kinesis stream \"no-such-stream\"")
            && err.contains("ResourceNotFoundException")
            && err.contains("AWS_ENDPOINT_URL_KINESIS"),
        "{err}"
    );
}

/// A shard reader that fails with an error waiting cannot fix (here an injected
/// AccessDeniedException) is reaped and the shard opened again from its checkpoint at a later
/// round, while the other shards go on; the consumer keeps running and ends exact. (Reaping
/// once awaited a reader's handle twice, which panicked and left the shard unread.)
#[test]
fn a_failed_shard_reader_is_restarted_from_the_checkpoint() {
    let s = KinesisScenario::new(2);
    let proxy = KinesisFaultProxy::start(s.server.port(), 3);
    let endpoint = proxy.endpoint();
    let env = [("AWS_ENDPOINT_URL_KINESIS", endpoint.as_str())];
    let mut sim = s.simulate(8_000, 2_000, 4, 0.3);
    let mut consumer = s.consumer("consumer", &[], &env);
    std::thread::sleep(Duration::from_millis(1500));
    proxy
        .faults()
        .deny_next
        .store(2, std::sync::atomic::Ordering::Relaxed);
    wait_child(&mut sim, Duration::from_secs(120), "simulate", || {
        s.simulate_log()
    });
    assert_exact(&s.lake, &s.manifest, || consumer.log_text());
    let log = consumer.log_text();
    assert!(
        log.contains("Shard reader failed") && log.contains("AccessDeniedException"),
        "no reader failed: {log}"
    );
    assert!(
        log.matches("Reading shard").count() >= 3,
        "the failed shard was not read again: {log}"
    );
    assert!(consumer.terminate().success(), "{log}");
}
