//! The MQTT source, MQTT 3.1.1 and 5: our own subscriber connection over rumqttc's codecs.
//!
//! Settings shared by every MQTT piece live in [`config`]; the running part is [`source`].

pub mod config;
pub mod source;
mod wire;

pub use config::{BrokerAddr, MqttConfig, MqttProtocol};
pub use source::{AckToken, Delivery, MqttAcker, MqttSource, SourceEvent};
