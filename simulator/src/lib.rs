//! The sensorlake device fleet simulator and lake verifier.
//!
//! Three parts, from pure to shell:
//! - [`fleet`]: a seeded model of a device fleet that produces telemetry v1 messages, valid and
//!   deliberately bad, each with the outcome the pipeline must reach ([`fleet::Expect`]). No
//!   I/O, no clock.
//! - [`manifest`] and [`publish`]: `sensorlake simulate` publishes a fleet's messages to an MQTT
//!   broker or a Kinesis stream at a rate and records what was confirmed in a [`Manifest`].
//! - [`verify`](mod@verify): `sensorlake verify` reads the lake's Parquet files and checks them
//!   against a manifest: every valid reading exactly once with its exact values, every bad one
//!   in the dead-letter table with its exact reason.
//!
//! The simulator knows nothing of the pipeline's internals: it shares only the wire format, the
//! reason codes, the fingerprints and the table schemas of `sensorlake-core`, and the KPL
//! aggregation format and retry backoff of `sensorlake-ingest`.

pub mod error;
pub mod fleet;
pub mod manifest;
pub mod publish;
mod rng;
mod signals;
pub mod verify;

pub use error::SimError;
pub use fleet::{BadKind, BadReading, Device, Expect, Fleet, FleetSpec, Message};
pub use manifest::{DeviceManifest, Manifest, ManifestBuilder};
pub use publish::{KinesisOptions, SimStats, SimulateOptions, simulate, simulate_until};
pub use verify::{LakeSource, LocalLake, VerifyReport, verify, verify_source};
