//! Telemetry v1 in, Arrow out: decoding, validation, de-duplication and enrichment.
//!
//! The transform is the pure, synchronous middle of sensorlake: [`Transformer::process`] takes
//! a batch of [`RawRecord`](sensorlake_core::RawRecord)s from `ingest` and returns the
//! accepted readings and the dead letters as Arrow record batches for `sink`, with the
//! [`FlushCounts`](sensorlake_core::FlushCounts) that account for every reading and the device
//! checkpoints to commit. It does no I/O (except [`Registry::from_csv_path`] at start-up), no
//! async and no locking; the caller decides on which thread it runs.
//!
//! # How a batch is processed
//!
//! The rules of `shared/spec/telemetry-v1.md` apply per message, then per reading, in the
//! order documented at [`Reason::is_deduplicated`](sensorlake_core::Reason::is_deduplicated):
//! envelope (size, UTF-8, JSON, object, duplicate keys, `device_id`, topic, `type`), batch
//! shape, `seq`, the de-duplication gate, `ts`, metrics, the never-decreasing rule, the
//! registry. The work is split in two phases so that the expensive part runs in parallel:
//!
//! 1. **Decode and validate** (`validate.rs`, `decode.rs`): each message on its own. serde_json
//!    reads the payload into borrowed parts (no `serde_json::Value`, no per-reading `String`;
//!    metric values, `seq` and `ts` are taken as their JSON text, see `decode.rs`), then every
//!    stateless rule runs and each reading gets a compact verdict with its parsed values. For
//!    4096 records or more this phase runs on rayon over chunks of 1024 records; smaller
//!    batches stay on the calling thread, where handing off would cost more than it saves.
//! 2. **Gate and build** (`transformer.rs`): sequentially, in record order, each reading goes
//!    through the per-device de-duplication gate (`dedup.rs`); then readings that passed the
//!    stateless rules meet the never-decreasing rule and the registry policy, and are appended
//!    to Arrow builders (`build.rs`). Rejected ones go to the dead-letter builder.
//!
//! The split keeps the contract's order: a reading rejected in phase 1 for a reason after the
//! gate (a bad `ts`, say) still passes through the gate in phase 2 before it is dead-lettered,
//! so a redelivered copy is counted as a duplicate instead of being dead-lettered twice.
//!
//! # Decisions worth knowing
//! - A batch item's own problems (not an object, a duplicate key inside it, a bad `seq`) reject
//!   only that reading, dead-lettered with its own JSON bytes; problems of the envelope or of
//!   the `readings` array reject the whole message, counted as one.
//! - A message with `readings` is a batch; reading fields at its top level are then ignored,
//!   like any unknown key. `device_id` and `type` inside batch items are ignored too.
//! - Device checkpoints hold the highest `seq` that passed the gate, including readings
//!   dead-lettered after it, since those are committed too and must not be recorded twice.
//! - A `seq` more than 128 below a device's highest counts as a duplicate (`dedup.rs`).
//! - The never-decreasing rule compares with the accepted reading of highest `seq`: a later
//!   `seq` must not be lower, an earlier one (arriving late) must not be higher.
//! - Integer `ts` must be epoch milliseconds from 1971 to 9999; seconds, microseconds and
//!   nanoseconds are rejected as `invalid_ts` (see `validate::MIN_TS_MS`).
//! - A UTF-8 byte order mark is not JSON: a BOM-prefixed payload is `json_syntax`.
//! - A number beyond `f64` (`1e400`) is `out_of_range` as a metric value; anywhere else
//!   serde_json reports it as a syntax error, and so does this crate (`json_syntax`).
//! - JSON nested deeper than 128 levels is `json_syntax` (serde_json's recursion limit), never
//!   a stack overflow.

mod build;
pub mod config;
mod decode;
mod dedup;
pub mod registry;
mod transformer;
mod validate;

pub use config::{TransformConfig, UnknownDevices, UnknownMetrics};
pub use registry::{DeviceInfo, Registry, RegistryError, is_valid_device_id};
pub use transformer::{TransformOutput, Transformer};
