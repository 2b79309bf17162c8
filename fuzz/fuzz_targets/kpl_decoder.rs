//! Kinesis record bytes through KPL de-aggregation and `expand`, and aggregation round trips;
//! see `sensorlake_fuzz::kpl`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| sensorlake_fuzz::kpl::run(data));
