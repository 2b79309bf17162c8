//! The `sensorlake` binary: parses the command line, sets up logging, runs one command and
//! turns its outcome into an exit code (0 success, 1 failure or inexact verify, 2 bad usage
//! or configuration).

use std::process::ExitCode;

use clap::Parser;
use sensorlake::commands::{self, Cli};

fn main() -> ExitCode {
    let cli = Cli::parse();
    commands::init_logging(&cli);
    // Two rustls crypto providers are linked (object_store's and the AWS SDK's); rustls
    // refuses to pick one, so every binary that talks TLS names it first.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    // `run` keeps its runtime to one thread. Its async side only moves bytes (the MQTT event
    // loop, the batcher, the metrics endpoint) while transforms run on rayon and commits on
    // blocking threads; on one thread a delivery wakes the batcher without a futex and a
    // context switch. Measured with `sensorlake bench`: 11.2-11.9 CPU s per million readings
    // against 14.6-15.3 with the multi-threaded runtime (BENCHMARKS.md).
    let mut builder = match cli.command {
        commands::Command::Run(_) => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(commands::dispatch(cli)) {
        Ok(code) => code,
        Err(e) => {
            // The whole chain: what failed, where, and the underlying cause.
            eprintln!("error: {e:#}");
            ExitCode::from(commands::exit_code_for(&e))
        }
    }
}
