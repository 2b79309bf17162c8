//! sensorlake: MQTT in, validated and enriched Parquet out.
//!
//! The stages live in their own crates (`sensorlake-ingest`, `-transform`, `-sink`,
//! `-simulator`); this crate wires them: configuration, the pipeline task, metrics, the
//! one rayon hand-off, and the commands of the `sensorlake` binary.

pub mod bench;
pub mod commands;
pub mod config;
pub mod cpu;
#[cfg(feature = "demo")]
pub mod demo;
pub mod pipeline;
pub mod telemetry;
