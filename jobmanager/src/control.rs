//! The control server: accepts task manager connections and turns their frames into
//! messages for the resource manager and the dispatcher (the `rpc.rs` of the style guide).
//!
//! Each connection must start with `Register` of this build's wire version; anything else,
//! or a frame that does not decode, closes that connection (and declares its task manager dead if it had registered)
//! without affecting the others.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use engine::ids::TaskManagerId;
use engine::protocol::control::{ToJobManager, ToTaskManager};
use engine::protocol::frame::{read_msg, write_msg};
use engine::protocol::WIRE_VERSION;
use rkyv::util::AlignedVec;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};
use tracing::{error, warn};

use crate::cache_master::{CacheMaster, CopyEnded, MemberStats, MemberUp};
use crate::dispatcher::{CheckpointAcked, CollectedOutput, Dispatcher, SubtaskUpdate};
use crate::resource_manager::{Disconnected, Heartbeat, Register, ResourceManager};

/// Accepts task managers on `listener` until the process ends.
pub async fn serve(
    listener: TcpListener,
    rm: Addr<ResourceManager>,
    dispatcher: Addr<Dispatcher>,
    cache: Addr<CacheMaster>,
    heartbeat_timeout: Duration,
) {
    let mut serial = 0u64;
    loop {
        let (stream, from) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "Control accept failed.");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (rm, dispatcher, cache) = (rm.clone(), dispatcher.clone(), cache.clone());
        serial += 1;
        let conn = serial;
        actix::spawn(async move {
            if let Err(e) = connection(stream, conn, rm, dispatcher, cache, heartbeat_timeout).await
            {
                error!(remote = %from, error = %e, "Control connection closed.");
            }
        });
    }
}

async fn connection(
    stream: TcpStream,
    conn: u64,
    rm: Addr<ResourceManager>,
    dispatcher: Addr<Dispatcher>,
    cache: Addr<CacheMaster>,
    heartbeat_timeout: Duration,
) -> Result<(), String> {
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let (mut read, mut write) = stream.into_split();
    let mut buf = AlignedVec::new();
    let first = tokio::time::timeout(
        Duration::from_secs(5),
        read_msg::<_, ToJobManager>(&mut read, &mut buf),
    )
    .await
    .map_err(|_| "no registration within 5 s".to_string())?
    .map_err(|e| e.to_string())?;
    let Some(ToJobManager::Register {
        wire,
        tm,
        slots,
        data_addr,
        pid,
        cache_addr,
    }) = first
    else {
        return Err("the first message must be Register".into());
    };
    if wire != WIRE_VERSION {
        let reason = format!(
            "task manager {tm} speaks wire version {wire}, this job manager {WIRE_VERSION}: \
             run task managers of the job manager's build"
        );
        let refused = ToTaskManager::Refused {
            reason: reason.clone(),
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), write_msg(&mut write, &refused)).await;
        return Err(reason);
    }
    let registered = ToTaskManager::Registered {
        heartbeat_timeout_ms: heartbeat_timeout.as_millis() as u64,
    };
    write_msg(&mut write, &registered)
        .await
        .map_err(|e| e.to_string())?;
    let (tx, mut rx) = mpsc::unbounded_channel::<ToTaskManager>();
    let acks = tx.clone();
    let close = Arc::new(Notify::new());
    cache.do_send(MemberUp {
        tm,
        addr: cache_addr,
        tx: tx.clone(),
    });
    rm.do_send(Register {
        tm,
        slots,
        data_addr,
        pid,
        tx,
        conn,
        close: close.clone(),
    });
    let writer = actix::spawn(async move {
        while let Some(msg) = rx.recv().await {
            if write_msg(&mut write, &msg).await.is_err() {
                return;
            }
        }
    });
    let result = tokio::select! {
        r = relay(&mut read, &mut buf, tm, &acks, &rm, &dispatcher, &cache) => r,
        _ = close.notified() => Err(format!("task manager {tm} was declared dead; connection closed")),
    };
    writer.abort();
    rm.do_send(Disconnected { tm, conn });
    result
}

async fn relay(
    read: &mut tokio::net::tcp::OwnedReadHalf,
    buf: &mut AlignedVec<16>,
    tm: TaskManagerId,
    to_tm: &mpsc::UnboundedSender<ToTaskManager>,
    rm: &Addr<ResourceManager>,
    dispatcher: &Addr<Dispatcher>,
    cache: &Addr<CacheMaster>,
) -> Result<(), String> {
    loop {
        let msg = match read_msg::<_, ToJobManager>(read, buf).await {
            Ok(Some(m)) => m,
            Ok(None) => return Ok(()),
            Err(e) => return Err(format!("task manager {tm}: {e}")),
        };
        match msg {
            ToJobManager::Register { .. } => {
                return Err(format!("task manager {tm} registered twice"))
            }
            ToJobManager::Heartbeat {
                subtasks,
                cache: stats,
            } => {
                cache.do_send(MemberStats { tm, stats });
                rm.do_send(Heartbeat { tm, subtasks });
                let _ = to_tm.send(ToTaskManager::HeartbeatAck);
            }
            ToJobManager::CacheCopied {
                copy,
                partition,
                version,
                target,
                error,
            } => cache.do_send(CopyEnded {
                copy,
                partition,
                version,
                target,
                error,
            }),
            ToJobManager::SubtaskState {
                job,
                generation,
                task,
                subtask,
                state,
                message,
            } => dispatcher.do_send(SubtaskUpdate {
                tm,
                job,
                generation,
                task,
                subtask,
                state,
                message,
            }),
            ToJobManager::Collected {
                job,
                generation,
                operator,
                subtask,
                epoch,
                part,
                last,
                records,
            } => dispatcher.do_send(CollectedOutput {
                tm,
                job,
                generation,
                operator,
                subtask,
                epoch,
                part,
                last,
                records,
            }),
            ToJobManager::CheckpointAck {
                job,
                generation,
                task,
                subtask,
                checkpoint,
                alignment_us,
                sync_ms,
                operators,
            } => dispatcher.do_send(CheckpointAcked {
                tm,
                job,
                generation,
                task,
                subtask,
                checkpoint,
                alignment_us,
                sync_ms,
                operators,
            }),
        }
    }
}
