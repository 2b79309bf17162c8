//! The commands of the `sensorlake` binary. Only this module (and `main`) uses `anyhow`.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use sensorlake_ingest::MqttProtocol;
use sensorlake_simulator::{FleetSpec, KinesisOptions, Manifest, SimStats, SimulateOptions};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::config::Config;
use crate::pipeline::{self, PipelineStats};

/// sensorlake: MQTT telemetry in, validated and enriched Parquet out.
#[derive(Debug, Parser)]
#[command(name = "sensorlake", version, about, propagate_version = true)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Log output format.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the pipeline: subscribe, validate, enrich, write Parquet, acknowledge after commit.
    Run(RunArgs),
    /// Publish simulated telemetry v1 to an MQTT broker or a Kinesis stream and write a manifest
    /// of what was sent.
    Simulate(SimulateArgs),
    /// Check that a lake holds exactly what a simulator manifest says was sent.
    Verify(VerifyArgs),
    /// Merge the small files of closed partitions into large files sorted by device and time.
    Compact(CompactArgs),
    /// Embedded broker + pipeline + simulator + verify, with no setup at all.
    #[cfg(feature = "demo")]
    Demo(DemoArgs),
    /// End-to-end load benchmark: a broker, a null subscriber as the ceiling, then the pipeline.
    Bench(crate::bench::BenchArgs),
    /// Configuration tools.
    #[command(subcommand)]
    Config(ConfigCommand),
}

/// `sensorlake run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// TOML configuration file (every key optional; env SENSORLAKE_<SECTION>__<KEY> overrides).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Broker URL, mqtt://HOST:PORT, or mqtts://HOST:PORT for TLS set up in [mqtt.tls]
    /// (overrides mqtt.url).
    #[arg(long, conflicts_with = "kinesis")]
    pub mqtt: Option<String>,
    /// Read this Kinesis stream (name or ARN) instead of MQTT (overrides kinesis.stream).
    /// Region, credentials and endpoint come from the AWS environment (AWS_REGION, AWS_PROFILE,
    /// AWS_ENDPOINT_URL_KINESIS, ...).
    #[arg(long, value_name = "STREAM_NAME_OR_ARN")]
    pub kinesis: Option<String>,
    /// Share the stream's shards with other consumers through this DynamoDB lease table
    /// (overrides kinesis.lease_table).
    #[arg(long, requires = "kinesis")]
    pub lease_table: Option<String>,
    /// Topic filter to subscribe to; repeat for several (overrides mqtt.topics).
    #[arg(long = "topic")]
    pub topics: Vec<String>,
    /// MQTT protocol version (overrides mqtt.protocol).
    #[arg(long, value_enum)]
    pub protocol: Option<ProtocolArg>,
    /// Lake folder, or file://, s3://, az:// or gs:// URL (overrides lake.path).
    #[arg(long)]
    pub lake: Option<PathBuf>,
    /// Writer id of this instance (overrides lake.writer_id).
    #[arg(long)]
    pub writer_id: Option<String>,
    /// Device registry CSV (overrides registry.path).
    #[arg(long)]
    pub registry: Option<PathBuf>,
    /// Serve Prometheus metrics here, e.g. 127.0.0.1:9898 (overrides metrics.addr).
    #[arg(long)]
    pub metrics_addr: Option<SocketAddr>,
}

/// MQTT protocol on the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ProtocolArg {
    /// MQTT 3.1.1.
    V4,
    /// MQTT 5.
    V5,
}

/// `sensorlake simulate`.
#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// Broker URL, mqtt://HOST:PORT (plain MQTT only).
    #[arg(long, default_value = "mqtt://127.0.0.1:1883")]
    pub mqtt: String,
    /// Publish to this Kinesis stream (name or ARN) instead of MQTT, with PutRecords; region,
    /// credentials and endpoint come from the AWS environment (AWS_REGION, AWS_PROFILE,
    /// AWS_ENDPOINT_URL_KINESIS, ...).
    #[arg(long, value_name = "STREAM_NAME_OR_ARN", conflicts_with_all = ["mqtt", "qos", "client_id"])]
    pub kinesis: Option<String>,
    /// With --kinesis: share of readings sent inside KPL aggregates, 0.0-1.0.
    #[arg(long, default_value_t = 0.0, requires = "kinesis")]
    pub kpl_share: f64,
    /// With --kinesis: readings per KPL aggregate at most.
    #[arg(long, default_value_t = 100, requires = "kinesis")]
    pub kpl_max_records: usize,
    /// Number of devices in the fleet.
    #[arg(long, default_value_t = 500)]
    pub devices: usize,
    /// Readings to publish (default 10,000 unless --duration is given).
    #[arg(long)]
    pub readings: Option<u64>,
    /// Publish for this long instead, e.g. 30s, 5m.
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Messages per second; omit for as fast as possible.
    #[arg(long)]
    pub rate: Option<f64>,
    /// QoS 0 or 1 (MQTT).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    pub qos: u8,
    /// Share of messages that are invalid, 0.0-1.0, cycling through every kind the spec names.
    #[arg(long, default_value_t = 0.0)]
    pub bad_ratio: f64,
    /// Random seed; the same seed publishes the same messages.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Write the manifest of what the broker (or stream) acknowledged here.
    #[arg(long, default_value = "manifest.json")]
    pub manifest: PathBuf,
    /// Write the fleet's device registry CSV here.
    #[arg(long)]
    pub registry_out: Option<PathBuf>,
    /// MQTT client id of the simulator (MQTT).
    #[arg(long, default_value = "sensorlake-simulator")]
    pub client_id: String,
}

/// `sensorlake verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The lake: a folder, or file://, s3://, az:// or gs:// URL (environment as for `run`).
    #[arg(long)]
    pub lake: PathBuf,
    /// The manifest written by `sensorlake simulate`.
    #[arg(long)]
    pub manifest: PathBuf,
    /// Configuration (for custom device types).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `sensorlake compact`.
#[derive(Debug, Args)]
pub struct CompactArgs {
    /// The lake: a folder, or file://, s3://, az:// or gs:// URL (overrides lake.path;
    /// environment as for `run`).
    #[arg(long)]
    pub lake: Option<PathBuf>,
    /// Configuration: its device types make the schema files must have, its [lake] settings
    /// (zstd_level, row_group_rows, fsync) how outputs are written.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Compact a partition only once its hour (telemetry) or day (dead letters) ended this
    /// long ago, e.g. 30m, 2h, 1d.
    #[arg(long, default_value = "2h", value_parser = parse_duration)]
    pub older_than: Duration,
    /// Merge files smaller than this into files of about this size, e.g. 64MiB, 1GiB.
    #[arg(long, default_value = "128MiB", value_parser = parse_size)]
    pub target_size: u64,
    /// The most compressed input one merge holds in memory; a bigger partition is merged in
    /// groups of this size.
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    pub merge_memory: u64,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `sensorlake demo`.
#[cfg(feature = "demo")]
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Folder for the demo's lake, manifest and registry (replaced on each run).
    #[arg(long, default_value = "sensorlake-demo")]
    pub lake: PathBuf,
    /// Readings to send.
    #[arg(long, default_value_t = 200_000)]
    pub readings: u64,
    /// Devices in the fleet.
    #[arg(long, default_value_t = 500)]
    pub devices: usize,
    /// Share of invalid messages.
    #[arg(long, default_value_t = 0.01)]
    pub bad_ratio: f64,
    /// Random seed.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

/// `sensorlake config ...`.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate a configuration and print the effective result (secrets left out).
    Check {
        /// The file; without it, the defaults plus environment overrides are checked.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

/// A usage or configuration error: exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// The exit code for an error: 2 for usage and configuration errors, else 1.
pub fn exit_code_for(e: &anyhow::Error) -> u8 {
    let config = e.chain().any(|c| {
        c.is::<UsageError>()
            || c.is::<crate::config::ConfigError>()
            || matches!(
                c.downcast_ref::<pipeline::PipelineError>(),
                Some(pipeline::PipelineError::Config(_) | pipeline::PipelineError::Source(_))
            )
    });
    if config { 2 } else { 1 }
}

/// Installs the tracing subscriber: `RUST_LOG` filters (default `info`; the embedded demo
/// broker's own log is off, since it reports every client disconnect as an error), stderr output.
pub fn init_logging(cli: &Cli) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,rumqttd=off,rumqttc=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    match cli.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Runs the command.
///
/// # Errors
/// Whatever the command failed with, with context.
pub async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run(a) => Box::pin(run(a)).await,
        Command::Simulate(a) => simulate(a).await,
        // Blocking (file or object-store reads on the sink's own runtime): off the async side.
        Command::Verify(a) => tokio::task::spawn_blocking(move || verify(a)).await?,
        // Blocking file and object-store I/O and CPU work: off the async side.
        Command::Compact(a) => tokio::task::spawn_blocking(move || compact(a)).await?,
        #[cfg(feature = "demo")]
        Command::Demo(a) => crate::demo::run(a).await,
        Command::Bench(a) => crate::bench::run(a).await,
        Command::Config(ConfigCommand::Check { config }) => config_check(config),
    }
}

fn load_config(path: Option<&std::path::Path>) -> anyhow::Result<Config> {
    Ok(Config::load(path, std::env::vars())?)
}

async fn run(a: RunArgs) -> anyhow::Result<ExitCode> {
    let mut config = load_config(a.config.as_deref())?;
    if let Some(u) = a.mqtt {
        config.mqtt.url = u;
    }
    if let Some(k) = a.kinesis {
        config.kinesis.stream = Some(k);
    }
    if let Some(t) = a.lease_table {
        config.kinesis.lease_table = Some(t);
    }
    if !a.topics.is_empty() {
        config.mqtt.topics = a.topics;
    }
    if let Some(p) = a.protocol {
        config.mqtt.protocol = match p {
            ProtocolArg::V4 => MqttProtocol::V4,
            ProtocolArg::V5 => MqttProtocol::V5,
        };
    }
    if let Some(l) = a.lake {
        config.lake.path = l;
    }
    if let Some(w) = a.writer_id {
        config.lake.writer_id = w;
    }
    if let Some(r) = a.registry {
        config.registry.path = Some(r);
    }
    if let Some(m) = a.metrics_addr {
        config.metrics.addr = Some(m);
    }
    config.validate()?;
    if let Some(addr) = config.metrics.addr {
        crate::telemetry::install(addr).map_err(|e| anyhow::anyhow!(e))?;
        info!(%addr, "Serving Prometheus metrics at /metrics");
    }
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone());
    let stats = Arc::new(PipelineStats::default());
    Box::pin(pipeline::run(config, shutdown, stats)).await?;
    Ok(ExitCode::SUCCESS)
}

/// Cancels `token` on SIGINT or SIGTERM.
pub fn spawn_signal_handler(token: CancellationToken) {
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) else {
                tracing::warn!("Cannot install signal handlers; stop with SIGKILL");
                return;
            };
            tokio::select! {
                _ = term.recv() => info!("SIGTERM received"),
                _ = int.recv() => info!("SIGINT received"),
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
        token.cancel();
    });
}

/// Parses `500ms`, `30s`, `5m`, `2h`, `1d` or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| (&s[..i], &s[i..]));
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration like 500ms, 30s, 5m, 2h or 1d"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86_400.0,
        _ => {
            return Err(format!(
                "`{s}`: unknown unit `{unit}` (use ms, s, m, h or d)"
            ));
        }
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("`{s}` is not a valid duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses a size: plain bytes, or a number with `B`, `KiB`, `MiB`, `GiB`, `TiB` (powers of
/// 1024) or `KB`, `MB`, `GB`, `TB` (powers of 1000), e.g. `64MiB`, `1.5GiB`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = (&t[..split], t[split..].trim());
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size like 64MiB, 1GiB or 500MB"))?;
    let factor: u64 = match unit {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        _ => {
            return Err(format!(
                "`{s}`: unknown unit `{unit}` (use B, KiB, MiB, GiB, TiB, KB, MB, GB or TB)"
            ));
        }
    };
    let bytes = n * factor as f64;
    if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 {
        return Err(format!("`{s}` is not a size of at least one byte"));
    }
    Ok(bytes as u64)
}

/// `1.5 MiB`-style text for a byte count.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// A progress bar on a terminal, periodic log lines elsewhere.
pub fn progress_bar(len: Option<u64>, what: &str) -> indicatif::ProgressBar {
    let pb = match len {
        Some(n) => indicatif::ProgressBar::new(n),
        None => indicatif::ProgressBar::new_spinner(),
    };
    if std::io::stderr().is_terminal() {
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg:>10} [{elapsed_precise}] {wide_bar} {pos}/{len} ({per_sec}, eta {eta})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        pb.set_message(what.to_owned());
    } else {
        pb.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    pb
}

async fn simulate(a: SimulateArgs) -> anyhow::Result<ExitCode> {
    let addr = match &a.kinesis {
        Some(_) => None,
        None => Some(
            sensorlake_ingest::mqtt::config::parse_url(&a.mqtt)
                .map_err(|e| UsageError(e.to_string()))?,
        ),
    };
    if addr.as_ref().is_some_and(|a| a.tls) {
        bail!(UsageError(format!(
            "--mqtt {}: the simulator publishes over plain MQTT only; give it a plain \
             listener (mqtt://HOST:PORT) of the broker",
            a.mqtt
        )));
    }
    if !(0.0..=1.0).contains(&a.kpl_share) {
        bail!(UsageError(format!(
            "--kpl-share {} must be between 0 and 1",
            a.kpl_share
        )));
    }
    if a.kpl_max_records == 0 {
        bail!(UsageError("--kpl-max-records must be at least 1".into()));
    }
    if !(0.0..=1.0).contains(&a.bad_ratio) {
        bail!(UsageError(format!(
            "--bad-ratio {} must be between 0 and 1",
            a.bad_ratio
        )));
    }
    if a.readings.is_some() && a.duration.is_some() {
        bail!(UsageError("give --readings or --duration, not both".into()));
    }
    let readings = if a.duration.is_none() {
        Some(a.readings.unwrap_or(10_000))
    } else {
        None
    };
    let spec = FleetSpec {
        devices: a.devices.max(1),
        seed: a.seed,
        bad_ratio: a.bad_ratio,
        ..FleetSpec::default()
    };
    if let Some(path) = &a.registry_out {
        write_registry(&spec, path)?;
    }
    let defaults = SimulateOptions::default();
    let (mqtt_host, mqtt_port) = addr.map_or((defaults.mqtt_host, defaults.mqtt_port), |a| {
        (a.host, a.port)
    });
    let opts = SimulateOptions {
        mqtt_host,
        mqtt_port,
        client_id: a.client_id,
        fleet: spec,
        readings,
        duration: a.duration,
        rate: a.rate,
        qos: a.qos,
        kinesis: a.kinesis.map(|stream| KinesisOptions {
            kpl_share: a.kpl_share,
            kpl_max_records: a.kpl_max_records,
            ..KinesisOptions::new(stream)
        }),
        ..SimulateOptions::default()
    };
    let stats = Arc::new(SimStats::default());
    let manifest = match run_simulation(opts, stats).await {
        Ok(m) => m,
        Err(e) => {
            // What the broker or stream did confirm is still worth verifying against.
            if let Some(m) = e.partial_manifest() {
                m.write(&a.manifest).with_context(|| {
                    format!(
                        "failed to write the partial manifest {}",
                        a.manifest.display()
                    )
                })?;
                tracing::warn!(manifest = %a.manifest.display(), confirmed = m.messages,
                               "Wrote a partial manifest of what was confirmed");
            }
            return Err(e.into());
        }
    };
    manifest
        .write(&a.manifest)
        .with_context(|| format!("failed to write the manifest {}", a.manifest.display()))?;
    info!(messages = manifest.messages, valid = manifest.valid_count(), bad = manifest.bad.len(),
          manifest = %a.manifest.display(), "Simulation finished");
    Ok(ExitCode::SUCCESS)
}

/// Writes the fleet's registry CSV to `path`.
pub fn write_registry(spec: &FleetSpec, path: &std::path::Path) -> anyhow::Result<()> {
    let fleet = sensorlake_simulator::Fleet::new(spec.clone());
    let f = std::fs::File::create(path)
        .with_context(|| format!("failed to create the registry file {}", path.display()))?;
    let mut w = std::io::BufWriter::new(f);
    fleet
        .write_registry_csv(&mut w)
        .with_context(|| format!("failed to write the registry file {}", path.display()))?;
    std::io::Write::flush(&mut w)
        .with_context(|| format!("failed to write the registry file {}", path.display()))?;
    Ok(())
}

/// Runs the simulator with a progress display; Ctrl-C stops it gracefully (the manifest then
/// holds what was confirmed so far).
pub async fn run_simulation(
    opts: SimulateOptions,
    stats: Arc<SimStats>,
) -> Result<Manifest, sensorlake_simulator::SimError> {
    let pb = progress_bar(opts.readings, "published");
    let ticker = {
        let stats = stats.clone();
        let pb = pb.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let mut last_log = Instant::now();
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let sent = stats.published.load(std::sync::atomic::Ordering::Relaxed);
                pb.set_position(sent);
                if pb.is_hidden() && last_log.elapsed() >= Duration::from_secs(5) {
                    last_log = Instant::now();
                    let acked = stats.acked.load(std::sync::atomic::Ordering::Relaxed);
                    info!(
                        published = sent,
                        acked,
                        rate = (sent as f64 / started.elapsed().as_secs_f64()) as u64,
                        "Simulating"
                    );
                }
            }
        })
    };
    let stop = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let result = sensorlake_simulator::simulate_until(opts, stats, stop).await;
    ticker.abort();
    pb.finish_and_clear();
    result
}

fn verify(a: VerifyArgs) -> anyhow::Result<ExitCode> {
    let config = load_config(a.config.as_deref())?;
    let schema = config.validate()?;
    let manifest = Manifest::read(&a.manifest)
        .with_context(|| format!("failed to read the manifest {}", a.manifest.display()))?;
    let reader = sensorlake_sink::LakeReader::open(&a.lake)
        .with_context(|| format!("failed to open the lake {}", a.lake.display()))?;
    let report = sensorlake_simulator::verify_source(&VerifySource(reader), &manifest, &schema)
        .with_context(|| format!("failed to verify the lake {}", a.lake.display()))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{report}");
    }
    Ok(if report.is_exact() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// `verify` reads through the sink, so that it sees any lake `run` can write (a folder, s3://).
struct VerifySource(sensorlake_sink::LakeReader);

impl sensorlake_simulator::LakeSource for VerifySource {
    fn parquet_files(&self, table: &str) -> Result<Vec<PathBuf>, sensorlake_simulator::SimError> {
        let table = match table {
            "telemetry" => sensorlake_sink::Table::Telemetry,
            _ => sensorlake_sink::Table::DeadLetter,
        };
        let files = self
            .0
            .files(table)
            .map_err(|e| sensorlake_simulator::SimError::ReadDir {
                path: self.0.full_name(table.dir()),
                source: std::io::Error::other(e),
            })?;
        // Full names, for messages; `read` takes them back apart.
        Ok(files.iter().map(|rel| self.0.full_name(rel)).collect())
    }

    fn read(&self, file: &Path) -> Result<bytes::Bytes, sensorlake_simulator::SimError> {
        let rel = file
            .strip_prefix(self.0.root())
            .unwrap_or(file)
            .to_string_lossy();
        self.0.read(&rel).map(bytes::Bytes::from).map_err(|e| {
            sensorlake_simulator::SimError::ReadParquet {
                path: self.0.full_name(&rel),
                source: Box::new(e),
            }
        })
    }
}

fn compact(a: CompactArgs) -> anyhow::Result<ExitCode> {
    use sensorlake_sink::SinkError;
    let mut config = load_config(a.config.as_deref())?;
    if let Some(lake) = a.lake {
        config.lake.path = lake;
    }
    let schema = Arc::new(config.validate()?);
    let lake = config.lake.path.clone();
    let opts = sensorlake_sink::CompactOptions {
        older_than: a.older_than,
        target_size_bytes: a.target_size,
        merge_memory_bytes: a.merge_memory,
    };
    info!(
        lake = %lake.display(),
        older_than = ?opts.older_than,
        target_size = %format_bytes(opts.target_size_bytes),
        "Compacting the lake"
    );
    let summary = match sensorlake_sink::compact(&lake, schema, &config.lake.options(), &opts) {
        Ok(summary) => summary,
        // Nothing to retry: the command line or configuration must change.
        Err(e @ (SinkError::InvalidLake { .. } | SinkError::InvalidOptions { .. })) => {
            bail!(UsageError(e.to_string()))
        }
        Err(e) => {
            return Err(anyhow::Error::new(e)
                .context(format!("failed to compact the lake {}", lake.display())));
        }
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print_compact_summary(&summary, &opts);
    }
    if summary.skipped.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "error: {} partition(s) skipped because a file cannot be read; repair or move the named file(s) away and run compact again",
            summary.skipped.len()
        );
        Ok(ExitCode::from(1))
    }
}

fn print_compact_summary(
    summary: &sensorlake_sink::CompactSummary,
    opts: &sensorlake_sink::CompactOptions,
) {
    let r = &summary.recovered;
    if let Some(n) = r.finished {
        println!(
            "recovery: finished interrupted compaction {n} ({} outputs renamed, {} inputs deleted)",
            r.outputs_renamed, r.inputs_deleted
        );
    }
    if r.tmp_files_removed > 0 {
        println!(
            "recovery: removed {} temporary files of a compaction that never committed",
            r.tmp_files_removed
        );
    }
    for p in &summary.partitions {
        println!(
            "{}: {} files -> {}, {} rows, {} -> {} (compaction {})",
            p.partition,
            p.files_in,
            p.files_out,
            p.rows,
            format_bytes(p.bytes_in),
            format_bytes(p.bytes_out),
            p.compaction
        );
    }
    for s in &summary.skipped {
        println!("{}: skipped: {}", s.partition, s.reason);
    }
    if summary.partitions.is_empty() {
        println!(
            "nothing to compact: no partition closed for {:?} has two or more files under {}",
            opts.older_than,
            format_bytes(opts.target_size_bytes)
        );
    } else {
        println!(
            "compacted {} partitions: {} files -> {}, {} rows, {} -> {}",
            summary.partitions.len(),
            summary.files_in(),
            summary.files_out(),
            summary.rows(),
            format_bytes(summary.bytes_in()),
            format_bytes(summary.bytes_out())
        );
    }
}

fn config_check(path: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let config = load_config(path.as_deref())?;
    let schema = config.validate()?;
    if let Some(p) = &config.registry.path {
        let r = sensorlake_transform::Registry::from_csv_path(p)?;
        eprintln!("registry {}: {} devices", p.display(), r.len());
    }
    eprintln!(
        "configuration is valid: {} device types, {} metric columns",
        schema.device_types().len(),
        schema.metric_columns().len()
    );
    println!("{}", config.to_toml());
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_durations_with_units() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1d").unwrap(), Duration::from_secs(86_400));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("x").is_err());
    }

    #[test]
    fn parses_sizes_with_binary_and_decimal_units() {
        assert_eq!(parse_size("128MiB").unwrap(), 128 << 20);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("1.5KiB").unwrap(), 1536);
        assert_eq!(parse_size("500MB").unwrap(), 500_000_000);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size(" 64 MiB ").unwrap(), 64 << 20);
        for bad in ["", "MiB", "12 parsecs", "0", "-5MiB", "1e3", "1..2MiB"] {
            let err = parse_size(bad).unwrap_err();
            assert!(err.contains(bad.trim()), "{bad:?}: {err}");
        }
    }

    #[test]
    fn formats_byte_counts_in_binary_units() {
        assert_eq!(format_bytes(512), "512 B");
        assert_eq!(format_bytes(1536), "1.5 KiB");
        assert_eq!(format_bytes(128 << 20), "128.0 MiB");
    }

    #[test]
    fn the_cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
