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
        /// The payload, or only its first [`OVERSIZE_PREFIX`] bytes when `oversize` is set.
        payload: Bytes,
        pkid: u16,
        qos: u8,
        /// Set when the packet was larger than the limit and is being passed over.
        oversize: Option<Oversize>,
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

/// A PUBLISH larger than the packet limit: its header and the start of its payload were read,
/// the rest is passed over unread into memory, so a message's size never decides how much
/// memory it takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Oversize {
    /// The whole payload's length, as the packet header says.
    pub payload_len: usize,
    /// Bytes of this packet still on the connection: the reader discards them before it reads
    /// the next packet.
    pub skip: usize,
}

/// How much of an oversize payload is kept, for the dead letter.
pub(crate) const OVERSIZE_PREFIX: usize = 4096;

/// The largest PUBLISH header (topic and MQTT 5 properties) read for an oversize packet. A
/// topic is at most 65,535 bytes; properties past this make the packet malformed for us.
const MAX_PUBLISH_HEADER: usize = 128 * 1024;

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

    /// The packet size limit.
    pub(crate) fn max_incoming(&self) -> usize {
        self.max_incoming
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
                // No Maximum Packet Size: a broker drops a message over it silently, and
                // every message must be accounted for. Oversize ones arrive and are passed
                // over as `too_large` dead letters instead (see `Oversize`).
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
        if let Some((byte0, remaining, header_len)) = fixed_header(buf)?
            && byte0 >> 4 == PUBLISH
            && header_len.saturating_add(remaining) > self.max_incoming
        {
            return self.oversize_publish(buf, byte0, header_len, remaining);
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

    /// The header and the first bytes of a PUBLISH over the size limit, once they are in `buf`;
    /// what of the packet is in `buf` is consumed, the rest is left to skip.
    fn oversize_publish(
        &self,
        buf: &mut BytesMut,
        byte0: u8,
        header_len: usize,
        remaining: usize,
    ) -> Result<Option<Incoming>, WireError> {
        let bad = |why: &str| WireError(format!("malformed oversize PUBLISH: {why}"));
        let qos = (byte0 >> 1) & 3;
        if qos == 3 {
            return Err(bad("QoS 3"));
        }
        // Variable header: topic, packet id (QoS > 0), MQTT 5 properties.
        let body = &buf[header_len..];
        let Some(topic_len) = body
            .get(..2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
        else {
            return Ok(None);
        };
        let mut at = 2 + topic_len;
        if qos > 0 {
            at += 2;
        }
        if self.protocol == MqttProtocol::V5 {
            let Some((props_len, n)) = varint(body.get(at..).unwrap_or_default())? else {
                return Ok(None);
            };
            at += n + props_len;
        }
        if at > remaining || at > MAX_PUBLISH_HEADER {
            return Err(bad("the header is longer than the packet or than 128 KiB"));
        }
        let payload_len = remaining - at;
        let keep = payload_len.min(OVERSIZE_PREFIX);
        if body.len() < at + keep {
            return Ok(None);
        }
        let topic = std::str::from_utf8(&body[2..2 + topic_len])
            .map_err(|_| bad("the topic is not UTF-8"))?
            .to_owned();
        let pkid = if qos > 0 {
            u16::from_be_bytes([body[2 + topic_len], body[3 + topic_len]])
        } else {
            0
        };
        let payload = Bytes::copy_from_slice(&body[at..at + keep]);
        let total = header_len + remaining;
        let taken = total.min(buf.len());
        let _ = buf.split_to(taken);
        Ok(Some(Incoming::Publish {
            topic,
            payload,
            pkid,
            qos,
            oversize: Some(Oversize {
                payload_len,
                skip: total - taken,
            }),
        }))
    }
}

/// The packet type of PUBLISH, the high nibble of its first byte.
const PUBLISH: u8 = 3;

/// A packet's fixed header: its first byte, the remaining length and the header's own length;
/// `None` until enough bytes are there.
fn fixed_header(buf: &[u8]) -> Result<Option<(u8, usize, usize)>, WireError> {
    let Some(&byte0) = buf.first() else {
        return Ok(None);
    };
    Ok(varint(&buf[1..])?.map(|(len, n)| (byte0, len, 1 + n)))
}

/// An MQTT variable byte integer at the start of `b`: its value and length in bytes.
fn varint(b: &[u8]) -> Result<Option<(usize, usize)>, WireError> {
    let mut value = 0usize;
    for i in 0..4 {
        let Some(&byte) = b.get(i) else {
            return Ok(None);
        };
        value |= usize::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    Err(WireError(
        "malformed packet length (more than 4 bytes)".into(),
    ))
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
            oversize: None,
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
                oversize: None,
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
                    oversize: None,
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

    /// A PUBLISH of `len` payload bytes (`0, 1, 2, …`) on `topic`, encoded for `protocol`.
    fn publish(protocol: MqttProtocol, topic: &str, qos: u8, pkid: u16, len: usize) -> Vec<u8> {
        let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
        let mut buf = BytesMut::new();
        match protocol {
            MqttProtocol::V4 => {
                let mut p = v4::Publish::new(topic, qos_v4(qos), payload);
                p.pkid = pkid;
                p.write(&mut buf).unwrap();
            }
            MqttProtocol::V5 => {
                let props = v5::PublishProperties {
                    content_type: Some("application/json".into()),
                    ..Default::default()
                };
                let mut p = v5::Publish::new(topic, qos_v5(qos), payload, Some(props));
                p.pkid = pkid;
                p.write(&mut buf).unwrap();
            }
        }
        buf.to_vec()
    }

    #[test]
    fn an_oversize_publish_keeps_its_header_and_first_bytes_and_skips_the_rest() {
        for protocol in [MqttProtocol::V4, MqttProtocol::V5] {
            for qos in [0, 1] {
                let w = Wire::new(protocol, 10_000);
                let len = 50_000;
                let packet = publish(protocol, "telemetry/s/env/d1", qos, 77, len);
                // Fed a few bytes at a time, as a socket would.
                let mut buf = BytesMut::new();
                let mut fed = 0;
                let found = loop {
                    if let Some(p) = w.read(&mut buf).unwrap() {
                        break p;
                    }
                    let n = 7.min(packet.len() - fed);
                    assert!(n > 0, "{protocol:?}: the whole packet was needed");
                    buf.extend_from_slice(&packet[fed..fed + n]);
                    fed += n;
                };
                let Incoming::Publish {
                    topic,
                    payload,
                    pkid,
                    qos: q,
                    oversize: Some(o),
                } = found
                else {
                    panic!("{protocol:?}: {found:?}");
                };
                assert_eq!(topic, "telemetry/s/env/d1");
                assert_eq!((q, pkid), (qos, if qos > 0 { 77 } else { 0 }));
                assert_eq!(o.payload_len, len, "{protocol:?}");
                assert_eq!(payload.len(), OVERSIZE_PREFIX);
                assert!(payload.iter().enumerate().all(|(i, b)| *b == i as u8));
                // Only a prefix was buffered; the rest is left to skip.
                assert!(fed < OVERSIZE_PREFIX + 200, "{protocol:?}: read {fed}");
                assert!(buf.is_empty());
                assert_eq!(o.skip, packet.len() - fed);
            }
        }
    }

    #[test]
    fn an_oversize_publish_already_in_the_buffer_is_consumed_whole() {
        for protocol in [MqttProtocol::V4, MqttProtocol::V5] {
            let w = Wire::new(protocol, 1024);
            let mut buf = BytesMut::from(&publish(protocol, "t/d", 1, 5, 3000)[..]);
            buf.extend_from_slice(&[0xD0, 0x00]); // PINGRESP
            match w.read(&mut buf).unwrap() {
                Some(Incoming::Publish {
                    payload,
                    oversize: Some(o),
                    ..
                }) => {
                    assert_eq!((payload.len(), o.payload_len, o.skip), (3000, 3000, 0));
                }
                other => panic!("{protocol:?}: {other:?}"),
            }
            assert!(matches!(
                w.read(&mut buf).unwrap(),
                Some(Incoming::PingResp)
            ));
        }
    }

    #[test]
    fn an_oversize_packet_of_another_kind_is_an_error_not_a_wait() {
        for protocol in [MqttProtocol::V4, MqttProtocol::V5] {
            let w = Wire::new(protocol, 100);
            // A SUBACK claiming 200 bytes.
            let mut buf = BytesMut::from(&[0x90, 0xC8, 0x01, 0x00, 0x01][..]);
            assert!(w.read(&mut buf).is_err(), "{protocol:?}");
            // A remaining length of more than four bytes.
            let mut buf = BytesMut::from(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01][..]);
            assert!(w.read(&mut buf).is_err(), "{protocol:?}");
        }
    }
}
