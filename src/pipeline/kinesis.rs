//! The Kinesis → lake pipeline: one lane (lake writer + transformer) per shard being read.
//!
//! Batches from every shard reader arrive on one bounded channel and are kept per shard; a
//! flush (by count, bytes or age over all shards) commits each shard with records as its own
//! commit, carrying the shard's new checkpoint. Nothing is acknowledged to Kinesis: the
//! checkpoint in the commit record *is* the acknowledgement, and a restart (or the next owner
//! of the shard) resumes right after it.
//!
//! The coordinator asks for lanes to be opened and closed (see
//! [`sensorlake_ingest::kinesis::consumer`]): opening checks that the shard's parents are
//! finished and seeds a new shard's device state from them, so that per-device
//! de-duplication and the never-decreasing rule carry across a split or merge.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use sensorlake_core::{DeviceCheckpoint, RawRecord, SourceKind, TelemetrySchema};
use sensorlake_ingest::kinesis::lease::LeaseClock;
use sensorlake_ingest::kinesis::{
    KinesisSource, LaneRequest, OpenReply, ShardBatch, ShardCheckpoint, shard_writer_id,
};
use sensorlake_transform::{Registry, Transformer};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{
    FlushPolicy, FlushTrigger, LakeSpec, Lane, PROGRESS_EVERY, PipelineError, PipelineStats,
    RunSummary, Stages, sleep_until_opt,
};
use crate::config::Config;
use crate::telemetry;

/// One shard's lane and what is pending for it.
struct ShardLane {
    lane: Lane,
    epoch: u64,
    /// The shard's lease (with leases on): nothing is committed once it is no longer held.
    lease: Option<Arc<LeaseClock>>,
    /// The checkpoint after the last pending record (what the next commit records).
    checkpoint: ShardCheckpoint,
    records: Vec<RawRecord>,
    bytes: usize,
    /// The reader handed over the shard's last batch: the next commit marks it ended.
    end: bool,
}

struct Shared {
    config: Config,
    schema: Arc<TelemetrySchema>,
    registry: Arc<Registry>,
    stream: String,
}

/// Runs the Kinesis consumer until `shutdown`, then commits what it read and releases its
/// leases.
pub(super) async fn run(
    config: Config,
    schema: Arc<TelemetrySchema>,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
    stats: Arc<PipelineStats>,
) -> Result<RunSummary, PipelineError> {
    let mut source = KinesisSource::start(&config.kinesis).await?;
    let max_messages = config.flush.max_messages.unwrap_or(10_000);
    let policy = FlushPolicy::new(max_messages, config.flush.max_bytes, config.max_age());
    info!(stream = %source.stream(), lake = %config.lake.path.display(),
          leases = ?config.kinesis.lease_table, flush_messages = max_messages,
          "Starting Kinesis consumer");
    let mut stages = Stages::new(&config, stats, shutdown.clone());
    let shared = Shared {
        stream: source.stream().to_owned(),
        config,
        schema,
        registry,
    };
    let mut lanes: HashMap<Arc<str>, ShardLane> = HashMap::new();
    let mut oldest: Option<Instant> = None;
    let mut progress = tokio::time::interval(PROGRESS_EVERY);
    progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_progress = (Instant::now(), 0u64);

    loop {
        let deadline = oldest.map(|t| t + policy.max_age());
        tokio::select! {
            () = shutdown.cancelled() => break,
            Some(request) = source.requests.recv() => {
                handle_request(&shared, &mut lanes, request).await;
            }
            b = source.batches.recv() => {
                let Some(batch) = b else { break };
                let ended = batch.end;
                if accept(&mut lanes, batch) {
                    oldest.get_or_insert_with(Instant::now);
                }
                let (count, bytes) = pending_size(&lanes);
                telemetry::set_in_flight(count);
                let trigger = policy
                    .check(count, bytes)
                    .or(ended.then_some(FlushTrigger::ShardEnd))
                    .or(oldest.is_some_and(|t| t.elapsed() >= policy.max_age()).then_some(FlushTrigger::Age));
                if let Some(trigger) = trigger {
                    flush(&mut stages, &mut lanes, &source, trigger).await?;
                    oldest = None;
                }
            }
            _ = progress.tick() => {
                let c = &stages.summary.counts;
                let (at, before) = last_progress;
                if c.received > before {
                    let rate = (c.received - before) as f64 / at.elapsed().as_secs_f64().max(1e-3);
                    info!(received = c.received, accepted = c.accepted, rejected = c.rejected_total(),
                          duplicates = c.duplicates, commits = stages.summary.commits, shards = lanes.len(),
                          readings_per_sec = rate as u64, in_flight = pending_size(&lanes).0, "Progress");
                }
                last_progress = (Instant::now(), c.received);
            }
            () = sleep_until_opt(deadline) => {
                flush(&mut stages, &mut lanes, &source, FlushTrigger::Age).await?;
                oldest = None;
            }
        }
    }

    info!("Shutting down: stopping the shard readers, committing what was read");
    source.stop_intake();
    while let Ok(batch) = source.batches.try_recv() {
        accept(&mut lanes, batch);
    }
    flush(&mut stages, &mut lanes, &source, FlushTrigger::Shutdown).await?;
    drop(lanes);
    source.shutdown(std::time::Duration::from_secs(5)).await;
    stages.summary.log_stopped();
    Ok(stages.summary)
}

/// Adds a batch to its lane; a batch of a closed or reopened lane is dropped (its records
/// are read again from the committed checkpoint). Returns whether anything was added.
fn accept(lanes: &mut HashMap<Arc<str>, ShardLane>, batch: ShardBatch) -> bool {
    let Some(lane) = lanes
        .get_mut(&batch.shard)
        .filter(|l| l.epoch == batch.epoch)
    else {
        debug!(shard = %batch.shard, records = batch.records.len(), "Dropping a batch of a closed lane");
        return false;
    };
    // The records are in shard order: the last one is where the checkpoint moves.
    if let Some(last) = batch.records.last() {
        lane.checkpoint
            .advance(&last.sequence, last.sub, last.last_in_record);
    }
    let added = !batch.records.is_empty() || batch.end;
    for r in batch.records {
        lane.bytes += r.record.payload.len();
        lane.records.push(r.record);
    }
    lane.end |= batch.end;
    added
}

fn pending_size(lanes: &HashMap<Arc<str>, ShardLane>) -> (usize, usize) {
    lanes
        .values()
        .fold((0, 0), |(n, b), l| (n + l.records.len(), b + l.bytes))
}

/// Commits every shard with pending records (each its own commit, with its checkpoint); a
/// shard whose end was reached is committed as ended, closed, and reported finished.
async fn flush(
    stages: &mut Stages,
    lanes: &mut HashMap<Arc<str>, ShardLane>,
    source: &KinesisSource,
    trigger: FlushTrigger,
) -> Result<(), PipelineError> {
    let mut finished = Vec::new();
    let mut dropped = Vec::new();
    let mut shards: Vec<Arc<str>> = lanes
        .iter()
        .filter(|(_, l)| !l.records.is_empty() || l.end)
        .map(|(k, _)| k.clone())
        .collect();
    shards.sort();
    for shard in shards {
        let Some(lane) = lanes.get_mut(&shard) else {
            continue;
        };
        // A lease that ran out: another consumer may take (or have taken) the shard, so
        // nothing more is committed as its writer. Its records are read again by the owner.
        if lane.lease.as_ref().is_some_and(|l| !l.is_valid()) {
            warn!(shard = %shard, dropped = lane.records.len(),
                  "The shard's lease is no longer held; dropping its uncommitted records for the next owner");
            dropped.push((shard.clone(), lane.epoch));
            continue;
        }
        let records = std::mem::take(&mut lane.records);
        lane.bytes = 0;
        let mut checkpoint = lane.checkpoint.clone();
        checkpoint.ended = lane.end;
        match stages
            .commit_records(
                &mut lane.lane,
                SourceKind::Kinesis,
                records,
                checkpoint.to_sources(),
                trigger,
            )
            .await
        {
            Ok(()) => {}
            Err(e @ PipelineError::LaneTaken { .. }) => {
                warn!(shard = %shard, error = %e,
                      "Another consumer committed this shard; giving it up (it reads on from its own commits)");
                dropped.push((shard.clone(), lane.epoch));
                continue;
            }
            Err(e) => return Err(e),
        }
        metrics::counter!("sensorlake_kinesis_checkpoint_commits_total").increment(1);
        if lane.end {
            finished.push((shard.clone(), lane.epoch));
        }
    }
    for (shard, epoch) in finished {
        lanes.remove(&shard);
        source.finished(shard, epoch);
    }
    for (shard, epoch) in dropped {
        lanes.remove(&shard);
        source.dropped(shard, epoch);
    }
    telemetry::set_in_flight(pending_size(lanes).0);
    Ok(())
}

async fn handle_request(
    shared: &Shared,
    lanes: &mut HashMap<Arc<str>, ShardLane>,
    request: LaneRequest,
) {
    match request {
        LaneRequest::Open {
            shard,
            epoch,
            parents,
            lease,
            reply,
        } => {
            // A lane of an older generation would hold the writer's lock: close it first.
            lanes.remove(&shard);
            let answer = match open_lane(shared, &shard, epoch, &parents, lease).await {
                Ok((checkpoint, Some(lane))) => {
                    lanes.insert(shard.clone(), lane);
                    OpenReply::Opened(checkpoint)
                }
                Ok((checkpoint, None)) => OpenReply::Opened(checkpoint),
                Err(OpenFailure::Parents(why)) => OpenReply::ParentsNotDone(why),
                Err(OpenFailure::Failed(why)) => OpenReply::Failed(why),
            };
            let _ = reply.send(answer);
        }
        LaneRequest::Close {
            shard,
            epoch,
            reply,
        } => {
            if lanes.get(&shard).is_some_and(|l| l.epoch == epoch)
                && let Some(lane) = lanes.remove(&shard)
            {
                info!(shard = %shard, dropped = lane.records.len(),
                      "Closed the shard's lane; its uncommitted records will be read again by its next owner");
            }
            let _ = reply.send(());
        }
    }
}

enum OpenFailure {
    Parents(String),
    Failed(String),
}

/// Checks the parents, recovers the shard's writer and builds its lane (`None` when the shard
/// is already finished).
async fn open_lane(
    shared: &Shared,
    shard: &str,
    epoch: u64,
    parents: &[String],
    lease: Option<Arc<LeaseClock>>,
) -> Result<(Option<ShardCheckpoint>, Option<ShardLane>), OpenFailure> {
    // The parents' final state, read without their locks (another process may hold them).
    let mut inherited: BTreeMap<String, DeviceCheckpoint> = BTreeMap::new();
    for parent in parents {
        let writer = shard_writer_id(&shared.stream, parent);
        let (path, options) = (
            shared.config.lake.path.clone(),
            shared.config.lake.options(),
        );
        let peeked = tokio::task::spawn_blocking(move || {
            sensorlake_sink::peek_writer(&path, &writer, &options)
        })
        .await
        .map_err(|e| OpenFailure::Failed(e.to_string()))?
        .map_err(|e| OpenFailure::Failed(e.to_string()))?;
        let checkpoint = ShardCheckpoint::from_sources(&peeked.sources)
            .map_err(|e| OpenFailure::Failed(e.to_string()))?;
        if !checkpoint.as_ref().is_some_and(|c| c.ended) {
            return Err(OpenFailure::Parents(format!(
                "parent {parent} is not read to its end yet"
            )));
        }
        for (device, cp) in peeked.devices {
            match inherited.get(&device) {
                Some(have) if have.seq >= cp.seq => {}
                _ => {
                    inherited.insert(device, cp);
                }
            }
        }
    }
    let writer = shard_writer_id(&shared.stream, shard);
    let spec = LakeSpec::of(&shared.config, &writer, shared.schema.clone());
    let (lake, recovered) = spec
        .open()
        .await
        .map_err(|e| OpenFailure::Failed(e.to_string()))?;
    let checkpoint = ShardCheckpoint::from_sources(&recovered.sources)
        .map_err(|e| OpenFailure::Failed(format!("writer {writer}: {e}")))?;
    info!(shard = %shard, writer = %writer, checkpoint = ?checkpoint.as_ref().and_then(|c| c.sequence.as_ref()),
          ended = checkpoint.as_ref().is_some_and(|c| c.ended), devices = recovered.devices.len(),
          inherited_devices = inherited.len(), "Opened shard lane");
    if checkpoint.as_ref().is_some_and(|c| c.ended) {
        return Ok((checkpoint, None));
    }
    // The parents' final device states, under the shard's own: commit records hold only the
    // devices a flush touched, so a device not yet seen in this shard keeps its parent's
    // checkpoint on every open, not only the first (as long as the parents are listed).
    let mut devices = inherited;
    for (device, cp) in recovered.devices {
        match devices.get(&device) {
            Some(have) if have.seq > cp.seq => {}
            _ => {
                devices.insert(device, cp);
            }
        }
    }
    let mut transformer = Transformer::new(
        shared.schema.clone(),
        shared.config.transform.clone(),
        shared.registry.clone(),
    );
    transformer.restore(devices);
    let lane = ShardLane {
        lane: Lane {
            transformer: Some(transformer),
            lake: Some(lake),
            yield_on_conflict: true,
            spec,
        },
        epoch,
        lease,
        checkpoint: checkpoint
            .clone()
            .unwrap_or_else(|| ShardCheckpoint::new(&shared.stream, shard)),
        records: Vec::new(),
        bytes: 0,
        end: false,
    };
    Ok((checkpoint, Some(lane)))
}
