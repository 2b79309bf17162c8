//! MQTT 3.1.1 and 5 packets, as far as a subscriber needs them: encoding what we send and
//! decoding what the broker sends, over rumqttc's packet codecs (`mqttbytes`).
//!
//! The connection logic in [`super::source`] is written once against [`Wire`] and [`Incoming`];
//! this module is the only place where the two protocol versions differ.

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;

use super::config::MqttProtocol;

/// What a subscriber reacts to in a packet from the broker.
#[derive(Debug)]
pub(crate) enum Incoming {
    ConnAck {
        session_present: bool,
        /// Why the broker refused the connection, if it did.
        refused: Option<String>,
        /// MQTT 5: the keep-alive the broker imposes instead of ours.
        server_keep_alive: Option<u16>,
    },
    Publish {
        topic: String,
        payload: Bytes,
        pkid: u16,
        qos: u8,
    },
    /// The QoS granted per topic filter; `None` where the subscription was refused.
    SubAck {
        granted: Vec<Option<u8>>,
    },
    /// QoS 2, second half: the broker released a message we acknowledged with PUBREC.
    PubRel {
        pkid: u16,
    },
    PingResp,
    /// The broker closes the connection, with its reason (MQTT 5).
    Disconnect {
        reason: String,
    },
    /// Anything a subscriber does not act on.
    Other,
}

/// A malformed or oversize packet from the broker: the connection cannot continue.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct WireError(String);

/// Encoder and decoder for one protocol version.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Wire {
    protocol: MqttProtocol,
    /// Largest packet accepted from the broker.
    max_incoming: usize,
}

/// What goes into CONNECT.
pub(crate) struct ConnectOptions<'a> {
    pub client_id: &'a str,
    pub keep_alive_secs: u16,
    pub clean_start: bool,
    pub username: Option<&'a str>,
    pub password: Option<&'a str>,
    /// MQTT 5 only.
    pub receive_maximum: u16,
    /// MQTT 5 only.
    pub session_expiry_secs: u32,
}

/// Packets we build are small and well-formed; the size limit only guards incoming ones.
const NO_LIMIT: usize = usize::MAX;

impl Wire {
    pub(crate) fn new(protocol: MqttProtocol, max_incoming: usize) -> Wire {
        Wire {
            protocol,
            max_incoming,
        }
    }

    pub(crate) fn connect(&self, o: &ConnectOptions<'_>, out: &mut BytesMut) {
        let ok = match self.protocol {
            MqttProtocol::V4 => {
                let mut c = v4::Connect::new(o.client_id);
                c.keep_alive = o.keep_alive_secs;
                c.clean_session = o.clean_start;
                if let Some(u) = o.username {
                    c.set_login(u, o.password.unwrap_or_default());
                }
                v4::Packet::Connect(c).write(out, NO_LIMIT).is_ok()
            }
            MqttProtocol::V5 => {
                let mut props = v5::ConnectProperties::new();
                props.receive_maximum = Some(o.receive_maximum);
                props.session_expiry_interval = Some(o.session_expiry_secs);
                props.max_packet_size = Some(u32::try_from(self.max_incoming).unwrap_or(u32::MAX));
                let c = v5::Connect {
                    keep_alive: o.keep_alive_secs,
                    client_id: o.client_id.to_owned(),
                    clean_start: o.clean_start,
                    properties: Some(props),
                };
                let login = o
                    .username
                    .map(|u| v5::Login::new(u, o.password.unwrap_or_default()));
                v5::Packet::Connect(c, None, login)
                    .write(out, Some(u32::MAX))
                    .is_ok()
            }
        };
        debug_assert!(ok, "CONNECT encodes");
    }

    pub(crate) fn subscribe(&self, pkid: u16, topics: &[String], qos: u8, out: &mut BytesMut) {
        let ok = match self.protocol {
            MqttProtocol::V4 => {
                let mut s = v4::Subscribe::new_many(
                    topics
                        .iter()
                        .map(|t| v4::SubscribeFilter::new(t.clone(), qos_v4(qos))),
                );
                s.pkid = pkid;
                v4::Packet::Subscribe(s).write(out, NO_LIMIT).is_ok()
            }
            MqttProtocol::V5 => {
                // Subscribing again on every connection must not replay retained messages.
                let mut s = v5::Subscribe::new_many(
                    topics.iter().map(|t| v5::Filter {
                        retain_forward_rule: v5::RetainForwardRule::OnNewSubscribe,
                        ..v5::Filter::new(t.clone(), qos_v5(qos))
                    }),
                    None,
                );
                s.pkid = pkid;
                v5::Packet::Subscribe(s).write(out, Some(u32::MAX)).is_ok()
            }
        };
        debug_assert!(ok, "SUBSCRIBE encodes");
    }

    /// Acknowledges a received message: PUBACK for QoS 1, PUBREC for QoS 2.
    pub(crate) fn ack(&self, qos: u8, pkid: u16, out: &mut BytesMut) {
        let ok = match (self.protocol, qos) {
            (MqttProtocol::V4, 1) => v4::PubAck::new(pkid).write(out).is_ok(),
            (MqttProtocol::V4, _) => v4::PubRec::new(pkid).write(out).is_ok(),
            (MqttProtocol::V5, 1) => v5::PubAck::new(pkid, None).write(out).is_ok(),
            (MqttProtocol::V5, _) => v5::PubRec::new(pkid, None).write(out).is_ok(),
        };
        debug_assert!(ok, "ack encodes");
    }

    pub(crate) fn pubcomp(&self, pkid: u16, out: &mut BytesMut) {
        let ok = match self.protocol {
            MqttProtocol::V4 => v4::PubComp::new(pkid).write(out).is_ok(),
            MqttProtocol::V5 => v5::PubComp::new(pkid, None).write(out).is_ok(),
        };
        debug_assert!(ok, "PUBCOMP encodes");
    }

    pub(crate) fn ping(&self, out: &mut BytesMut) {
        // PINGREQ is the same two bytes in both versions.
        out.extend_from_slice(&[0xC0, 0x00]);
    }

    pub(crate) fn disconnect(&self, out: &mut BytesMut) {
        // A DISCONNECT without a body: MQTT 3.1.1's only form, MQTT 5's "normal disconnection".
        out.extend_from_slice(&[0xE0, 0x00]);
    }

    /// Takes the next whole packet off the front of `buf`; `None` when more bytes are needed.
    pub(crate) fn read(&self, buf: &mut BytesMut) -> Result<Option<Incoming>, WireError> {
        // A bodiless DISCONNECT is valid in MQTT 5 (reason 0) but the v5 codec rejects it, and
        // one with only a reason code (say 0x8E, session taken over) it would swallow.
        if buf.len() >= 2 && buf[0] == 0xE0 && buf[1] == 0 {
            let _ = buf.split_to(2);
            return Ok(Some(Incoming::Disconnect {
                reason: "normal disconnection".into(),
            }));
        }
        if buf.len() >= 3 && buf[0] == 0xE0 && buf[1] == 1 {
            let code = buf[2];
            let _ = buf.split_to(3);
            return Ok(Some(Incoming::Disconnect {
                reason: format!("reason code 0x{code:02X}"),
            }));
        }
        match self.protocol {
            MqttProtocol::V4 => match v4::Packet::read(buf, self.max_incoming) {
                Ok(p) => Ok(Some(from_v4(p))),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
                Err(e) => Err(WireError(e.to_string())),
            },
            MqttProtocol::V5 => {
                let max = Some(u32::try_from(self.max_incoming).unwrap_or(u32::MAX));
                match v5::Packet::read(buf, max) {
                    Ok(p) => from_v5(p).map(Some),
                    Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
                    Err(e) => Err(WireError(e.to_string())),
                }
            }
        }
    }
}

fn qos_v4(q: u8) -> rumqttc::mqttbytes::QoS {
    match q {
        0 => rumqttc::mqttbytes::QoS::AtMostOnce,
        1 => rumqttc::mqttbytes::QoS::AtLeastOnce,
        _ => rumqttc::mqttbytes::QoS::ExactlyOnce,
    }
}

fn qos_v5(q: u8) -> rumqttc::v5::mqttbytes::QoS {
    match q {
        0 => rumqttc::v5::mqttbytes::QoS::AtMostOnce,
        1 => rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        _ => rumqttc::v5::mqttbytes::QoS::ExactlyOnce,
    }
}

fn from_v4(p: v4::Packet) -> Incoming {
    match p {
        v4::Packet::ConnAck(a) => Incoming::ConnAck {
            session_present: a.session_present,
            refused: (a.code != v4::ConnectReturnCode::Success).then(|| format!("{:?}", a.code)),
            server_keep_alive: None,
        },
        v4::Packet::Publish(p) => Incoming::Publish {
            topic: p.topic,
            payload: p.payload,
            pkid: p.pkid,
            qos: p.qos as u8,
        },
        v4::Packet::SubAck(s) => Incoming::SubAck {
            granted: s
                .return_codes
                .iter()
                .map(|c| match c {
                    v4::SubscribeReasonCode::Success(q) => Some(*q as u8),
                    v4::SubscribeReasonCode::Failure => None,
                })
                .collect(),
        },
        v4::Packet::PubRel(r) => Incoming::PubRel { pkid: r.pkid },
        v4::Packet::PingResp => Incoming::PingResp,
        v4::Packet::Disconnect => Incoming::Disconnect {
            reason: "disconnected by the broker".into(),
        },
        _ => Incoming::Other,
    }
}

fn from_v5(p: v5::Packet) -> Result<Incoming, WireError> {
    Ok(match p {
        v5::Packet::ConnAck(a) => Incoming::ConnAck {
            session_present: a.session_present,
            refused: (a.code != v5::ConnectReturnCode::Success).then(|| {
                let why = a.properties.as_ref().and_then(|p| p.reason_string.clone());
                match why {
                    Some(w) => format!("{:?} ({w})", a.code),
                    None => format!("{:?}", a.code),
                }
            }),
            server_keep_alive: a.properties.and_then(|p| p.server_keep_alive),
        },
        v5::Packet::Publish(p) => {
            // We never allow topic aliases (Topic Alias Maximum 0), so the topic is always here.
            let topic = String::from_utf8(p.topic.to_vec())
                .map_err(|_| WireError("a PUBLISH topic is not UTF-8".into()))?;
            Incoming::Publish {
                topic,
                payload: p.payload,
                pkid: p.pkid,
                qos: p.qos as u8,
            }
        }
        v5::Packet::SubAck(s) => Incoming::SubAck {
            granted: s
                .return_codes
                .iter()
                .map(|c| match c {
                    v5::SubscribeReasonCode::Success(q) => Some(*q as u8),
                    _ => None,
                })
                .collect(),
        },
        v5::Packet::PubRel(r) => Incoming::PubRel { pkid: r.pkid },
        v5::Packet::PingResp(_) => Incoming::PingResp,
        v5::Packet::Disconnect(d) => Incoming::Disconnect {
            reason: match d.properties.and_then(|p| p.reason_string) {
                Some(why) => format!("{:?} ({why})", d.reason_code),
                None => format!("{:?}", d.reason_code),
            },
        },
        _ => Incoming::Other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> ConnectOptions<'static> {
        ConnectOptions {
            client_id: "c",
            keep_alive_secs: 30,
            clean_start: false,
            username: Some("u"),
            password: Some("p"),
            receive_maximum: 100,
            session_expiry_secs: 60,
        }
    }

    #[test]
    fn round_trips_what_a_subscriber_sends_and_reads_what_a_broker_sends() {
        for protocol in [MqttProtocol::V4, MqttProtocol::V5] {
            let w = Wire::new(protocol, 1 << 20);
            let mut out = BytesMut::new();
            w.connect(&opts(), &mut out);
            w.subscribe(1, &["telemetry/#".into()], 1, &mut out);
            w.ack(1, 7, &mut out);
            w.ack(2, 8, &mut out);
            w.pubcomp(8, &mut out);
            w.ping(&mut out);
            w.disconnect(&mut out);
            assert!(out.len() > 20, "{protocol:?}: {} bytes", out.len());

            // A PUBLISH as the broker would send it, split across two reads.
            let mut publish = BytesMut::new();
            match protocol {
                MqttProtocol::V4 => {
                    let mut p = v4::Publish::new("telemetry/s/t/d1", qos_v4(1), b"{}".to_vec());
                    p.pkid = 9;
                    p.write(&mut publish).unwrap();
                }
                MqttProtocol::V5 => {
                    let mut p = v5::Publish::new("telemetry/s/t/d1", qos_v5(1), &b"{}"[..], None);
                    p.pkid = 9;
                    p.write(&mut publish).unwrap();
                }
            }
            let mut buf = BytesMut::from(&publish[..3]);
            assert!(
                w.read(&mut buf).unwrap().is_none(),
                "half a packet is not a packet"
            );
            buf.extend_from_slice(&publish[3..]);
            buf.extend_from_slice(&[0xD0, 0x00]); // PINGRESP
            buf.extend_from_slice(&[0xE0, 0x00]); // DISCONNECT
            buf.extend_from_slice(&[0xE0, 0x01, 0x8E]); // DISCONNECT, session taken over
            match w.read(&mut buf).unwrap() {
                Some(Incoming::Publish {
                    topic,
                    payload,
                    pkid,
                    qos,
                }) => {
                    assert_eq!(
                        (topic.as_str(), &payload[..], pkid, qos),
                        ("telemetry/s/t/d1", &b"{}"[..], 9, 1)
                    );
                }
                other => panic!("{protocol:?}: {other:?}"),
            }
            assert!(matches!(
                w.read(&mut buf).unwrap(),
                Some(Incoming::PingResp)
            ));
            assert!(matches!(
                w.read(&mut buf).unwrap(),
                Some(Incoming::Disconnect { .. })
            ));
            match w.read(&mut buf).unwrap() {
                Some(Incoming::Disconnect { reason }) => assert!(reason.contains("8E"), "{reason}"),
                other => panic!("{protocol:?}: {other:?}"),
            }
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn an_oversize_packet_is_an_error_not_a_wait() {
        for protocol in [MqttProtocol::V4, MqttProtocol::V5] {
            let w = Wire::new(protocol, 100);
            let mut buf = BytesMut::new();
            match protocol {
                MqttProtocol::V4 => v4::Publish::new("t", qos_v4(0), vec![0u8; 200])
                    .write(&mut buf)
                    .unwrap(),
                MqttProtocol::V5 => v5::Publish::new("t", qos_v5(0), vec![0u8; 200], None)
                    .write(&mut buf)
                    .unwrap(),
            };
            assert!(w.read(&mut buf).is_err(), "{protocol:?}");
        }
    }
}
