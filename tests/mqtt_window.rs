//! Measures what DESIGN.md's "in-flight window" section relies on, against real Mosquitto:
//! how many unacknowledged QoS 1 messages the broker sends a subscriber that never acks, and
//! that our subscriber's acknowledgements leave while its pipeline reads nothing.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::Mosquitto;

/// No publish for this long means the broker has stopped sending.
const QUIET: Duration = Duration::from_millis(700);

/// Waits up to 10 s for the source to be subscribed; panics with `what` otherwise.
async fn wait_subscribed(events: &sensorlake_ingest::mqtt::SourceEvent, what: &str) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while !events.subscribed.load(std::sync::atomic::Ordering::Acquire) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect(what);
}

/// Publishes `n` QoS 1 messages and waits for the broker's acknowledgements.
async fn publish(port: u16, topic: &str, n: usize) {
    let mut o = rumqttc::MqttOptions::new("window-pub", "127.0.0.1", port);
    o.set_inflight(1000);
    let (client, mut el) = rumqttc::AsyncClient::new(o, 2000);
    let t = topic.to_owned();
    tokio::spawn(async move {
        for i in 0..n {
            client
                .publish(&t, rumqttc::QoS::AtLeastOnce, false, i.to_string())
                .await
                .unwrap();
        }
    });
    let mut acked = 0;
    while acked < n {
        if let rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) = el.poll().await.unwrap() {
            acked += 1;
        }
    }
}

/// Returns how many unacknowledged messages an MQTT 5 subscriber with Receive Maximum 50 and
/// an MQTT 3.1.1 subscriber get from a broker started with `conf`.
async fn measure(conf: &str) -> (usize, usize) {
    let broker = Mosquitto::start_with(conf);
    let port = broker.port;

    // MQTT 5 subscriber asking for a window of 50 (the broker's default is 20).
    let mut o5 = rumqttc::v5::MqttOptions::new("window-v5", "127.0.0.1", port);
    o5.set_manual_acks(true).set_receive_maximum(Some(50));
    let (c5, mut el5) = rumqttc::v5::AsyncClient::new(o5, 100);
    c5.subscribe("w/5", rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
        .await
        .unwrap();
    loop {
        if let rumqttc::v5::Event::Incoming(rumqttc::v5::Incoming::SubAck(_)) =
            el5.poll().await.unwrap()
        {
            break;
        }
    }
    publish(port, "w/5", 300).await;
    // Count publishes until none arrives for 700 ms: the broker has stopped at its window.
    let mut got5 = 0;
    while let Ok(ev) = tokio::time::timeout(QUIET, el5.poll()).await {
        if let Ok(rumqttc::v5::Event::Incoming(rumqttc::v5::Incoming::Publish(_))) = ev {
            got5 += 1;
        }
    }

    // MQTT 3.1.1 subscriber: the broker's max_inflight_messages decides.
    let mut o4 = rumqttc::MqttOptions::new("window-v4", "127.0.0.1", port);
    o4.set_manual_acks(true);
    let (c4, mut el4) = rumqttc::AsyncClient::new(o4, 100);
    c4.subscribe("w/4", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    loop {
        if let rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_)) = el4.poll().await.unwrap() {
            break;
        }
    }
    publish(port, "w/4", 300).await;
    let mut got4 = 0;
    while let Ok(ev) = tokio::time::timeout(QUIET, el4.poll()).await {
        if let Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(_))) = ev {
            got4 += 1;
        }
    }

    eprintln!(
        "mosquitto window ({conf:?}): MQTT 5 receive maximum 50 -> {got5}; MQTT 3.1.1 -> {got4}"
    );
    (got5, got4)
}

#[tokio::test]
async fn mosquitto_honours_receive_maximum_and_pins_mqtt311_at_max_inflight_messages() {
    // Mosquitto's defaults: max_inflight_messages 20, max_queued_messages 1000.
    let (got5, got4) = measure("allow_anonymous true\n").await;
    assert_eq!(got5, 50, "Mosquitto honours the MQTT 5 Receive Maximum");
    assert_eq!(
        got4, 20,
        "Mosquitto pins MQTT 3.1.1 clients at max_inflight_messages (20)"
    );
}

/// Publishes `n` messages `0..n` at `qos` and waits until the broker has them all.
async fn publish_qos(port: u16, topic: &str, n: usize, qos: rumqttc::QoS) {
    let mut o = rumqttc::MqttOptions::new("ack-pub", "127.0.0.1", port);
    o.set_inflight(100);
    o.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut el) = rumqttc::AsyncClient::new(o, 2 * n);
    for i in 0..n {
        client
            .publish(topic, qos, false, i.to_string())
            .await
            .unwrap();
    }
    let mut done = 0;
    while done < n {
        match el.poll().await.unwrap() {
            rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))
            | rumqttc::Event::Incoming(rumqttc::Packet::PubComp(_)) => done += 1,
            _ => {}
        }
    }
}

/// The regression test for a deadlock of rumqttc's single event loop, which we used to run
/// on: with the delivery channel full, the loop waited for the pipeline and the pipeline's
/// acknowledgements waited for the loop. Here the "pipeline" acknowledges what it took and
/// then reads nothing until the acknowledgements are on the wire; the broker is the judge:
/// a new connection on the same session gets back exactly the messages not acknowledged.
#[tokio::test]
async fn acknowledgements_leave_while_the_pipeline_reads_nothing() {
    use sensorlake_ingest::{MqttConfig, MqttSource};
    for (qos, publish_qos_level) in [
        (1u8, rumqttc::QoS::AtLeastOnce),
        (2, rumqttc::QoS::ExactlyOnce),
    ] {
        let broker = Mosquitto::start();
        let config = MqttConfig {
            url: format!("mqtt://127.0.0.1:{}", broker.port),
            topics: vec!["acks/#".into()],
            qos,
            channel_capacity: 4,
            receive_maximum: 50,
            ..MqttConfig::default()
        };
        let client_id = format!("ack-test-{qos}");
        let mut source = MqttSource::start(&config, &client_id).unwrap();
        let events = source.acker().events().clone();
        wait_subscribed(&events, "subscribed within 10 s").await;
        publish_qos(broker.port, "acks/d", 200, publish_qos_level).await;

        // Take 20 messages; the channel (4) and the reader fill up behind them.
        let mut taken = Vec::new();
        let mut tokens = Vec::new();
        while taken.len() < 20 {
            let d = source.deliveries.recv().await.unwrap();
            taken.push(String::from_utf8(d.record.payload.to_vec()).unwrap());
            tokens.push(d.ack);
        }
        assert_eq!(source.acker().ack(&tokens), 20);
        tokio::time::timeout(Duration::from_secs(10), async {
            while events
                .acks_written
                .load(std::sync::atomic::Ordering::Relaxed)
                < 20
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap_or_else(|_| {
            panic!(
                "QoS {qos}: acknowledgements not written while the delivery channel is full \
                 (queued {}, written {})",
                events
                    .acks_queued
                    .load(std::sync::atomic::Ordering::Relaxed),
                events
                    .acks_written
                    .load(std::sync::atomic::Ordering::Relaxed)
            )
        });
        source.shutdown(Duration::from_secs(5)).await;

        // The same session again: the broker redelivers everything but the 20 acknowledged.
        let mut again = MqttSource::start(&config, &client_id).unwrap();
        let mut redelivered = std::collections::BTreeSet::new();
        while let Ok(Some(d)) = tokio::time::timeout(QUIET, again.deliveries.recv()).await {
            redelivered.insert(String::from_utf8(d.record.payload.to_vec()).unwrap());
            again.acker().ack(&[d.ack]);
        }
        again.shutdown(Duration::from_secs(5)).await;
        let expected: std::collections::BTreeSet<String> = (0..200)
            .map(|i| i.to_string())
            .filter(|p| !taken.contains(p))
            .collect();
        assert_eq!(
            redelivered, expected,
            "QoS {qos}: the broker should keep exactly the unacknowledged messages"
        );
    }
}

/// A persistent session that exists without our subscription (a connection that died before
/// SUBSCRIBE, a refused one, or topics changed in the configuration) still gets the
/// subscription: the source subscribes on every connection, session or not.
#[tokio::test]
async fn a_session_without_the_subscription_is_repaired_on_connect() {
    use sensorlake_ingest::{MqttConfig, MqttSource};
    let broker = Mosquitto::start();
    // A session for our client id, with no subscription in it.
    let mut o = rumqttc::v5::MqttOptions::new("repair-test", "127.0.0.1", broker.port);
    o.set_clean_start(false)
        .set_session_expiry_interval(Some(3600));
    let (c, mut el) = rumqttc::v5::AsyncClient::new(o, 10);
    loop {
        if let rumqttc::v5::Event::Incoming(rumqttc::v5::Incoming::ConnAck(_)) =
            el.poll().await.unwrap()
        {
            break;
        }
    }
    c.disconnect().await.unwrap();
    while el.poll().await.is_ok() {}

    let config = MqttConfig {
        url: format!("mqtt://127.0.0.1:{}", broker.port),
        topics: vec!["repair/#".into()],
        ..MqttConfig::default()
    };
    let mut source = MqttSource::start(&config, "repair-test").unwrap();
    let events = source.acker().events().clone();
    wait_subscribed(&events, "subscribed although the broker kept a session").await;
    assert!(events.connects.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    publish_qos(broker.port, "repair/d", 5, rumqttc::QoS::AtLeastOnce).await;
    for _ in 0..5 {
        let d = tokio::time::timeout(Duration::from_secs(5), source.deliveries.recv())
            .await
            .expect("a delivery")
            .unwrap();
        source.acker().ack(&[d.ack]);
    }
    source.shutdown(Duration::from_secs(5)).await;
}

/// Queued messages are bounded in bytes as well as in number: with `channel_max_bytes` of
/// 64 KiB, 10 KiB messages stop queueing at six while the pipeline reads nothing, and all of
/// them still arrive once it reads.
#[tokio::test]
async fn the_delivery_channel_holds_at_most_channel_max_bytes_of_payload() {
    use sensorlake_ingest::{MqttConfig, MqttSource};
    let broker = Mosquitto::start();
    let config = MqttConfig {
        url: broker.url(),
        topics: vec!["budget/#".into()],
        max_packet_bytes: 16 * 1024,
        channel_max_bytes: 64 * 1024,
        ..MqttConfig::default()
    };
    let mut source = MqttSource::start(&config, "budget-test").unwrap();
    let events = source.acker().events().clone();
    wait_subscribed(&events, "subscribed within 10 s").await;

    let mut o = rumqttc::MqttOptions::new("budget-pub", "127.0.0.1", broker.port);
    o.set_inflight(100);
    o.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut el) = rumqttc::AsyncClient::new(o, 200);
    for i in 0..50u8 {
        client
            .publish(
                "budget/d",
                rumqttc::QoS::AtLeastOnce,
                false,
                vec![i; 10 * 1024],
            )
            .await
            .unwrap();
    }
    let mut acked = 0;
    while acked < 50 {
        if let rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) = el.poll().await.unwrap() {
            acked += 1;
        }
    }
    // Give the reader every chance to queue more than it may.
    tokio::time::sleep(QUIET).await;
    let queued = source.deliveries.len();
    assert!(
        (1..=6).contains(&queued),
        "{queued} messages of 10 KiB queued under a 64 KiB budget"
    );
    let mut got = Vec::new();
    while got.len() < 50 {
        let d = tokio::time::timeout(Duration::from_secs(10), source.deliveries.recv())
            .await
            .expect("every message arrives once the pipeline reads")
            .unwrap();
        got.push(d.record.payload[0]);
        source.acker().ack(&[d.ack]);
    }
    assert_eq!(got, (0..50u8).collect::<Vec<_>>());
    source.shutdown(Duration::from_secs(5)).await;
}
