//! The MQTT transport of `sensorlake simulate`: a rumqttc [`AsyncClient`] whose event loop runs
//! in its own task, which never awaits the client. That task matches broker confirmations to
//! messages with an `AckTracker` (a pure struct) and feeds a [`ManifestBuilder`].
//!
//! # What the manifest promises
//! - **QoS 1**: a message is in the manifest once the broker acknowledged it (PUBACK). At the
//!   end the run waits for all outstanding acknowledgements (up to [`ACK_WAIT`]); a message
//!   never acknowledged is left out, listed as unconfirmed, and the run returns
//!   [`SimError::Unconfirmed`] carrying the partial manifest.
//! - **QoS 0**: a message is in the manifest once it was written to the connection. The broker
//!   may still drop it (QoS 0 has no acknowledgement), so `verify` may then report it missing.
//!
//! How PUBACKs are matched: rumqttc takes requests from its channel in order and reports each
//! QoS 1 publish it sends as `Outgoing::Publish(pkid)` (or `Outgoing::AwaitAck(pkid)` when
//! that packet id is still in flight, followed by `Outgoing::Publish(pkid)` once it is freed).
//! The transport queues each message's [`Expect`] *before* handing the message to the client,
//! so the n-th such event belongs to the n-th queued expectation; `Incoming::PubAck(pkid)` then
//! confirms it. The session is clean and a lost connection ends the run
//! ([`SimError::ConnectionLost`]), so packet ids never refer to an earlier session.
//!
//! [`ACK_WAIT`]: super::ACK_WAIT

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rumqttc::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::timeout;
use tracing::{info, warn};

use super::{SimStats, SimulateOptions, Transport, wait_for_confirmations};
use crate::error::SimError;
use crate::fleet::{Expect, Fleet, Message};
use crate::manifest::{Manifest, ManifestBuilder};

/// The largest MQTT packet the client sends or accepts: room for the 300 KB `too_large` payloads.
pub const MAX_PACKET_BYTES: usize = 1024 * 1024;
/// Requests queued between the publishing loop and the event loop; a full queue slows the loop.
const REQUEST_QUEUE: usize = 256;
/// Seconds to wait for the TCP connection and the CONNACK.
const CONNECT_TIMEOUT_SECS: u64 = 10;

/// A session with the broker, ready to publish.
pub(super) struct MqttTransport {
    client: AsyncClient,
    qos: QoS,
    addr: String,
    expect_tx: mpsc::UnboundedSender<Expect>,
    /// Messages whose expectation was queued (the event loop confirms them).
    handed: u64,
    progress_rx: watch::Receiver<u64>,
    stop_tx: watch::Sender<bool>,
    driver: tokio::task::JoinHandle<DriveOutcome>,
}

impl MqttTransport {
    /// Connects to the broker; `Ok(None)` when `stop` completed first.
    ///
    /// # Errors
    /// [`SimError::Connect`] or [`SimError::Refused`]: nothing was sent.
    pub(super) async fn connect(
        opts: &SimulateOptions,
        fleet: &Fleet,
        stats: Arc<SimStats>,
        mut stop: Pin<&mut impl Future<Output = ()>>,
    ) -> Result<Option<Self>, SimError> {
        let addr = format!("{}:{}", opts.mqtt_host, opts.mqtt_port);
        let qos = if opts.qos == 0 {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        };
        let mut mqtt = MqttOptions::new(
            opts.client_id.clone(),
            opts.mqtt_host.clone(),
            opts.mqtt_port,
        );
        mqtt.set_clean_session(true)
            .set_keep_alive(Duration::from_secs(30))
            .set_max_packet_size(MAX_PACKET_BYTES, MAX_PACKET_BYTES)
            .set_inflight(opts.max_inflight);
        let (client, mut eventloop) = AsyncClient::new(mqtt, REQUEST_QUEUE);
        eventloop
            .network_options
            .set_connection_timeout(CONNECT_TIMEOUT_SECS);

        let tracker = AckTracker::new(ManifestBuilder::new(fleet, opts.qos), opts.qos);
        let (expect_tx, expect_rx) = mpsc::unbounded_channel();
        let (progress_tx, progress_rx) = watch::channel(0u64);
        let (stop_tx, stop_rx) = watch::channel(false);
        let (connected_tx, connected_rx) = oneshot::channel();
        let mut driver = tokio::spawn(drive(
            eventloop,
            tracker,
            expect_rx,
            stats,
            progress_tx,
            connected_tx,
            stop_rx,
        ));

        let connected = tokio::select! {
            r = connected_rx => Some(r),
            () = &mut stop => None,
        };
        match connected {
            Some(Ok(Ok(()))) => info!(addr = %addr, "Connected to the MQTT broker"),
            Some(Ok(Err(e))) => {
                let _ = driver.await;
                return Err(connect_error(addr, e));
            }
            Some(Err(_)) => {
                // The event loop ended without a word, which only a panic does: re-raise it.
                join_driver(&mut driver, &stop_tx).await;
                return Ok(None);
            }
            None => {
                let _ = stop_tx.send(true);
                join_driver(&mut driver, &stop_tx).await;
                return Ok(None);
            }
        }
        Ok(Some(Self {
            client,
            qos,
            addr,
            expect_tx,
            handed: 0,
            progress_rx,
            stop_tx,
            driver,
        }))
    }
}

impl Transport for MqttTransport {
    async fn send(&mut self, msg: Message) -> bool {
        if self.expect_tx.send(msg.expect).is_err() {
            return false; // The event loop ended; its error is reported by `finish`.
        }
        // From here the message counts as handed: if the run stops while the request queue is
        // full, it is left unconfirmed, which is what it is.
        self.handed += 1;
        self.client
            .publish(msg.topic, self.qos, false, msg.payload)
            .await
            .is_ok()
    }

    async fn finish(mut self, ack_wait: Duration) -> Result<Manifest, SimError> {
        let handed = self.handed;
        let (all_confirmed, waited) =
            wait_for_confirmations(&mut self.progress_rx, handed, ack_wait).await;
        if !all_confirmed {
            warn!(addr = %self.addr, handed, confirmed = *self.progress_rx.borrow(), "Not every message was confirmed");
        }
        let _ = timeout(Duration::from_secs(1), self.client.disconnect()).await;
        drop(self.expect_tx);
        let outcome = join_driver(&mut self.driver, &self.stop_tx).await;
        let (manifest, unconfirmed) = outcome.tracker.finish();
        let addr = self.addr;
        info!(
            addr = %addr,
            confirmed = manifest.messages,
            unconfirmed,
            "Simulation finished"
        );
        match outcome.error {
            _ if unconfirmed == 0 => Ok(manifest),
            Some(e) => Err(SimError::ConnectionLost {
                addr,
                confirmed: manifest.messages,
                unconfirmed,
                source: Box::new(e),
                manifest: Box::new(manifest),
            }),
            None => Err(SimError::Unconfirmed {
                addr,
                unconfirmed,
                total: handed,
                waited,
                manifest: Box::new(manifest),
            }),
        }
    }
}

/// Waits briefly for the event loop to end on its own (after DISCONNECT), then tells it to stop.
async fn join_driver(
    driver: &mut tokio::task::JoinHandle<DriveOutcome>,
    stop: &watch::Sender<bool>,
) -> DriveOutcome {
    let joined = match timeout(Duration::from_secs(2), &mut *driver).await {
        Ok(r) => r,
        Err(_) => {
            let _ = stop.send(true);
            driver.await
        }
    };
    match joined {
        Ok(outcome) => outcome,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

fn connect_error(addr: String, e: ConnectionError) -> SimError {
    let hint = match &e {
        ConnectionError::ConnectionRefused(code) => {
            return SimError::Refused {
                addr,
                code: format!("{code:?}"),
            };
        }
        ConnectionError::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
            "nothing listens there: check that the broker is running and the port is right"
        }
        ConnectionError::Io(io) if io.to_string().contains("lookup") => {
            "the host name does not resolve: check its spelling and DNS"
        }
        ConnectionError::NetworkTimeout => {
            "no answer in time: check the host, the port and any firewall in between"
        }
        _ => "check that an MQTT 3.1.1 broker (not TLS or WebSocket) listens on that host and port",
    };
    SimError::Connect {
        addr,
        hint,
        source: Box::new(e),
    }
}

/// What the event-loop task leaves behind.
#[derive(Debug)]
struct DriveOutcome {
    tracker: AckTracker,
    /// A connection error after the session was established.
    error: Option<ConnectionError>,
}

/// Polls the event loop, matching confirmations to messages, until DISCONNECT is sent, a stop
/// is signalled or the connection fails.
async fn drive(
    mut eventloop: EventLoop,
    mut tracker: AckTracker,
    mut expects: mpsc::UnboundedReceiver<Expect>,
    stats: Arc<SimStats>,
    progress: watch::Sender<u64>,
    connected: oneshot::Sender<Result<(), ConnectionError>>,
    mut stop: watch::Receiver<bool>,
) -> DriveOutcome {
    let mut connected = Some(connected);
    let mut error = None;
    loop {
        let event = tokio::select! {
            biased;
            _ = stop.changed() => break,
            ev = eventloop.poll() => ev,
        };
        let confirmed = match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                if let Some(tx) = connected.take() {
                    let _ = tx.send(Ok(()));
                }
                false
            }
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                while let Ok(e) = expects.try_recv() {
                    tracker.handed(e);
                }
                tracker.on_outgoing_publish(pkid)
            }
            Ok(Event::Outgoing(Outgoing::AwaitAck(pkid))) => {
                while let Ok(e) = expects.try_recv() {
                    tracker.handed(e);
                }
                tracker.on_await_ack(pkid);
                false
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => tracker.on_puback(ack.pkid),
            Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
            Ok(_) => false,
            Err(e) => {
                match connected.take() {
                    Some(tx) => {
                        let _ = tx.send(Err(e));
                    }
                    None => {
                        warn!(error = %e, "Lost the connection to the MQTT broker");
                        error = Some(e);
                    }
                }
                break;
            }
        };
        if confirmed {
            stats.acked.fetch_add(1, Ordering::Relaxed);
            progress.send_replace(tracker.confirmed());
        }
    }
    while let Ok(e) = expects.try_recv() {
        tracker.handed(e);
    }
    DriveOutcome { tracker, error }
}

/// Matches broker confirmations to messages (pure; see the [module docs](self)).
#[derive(Debug)]
pub(crate) struct AckTracker {
    qos: u8,
    /// Expectations of messages handed to the client, not yet seen going out.
    handed: VecDeque<Expect>,
    /// QoS 1 messages sent and awaiting PUBACK, by packet id.
    inflight: BTreeMap<u16, Expect>,
    /// A message whose packet id collided with one still in flight; it goes out later.
    collided: Option<Expect>,
    builder: ManifestBuilder,
    confirmed: u64,
}

impl AckTracker {
    pub(crate) fn new(builder: ManifestBuilder, qos: u8) -> Self {
        Self {
            qos,
            handed: VecDeque::new(),
            inflight: BTreeMap::new(),
            collided: None,
            builder,
            confirmed: 0,
        }
    }

    /// A message was handed to the client (queued before the client sees it).
    pub(crate) fn handed(&mut self, e: Expect) {
        self.handed.push_back(e);
    }

    /// `Outgoing::Publish(pkid)`; returns whether a message was confirmed (QoS 0).
    pub(crate) fn on_outgoing_publish(&mut self, pkid: u16) -> bool {
        let next = match self.collided.take() {
            Some(e) => Some(e),
            None => self.handed.pop_front(),
        };
        let Some(e) = next else {
            warn!(pkid, "A publish went out that the simulator did not queue");
            return false;
        };
        if self.qos == 0 {
            self.confirm(&e);
            return true;
        }
        if let Some(old) = self.inflight.insert(pkid, e) {
            warn!(pkid, "Packet id reused before its acknowledgement");
            self.builder.record_unconfirmed(&old);
        }
        false
    }

    /// `Outgoing::AwaitAck(pkid)`: the next message waits for its packet id to be freed.
    pub(crate) fn on_await_ack(&mut self, _pkid: u16) {
        if let Some(e) = self.handed.pop_front()
            && let Some(old) = self.collided.replace(e)
        {
            self.builder.record_unconfirmed(&old);
        }
    }

    /// `Incoming::PubAck(pkid)`; returns whether a message was confirmed.
    pub(crate) fn on_puback(&mut self, pkid: u16) -> bool {
        match self.inflight.remove(&pkid) {
            Some(e) => {
                self.confirm(&e);
                true
            }
            None => false,
        }
    }

    fn confirm(&mut self, e: &Expect) {
        self.builder.record(e);
        self.confirmed += 1;
    }

    pub(crate) fn confirmed(&self) -> u64 {
        self.confirmed
    }

    /// The manifest, with everything not confirmed recorded as unconfirmed, and their number.
    pub(crate) fn finish(mut self) -> (Manifest, u64) {
        let leftovers: Vec<Expect> = std::mem::take(&mut self.inflight)
            .into_values()
            .chain(self.collided.take())
            .chain(std::mem::take(&mut self.handed))
            .collect();
        for e in &leftovers {
            self.builder.record_unconfirmed(e);
        }
        let unconfirmed = self.builder.unconfirmed();
        (self.builder.build(), unconfirmed)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use sensorlake_core::fingerprint::payload_hash;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;
    use crate::fleet::{BadReading, FleetSpec};
    use crate::publish::{run, simulate, simulate_until};

    fn tracker(qos: u8) -> (Fleet, AckTracker, Vec<Expect>) {
        let mut fleet = Fleet::new(FleetSpec::new(3, 1).with_bad_ratio(0.5));
        let t = AckTracker::new(ManifestBuilder::new(&fleet, qos), qos);
        let e = (0..6)
            .map(|i| fleet.next_message(1_764_255_845_000 + i).expect)
            .collect();
        (fleet, t, e)
    }

    #[test]
    fn tracker_confirms_qos1_messages_only_on_their_puback() {
        let (_, mut t, e) = tracker(1);
        for x in &e[..3] {
            t.handed(x.clone());
        }
        assert!(!t.on_outgoing_publish(1));
        assert!(!t.on_outgoing_publish(2));
        assert!(!t.on_outgoing_publish(3));
        assert!(t.on_puback(2));
        assert!(
            !t.on_puback(2),
            "a second ack for the same id confirms nothing"
        );
        assert!(t.on_puback(1));
        assert_eq!(t.confirmed(), 2);
        let (m, unconfirmed) = t.finish();
        assert_eq!((m.messages, unconfirmed), (2, 1));
    }

    #[test]
    fn tracker_follows_a_packet_id_collision() {
        let (_, mut t, e) = tracker(1);
        for x in &e[..3] {
            t.handed(x.clone());
        }
        t.on_outgoing_publish(1);
        t.on_outgoing_publish(2);
        t.on_await_ack(1); // e[2] waits for id 1
        assert!(t.on_puback(1));
        t.on_outgoing_publish(1); // e[2] goes out now
        assert!(t.on_puback(1));
        assert!(t.on_puback(2));
        let (m, unconfirmed) = t.finish();
        assert_eq!((m.messages, unconfirmed), (3, 0));
        let mut direct = ManifestBuilder::new(&Fleet::new(FleetSpec::new(3, 1)), 1);
        for x in [&e[0], &e[2], &e[1]] {
            direct.record(x);
        }
        assert_eq!(m.valid, direct.build().valid);
    }

    #[test]
    fn tracker_confirms_qos0_messages_when_sent() {
        let (_, mut t, e) = tracker(0);
        for x in &e {
            t.handed(x.clone());
        }
        for _ in 0..4 {
            assert!(t.on_outgoing_publish(0));
        }
        let (m, unconfirmed) = t.finish();
        assert_eq!((m.messages, unconfirmed), (4, 2));
    }

    /// A minimal MQTT 3.1.1 broker for one client: CONNACK, PUBACK (when `ack(n)` says so for
    /// the n-th publish, from 0), PINGRESP. Returns what it received.
    struct FakeBroker {
        port: u16,
        task: tokio::task::JoinHandle<Vec<(String, Vec<u8>)>>,
    }

    impl FakeBroker {
        async fn start(ack: impl Fn(u64) -> bool + Send + 'static) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            let task = tokio::spawn(async move {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut got = Vec::new();
                while let Some((header, body)) = read_packet(&mut s).await {
                    match header >> 4 {
                        1 => s.write_all(&[0x20, 2, 0, 0]).await.unwrap(),
                        3 => {
                            let qos = (header >> 1) & 3;
                            let tlen = usize::from(u16::from_be_bytes([body[0], body[1]]));
                            let topic = String::from_utf8(body[2..2 + tlen].to_vec()).unwrap();
                            let mut at = 2 + tlen;
                            let pkid = if qos > 0 {
                                at += 2;
                                Some([body[at - 2], body[at - 1]])
                            } else {
                                None
                            };
                            let n = got.len() as u64;
                            got.push((topic, body[at..].to_vec()));
                            if let Some([hi, lo]) = pkid
                                && ack(n)
                            {
                                s.write_all(&[0x40, 2, hi, lo]).await.unwrap();
                            }
                        }
                        12 => s.write_all(&[0xD0, 0]).await.unwrap(),
                        14 => break,
                        _ => {}
                    }
                }
                got
            });
            Self { port, task }
        }
    }

    async fn read_packet(s: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
        let header = s.read_u8().await.ok()?;
        let (mut len, mut mult) = (0usize, 1usize);
        loop {
            let b = s.read_u8().await.ok()?;
            len += usize::from(b & 0x7f) * mult;
            if b & 0x80 == 0 {
                break;
            }
            mult *= 128;
        }
        let mut body = vec![0; len];
        s.read_exact(&mut body).await.ok()?;
        Some((header, body))
    }

    fn options(port: u16, qos: u8, readings: u64) -> SimulateOptions {
        SimulateOptions {
            mqtt_host: "127.0.0.1".into(),
            mqtt_port: port,
            client_id: "sim-test".into(),
            fleet: FleetSpec::new(12, 21).with_bad_ratio(0.3),
            readings: Some(readings),
            qos,
            max_inflight: 50,
            ..SimulateOptions::default()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn qos1_manifest_holds_exactly_what_the_broker_acknowledged() {
        let broker = FakeBroker::start(|_| true).await;
        let stats = Arc::new(SimStats::default());
        let m = simulate(options(broker.port, 1, 300), Arc::clone(&stats))
            .await
            .unwrap();
        let got = broker.task.await.unwrap();
        assert_eq!(got.len(), 300);
        assert_eq!(m.messages, 300);
        assert_eq!(stats.published.load(Ordering::Relaxed), 300);
        assert_eq!(stats.acked.load(Ordering::Relaxed), 300);
        m.check_consistency().unwrap();
        // The same seed makes the same choices whatever the clock: compare with a pure run.
        let mut fleet = Fleet::new(options(0, 1, 0).fleet);
        let mut b = ManifestBuilder::new(&fleet, 1);
        for i in 0..300 {
            b.record(&fleet.next_message(1_764_255_845_000 + i).expect);
        }
        let pure = b.build();
        let reasons = |bad: &[BadReading]| bad.iter().map(|b| b.reason.clone()).collect::<Vec<_>>();
        assert_eq!(reasons(&m.bad), reasons(&pure.bad));
        for (id, d) in &m.valid {
            let p = &pure.valid[id];
            assert_eq!(
                (d.first_seq, d.last_seq, d.count),
                (p.first_seq, p.last_seq, p.count)
            );
        }
        // Every bad payload reached the broker byte for byte, the 300 KB ones included.
        let sent: HashSet<u64> = got.iter().map(|(_, p)| payload_hash(p)).collect();
        assert!(m.bad.iter().all(|b| sent.contains(&b.payload_hash)));
        assert!(got.iter().any(|(_, p)| p.len() > 262_144));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn qos0_manifest_holds_what_was_sent() {
        let broker = FakeBroker::start(|_| true).await;
        let m = simulate(options(broker.port, 0, 120), Arc::default())
            .await
            .unwrap();
        assert_eq!(broker.task.await.unwrap().len(), 120);
        assert_eq!((m.messages, m.qos), (120, 0));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unacknowledged_publishes_are_left_out_and_reported() {
        let broker = FakeBroker::start(|n| n % 7 != 3).await;
        let opts = SimulateOptions {
            max_inflight: 1000,
            ..options(broker.port, 1, 100)
        };
        let e = run(
            opts,
            Arc::default(),
            std::future::pending(),
            Duration::from_millis(300),
        )
        .await
        .unwrap_err();
        let SimError::Unconfirmed {
            unconfirmed,
            total,
            ref manifest,
            ..
        } = e
        else {
            panic!("{e}")
        };
        let never_acked = (0..100u64).filter(|n| n % 7 == 3).count() as u64;
        assert_eq!((unconfirmed, total), (never_acked, 100));
        assert_eq!(manifest.messages, 100 - never_acked);
        assert_eq!(manifest.unconfirmed_count(), never_acked);
        manifest.check_consistency().unwrap();
        assert_eq!(
            e.partial_manifest().map(|m| m.messages),
            Some(100 - never_acked)
        );
        let text = e.to_string();
        assert!(
            text.contains(&format!("127.0.0.1:{}", broker.port)) && text.contains("not confirmed"),
            "{text}"
        );
    }

    /// With a small window, a packet id that is never acknowledged comes round again and
    /// rumqttc stops sending; everything after it is unconfirmed, and the manifest still adds up.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stalled_window_leaves_the_rest_unconfirmed() {
        let broker = FakeBroker::start(|n| n != 5).await;
        let opts = SimulateOptions {
            max_inflight: 10,
            ..options(broker.port, 1, 100)
        };
        let e = run(
            opts,
            Arc::default(),
            std::future::pending(),
            Duration::from_millis(300),
        )
        .await
        .unwrap_err();
        let m = e.partial_manifest().unwrap();
        assert!(m.unconfirmed_count() > 1, "{e}");
        assert_eq!(m.messages + m.unconfirmed_count(), 100);
        m.check_consistency().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unreachable_broker_is_named_in_the_error() {
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap().port()
        };
        let e = simulate(options(port, 1, 10), Arc::default())
            .await
            .unwrap_err();
        assert!(matches!(e, SimError::Connect { .. }), "{e}");
        let text = e.to_string();
        assert!(
            text.contains(&format!("127.0.0.1:{port}")) && text.contains("check"),
            "{text}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stopping_ends_publishing_and_keeps_what_was_confirmed() {
        let broker = FakeBroker::start(|_| true).await;
        let opts = SimulateOptions {
            readings: None,
            rate: Some(2000.0),
            ..options(broker.port, 1, 0)
        };
        let stop = tokio::time::sleep(Duration::from_millis(100));
        let m = simulate_until(opts, Arc::default(), stop).await.unwrap();
        let got = broker.task.await.unwrap();
        assert!(m.messages > 0);
        assert_eq!(m.messages, got.len() as u64);
        assert!(m.messages < 1000, "rate-limited: {}", m.messages);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn duration_and_rate_bound_the_run() {
        let broker = FakeBroker::start(|_| true).await;
        let opts = SimulateOptions {
            readings: None,
            duration: Some(Duration::from_millis(300)),
            rate: Some(100.0),
            ..options(broker.port, 1, 0)
        };
        let m = simulate(opts, Arc::default()).await.unwrap();
        assert!(
            (3..=36).contains(&m.messages),
            "{} messages in 300 ms at 100/s",
            m.messages
        );
        assert_eq!(broker.task.await.unwrap().len() as u64, m.messages);
    }
}
