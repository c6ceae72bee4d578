//! The Weir job manager: REST API, task manager registry and failure detector, job
//! scheduling and lifecycle, durable job metadata, and `local` mode.
//!
//! - [`config`] — flags.
//! - [`resource_manager`] — task managers, heartbeats, failure detection, kills.
//! - [`dispatcher`] — jobs: validation, placement, deployment, states, output.
//! - [`cache_master`] — the distributed cache's membership master (partition table).
//! - [`control`] — the TCP server task managers connect to.
//! - [`rest`], [`metrics`] — the HTTP API and Prometheus metrics.
//! - [`store`] — sled-backed job metadata.
//! - [`local`] — `jobmanager local`, which starts task manager processes too.

pub mod cache_master;
pub mod checkpoints;
pub mod config;
pub mod control;
pub mod dispatcher;
pub mod local;
pub mod metrics;
pub mod resource_manager;
pub mod rest;
pub mod store;
pub mod ui;

use std::net::SocketAddr;
use std::time::Duration;

use actix::prelude::*;
use actix_web::{web, App, HttpServer};

use crate::cache_master::{CacheMaster, Follow};
use crate::config::JmConfig;
use crate::dispatcher::Dispatcher;
use crate::resource_manager::{LocalProcesses, ResourceManager, Subscribe};

pub use engine::telemetry::now_ms;

/// A running job manager.
pub struct JobManager {
    /// Where the REST API listens.
    pub rest_addr: SocketAddr,
    /// Where task managers connect.
    pub control_addr: SocketAddr,
    /// The task manager registry.
    pub rm: Addr<ResourceManager>,
    /// The jobs.
    pub dispatcher: Addr<Dispatcher>,
    /// The HTTP server (stop it to shut down).
    pub server: actix_web::dev::ServerHandle,
}

/// Starts the job manager's actors, control server and REST API. Must run inside an actix
/// `System`.
pub async fn start(config: &JmConfig, local: LocalProcesses) -> Result<JobManager, String> {
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|e| format!("cannot create {}: {e}", config.data_dir.display()))?;
    let store = store::Store::open(&config.data_dir)?;
    let rm =
        ResourceManager::new(Duration::from_millis(config.heartbeat_timeout_ms), local).start();
    let cache = CacheMaster::new(
        config.cache_partitions,
        config.cache_backup_count,
        config.cache_max_copies,
    )
    .start();
    // The dispatcher runs on a thread of its own. It writes job records and completed
    // checkpoints to sled and waits for their flush (an fsync): on a slow disk that may
    // take long, and the task managers' heartbeats, the failure detector, the cache master
    // and the control connections, all on this thread, must not wait for it (a task
    // manager unacknowledged for a heartbeat timeout fences itself).
    let dispatcher = {
        let (rm, cache, collect_limit) = (rm.clone(), cache.clone(), config.collect_limit);
        Dispatcher::start_in_arbiter(&Arbiter::new().handle(), move |_| {
            Dispatcher::new(rm, cache, store, collect_limit)
        })
    };
    // The dispatcher hears of losses through the cache master (see `Follow`).
    cache.do_send(Follow {
        epochs: dispatcher.clone().recipient(),
        losses: dispatcher.clone().recipient(),
    });
    rm.do_send(Subscribe {
        lost: vec![cache.clone().recipient()],
        reports: dispatcher.clone().recipient(),
    });

    let listener = tokio::net::TcpListener::bind(&config.control_addr)
        .await
        .map_err(|e| {
            format!(
                "cannot bind the control address {}: {e}",
                config.control_addr
            )
        })?;
    let control_addr = listener.local_addr().map_err(|e| e.to_string())?;
    actix::spawn(control::serve(
        listener,
        rm.clone(),
        dispatcher.clone(),
        cache.clone(),
        Duration::from_millis(config.heartbeat_timeout_ms),
    ));

    let state = rest::ApiState {
        rm: rm.clone(),
        dispatcher: dispatcher.clone(),
        cache: cache.clone(),
        token: config.api_token.clone(),
        max_body: config.max_body_bytes,
    };
    let server = HttpServer::new(move || {
        App::new()
            .app_data(web::Data::new(state.clone()))
            .configure(rest::routes)
    })
    .workers(1)
    .disable_signals()
    .bind(&config.rest_addr)
    .map_err(|e| format!("cannot bind the REST address {}: {e}", config.rest_addr))?;
    let rest_addr = *server
        .addrs()
        .first()
        .ok_or("the REST server has no address")?;
    let server = server.run();
    let handle = server.handle();
    actix::spawn(async move {
        if let Err(e) = server.await {
            tracing::error!(error = %e, "REST server stopped.");
        }
    });
    tracing::info!(rest = %rest_addr, control = %control_addr, "Job manager started.");
    Ok(JobManager {
        rest_addr,
        control_addr,
        rm,
        dispatcher,
        server: handle,
    })
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::resource_manager::GetAlive;

    /// While the dispatcher is busy (here for 3 s, as a slow fsync of a checkpoint would
    /// keep it), the resource manager, which takes the task managers' heartbeats, and the
    /// REST server still answer at once.
    #[test]
    fn a_busy_dispatcher_holds_up_no_heartbeat() {
        let dir = tempfile::tempdir().unwrap();
        actix::System::new().block_on(async {
            let config = JmConfig {
                rest_addr: "127.0.0.1:0".into(),
                control_addr: "127.0.0.1:0".into(),
                data_dir: dir.path().to_path_buf(),
                ..JmConfig::default()
            };
            let jm = start(&config, LocalProcesses::default()).await.unwrap();
            jm.dispatcher
                .do_send(dispatcher::Stall(Duration::from_secs(3)));
            let asked = Instant::now();
            // Time for the dispatcher to start its stall, on whichever thread it runs.
            tokio::time::sleep(Duration::from_millis(100)).await;
            jm.rm.send(GetAlive).await.unwrap();
            assert!(
                asked.elapsed() < Duration::from_secs(1),
                "the resource manager answered after {:?}",
                asked.elapsed()
            );
            jm.server.stop(false).await;
            System::current().stop();
        });
    }
}
