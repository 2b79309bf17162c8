//! What the fuzz targets run, kept out of `fuzz_targets/` so that the seed generator
//! (`examples/gen_seeds.rs`) and the seed replay test (`tests/seeds.rs`) share it.
//!
//! Each module's `run` takes the fuzzer's bytes and panics when an invariant breaks; a panic is
//! what libFuzzer reports as a crash. Bad input is never a panic here: the code under test must
//! turn it into a dead letter or an error.

pub mod kpl;
pub mod lambda;
pub mod telemetry;
