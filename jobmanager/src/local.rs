//! `jobmanager local`: a job manager plus N real `taskmanager` child processes on loopback.
//!
//! Killing a task manager from the API or dashboard is a real process crash (SIGKILL).
//! Ctrl-C stops everything this command started; the children also exit on their own when
//! the job manager disappears (`--exit-after-disconnect-ms`), so none are left orphaned.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::config::JmConfig;
use crate::dispatcher::SubmitJob;
use crate::resource_manager::{ListTaskManagers, LocalProcesses};

/// Where the `taskmanager` binary is: next to this executable.
pub fn taskmanager_binary() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let bin = exe.with_file_name(format!("taskmanager{}", std::env::consts::EXE_SUFFIX));
    if bin.exists() {
        Ok(bin)
    } else {
        Err(format!(
            "the taskmanager binary is missing at {} (build it: cargo build --release -p taskmanager)",
            bin.display()
        ))
    }
}

/// Runs the local cluster until Ctrl-C.
pub async fn run(
    mut config: JmConfig,
    taskmanagers: usize,
    slots: u32,
    job: Option<PathBuf>,
) -> Result<(), String> {
    let bin = taskmanager_binary()?;
    config.control_addr = "127.0.0.1:0".into();
    let procs: LocalProcesses = Default::default();
    let jm = crate::start(&config, procs.clone()).await?;
    for _ in 0..taskmanagers {
        let mut cmd = tokio::process::Command::new(&bin);
        cmd.args([
            "--jobmanager",
            &jm.control_addr.to_string(),
            "--slots",
            &slots.to_string(),
        ])
        .args(["--exit-after-disconnect-ms", "3000"])
        .stdin(Stdio::null())
        .kill_on_drop(true);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "warn");
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let pid = child.id().ok_or("task manager exited at once")?;
        procs
            .lock()
            .map_err(|_| "process table poisoned")?
            .insert(pid, child);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let alive = jm
            .rm
            .send(ListTaskManagers)
            .await
            .map_err(|e| e.to_string())?;
        if alive.iter().filter(|t| t.state == "ALIVE").count() >= taskmanagers {
            break;
        }
        if Instant::now() > deadline {
            shutdown(&procs).await;
            return Err(format!(
                "only {} of {taskmanagers} task managers registered within 30 s",
                alive.len()
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let url = format!("http://{}", jm.rest_addr);
    println!("Weir is running: {taskmanagers} task managers with {slots} slots each.");
    println!("  Dashboard:  {url}/");
    println!("  REST API:   {url}  (e.g. curl {url}/overview)");
    println!("  CLI:        weir --url {url} list");
    if let Some(token) = &config.api_token {
        println!("  API token:  {token}");
    }
    if let Some(path) = job {
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        match jm
            .dispatcher
            .send(SubmitJob(text))
            .await
            .map_err(|e| e.to_string())?
        {
            Ok(id) => {
                println!("  Job:        {} submitted as {id}", path.display());
                println!("              curl {url}/jobs/{id}");
            }
            Err(e) => println!("  Job:        {} was rejected: {e:?}", path.display()),
        }
    }
    println!("Press Ctrl-C to stop.");
    let _ = tokio::signal::ctrl_c().await;
    println!("Stopping...");
    shutdown(&procs).await;
    jm.server.stop(true).await;
    Ok(())
}

async fn shutdown(procs: &LocalProcesses) {
    let children: Vec<tokio::process::Child> = match procs.lock() {
        Ok(mut p) => p.drain().map(|(_, c)| c).collect(),
        Err(_) => return,
    };
    for mut c in children {
        let _ = c.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(5), c.wait()).await;
    }
}
