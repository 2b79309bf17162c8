//! The running MQTT source: one task polls the rumqttc event loop and forwards publishes.
//!
//! Design:
//! - The event loop is polled by its own task, which never awaits the client it serves; it
//!   only awaits the bounded delivery channel, so a slow pipeline stops the polling, the TCP
//!   window fills and the broker stops sending (back-pressure all the way to the broker).
//! - Acknowledgements are manual: [`MqttAcker::ack`] sends the PUBACKs for committed records,
//!   in receive order. The request channel is sized to hold every acknowledgement that can be
//!   outstanding, so acking never blocks on the event loop.
//! - Packet ids are only meaningful on the connection that delivered them. Every reconnect
//!   starts a new *epoch*: acknowledgements of older epochs are dropped (the broker redelivers
//!   those messages, and the transform counts them as duplicates), and acknowledgements that
//!   rumqttc had queued for the old connection are purged, so a stale PUBACK can never
//!   acknowledge a different message that reuses the packet id.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use sensorlake_core::RawRecord;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::config::{BrokerAddr, ConfigError, MqttConfig, MqttProtocol};
use crate::backoff::Backoff;

/// One received message and the token that acknowledges it.
#[derive(Debug)]
pub struct Delivery {
    /// The message as received.
    pub record: RawRecord,
    /// Acknowledges this message once it is committed.
    pub ack: AckToken,
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
    pub subscribed: std::sync::atomic::AtomicBool,
    /// The event-loop task has ended: nothing more can be acknowledged.
    pub loop_done: std::sync::atomic::AtomicBool,
    /// Acknowledgements handed to the MQTT client.
    pub acks_queued: AtomicU64,
    /// Acknowledgements the MQTT client has written to the connection.
    pub acks_written: AtomicU64,
}

#[derive(Clone)]
enum Client {
    V4(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

/// Sends acknowledgements for committed messages. Cheap to clone.
#[derive(Clone)]
pub struct MqttAcker {
    client: Client,
    /// The current connection epoch. Acks read-lock it while queueing; a reconnect
    /// write-locks it while it purges queued acks, so no stale ack slips through.
    epoch: Arc<RwLock<u64>>,
    events: Arc<SourceEvent>,
}

impl std::fmt::Debug for MqttAcker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttAcker").finish_non_exhaustive()
    }
}

impl MqttAcker {
    /// Acknowledges `tokens` in the order given (the receive order). Returns how many PUBACKs
    /// were queued; tokens of an earlier connection are skipped (the broker redelivers those).
    pub async fn ack(&self, tokens: &[AckToken]) -> usize {
        let mut sent = 0;
        let mut full_since: Option<std::time::Instant> = None;
        let mut warned = false;
        for t in tokens.iter().filter(|t| t.needs_ack()) {
            loop {
                let queued = {
                    let epoch = self.epoch.read().unwrap_or_else(|e| e.into_inner());
                    if t.epoch != *epoch {
                        self.events.stale_acks.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    self.try_ack(t)
                };
                match queued {
                    Ok(()) => {
                        sent += 1;
                        self.events.acks_queued.fetch_add(1, Ordering::Relaxed);
                        full_since = None;
                        break;
                    }
                    // The channel is sized for every outstanding ack; if it is full anyway,
                    // give the event loop a moment rather than spin.
                    Err(AckError::Full) => {
                        let since = *full_since.get_or_insert_with(std::time::Instant::now);
                        if !warned && since.elapsed() >= Duration::from_secs(5) {
                            warned = true;
                            warn!(
                                acked = sent,
                                to_ack = tokens.len(),
                                acks_queued = self.events.acks_queued.load(Ordering::Relaxed),
                                acks_written = self.events.acks_written.load(Ordering::Relaxed),
                                "The MQTT client has taken no acknowledgement for 5 s (its request queue stays full); still trying. This is a bug: please report it with this log"
                            );
                        }
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    // The event loop is gone (shutdown): nothing can be acknowledged any more;
                    // the broker redelivers on the next session.
                    Err(AckError::Closed) => return sent,
                }
            }
        }
        sent
    }

    fn try_ack(&self, t: &AckToken) -> Result<(), AckError> {
        let queued = match &self.client {
            Client::V4(c) => c
                .try_ack(&rumqttc::Publish {
                    dup: false,
                    qos: qos_v4(t.qos),
                    retain: false,
                    topic: String::new(),
                    pkid: t.pkid,
                    payload: Bytes::new(),
                })
                .is_ok(),
            Client::V5(c) => c
                .try_ack(&rumqttc::v5::mqttbytes::v5::Publish {
                    dup: false,
                    qos: qos_v5(t.qos),
                    retain: false,
                    topic: Bytes::new(),
                    pkid: t.pkid,
                    payload: Bytes::new(),
                    properties: None,
                })
                .is_ok(),
        };
        // rumqttc reports "full" and "event loop gone" alike; the loop's own flag tells them apart.
        match queued {
            true => Ok(()),
            false if self.events.loop_done.load(Ordering::Acquire) => Err(AckError::Closed),
            false => Err(AckError::Full),
        }
    }

    /// Connection statistics.
    pub fn events(&self) -> &Arc<SourceEvent> {
        &self.events
    }
}

enum AckError {
    Full,
    Closed,
}

fn qos_v4(q: u8) -> rumqttc::QoS {
    match q {
        0 => rumqttc::QoS::AtMostOnce,
        1 => rumqttc::QoS::AtLeastOnce,
        _ => rumqttc::QoS::ExactlyOnce,
    }
}

fn qos_v5(q: u8) -> rumqttc::v5::mqttbytes::QoS {
    match q {
        0 => rumqttc::v5::mqttbytes::QoS::AtMostOnce,
        1 => rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        _ => rumqttc::v5::mqttbytes::QoS::ExactlyOnce,
    }
}

/// A running MQTT subscription.
#[derive(Debug)]
pub struct MqttSource {
    /// Received messages, in receive order.
    pub deliveries: mpsc::Receiver<Delivery>,
    acker: MqttAcker,
    stop_intake: CancellationToken,
    stop: CancellationToken,
    task: JoinHandle<()>,
    addr: BrokerAddr,
}

/// What the event-loop task needs besides the event loop itself.
struct LoopCtx {
    addr: BrokerAddr,
    topics: Vec<String>,
    qos: u8,
    tx: mpsc::Sender<Delivery>,
    epoch: Arc<RwLock<u64>>,
    events: Arc<SourceEvent>,
    stop_intake: CancellationToken,
    stop: CancellationToken,
    backoff: Backoff,
    /// `sensorlake_mqtt_messages_total`, looked up once rather than per message.
    messages: metrics::Counter,
}

impl MqttSource {
    /// Connects (in the background) and subscribes. `max_unacked` is the most messages the
    /// pipeline may hold unacknowledged at once; it sizes the acknowledgement queue.
    ///
    /// Must be called inside a tokio runtime.
    ///
    /// # Errors
    /// When the configuration is invalid; connection problems are retried in the background
    /// and logged, never returned.
    pub fn start(
        config: &MqttConfig,
        client_id: &str,
        max_unacked: usize,
    ) -> Result<MqttSource, ConfigError> {
        let addr = config.validate()?;
        let (tx, rx) = mpsc::channel(config.channel_capacity);
        // Every ack that can be outstanding fits: what the pipeline holds, what the delivery
        // channel holds, and the broker's window.
        let request_cap =
            max_unacked + config.channel_capacity + usize::from(config.receive_maximum) + 1024;
        let keep_alive = Duration::from_secs(config.keep_alive_secs.max(5));
        let epoch = Arc::new(RwLock::new(0u64));
        let events = Arc::new(SourceEvent::default());
        let stop_intake = CancellationToken::new();
        let stop = CancellationToken::new();
        let (min, max) = config.reconnect_bounds();
        let ctx = LoopCtx {
            addr: addr.clone(),
            topics: config.topics.clone(),
            qos: config.qos,
            tx,
            epoch: epoch.clone(),
            events: events.clone(),
            stop_intake: stop_intake.clone(),
            stop: stop.clone(),
            backoff: Backoff::new(min, max),
            messages: metrics::counter!("sensorlake_mqtt_messages_total"),
        };
        let (client, task) = match config.protocol {
            MqttProtocol::V4 => {
                let mut o = rumqttc::MqttOptions::new(client_id, &addr.host, addr.port);
                o.set_keep_alive(keep_alive)
                    .set_clean_session(config.clean_start)
                    .set_manual_acks(true)
                    .set_max_packet_size(config.max_packet_bytes, config.max_packet_bytes)
                    .set_request_channel_capacity(request_cap);
                if let Some(u) = &config.username {
                    o.set_credentials(u, config.password.clone().unwrap_or_default());
                }
                let (client, eventloop) = rumqttc::AsyncClient::new(o, request_cap);
                let c = client.clone();
                let done = events.clone();
                let task = tokio::spawn(async move {
                    run_loop(V4(eventloop, c), ctx).await;
                    done.loop_done.store(true, Ordering::Release);
                });
                (Client::V4(client), task)
            }
            MqttProtocol::V5 => {
                let mut o = rumqttc::v5::MqttOptions::new(client_id, &addr.host, addr.port);
                o.set_keep_alive(keep_alive)
                    .set_clean_start(config.clean_start)
                    .set_manual_acks(true)
                    .set_receive_maximum(Some(config.receive_maximum))
                    .set_max_packet_size(Some(
                        u32::try_from(config.max_packet_bytes).unwrap_or(u32::MAX),
                    ))
                    .set_session_expiry_interval(Some(config.session_expiry_secs))
                    .set_request_channel_capacity(request_cap);
                if let Some(u) = &config.username {
                    o.set_credentials(u, config.password.clone().unwrap_or_default());
                }
                let (client, eventloop) = rumqttc::v5::AsyncClient::new(o, request_cap);
                let c = client.clone();
                let done = events.clone();
                let task = tokio::spawn(async move {
                    run_loop(V5(eventloop, c), ctx).await;
                    done.loop_done.store(true, Ordering::Release);
                });
                (Client::V5(client), task)
            }
        };
        Ok(MqttSource {
            deliveries: rx,
            acker: MqttAcker {
                client,
                epoch,
                events,
            },
            stop_intake,
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

    /// Disconnects cleanly after the queued acknowledgements are sent, waiting at most
    /// `timeout`.
    pub async fn shutdown(self, timeout: Duration) {
        self.stop_intake.cancel();
        let _ = match &self.acker.client {
            Client::V4(c) => c.try_disconnect().is_ok(),
            Client::V5(c) => c.try_disconnect().is_ok(),
        };
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

impl LoopCtx {
    /// Forwards one publish; false when the pipeline is gone.
    async fn forward(&self, topic: &str, payload: Bytes, token: AckToken) -> bool {
        if self.stop_intake.is_cancelled() {
            return true;
        }
        let record = RawRecord {
            payload,
            claimed_device_id: claimed_device(topic),
            position: Box::from(topic),
            received_at_us: now_us(),
        };
        self.messages.increment(1);
        self.tx.send(Delivery { record, ack: token }).await.is_ok()
    }

    fn current_epoch(&self) -> u64 {
        *self.epoch.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a new epoch after a connection loss, purging acks queued for the old one.
    fn new_epoch(&self, purge: impl FnOnce()) {
        let mut e = self.epoch.write().unwrap_or_else(|e| e.into_inner());
        *e += 1;
        purge();
    }

    fn subscribed(&self) {
        if !self.events.subscribed.swap(true, Ordering::AcqRel) {
            info!(broker = %self.addr, topics = ?self.topics, "Subscribed to MQTT topics");
        }
    }

    fn on_connected(&mut self, session_present: bool) -> bool {
        let n = self.events.connects.fetch_add(1, Ordering::Relaxed);
        self.backoff.reset();
        info!(broker = %self.addr, session_present, "Connected to MQTT broker");
        if n > 0 && !session_present {
            warn!(
                broker = %self.addr,
                "Broker did not keep our session; messages published while we were away may be lost. \
                 Keep the client id stable and the broker's persistence on"
            );
        }
        if session_present {
            self.subscribed();
        }
        !session_present
    }

    async fn on_error(&mut self, error: String) -> bool {
        self.events.disconnects.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("sensorlake_mqtt_disconnects_total").increment(1);
        let delay = self.backoff.next_delay();
        warn!(broker = %self.addr, error = %error, retry_in_ms = delay.as_millis() as u64,
              "MQTT connection failed; is the broker running and reachable at this address?");
        tokio::select! {
            () = tokio::time::sleep(delay) => true,
            () = self.stop.cancelled() => false,
        }
    }
}

/// What the event-loop task needs to know of one polled event, for either protocol version.
enum LoopEvent {
    Publish {
        topic: String,
        payload: Bytes,
        pkid: u16,
        qos: u8,
    },
    ConnAck {
        session_present: bool,
    },
    SubAck {
        refused: bool,
    },
    Disconnect,
    /// The client wrote a PUBACK.
    AckWritten,
    Other,
}

/// One MQTT connection (a rumqttc event loop and its client), either protocol version.
trait Session {
    /// Polls the event loop once.
    async fn poll(&mut self) -> Result<LoopEvent, String>;
    /// Forgets every request queued for the old connection (acks, subscriptions).
    fn purge(&mut self);
    /// Queues subscriptions without awaiting the client this task serves.
    fn subscribe(&self, topics: &[String], qos: u8);
}

struct V4(rumqttc::EventLoop, rumqttc::AsyncClient);
struct V5(rumqttc::v5::EventLoop, rumqttc::v5::AsyncClient);

impl Session for V4 {
    async fn poll(&mut self) -> Result<LoopEvent, String> {
        use rumqttc::{Event, Outgoing, Packet};
        Ok(match self.0.poll().await.map_err(|e| e.to_string())? {
            Event::Incoming(Packet::Publish(p)) => LoopEvent::Publish {
                topic: p.topic,
                payload: p.payload,
                pkid: p.pkid,
                qos: p.qos as u8,
            },
            Event::Incoming(Packet::ConnAck(a)) => LoopEvent::ConnAck {
                session_present: a.session_present,
            },
            Event::Incoming(Packet::SubAck(s)) => LoopEvent::SubAck {
                refused: s
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure)),
            },
            Event::Outgoing(Outgoing::Disconnect) => LoopEvent::Disconnect,
            Event::Outgoing(Outgoing::PubAck(_)) => LoopEvent::AckWritten,
            _ => LoopEvent::Other,
        })
    }

    fn purge(&mut self) {
        self.0.clean();
        self.0.pending.clear();
    }

    fn subscribe(&self, topics: &[String], qos: u8) {
        for t in topics {
            if let Err(e) = self.1.try_subscribe(t.clone(), qos_v4(qos)) {
                warn!(topic = %t, error = %e, "Could not queue the subscription");
            }
        }
    }
}

impl Session for V5 {
    async fn poll(&mut self) -> Result<LoopEvent, String> {
        use rumqttc::v5::Event;
        use rumqttc::v5::mqttbytes::v5::{Packet, SubscribeReasonCode};
        Ok(match self.0.poll().await.map_err(|e| e.to_string())? {
            Event::Incoming(Packet::Publish(p)) => LoopEvent::Publish {
                topic: String::from_utf8_lossy(&p.topic).into_owned(),
                payload: p.payload,
                pkid: p.pkid,
                qos: p.qos as u8,
            },
            Event::Incoming(Packet::ConnAck(a)) => LoopEvent::ConnAck {
                session_present: a.session_present,
            },
            Event::Incoming(Packet::SubAck(s)) => LoopEvent::SubAck {
                refused: s
                    .return_codes
                    .iter()
                    .any(|c| !matches!(c, SubscribeReasonCode::Success(_))),
            },
            Event::Outgoing(rumqttc::Outgoing::Disconnect) => LoopEvent::Disconnect,
            Event::Outgoing(rumqttc::Outgoing::PubAck(_)) => LoopEvent::AckWritten,
            _ => LoopEvent::Other,
        })
    }

    fn purge(&mut self) {
        self.0.clean();
        self.0.pending.clear();
    }

    fn subscribe(&self, topics: &[String], qos: u8) {
        for t in topics {
            if let Err(e) = self.1.try_subscribe(t.clone(), qos_v5(qos)) {
                warn!(topic = %t, error = %e, "Could not queue the subscription");
            }
        }
    }
}

/// The event-loop task: polls, forwards publishes, (re)subscribes, and starts a new epoch on
/// every connection loss.
async fn run_loop(mut session: impl Session, mut ctx: LoopCtx) {
    loop {
        let polled = tokio::select! {
            p = session.poll() => p,
            () = ctx.stop.cancelled() => return,
        };
        match polled {
            Ok(LoopEvent::Publish {
                topic,
                payload,
                pkid,
                qos,
            }) => {
                let token = AckToken {
                    epoch: ctx.current_epoch(),
                    pkid,
                    qos,
                };
                if !ctx.forward(&topic, payload, token).await {
                    return;
                }
            }
            Ok(LoopEvent::ConnAck { session_present }) => {
                if ctx.on_connected(session_present) {
                    session.subscribe(&ctx.topics, ctx.qos);
                }
            }
            Ok(LoopEvent::SubAck { refused }) => {
                if refused {
                    warn!(broker = %ctx.addr, "Broker refused a subscription; check the topic filters and ACLs");
                }
                ctx.subscribed();
            }
            Ok(LoopEvent::Disconnect) => return,
            Ok(LoopEvent::AckWritten) => {
                ctx.events.acks_written.fetch_add(1, Ordering::Relaxed);
            }
            Ok(LoopEvent::Other) => {}
            Err(e) => {
                ctx.new_epoch(|| session.purge());
                if !ctx.on_error(e).await {
                    return;
                }
            }
        }
    }
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
    fn qos_zero_tokens_need_no_ack() {
        let t = AckToken {
            epoch: 0,
            pkid: 0,
            qos: 0,
        };
        assert!(!t.needs_ack());
    }
}
