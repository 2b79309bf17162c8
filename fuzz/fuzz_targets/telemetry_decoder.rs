//! Payload bytes through the transform; see `sensorlake_fuzz::telemetry` for the input layout
//! and the invariants checked.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| sensorlake_fuzz::telemetry::run(data));
