//! sensorlake sources.
//!
//! A source turns a transport into a stream of [`Delivery`]s — a [`RawRecord`] plus the
//! [`AckToken`] that acknowledges it — on a bounded channel, and hands out an acknowledger that
//! the pipeline calls only after the records are committed to the lake. Sources know nothing of
//! payload formats or Parquet.
//!
//! [`RawRecord`]: sensorlake_core::RawRecord

pub mod backoff;
pub mod kinesis;
pub mod mqtt;

pub use mqtt::{AckToken, Delivery, MqttAcker, MqttConfig, MqttProtocol, MqttSource};
