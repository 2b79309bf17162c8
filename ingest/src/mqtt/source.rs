//! The running MQTT source: our own subscriber connection over rumqttc's packet codecs.
//!
//! Design:
//! - One task owns the connection. It reads and writes concurrently, as two independent
//!   halves: the *reader* parses packets and forwards publishes into the bounded delivery
//!   channel; the *writer* sends acknowledgements, keep-alive pings and QoS 2 completions.
//! - Back-pressure: when the pipeline is slow, the reader waits on the delivery channel and
//!   stops reading the socket, so the TCP window fills and the broker stops sending. The
//!   writer keeps running meanwhile, so acknowledgements for committed messages always leave,
//!   however many deliveries are waiting. (A client whose event loop does both in one loop —
//!   rumqttc's — deadlocks here: the loop waits for the pipeline, the pipeline's acks wait for
//!   the loop.)
//! - Acknowledgements are manual: [`MqttAcker::ack`] queues the PUBACKs of committed records
//!   in receive order without waiting; the writer takes everything queued and sends it in one
//!   write. The queue holds at most what was delivered and not yet acknowledged, which the
//!   broker's window and the pipeline's flush size bound.
//! - Packet ids are only meaningful on the connection that delivered them. Every connection
//!   is an *epoch*; the writer drops acknowledgements of other epochs (the broker redelivers
//!   those messages on the new connection, and the transform counts them as duplicates), so a
//!   stale PUBACK can never acknowledge a different message that reuses the packet id.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use sensorlake_core::{RawRecord, Reason};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::config::{BrokerAddr, ConfigError, MqttConfig};
use super::tls;
use super::wire::{ConnectOptions, Incoming, Wire};
use crate::backoff::Backoff;

/// One received message and the token that acknowledges it.
#[derive(Debug)]
pub struct Delivery {
    /// The message as received.
    pub record: RawRecord,
    /// Acknowledges this message once it is committed.
    pub ack: AckToken,
    /// The message's share of `mqtt.channel_max_bytes`, given back when the delivery is
    /// dropped (once the pipeline has taken the record and the token out of it).
    _bytes: OwnedSemaphorePermit,
}

/// What is needed to acknowledge one message: its packet id on the connection (epoch) that
/// delivered it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckToken {
    epoch: u64,
    pkid: u16,
    qos: u8,
}

impl AckToken {
    /// Whether the message needs an acknowledgement at all (QoS 0 does not).
    pub fn needs_ack(&self) -> bool {
        self.qos > 0
    }
}

/// Things the source reports besides deliveries, for logs and metrics.
#[derive(Debug, Default)]
pub struct SourceEvent {
    /// Successful connections (the first one included).
    pub connects: AtomicU64,
    /// Connection losses.
    pub disconnects: AtomicU64,
    /// Acknowledgements dropped because their connection was gone.
    pub stale_acks: AtomicU64,
    /// The broker has acknowledged our subscriptions (or the session kept them).
    pub subscribed: AtomicBool,
    /// The connection task has ended: nothing more can be acknowledged.
    pub loop_done: AtomicBool,
    /// Acknowledgements queued by the pipeline.
    pub acks_queued: AtomicU64,
    /// Acknowledgements written to the connection.
    pub acks_written: AtomicU64,
    /// Publishes the broker resent on the same connection before we acknowledged them
    /// (dropped: the first copy's acknowledgement covers them).
    pub resent_on_connection: AtomicU64,
}

/// Sends acknowledgements for committed messages. Cheap to clone.
#[derive(Clone)]
pub struct MqttAcker {
    acks: mpsc::UnboundedSender<Vec<AckToken>>,
    events: Arc<SourceEvent>,
}

impl std::fmt::Debug for MqttAcker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttAcker").finish_non_exhaustive()
    }
}

impl MqttAcker {
    /// Queues acknowledgements for `tokens`, in the order given (the receive order), and
    /// returns how many were queued. Never waits. Tokens of an earlier connection are dropped
    /// when their turn comes (the broker redelivers those messages).
    pub fn ack(&self, tokens: &[AckToken]) -> usize {
        let batch: Vec<AckToken> = tokens.iter().copied().filter(AckToken::needs_ack).collect();
        let n = batch.len();
        if n == 0 {
            return 0;
        }
        // Fails only once the connection task has ended (shutdown): then nothing can be
        // acknowledged any more, and the broker redelivers on the next session.
        if self.acks.send(batch).is_err() {
            return 0;
        }
        self.events
            .acks_queued
            .fetch_add(n as u64, Ordering::Relaxed);
        n
    }

    /// Connection statistics.
    pub fn events(&self) -> &Arc<SourceEvent> {
        &self.events
    }
}

/// A running MQTT subscription.
#[derive(Debug)]
pub struct MqttSource {
    /// Received messages, in receive order.
    pub deliveries: mpsc::Receiver<Delivery>,
    acker: MqttAcker,
    stop_intake: CancellationToken,
    disconnect: CancellationToken,
    stop: CancellationToken,
    task: JoinHandle<()>,
    addr: BrokerAddr,
}

/// Everything the connection task needs besides the ack queue.
struct Ctx {
    addr: BrokerAddr,
    /// `mqtts://`: the validated TLS settings.
    tls: Option<tls::Connector>,
    wire: Wire,
    client_id: String,
    keep_alive_secs: u16,
    clean_start: bool,
    username: Option<String>,
    password: Option<String>,
    receive_maximum: u16,
    session_expiry_secs: u32,
    topics: Vec<String>,
    qos: u8,
    tx: mpsc::Sender<Delivery>,
    /// Payload bytes that may wait in `tx` (`mqtt.channel_max_bytes`).
    channel_bytes: Arc<Semaphore>,
    /// The permits `channel_bytes` started with: no message takes more.
    channel_max_bytes: usize,
    events: Arc<SourceEvent>,
    stop_intake: CancellationToken,
    /// Send the queued acks, then DISCONNECT, then end.
    disconnect: CancellationToken,
    /// End now.
    stop: CancellationToken,
    backoff: Backoff,
    /// `sensorlake_mqtt_messages_total`, looked up once rather than per message.
    messages: metrics::Counter,
}

/// How long connecting and the broker's CONNACK may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes read from the socket at a time; published payloads share these buffers.
const READ_CHUNK: usize = 64 * 1024;
/// Most acknowledgement batches taken per write.
const ACK_BATCHES_PER_WRITE: usize = 256;

impl MqttSource {
    /// Connects (in the background) and subscribes.
    ///
    /// Must be called inside a tokio runtime.
    ///
    /// # Errors
    /// When the configuration is invalid; connection problems are retried in the background
    /// and logged, never returned.
    pub fn start(config: &MqttConfig, client_id: &str) -> Result<MqttSource, ConfigError> {
        let (addr, tls) = config.prepare()?;
        let (tx, rx) = mpsc::channel(config.channel_capacity);
        let channel_max_bytes = config
            .channel_max_bytes
            .clamp(1, Semaphore::MAX_PERMITS)
            .min(u32::MAX as usize);
        let (ack_tx, ack_rx) = mpsc::unbounded_channel();
        let events = Arc::new(SourceEvent::default());
        let stop_intake = CancellationToken::new();
        let disconnect = CancellationToken::new();
        let stop = CancellationToken::new();
        let (min, max) = config.reconnect_bounds();
        let ctx = Ctx {
            addr: addr.clone(),
            tls,
            wire: Wire::new(config.protocol, config.max_packet_bytes),
            client_id: client_id.to_owned(),
            keep_alive_secs: u16::try_from(config.keep_alive_secs.clamp(5, 65_535))
                .unwrap_or(u16::MAX),
            clean_start: config.clean_start,
            username: config.username.clone(),
            password: config.password.clone(),
            receive_maximum: config.receive_maximum,
            session_expiry_secs: config.session_expiry_secs,
            topics: config.topics.clone(),
            qos: config.qos,
            tx,
            channel_bytes: Arc::new(Semaphore::new(channel_max_bytes)),
            channel_max_bytes,
            events: events.clone(),
            stop_intake: stop_intake.clone(),
            disconnect: disconnect.clone(),
            stop: stop.clone(),
            backoff: Backoff::new(min, max),
            messages: metrics::counter!("sensorlake_mqtt_messages_total"),
        };
        let done = events.clone();
        let task = tokio::spawn(async move {
            run(ctx, ack_rx).await;
            done.loop_done.store(true, Ordering::Release);
        });
        Ok(MqttSource {
            deliveries: rx,
            acker: MqttAcker {
                acks: ack_tx,
                events,
            },
            stop_intake,
            disconnect,
            stop,
            task,
            addr,
        })
    }

    /// The acknowledger for committed messages.
    pub fn acker(&self) -> MqttAcker {
        self.acker.clone()
    }

    /// The broker this source talks to.
    pub fn addr(&self) -> &BrokerAddr {
        &self.addr
    }

    /// Stops forwarding new messages. Messages that arrive from now on are neither forwarded
    /// nor acknowledged, so the broker keeps them for the next session. The connection stays
    /// up so that the last acknowledgements can still be sent.
    pub fn stop_intake(&self) {
        self.stop_intake.cancel();
    }

    /// Sends the queued acknowledgements and disconnects cleanly, waiting at most `timeout`.
    pub async fn shutdown(self, timeout: Duration) {
        self.stop_intake.cancel();
        self.disconnect.cancel();
        let mut task = self.task;
        if tokio::time::timeout(timeout, &mut task).await.is_err() {
            warn!(broker = %self.addr, "MQTT disconnect did not finish in time; closing the connection");
            self.stop.cancel();
            let _ = task.await;
        }
    }
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// The device id a topic `telemetry/{site}/{device_type}/{device_id}` claims: its last level.
fn claimed_device(topic: &str) -> Option<Box<str>> {
    topic
        .rsplit_once('/')
        .map(|(_, last)| last)
        .filter(|l| !l.is_empty())
        .map(Box::from)
}

/// Why a connection ended.
enum End {
    /// Disconnected on request, or the pipeline is gone: do not reconnect.
    Done,
    /// Lost or refused: reconnect after a back-off.
    Lost(String),
}

impl From<std::io::Error> for End {
    fn from(e: std::io::Error) -> End {
        End::Lost(e.to_string())
    }
}

/// The connection task: connects, runs the connection until it ends, reconnects.
async fn run(mut ctx: Ctx, mut acks: mpsc::UnboundedReceiver<Vec<AckToken>>) {
    let stop = ctx.stop.clone();
    for epoch in 1u64.. {
        let ended = tokio::select! {
            e = connection(&mut ctx, &mut acks, epoch) => e,
            () = stop.cancelled() => return,
        };
        let End::Lost(error) = ended else { return };
        ctx.events.disconnects.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("sensorlake_mqtt_disconnects_total").increment(1);
        if ctx.disconnect.is_cancelled() {
            // Shutting down without a connection: the broker redelivers what is unacknowledged.
            return;
        }
        let delay = ctx.backoff.next_delay();
        warn!(broker = %ctx.addr, error = %error, retry_in_ms = delay.as_millis() as u64,
              "MQTT connection failed; retrying");
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = ctx.disconnect.cancelled() => return,
            () = ctx.stop.cancelled() => return,
        }
    }
}

/// One connection: CONNECT, CONNACK, SUBSCRIBE if the session is new, then the reader and the
/// writer side by side until either ends.
async fn connection(
    ctx: &mut Ctx,
    acks: &mut mpsc::UnboundedReceiver<Vec<AckToken>>,
    epoch: u64,
) -> End {
    let connect = async {
        let mut stream = tls::connect(&ctx.addr, ctx.tls.as_ref()).await?;
        let mut out = BytesMut::new();
        ctx.wire.connect(
            &ConnectOptions {
                client_id: &ctx.client_id,
                keep_alive_secs: ctx.keep_alive_secs,
                clean_start: ctx.clean_start,
                username: ctx.username.as_deref(),
                password: ctx.password.as_deref(),
                receive_maximum: ctx.receive_maximum,
                session_expiry_secs: ctx.session_expiry_secs,
            },
            &mut out,
        );
        let mut inbuf = BytesMut::with_capacity(READ_CHUNK);
        let answer = async {
            stream.write_all(&out).await?;
            next_packet(&ctx.wire, &mut stream, &mut inbuf, None).await
        };
        // Connected, but no CONNACK: a plain connection to a TLS listener looks like this.
        let first = answer.await.map_err(|e| match e {
            End::Lost(why) if ctx.tls.is_none() => End::Lost(tls::plain_hint(&ctx.addr, &why)),
            e => e,
        })?;
        Ok::<_, End>((stream, inbuf, first))
    };
    let (stream, inbuf, first) = match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return e,
        Err(_) if ctx.tls.is_none() => {
            let why = format!("no CONNACK within {CONNECT_TIMEOUT:?}");
            return End::Lost(tls::plain_hint(&ctx.addr, &why));
        }
        Err(_) => {
            return End::Lost(format!(
                "the TLS handshake and CONNACK did not complete within {CONNECT_TIMEOUT:?}"
            ));
        }
    };
    let Incoming::ConnAck {
        session_present,
        refused,
        server_keep_alive,
    } = first
    else {
        let why = format!("expected CONNACK, got {first:?}");
        return End::Lost(match ctx.tls {
            None => tls::plain_hint(&ctx.addr, &why),
            Some(_) => why,
        });
    };
    if let Some(why) = refused {
        return End::Lost(format!(
            "the broker refused the connection: {why}; check the client id, credentials and ACLs"
        ));
    }
    let n = ctx.events.connects.fetch_add(1, Ordering::Relaxed);
    ctx.backoff.reset();
    info!(broker = %ctx.addr, session_present, "Connected to MQTT broker");
    if n > 0 && !session_present {
        warn!(
            broker = %ctx.addr,
            "Broker did not keep our session; messages published while we were away may be lost. \
             Keep the client id stable and the broker's persistence on"
        );
    }
    // A kept session holds the subscription already (the SUBSCRIBE sent below repairs one
    // that does not); its SUBACK may come only after a backlog of queued publishes.
    if session_present {
        subscribed(ctx);
    }
    // MQTT 5: the broker may impose its own keep-alive; 0 switches pings off.
    let keep_alive = match server_keep_alive.unwrap_or(ctx.keep_alive_secs) {
        0 => None,
        secs => Some(Duration::from_secs(u64::from(secs))),
    };

    let (rd, wr) = tokio::io::split(stream);
    let link = Link {
        epoch,
        ping_outstanding: AtomicBool::new(false),
        reader_waiting: AtomicBool::new(false),
        bytes_read: AtomicU64::new(0),
        in_flight: PacketIds::default(),
    };
    let (comp_tx, comp_rx) = mpsc::unbounded_channel();
    let reader = read_half(ctx, &link, rd, inbuf, comp_tx);
    // SUBSCRIBE on every connection, session or not: it is idempotent, and it repairs a
    // session whose subscription was lost or refused, or whose topics changed in the config.
    let writer = write_half(ctx, &link, wr, acks, comp_rx, keep_alive);
    tokio::select! {
        e = reader => e,
        e = writer => e,
    }
}

/// State the two halves of one connection share.
struct Link {
    epoch: u64,
    /// A PINGREQ went out and its PINGRESP has not come back.
    ping_outstanding: AtomicBool,
    /// The reader waits for the pipeline, so it reads nothing, PINGRESPs included.
    reader_waiting: AtomicBool,
    /// Bytes read so far: any byte from the broker shows the connection is alive.
    bytes_read: AtomicU64,
    /// Packet ids delivered on this connection and not yet acknowledged.
    in_flight: PacketIds,
}

fn subscribed(ctx: &Ctx) {
    if !ctx.events.subscribed.swap(true, Ordering::AcqRel) {
        info!(broker = %ctx.addr, topics = ?ctx.topics, "Subscribed to MQTT topics");
    }
}

/// Reads until one whole packet is in `buf` and returns it.
async fn next_packet<R: AsyncRead + Unpin>(
    wire: &Wire,
    rd: &mut R,
    buf: &mut BytesMut,
    bytes_read: Option<&AtomicU64>,
) -> Result<Incoming, End> {
    loop {
        if let Some(p) = wire
            .read(buf)
            .map_err(|e| End::Lost(format!("bad packet from the broker: {e}")))?
        {
            return Ok(p);
        }
        if buf.capacity() - buf.len() < READ_CHUNK / 8 {
            buf.reserve(READ_CHUNK);
        }
        match rd.read_buf(buf).await? {
            0 => return Err(End::Lost("the broker closed the connection".into())),
            n => {
                if let Some(counter) = bytes_read {
                    counter.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
        }
    }
}

/// Passes over the next `n` bytes of the connection: first what is in `buf`, then reads into
/// `buf` and drops what it reads, so memory stays at one read chunk whatever `n` is.
async fn skip_bytes<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    mut n: usize,
    bytes_read: &AtomicU64,
) -> Result<(), End> {
    loop {
        let k = n.min(buf.len());
        let _ = buf.split_to(k);
        n -= k;
        if n == 0 {
            return Ok(());
        }
        buf.clear();
        if buf.capacity() < READ_CHUNK {
            buf.reserve(READ_CHUNK);
        }
        match rd.read_buf(buf).await? {
            0 => return Err(End::Lost("the broker closed the connection".into())),
            read => {
                bytes_read.fetch_add(read as u64, Ordering::Relaxed);
            }
        }
    }
}

/// Reads packets and forwards publishes; waits for the pipeline when its channel is full.
async fn read_half<R: AsyncRead + Unpin>(
    ctx: &Ctx,
    link: &Link,
    mut rd: R,
    mut buf: BytesMut,
    completions: mpsc::UnboundedSender<u16>,
) -> End {
    // Bytes of an oversize PUBLISH still to pass over before the next packet.
    let mut skip = 0usize;
    loop {
        if skip > 0
            && let Err(e) = skip_bytes(&mut rd, &mut buf, skip, &link.bytes_read).await
        {
            return e;
        }
        let packet = match next_packet(&ctx.wire, &mut rd, &mut buf, Some(&link.bytes_read)).await {
            Ok(p) => p,
            Err(e) => return e,
        };
        match packet {
            Incoming::Publish {
                topic,
                payload,
                pkid,
                qos,
                oversize,
            } => {
                skip = oversize.map_or(0, |o| o.skip);
                if ctx.stop_intake.is_cancelled() {
                    // Neither forwarded nor acknowledged: the broker keeps it for next time.
                    continue;
                }
                // A broker may resend an unacknowledged publish on the same connection (MQTT
                // 3.1.1 allows it). The first copy is still on its way to a commit and its
                // acknowledgement covers both; a second token for the same packet id could
                // later acknowledge a newer message that reuses the id. So the copy is dropped.
                if qos > 0 && !link.in_flight.insert(pkid) {
                    ctx.events
                        .resent_on_connection
                        .fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                // What the wire kept of an oversize payload (its first OVERSIZE_PREFIX bytes).
                let kept = payload.len();
                let record = RawRecord {
                    payload,
                    claimed_device_id: claimed_device(&topic),
                    // The decoded topic is exactly sized: no second copy.
                    position: topic.into_boxed_str(),
                    received_at_us: now_us(),
                    rejected: oversize.map(|o| {
                        Box::new((
                            Reason::TooLarge,
                            format!(
                                "the message has {} bytes, more than mqtt.max_packet_bytes ({}) \
                                 lets sensorlake buffer; only its first {} bytes are kept",
                                o.payload_len,
                                ctx.wire.max_incoming(),
                                kept,
                            ),
                        ))
                    }),
                };
                let ack = AckToken {
                    epoch: link.epoch,
                    pkid,
                    qos,
                };
                ctx.messages.increment(1);
                link.reader_waiting.store(true, Ordering::Relaxed);
                // At most max_packet_bytes (oversize payloads are cut to a prefix), which
                // validation keeps at or below channel_max_bytes; a long topic on a small
                // budget is capped so that it can still pass alone.
                let size =
                    (record.payload.len() + record.position.len()).min(ctx.channel_max_bytes);
                let permits = u32::try_from(size).unwrap_or(u32::MAX);
                let Ok(bytes) = ctx.channel_bytes.clone().acquire_many_owned(permits).await else {
                    return End::Done;
                };
                let sent = ctx
                    .tx
                    .send(Delivery {
                        record,
                        ack,
                        _bytes: bytes,
                    })
                    .await;
                link.reader_waiting.store(false, Ordering::Relaxed);
                if sent.is_err() {
                    return End::Done;
                }
            }
            Incoming::PubRel { pkid } => {
                let _ = completions.send(pkid);
            }
            Incoming::PingResp => link.ping_outstanding.store(false, Ordering::Relaxed),
            Incoming::SubAck { granted } => {
                let refused = granted.iter().filter(|g| g.is_none()).count();
                let downgraded = granted.iter().flatten().filter(|q| **q < ctx.qos).count();
                if refused > 0 {
                    warn!(broker = %ctx.addr, refused, topics = ?ctx.topics,
                          "Broker refused a subscription; check the topic filters and ACLs");
                } else if downgraded > 0 {
                    warn!(broker = %ctx.addr, downgraded, requested_qos = ctx.qos, topics = ?ctx.topics,
                          "Broker granted a lower QoS than requested: messages at QoS 0 are not acknowledged and a crash can lose them. Raise the broker's maximum QoS");
                    subscribed(ctx);
                } else {
                    subscribed(ctx);
                }
            }
            Incoming::Disconnect { reason } => {
                return End::Lost(format!("the broker disconnected us: {reason}"));
            }
            Incoming::ConnAck { .. } => {
                return End::Lost("a second CONNACK on one connection".into());
            }
            Incoming::Other => {}
        }
    }
}

/// Writes acknowledgements (all that are queued, in one write), QoS 2 completions and
/// keep-alive pings; on shutdown, the last acknowledgements and DISCONNECT.
async fn write_half<W: AsyncWrite + Unpin>(
    ctx: &Ctx,
    link: &Link,
    mut wr: W,
    acks: &mut mpsc::UnboundedReceiver<Vec<AckToken>>,
    mut completions: mpsc::UnboundedReceiver<u16>,
    keep_alive: Option<Duration>,
) -> End {
    let mut out = BytesMut::with_capacity(4096);
    ctx.wire.subscribe(1, &ctx.topics, ctx.qos, &mut out);
    // Without a keep-alive the timer never fires.
    let period = keep_alive.unwrap_or(Duration::from_secs(365 * 24 * 3600));
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut read_at_last_ping = 0u64;
    let mut batches = Vec::with_capacity(ACK_BATCHES_PER_WRITE);
    let mut acks_open = true;
    loop {
        let mut written = 0u64;
        if !out.is_empty() {
            if let Err(e) = wr.write_all(&out).await {
                return e.into();
            }
            out.clear();
        }
        tokio::select! {
            n = acks.recv_many(&mut batches, ACK_BATCHES_PER_WRITE), if acks_open => {
                acks_open = n > 0;
                written += encode_acks(ctx, link, batches.drain(..), &mut out);
            }
            Some(pkid) = completions.recv() => ctx.wire.pubcomp(pkid, &mut out),
            _ = ping.tick(), if keep_alive.is_some() => {
                // Dead only if nothing at all came in since the last ping while the reader was
                // free to read: a PINGRESP may sit behind a backlog of publishes the reader
                // has not reached because the pipeline is busy.
                let read = link.bytes_read.load(Ordering::Relaxed);
                if link.ping_outstanding.swap(true, Ordering::Relaxed)
                    && read == read_at_last_ping
                    && !link.reader_waiting.load(Ordering::Relaxed)
                {
                    return End::Lost(format!("nothing from the broker within {period:?} of a PINGREQ"));
                }
                read_at_last_ping = read;
                ctx.wire.ping(&mut out);
            }
            () = ctx.disconnect.cancelled() => {
                while let Ok(b) = acks.try_recv() {
                    written += encode_acks(ctx, link, std::iter::once(b), &mut out);
                }
                ctx.wire.disconnect(&mut out);
                let sent = async {
                    wr.write_all(&out).await?;
                    wr.shutdown().await
                };
                if let Err(e) = sent.await {
                    debug!(error = %e, "DISCONNECT could not be sent");
                }
                ctx.events.acks_written.fetch_add(written, Ordering::Relaxed);
                return End::Done;
            }
        }
        if written > 0 {
            if let Err(e) = wr.write_all(&out).await {
                return e.into();
            }
            out.clear();
            ctx.events
                .acks_written
                .fetch_add(written, Ordering::Relaxed);
        }
    }
}

/// A set of MQTT packet ids (1..=65535), shared by the reader and the writer without a lock.
struct PacketIds([AtomicU64; 1024]);

impl Default for PacketIds {
    fn default() -> Self {
        PacketIds(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

impl PacketIds {
    /// Adds `id`; false if it was there already.
    fn insert(&self, id: u16) -> bool {
        let bit = 1u64 << (id % 64);
        self.0[usize::from(id / 64)].fetch_or(bit, Ordering::AcqRel) & bit == 0
    }

    fn remove(&self, id: u16) {
        let bit = 1u64 << (id % 64);
        self.0[usize::from(id / 64)].fetch_and(!bit, Ordering::AcqRel);
    }
}

/// Encodes the acknowledgements of this connection's epoch; counts and drops the rest.
fn encode_acks(
    ctx: &Ctx,
    link: &Link,
    batches: impl Iterator<Item = Vec<AckToken>>,
    out: &mut BytesMut,
) -> u64 {
    let mut n = 0;
    for t in batches.flatten() {
        if t.epoch == link.epoch {
            ctx.wire.ack(t.qos, t.pkid, out);
            // From here the broker may reuse the id: a publish with it is a new message.
            link.in_flight.remove(t.pkid);
            n += 1;
        } else {
            ctx.events.stale_acks.fetch_add(1, Ordering::Relaxed);
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_the_last_topic_level_as_device_id() {
        assert_eq!(
            claimed_device("telemetry/site-1/env/env-000042").as_deref(),
            Some("env-000042")
        );
        assert_eq!(claimed_device("telemetry/site/env/"), None);
        assert_eq!(claimed_device("nolevels"), None);
    }

    #[test]
    fn packet_ids_are_a_set() {
        let ids = PacketIds::default();
        assert!(ids.insert(1) && ids.insert(65535) && ids.insert(64));
        assert!(!ids.insert(1), "already there");
        ids.remove(1);
        assert!(ids.insert(1));
        assert!(!ids.insert(65535) && !ids.insert(64));
    }

    #[test]
    fn qos_zero_tokens_need_no_ack() {
        let t = AckToken {
            epoch: 0,
            pkid: 0,
            qos: 0,
        };
        assert!(!t.needs_ack());
    }
}
