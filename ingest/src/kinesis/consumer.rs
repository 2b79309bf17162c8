//! The long-lived Kinesis consumer: finds the stream's shards, decides which this process reads
//! (all of them, or those whose DynamoDB lease it holds), and runs one reader per shard.
//!
//! The pipeline owns the lake, so shard lifecycles are a conversation: the coordinator asks the
//! pipeline to [`LaneRequest::Open`] a shard (the pipeline recovers the shard's lake writer and
//! answers with the committed checkpoint, or says the shard's parents are not finished yet),
//! starts a reader from that checkpoint, and asks it to [`LaneRequest::Close`] a shard whose
//! lease is lost or handed off (uncommitted records are dropped: the next owner reads them
//! again from the committed checkpoint). When a closed shard's last records are committed the
//! pipeline reports it finished ([`KinesisSource::finished`]).
//!
//! Per-device order across a split or merge: a child shard is opened only when every parent
//! still in the stream has a committed `ended` checkpoint in the lake, whoever read it.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::checkpoint::{ShardCheckpoint, stream_name};
use super::client::{self, describe};
use super::config::{KinesisConfig, StartPosition};
use super::lease::{LeaseClock, LeaseError, Leases};
use super::reader::{ReaderExit, ReaderSpec, ShardBatch, Start, read_shard};

/// A shard as listed by ListShards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardInfo {
    /// The shard id.
    pub id: String,
    /// Its parents (a split has one, a merge two), whatever their state.
    pub parents: Vec<String>,
}

/// What the coordinator asks of the pipeline.
#[derive(Debug)]
pub enum LaneRequest {
    /// Open the shard's lake writer: check that every listed parent has an `ended`
    /// checkpoint, recover the writer (seeding device state from the parents when the shard
    /// has never committed), and answer.
    Open {
        /// The shard.
        shard: Arc<str>,
        /// This lane's generation; batches of other generations are dropped.
        epoch: u64,
        /// Parents still listed in the stream (an expired parent is not waited for).
        parents: Vec<String>,
        /// The shard's lease, when leases are on: no commit is made once it is not held.
        lease: Option<Arc<LeaseClock>>,
        /// The answer.
        reply: oneshot::Sender<OpenReply>,
    },
    /// Drop the shard's uncommitted records and close its writer; answer when done.
    Close {
        /// The shard.
        shard: Arc<str>,
        /// The generation to close (a newer one is left alone).
        epoch: u64,
        /// Answered once closed.
        reply: oneshot::Sender<()>,
    },
}

/// The pipeline's answer to [`LaneRequest::Open`].
#[derive(Debug)]
pub enum OpenReply {
    /// Open; reading resumes after this checkpoint (`None`: nothing committed yet). An `ended`
    /// checkpoint means the shard is finished: the pipeline does not keep it open.
    Opened(Option<ShardCheckpoint>),
    /// A parent has not been read to its end yet; ask again later.
    ParentsNotDone(String),
    /// The writer could not be opened (reported, retried at the next round).
    Failed(String),
}

/// Why the consumer could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] super::config::ConfigError),
    /// No stream configured.
    #[error("no stream given: set kinesis.stream or pass --kinesis STREAM")]
    NoStream,
    /// The stream cannot be listed.
    #[error(
        "cannot list the shards of Kinesis stream {stream:?}: {why}. Check the stream name, \
         AWS_REGION, the credentials, and AWS_ENDPOINT_URL_KINESIS if you use an emulator"
    )]
    Stream {
        /// The stream.
        stream: String,
        /// The service's answer.
        why: String,
    },
    /// The lease table cannot be used.
    #[error(transparent)]
    Lease(#[from] LeaseError),
}

/// The running consumer.
#[derive(Debug)]
pub struct KinesisSource {
    /// Records from the shard readers, in shard order (bounded: a slow pipeline stops polls).
    pub batches: mpsc::Receiver<ShardBatch>,
    /// Lane requests from the coordinator.
    pub requests: mpsc::UnboundedReceiver<LaneRequest>,
    finished: mpsc::UnboundedSender<(Arc<str>, u64)>,
    dropped: mpsc::UnboundedSender<(Arc<str>, u64)>,
    intake: CancellationToken,
    stop: CancellationToken,
    task: JoinHandle<()>,
    stream: String,
}

impl KinesisSource {
    /// Connects (lists the stream's shards once, creates the lease table if configured and
    /// missing) and starts the coordinator.
    ///
    /// # Errors
    /// [`StartError`] when the stream cannot be listed or the lease table cannot be used.
    pub async fn start(config: &KinesisConfig) -> Result<KinesisSource, StartError> {
        config.validate()?;
        let configured = config.stream.as_deref().ok_or(StartError::NoStream)?;
        let stream = stream_name(configured).to_owned();
        let sdk = client::aws_config_for_stream(configured).await;
        let kinesis = client::kinesis(&sdk);
        list_shards(&kinesis, &stream)
            .await
            .map_err(|why| StartError::Stream {
                stream: stream.clone(),
                why,
            })?;
        let leases = match &config.lease_table {
            Some(table) => Some(
                Leases::connect(
                    aws_sdk_dynamodb::Client::new(&sdk),
                    table,
                    &stream,
                    &config.worker_id(),
                    config.lease_duration(),
                )
                .await?,
            ),
            None => None,
        };
        let configured_start = match config.start_position {
            StartPosition::TrimHorizon => Start::TrimHorizon,
            StartPosition::Latest => Start::Latest,
            StartPosition::AtTimestamp => Start::AtTimestamp(
                config
                    .start_timestamp
                    .as_deref()
                    .and_then(sensorlake_core::time::parse_rfc3339)
                    .map_or(0, |us| us / 1000),
            ),
        };
        let (tx_batches, batches) = mpsc::channel(config.channel_capacity);
        let (tx_requests, requests) = mpsc::unbounded_channel();
        let (finished, rx_finished) = mpsc::unbounded_channel();
        let (dropped, rx_dropped) = mpsc::unbounded_channel();
        let (tx_events, rx_events) = mpsc::unbounded_channel();
        let intake = CancellationToken::new();
        let stop = CancellationToken::new();
        let round = match &leases {
            Some(_) => config.lease_duration() / 3,
            None => Duration::from_secs(config.discovery_interval_secs),
        };
        let coordinator = Coordinator {
            client: kinesis,
            stream: stream.clone(),
            spec: ReaderDefaults {
                limit: i32::try_from(config.max_records_per_call).unwrap_or(10_000),
                poll_interval: config.poll_interval(),
                idle_poll_interval: config.idle_poll_interval(),
            },
            configured_start,
            leases,
            tx_batches,
            tx_requests,
            tx_events,
            active: HashMap::new(),
            opening: HashSet::new(),
            finished: HashSet::new(),
            next_epoch: 1,
            intake: intake.clone(),
        };
        let task =
            tokio::spawn(coordinator.run(round, rx_finished, rx_dropped, rx_events, stop.clone()));
        Ok(KinesisSource {
            batches,
            requests,
            finished,
            dropped,
            intake,
            stop,
            task,
            stream,
        })
    }

    /// The stream's name.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// Tells the coordinator that the closed shard's last records (and its `ended`
    /// checkpoint) are committed: its children may be read.
    pub fn finished(&self, shard: Arc<str>, epoch: u64) {
        let _ = self.finished.send((shard, epoch));
    }

    /// Tells the coordinator that the pipeline gave the shard's lane up without committing
    /// what it held (its lease ran out, or another process committed as its writer): the
    /// reader stops, and the shard is opened again from its committed checkpoint if this
    /// process still owns it.
    pub fn dropped(&self, shard: Arc<str>, epoch: u64) {
        let _ = self.dropped.send((shard, epoch));
    }

    /// Stops every reader and the opening of shards; batches already sent stay in the channel.
    pub fn stop_intake(&self) {
        self.intake.cancel();
    }

    /// Stops the coordinator and releases this process's leases (so other consumers take the
    /// shards at once instead of waiting for them to expire). Call after the last commit.
    pub async fn shutdown(self, timeout: Duration) {
        self.intake.cancel();
        self.stop.cancel();
        if tokio::time::timeout(timeout, self.task).await.is_err() {
            warn!("The Kinesis coordinator did not stop in time; its leases will expire instead");
        }
    }
}

/// Reads the stream's shard list (every page).
///
/// # Errors
/// The service's error, described.
pub async fn list_shards(
    client: &aws_sdk_kinesis::Client,
    stream: &str,
) -> Result<Vec<ShardInfo>, String> {
    let mut shards = Vec::new();
    let mut token: Option<String> = None;
    loop {
        // NextToken and StreamName are mutually exclusive in ListShards.
        let req = match &token {
            Some(t) => client.list_shards().next_token(t),
            None => client.list_shards().stream_name(stream),
        };
        let out = req.send().await.map_err(|e| describe(&e))?;
        for s in out.shards.unwrap_or_default() {
            let parents = [s.parent_shard_id, s.adjacent_parent_shard_id]
                .into_iter()
                .flatten()
                .collect();
            shards.push(ShardInfo {
                id: s.shard_id,
                parents,
            });
        }
        match out.next_token {
            Some(t) if !t.is_empty() => token = Some(t),
            _ => break,
        }
    }
    Ok(shards)
}

#[derive(Debug, Clone)]
struct ReaderDefaults {
    limit: i32,
    poll_interval: Duration,
    idle_poll_interval: Duration,
}

/// A shard being read.
#[derive(Debug)]
struct Active {
    epoch: u64,
    cancel: CancellationToken,
    /// `None` once awaited (a reader that ended its shard, waiting for the end commit).
    reader: Option<JoinHandle<Result<ReaderExit, super::reader::ReaderError>>>,
}

/// Answers from the pipeline, delivered back into the coordinator's loop.
#[derive(Debug)]
enum Event {
    Opened {
        shard: ShardInfo,
        epoch: u64,
        reply: Result<OpenReply, oneshot::error::RecvError>,
    },
    Closed {
        shard: Arc<str>,
        handoff_to: Option<String>,
    },
}

struct Coordinator {
    client: aws_sdk_kinesis::Client,
    stream: String,
    spec: ReaderDefaults,
    configured_start: Start,
    leases: Option<Leases>,
    tx_batches: mpsc::Sender<ShardBatch>,
    tx_requests: mpsc::UnboundedSender<LaneRequest>,
    tx_events: mpsc::UnboundedSender<Event>,
    active: HashMap<Arc<str>, Active>,
    /// Shards with an Open or Close request in flight.
    opening: HashSet<String>,
    /// Shards read to their end and committed as such.
    finished: HashSet<String>,
    next_epoch: u64,
    intake: CancellationToken,
}

impl Coordinator {
    async fn run(
        mut self,
        round: Duration,
        mut finished: mpsc::UnboundedReceiver<(Arc<str>, u64)>,
        mut dropped: mpsc::UnboundedReceiver<(Arc<str>, u64)>,
        mut events: mpsc::UnboundedReceiver<Event>,
        stop: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(round);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                _ = tick.tick() => {
                    if self.intake.is_cancelled() {
                        // Stopping: the last commits are running; keep the leases until then.
                        self.renew_only().await;
                    } else {
                        self.round().await;
                    }
                }
                Some((shard, epoch)) = finished.recv() => self.on_finished(&shard, epoch).await,
                Some((shard, epoch)) = dropped.recv() => {
                    if self.active.get(shard.as_ref()).is_some_and(|a| a.epoch == epoch) {
                        self.stop_shard(&shard, None);
                    }
                }
                Some(event) = events.recv() => self.on_event(event).await,
            }
        }
        for (_, a) in self.active.drain() {
            a.cancel.cancel();
        }
        if let Some(leases) = &mut self.leases {
            leases.release_all().await;
        }
    }

    async fn round(&mut self) {
        let shards = match list_shards(&self.client, &self.stream).await {
            Ok(s) => s,
            Err(e) => {
                metrics::counter!("sensorlake_kinesis_list_shards_errors_total").increment(1);
                warn!(stream = %self.stream, error = %e, "ListShards failed; keeping the current shards");
                // The leases must still be renewed, or other consumers take them.
                self.renew_only().await;
                return;
            }
        };
        self.reap_readers().await;
        let listed: HashSet<&str> = shards.iter().map(|s| s.id.as_str()).collect();
        let open: Vec<String> = shards
            .iter()
            .filter(|s| !self.finished.contains(&s.id))
            .map(|s| s.id.clone())
            .collect();
        // The shards this process may read now.
        let owned: HashSet<String> = match &mut self.leases {
            None => open.iter().cloned().collect(),
            Some(leases) => {
                let r = leases.round(&open).await;
                for shard in r.lost {
                    self.stop_shard(&shard, None);
                }
                let mut owned = r.owned;
                for (shard, to) in r.handoff {
                    owned.remove(&shard);
                    // An Open or Close of this shard is in flight: hand it off at a later
                    // round (the request stays in the table), once the lane's state is known.
                    if !self.opening.contains(&shard) {
                        self.stop_shard(&shard, Some(to));
                    }
                }
                // Whatever is read without its lease (lost in a renew-only round) stops.
                let unowned: Vec<Arc<str>> = self
                    .active
                    .keys()
                    .filter(|k| !owned.contains(k.as_ref()))
                    .cloned()
                    .collect();
                for shard in unowned {
                    self.stop_shard(&shard, None);
                }
                owned
            }
        };
        metrics::gauge!("sensorlake_kinesis_shards_reading").set(self.active.len() as f64);
        for shard in &shards {
            if !owned.contains(&shard.id)
                || self.finished.contains(&shard.id)
                || self.opening.contains(&shard.id)
                || self.active.contains_key(shard.id.as_str())
            {
                continue;
            }
            let parents: Vec<String> = shard
                .parents
                .iter()
                .filter(|p| listed.contains(p.as_str()))
                .cloned()
                .collect();
            if parents
                .iter()
                .any(|p| self.active.contains_key(p.as_str()) || self.opening.contains(p))
            {
                continue;
            }
            self.open_shard(shard.clone(), parents);
        }
    }

    /// Renews the held leases only; shards whose lease was lost stop.
    async fn renew_only(&mut self) {
        let lost = match &mut self.leases {
            Some(leases) => leases.renew_only().await,
            None => return,
        };
        for shard in lost {
            self.stop_shard(&shard, None);
        }
    }

    /// Asks the pipeline to open `shard`; the answer comes back as [`Event::Opened`].
    fn open_shard(&mut self, shard: ShardInfo, parents: Vec<String>) {
        let epoch = self.next_epoch;
        self.next_epoch += 1;
        let (reply, rx) = oneshot::channel();
        let id: Arc<str> = shard.id.as_str().into();
        if self
            .tx_requests
            .send(LaneRequest::Open {
                shard: id,
                epoch,
                parents,
                lease: self.leases.as_ref().and_then(|l| l.clock(&shard.id)),
                reply,
            })
            .is_err()
        {
            return;
        }
        self.opening.insert(shard.id.clone());
        let events = self.tx_events.clone();
        tokio::spawn(async move {
            let reply = rx.await;
            let _ = events.send(Event::Opened {
                shard,
                epoch,
                reply,
            });
        });
    }

    /// Stops reading `shard`, has the pipeline drop its uncommitted records, then releases
    /// (or hands off) its lease — in that order, so two processes never read it at once.
    fn stop_shard(&mut self, shard: &str, handoff_to: Option<String>) {
        let Some(active) = self.active.remove(shard) else {
            // Not reading it (still opening, or never started): just give the lease away.
            if let Some(to) = handoff_to {
                let _ = self.tx_events.send(Event::Closed {
                    shard: shard.into(),
                    handoff_to: Some(to),
                });
            }
            return;
        };
        info!(stream = %self.stream, shard = %shard, handoff_to = ?handoff_to, "Stopping shard (lease lost or handed off)");
        active.cancel.cancel();
        let (reply, rx) = oneshot::channel();
        let id: Arc<str> = shard.into();
        let _ = self.tx_requests.send(LaneRequest::Close {
            shard: id.clone(),
            epoch: active.epoch,
            reply,
        });
        self.opening.insert(shard.to_owned());
        let events = self.tx_events.clone();
        tokio::spawn(async move {
            if let Some(reader) = active.reader {
                let _ = reader.await;
            }
            let _ = rx.await;
            let _ = events.send(Event::Closed {
                shard: id,
                handoff_to,
            });
        });
    }

    /// Closes a lane no reader was started for.
    fn close_lane(&mut self, shard: &str, epoch: u64) {
        let (reply, _rx) = oneshot::channel();
        let _ = self.tx_requests.send(LaneRequest::Close {
            shard: shard.into(),
            epoch,
            reply,
        });
    }

    async fn on_event(&mut self, event: Event) {
        match event {
            Event::Opened {
                shard,
                epoch,
                reply,
            } => {
                self.opening.remove(&shard.id);
                match reply {
                    Ok(OpenReply::Opened(checkpoint)) => {
                        if checkpoint.as_ref().is_some_and(|c| c.ended) {
                            debug!(shard = %shard.id, "Shard already finished");
                            self.finished.insert(shard.id.clone());
                            if let Some(leases) = &mut self.leases {
                                leases.mark_ended(&shard.id).await;
                            }
                            return;
                        }
                        let lease = self.leases.as_ref().map(|l| l.clock(&shard.id));
                        if self.intake.is_cancelled() || matches!(lease, Some(None)) {
                            // Stopping, or the lease went while the lane was being opened.
                            self.close_lane(&shard.id, epoch);
                            return;
                        }
                        let start = Start::from_checkpoint(
                            checkpoint.as_ref(),
                            !shard.parents.is_empty(),
                            &self.configured_start,
                        );
                        let cancel = self.intake.child_token();
                        let spec = ReaderSpec {
                            stream: self.stream.clone(),
                            shard: shard.id.as_str().into(),
                            epoch,
                            start,
                            committed: checkpoint,
                            limit: self.spec.limit,
                            poll_interval: self.spec.poll_interval,
                            idle_poll_interval: self.spec.idle_poll_interval,
                            lease: lease.flatten(),
                        };
                        let reader = tokio::spawn(read_shard(
                            self.client.clone(),
                            spec,
                            self.tx_batches.clone(),
                            cancel.clone(),
                        ));
                        self.active.insert(
                            shard.id.as_str().into(),
                            Active {
                                epoch,
                                cancel,
                                reader: Some(reader),
                            },
                        );
                    }
                    Ok(OpenReply::ParentsNotDone(why)) => {
                        debug!(shard = %shard.id, why, "Waiting for the parent shards to be read to their ends");
                    }
                    Ok(OpenReply::Failed(why)) => {
                        warn!(shard = %shard.id, error = %why, "Could not open the shard's lake writer; retrying at the next round");
                    }
                    Err(_) => {}
                }
            }
            Event::Closed { shard, handoff_to } => {
                self.opening.remove(shard.as_ref());
                if let Some(leases) = &mut self.leases {
                    leases.release(&shard, handoff_to.as_deref()).await;
                }
            }
        }
    }

    async fn on_finished(&mut self, shard: &str, epoch: u64) {
        if self.active.get(shard).is_some_and(|a| a.epoch == epoch) {
            self.active.remove(shard);
        }
        info!(stream = %self.stream, shard = %shard, "Shard finished: every record is committed");
        self.finished.insert(shard.to_owned());
        if let Some(leases) = &mut self.leases {
            leases.mark_ended(shard).await;
        }
    }

    /// Collects readers that stopped on their own: a fatal error closes the lane so the shard
    /// is opened again (from its committed checkpoint) at a later round.
    async fn reap_readers(&mut self) {
        let done: Vec<Arc<str>> = self
            .active
            .iter()
            .filter(|(_, a)| a.reader.as_ref().is_some_and(JoinHandle::is_finished))
            .map(|(k, _)| k.clone())
            .collect();
        for shard in done {
            let Some(reader) = self.active.get_mut(&shard).and_then(|a| a.reader.take()) else {
                continue;
            };
            match reader.await {
                // Waiting for the pipeline to commit the end marker and report it finished.
                Ok(Ok(ReaderExit::Ended)) => continue,
                Ok(Ok(exit)) => debug!(shard = %shard, ?exit, "Reader stopped"),
                Ok(Err(e)) => {
                    error!(error = %e, "Shard reader failed; the shard is opened again at a later round")
                }
                Err(e) => error!(shard = %shard, error = %e, "Shard reader panicked (a bug)"),
            }
            self.stop_shard(&shard.clone(), None);
        }
    }
}
