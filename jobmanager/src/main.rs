//! `jobmanager`: the Weir job manager binary.
//!
//! - `serve`: run a job manager that task managers connect to.
//! - `local`: a job manager plus N task manager processes on loopback (optionally a job).
//! - `run-local FILE`: run a job spec in this process only, printing results and throughput.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use engine::graph::JobGraph;
use engine::runtime::{JobOutcome, LocalConfig, LocalExecutor, TaskMetrics};
use engine::spec::JobSpec;
use jobmanager::config::JmConfig;

#[derive(Parser)]
#[command(name = "jobmanager", version, about = "Weir job manager")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a job manager; task managers connect to its control address.
    Serve {
        #[command(flatten)]
        config: JmConfig,
    },
    /// Run a job manager and N task manager processes on this machine.
    Local {
        /// Number of task manager processes to start.
        #[arg(long, default_value_t = 3)]
        taskmanagers: usize,
        /// Slots per task manager.
        #[arg(long, default_value_t = 2)]
        slots: u32,
        /// REST port (shorthand for --rest-addr 127.0.0.1:PORT).
        #[arg(long)]
        rest_port: Option<u16>,
        /// A job spec to submit once the task managers registered.
        #[arg(long)]
        job: Option<PathBuf>,
        #[command(flatten)]
        config: JmConfig,
    },
    /// Run a job spec in this process and print its results and throughput.
    RunLocal {
        /// Path of the job spec (JSON).
        file: PathBuf,
        /// Worker threads (arbiters) the subtasks are spread over. Default: number of CPUs.
        #[arg(long)]
        slots: Option<usize>,
        /// Records of each collect sink to print at the end.
        #[arg(long, default_value_t = 10)]
        show: usize,
        /// Cancel the job after this many seconds (for unbounded sources). Ctrl-C cancels too.
        #[arg(long)]
        duration_secs: Option<u64>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config } => {
            engine::telemetry::init("info");
            let result = actix::System::new().block_on(async move {
                let jm = jobmanager::start(&config, Default::default()).await?;
                println!(
                    "Weir job manager: REST http://{}  control {}",
                    jm.rest_addr, jm.control_addr
                );
                let _ = tokio::signal::ctrl_c().await;
                jm.server.stop(true).await;
                Ok::<(), String>(())
            });
            exit(result)
        }
        Command::Local {
            taskmanagers,
            slots,
            rest_port,
            job,
            mut config,
        } => {
            engine::telemetry::init("warn");
            if let Some(p) = rest_port {
                config.rest_addr = format!("127.0.0.1:{p}");
            }
            exit(actix::System::new().block_on(jobmanager::local::run(
                config,
                taskmanagers,
                slots,
                job,
            )))
        }
        Command::RunLocal {
            file,
            slots,
            show,
            duration_secs,
        } => {
            engine::telemetry::init("warn");
            run_local(file, slots, show, duration_secs)
        }
    }
}

fn exit(result: Result<(), String>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
fn run_local(file: PathBuf, slots: Option<usize>, show: usize, duration: Option<u64>) -> ExitCode {
    let text = match std::fs::read_to_string(&file) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: cannot read {}: {e}", file.display());
            return ExitCode::from(2);
        }
    };
    let registry = jobs::registry();
    let graph = match JobSpec::from_json(&text).and_then(|mut spec| {
        JobGraph::build(&spec, &registry)?;
        registry.resolve(&mut spec)?;
        JobGraph::build(&spec, &registry)
    }) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("error: {}: {e}", file.display());
            return ExitCode::from(2);
        }
    };
    let mut config = LocalConfig::default();
    if let Some(s) = slots {
        config.slots = s.max(1);
    }
    println!(
        "job '{}': {} operators in {} tasks on {} slots",
        graph.name,
        graph.vertices.len(),
        graph.tasks.len(),
        config.slots
    );
    print!("{}", graph.describe());

    let outcome = actix::System::new().block_on(async move {
        let job = match LocalExecutor::start(&graph, &config) {
            Ok(j) => j,
            Err(e) => return Err(e),
        };
        // A duration too long for the clock runs until the job ends.
        let now = tokio::time::Instant::now();
        let deadline = duration.and_then(|s| now.checked_add(Duration::from_secs(s)));
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        let handle = job.handle();
        let mut last = handle.metrics();
        let wait = job.wait();
        tokio::pin!(wait);
        loop {
            tokio::select! {
                outcome = &mut wait => return Ok(outcome),
                _ = tokio::signal::ctrl_c() => { eprintln!("canceling..."); handle.cancel(); }
                _ = sleep_until(deadline) => handle.cancel(),
                _ = tick.tick() => {
                    let now = handle.metrics();
                    let rates: Vec<String> = now.iter().zip(&last)
                        .map(|(n, l)| format!("{}: {}/s", n.name, n.records_in - l.records_in)).collect();
                    println!("  {}", rates.join("  |  "));
                    last = now;
                }
            }
        }
    });
    match outcome {
        Ok(outcome) => report(outcome, show),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn report(outcome: JobOutcome, show: usize) -> ExitCode {
    let secs = outcome.elapsed.as_secs_f64().max(1e-9);
    for (op, records) in &outcome.collected {
        println!("collect '{op}': {} records", records.len());
        for r in records.iter().take(show) {
            println!("  {}", r.value);
        }
        if records.len() > show {
            println!("  ... ({} more)", records.len() - show);
        }
    }
    println!("elapsed {:.3} s", secs);
    for TaskMetrics {
        name,
        records_in,
        records_out,
        backpressure_ms,
        ..
    } in &outcome.metrics
    {
        println!(
            "  task [{name}]: {records_in} in ({:.0}/s), {records_out} out, {backpressure_ms} ms backpressured",
            *records_in as f64 / secs
        );
    }
    match outcome.result {
        Ok(()) => {
            println!("job finished");
            ExitCode::SUCCESS
        }
        Err(engine::EngineError::Canceled) => {
            println!("job canceled");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("job failed: {e}");
            ExitCode::FAILURE
        }
    }
}
