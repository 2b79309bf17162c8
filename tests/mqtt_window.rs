//! Measures what DESIGN.md's "in-flight window" section relies on, against real Mosquitto:
//! how many unacknowledged QoS 1 messages the broker sends a subscriber that never acks.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::Mosquitto;

/// No publish for this long means the broker has stopped sending.
const QUIET: Duration = Duration::from_millis(700);

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
