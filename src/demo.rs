//! `sensorlake demo`: an embedded rumqttd broker on a free loopback port, the pipeline, the
//! simulator and verify, in one process with nothing to install.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use sensorlake_ingest::MqttProtocol;
use sensorlake_simulator::{FleetSpec, SimStats, SimulateOptions};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::commands::{DemoArgs, UsageError};
use crate::config::Config;
use crate::pipeline::{self, PipelineStats};

/// rumqttd sends at most 100 unacknowledged messages per connection (`MAX_INFLIGHT`, fixed
/// in its router), whatever `max_inflight_count` says.
const BROKER_INFLIGHT: usize = 100;
/// Largest payload the embedded broker accepts (the oversize test payloads are ~300 KiB).
const BROKER_MAX_PAYLOAD: usize = 1 << 20;

/// Starts rumqttd on a free loopback port, on its own thread (its `start` blocks), and
/// returns its address. The broker lives until the process exits.
///
/// # Errors
/// When no port can be found or the thread cannot start.
pub fn start_broker() -> anyhow::Result<SocketAddr> {
    let addr = {
        let l = TcpListener::bind("127.0.0.1:0").context("failed to find a free loopback port")?;
        l.local_addr()?
    };
    let connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: 60_000,
        max_payload_size: BROKER_MAX_PAYLOAD,
        max_inflight_count: BROKER_INFLIGHT,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let server = rumqttd::ServerSettings {
        name: "demo-v4".into(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 1,
        connections,
    };
    let config = rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: 64,
            max_outgoing_packet_count: 2_000,
            max_segment_size: 128 << 20,
            max_segment_count: 4,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("demo-v4".to_string(), server)])),
        v5: None,
        ws: None,
        cluster: None,
        console: None,
        bridge: None,
        prometheus: None,
        metrics: None,
    };
    std::thread::Builder::new()
        .name("rumqttd".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "Embedded broker stopped");
            }
        })
        .context("failed to start the embedded broker thread")?;
    // No readiness probe: the pipeline's connect retries until the listener is up, and the
    // simulator starts only once the pipeline has subscribed.
    Ok(addr)
}

/// Makes `dir` an empty folder for the demo, replacing a previous demo's output but never
/// anything else.
fn prepare_dir(dir: &Path) -> anyhow::Result<()> {
    if dir.exists() {
        let ours = dir.join("lake").join("_sensorlake").exists()
            || std::fs::read_dir(dir)
                .with_context(|| format!("cannot read {}", dir.display()))?
                .next()
                .is_none();
        if !ours {
            bail!(UsageError(format!(
                "{} exists and is not a previous demo's folder; pick another with --lake",
                dir.display()
            )));
        }
        std::fs::remove_dir_all(dir)
            .with_context(|| format!("failed to remove the previous demo in {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("failed to create {}", dir.display()))
}

/// Runs the demo.
///
/// # Errors
/// When the broker, the pipeline or the simulator fail; an inexact verify is exit code 1.
pub async fn run(a: DemoArgs) -> anyhow::Result<ExitCode> {
    if !(0.0..=1.0).contains(&a.bad_ratio) {
        bail!(UsageError(format!(
            "--bad-ratio {} must be between 0 and 1",
            a.bad_ratio
        )));
    }
    let root: PathBuf = a.lake.clone();
    prepare_dir(&root)?;
    let lake = root.join("lake");
    let manifest_path = root.join("manifest.json");
    let registry_path = root.join("registry.csv");
    let spec = FleetSpec {
        devices: a.devices.max(1),
        seed: a.seed,
        bad_ratio: a.bad_ratio,
        ..FleetSpec::default()
    };
    crate::commands::write_registry(&spec, &registry_path)?;

    let broker = start_broker()?;
    info!(%broker, "Embedded MQTT broker listening");

    let mut config = Config::default();
    config.mqtt.url = format!("mqtt://{broker}");
    config.mqtt.protocol = MqttProtocol::V4;
    config.mqtt.client_id = Some("sensorlake-demo".into());
    config.lake.path = lake.clone();
    config.lake.writer_id = "demo".into();
    config.registry.path = Some(registry_path.clone());
    // The commit, not the broker, is the bottleneck at this window: flush the whole window.
    config.flush.max_messages = Some(BROKER_INFLIGHT);
    config.flush.max_age_ms = 500;
    let schema = config.validate()?;

    let shutdown = CancellationToken::new();
    crate::commands::spawn_signal_handler(shutdown.clone());
    let stats = Arc::new(PipelineStats::default());
    let pipeline_task = tokio::spawn(pipeline::run(config, shutdown.clone(), stats.clone()));

    let started = Instant::now();
    while !stats.is_subscribed() {
        if pipeline_task.is_finished() || started.elapsed() > Duration::from_secs(10) {
            shutdown.cancel();
            let r = pipeline_task.await?;
            r?;
            bail!("the pipeline did not subscribe to the embedded broker within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let t0 = Instant::now();
    let sim = SimulateOptions {
        mqtt_host: broker.ip().to_string(),
        mqtt_port: broker.port(),
        client_id: "sensorlake-demo-simulator".into(),
        fleet: spec,
        readings: Some(a.readings),
        duration: None,
        rate: None,
        qos: 1,
        ..SimulateOptions::default()
    };
    let manifest = crate::commands::run_simulation(sim, Arc::new(SimStats::default())).await?;
    manifest
        .write(&manifest_path)
        .with_context(|| format!("failed to write {}", manifest_path.display()))?;

    // Wait for the pipeline to commit every message the broker acknowledged.
    let pb = crate::commands::progress_bar(Some(manifest.messages), "committed");
    let wait_started = Instant::now();
    loop {
        let done = stats.messages.load(Ordering::Relaxed);
        pb.set_position(done);
        if done >= manifest.messages {
            break;
        }
        if pipeline_task.is_finished() {
            break;
        }
        if wait_started.elapsed() > Duration::from_secs(120) {
            pb.finish_and_clear();
            shutdown.cancel();
            bail!(
                "the pipeline committed {done} of {} messages within 120 s; see the log above",
                manifest.messages
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    pb.finish_and_clear();
    let elapsed = t0.elapsed();
    shutdown.cancel();
    let summary = pipeline_task.await.context("the pipeline task failed")??;

    let report = sensorlake_simulator::verify(&lake, &manifest, &schema)
        .with_context(|| format!("failed to verify {}", lake.display()))?;

    let c = &summary.counts;
    let secs = elapsed.as_secs_f64().max(1e-9);
    println!("sensorlake demo");
    println!("  readings in       {:>10}", c.received);
    println!("  accepted          {:>10}", c.accepted);
    println!("  rejected          {:>10}", c.rejected_total());
    for (reason, n) in &c.rejected {
        println!("    {reason:<24}{n:>8}");
    }
    println!("  duplicates        {:>10}", c.duplicates);
    println!("  files written     {:>10}", summary.files);
    println!("  bytes written     {:>10}", summary.bytes);
    println!(
        "  throughput        {:>10.0} readings/s ({:.2} s from first publish to last commit)",
        c.received as f64 / secs,
        secs
    );
    println!("  lake              {}", lake.display());
    println!();
    println!("{report}");
    println!();
    let glob = lake.join("telemetry").join("**").join("*.parquet");
    println!("Query it:");
    println!(
        "  python3 -c \"import duckdb; print(duckdb.sql(\\\"SELECT device_type, count(*) AS readings, round(avg(temperature_c), 2) AS avg_temp FROM read_parquet('{}', hive_partitioning=true) GROUP BY 1 ORDER BY 1\\\"))\"",
        glob.display()
    );
    println!(
        "  python3 -c \"import pyarrow.dataset as ds; print(ds.dataset('{}', format='parquet', partitioning='hive').to_table().group_by('device_type').aggregate([('seq', 'count')]))\"",
        lake.join("telemetry").display()
    );
    if report.is_exact() {
        println!(
            "\nverify: exact — every valid reading once, every bad one in dead_letter with its reason"
        );
        Ok(ExitCode::SUCCESS)
    } else {
        println!("\nverify: NOT exact (see above)");
        Ok(ExitCode::from(1))
    }
}
