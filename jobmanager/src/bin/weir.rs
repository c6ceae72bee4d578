//! `weir`: a thin command-line client of the job manager's REST API.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde_json::Value;

#[derive(Parser)]
#[command(
    name = "weir",
    version,
    about = "Command-line client for a Weir job manager"
)]
struct Cli {
    /// Job manager REST address.
    #[arg(long, env = "WEIR_URL", default_value = "http://127.0.0.1:8081")]
    url: String,
    /// API token for mutating calls (when the job manager has one).
    #[arg(long, env = "WEIR_API_TOKEN")]
    token: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Submit a job spec (JSON file); prints the job id.
    Submit {
        /// The spec.
        file: PathBuf,
    },
    /// List jobs.
    List,
    /// Show a job: state, tasks, where each subtask runs, counters.
    Status {
        /// Job id.
        id: String,
    },
    /// Cancel a job.
    Cancel {
        /// Job id.
        id: String,
    },
    /// List task managers.
    Taskmanagers,
    /// Crash a task manager (SIGKILL for a local one).
    KillTm {
        /// Task manager id.
        id: String,
    },
    /// Create a Kafka topic (an existing one is left as it is).
    CreateTopic {
        /// Kafka bootstrap servers.
        #[arg(long, env = "WEIR_KAFKA_BOOTSTRAP", default_value = "127.0.0.1:9092")]
        bootstrap: String,
        /// Topic name.
        #[arg(long)]
        topic: String,
        /// Number of partitions.
        #[arg(long, default_value_t = 4)]
        partitions: i32,
    },
    /// Write deterministic synthetic click events (JSON, keyed by user) to a Kafka topic.
    Produce {
        /// Kafka bootstrap servers.
        #[arg(long, env = "WEIR_KAFKA_BOOTSTRAP", default_value = "127.0.0.1:9092")]
        bootstrap: String,
        /// Target topic (must exist).
        #[arg(long)]
        topic: String,
        /// Events per second; 0 writes as fast as the broker takes them.
        #[arg(long, default_value_t = 1000)]
        rate: u64,
        /// Number of events.
        #[arg(long, default_value_t = 10_000)]
        count: u64,
        /// Index of the first event (continue an earlier run without repeating it).
        #[arg(long, default_value_t = 0)]
        first: u64,
        /// Number of distinct users.
        #[arg(long, default_value_t = 100)]
        users: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weir: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> Result<(), String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(30)))
        .http_status_as_error(false)
        .build()
        .into();
    let url = |path: &str| format!("{}{path}", cli.url.trim_end_matches('/'));
    let auth = cli.token.as_ref().map(|t| format!("Bearer {t}"));
    let read =
        |resp: Result<ureq::http::Response<ureq::Body>, ureq::Error>| -> Result<Value, String> {
            let mut resp = resp.map_err(|e| format!("cannot reach {}: {e}", cli.url))?;
            let status = resp.status();
            let body: Value = resp.body_mut().read_json().unwrap_or(Value::Null);
            if status.is_success() {
                Ok(body)
            } else {
                let errors = body["errors"].as_array().map(|a| {
                    a.iter()
                        .filter_map(|e| e.as_str())
                        .collect::<Vec<_>>()
                        .join("; ")
                });
                Err(format!(
                    "{status}: {}",
                    errors.unwrap_or_else(|| body.to_string())
                ))
            }
        };
    match &cli.command {
        Command::Submit { file } => {
            let text = std::fs::read_to_string(file)
                .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
            let mut req = agent
                .post(&url("/jobs"))
                .header("content-type", "application/json");
            if let Some(a) = &auth {
                req = req.header("authorization", a);
            }
            let body = read(req.send(text.as_bytes()))?;
            println!("{}", body["jobid"].as_str().unwrap_or_default());
        }
        Command::List => {
            let body = read(agent.get(&url("/jobs")).call())?;
            println!(
                "{:<36}  {:<10}  {:<5}  {:>10}  NAME",
                "ID", "STATE", "MODE", "DURATION"
            );
            for j in body["jobs"].as_array().into_iter().flatten() {
                println!(
                    "{:<36}  {:<10}  {:<5}  {:>9.1}s  {}",
                    j["jid"].as_str().unwrap_or(""),
                    j["state"].as_str().unwrap_or(""),
                    j["mode"].as_str().unwrap_or(""),
                    j["duration"].as_u64().unwrap_or(0) as f64 / 1000.0,
                    j["name"].as_str().unwrap_or("")
                );
            }
        }
        Command::Status { id } => {
            let j = read(agent.get(&url(&format!("/jobs/{id}"))).call())?;
            println!(
                "{} ({}): {}",
                j["name"].as_str().unwrap_or(""),
                id,
                j["state"].as_str().unwrap_or("")
            );
            if let Some(f) = j["failure"].as_str() {
                println!("failure: {f}");
            }
            for v in j["vertices"].as_array().into_iter().flatten() {
                println!(
                    "task {} [{}] x{}",
                    v["id"],
                    v["name"].as_str().unwrap_or(""),
                    v["parallelism"]
                );
                for s in v["subtasks"].as_array().into_iter().flatten() {
                    println!(
                        "  #{} {:<9} on {}  in {} out {} ({:.0}/s)",
                        s["subtask"],
                        s["state"].as_str().unwrap_or(""),
                        s["taskmanager"].as_str().unwrap_or(""),
                        s["records_in"],
                        s["records_out"],
                        s["records_in_per_sec"].as_f64().unwrap_or(0.0)
                    );
                }
            }
        }
        Command::Cancel { id } => {
            let mut req = agent.delete(&url(&format!("/jobs/{id}")));
            if let Some(a) = &auth {
                req = req.header("authorization", a);
            }
            let body = read(req.call())?;
            println!("{}", body["state"].as_str().unwrap_or(""));
        }
        Command::Taskmanagers => {
            let body = read(agent.get(&url("/taskmanagers")).call())?;
            println!(
                "{:<36}  {:<5}  {:>5}  {:>13}  DATA",
                "ID", "STATE", "SLOTS", "HEARTBEAT AGE"
            );
            for t in body["taskmanagers"].as_array().into_iter().flatten() {
                println!(
                    "{:<36}  {:<5}  {:>5}  {:>11}ms  {}",
                    t["id"].as_str().unwrap_or(""),
                    t["state"].as_str().unwrap_or(""),
                    t["slots"],
                    t["heartbeat_age_ms"],
                    t["data_addr"].as_str().unwrap_or("")
                );
            }
        }
        Command::KillTm { id } => {
            let mut req = agent.post(&url(&format!("/taskmanagers/{id}/kill")));
            if let Some(a) = &auth {
                req = req.header("authorization", a);
            }
            let body = read(req.send_empty())?;
            println!("killed ({})", body["method"].as_str().unwrap_or(""));
        }
        Command::CreateTopic {
            bootstrap,
            topic,
            partitions,
        } => {
            engine::kafka::create_topic(
                bootstrap,
                topic,
                *partitions,
                true,
                Duration::from_secs(10),
            )?;
            println!("topic '{topic}' is ready");
        }
        Command::Produce {
            bootstrap,
            topic,
            rate,
            count,
            first,
            users,
        } => {
            let clicks = jobs::clicks::Clicks {
                users: *users,
                // Event time advances at the production rate.
                spacing_us: if *rate > 0 {
                    1_000_000 / *rate as i64
                } else {
                    1000
                }
                .max(1),
                ..Default::default()
            };
            let started = std::time::Instant::now();
            let n = jobs::clicks::produce(&jobs::clicks::ProduceOptions {
                bootstrap: bootstrap.clone(),
                topic: topic.clone(),
                rate: *rate,
                first: *first,
                count: *count,
                clicks,
            })?;
            println!(
                "produced {n} events to '{topic}' in {:.1} s",
                started.elapsed().as_secs_f64()
            );
        }
    }
    Ok(())
}
