//! The `sensorlake` binary: parses the command line, sets up logging, runs one command and
//! turns its outcome into an exit code (0 success, 1 failure or inexact verify, 2 bad usage
//! or configuration).

use std::process::ExitCode;

use clap::Parser;
use sensorlake::commands::{self, Cli};

fn main() -> ExitCode {
    let cli = Cli::parse();
    commands::init_logging(&cli);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
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
