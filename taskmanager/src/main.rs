//! `taskmanager`: parses flags, loads configuration, and runs a task manager.

use std::process::ExitCode;

use clap::Parser;
use taskmanager::config::{Flags, TmConfig};

fn main() -> ExitCode {
    engine::telemetry::init("info");
    let flags = Flags::parse();
    let config = match TmConfig::load(&flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("taskmanager: {e}");
            return ExitCode::from(2);
        }
    };
    match actix::System::new().block_on(taskmanager::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("taskmanager: {e}");
            ExitCode::FAILURE
        }
    }
}
