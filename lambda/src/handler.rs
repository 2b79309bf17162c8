//! The function's work, as plain async functions of a decoded event: tests call
//! [`Handler::invoke`] (or [`Handler::shard`]) with a JSON fixture, `main` calls it from the
//! Lambda runtime.
//!
//! # One shard's batch
//!
//! [`Handler::shard`] (see the [crate docs](crate) for why this is exactly-once):
//!
//! 1. Opens the lake as the shard's writer (`ks-<stream>-<shard>`, the id the long-lived
//!    consumer uses too) on a blocking thread; recovery finishes or removes any flush an earlier
//!    invocation left half done.
//! 2. Reads the shard's checkpoint from the last commit record, and expands the event's records
//!    into user records with [`records::expand`](sensorlake_ingest::kinesis::records::expand):
//!    what the checkpoint covers is skipped, KPL aggregates are unpacked, a corrupt aggregate
//!    becomes one record marked for the dead-letter table, and `received_at` is the record's
//!    ApproximateArrivalTimestamp. Nothing left: the batch is already in the lake.
//! 3. Transforms them on the rayon pool (`sensorlake::cpu::run`) with the writer's recovered
//!    device states restored, so a reading seen before is a duplicate.
//! 4. Commits them as one flush whose `sources` is the checkpoint advanced to the last record,
//!    retrying a failed commit a few times while the invocation has time left.
//!
//! A commit that still fails, or whose outcome is unknown ([`SinkError::Poisoned`]), is
//! reported as a batch item failure naming the first record not covered by the committed
//! checkpoint; nothing after it was committed, since the batch is one flush. The retry's
//! recovery decides what an unknown outcome was. Bad records never fail: they are dead letters.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sensorlake::config::{Config, ConfigError};
use sensorlake_core::{FlushCounts, RawRecord, SourceKind, TelemetrySchema};
use sensorlake_ingest::kinesis::records::{ShardRecord, expand};
use sensorlake_ingest::kinesis::{SequenceNumber, ShardCheckpoint, shard_writer_id};
use sensorlake_sink::{
    CommitSummary, CompactOptions, CompactSummary, Flush, Lake, LakeOptions, SinkError,
};
use sensorlake_transform::{
    Registry, RegistryError, TransformConfig, TransformOutput, Transformer,
};
use serde::Serialize;
use tracing::{error, info, warn};

use crate::event::{
    BatchItemFailure, BatchResponse, CompactRequest, EventError, Invocation, KinesisEvent,
    ShardBatch,
};

/// Commit attempts per shard and invocation (the first one included).
const COMMIT_ATTEMPTS: u32 = 4;
/// The wait before the second attempt; doubled before each further one.
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(200);
/// A retry starts only if this much time would be left before the invocation's deadline
/// after waiting and after an attempt as long as the last one: the answer must go out before
/// Lambda times the invocation out (a timeout is a function error, which bisects the batch).
const DEADLINE_RESERVE: Duration = Duration::from_secs(2);
/// The environment variable naming an optional configuration file.
pub const CONFIG_ENV: &str = "SENSORLAKE_CONFIG";

/// Everything an invocation needs, built once per process (at cold start).
#[derive(Debug)]
pub struct Settings {
    /// The lake: `s3://bucket/prefix` in AWS; a folder in tests.
    pub lake: PathBuf,
    /// How files are written (`[lake]`).
    pub lake_options: LakeOptions,
    /// The telemetry schema (`[[device_types]]`).
    pub schema: Arc<TelemetrySchema>,
    /// Validation limits and policies (`[transform]`).
    pub transform: TransformConfig,
    /// The device registry (`[registry]`), loaded at cold start.
    pub registry: Arc<Registry>,
    /// The function's memory (`AWS_LAMBDA_FUNCTION_MEMORY_SIZE`), which bounds what a
    /// compaction holds in memory.
    pub memory_mb: Option<u64>,
}

/// Why the function cannot start (reported to Lambda as an init error).
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// The configuration (file or `SENSORLAKE_*` variables) is invalid.
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    /// The registry file named by `registry.path` cannot be loaded.
    #[error("failed to load the device registry: {0}")]
    Registry(#[from] RegistryError),
}

impl Settings {
    /// Loads the configuration as the service does — the file named by `SENSORLAKE_CONFIG`
    /// if set, then the `SENSORLAKE_<SECTION>__<KEY>` overrides in `env` — validates it and
    /// loads the registry. `env` is the process environment.
    ///
    /// # Errors
    /// [`InitError`] naming the bad value or file.
    pub fn load(env: Vec<(String, String)>) -> Result<(Settings, Config), InitError> {
        let lookup = |key: &str| env.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
        let file = lookup(CONFIG_ENV)
            .filter(|p| !p.is_empty())
            .map(PathBuf::from);
        let memory_mb = lookup("AWS_LAMBDA_FUNCTION_MEMORY_SIZE").and_then(|m| m.parse().ok());
        let config = Config::load(file.as_deref(), env)?;
        let settings = Settings::from_config(&config, memory_mb)?;
        Ok((settings, config))
    }

    /// Validates `config` and loads its registry.
    ///
    /// # Errors
    /// [`InitError`] naming the bad value or file.
    pub fn from_config(config: &Config, memory_mb: Option<u64>) -> Result<Settings, InitError> {
        let schema = Arc::new(config.validate()?);
        let registry = match &config.registry.path {
            Some(p) => Registry::from_csv_path(p)?,
            None => Registry::empty(),
        };
        Ok(Settings {
            lake: config.lake.path.clone(),
            lake_options: config.lake.options(),
            schema,
            transform: config.transform.clone(),
            registry: Arc::new(registry),
            memory_mb,
        })
    }

    /// The compaction options for `req`: its values, else `sensorlake compact`'s defaults,
    /// with the merge memory capped at a quarter of the function's memory.
    pub fn compact_options(&self, req: &CompactRequest) -> CompactOptions {
        let defaults = CompactOptions::default();
        let memory_cap = self
            .memory_mb
            .map_or(defaults.merge_memory_bytes, |mb| (mb << 20) / 4)
            .clamp(1, defaults.merge_memory_bytes);
        CompactOptions {
            older_than: req
                .older_than_secs
                .map_or(defaults.older_than, Duration::from_secs),
            target_size_bytes: req.target_size_bytes.unwrap_or(defaults.target_size_bytes),
            merge_memory_bytes: req.merge_memory_bytes.unwrap_or(memory_cap),
        }
    }
}

/// `lake` for logs: the URL without any `user:password@` part.
pub fn redact_lake(lake: &std::path::Path) -> String {
    let s = lake.to_string_lossy();
    match s.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
            match authority.rsplit_once('@') {
                Some((_, host)) => format!("{scheme}://***@{host}/{path}"),
                None => s.into_owned(),
            }
        }
        None => s.into_owned(),
    }
}

/// An invocation that fails as a whole (a function error: Lambda retries the batch, bisecting
/// it). Never used for bad records or failed commits.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// The event is not one the function handles.
    #[error(transparent)]
    Event(#[from] EventError),
    /// A transform or blocking task panicked: a bug.
    #[error("internal error (a bug; please report it with this log): {0}")]
    Internal(String),
    /// Compaction could not run or stopped.
    #[error("compaction of {lake} failed: {source}")]
    Compact {
        /// The lake.
        lake: String,
        /// Why.
        #[source]
        source: SinkError,
    },
    /// Compaction ran but skipped partitions holding unreadable files.
    #[error(
        "compaction skipped {count} partition(s) because a file cannot be read (first: {first}); \
         repair or move the named file(s) away"
    )]
    CompactionSkipped {
        /// How many partitions were skipped.
        count: usize,
        /// The first one, with its reason.
        first: String,
    },
}

impl From<HandlerError> for lambda_runtime::Diagnostic {
    fn from(e: HandlerError) -> Self {
        let kind = match &e {
            HandlerError::Event(_) => "BadEvent",
            HandlerError::Internal(_) => "Internal",
            HandlerError::Compact { .. } => "CompactionFailed",
            HandlerError::CompactionSkipped { .. } => "CompactionSkipped",
        };
        lambda_runtime::Diagnostic {
            error_type: format!("sensorlake.{kind}"),
            error_message: e.to_string(),
        }
    }
}

/// What became of one shard's records.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum ShardOutcome {
    /// Every record was already covered by the committed checkpoint: nothing written.
    UpToDate,
    /// The new records are committed (telemetry, dead letters, duplicates).
    Committed {
        /// The commit number.
        commit: u64,
        /// Where the readings went.
        counts: FlushCounts,
        /// Files written.
        files: usize,
        /// Bytes written.
        bytes: u64,
        /// The checkpoint committed with them.
        checkpoint: ShardCheckpoint,
    },
    /// Nothing from `first_uncommitted` on is committed: report it as a batch item failure.
    Failed {
        /// The first record not covered by the committed checkpoint.
        first_uncommitted: SequenceNumber,
        /// Why.
        error: String,
    },
}

/// One shard's batch, processed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ShardReport {
    /// The stream.
    pub stream: String,
    /// The shard.
    pub shard: String,
    /// The lake writer id it is written as.
    pub writer: String,
    /// Kinesis records in the event.
    pub records: usize,
    /// User records not yet committed before this invocation (aggregates unpacked).
    pub new_user_records: usize,
    /// What happened.
    #[serde(flatten)]
    pub outcome: ShardOutcome,
}

/// The function: configuration loaded once, then one call per invocation.
#[derive(Debug, Clone)]
pub struct Handler {
    settings: Arc<Settings>,
}

impl Handler {
    /// A handler with `settings`.
    pub fn new(settings: Settings) -> Self {
        Self {
            settings: Arc::new(settings),
        }
    }

    /// The settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Handles one invocation: a Kinesis event is answered with a [`BatchResponse`], a
    /// compaction request or schedule with the [`CompactSummary`]. `deadline` is when Lambda
    /// times the invocation out.
    ///
    /// ```
    /// use std::time::{Duration, Instant};
    /// use sensorlake_lambda::{Handler, Settings};
    ///
    /// let dir = tempfile::tempdir()?;
    /// let lake = dir.path().join("lake").display().to_string();
    /// // In Lambda: the process environment.
    /// let env = vec![("SENSORLAKE_LAKE__PATH".to_owned(), lake)];
    /// let (settings, _config) = Settings::load(env)?;
    /// let handler = Handler::new(settings);
    ///
    /// let event = serde_json::json!({"Records": []});
    /// let deadline = Instant::now() + Duration::from_secs(60);
    /// let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    /// let answer = rt.block_on(handler.invoke(event, deadline))?;
    /// assert_eq!(answer, serde_json::json!({"batchItemFailures": []}));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// [`HandlerError`] for an event the function does not handle, a compaction that fails,
    /// or a bug; never for bad records or commits that fail (those are batch item failures).
    pub async fn invoke(
        &self,
        event: serde_json::Value,
        deadline: Instant,
    ) -> Result<serde_json::Value, HandlerError> {
        let to_json = |v: Result<serde_json::Value, serde_json::Error>| {
            v.map_err(|e| HandlerError::Internal(format!("cannot serialize the answer: {e}")))
        };
        match Invocation::parse(event)? {
            Invocation::Kinesis(event) => {
                let response = self.kinesis(&event, deadline).await?;
                to_json(serde_json::to_value(response))
            }
            Invocation::Compact(req) => {
                let summary = self.compact(&req).await?;
                to_json(serde_json::to_value(summary))
            }
        }
    }

    /// Writes a Kinesis event's records, shard by shard, and lists the shards whose records
    /// could not all be committed.
    ///
    /// # Errors
    /// [`HandlerError::Event`] for a malformed event, [`HandlerError::Internal`] for a bug.
    pub async fn kinesis(
        &self,
        event: &KinesisEvent,
        deadline: Instant,
    ) -> Result<BatchResponse, HandlerError> {
        let mut response = BatchResponse::default();
        for batch in event.shard_batches()? {
            let report = self.shard(batch, deadline).await?;
            if let ShardOutcome::Failed {
                first_uncommitted, ..
            } = report.outcome
            {
                response.batch_item_failures.push(BatchItemFailure {
                    item_identifier: first_uncommitted.to_string(),
                });
            }
        }
        Ok(response)
    }

    /// Writes one shard's records; see the [module docs](self).
    ///
    /// # Errors
    /// [`HandlerError::Internal`] when a transform or blocking task panics.
    pub async fn shard(
        &self,
        batch: ShardBatch,
        deadline: Instant,
    ) -> Result<ShardReport, HandlerError> {
        let started = Instant::now();
        let writer = shard_writer_id(&batch.stream, &batch.shard);
        let mut report = ShardReport {
            stream: batch.stream.clone(),
            shard: batch.shard.clone(),
            writer: writer.clone(),
            records: batch.records.len(),
            new_user_records: 0,
            outcome: ShardOutcome::UpToDate,
        };
        let Some(first) = batch.records.first() else {
            return Ok(report);
        };
        let fail = |report: &mut ShardReport, first_uncommitted: &SequenceNumber, why: String| {
            error!(
                stream = %report.stream, shard = %report.shard, writer = %report.writer,
                first_uncommitted = %first_uncommitted, error = %why,
                "Could not commit the batch; reporting it as failed from the first record not committed, for the event source mapping to retry"
            );
            report.outcome = ShardOutcome::Failed {
                first_uncommitted: first_uncommitted.clone(),
                error: why,
            };
        };

        // (1) Open the lake as this shard's writer.
        let (lake, recovered) = match self.open(&writer).await? {
            Ok(opened) => opened,
            Err(e) => {
                fail(
                    &mut report,
                    &first.sequence,
                    format!(
                        "failed to open the lake {}: {e}",
                        redact_lake(&self.settings.lake)
                    ),
                );
                return Ok(report);
            }
        };

        // (2) The checkpoint, and the records it does not cover.
        let checkpoint = match ShardCheckpoint::from_sources(&recovered.sources) {
            Ok(Some(c)) if c.stream == batch.stream && c.shard == batch.shard => c,
            Ok(Some(c)) => {
                let why = format!(
                    "writer {writer} holds the checkpoint of stream {:?} shard {:?}, not this one; \
                     two streams map to one writer id (rename one) or the lake holds another writer's data",
                    c.stream, c.shard
                );
                fail(&mut report, &first.sequence, why);
                return Ok(report);
            }
            Ok(None) => ShardCheckpoint::new(&batch.stream, &batch.shard),
            Err(e) => {
                fail(
                    &mut report,
                    &first.sequence,
                    format!("writer {writer}: {e}"),
                );
                return Ok(report);
            }
        };
        let mut records: Vec<ShardRecord> = Vec::with_capacity(batch.records.len());
        for r in &batch.records {
            expand(
                &batch.shard,
                &r.sequence,
                &r.partition_key,
                r.data.clone(),
                r.arrival_us,
                Some(&checkpoint),
                &mut records,
            );
        }
        report.new_user_records = records.len();
        let (Some(head), Some(last)) = (records.first(), records.last()) else {
            info!(
                stream = %batch.stream, shard = %batch.shard, writer = %writer,
                records = batch.records.len(),
                checkpoint = %checkpoint.sequence.as_ref().map_or_else(String::new, ToString::to_string),
                "Every record is already in the lake (a redelivery); nothing to write"
            );
            return Ok(report);
        };
        let first_uncommitted = head.sequence.clone();
        let last_sequence = last.sequence.clone();
        let mut next = checkpoint.clone();
        next.advance(&last.sequence, last.sub, last.last_in_record);

        // (3) Transform, with the devices' committed state.
        let raw: Vec<RawRecord> = records.into_iter().map(|r| r.record).collect();
        let settings = self.settings.clone();
        let devices = recovered.devices;
        let output = sensorlake::cpu::run(move || {
            let mut transformer = Transformer::new(
                settings.schema.clone(),
                settings.transform.clone(),
                settings.registry.clone(),
            );
            transformer.restore(devices);
            transformer.process(SourceKind::Kinesis, &raw, now_ms())
        })
        .await
        .map_err(|e| HandlerError::Internal(e.to_string()))?;
        debug_assert!(output.counts.adds_up());

        // (4) Commit, with the advanced checkpoint.
        let counts = output.counts.clone();
        match self
            .commit(&writer, lake, Arc::new(output), next.to_sources(), deadline)
            .await?
        {
            Ok(summary) => {
                info!(
                    stream = %batch.stream, shard = %batch.shard, writer = %writer,
                    records = batch.records.len(), user_records = report.new_user_records,
                    accepted = counts.accepted, rejected = counts.rejected_total(),
                    duplicates = counts.duplicates, commit = summary.commit,
                    files = summary.files.len(), bytes = summary.bytes,
                    checkpoint = %last_sequence, ms = started.elapsed().as_millis() as u64,
                    "Committed a batch"
                );
                report.outcome = ShardOutcome::Committed {
                    commit: summary.commit,
                    counts,
                    files: summary.files.len(),
                    bytes: summary.bytes,
                    checkpoint: next,
                };
            }
            Err(e) => fail(&mut report, &first_uncommitted, e.to_string()),
        }
        Ok(report)
    }

    /// Opens the lake as `writer` on a blocking thread.
    async fn open(
        &self,
        writer: &str,
    ) -> Result<Result<(Lake, sensorlake_sink::Recovered), SinkError>, HandlerError> {
        let s = self.settings.clone();
        let writer = writer.to_owned();
        tokio::task::spawn_blocking(move || {
            Lake::open(&s.lake, &writer, s.schema.clone(), s.lake_options.clone())
        })
        .await
        .map_err(|e| HandlerError::Internal(format!("opening the lake: {e}")))
    }

    /// Commits `output` with `sources`, retrying the same flush (same commit number, same
    /// files) while attempts and time remain. An unknown outcome is not retried here: the
    /// lake refuses further commits until reopened, and the next invocation's recovery
    /// decides.
    async fn commit(
        &self,
        writer: &str,
        lake: Lake,
        output: Arc<TransformOutput>,
        sources: serde_json::Value,
        deadline: Instant,
    ) -> Result<Result<CommitSummary, SinkError>, HandlerError> {
        let sources = Arc::new(sources);
        let mut lake = lake;
        let mut delay = FIRST_RETRY_DELAY;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let started = Instant::now();
            let (out, src) = (output.clone(), sources.clone());
            let (back, result) = tokio::task::spawn_blocking(move || {
                let result = lake.commit(&Flush {
                    telemetry: std::slice::from_ref(&out.telemetry),
                    dead_letters: std::slice::from_ref(&out.dead_letters),
                    counts: &out.counts,
                    devices: &out.devices,
                    sources: &src,
                });
                (lake, result)
            })
            .await
            .map_err(|e| HandlerError::Internal(format!("committing: {e}")))?;
            lake = back;
            let e = match result {
                Ok(summary) => return Ok(Ok(summary)),
                Err(e @ SinkError::Poisoned { .. }) => return Ok(Err(e)),
                Err(e) => e,
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if attempt >= COMMIT_ATTEMPTS || left < started.elapsed() + delay + DEADLINE_RESERVE {
                return Ok(Err(e));
            }
            warn!(
                writer, error = %e, attempt, retry_in_ms = delay.as_millis() as u64,
                "Commit failed; retrying the same flush"
            );
            tokio::time::sleep(delay).await;
            delay *= 2;
        }
    }

    /// Runs compaction on the lake (as `sensorlake compact` does) on a blocking thread.
    ///
    /// # Errors
    /// [`HandlerError::Compact`] when it cannot run (another compaction holds the lease, the
    /// storage fails), [`HandlerError::CompactionSkipped`] when it skipped partitions.
    pub async fn compact(&self, req: &CompactRequest) -> Result<CompactSummary, HandlerError> {
        let opts = self.settings.compact_options(req);
        let s = self.settings.clone();
        let lake = redact_lake(&s.lake);
        info!(
            lake = %lake, older_than_secs = opts.older_than.as_secs(),
            target_size_bytes = opts.target_size_bytes, merge_memory_bytes = opts.merge_memory_bytes,
            "Compacting the lake"
        );
        let o = opts.clone();
        let summary = tokio::task::spawn_blocking(move || {
            match sensorlake_sink::compact(&s.lake, s.schema.clone(), &s.lake_options, &o) {
                // No lake yet (`_sensorlake/` is created by the first batch): nothing to do,
                // rather than an error every hour until data arrives.
                Err(e @ SinkError::InvalidLake { .. }) if lake_is_empty(&s.lake) => {
                    info!(lake = %redact_lake(&s.lake), reason = %e, "Nothing to compact: no batch has been written yet");
                    Ok(CompactSummary::default())
                }
                other => other,
            }
        })
        .await
        .map_err(|e| HandlerError::Internal(format!("compacting: {e}")))?
        .map_err(|source| HandlerError::Compact {
            lake: lake.clone(),
            source,
        })?;
        info!(
            lake = %lake, partitions = summary.partitions.len(), files_in = summary.files_in(),
            files_out = summary.files_out(), rows = summary.rows(), bytes_in = summary.bytes_in(),
            bytes_out = summary.bytes_out(), skipped = summary.skipped.len(),
            "Compaction finished"
        );
        if let Some(first) = summary.skipped.first() {
            return Err(HandlerError::CompactionSkipped {
                count: summary.skipped.len(),
                first: format!("{}: {}", first.partition, first.reason),
            });
        }
        Ok(summary)
    }
}

/// Whether the lake at `root` holds no Parquet file at all (or does not exist). Walks every
/// partition folder, so only called once compaction found no lake metadata.
fn lake_is_empty(root: &std::path::Path) -> bool {
    use sensorlake_sink::{LakeReader, Table};
    match LakeReader::open(root) {
        Ok(reader) => [Table::Telemetry, Table::DeadLetter]
            .into_iter()
            .all(|t| reader.files(t).is_ok_and(|f| f.is_empty())),
        // A local folder that does not exist.
        Err(SinkError::InvalidLake { .. }) => !root.to_string_lossy().contains("://"),
        Err(_) => false,
    }
}

/// The wall clock in epoch milliseconds, for the transform's `ts` window.
fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests;
