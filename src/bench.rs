//! `sensorlake bench`: the end-to-end load benchmark.
//!
//! It starts a broker on a free loopback port (Mosquitto from `PATH` with the project's
//! lossless settings, or the embedded rumqttd), then runs two phases against it with the
//! simulator publishing `--readings` telemetry v1 messages at full rate, QoS 1:
//!
//! 1. **Ceiling**: a null subscriber (MQTT 5, acknowledges at once, stores nothing) — how
//!    fast this broker delivers on this machine right now.
//! 2. **Pipeline**: `sensorlake run` as a child process (this same binary) into a fresh lake,
//!    timed from the first publish to the commit that holds the last reading.
//!
//! It reports both rates, the pipeline's CPU seconds per million readings and peak RSS (from
//! `/proc`), the lake's bytes against the JSON bytes published, and the latency from a
//! reading's `ts` (set by the simulator when it publishes) to the commit point that made it
//! durable (the commit record's `created_at`; files become visible a few fsyncs later).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use sensorlake_ingest::mqtt::BrokerAddr;
use sensorlake_simulator::{FleetSpec, SimStats, SimulateOptions};
use serde::Serialize;
use tracing::info;

/// The Mosquitto settings that make a persistent session lossless for sensorlake (see the
/// README). The benchmark and the integration tests start Mosquitto with exactly these, plus
/// a listener and a persistence location.
pub const MOSQUITTO_SETTINGS: &str = "\
allow_anonymous true
persistence true
autosave_interval 1
autosave_on_changes false
max_queued_messages 0
max_inflight_messages 0
message_size_limit 1048000
";

/// Where Debian (and most distributions) install the Mosquitto broker, if it is installed.
pub fn mosquitto_binary() -> Option<PathBuf> {
    [
        "/usr/sbin/mosquitto",
        "/usr/bin/mosquitto",
        "/usr/local/sbin/mosquitto",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

/// A process's peak resident memory so far (`VmHWM` in `/proc/<pid>/status`), in bytes.
///
/// # Errors
/// When the process is gone or `/proc` cannot be read.
pub fn peak_rss_bytes(pid: u32) -> std::io::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    Ok(status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024))
}

/// `sensorlake bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Which broker to start.
    #[arg(long, value_enum, default_value_t = BrokerKind::Mosquitto)]
    pub broker: BrokerKind,
    /// Readings to publish in each phase.
    #[arg(long, default_value_t = 200_000)]
    pub readings: u64,
    /// Devices in the fleet.
    #[arg(long, default_value_t = 500)]
    pub devices: usize,
    /// Publish at this many readings per second instead of as fast as the broker takes them
    /// (for latency: `--rate 10000 --max-age-ms 1000`).
    #[arg(long)]
    pub rate: Option<f64>,
    /// The pipeline's flush age limit (`flush.max_age_ms`): how long a reading may wait for
    /// its commit when traffic is too slow to fill a flush.
    #[arg(long, default_value_t = 1000)]
    pub max_age_ms: u64,
    /// Share of invalid messages, 0.0-1.0 (every kind the spec names except oversize ones):
    /// 1.0 measures a fleet sending nothing but bad input.
    #[arg(long, default_value_t = 0.01)]
    pub bad_ratio: f64,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// The broker the benchmark runs against.
#[derive(Debug, Clone, Copy, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BrokerKind {
    /// Mosquitto from PATH (Debian package `mosquitto`).
    Mosquitto,
    /// The embedded rumqttd (window fixed at 100 per connection).
    Embedded,
}

/// What one benchmark run measured.
#[derive(Debug, Serialize)]
pub struct BenchReport {
    /// The broker.
    pub broker: BrokerKind,
    /// Readings per phase.
    pub readings: u64,
    /// The publish rate asked for; `None`: as fast as the broker takes them.
    pub rate: Option<f64>,
    /// Share of invalid messages published.
    pub bad_ratio: f64,
    /// The pipeline's flush age limit, ms.
    pub max_age_ms: u64,
    /// JSON payload bytes published per phase.
    pub json_bytes: u64,
    /// The null subscriber's rate: the ceiling.
    pub ceiling_readings_per_sec: f64,
    /// The null subscriber's own CPU seconds per million readings: what the MQTT client costs
    /// with nothing behind it.
    pub ceiling_cpu_seconds_per_million: f64,
    /// The pipeline's rate, first publish to last commit.
    pub pipeline_readings_per_sec: f64,
    /// Pipeline rate / ceiling.
    pub share_of_ceiling: f64,
    /// The pipeline process's user+system CPU seconds per million readings.
    pub cpu_seconds_per_million: f64,
    /// The pipeline process's peak resident memory, MiB.
    pub peak_rss_mib: f64,
    /// Parquet bytes written (telemetry + dead letters).
    pub lake_bytes: u64,
    /// lake_bytes / json_bytes.
    pub lake_to_json_ratio: f64,
    /// Latency from `ts` to the commit point, milliseconds: p50, p90, p99, max.
    pub latency_ms: [f64; 4],
    /// Commits made.
    pub commits: usize,
}

/// Runs the benchmark.
///
/// # Errors
/// When the broker or the pipeline cannot start, or the pipeline does not commit everything
/// within five minutes.
pub async fn run(a: BenchArgs) -> anyhow::Result<ExitCode> {
    let work = std::env::temp_dir().join(format!("sensorlake-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
    let result = run_in(&a, &work).await;
    let _ = std::fs::remove_dir_all(&work);
    let report = result?;
    print_report(&report);
    if let Some(path) = &a.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("failed to write {}", path.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn run_in(a: &BenchArgs, work: &Path) -> anyhow::Result<BenchReport> {
    let (broker, _guard) = start_broker(a.broker, work).await?;
    info!(%broker, kind = ?a.broker, "Broker started");

    let ceiling = null_subscriber(&broker, a).await?;
    info!(
        readings_per_sec = ceiling.readings_per_sec as u64,
        cpu_seconds_per_million = ceiling.cpu_seconds_per_million,
        "Null subscriber done"
    );

    let lake = work.join("lake");
    let child = PipelineChild::start(&broker, &lake, a.max_age_ms).await?;
    let stats = Arc::new(SimStats::default());
    let started = Instant::now();
    let manifest =
        crate::commands::run_simulation(sim_options(&broker, a, 2), stats.clone()).await?;
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut commits;
    loop {
        let records = sensorlake_sink::read_commit_records(&lake).unwrap_or_default();
        commits = records.len();
        let done: u64 = records.iter().map(|r| r.counts.received).sum();
        if done >= manifest.messages {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "the pipeline committed {done} of {} readings within 5 minutes",
                manifest.messages
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let (cpu, rss) = child.usage()?;
    child.stop();

    let json_bytes = stats.published_bytes.load(Ordering::Relaxed);
    let lake_bytes = dir_bytes(&lake.join("telemetry")) + dir_bytes(&lake.join("dead_letter"));
    let mut latencies = commit_latencies_ms(&lake)?;
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    let rate = manifest.messages as f64 / elapsed;
    Ok(BenchReport {
        broker: a.broker,
        readings: manifest.messages,
        rate: a.rate,
        bad_ratio: a.bad_ratio,
        max_age_ms: a.max_age_ms,
        json_bytes,
        ceiling_readings_per_sec: ceiling.readings_per_sec,
        ceiling_cpu_seconds_per_million: ceiling.cpu_seconds_per_million,
        pipeline_readings_per_sec: rate,
        share_of_ceiling: rate / ceiling.readings_per_sec,
        cpu_seconds_per_million: cpu / (manifest.messages as f64 / 1e6),
        peak_rss_mib: rss as f64 / (1 << 20) as f64,
        lake_bytes,
        lake_to_json_ratio: lake_bytes as f64 / json_bytes.max(1) as f64,
        latency_ms: [pct(0.5), pct(0.9), pct(0.99), pct(1.0)],
        commits,
    })
}

fn sim_options(broker: &BrokerAddr, a: &BenchArgs, seed: u64) -> SimulateOptions {
    SimulateOptions {
        mqtt_host: broker.host.clone(),
        mqtt_port: broker.port,
        client_id: format!("sensorlake-bench-sim-{seed}"),
        fleet: FleetSpec {
            devices: a.devices.max(1),
            seed,
            bad_ratio: a.bad_ratio.clamp(0.0, 1.0),
            allow_oversize: false,
            ..FleetSpec::default()
        },
        readings: Some(a.readings),
        duration: None,
        rate: a.rate,
        qos: 1,
        ..SimulateOptions::default()
    }
}

/// What the null subscriber measured.
struct Ceiling {
    readings_per_sec: f64,
    /// CPU seconds of the subscriber's thread per million readings.
    cpu_seconds_per_million: f64,
}

/// Publishes `readings` to a subscriber that acknowledges at once and stores nothing, and
/// returns the delivered rate and the subscriber's own CPU cost.
///
/// The subscriber runs on its own thread with a one-thread runtime, as `sensorlake run` does,
/// so that thread's CPU time is what the MQTT client (rumqttc) costs with no pipeline behind
/// it: the floor under the pipeline's CPU per reading.
async fn null_subscriber(broker: &BrokerAddr, a: &BenchArgs) -> anyhow::Result<Ceiling> {
    let mut o = rumqttc::v5::MqttOptions::new("sensorlake-bench-null", &broker.host, broker.port);
    o.set_receive_maximum(Some(u16::MAX))
        .set_max_packet_size(Some(1 << 20));
    let target = a.readings;
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("null-subscriber".into())
        .spawn(move || {
            let result = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(subscribe_and_count(o, target, ready_tx)));
            let _ = done_tx.send(result);
        })
        .context("cannot start the null subscriber's thread")?;
    ready_rx
        .await
        .context("the null subscriber stopped before subscribing")?;
    let started = Instant::now();
    let manifest =
        crate::commands::run_simulation(sim_options(broker, a, 1), Arc::new(SimStats::default()))
            .await?;
    let (done, cpu) = tokio::time::timeout(Duration::from_secs(300), done_rx)
        .await
        .context("the null subscriber did not receive everything within 5 minutes")?
        .context("the null subscriber's thread ended without a result")??;
    Ok(Ceiling {
        readings_per_sec: manifest.messages as f64 / (done - started).as_secs_f64(),
        cpu_seconds_per_million: cpu / (manifest.messages as f64 / 1e6),
    })
}

/// The null subscriber's thread: subscribes, says so on `ready`, then counts `target`
/// publishes (rumqttc acknowledges each at once). Returns when the last arrived and the CPU
/// seconds the thread spent after subscribing.
async fn subscribe_and_count(
    options: rumqttc::v5::MqttOptions,
    target: u64,
    ready: tokio::sync::oneshot::Sender<()>,
) -> anyhow::Result<(Instant, f64)> {
    use rumqttc::v5::{Event, Incoming};
    let (client, mut el) = rumqttc::v5::AsyncClient::new(options, 1024);
    client
        .subscribe("telemetry/#", rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
        .await?;
    loop {
        if let Event::Incoming(Incoming::SubAck(_)) = el.poll().await? {
            break;
        }
    }
    let cpu_before = thread_cpu_seconds()?;
    let _ = ready.send(());
    let mut received = 0;
    while received < target {
        match el.poll().await {
            Ok(Event::Incoming(Incoming::Publish(_))) => received += 1,
            Ok(_) => {}
            Err(e) => bail!("the null subscriber lost its connection: {e}"),
        }
    }
    let done = Instant::now();
    let cpu = thread_cpu_seconds()? - cpu_before;
    let _ = client.disconnect().await;
    Ok((done, cpu))
}

/// The calling thread's user + system CPU time, from `/proc/thread-self/stat` (clock ticks,
/// assumed 100 per second as on every Linux this runs on; 10 ms resolution).
fn thread_cpu_seconds() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/thread-self/stat")
        .context("cannot read /proc/thread-self/stat (the benchmark needs Linux)")?;
    cpu_seconds_from_stat(&stat).context("unexpected format of /proc/thread-self/stat")
}

/// utime + stime (fields 14 and 15) of a `/proc/.../stat` line, in seconds at 100 ticks/s.
/// The command name (field 2) may hold spaces, so fields are counted after its `)`.
fn cpu_seconds_from_stat(stat: &str) -> Option<f64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

/// A broker process (or nothing, for the embedded one, which lives until the process exits).
struct BrokerGuard(Option<Child>);

impl Drop for BrokerGuard {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

async fn start_broker(kind: BrokerKind, work: &Path) -> anyhow::Result<(BrokerAddr, BrokerGuard)> {
    match kind {
        #[cfg(feature = "demo")]
        BrokerKind::Embedded => {
            let addr = crate::demo::start_broker()?;
            Ok((
                BrokerAddr {
                    host: addr.ip().to_string(),
                    port: addr.port(),
                    tls: false,
                },
                BrokerGuard(None),
            ))
        }
        #[cfg(not(feature = "demo"))]
        BrokerKind::Embedded => bail!("this build has no embedded broker (feature `demo`)"),
        BrokerKind::Mosquitto => {
            let bin = mosquitto_binary().context(
                "mosquitto is not installed: `apt-get install mosquitto`, or use --broker embedded",
            )?;
            let port = std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port();
            let dir = work.join("mosquitto");
            std::fs::create_dir_all(&dir)?;
            // Mosquitto started as root drops to its own user: let it write its persistence.
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))?;
            }
            let conf = dir.join("mosquitto.conf");
            std::fs::write(
                &conf,
                format!(
                    "listener {port} 127.0.0.1\npersistence_location {}/\n{MOSQUITTO_SETTINGS}",
                    dir.display()
                ),
            )?;
            let child = Command::new(bin)
                .arg("-c")
                .arg(&conf)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("failed to start mosquitto")?;
            let guard = BrokerGuard(Some(child));
            let started = Instant::now();
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                if started.elapsed() > Duration::from_secs(10) {
                    bail!("mosquitto did not listen on 127.0.0.1:{port} within 10 s");
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Ok((
                BrokerAddr {
                    host: "127.0.0.1".into(),
                    port,
                    tls: false,
                },
                guard,
            ))
        }
    }
}

/// `sensorlake run` as a child process, so its CPU time and memory are its own.
struct PipelineChild(Child);

impl PipelineChild {
    async fn start(broker: &BrokerAddr, lake: &Path, max_age_ms: u64) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("cannot find this executable")?;
        let mut child = Command::new(exe)
            .args(["run", "--mqtt", &broker.to_string(), "--lake"])
            .arg(lake)
            .env("SENSORLAKE_FLUSH__MAX_AGE_MS", max_age_ms.to_string())
            .env("SENSORLAKE_MQTT__CLIENT_ID", "sensorlake-bench")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("failed to start the pipeline")?;
        let stderr = child.stderr.take().context("no stderr")?;
        let subscribed = Arc::new(AtomicBool::new(false));
        let flag = subscribed.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("Subscribed to MQTT topics") {
                    flag.store(true, Ordering::Release);
                }
            }
        });
        let started = Instant::now();
        while !subscribed.load(Ordering::Acquire) {
            if started.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                bail!("the pipeline did not subscribe within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(Self(child))
    }

    /// CPU seconds (user + system) and peak RSS bytes so far, from /proc.
    fn usage(&self) -> anyhow::Result<(f64, u64)> {
        let pid = self.0.id();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: f64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
            + fields
                .get(12)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0);
        // Linux reports in USER_HZ, 100 on every mainstream architecture.
        let cpu = ticks / 100.0;
        Ok((cpu, peak_rss_bytes(pid)?))
    }

    fn stop(mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.0.id().to_string())
            .status();
        let _ = self.0.wait();
    }
}

fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            Ok(_) => e.metadata().map(|m| m.len()).unwrap_or(0),
            Err(_) => 0,
        })
        .sum()
}

/// For every telemetry row, milliseconds from its `ts` to its commit record's `created_at`.
fn commit_latencies_ms(lake: &Path) -> anyhow::Result<Vec<f64>> {
    use arrow::array::{Array, TimestampMicrosecondArray};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let mut out = Vec::new();
    for record in sensorlake_sink::read_commit_records(lake)? {
        let committed_us = sensorlake_core::time::parse_rfc3339(&record.created_at)
            .context("a commit record's created_at is not RFC 3339")?;
        for f in record
            .files
            .iter()
            .filter(|f| f.entry().table == sensorlake_sink::Table::Telemetry)
        {
            let path = lake.join(&f.entry().path);
            let file = std::fs::File::open(&path)
                .with_context(|| format!("cannot open {}", path.display()))?;
            let builder = ParquetRecordBatchReaderBuilder::try_new(file)?;
            let mask = parquet::arrow::ProjectionMask::columns(builder.parquet_schema(), ["ts"]);
            for batch in builder.with_projection(mask).build()? {
                let batch = batch?;
                let ts = batch
                    .column(0)
                    .as_any()
                    .downcast_ref::<TimestampMicrosecondArray>()
                    .context("ts is not a µs timestamp")?;
                out.extend((0..ts.len()).map(|i| (committed_us - ts.value(i)) as f64 / 1000.0));
            }
        }
    }
    Ok(out)
}

fn print_report(r: &BenchReport) {
    let rate = r
        .rate
        .map_or_else(|| "full rate".to_owned(), |x| format!("{x:.0} readings/s"));
    println!(
        "sensorlake bench ({:?} broker, {} readings, {}% bad, QoS 1, {rate}, flush age {} ms)",
        r.broker,
        r.readings,
        r.bad_ratio * 100.0,
        r.max_age_ms
    );
    println!(
        "  null subscriber (ceiling)   {:>12.0} readings/s",
        r.ceiling_readings_per_sec
    );
    println!(
        "  null subscriber CPU         {:>12.2} s per million readings",
        r.ceiling_cpu_seconds_per_million
    );
    println!(
        "  sensorlake pipeline         {:>12.0} readings/s  ({:.0}% of the ceiling)",
        r.pipeline_readings_per_sec,
        r.share_of_ceiling * 100.0
    );
    println!(
        "  pipeline CPU                {:>12.2} s per million readings",
        r.cpu_seconds_per_million
    );
    println!("  pipeline peak RSS           {:>12.1} MiB", r.peak_rss_mib);
    println!(
        "  lake / JSON bytes           {:>12.3}  ({} / {} bytes)",
        r.lake_to_json_ratio, r.lake_bytes, r.json_bytes
    );
    println!(
        "  ts -> commit latency        p50 {:.0} ms, p90 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        r.latency_ms[0], r.latency_ms[1], r.latency_ms[2], r.latency_ms[3]
    );
    println!("  commits                     {:>12}", r.commits);
}

#[cfg(test)]
mod tests {
    use super::cpu_seconds_from_stat;

    #[test]
    fn reads_user_and_system_ticks_after_a_command_name_with_spaces() {
        let stat = "4242 (null sub) R 1 2 3 4 5 6 7 8 9 10 250 75 0 0 20 0 1 0";
        assert_eq!(cpu_seconds_from_stat(stat), Some(3.25));
        assert_eq!(cpu_seconds_from_stat("garbage"), None);
    }
}
