//! The MQTT source (rumqttc), MQTT 3.1.1 and 5.
//!
//! Settings shared by every MQTT piece live in [`config`]; the running part is [`source`].

pub mod config;
pub mod source;

pub use config::{BrokerAddr, MqttConfig, MqttProtocol};
pub use source::{AckToken, Delivery, MqttAcker, MqttSource, SourceEvent};
