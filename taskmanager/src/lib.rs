//! The Weir task manager: registers with a job manager, hosts subtask actors in its slots,
//! serves the data plane, and hosts a node of the distributed cache.
//!
//! - [`config`] — flags and TOML configuration.
//! - [`task_manager`] — the `TaskManager` actor (deployments, heartbeats).
//! - [`deployment`] — the subtasks of one job deployment.
//! - [`run`] — the control connection loop that ties them together.

pub mod config;
pub mod deployment;
pub mod task_manager;

use std::time::{Duration, Instant};

use actix::prelude::*;
use engine::cache::{CacheNode, NodeConfig};
use engine::ids::TaskManagerId;
use engine::net::DataPlane;
use engine::protocol::control::{ToJobManager, ToTaskManager};
use engine::protocol::frame::{read_msg, write_msg};
use rkyv::util::AlignedVec;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::config::TmConfig;
use crate::task_manager::{Connected, ConnectionLost, FromJobManager, TaskManager};

/// Runs a task manager until the job manager has been unreachable for
/// `exit_after_disconnect_ms`. Must run inside an actix `System`.
pub async fn run(config: TmConfig) -> Result<(), String> {
    let id = TaskManagerId::random();
    // The data plane decodes every incoming batch: give it its own thread so heartbeats and
    // control messages never wait behind it.
    let net = Arbiter::new();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let bind_addr = config.data_addr.clone();
    net.spawn(async move {
        let _ = tx.send(DataPlane::bind(id, &bind_addr).await);
    });
    let data = rx
        .await
        .map_err(|_| "the data-plane thread stopped".to_string())?
        .map_err(|e| format!("cannot bind the data plane on {}: {e}", config.data_addr))?;
    let data_addr = data.local_addr().to_string();
    // The cache node serves other members and clients on a thread of its own.
    let cache_thread = Arbiter::new();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let node_config = NodeConfig {
        memory_limit: config.cache_memory_mb.saturating_mul(1 << 20),
    };
    let cache_bind = config.cache_addr.clone();
    cache_thread.spawn(async move {
        let _ = tx.send(CacheNode::bind(id, &cache_bind, node_config).await);
    });
    let cache = rx
        .await
        .map_err(|_| "the cache thread stopped".to_string())?
        .map_err(|e| format!("cannot bind the cache node on {}: {e}", config.cache_addr))?;
    let cache_addr = cache.local_addr().to_string();
    info!(tm = %id, data = %data_addr, cache = %cache_addr, slots = config.slots, jobmanager = %config.jobmanager, "Task manager starting.");
    let tm = TaskManager::new(id, config.clone(), data, cache, cache_thread.handle()).start();
    let give_up = Duration::from_millis(config.exit_after_disconnect_ms);
    let mut unreachable_since = Instant::now();
    let mut attempt = 0u32;
    loop {
        match session(&config, id, &data_addr, &cache_addr, &tm).await {
            Ok(()) => {
                warn!(tm = %id, "Job manager connection closed.");
                unreachable_since = Instant::now();
                attempt = 0;
            }
            Err(Failed::Refused(reason)) => {
                return Err(format!(
                    "the job manager refused this task manager: {reason}"
                ))
            }
            Err(Failed::Lost(e)) if attempt == 0 => {
                warn!(tm = %id, error = %e, "Cannot reach the job manager.")
            }
            Err(Failed::Lost(_)) => {}
        }
        tm.do_send(ConnectionLost);
        if unreachable_since.elapsed() >= give_up {
            return Err(format!(
                "job manager {} unreachable for {} ms",
                config.jobmanager,
                give_up.as_millis()
            ));
        }
        attempt += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Why a control session ended badly.
enum Failed {
    /// The connection failed or dropped: try again.
    Lost(String),
    /// The job manager refused this task manager: trying again cannot help.
    Refused(String),
}

impl From<String> for Failed {
    fn from(e: String) -> Failed {
        Failed::Lost(e)
    }
}

/// One control connection: register, then relay messages until it drops.
async fn session(
    config: &TmConfig,
    id: TaskManagerId,
    data_addr: &str,
    cache_addr: &str,
    tm: &Addr<TaskManager>,
) -> Result<(), Failed> {
    let stream = tokio::time::timeout(
        Duration::from_secs(2),
        TcpStream::connect(&config.jobmanager),
    )
    .await
    .map_err(|_| "connect timed out".to_string())?
    .map_err(|e| e.to_string())?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let (mut read, mut write) = stream.into_split();
    let register = ToJobManager::Register {
        wire: engine::protocol::WIRE_VERSION,
        tm: id,
        slots: config.slots,
        data_addr: data_addr.to_string(),
        pid: std::process::id(),
        cache_addr: cache_addr.to_string(),
    };
    write_msg(&mut write, &register)
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = AlignedVec::new();
    let reply = tokio::time::timeout(
        Duration::from_secs(5),
        read_msg::<_, ToTaskManager>(&mut read, &mut buf),
    )
    .await
    .map_err(|_| "no registration reply".to_string())?
    .map_err(|e| e.to_string())?;
    let heartbeat_timeout_ms = match reply {
        Some(ToTaskManager::Registered {
            heartbeat_timeout_ms,
        }) => heartbeat_timeout_ms,
        Some(ToTaskManager::Refused { reason }) => return Err(Failed::Refused(reason)),
        other => return Err(format!("unexpected registration reply {other:?}").into()),
    };
    info!(tm = %id, "Registered with the job manager.");
    let (tx, mut rx) = mpsc::unbounded_channel::<ToJobManager>();
    tm.do_send(Connected {
        to_jm: tx,
        heartbeat_timeout: Duration::from_millis(heartbeat_timeout_ms),
    });
    let writer = tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            if write_msg(&mut write, &msg).await.is_err() {
                return;
            }
        }
    });
    let result = loop {
        match read_msg::<_, ToTaskManager>(&mut read, &mut buf).await {
            Ok(Some(msg)) => tm.do_send(FromJobManager(msg)),
            Ok(None) => break Ok(()),
            Err(e) => break Err(format!("bad frame from the job manager: {e}").into()),
        }
    };
    writer.abort();
    result
}
