//! The Kinesis transport of `sensorlake simulate`: PutRecords batches, partition key = device
//! id, optionally KPL-aggregated.
//!
//! # Order
//! The pipeline needs each device's readings in order (`not_monotonic` compares a reading with
//! the device's previous one), and Kinesis keeps order only per shard and across calls: inside
//! one PutRecords call it promises none, and a failed entry retried in a later call lands after
//! the entries of its call that succeeded. So a `Batcher` (a pure struct) keeps one queue per
//! partition key and puts **at most one Kinesis record per key in a call**, calls go one at a
//! time, and an entry that failed goes back to the front of its key's queue: a device's next
//! reading is sent only once the one before it is in the stream. Up to 500 keys share a call
//! (and 5 MiB), so a fleet of few devices sends small calls; aggregation makes them fuller.
//!
//! # KPL aggregation
//! With [`KinesisOptions::kpl_share`] > 0 that share of the readings, drawn per reading from
//! the fleet's seed, is sent inside KPL aggregates
//! ([`kpl::aggregate`]): consecutive aggregated
//! readings of one device, up to [`KinesisOptions::kpl_max_records`] and the KPL's 50 KiB, make
//! one Kinesis record whose (outer) partition key is that device's. An aggregate lands on the
//! shard of its outer key, so aggregating one device's readings keeps every reading on its
//! device's shard, as a plain record would be.
//!
//! # What the manifest promises
//! A message is in the manifest once PutRecords gave the Kinesis record carrying it a sequence
//! number. Entries that fail (`ErrorCode`, counted in `FailedRecordCount`) are retried, alone,
//! after a capped jittered backoff; so are whole calls that fail for a reason that can pass
//! (throttling, 5xx, a timeout, a refused connection). A call whose answer was lost may have
//! been written and is then written again: the pipeline drops the duplicate readings by
//! (device_id, seq). At the end the run waits (up to [`ACK_WAIT`](super::ACK_WAIT)) for the
//! last entries; what is still unwritten is left out, listed as unconfirmed, and the run returns
//! [`SimError::KinesisUnconfirmed`]. A failure that cannot pass (the stream deleted, access
//! denied, no successful call for [`GIVE_UP_AFTER`]) ends publishing with
//! [`SimError::KinesisFailed`]; both carry the partial manifest.
//!
//! # Where
//! The endpoint, region and credentials come from the standard AWS environment
//! (`AWS_ENDPOINT_URL_KINESIS`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`, `AWS_PROFILE`, …), unless
//! [`KinesisOptions::client`] gives a client. Before sending anything the run resolves the
//! credentials (from the environment) and calls DescribeStreamSummary, so a missing stream, missing credentials or an
//! unreachable endpoint fail at once with what to do. A stream ARN is sent as `StreamARN`
//! (kinesalite knows only names: give it the name).

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use aws_sdk_kinesis::config::ProvideCredentials;
use aws_sdk_kinesis::error::SdkError;
use aws_sdk_kinesis::operation::put_records::PutRecordsError;
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::{PutRecordsRequestEntry, StreamStatus};
use sensorlake_ingest::backoff::Backoff;
use sensorlake_ingest::kinesis::arn_parts;
use sensorlake_ingest::kinesis::client::{describe, error_chain};
use sensorlake_ingest::kinesis::kpl;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, sleep, sleep_until};
use tracing::{debug, info, warn};

use super::{SimStats, Transport, wait_for_confirmations};
use crate::error::SimError;
use crate::fleet::{Expect, Fleet, Message};
use crate::manifest::{Manifest, ManifestBuilder};
use crate::rng::Rng;

/// Records per PutRecords call at most (the service's limit).
pub const MAX_BATCH_RECORDS: usize = 500;
/// Bytes per PutRecords call at most, data and partition keys (the service's limit).
pub const MAX_BATCH_BYTES: usize = 5 << 20;
/// Bytes per Kinesis record at most, data and partition key (the service's limit).
pub const MAX_RECORD_BYTES: usize = 1 << 20;
/// User record data per aggregate at most: the KPL's default `AggregationMaxSize`. A single
/// larger reading still goes out as an aggregate of one.
pub const MAX_AGGREGATE_DATA_BYTES: usize = 51_200;
/// A run gives up when no PutRecords call has succeeded for this long.
pub const GIVE_UP_AFTER: Duration = Duration::from_secs(60);
/// The manifest's `qos`: Kinesis confirms every record it writes, like a QoS 1 PUBACK.
pub(crate) const MANIFEST_QOS: u8 = 1;
/// Messages queued between the publishing loop and the sender task.
const QUEUE: usize = 1024;
/// Messages the batcher holds at most; past it the queue fills and the loop waits.
const MAX_HELD: usize = 20_000;
/// Backoff after failed entries or calls.
const RETRY_BASE: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Where and how to publish to Kinesis.
#[derive(Debug, Clone)]
pub struct KinesisOptions {
    /// The stream's name, or its ARN (`arn:aws:kinesis:REGION:ACCOUNT:stream/NAME`).
    pub stream: String,
    /// Share of readings sent inside KPL aggregates, 0.0–1.0 (0: every reading is its own
    /// Kinesis record).
    pub kpl_share: f64,
    /// Readings per aggregate at most (at least 1).
    pub kpl_max_records: usize,
    /// Longest a reading waits for its call to fill up (the KPL's `RecordMaxBufferedTime`).
    pub linger: Duration,
    /// The client to use; `None` (the default) builds one from the standard AWS environment.
    pub client: Option<KinesisClient>,
}

/// A Kinesis client and how to name its endpoint in messages.
#[derive(Debug, Clone)]
pub struct KinesisClient {
    /// The client.
    pub client: aws_sdk_kinesis::Client,
    /// Its endpoint, for messages (`http://127.0.0.1:4567`).
    pub endpoint: String,
}

impl KinesisOptions {
    /// Publishing to `stream` (a name or ARN): no aggregation, 100 ms linger, the client from
    /// the standard AWS environment.
    pub fn new(stream: impl Into<String>) -> Self {
        Self {
            stream: stream.into(),
            kpl_share: 0.0,
            kpl_max_records: 100,
            linger: Duration::from_millis(100),
            client: None,
        }
    }

    /// Checks the options without touching the network.
    ///
    /// # Errors
    /// [`SimError::InvalidOptions`] saying which option is wrong.
    pub fn validate(&self) -> Result<(), SimError> {
        let bad = |m: String| Err(SimError::InvalidOptions(m));
        if self.stream.is_empty() {
            return bad("the Kinesis stream name is empty".into());
        }
        if self.stream.starts_with("arn:") && arn_parts(&self.stream).is_none() {
            return bad(format!(
                "{} is not a Kinesis stream ARN (arn:aws:kinesis:REGION:ACCOUNT:stream/NAME)",
                self.stream
            ));
        }
        if !(0.0..=1.0).contains(&self.kpl_share) {
            return bad(format!(
                "kpl_share must be between 0.0 and 1.0, got {}",
                self.kpl_share
            ));
        }
        if self.kpl_max_records == 0 {
            return bad("kpl_max_records must be at least 1".into());
        }
        Ok(())
    }
}

/// How requests name the stream.
#[derive(Debug, Clone)]
enum Target {
    Name(String),
    Arn(String),
}

impl Target {
    fn new(stream: &str) -> Self {
        if stream.starts_with("arn:") {
            Target::Arn(stream.to_owned())
        } else {
            Target::Name(stream.to_owned())
        }
    }

    /// (`StreamName`, `StreamARN`) of a request.
    fn name_and_arn(&self) -> (Option<String>, Option<String>) {
        match self {
            Target::Name(n) => (Some(n.clone()), None),
            Target::Arn(a) => (None, Some(a.clone())),
        }
    }
}

/// The partition key of a message: the device id at the end of its topic
/// (`telemetry/{site}/{type}/{device_id}`), so that a `topic_mismatch` reading carries another
/// device's key, as it carries another device's topic over MQTT.
fn partition_key(topic: &str) -> &str {
    match topic.rsplit('/').next() {
        Some(id) if !id.is_empty() => id,
        _ => topic,
    }
}

/// The stream is ready: the transport's side of the sender task.
pub(super) struct KinesisTransport {
    tx: mpsc::Sender<Pending>,
    /// Decides which readings are aggregated, from the fleet's seed.
    rng: Rng,
    kpl_share: f64,
    /// Messages the sender task took.
    handed: u64,
    progress_rx: watch::Receiver<u64>,
    stop_tx: watch::Sender<bool>,
    sender: tokio::task::JoinHandle<SenderOutcome>,
    stream: String,
    endpoint: String,
}

impl KinesisTransport {
    /// Builds the client, checks the credentials and that the stream takes records, and starts
    /// the sender task; `Ok(None)` when `stop` completed first.
    ///
    /// # Errors
    /// [`SimError::KinesisNoRegion`], [`SimError::KinesisCredentials`],
    /// [`SimError::KinesisUnreachable`], [`SimError::KinesisStreamNotFound`],
    /// [`SimError::KinesisStreamNotActive`] or [`SimError::KinesisRequest`]: nothing was sent.
    pub(super) async fn connect(
        opts: &KinesisOptions,
        fleet: &Fleet,
        stats: Arc<SimStats>,
        mut stop: Pin<&mut impl Future<Output = ()>>,
    ) -> Result<Option<Self>, SimError> {
        let target = Target::new(&opts.stream);
        let ready = async {
            let kc = match &opts.client {
                Some(kc) => kc.clone(),
                None => client_from_env(&opts.stream).await?,
            };
            check_stream(&kc, &opts.stream, &target).await?;
            Ok::<_, SimError>(kc)
        };
        let kc = tokio::select! {
            r = ready => r?,
            () = &mut stop => return Ok(None),
        };
        info!(stream = %opts.stream, endpoint = %kc.endpoint, "Publishing to the Kinesis stream");
        let (tx, rx) = mpsc::channel(QUEUE);
        let (progress_tx, progress_rx) = watch::channel(0u64);
        let (stop_tx, stop_rx) = watch::channel(false);
        let sender = tokio::spawn(send_batches(Sender {
            rx,
            client: kc.client,
            target,
            batcher: Batcher::new(opts.kpl_max_records),
            builder: ManifestBuilder::new(fleet, MANIFEST_QOS),
            confirmed: 0,
            refused: 0,
            stats,
            progress: progress_tx,
            stop: stop_rx,
            linger: opts.linger,
        }));
        Ok(Some(Self {
            tx,
            rng: Rng::new(fleet.spec().seed ^ 0x4b50_4c5f_5348_4152),
            kpl_share: opts.kpl_share,
            handed: 0,
            progress_rx,
            stop_tx,
            sender,
            stream: opts.stream.clone(),
            endpoint: kc.endpoint,
        }))
    }
}

impl Transport for KinesisTransport {
    async fn send(&mut self, msg: Message) -> bool {
        let aggregate = self.kpl_share > 0.0 && self.rng.chance(self.kpl_share);
        let pending = Pending {
            key: partition_key(&msg.topic).to_owned(),
            payload: msg.payload,
            expect: msg.expect,
            aggregate,
        };
        // Cancelled while the queue is full, the message was not taken: it is not counted.
        if self.tx.send(pending).await.is_err() {
            return false; // The sender task ended; `finish` reports why.
        }
        self.handed += 1;
        true
    }

    async fn finish(self, ack_wait: Duration) -> Result<Manifest, SimError> {
        let Self {
            tx,
            handed,
            mut progress_rx,
            stop_tx,
            sender,
            stream,
            endpoint,
            ..
        } = self;
        // No more input: the sender sends what it holds without waiting for fuller calls.
        drop(tx);
        let (all_confirmed, waited) =
            wait_for_confirmations(&mut progress_rx, handed, ack_wait).await;
        if !all_confirmed {
            warn!(stream = %stream, handed, confirmed = *progress_rx.borrow(), "Not every message was confirmed");
        }
        let _ = stop_tx.send(true);
        let outcome = match sender.await {
            Ok(o) => o,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        };
        let unconfirmed = outcome.builder.unconfirmed();
        let manifest = outcome.builder.build();
        info!(
            stream = %stream,
            confirmed = manifest.messages,
            unconfirmed,
            "Simulation finished"
        );
        match outcome.error {
            _ if unconfirmed == 0 => Ok(manifest),
            Some(reason) => Err(SimError::KinesisFailed {
                stream,
                endpoint,
                confirmed: manifest.messages,
                unconfirmed,
                reason,
                manifest: Box::new(manifest),
            }),
            None => Err(SimError::KinesisUnconfirmed {
                stream,
                endpoint,
                unconfirmed,
                total: handed,
                waited,
                manifest: Box::new(manifest),
            }),
        }
    }
}

/// The endpoint the standard environment points Kinesis at, for messages.
fn endpoint_from_env(region: &str) -> String {
    ["AWS_ENDPOINT_URL_KINESIS", "AWS_ENDPOINT_URL"]
        .iter()
        .find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
        .unwrap_or_else(|| format!("the AWS endpoint of region {region}"))
}

/// A client from the standard AWS environment (see [`sensorlake_ingest::kinesis::client`]);
/// the region of a stream ARN when none is configured.
async fn client_from_env(stream: &str) -> Result<KinesisClient, SimError> {
    // Before any TLS: several rustls providers are compiled in, so none is picked by itself.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let config = sensorlake_ingest::kinesis::client::aws_config_for_stream(stream).await;
    if config.region().is_none() {
        return Err(SimError::KinesisNoRegion {
            stream: stream.to_owned(),
        });
    }
    // Resolved once here, so that missing credentials are named as such rather than as a
    // failed request.
    let no_credentials = |detail: String| SimError::KinesisCredentials {
        stream: stream.to_owned(),
        detail,
    };
    let provider = config
        .credentials_provider()
        .ok_or_else(|| no_credentials("no credentials provider is configured".into()))?;
    provider
        .provide_credentials()
        .await
        .map_err(|e| no_credentials(error_chain(&e)))?;
    let region = config.region().map(|r| r.to_string()).unwrap_or_default();
    Ok(KinesisClient {
        client: aws_sdk_kinesis::Client::new(&config),
        endpoint: endpoint_from_env(&region),
    })
}

/// Checks that the stream exists and takes records.
async fn check_stream(kc: &KinesisClient, stream: &str, target: &Target) -> Result<(), SimError> {
    let (name, arn) = target.name_and_arn();
    let described = kc
        .client
        .describe_stream_summary()
        .set_stream_name(name)
        .set_stream_arn(arn)
        .send()
        .await;
    let endpoint = kc.endpoint.clone();
    let summary = match described {
        Ok(out) => out.stream_description_summary,
        Err(e) => {
            return Err(match &e {
                SdkError::ServiceError(s) if s.err().is_resource_not_found_exception() => {
                    SimError::KinesisStreamNotFound {
                        stream: stream.to_owned(),
                        endpoint,
                    }
                }
                SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) => {
                    SimError::KinesisUnreachable {
                        stream: stream.to_owned(),
                        endpoint,
                        detail: describe(&e),
                    }
                }
                SdkError::ServiceError(s) => SimError::KinesisRequest {
                    op: "DescribeStreamSummary",
                    stream: stream.to_owned(),
                    endpoint,
                    detail: describe(&e),
                    hint: if s.err().is_access_denied_exception() {
                        "check that the credentials may call kinesis:DescribeStreamSummary and \
                         kinesis:PutRecords on the stream"
                    } else {
                        "check the credentials, AWS_REGION, and the stream name or ARN"
                    },
                },
                _ => SimError::KinesisRequest {
                    op: "DescribeStreamSummary",
                    stream: stream.to_owned(),
                    endpoint,
                    detail: describe(&e),
                    hint: "check that AWS_ENDPOINT_URL_KINESIS is a Kinesis endpoint URL",
                },
            });
        }
    };
    match summary.map(|s| s.stream_status) {
        Some(StreamStatus::Active | StreamStatus::Updating) | None => Ok(()),
        Some(status) => Err(SimError::KinesisStreamNotActive {
            stream: stream.to_owned(),
            endpoint,
            status: status.as_str().to_owned(),
        }),
    }
}

/// One message waiting to be sent.
#[derive(Debug)]
struct Pending {
    key: String,
    payload: Vec<u8>,
    expect: Expect,
    /// Whether it goes inside a KPL aggregate.
    aggregate: bool,
}

/// One Kinesis record: a message, or an aggregate of consecutive messages of one key.
#[derive(Debug)]
struct Unit {
    key: String,
    data: Vec<u8>,
    expects: Vec<Expect>,
    /// What its messages count for in `Batcher::held_bytes`.
    held_bytes: usize,
}

impl Unit {
    /// What it counts for against a call's 5 MiB.
    fn size(&self) -> usize {
        self.data.len() + self.key.len()
    }
}

/// The messages of one partition key, oldest first.
#[derive(Debug, Default)]
struct KeyQueue {
    /// A record whose entry failed: it goes first.
    retry: Option<Unit>,
    pending: VecDeque<Pending>,
    /// Whether the key is in `Batcher::ready`.
    listed: bool,
}

impl KeyQueue {
    fn is_empty(&self) -> bool {
        self.retry.is_none() && self.pending.is_empty()
    }
}

/// Groups messages into PutRecords calls that keep each key's order (see the
/// [module docs](self)): one record per key per call, failed records first next time. Pure:
/// no I/O, no clock.
#[derive(Debug)]
struct Batcher {
    queues: HashMap<String, KeyQueue>,
    /// Keys with something to send, each once, in the order they became ready.
    ready: VecDeque<String>,
    max_aggregate_records: usize,
    /// Messages held, in queues and in retry records.
    held: usize,
    /// Their bytes (data and keys), roughly what a call would carry.
    held_bytes: usize,
}

impl Batcher {
    fn new(max_aggregate_records: usize) -> Self {
        Self {
            queues: HashMap::new(),
            ready: VecDeque::new(),
            max_aggregate_records: max_aggregate_records.max(1),
            held: 0,
            held_bytes: 0,
        }
    }

    /// Whether a message can be sent at all: it fits in one Kinesis record.
    fn accepts(p: &Pending) -> bool {
        p.payload.len() + p.key.len() <= MAX_RECORD_BYTES
    }

    /// Queues a message behind the others of its key (one that [`Batcher::accepts`]).
    fn push(&mut self, p: Pending) {
        debug_assert!(Self::accepts(&p), "checked by the caller");
        self.held += 1;
        self.held_bytes += p.payload.len() + p.key.len();
        let q = self.queues.entry(p.key.clone()).or_default();
        if !q.listed {
            q.listed = true;
            self.ready.push_back(p.key.clone());
        }
        q.pending.push_back(p);
    }

    fn is_empty(&self) -> bool {
        self.held == 0
    }

    /// Whether a call would be full: 500 keys, or 5 MiB, or as much as the batcher holds.
    fn is_full(&self) -> bool {
        self.ready.len() >= MAX_BATCH_RECORDS
            || self.held_bytes >= MAX_BATCH_BYTES
            || self.held >= MAX_HELD
    }

    /// The next call's records: the next record of up to 500 keys, within 5 MiB.
    fn next_batch(&mut self) -> Vec<Unit> {
        let mut batch: Vec<Unit> = Vec::new();
        let mut bytes = 0;
        let mut again = Vec::new();
        while batch.len() < MAX_BATCH_RECORDS {
            let Some(key) = self.ready.pop_front() else {
                break;
            };
            let Some(q) = self.queues.get_mut(&key) else {
                continue;
            };
            q.listed = false;
            let Some(unit) = q
                .retry
                .take()
                .or_else(|| take_unit(&key, &mut q.pending, self.max_aggregate_records))
            else {
                continue;
            };
            if !batch.is_empty() && bytes + unit.size() > MAX_BATCH_BYTES {
                q.retry = Some(unit);
                q.listed = true;
                self.ready.push_front(key);
                break;
            }
            bytes += unit.size();
            self.held -= unit.expects.len();
            self.held_bytes -= unit.held_bytes;
            if q.is_empty() {
                self.queues.remove(&key);
            } else {
                again.push(key);
            }
            batch.push(unit);
        }
        for key in again {
            if let Some(q) = self.queues.get_mut(&key)
                && !q.listed
            {
                q.listed = true;
                self.ready.push_back(key);
            }
        }
        batch
    }

    /// A record whose entry (or call) failed: first of its key next time.
    fn put_back(&mut self, unit: Unit) {
        self.held += unit.expects.len();
        self.held_bytes += unit.held_bytes;
        let q = self.queues.entry(unit.key.clone()).or_default();
        debug_assert!(q.retry.is_none(), "one record per key per call");
        if !q.listed {
            q.listed = true;
            self.ready.push_front(unit.key.clone());
        }
        q.retry = Some(unit);
    }

    /// Every message still held, in no particular order.
    fn drain(&mut self) -> Vec<Expect> {
        self.ready.clear();
        self.held = 0;
        self.held_bytes = 0;
        let mut out = Vec::new();
        for (_, q) in self.queues.drain() {
            out.extend(q.retry.into_iter().flat_map(|u| u.expects));
            out.extend(q.pending.into_iter().map(|p| p.expect));
        }
        out
    }
}

/// The next record of a key: one plain message, or consecutive aggregated messages (up to
/// `max_records` and [`MAX_AGGREGATE_DATA_BYTES`]) packed as one KPL aggregate.
fn take_unit(key: &str, pending: &mut VecDeque<Pending>, max_records: usize) -> Option<Unit> {
    let plain = |p: Pending| Unit {
        key: key.to_owned(),
        held_bytes: p.payload.len() + key.len(),
        data: p.payload,
        expects: vec![p.expect],
    };
    let first = pending.pop_front()?;
    if !first.aggregate {
        return Some(plain(first));
    }
    let mut members = vec![first];
    let mut data_bytes = members[0].payload.len();
    while members.len() < max_records
        && let Some(next) = pending.front()
        && next.aggregate
        && data_bytes + next.payload.len() <= MAX_AGGREGATE_DATA_BYTES
    {
        data_bytes += next.payload.len();
        members.extend(pending.pop_front());
    }
    let records: Vec<(&str, &[u8])> = members.iter().map(|p| (key, &p.payload[..])).collect();
    let data = kpl::aggregate(&records);
    if data.len() + key.len() > MAX_RECORD_BYTES && members.len() == 1 {
        // One reading near the record limit does not fit with the aggregate's framing.
        return members.pop().map(plain);
    }
    Some(Unit {
        key: key.to_owned(),
        data,
        held_bytes: data_bytes + members.len() * key.len(),
        expects: members.into_iter().map(|p| p.expect).collect(),
    })
}

/// The sender task's state.
struct Sender {
    rx: mpsc::Receiver<Pending>,
    client: aws_sdk_kinesis::Client,
    target: Target,
    batcher: Batcher,
    builder: ManifestBuilder,
    /// Messages written, and messages given up at once (larger than a record): together what
    /// the final wait waits for.
    confirmed: u64,
    refused: u64,
    stats: Arc<SimStats>,
    progress: watch::Sender<u64>,
    /// Set (or dropped) when the run gives up waiting.
    stop: watch::Receiver<bool>,
    linger: Duration,
}

/// What the sender task leaves behind.
#[derive(Debug)]
struct SenderOutcome {
    builder: ManifestBuilder,
    /// Why publishing stopped early, and what to check.
    error: Option<String>,
}

/// How one PutRecords call went.
enum Call {
    /// Answered: whether each entry was written, in request order.
    Done(Vec<bool>),
    /// Failed as a whole, for a reason that can pass.
    Retry(String),
    /// Failed for a reason that will not pass.
    Fatal(String),
}

impl Sender {
    fn take(&mut self, p: Pending, due: &mut Option<Instant>) {
        if !Batcher::accepts(&p) {
            warn!(key = %p.key, bytes = p.payload.len(), "A reading is larger than a Kinesis record; it is not sent");
            self.builder.record_unconfirmed(&p.expect);
            self.refused += 1;
            self.progress.send_replace(self.confirmed + self.refused);
            return;
        }
        self.batcher.push(p);
        due.get_or_insert_with(|| Instant::now() + self.linger);
    }

    fn confirm(&mut self, unit: &Unit) {
        for e in &unit.expects {
            self.builder.record(e);
        }
        let n = unit.expects.len() as u64;
        self.confirmed += n;
        self.stats.acked.fetch_add(n, Ordering::Relaxed);
        self.progress.send_replace(self.confirmed + self.refused);
    }

    /// Waits for `d`, or until stopped; returns whether it was stopped.
    async fn pause(&mut self, d: Duration) -> bool {
        tokio::select! {
            biased;
            _ = self.stop.changed() => true,
            () = sleep(d) => false,
        }
    }
}

/// Sends what the transport hands over, call after call (see the [module docs](self)), until
/// the input ends and everything is sent, or the run stops waiting, or a fatal error.
async fn send_batches(mut s: Sender) -> SenderOutcome {
    let mut input_open = true;
    // When the partial call must go (the oldest message's linger is over).
    let mut due: Option<Instant> = None;
    let mut backoff = Backoff::new(RETRY_BASE, RETRY_MAX);
    let mut failing_since: Option<Instant> = None;
    let mut error = None;
    loop {
        while input_open && !s.batcher.is_full() {
            match s.rx.try_recv() {
                Ok(p) => s.take(p, &mut due),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => input_open = false,
            }
        }
        if s.batcher.is_empty() {
            due = None;
            if !input_open {
                break;
            }
            tokio::select! {
                biased;
                _ = s.stop.changed() => break,
                m = s.rx.recv() => match m {
                    Some(p) => s.take(p, &mut due),
                    None => input_open = false,
                },
            }
            continue;
        }
        let now = Instant::now();
        if input_open && !s.batcher.is_full() && due.is_some_and(|d| now < d) {
            let wake = due.unwrap_or(now);
            tokio::select! {
                biased;
                _ = s.stop.changed() => break,
                m = s.rx.recv() => match m {
                    Some(p) => s.take(p, &mut due),
                    None => input_open = false,
                },
                () = sleep_until(wake) => {}
            }
            continue;
        }

        let batch = s.batcher.next_batch();
        let call = tokio::select! {
            biased;
            _ = s.stop.changed() => None,
            c = put_records(&s.client, &s.target, &batch) => Some(c),
        };
        let Some(call) = call else {
            // Stopped mid-call: whether it was written is unknown; unconfirmed it is.
            for unit in batch {
                s.batcher.put_back(unit);
            }
            break;
        };
        match call {
            Call::Done(written) => {
                failing_since = None;
                let sent = batch.len();
                let mut failed = 0usize;
                for (i, unit) in batch.into_iter().enumerate() {
                    if written.get(i).copied().unwrap_or(false) {
                        s.confirm(&unit);
                    } else {
                        failed += 1;
                        s.batcher.put_back(unit);
                    }
                }
                if failed > 0 {
                    // Some entries written: the stream takes records, the shards of the
                    // others are busy; a short pause. None written: back off further.
                    let wait = if failed < sent {
                        backoff.reset();
                        let wait = backoff.next_delay();
                        debug!(
                            failed,
                            sent,
                            retry_in_ms = wait.as_millis() as u64,
                            "Some PutRecords entries failed; retrying them"
                        );
                        wait
                    } else {
                        let wait = backoff.next_delay();
                        warn!(
                            failed,
                            retry_in_ms = wait.as_millis() as u64,
                            "Every PutRecords entry failed; retrying them"
                        );
                        wait
                    };
                    if s.pause(wait).await {
                        break;
                    }
                } else {
                    backoff.reset();
                }
            }
            Call::Retry(detail) => {
                for unit in batch {
                    s.batcher.put_back(unit);
                }
                let since = *failing_since.get_or_insert(now);
                if since.elapsed() >= GIVE_UP_AFTER {
                    error = Some(format!(
                        "no PutRecords call succeeded for {} s (the last failed with {detail}); \
                         check that the endpoint is reachable and the stream is ACTIVE",
                        GIVE_UP_AFTER.as_secs()
                    ));
                    break;
                }
                let wait = backoff.next_delay();
                warn!(error = %detail, retry_in_ms = wait.as_millis() as u64, "PutRecords failed; retrying");
                if s.pause(wait).await {
                    break;
                }
            }
            Call::Fatal(reason) => {
                for unit in batch {
                    s.batcher.put_back(unit);
                }
                warn!(error = %reason, "PutRecords failed; publishing stops");
                error = Some(reason);
                break;
            }
        }
        // What is left after a call is a backlog: the next call goes at once.
        due = (!s.batcher.is_empty()).then(Instant::now);
    }
    // Everything not written is unconfirmed: held by the batcher, or still queued.
    s.rx.close();
    let mut left = s.batcher.drain();
    while let Ok(p) = s.rx.try_recv() {
        left.push(p.expect);
    }
    for e in &left {
        s.builder.record_unconfirmed(e);
    }
    SenderOutcome {
        builder: s.builder,
        error,
    }
}

/// One PutRecords call.
async fn put_records(client: &aws_sdk_kinesis::Client, target: &Target, batch: &[Unit]) -> Call {
    let entries: Result<Vec<_>, _> = batch
        .iter()
        .map(|u| {
            PutRecordsRequestEntry::builder()
                .partition_key(&u.key)
                .data(Blob::new(u.data.clone()))
                .build()
        })
        .collect();
    let entries = match entries {
        Ok(e) => e,
        Err(e) => return Call::Fatal(format!("could not build the PutRecords request: {e}")),
    };
    let (name, arn) = target.name_and_arn();
    let answer = client
        .put_records()
        .set_stream_name(name)
        .set_stream_arn(arn)
        .set_records(Some(entries))
        .send()
        .await;
    match answer {
        Ok(out) => Call::Done(
            out.records
                .iter()
                .map(|r| r.error_code.is_none() && r.sequence_number.is_some())
                .collect(),
        ),
        Err(e) => classify(&e),
    }
}

/// Whether a failed PutRecords call is worth repeating.
fn classify(e: &SdkError<PutRecordsError, aws_sdk_kinesis::config::http::HttpResponse>) -> Call {
    let detail = describe(e);
    match e {
        SdkError::ServiceError(s) => match s.err() {
            PutRecordsError::ProvisionedThroughputExceededException(_)
            | PutRecordsError::InternalFailureException(_)
            | PutRecordsError::KmsThrottlingException(_) => Call::Retry(detail),
            PutRecordsError::ResourceNotFoundException(_) => Call::Fatal(format!(
                "{detail}; the stream was deleted (or renamed) during the run"
            )),
            PutRecordsError::AccessDeniedException(_) => Call::Fatal(format!(
                "{detail}; check that the credentials may call kinesis:PutRecords on the stream"
            )),
            _ if s.raw().status().is_server_error() => Call::Retry(detail),
            _ => Call::Fatal(detail),
        },
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            Call::Retry(detail)
        }
        _ => Call::Fatal(detail),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(key: &str, seq: u64, aggregate: bool) -> Pending {
        Pending {
            key: key.to_owned(),
            payload: format!("{key}:{seq}").into_bytes(),
            expect: Expect::Valid {
                device: 0,
                seq,
                fingerprint: 0,
            },
            aggregate,
        }
    }

    fn seqs(unit: &Unit) -> Vec<u64> {
        unit.expects
            .iter()
            .map(|e| match e {
                Expect::Valid { seq, .. } => *seq,
                Expect::Bad(_) => u64::MAX,
            })
            .collect()
    }

    fn keys(batch: &[Unit]) -> Vec<&str> {
        batch.iter().map(|u| u.key.as_str()).collect()
    }

    #[test]
    fn a_call_holds_one_record_per_key_and_failed_records_go_first_next_time() {
        let mut b = Batcher::new(10);
        for (key, seq) in [("a", 1), ("b", 1), ("a", 2), ("a", 3), ("c", 1)] {
            b.push(pending(key, seq, false));
        }
        let first = b.next_batch();
        assert_eq!(keys(&first), ["a", "b", "c"]);
        // a's record failed, the others were written.
        let mut first = first.into_iter();
        b.put_back(first.next().unwrap());
        let second = b.next_batch();
        assert_eq!(keys(&second), ["a"]);
        assert_eq!(seqs(&second[0]), [1], "the failed record again, before a:2");
        let third = b.next_batch();
        assert_eq!(seqs(&third[0]), [2]);
        assert_eq!(seqs(&b.next_batch()[0]), [3]);
        assert!(b.is_empty());
        assert!(b.next_batch().is_empty());
    }

    #[test]
    fn consecutive_aggregated_readings_of_a_key_make_one_aggregate() {
        let mut b = Batcher::new(3);
        for (seq, agg) in [
            (1, true),
            (2, true),
            (3, true),
            (4, true),
            (5, false),
            (6, true),
        ] {
            b.push(pending("dev", seq, agg));
        }
        let mut sent = Vec::new();
        while !b.is_empty() {
            let batch = b.next_batch();
            assert_eq!(batch.len(), 1);
            sent.push((seqs(&batch[0]), batch[0].data.starts_with(&kpl::MAGIC)));
            let users = kpl::deaggregate(&bytes::Bytes::from(batch[0].data.clone())).unwrap();
            if let Some(users) = users {
                assert!(users.iter().all(|u| u.partition_key == "dev"));
                assert_eq!(users.len(), batch[0].expects.len());
            }
        }
        assert_eq!(
            sent,
            [
                (vec![1, 2, 3], true),
                (vec![4], true),
                (vec![5], false),
                (vec![6], true)
            ]
        );
    }

    #[test]
    fn aggregates_stop_at_the_kpl_size() {
        let mut b = Batcher::new(1000);
        for seq in 0..40 {
            let mut p = pending("dev", seq, true);
            p.payload = vec![b'x'; 2000];
            b.push(p);
        }
        let unit = b.next_batch().pop().unwrap();
        assert_eq!(unit.expects.len(), MAX_AGGREGATE_DATA_BYTES / 2000);
        assert!(unit.data.len() < MAX_AGGREGATE_DATA_BYTES + 1000);
    }

    #[test]
    fn a_call_holds_at_most_500_records_and_5_mib() {
        let mut b = Batcher::new(1);
        for i in 0..1200 {
            b.push(pending(&format!("k{i}"), 1, false));
        }
        assert!(b.is_full());
        assert_eq!(b.next_batch().len(), 500);
        assert_eq!(b.next_batch().len(), 500);
        assert_eq!(b.next_batch().len(), 200);

        for i in 0..12 {
            let mut p = pending(&format!("big{i}"), 1, false);
            p.payload = vec![0; 900_000];
            b.push(p);
        }
        let batch = b.next_batch();
        let bytes: usize = batch.iter().map(Unit::size).sum();
        assert_eq!(batch.len(), 5);
        assert!(bytes <= MAX_BATCH_BYTES, "{bytes}");
        assert_eq!(b.next_batch().len(), 5);
        assert_eq!(b.next_batch().len(), 2);
        assert!(b.is_empty());
    }

    #[test]
    fn a_reading_larger_than_a_record_is_refused() {
        let mut p = pending("k", 1, false);
        p.payload = vec![0; MAX_RECORD_BYTES - 1];
        assert!(Batcher::accepts(&p));
        p.payload.push(0);
        assert!(!Batcher::accepts(&p));
    }

    #[test]
    fn drain_returns_every_message_held() {
        let mut b = Batcher::new(5);
        for seq in 0..4 {
            b.push(pending("a", seq, seq % 2 == 0));
        }
        let unit = b.next_batch().pop().unwrap();
        b.put_back(unit);
        assert_eq!(b.drain().len(), 4);
        assert!(b.is_empty());
    }

    #[test]
    fn the_partition_key_is_the_topics_device() {
        assert_eq!(
            partition_key("telemetry/site-001/env/env-000001"),
            "env-000001"
        );
        assert_eq!(partition_key("odd"), "odd");
    }
}
