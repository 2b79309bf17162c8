//! The MQTT source, MQTT 3.1.1 and 5: our own subscriber connection over rumqttc's codecs.
//!
//! Settings shared by every MQTT piece live in [`config`]; the running part is [`source`];
//! TLS (`mqtts://`, `[mqtt.tls]`) is the private `tls` module.

pub mod config;
pub mod source;
mod tls;
mod wire;

pub use config::{BrokerAddr, MqttConfig, MqttProtocol, TlsConfig};
pub use source::{AckToken, Delivery, MqttAcker, MqttSource, SourceEvent};
