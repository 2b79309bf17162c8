//! `sensorlake simulate`: publishing a fleet's messages at a rate, to an MQTT broker or an
//! Amazon Kinesis stream, and recording what was confirmed in a [`Manifest`].
//!
//! Everything but the transport is shared: the [`Fleet`] makes the messages (good and bad),
//! a token-bucket `Pacer` on tokio time spaces them, the loop stops at the reading or time
//! limit or when told to, and at the end the run waits (up to [`ACK_WAIT`]) for the last
//! confirmations. A transport (the crate-private `Transport` trait) only carries the messages
//! and turns confirmations into the manifest:
//! - `mqtt`: QoS 0 or 1 publishes through rumqttc; a message is confirmed by its
//!   PUBACK (QoS 1) or once written (QoS 0);
//! - [`kinesis`]: PutRecords batches, optionally KPL-aggregated; a message is
//!   confirmed once PutRecords gave its record a sequence number.
//!
//! The manifest is the same either way, so `sensorlake verify` checks a lake fed from either.
//! A message never confirmed is left out of it and listed as unconfirmed, and the run returns
//! an error carrying the partial manifest ([`SimError::partial_manifest`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use tokio::time::{Instant, sleep_until, timeout};
use tracing::info;

use crate::error::SimError;
use crate::fleet::{Fleet, FleetSpec, Message};
use crate::manifest::{Manifest, ManifestBuilder};

pub mod kinesis;
mod mqtt;

pub use kinesis::{KinesisClient, KinesisOptions};
pub use mqtt::MAX_PACKET_BYTES;

/// How long the run waits at the end for the last confirmations.
pub const ACK_WAIT: Duration = Duration::from_secs(30);
/// The pacer lets the loop catch up at most this far after a stall (the bucket's depth).
const MAX_LAG_SECS: f64 = 0.05;

/// What to publish, where, and how fast.
#[derive(Debug, Clone)]
pub struct SimulateOptions {
    /// Broker host name or address.
    pub mqtt_host: String,
    /// Broker port.
    pub mqtt_port: u16,
    /// MQTT client id (the session is clean).
    pub client_id: String,
    /// The fleet to simulate.
    pub fleet: FleetSpec,
    /// Stop after this many messages.
    pub readings: Option<u64>,
    /// Stop after this long. With neither limit the run goes on until stopped
    /// ([`simulate_until`]).
    pub duration: Option<Duration>,
    /// Messages per second; `None` publishes as fast as the broker or stream takes them.
    pub rate: Option<f64>,
    /// 0 or 1 (MQTT only).
    pub qos: u8,
    /// QoS 1 messages in flight (sent, not yet acknowledged) at most (MQTT only).
    pub max_inflight: u16,
    /// Publish to this Kinesis stream instead of MQTT; the MQTT options are then unused.
    pub kinesis: Option<KinesisOptions>,
}

impl Default for SimulateOptions {
    /// MQTT at `localhost:1883`, 100 devices, 10 000 readings as fast as possible, QoS 1.
    fn default() -> Self {
        Self {
            mqtt_host: "localhost".into(),
            mqtt_port: 1883,
            client_id: "sensorlake-simulator".into(),
            fleet: FleetSpec::default(),
            readings: Some(10_000),
            duration: None,
            rate: None,
            qos: 1,
            max_inflight: 1000,
            kinesis: None,
        }
    }
}

impl SimulateOptions {
    /// Checks the options without touching the network.
    ///
    /// # Errors
    /// [`SimError::InvalidOptions`] saying which option is wrong.
    pub fn validate(&self) -> Result<(), SimError> {
        let bad = |m: String| Err(SimError::InvalidOptions(m));
        match &self.kinesis {
            Some(k) => k.validate()?,
            None => {
                if self.mqtt_host.is_empty() {
                    return bad("the MQTT host is empty".into());
                }
                if self.mqtt_port == 0 {
                    return bad("the MQTT port must not be 0".into());
                }
                if self.qos > 1 {
                    return bad(format!("qos must be 0 or 1, got {}", self.qos));
                }
                if self.max_inflight == 0 {
                    return bad("max_inflight must be at least 1".into());
                }
            }
        }
        if let Some(r) = self.rate
            && !(r.is_finite() && r > 0.0)
        {
            return bad(format!(
                "rate must be a positive number of messages per second, got {r}"
            ));
        }
        self.fleet.validate()
    }
}

/// Live counters, shared with a progress display.
#[derive(Debug, Default)]
pub struct SimStats {
    /// Messages handed to the transport (the MQTT client, the Kinesis batcher).
    pub published: AtomicU64,
    /// Messages confirmed: acknowledged by the broker (QoS 1), written (QoS 0), or given a
    /// sequence number by Kinesis.
    pub acked: AtomicU64,
    /// Payload bytes handed to the transport.
    pub published_bytes: AtomicU64,
}

/// Publishes the fleet's messages until `readings` or `duration` is reached, and returns the
/// manifest of what the broker or stream confirmed.
///
/// With neither limit set this runs until the process ends; use [`simulate_until`] to stop it
/// gracefully (on Ctrl-C, say).
///
/// ```no_run
/// # async fn example() -> Result<(), sensorlake_simulator::SimError> {
/// use std::sync::Arc;
/// use sensorlake_simulator::{FleetSpec, SimStats, SimulateOptions, simulate};
///
/// let opts = SimulateOptions {
///     mqtt_host: "localhost".into(),
///     mqtt_port: 1883,
///     fleet: FleetSpec::new(1_000, 42).with_bad_ratio(0.01),
///     readings: Some(100_000),
///     rate: Some(5_000.0),
///     ..SimulateOptions::default()
/// };
/// let manifest = simulate(opts, Arc::new(SimStats::default())).await?;
/// manifest.write("manifest.json")?;
/// # Ok(())
/// # }
/// ```
///
/// To a Kinesis stream instead (endpoint, region and credentials from the standard AWS
/// environment), with half the readings KPL-aggregated:
///
/// ```no_run
/// # async fn example() -> Result<(), sensorlake_simulator::SimError> {
/// use std::sync::Arc;
/// use sensorlake_simulator::{FleetSpec, KinesisOptions, SimulateOptions, simulate};
///
/// let opts = SimulateOptions {
///     fleet: FleetSpec::new(1_000, 42),
///     kinesis: Some(KinesisOptions {
///         kpl_share: 0.5,
///         ..KinesisOptions::new("telemetry")
///     }),
///     ..SimulateOptions::default()
/// };
/// let manifest = simulate(opts, Arc::default()).await?;
/// # Ok(())
/// # }
/// ```
///
/// # Errors
/// [`SimError::InvalidOptions`]. MQTT: [`SimError::Connect`] or [`SimError::Refused`] when the
/// broker cannot be reached (nothing was sent); [`SimError::ConnectionLost`] or
/// [`SimError::Unconfirmed`] when some messages were not confirmed — both carry the manifest of
/// what was ([`SimError::partial_manifest`]). Kinesis: the `Kinesis*` variants, likewise
/// (see [`kinesis`]).
pub async fn simulate(opts: SimulateOptions, stats: Arc<SimStats>) -> Result<Manifest, SimError> {
    simulate_until(opts, stats, std::future::pending()).await
}

/// [`simulate`], which also stops publishing when `stop` completes; the messages already sent
/// are still awaited and the manifest is returned as usual.
///
/// # Errors
/// As [`simulate`].
pub async fn simulate_until(
    opts: SimulateOptions,
    stats: Arc<SimStats>,
    stop: impl Future<Output = ()>,
) -> Result<Manifest, SimError> {
    run(opts, stats, stop, ACK_WAIT).await
}

/// Where a run's messages go: the one thing an MQTT run and a Kinesis run differ in.
pub(crate) trait Transport {
    /// Takes one message. Waits only while the transport's queue is full; `false` when it can
    /// take no more (it failed, and [`Transport::finish`] says how).
    async fn send(&mut self, msg: Message) -> bool;

    /// Publishing is over: waits up to `ack_wait` for the confirmation of every message it
    /// took, closes, and returns the manifest of what was confirmed.
    async fn finish(self, ack_wait: Duration) -> Result<Manifest, SimError>;
}

/// The work of [`simulate_until`], with the final wait as a parameter for tests.
pub(crate) async fn run(
    opts: SimulateOptions,
    stats: Arc<SimStats>,
    stop: impl Future<Output = ()>,
    ack_wait: Duration,
) -> Result<Manifest, SimError> {
    opts.validate()?;
    let fleet = Fleet::try_new(opts.fleet.clone())?;
    tokio::pin!(stop);
    // Stopped while connecting: nothing was sent.
    let nothing = |fleet: &Fleet, qos| Ok(ManifestBuilder::new(fleet, qos).build());
    match &opts.kinesis {
        None => {
            match mqtt::MqttTransport::connect(&opts, &fleet, stats.clone(), stop.as_mut()).await? {
                Some(t) => publish(t, fleet, &opts, &stats, stop, ack_wait).await,
                None => nothing(&fleet, opts.qos),
            }
        }
        Some(k) => {
            match kinesis::KinesisTransport::connect(k, &fleet, stats.clone(), stop.as_mut())
                .await?
            {
                Some(t) => publish(t, fleet, &opts, &stats, stop, ack_wait).await,
                None => nothing(&fleet, kinesis::MANIFEST_QOS),
            }
        }
    }
}

/// The publishing loop, the same for every transport: paced messages from the fleet until a
/// limit or `stop`, then the transport's final wait.
async fn publish<T: Transport>(
    mut transport: T,
    mut fleet: Fleet,
    opts: &SimulateOptions,
    stats: &SimStats,
    mut stop: Pin<&mut impl Future<Output = ()>>,
    ack_wait: Duration,
) -> Result<Manifest, SimError> {
    let start = Instant::now();
    let deadline = opts.duration.map(|d| start + d);
    let mut pacer = opts.rate.map(Pacer::new);
    let mut handed: u64 = 0;
    loop {
        if opts.readings.is_some_and(|n| handed >= n) {
            break;
        }
        let stopped = tokio::select! {
            biased;
            () = &mut stop => true,
            () = std::future::ready(()) => false,
        };
        if stopped {
            info!("Stop requested; waiting for the last confirmations");
            break;
        }
        let now = Instant::now();
        if deadline.is_some_and(|d| now >= d) {
            break;
        }
        if let Some(wait) = pacer.as_mut().and_then(|p| p.delay(now - start)) {
            let wake = deadline.map_or(now + wait, |d| d.min(now + wait));
            tokio::select! {
                () = sleep_until(wake) => continue,
                () = &mut stop => {
                    info!("Stop requested; waiting for the last confirmations");
                    break;
                }
            }
        }
        let msg = fleet.next_message(now_ms());
        handed += 1;
        let bytes = msg.payload.len() as u64;
        // Only blocks while the transport's queue is full.
        let sent = tokio::select! {
            biased;
            ok = transport.send(msg) => ok,
            () = &mut stop => false,
        };
        if !sent {
            break;
        }
        stats.published.fetch_add(1, Ordering::Relaxed);
        stats.published_bytes.fetch_add(bytes, Ordering::Relaxed);
        if let Some(p) = pacer.as_mut() {
            p.on_sent();
        }
    }
    transport.finish(ack_wait).await
}

/// Waits up to `ack_wait` until `confirmed` reaches `handed` (or its sender is gone); returns
/// whether it did and how long the wait took.
pub(crate) async fn wait_for_confirmations(
    confirmed: &mut watch::Receiver<u64>,
    handed: u64,
    ack_wait: Duration,
) -> (bool, Duration) {
    let from = Instant::now();
    let all = timeout(ack_wait, confirmed.wait_for(|c| *c >= handed))
        .await
        .is_ok_and(|r| r.is_ok());
    (all, from.elapsed())
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Token-bucket pacing: message n is due n/rate seconds after the start; after a stall the loop
/// may catch up by at most [`MAX_LAG_SECS`] worth of messages.
#[derive(Debug, Clone)]
pub(crate) struct Pacer {
    seconds_per_message: f64,
    /// Seconds after the start at which message `base` is due.
    origin: f64,
    base: u64,
    sent: u64,
}

impl Pacer {
    pub(crate) fn new(rate: f64) -> Self {
        Self {
            seconds_per_message: 1.0 / rate,
            origin: 0.0,
            base: 0,
            sent: 0,
        }
    }

    /// How long to wait before the next message, `elapsed` after the start; `None` to send now.
    pub(crate) fn delay(&mut self, elapsed: Duration) -> Option<Duration> {
        let now = elapsed.as_secs_f64();
        let due = self.origin + (self.sent - self.base) as f64 * self.seconds_per_message;
        if due > now {
            return Some(Duration::from_secs_f64(due - now));
        }
        if now - due > MAX_LAG_SECS {
            self.origin = now - MAX_LAG_SECS;
            self.base = self.sent;
        }
        None
    }

    pub(crate) fn on_sent(&mut self) {
        self.sent += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pacer_spaces_messages_at_the_rate() {
        let mut p = Pacer::new(100.0);
        assert_eq!(p.delay(Duration::ZERO), None);
        p.on_sent();
        let d = p.delay(Duration::from_millis(2)).unwrap();
        assert!((d.as_secs_f64() - 0.008).abs() < 1e-9, "{d:?}");
        assert_eq!(p.delay(Duration::from_millis(10)), None);
        p.on_sent();
        assert!(p.delay(Duration::from_millis(10)).is_some());
    }

    #[test]
    fn pacer_catches_up_by_at_most_one_bucket_after_a_stall() {
        let mut p = Pacer::new(1000.0);
        let stall = Duration::from_secs(2);
        let mut burst = 0;
        while p.delay(stall).is_none() {
            p.on_sent();
            burst += 1;
            assert!(burst < 1000, "a 2 s stall must not release 2000 messages");
        }
        assert!((49..=52).contains(&burst), "burst {burst}");
    }

    #[test]
    fn options_are_validated_before_any_network_use() {
        let ok = SimulateOptions::default();
        ok.validate().unwrap();
        for (o, needle) in [
            (
                SimulateOptions {
                    qos: 2,
                    ..ok.clone()
                },
                "qos",
            ),
            (
                SimulateOptions {
                    rate: Some(0.0),
                    ..ok.clone()
                },
                "rate",
            ),
            (
                SimulateOptions {
                    max_inflight: 0,
                    ..ok.clone()
                },
                "max_inflight",
            ),
            (
                SimulateOptions {
                    fleet: FleetSpec::new(0, 1),
                    ..ok.clone()
                },
                "device",
            ),
        ] {
            let e = o.validate().unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        }
    }

    #[test]
    fn kinesis_options_replace_the_mqtt_checks() {
        let k = SimulateOptions {
            mqtt_host: String::new(),
            qos: 7,
            kinesis: Some(KinesisOptions::new("telemetry")),
            ..SimulateOptions::default()
        };
        k.validate().unwrap();
        for (o, needle) in [
            (KinesisOptions::new(""), "stream"),
            (
                KinesisOptions::new("arn:aws:kinesis:us-east-1:1:table/x"),
                "ARN",
            ),
            (
                KinesisOptions {
                    kpl_share: 1.5,
                    ..KinesisOptions::new("s")
                },
                "kpl_share",
            ),
            (
                KinesisOptions {
                    kpl_max_records: 0,
                    ..KinesisOptions::new("s")
                },
                "kpl_max_records",
            ),
        ] {
            let e = SimulateOptions {
                kinesis: Some(o),
                ..k.clone()
            }
            .validate()
            .unwrap_err()
            .to_string();
            assert!(e.contains(needle), "{needle:?} in {e}");
        }
    }
}
