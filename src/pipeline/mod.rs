//! The running pipeline: MQTT source → batcher → transform (rayon) → lake commit → acks.
//! (Kinesis runs the same stages per shard, in `kinesis.rs`: one `Lane` — lake writer and
//! transformer — per shard, the checkpoint committed with the rows instead of acks.)
//!
//! One task owns the batch being built. Deliveries arrive on the source's bounded channel and
//! are appended; when the [`FlushPolicy`] says so (or the age timer fires, or shutdown comes),
//! the batch is transformed on the rayon pool, committed to the lake on a blocking thread,
//! and only then acknowledged, in receive order. While a flush runs nothing new is taken from
//! the channel: it fills, the MQTT reader stops reading, and the broker stops sending — memory
//! stays bounded by the channel, the batch and the broker's window.
//!
//! A failed commit is retried with the same batch (same commit number, same files) with a
//! capped, jittered backoff; nothing is acknowledged meanwhile. At shutdown the retries stop
//! after the shutdown timeout and the process exits non-zero, leaving the unacknowledged
//! messages to the broker.

mod kinesis;
pub mod policy;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sensorlake_core::{FlushCounts, RawRecord, SourceKind, TelemetrySchema};
use sensorlake_ingest::backoff::Backoff;
use sensorlake_ingest::{AckToken, MqttAcker, MqttProtocol, MqttSource};
use sensorlake_sink::{Flush, Lake, SinkError};
use sensorlake_transform::{Registry, TransformOutput, Transformer};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{Config, ConfigError};
use crate::telemetry;
pub use policy::{FlushPolicy, FlushTrigger};

/// How often `run` logs a progress line (only when something was committed since the last).
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// Live totals of a running pipeline, updated after every commit (shared with the demo and
/// the progress display).
#[derive(Debug, Default)]
pub struct PipelineStats {
    /// Readings committed (accepted + rejected + duplicates).
    pub received: AtomicU64,
    /// Readings in the telemetry table.
    pub accepted: AtomicU64,
    /// Readings in the dead-letter table.
    pub rejected: AtomicU64,
    /// Readings dropped as duplicates.
    pub duplicates: AtomicU64,
    /// Messages committed and acknowledged.
    pub messages: AtomicU64,
    /// Commits.
    pub commits: AtomicU64,
    /// Files written.
    pub files: AtomicU64,
    /// Bytes written.
    pub bytes: AtomicU64,
    /// The source's connection state, once it has started.
    source: std::sync::OnceLock<Arc<sensorlake_ingest::mqtt::source::SourceEvent>>,
}

impl PipelineStats {
    /// Whether the source is subscribed: messages published from now on reach the pipeline.
    pub fn is_subscribed(&self) -> bool {
        self.source
            .get()
            .is_some_and(|e| e.subscribed.load(Ordering::Relaxed))
    }
}

/// What a run did, for the final log line and the demo summary.
#[derive(Debug, Clone, Default)]
pub struct RunSummary {
    /// Totals of this run (recovered totals not included).
    pub counts: FlushCounts,
    /// Commits made.
    pub commits: u64,
    /// Files written.
    pub files: u64,
    /// Bytes written.
    pub bytes: u64,
    /// The MQTT in-flight window detected as pinned by the broker, if any.
    pub pinned_window: Option<usize>,
}

impl RunSummary {
    fn log_stopped(&self) {
        info!(
            received = self.counts.received,
            accepted = self.counts.accepted,
            rejected = self.counts.rejected_total(),
            duplicates = self.counts.duplicates,
            commits = self.commits,
            files = self.files,
            bytes = self.bytes,
            "Stopped"
        );
    }
}

/// Why the pipeline stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// The configuration cannot work.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The registry file could not be loaded.
    #[error("failed to load the device registry: {0}")]
    Registry(#[from] sensorlake_transform::RegistryError),
    /// The lake could not be opened or recovered.
    #[error("failed to open the lake: {0}")]
    OpenLake(#[source] SinkError),
    /// The MQTT source configuration is invalid.
    #[error("invalid MQTT settings: {0}")]
    Source(#[from] sensorlake_ingest::mqtt::config::ConfigError),
    /// The lake cannot tell whether the last commit is durable (fsyncing a folder failed);
    /// restart so that recovery decides. Nothing uncommitted was acknowledged.
    #[error("stopping so that recovery can run at the next start: {0}")]
    LakeNeedsRecovery(#[source] SinkError),
    /// Commits kept failing until the shutdown deadline or past `lake.retry_budget_secs`;
    /// nothing uncommitted was acknowledged.
    #[error(
        "gave up committing after {attempts} attempts; the unacknowledged messages stay with the broker: {source}"
    )]
    CommitGaveUp {
        /// Attempts made.
        attempts: u32,
        /// The last error.
        #[source]
        source: SinkError,
    },
    /// Another process committed as this lane's writer (a Kinesis shard now read by another
    /// consumer): the lane is given up, its uncommitted records left to that consumer.
    #[error("another process now writes shard writer {writer}: {source}")]
    LaneTaken {
        /// The writer id.
        writer: String,
        /// The conflict.
        #[source]
        source: SinkError,
    },
    /// The Kinesis consumer could not start.
    #[error(transparent)]
    Kinesis(#[from] sensorlake_ingest::kinesis::consumer::StartError),
    /// A transform or blocking task panicked (a bug).
    #[error("internal task failed: {0}")]
    Internal(String),
}

/// The messages received and not yet committed.
struct Pending {
    records: Vec<RawRecord>,
    acks: Vec<AckToken>,
    bytes: usize,
    oldest: Option<Instant>,
    last_arrival: Instant,
}

impl Pending {
    fn new() -> Self {
        Self {
            records: Vec::new(),
            acks: Vec::new(),
            bytes: 0,
            oldest: None,
            last_arrival: Instant::now(),
        }
    }

    fn push(&mut self, record: RawRecord, ack: AckToken) {
        let now = Instant::now();
        self.oldest.get_or_insert(now);
        self.last_arrival = now;
        self.bytes += record.payload.len();
        self.records.push(record);
        self.acks.push(ack);
    }

    fn len(&self) -> usize {
        self.records.len()
    }
}

/// One lake writer and the transformer whose device state goes with it: the whole pipeline
/// for MQTT, one per shard for Kinesis.
struct Lane {
    transformer: Option<Transformer>,
    lake: Option<Lake>,
    /// Give the lane up, instead of retrying, when another process committed as its writer
    /// (a Kinesis shard whose lease moved on): [`PipelineError::LaneTaken`].
    yield_on_conflict: bool,
    /// How to open the lake again when it must recover in-process.
    spec: LakeSpec,
}

/// What every flush shares, moved between the async task and the worker threads.
struct Stages {
    stats: Arc<PipelineStats>,
    summary: RunSummary,
    shutdown: CancellationToken,
    shutdown_timeout: Duration,
    /// `lake.retry_budget_secs`: how long commits may keep failing before the process exits.
    retry_budget: Option<Duration>,
}

impl Stages {
    fn new(config: &Config, stats: Arc<PipelineStats>, shutdown: CancellationToken) -> Self {
        Self {
            stats,
            summary: RunSummary::default(),
            shutdown,
            shutdown_timeout: Duration::from_secs(config.shutdown.timeout_secs),
            retry_budget: (config.lake.retry_budget_secs > 0)
                .then(|| Duration::from_secs(config.lake.retry_budget_secs)),
        }
    }
}

/// What reopening the lake after an unknown commit outcome found.
enum Reopened {
    /// The commit is in the lake, as this flush.
    Committed(sensorlake_sink::CommitSummary),
    /// It is not: commit the flush again.
    NotCommitted,
    /// The lake could not be opened; try again.
    OpenFailed(SinkError),
}

/// Everything [`Lake::open`] needs.
#[derive(Clone)]
pub(crate) struct LakeSpec {
    path: std::path::PathBuf,
    writer: String,
    options: sensorlake_sink::LakeOptions,
    schema: Arc<TelemetrySchema>,
}

impl LakeSpec {
    fn of(config: &Config, writer: &str, schema: Arc<TelemetrySchema>) -> Self {
        Self {
            path: config.lake.path.clone(),
            writer: writer.to_owned(),
            options: config.lake.options(),
            schema,
        }
    }

    async fn open(&self) -> Result<(Lake, sensorlake_sink::Recovered), PipelineError> {
        let spec = self.clone();
        tokio::task::spawn_blocking(move || {
            Lake::open(&spec.path, &spec.writer, spec.schema, spec.options)
        })
        .await
        .map_err(|e| PipelineError::Internal(e.to_string()))?
        .map_err(PipelineError::OpenLake)
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Runs the MQTT → lake pipeline until `shutdown` is cancelled, then stops intake, commits
/// what was received, acknowledges it and returns.
///
/// # Errors
/// Bad configuration, an unreadable registry, a lake that cannot be opened, or commits that
/// still fail at the shutdown deadline.
pub async fn run(
    config: Config,
    shutdown: CancellationToken,
    stats: Arc<PipelineStats>,
) -> Result<RunSummary, PipelineError> {
    let schema = Arc::new(config.validate()?);
    let registry = load_registry(&config).await?;
    if config.kinesis.stream.is_some() {
        return kinesis::run(config, schema, registry, shutdown, stats).await;
    }
    let spec = LakeSpec::of(&config, &config.lake.writer_id, schema.clone());
    let (lake, recovered) = spec.open().await?;
    info!(
        lake = %config.lake.path.display(),
        writer = %config.lake.writer_id,
        last_commit = ?recovered.last_commit,
        devices = recovered.devices.len(),
        files_made_visible = recovered.files_made_visible,
        files_removed = recovered.files_removed,
        registry_devices = registry.len(),
        "Opened lake"
    );
    let mut transformer = Transformer::new(schema, config.transform.clone(), registry);
    transformer.restore(recovered.devices);
    let mut lane = Lane {
        transformer: Some(transformer),
        lake: Some(lake),
        yield_on_conflict: false,
        spec,
    };

    let max_messages = config
        .flush
        .max_messages
        .unwrap_or(match config.mqtt.protocol {
            MqttProtocol::V5 => (usize::from(config.mqtt.receive_maximum) / 2).max(1),
            MqttProtocol::V4 => 10_000,
        });
    let mut policy = FlushPolicy::new(max_messages, config.flush.max_bytes, config.max_age());
    let mut source = MqttSource::start(&config.mqtt, &config.client_id())?;
    info!(broker = %source.addr(), client_id = %config.client_id(), protocol = ?config.mqtt.protocol,
          flush_messages = max_messages, "Starting MQTT source");

    let mut stages = Stages::new(&config, stats.clone(), shutdown.clone());
    let acker = source.acker();
    let _ = stats.source.set(source.acker().events().clone());
    let mut pending = Pending::new();
    // A progress line for operators every PROGRESS_EVERY; the first tick fires immediately.
    let mut progress = tokio::time::interval(PROGRESS_EVERY);
    progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_progress = (Instant::now(), 0u64);

    loop {
        let deadline = pending.oldest.map(|t| t + policy.max_age());
        // Not `biased`: under a steady stream the delivery branch is always ready and must not
        // starve the timers.
        tokio::select! {
            () = shutdown.cancelled() => break,
            d = source.deliveries.recv() => {
                let Some(d) = d else { break };
                pending.push(d.record, d.ack);
                telemetry::set_in_flight(pending.len());
                let overdue = pending.oldest.is_some_and(|t| t.elapsed() >= policy.max_age());
                if let Some(trigger) = policy
                    .check(pending.len(), pending.bytes)
                    .or(overdue.then_some(FlushTrigger::Age))
                {
                    stages.flush_mqtt(&mut lane, &acker, &mut pending, trigger).await?;
                }
            }
            _ = progress.tick() => {
                let c = &stages.summary.counts;
                let (at, before) = last_progress;
                if c.received > before {
                    let rate = (c.received - before) as f64 / at.elapsed().as_secs_f64().max(1e-3);
                    info!(received = c.received, accepted = c.accepted, rejected = c.rejected_total(),
                          duplicates = c.duplicates, commits = stages.summary.commits,
                          readings_per_sec = rate as u64, in_flight = pending.len(), "Progress");
                }
                last_progress = (Instant::now(), c.received);
            }
            () = sleep_until_opt(deadline) => {
                if let Some(window) = policy.on_age_flush(pending.len(), pending.last_arrival.elapsed()) {
                    warn!(
                        window,
                        "The broker stops sending at {window} unacknowledged messages, which pins the commit \
                         cadence to {window} messages per {} ms. Use MQTT 5 (mqtt.protocol = \"v5\") or raise \
                         the broker's window (Mosquitto: max_inflight_messages 0). Flushing every {} messages now.",
                        policy.max_age().as_millis(),
                        policy.threshold()
                    );
                    stages.summary.pinned_window = Some(window);
                }
                stages.flush_mqtt(&mut lane, &acker, &mut pending, FlushTrigger::Age).await?;
            }
        }
    }

    info!("Shutting down: stopping intake, committing and acknowledging what was received");
    source.stop_intake();
    while let Ok(d) = source.deliveries.try_recv() {
        pending.push(d.record, d.ack);
    }
    stages
        .flush_mqtt(&mut lane, &acker, &mut pending, FlushTrigger::Shutdown)
        .await?;
    source.shutdown(Duration::from_secs(5)).await;
    stages.summary.log_stopped();
    Ok(stages.summary)
}

/// Loads the registry file, off the runtime's workers (file I/O and CSV parsing).
async fn load_registry(config: &Config) -> Result<Arc<Registry>, PipelineError> {
    let registry_path = config.registry.path.clone();
    Ok(Arc::new(
        tokio::task::spawn_blocking(move || match registry_path {
            Some(p) => Registry::from_csv_path(&p),
            None => Ok(Registry::empty()),
        })
        .await
        .map_err(|e| PipelineError::Internal(e.to_string()))??,
    ))
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

impl Stages {
    /// One attempt at committing `output` to `lane`.
    async fn commit_once(
        &mut self,
        lane: &mut Lane,
        output: Arc<TransformOutput>,
        sources: Arc<serde_json::Value>,
    ) -> Result<Result<sensorlake_sink::CommitSummary, SinkError>, PipelineError> {
        let mut lake = lane
            .lake
            .take()
            .expect("the lake is returned after every commit");
        let (lake, result) = tokio::task::spawn_blocking(move || {
            let flush = Flush {
                telemetry: std::slice::from_ref(&output.telemetry),
                dead_letters: std::slice::from_ref(&output.dead_letters),
                counts: &output.counts,
                devices: &output.devices,
                sources: &sources,
            };
            let r = lake.commit(&flush);
            (lake, r)
        })
        .await
        .map_err(|e| PipelineError::Internal(e.to_string()))?;
        lane.lake = Some(lake);
        Ok(result)
    }

    /// Opens the lake again after commit `commit` ended with an unknown outcome, and lets
    /// recovery say what became of it: [`Reopened::Committed`] when it is in the lake as this
    /// flush (the same number, the same rows), [`Reopened::NotCommitted`] when it is not. A
    /// commit there that is not this flush means another process writes as this writer id: an
    /// error that stops the pipeline, since acknowledging would lose the flush. A failure to
    /// open leaves `lane.lake` empty, for the next attempt.
    async fn reopen_lake(
        &mut self,
        lane: &mut Lane,
        commit: u64,
        rows: u64,
    ) -> Result<Reopened, PipelineError> {
        lane.lake = None;
        let (lake, recovered) = match lane.spec.open().await {
            Ok(opened) => opened,
            Err(PipelineError::OpenLake(e)) => return Ok(Reopened::OpenFailed(e)),
            Err(other) => return Err(other),
        };
        lane.lake = Some(lake);
        Ok(
            match recovered.last_summary.filter(|s| s.commit >= commit) {
                Some(s) if s.commit == commit && s.rows == rows => {
                    info!(commit, "Lake reopened: the commit is in the lake");
                    Reopened::Committed(s)
                }
                Some(s) => {
                    return Err(PipelineError::OpenLake(SinkError::Poisoned {
                        commit,
                        cause: format!(
                            "after reopening, commit {} ({} rows) is not this flush ({rows} rows): \
                         another process writes with this writer id; give each instance its own",
                            s.commit, s.rows
                        ),
                    }));
                }
                None => {
                    info!(
                        commit,
                        "Lake reopened: the commit is not in the lake; committing again"
                    );
                    Reopened::NotCommitted
                }
            },
        )
    }

    /// Transforms, commits and acknowledges everything pending (MQTT).
    async fn flush_mqtt(
        &mut self,
        lane: &mut Lane,
        acker: &MqttAcker,
        pending: &mut Pending,
        trigger: FlushTrigger,
    ) -> Result<(), PipelineError> {
        if pending.len() == 0 {
            pending.oldest = None;
            return Ok(());
        }
        let records = std::mem::take(&mut pending.records);
        let acks = std::mem::take(&mut pending.acks);
        pending.bytes = 0;
        pending.oldest = None;
        // Still unacknowledged while this flush is transformed and committed.
        telemetry::set_in_flight(records.len());
        self.commit_records(
            lane,
            SourceKind::Mqtt,
            records,
            serde_json::Value::Null,
            trigger,
        )
        .await?;
        // The commit is durable: only now are the messages acknowledged, in receive order.
        acker.ack(&acks);
        telemetry::set_in_flight(pending.len());
        Ok(())
    }

    /// Transforms `records` with the lane's transformer and commits them with `sources`,
    /// retrying until committed; counts the flush.
    async fn commit_records(
        &mut self,
        lane: &mut Lane,
        source: SourceKind,
        records: Vec<RawRecord>,
        sources: serde_json::Value,
        trigger: FlushTrigger,
    ) -> Result<(), PipelineError> {
        let started = Instant::now();
        let messages = records.len() as u64;
        let mut transformer = lane
            .transformer
            .take()
            .expect("the transformer is returned after every flush");
        let now = now_ms();
        let (transformer, output) = crate::cpu::run(move || {
            let out = transformer.process(source, &records, now);
            (transformer, out)
        })
        .await
        .map_err(|e| PipelineError::Internal(e.to_string()))?;
        lane.transformer = Some(transformer);
        debug_assert!(output.counts.adds_up());

        let output_counts = output.counts.clone();
        let summary = self
            .commit_with_retry(lane, Arc::new(output), Arc::new(sources))
            .await?;

        let secs = started.elapsed().as_secs_f64();
        telemetry::record_commit(&output_counts, &summary, trigger.as_str(), secs);
        let st = &self.stats;
        st.received
            .fetch_add(output_counts.received, Ordering::Relaxed);
        st.accepted
            .fetch_add(output_counts.accepted, Ordering::Relaxed);
        st.rejected
            .fetch_add(output_counts.rejected_total(), Ordering::Relaxed);
        st.duplicates
            .fetch_add(output_counts.duplicates, Ordering::Relaxed);
        st.messages.fetch_add(messages, Ordering::Relaxed);
        st.commits.fetch_add(1, Ordering::Relaxed);
        st.files
            .fetch_add(summary.files.len() as u64, Ordering::Relaxed);
        st.bytes.fetch_add(summary.bytes, Ordering::Relaxed);
        let s = &mut self.summary;
        s.counts.add(&output_counts);
        s.commits += 1;
        s.files += summary.files.len() as u64;
        s.bytes += summary.bytes;
        tracing::debug!(
            commit = summary.commit,
            writer = %lane.spec.writer,
            messages,
            trigger = trigger.as_str(),
            files = summary.files.len(),
            ms = (secs * 1000.0) as u64,
            "Committed"
        );
        Ok(())
    }

    /// Commits `output`, retrying the same flush until it succeeds or the shutdown deadline
    /// passes.
    async fn commit_with_retry(
        &mut self,
        lane: &mut Lane,
        output: Arc<TransformOutput>,
        sources: Arc<serde_json::Value>,
    ) -> Result<sensorlake_sink::CommitSummary, PipelineError> {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        let mut gave_up_at: Option<Instant> = None;
        let mut failing_since: Option<Instant> = None;
        // Set while the outcome of this commit number is unknown: the lake must be reopened,
        // and recovery asked, before anything else.
        let mut unknown: Option<u64> = None;
        let rows = (output.telemetry.num_rows() + output.dead_letters.num_rows()) as u64;
        loop {
            let e = match unknown {
                Some(commit) => match self.reopen_lake(lane, commit, rows).await? {
                    Reopened::Committed(summary) => return Ok(summary),
                    // Not in the lake: the next attempt commits the flush again (the failed
                    // attempt was counted when its outcome came back unknown).
                    Reopened::NotCommitted => {
                        unknown = None;
                        continue;
                    }
                    Reopened::OpenFailed(e) => e,
                },
                None => match self
                    .commit_once(lane, output.clone(), sources.clone())
                    .await?
                {
                    Ok(summary) => return Ok(summary),
                    // On a folder, an unknown outcome means fsyncing the commits folder
                    // failed: the disk reports I/O errors, and nothing done in this process
                    // can prove the record durable afterwards. Stop, unacknowledged; a
                    // restart's recovery decides.
                    Err(e @ SinkError::Poisoned { .. })
                        if !lane.lake.as_ref().is_some_and(Lake::is_object_store) =>
                    {
                        metrics::counter!("sensorlake_commit_errors_total").increment(1);
                        return Err(PipelineError::LakeNeedsRecovery(e));
                    }
                    // On an object store (a lost response to the record's conditional put,
                    // say): reopen the lake and let recovery decide from what the store holds.
                    // Nothing is acknowledged meanwhile, and the attempt counts as failed
                    // (backoff, retry budget, shutdown deadline) like any other.
                    Err(e @ SinkError::Poisoned { .. }) => {
                        if let SinkError::Poisoned { commit, .. } = &e {
                            unknown = Some(*commit);
                        }
                        e
                    }
                    Err(e) if lane.yield_on_conflict && e.is_commit_conflict() => {
                        return Err(PipelineError::LaneTaken {
                            writer: lane.spec.writer.clone(),
                            source: e,
                        });
                    }
                    Err(e) => e,
                },
            };
            metrics::counter!("sensorlake_commit_errors_total").increment(1);
            let delay = backoff.next_delay();
            let (attempt, retry_in_ms) = (backoff.attempts(), delay.as_millis() as u64);
            if e.is_storage_full() {
                metrics::counter!("sensorlake_commit_storage_full_total").increment(1);
                error!(error = %e, attempt, retry_in_ms,
                       "Commit failed: the file system holding the lake is full. Free space there (or move the lake); nothing of this batch is acknowledged, retrying");
            } else {
                error!(error = %e, attempt, retry_in_ms,
                       "Commit failed; nothing of this batch is acknowledged, retrying");
            }
            let failing_for = failing_since.get_or_insert_with(Instant::now).elapsed();
            if let Some(budget) = self.retry_budget.filter(|b| failing_for >= *b) {
                error!(error = %e, attempts = backoff.attempts(), budget_secs = budget.as_secs(),
                       "Commits have failed for longer than lake.retry_budget_secs; exiting with status 1. \
                        Nothing uncommitted was acknowledged: the broker keeps it for the next start");
                return Err(PipelineError::CommitGaveUp {
                    attempts: backoff.attempts(),
                    source: e,
                });
            }
            if self.shutdown.is_cancelled() {
                let since = *gave_up_at.get_or_insert_with(Instant::now);
                if since.elapsed() >= self.shutdown_timeout {
                    return Err(PipelineError::CommitGaveUp {
                        attempts: backoff.attempts(),
                        source: e,
                    });
                }
            }
            tokio::time::sleep(delay).await;
        }
    }
}
