//! `taskmanager`: the Weir task manager binary.
//!
//! The task manager hosts subtask actors for a job manager over the network. That control
//! protocol and data plane are the next build step (see the README's roadmap); until then
//! jobs run in process with `jobmanager run-local`, which uses the same subtask actors.

use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "taskmanager",
    version,
    about = "Weir task manager (distributed mode not available yet)"
)]
struct Cli {}

fn main() -> ExitCode {
    engine::telemetry::init("info");
    let _ = Cli::parse();
    eprintln!("taskmanager: the distributed runtime is not available in this version; use `jobmanager run-local FILE`");
    ExitCode::from(2)
}
