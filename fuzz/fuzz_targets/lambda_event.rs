//! Lambda invocation events (JSON) through the function's event parsing; see
//! `sensorlake_fuzz::lambda`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| sensorlake_fuzz::lambda::run(data));
