//! `TaskManager`: one per process. Hosts deployments of jobs in its slots.
//!
//! Receives `FromJobManager` (deploy, cancel, abort) from the control connection and
//! `DeploymentEnded` from its deployments. Emits heartbeats with live subtask counters every
//! `heartbeat_interval_ms` on the control connection.
//! Invariant: when the control connection is lost, every subtask is stopped, so a task
//! manager the job manager gave up on never keeps producing output.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use engine::cache::CacheClient;
use engine::cache::CacheNode;
use engine::graph::JobGraph;
use engine::ids::{Generation, JobId, TaskManagerId};
use engine::net::{DataPlane, NetError};
use engine::operator::CollectTarget;
use engine::protocol::control::{
    Deployment, SubtaskReport, SubtaskState, ToJobManager, ToTaskManager,
};
use engine::protocol::data::ChannelId;
use engine::runtime::channel::{channel, severed, InputChannel, OutputChannel};
use engine::runtime::dcas::{ChannelKey, DcasConfig, Lease};
use engine::runtime::deploy::{build_runner, input_keys, output_keys, DcasEnv, SubtaskEnv};
use engine::runtime::task::{
    CheckpointAck, CheckpointReporter, Command, Rewire, SubtaskId, SubtaskMetrics, SubtaskRunner,
    ON_REQUEST,
};
use engine::spec::{CheckpointingSpec, JobSpec};
use engine::Record;
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::config::TmConfig;
use crate::deployment::{
    AddSubtasks, CancelDeployment, DeploymentActor, DeploymentEnded, RewireSubtasks, ToSubtasks,
};

/// A message from the job manager.
#[derive(Message)]
#[rtype(result = "()")]
pub struct FromJobManager(pub ToTaskManager);

/// The control connection to the job manager is up (again): send through `to_jm`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Connected {
    /// Control messages to the job manager.
    pub to_jm: mpsc::UnboundedSender<ToJobManager>,
    /// After this long without a heartbeat acknowledgement the job manager has declared this
    /// task manager dead: its subtasks must stop.
    pub heartbeat_timeout: Duration,
}

/// The control connection dropped.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ConnectionLost;

/// A running deployment and its subtasks' counters.
struct Running {
    actor: Addr<DeploymentActor>,
    metrics: Vec<(u32, u32, Arc<SubtaskMetrics>)>,
    graph: Arc<JobGraph>,
}

/// The task manager actor.
pub struct TaskManager {
    id: TaskManagerId,
    config: TmConfig,
    data: DataPlane,
    /// This member's cache node, and the thread it runs on (for copies).
    cache: CacheNode,
    cache_thread: ArbiterHandle,
    /// Control messages to the job manager (None while disconnected).
    to_jm: Option<mpsc::UnboundedSender<ToJobManager>>,
    /// One arbiter (thread) per slot.
    slots: Vec<Arbiter>,
    deployments: HashMap<(JobId, Generation), Running>,
    /// Where each deployment's collect sinks deliver, shared by its subtasks placed here
    /// (restarted ones too) so the job manager's receipts reach every sink.
    collects: HashMap<(JobId, Generation), Arc<ToJobManagerCollect>>,
    /// Deployments with subtasks being wired here.
    wiring: HashMap<(JobId, Generation), InFlight>,
    /// When the job manager last acknowledged a heartbeat.
    last_ack: Instant,
    heartbeat_timeout: Duration,
    /// Subtasks were stopped for want of acknowledgements (until the next one).
    fenced: bool,
    /// A client of the cache (DCAS logs and snapshots), once the partition table arrived.
    cache_client: Option<CacheClient>,
    /// Local channel ends not taken yet.
    local: LocalChannels,
    /// Renewed by every heartbeat acknowledgement; DCAS logs stop appending once it lapses.
    lease: Lease,
}

impl TaskManager {
    /// Passes `command` to the subtasks of a deployment running here (`only` these, or
    /// all); nothing when it runs no longer.
    fn command(
        &self,
        job: JobId,
        generation: Generation,
        command: Command,
        only: Option<Vec<(u32, u32)>>,
    ) {
        if let Some(r) = self.deployments.get(&(job, generation)) {
            r.actor.do_send(ToSubtasks { command, only });
        }
    }

    /// A task manager; no I/O until started.
    pub fn new(
        id: TaskManagerId,
        config: TmConfig,
        data: DataPlane,
        cache: CacheNode,
        cache_thread: ArbiterHandle,
    ) -> TaskManager {
        TaskManager {
            id,
            config,
            data,
            cache,
            cache_thread,
            to_jm: None,
            slots: Vec::new(),
            deployments: HashMap::new(),
            collects: HashMap::new(),
            wiring: HashMap::new(),
            last_ack: Instant::now(),
            heartbeat_timeout: Duration::from_secs(1),
            fenced: false,
            cache_client: None,
            local: LocalChannels::default(),
            lease: Lease::default(),
        }
    }

    /// Self-fencing (DESIGN §5): without an acknowledgement for the heartbeat timeout, the
    /// job manager has declared this task manager dead and restarted its subtasks elsewhere,
    /// so these must stop before they emit anything more.
    fn check_fence(&mut self) {
        if self.fenced
            || self.to_jm.is_none()
            || self.deployments.is_empty()
            || self.last_ack.elapsed() <= self.heartbeat_timeout
        {
            return;
        }
        self.fenced = true;
        warn!(tm = %self.id, silent_ms = self.last_ack.elapsed().as_millis() as u64, "No heartbeat acknowledgement within the timeout: stopping every subtask.");
        self.cancel_all("fenced: no heartbeat acknowledgement within the timeout");
    }

    /// How long a heartbeat acknowledgement keeps the lease: shorter than the job
    /// manager's timeout, which it counts from the heartbeat it received (before the ack).
    fn lease_span(&self) -> Duration {
        self.heartbeat_timeout.mul_f64(0.8)
    }

    fn send(&self, msg: ToJobManager) {
        if let Some(tx) = &self.to_jm {
            // Fails only if the connection task ended; ConnectionLost follows.
            let _ = tx.send(msg);
        }
    }

    fn deploy(&mut self, d: Deployment, ctx: &mut Context<Self>) {
        let Some(to_jm) = self.to_jm.clone() else {
            return;
        };
        let (job, generation) = (d.job, d.generation);
        info!(job = %job, generation = %generation, subtasks = d.subtasks.len(), "Deploying.");
        self.data
            .connect_all(d.placement.iter().map(|p| (p.tm, p.data_addr.clone())));
        // One target per deployment and connection: a DCAS restart placed here shares it.
        let collect = match self.collects.get(&(job, generation)) {
            Some(c) if c.to_jm.same_channel(&to_jm) => c.clone(),
            _ => {
                let c = Arc::new(ToJobManagerCollect {
                    job,
                    generation,
                    to_jm: to_jm.clone(),
                    taken: Mutex::default(),
                });
                self.collects.insert((job, generation), c.clone());
                c
            }
        };
        let in_flight = self.wiring.entry((job, generation)).or_default();
        in_flight.wirings += 1;
        // Rewires from here on are newer than this deployment's placement.
        let first_rewire = in_flight.rewires.len();
        let wiring = wire(
            self.id,
            self.data.clone(),
            d.clone(),
            collect,
            self.cache_client.clone(),
            self.local.clone(),
            self.lease.clone(),
        );
        ctx.spawn(wiring.into_actor(self).map(move |result, act, ctx| {
            let (rewires, canceled) = act.wired((job, generation), first_rewire);
            match result {
                Ok((_, runners)) if canceled => {
                    info!(job = %job, generation = %generation, "Deployment canceled while it was being wired; not started.");
                    drop(runners);
                    act.forget_collect(job, generation);
                    if !act.deployments.contains_key(&(job, generation)) {
                        act.data.release(job, generation);
                    }
                    act.report_all(job, generation, &d.subtasks, SubtaskState::Canceled, "canceled before it started");
                }
                Ok((graph, runners)) => {
                    let metrics: Vec<_> = runners
                        .iter()
                        .map(|(r, m)| (r.id.task as u32, r.id.index as u32, m.clone()))
                        .collect();
                    let wired: Vec<(u32, u32)> = metrics.iter().map(|(t, s, _)| (*t, *s)).collect();
                    let slots: Vec<ArbiterHandle> = act.slots.iter().map(Arbiter::handle).collect();
                    let placed = runners
                        .into_iter()
                        .enumerate()
                        .map(|(i, (r, _))| {
                            let slot = slots[r.id.index.wrapping_add(i) % slots.len()].clone();
                            (r, slot)
                        })
                        .collect();
                    // A DCAS restart placed here joins the deployment already running.
                    if let Some(r) = act.deployments.get_mut(&(job, generation)) {
                        r.actor.do_send(AddSubtasks(placed));
                        // A subtask restarted here again replaces its earlier incarnation.
                        r.metrics.retain(|(t, s, _)| !wired.contains(&(*t, *s)));
                        r.metrics.extend(metrics);
                    } else {
                        let actor = DeploymentActor::new(
                            job,
                            generation,
                            placed,
                            to_jm,
                            ctx.address().recipient(),
                            act.data.clone(),
                            CheckpointingSpec::dcas(graph.checkpointing.as_ref()).is_some(),
                        )
                        .start();
                        act.deployments.insert(
                            (job, generation),
                            Running {
                                actor,
                                metrics,
                                graph,
                            },
                        );
                    }
                    for (placement, moved, seq) in rewires {
                        act.rewire(job, generation, placement, moved, seq, Some(&wired), ctx);
                    }
                }
                Err(message) => {
                    error!(job = %job, error = %message, "Deployment failed.");
                    act.forget_collect(job, generation);
                    act.report_all(job, generation, &d.subtasks, SubtaskState::Failed, &message);
                }
            }
        }));
    }

    /// A wiring of deployment `key` that started when `first` rewires were kept ended: the
    /// rewires that arrived since, and whether the deployment was canceled meanwhile
    /// ([`InFlight`]). The kept ones go once no wiring of the deployment is in flight.
    fn wired(&mut self, key: (JobId, Generation), first: usize) -> (Vec<PendingRewire>, bool) {
        let Some(in_flight) = self.wiring.get_mut(&key) else {
            return (Vec::new(), false);
        };
        let since = in_flight.rewires.get(first..).unwrap_or_default().to_vec();
        let canceled = in_flight.canceled;
        in_flight.wirings -= 1;
        if in_flight.wirings == 0 {
            self.wiring.remove(&key);
        }
        (since, canceled)
    }

    /// Forgets a deployment's collect target unless another wiring or a running subtask
    /// still delivers through it (a wiring that ended dropped its reference).
    fn forget_collect(&mut self, job: JobId, generation: Generation) {
        if (self.collects.get(&(job, generation))).is_some_and(|c| Arc::strong_count(c) == 1) {
            self.collects.remove(&(job, generation));
        }
    }

    /// Reports `subtasks` of a deployment that never started as ending in `state`.
    fn report_all(
        &self,
        job: JobId,
        generation: Generation,
        subtasks: &[(u32, u32)],
        state: SubtaskState,
        message: &str,
    ) {
        for &(task, subtask) in subtasks {
            self.send(ToJobManager::SubtaskState {
                job,
                generation,
                task,
                subtask,
                state,
                message: Some(message.to_string()),
            });
        }
    }

    /// DCAS: connects this task manager's subtasks of a deployment to their restarted
    /// neighbours (the job manager's rewire number `seq`).
    /// `only`: just those subtasks (wired while the rewire arrived).
    #[allow(clippy::too_many_arguments)]
    fn rewire(
        &mut self,
        job: JobId,
        generation: Generation,
        placement: Vec<engine::protocol::control::Placement>,
        moved: Vec<(u32, u32)>,
        seq: u64,
        only: Option<&[(u32, u32)]>,
        ctx: &mut Context<Self>,
    ) {
        self.data
            .connect_all(placement.iter().map(|p| (p.tm, p.data_addr.clone())));
        if only.is_none() {
            if let Some(in_flight) = self.wiring.get_mut(&(job, generation)) {
                in_flight
                    .rewires
                    .push((placement.clone(), moved.clone(), seq));
            }
        }
        let Some(r) = self.deployments.get(&(job, generation)) else {
            return;
        };
        let mine: Vec<(u32, u32)> = r
            .metrics
            .iter()
            .map(|(t, s, _)| (*t, *s))
            .filter(|k| !moved.contains(k))
            .filter(|k| only.is_none_or(|o| o.contains(k)))
            .collect();
        if mine.is_empty() {
            return;
        }
        let wiring = Wiring::new(
            self.id,
            self.data.clone(),
            job,
            generation,
            &r.graph,
            &placement,
            self.local.clone(),
        )
        .severing();
        let actor = r.actor.clone();
        let work = rewire(wiring, r.graph.clone(), mine, moved, seq);
        ctx.spawn(work.into_actor(self).map(move |result, _, _| match result {
            Ok(rewires) => {
                info!(job = %job, generation = %generation, subtasks = rewires.len(), "Rewiring to restarted subtasks.");
                actor.do_send(RewireSubtasks(rewires));
            }
            Err(e) => error!(job = %job, error = %e, "Rewiring failed."),
        }));
    }

    fn heartbeat(&self) {
        let subtasks = self
            .deployments
            .iter()
            .flat_map(|((job, generation), r)| {
                r.metrics.iter().map(move |(task, subtask, m)| {
                    // First, with Acquire: the counts of a restart are stored before it
                    // (Release), so a report with its time carries its counts too.
                    let resumed_ms = m.resumed_ms.load(std::sync::atomic::Ordering::Acquire);
                    SubtaskReport {
                        job: *job,
                        generation: *generation,
                        task: *task,
                        subtask: *subtask,
                        records_in: m.records_in.load(std::sync::atomic::Ordering::Relaxed),
                        records_out: m
                            .router
                            .records_out
                            .load(std::sync::atomic::Ordering::Relaxed),
                        backpressure_ms: m
                            .router
                            .backpressure_ns
                            .load(std::sync::atomic::Ordering::Relaxed)
                            / 1_000_000,
                        watermark: m.watermark.load(std::sync::atomic::Ordering::Relaxed),
                        replayed: m.replayed.load(std::sync::atomic::Ordering::Relaxed),
                        snapshot_links: m.snapshot_links.load(std::sync::atomic::Ordering::Relaxed),
                        resumed_ms,
                        source_lag: m.source_lag.load(std::sync::atomic::Ordering::Relaxed),
                        lag_samples: m.take_lag_samples(),
                        marker_samples: m.take_marker_samples(),
                        // First, with Acquire: the time stored before it is as new.
                        receivers_caught_up: m
                            .router
                            .receivers_caught_up
                            .load(std::sync::atomic::Ordering::Acquire),
                        receivers_caught_up_ms: m
                            .router
                            .receivers_caught_up_ms
                            .load(std::sync::atomic::Ordering::Relaxed),
                        operator_metrics: m.operators.lock().map(|g| g.clone()).unwrap_or_default(),
                    }
                })
            })
            .collect();
        self.send(ToJobManager::Heartbeat {
            subtasks,
            cache: self.cache.stats(),
        });
    }

    /// Stops every deployment here, and why.
    fn cancel_all(&mut self, why: &'static str) {
        for r in self.deployments.values() {
            r.actor.do_send(CancelDeployment(why));
        }
        for in_flight in self.wiring.values_mut() {
            in_flight.canceled = true;
        }
    }
}

impl Actor for TaskManager {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.slots = (0..self.config.slots.max(1))
            .map(|_| Arbiter::new())
            .collect();
        ctx.run_interval(
            Duration::from_millis(self.config.heartbeat_interval_ms),
            |act, _| {
                act.check_fence();
                act.heartbeat();
            },
        );
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        for a in &self.slots {
            a.stop();
        }
    }
}

impl Handler<Connected> for TaskManager {
    type Result = ();

    fn handle(&mut self, msg: Connected, _ctx: &mut Self::Context) {
        self.to_jm = Some(msg.to_jm);
        self.heartbeat_timeout = msg.heartbeat_timeout;
        self.last_ack = Instant::now();
        self.lease.renew(self.lease_span());
        self.heartbeat();
    }
}

impl Handler<FromJobManager> for TaskManager {
    type Result = ();

    fn handle(&mut self, msg: FromJobManager, ctx: &mut Self::Context) {
        match msg.0 {
            // Registration's answers, handled by the session before it relays anything.
            ToTaskManager::Registered { .. } | ToTaskManager::Refused { .. } => {}
            ToTaskManager::HeartbeatAck => {
                self.last_ack = Instant::now();
                self.lease.renew(self.lease_span());
                self.fenced = false;
            }
            ToTaskManager::TriggerCheckpoint {
                job,
                generation,
                checkpoint,
                subtasks,
                final_,
            } => {
                let command = match final_ {
                    true => Command::Final(checkpoint),
                    false => Command::Trigger(checkpoint),
                };
                self.command(job, generation, command, Some(subtasks));
            }
            ToTaskManager::CheckpointComplete {
                job,
                generation,
                checkpoint,
            } => self.command(job, generation, Command::Complete(checkpoint), None),
            ToTaskManager::AbortCheckpoints {
                job,
                generation,
                upto,
            } => self.command(job, generation, Command::Abort(upto), None),
            ToTaskManager::Recovering { job, generation } => {
                self.command(job, generation, Command::Recovering, None)
            }
            ToTaskManager::CollectTaken {
                job,
                generation,
                operator,
                subtask,
                epoch,
            } => {
                if let Some(c) = self.collects.get(&(job, generation)) {
                    c.took(operator, subtask as usize, epoch);
                }
            }
            ToTaskManager::KillSubtask {
                job,
                generation,
                task,
                subtask,
            } => {
                warn!(job = %job, generation = %generation, task, subtask, "Killing a subtask on request.");
                self.command(job, generation, Command::Kill, Some(vec![(task, subtask)]));
            }
            ToTaskManager::Deploy(d) => self.deploy(d, ctx),
            ToTaskManager::Cancel { job, generation } => {
                if let Some(r) = self.deployments.get(&(job, generation)) {
                    info!(job = %job, generation = %generation, "Canceling deployment.");
                    r.actor.do_send(CancelDeployment(ON_REQUEST));
                }
                // Subtasks still being wired must not start once wired.
                if let Some(in_flight) = self.wiring.get_mut(&(job, generation)) {
                    info!(job = %job, generation = %generation, wirings = in_flight.wirings, "Canceling a deployment being wired.");
                    in_flight.canceled = true;
                }
            }
            ToTaskManager::CacheTable(table) => {
                match &self.cache_client {
                    Some(c) => c.update_table(table.clone()),
                    None => {
                        self.cache_client =
                            Some(CacheClient::new(table.clone(), Duration::from_secs(5)))
                    }
                }
                self.cache.set_table(table);
            }
            ToTaskManager::Rewire {
                job,
                generation,
                placement,
                moved,
                lost,
                seq,
            } => {
                for tm in lost {
                    self.data.fence(tm);
                }
                self.rewire(job, generation, placement, moved, seq, None, ctx)
            }
            ToTaskManager::CacheCopy {
                copy,
                partition,
                version,
                target,
            } => {
                let (cache, to_jm) = (self.cache.clone(), self.to_jm.clone());
                self.cache_thread.spawn(async move {
                    let target_id = target.id;
                    let result = cache.copy_to(partition, version, target).await;
                    if let Err(e) = &result {
                        warn!(partition, error = %e, "Cache partition copy failed.");
                    }
                    if let Some(tx) = to_jm {
                        let _ = tx.send(ToJobManager::CacheCopied {
                            copy,
                            partition,
                            version,
                            target: target_id,
                            error: result.err(),
                        });
                    }
                });
            }
            ToTaskManager::Abort => {
                error!(tm = %self.id, "Abort requested by the job manager: exiting at once.");
                std::process::abort();
            }
        }
    }
}

impl Handler<ConnectionLost> for TaskManager {
    type Result = ();

    fn handle(&mut self, _msg: ConnectionLost, _ctx: &mut Self::Context) {
        if self.to_jm.is_some() {
            warn!(tm = %self.id, "Lost the job manager: stopping every subtask.");
        }
        self.to_jm = None;
        self.cancel_all("the job manager's connection was lost");
    }
}

impl Handler<DeploymentEnded> for TaskManager {
    type Result = ();

    fn handle(&mut self, msg: DeploymentEnded, _ctx: &mut Self::Context) {
        // One last report so the job manager sees the final counters.
        self.heartbeat();
        self.deployments.remove(&(msg.job, msg.generation));
        self.collects.remove(&(msg.job, msg.generation));
    }
}

/// Delivers `collect` output to the job manager, and keeps its receipts.
struct ToJobManagerCollect {
    job: JobId,
    generation: Generation,
    to_jm: mpsc::UnboundedSender<ToJobManager>,
    /// The newest epoch the job manager took whole, per (collect operator, subtask).
    taken: Mutex<HashMap<(String, usize), u64>>,
}

impl ToJobManagerCollect {
    /// The job manager took epoch `epoch` of `operator`'s subtask `subtask` whole.
    fn took(&self, operator: String, subtask: usize, epoch: u64) {
        let mut taken = self.taken.lock().unwrap_or_else(|p| p.into_inner());
        let newest = taken.entry((operator, subtask)).or_default();
        *newest = (*newest).max(epoch);
    }
}

/// Records per control message of collected output.
const COLLECT_PART: usize = 4096;

impl CollectTarget for ToJobManagerCollect {
    fn deliver(
        &self,
        operator: &str,
        subtask: usize,
        epoch: Option<u64>,
        mut records: Vec<Record>,
    ) {
        // Keep each control frame small: a chained operator may hand over a huge vector.
        let mut part = 0;
        while !records.is_empty() {
            let rest = records.split_off(records.len().min(COLLECT_PART));
            let _ = self.to_jm.send(ToJobManager::Collected {
                job: self.job,
                generation: self.generation,
                operator: operator.to_string(),
                subtask: subtask as u32,
                epoch,
                part,
                last: rest.is_empty(),
                records,
            });
            records = rest;
            part += 1;
        }
    }

    fn taken(&self, operator: &str, subtask: usize) -> Option<u64> {
        let taken = self.taken.lock().unwrap_or_else(|p| p.into_inner());
        // Lookup by borrowed parts; the map is small (one entry per collect subtask here).
        taken
            .iter()
            .find(|((op, s), _)| op == operator && *s == subtask)
            .map(|(_, n)| *n)
    }
}

/// Ships checkpoint acknowledgements (with the state bytes) to the job manager.
struct ToJobManagerCheckpoints {
    job: JobId,
    generation: Generation,
    to_jm: mpsc::UnboundedSender<ToJobManager>,
}

impl CheckpointReporter for ToJobManagerCheckpoints {
    fn acknowledge(&self, id: &SubtaskId, ack: CheckpointAck) {
        let _ = self.to_jm.send(ToJobManager::CheckpointAck {
            job: self.job,
            generation: self.generation,
            task: id.task as u32,
            subtask: id.index as u32,
            checkpoint: ack.checkpoint,
            alignment_us: ack.alignment.as_micros() as u64,
            sync_ms: ack.sync.as_millis() as u64,
            operators: ack.operators,
        });
    }

    fn finishing(&self, id: &SubtaskId) {
        let _ = self.to_jm.send(ToJobManager::SubtaskState {
            job: self.job,
            generation: self.generation,
            task: id.task as u32,
            subtask: id.index as u32,
            state: SubtaskState::Finishing,
            message: None,
        });
    }
}

type Wired = (Arc<JobGraph>, Vec<(SubtaskRunner, Arc<SubtaskMetrics>)>);

/// Both ends of a channel between two subtasks of this task manager, each taken by the
/// subtask wired first on its side (possibly in different wirings: a DCAS restart placed
/// here next to a neighbour that kept running).
type LocalPair = (Option<OutputChannel>, Option<InputChannel>);

/// Local channel ends not taken yet, shared by every wiring of this task manager.
type LocalChannels = Arc<std::sync::Mutex<HashMap<ChannelId, LocalPair>>>;

/// How one deployment's channels are opened on this task manager.
struct Wiring {
    me: TaskManagerId,
    data: DataPlane,
    job: JobId,
    generation: Generation,
    credits: usize,
    place: HashMap<(u32, u32), (TaskManagerId, String, u32)>,
    local: LocalChannels,
    /// Which channels that fail to open are wired severed instead of failing the wiring.
    sever: Sever,
}

/// Which failed channels a [`Wiring`] wires severed ([`engine::runtime::channel::severed`]):
/// detached until the job manager rewires them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sever {
    /// None: the wiring fails.
    Never,
    /// Those to a task manager found gone (declared dead, or refusing connections: its
    /// process died), which the job manager learns of too and rewires.
    Gone,
    /// Every one, whatever the error.
    Any,
}

impl Wiring {
    fn new(
        me: TaskManagerId,
        data: DataPlane,
        job: JobId,
        generation: Generation,
        graph: &JobGraph,
        placement: &[engine::protocol::control::Placement],
        local: LocalChannels,
    ) -> Wiring {
        Wiring {
            me,
            data,
            job,
            generation,
            credits: graph.runtime.credits,
            place: placement
                .iter()
                .map(|p| ((p.task, p.subtask), (p.tm, p.data_addr.clone(), p.attempt)))
                .collect(),
            local,
            sever: Sever::Never,
        }
    }

    /// DCAS, rewiring running subtasks to restarted neighbours: a neighbour whose task
    /// manager is found gone (or cannot be reached) gets a severed channel (detached until
    /// the job manager, which learns of the loss too, rewires it again), and the rest of
    /// the rewire still applies.
    fn severing(mut self) -> Wiring {
        self.sever = Sever::Any;
        self
    }

    /// DCAS, deploying restarted subtasks: a neighbour whose task manager is found gone
    /// gets a severed channel instead of failing the deployment. Task managers lost a few
    /// milliseconds apart are declared dead one by one, so a restart placed for the first
    /// loss is often wired to a neighbour on the next; the job manager rewires it to that
    /// neighbour's restart, and the rewire, arriving after this wiring started, is applied
    /// once the subtask runs ([`InFlight`]). Failing instead cost the subtask a second
    /// restart. A neighbour that is merely unreachable still fails the deployment: no
    /// rewire would follow.
    fn severing_gone(mut self) -> Wiring {
        self.sever = Sever::Gone;
        self
    }

    /// `result` of wiring channel `k`, or, when that failed and this wiring severs,
    /// its end of a severed channel ([`engine::runtime::channel::severed`]).
    fn or_severed<T>(
        &self,
        result: Result<T, NetError>,
        k: &ChannelKey,
        input: usize,
        end: impl FnOnce((OutputChannel, InputChannel)) -> T,
    ) -> Result<T, String> {
        match result {
            // Not only a gone peer: a rewire that failed would leave every channel of it
            // detached, and nothing retries it.
            Err(e)
                if self.sever == Sever::Any
                    || self.sever == Sever::Gone && matches!(e, NetError::Gone { .. }) =>
            {
                warn!(job = %self.job, edge = k.edge, from = k.from, to = k.to, error = %e, "Channel wired severed until rewired.");
                Ok(end(severed(input, e.to_string())))
            }
            other => other.map_err(|e| e.to_string()),
        }
    }

    fn locate(&self, task: usize, subtask: u32) -> Result<(TaskManagerId, String), String> {
        self.place
            .get(&(task as u32, subtask))
            .map(|(tm, addr, _)| (*tm, addr.clone()))
            .ok_or_else(|| format!("no placement for subtask {task}.{subtask}"))
    }

    fn attempt(&self, task: usize, subtask: u32) -> u32 {
        self.place.get(&(task as u32, subtask)).map_or(0, |p| p.2)
    }

    fn id(&self, graph: &JobGraph, k: &ChannelKey) -> ChannelId {
        let e = &graph.edges[k.edge as usize];
        ChannelId {
            job: self.job,
            generation: self.generation,
            edge: k.edge,
            from: k.from,
            to: k.to,
            epoch: self.attempt(e.from, k.from) + self.attempt(e.to, k.to),
        }
    }

    /// Takes one end of a local channel, creating the pair if the other side is not wired
    /// yet; forgets the pair once both ends are taken.
    fn local_end<T>(
        &self,
        id: ChannelId,
        input: usize,
        take: impl FnOnce(&mut LocalPair) -> Option<T>,
    ) -> Result<T, String> {
        let mut local = self.local.lock().unwrap_or_else(|p| p.into_inner());
        let pair = local.entry(id).or_insert_with(|| {
            let (tx, rx) = channel(self.credits, input);
            (Some(tx), Some(rx))
        });
        let end = take(pair).ok_or("local channel wired twice")?;
        if pair.0.is_none() && pair.1.is_none() {
            local.remove(&id);
        }
        Ok(end)
    }

    /// The receiving end of channel `k` of `graph`.
    async fn input(&self, graph: &JobGraph, k: &ChannelKey) -> Result<InputChannel, String> {
        let e = &graph.edges[k.edge as usize];
        let (tm, addr) = self.locate(e.from, k.from)?;
        let id = self.id(graph, k);
        self.data.retire_older(id);
        if tm == self.me {
            return self.local_end(id, e.input, |p| p.1.take());
        }
        let rx = self.data.register_input(id, tm, &addr, self.credits).await;
        let rx = rx.map(|rx| InputChannel::new(rx, e.input));
        self.or_severed(rx, k, e.input, |(_, input)| input)
    }

    /// The sending end of channel `k` of `graph`.
    async fn output(&self, graph: &JobGraph, k: &ChannelKey) -> Result<OutputChannel, String> {
        let e = &graph.edges[k.edge as usize];
        let (tm, addr) = self.locate(e.to, k.to)?;
        let id = self.id(graph, k);
        self.data.retire_older(id);
        if tm == self.me {
            return self.local_end(id, e.input, |p| p.0.take());
        }
        let tx = self.data.register_output(id, tm, &addr).await;
        let tx = tx.map(OutputChannel::remote);
        self.or_severed(tx, k, e.input, |(output, _)| output)
    }
}

/// A deployment with subtasks being wired here ([`TaskManager::wiring`]).
#[derive(Default)]
struct InFlight {
    /// Wirings in flight.
    wirings: usize,
    /// The DCAS rewires that arrived meanwhile. Subtasks being wired (a restart placed
    /// here) were wired to the placement of their deployment message, so a neighbour moved
    /// since would be missed; each rewire that arrived after a wiring started is applied to
    /// its subtasks once they run.
    rewires: Vec<PendingRewire>,
    /// The job manager canceled the deployment meanwhile (or this task manager fenced
    /// itself): the subtasks wired are dropped instead of started.
    canceled: bool,
}

/// A DCAS rewire kept for subtasks still being wired: the placement, the subtasks moved,
/// the rewire's number.
type PendingRewire = (
    Vec<engine::protocol::control::Placement>,
    Vec<(u32, u32)>,
    u64,
);

/// Builds the runners of this task manager's share of a deployment: local channels between
/// subtasks placed here, data-plane channels to and from the others. Checkpoint reports
/// go to the job manager on the connection `collect` delivers on.
async fn wire(
    me: TaskManagerId,
    data: DataPlane,
    d: Deployment,
    collect: Arc<ToJobManagerCollect>,
    cache: Option<CacheClient>,
    local: LocalChannels,
    lease: Lease,
) -> Result<Wired, String> {
    let spec = JobSpec::from_json(&d.spec).map_err(|e| e.to_string())?;
    let graph = JobGraph::build(&spec, &jobs::registry()).map_err(|e| e.to_string())?;
    let mut wiring = Wiring::new(me, data, d.job, d.generation, &graph, &d.placement, local);
    if CheckpointingSpec::dcas(graph.checkpointing.as_ref()).is_some() {
        wiring = wiring.severing_gone();
    }
    let reporter = || {
        let r: Arc<dyn CheckpointReporter> = Arc::new(ToJobManagerCheckpoints {
            job: d.job,
            generation: d.generation,
            to_jm: collect.to_jm.clone(),
        });
        r
    };
    let checkpoints = CheckpointingSpec::barriers(graph.checkpointing.as_ref())
        .is_some()
        .then(reporter);
    let dcas = match CheckpointingSpec::dcas(graph.checkpointing.as_ref()) {
        None => None,
        Some(c) => Some(DcasEnv {
            config: DcasConfig {
                lease,
                client: cache
                    .ok_or(
                        "DCAS needs the cache, and this task manager has no partition table yet",
                    )?
                    .since(d.cache_epoch),
                // Per deployment: a whole-job restart from a fallback checkpoint starts
                // clean logs and snapshots (`DcasNames`), so losses before it took none.
                job: format!("{}/g{}", d.job, d.generation.0),
                me,
                every_records: c.snapshot_every(),
                interval: c.snapshot_interval(),
                incremental: c.incremental(),
                generation: d.generation.0,
            },
            reporter: reporter(),
        }),
    };
    let env = SubtaskEnv {
        collect,
        checkpoints,
        attempt: d.generation.0,
        dcas,
    };
    let mut out = Vec::new();
    for &(task, subtask) in &d.subtasks {
        let (t, s) = (task as usize, subtask as usize);
        if t >= graph.tasks.len() || s >= graph.tasks[t].parallelism {
            return Err(format!(
                "deployment names subtask {t}.{s}, which the job does not have"
            ));
        }
        let mut inputs = Vec::new();
        for k in input_keys(&graph, t, s) {
            inputs.push(wiring.input(&graph, &k).await?);
        }
        let mut outputs = Vec::new();
        for route in output_keys(&graph, t, s) {
            let mut senders = Vec::new();
            for k in route {
                senders.push(wiring.output(&graph, &k).await?);
            }
            outputs.push(senders);
        }
        let (mut runner, metrics) =
            build_runner(&d.job.to_string(), &graph, t, s, inputs, outputs, &env)
                .map_err(|e| e.to_string())?;
        runner.attempt = wiring.attempt(t, subtask);
        if let Some(point) = &d.restore {
            let state = point
                .subtasks
                .iter()
                .find(|x| x.task == task && x.subtask == subtask)
                .ok_or_else(|| {
                    format!(
                        "checkpoint {} has no state for subtask {t}.{s}",
                        point.checkpoint
                    )
                })?;
            runner
                .restore(&state.operators)
                .map_err(|e| format!("restoring checkpoint {}: {e}", point.checkpoint))?;
        }
        out.push((runner, metrics));
    }
    Ok((Arc::new(graph), out))
}

/// DCAS: new channels between this task manager's subtasks `mine` and the restarted
/// subtasks `moved`, per subtask of `mine` that has any.
async fn rewire(
    wiring: Wiring,
    graph: Arc<JobGraph>,
    mine: Vec<(u32, u32)>,
    moved: Vec<(u32, u32)>,
    seq: u64,
) -> Result<Vec<(SubtaskId, Rewire)>, String> {
    let mut out = Vec::new();
    for (task, subtask) in mine {
        let (t, s) = (task as usize, subtask as usize);
        let mut rw = Rewire {
            seq,
            attempt: wiring.attempt(t, subtask),
            ..Rewire::default()
        };
        for (i, k) in input_keys(&graph, t, s).iter().enumerate() {
            let from = graph.edges[k.edge as usize].from as u32;
            if moved.contains(&(from, k.from)) {
                rw.inputs.push((i, wiring.input(&graph, k).await?));
            }
        }
        for (r, route) in output_keys(&graph, t, s).iter().enumerate() {
            for (ti, k) in route.iter().enumerate() {
                let to = graph.edges[k.edge as usize].to as u32;
                if moved.contains(&(to, k.to)) {
                    rw.outputs.push((r, ti, wiring.output(&graph, k).await?));
                }
            }
        }
        if !rw.inputs.is_empty() || !rw.outputs.is_empty() {
            out.push((SubtaskId { task: t, index: s }, rw));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use engine::cache::NodeConfig;
    use engine::protocol::control::Placement;

    /// Subtask `task.subtask` placed on `tm`, whose data plane listens at `data_addr`.
    fn place(task: u32, subtask: u32, tm: TaskManagerId, data_addr: &str) -> Placement {
        Placement {
            task,
            subtask,
            tm,
            data_addr: data_addr.to_string(),
            attempt: 0,
        }
    }

    /// Ensures a DCAS deployment wires a channel to a task manager declared dead severed
    /// (the job manager's rewire for that loss follows), while a deployment of another
    /// mode fails on it, and a neighbour merely unreachable fails either (no rewire would
    /// follow).
    #[test]
    fn a_dcas_deployment_severs_channels_to_gone_task_managers_only() {
        actix::System::new().block_on(async {
            let (me, gone, bad) = (TaskManagerId(2), TaskManagerId(5), TaskManagerId(7));
            let (dropped, dropped_lower) = (TaskManagerId(9), TaskManagerId(1));
            let data = DataPlane::bind(me, "127.0.0.1:0").await.unwrap();
            data.fence(gone);
            let spec = r#"{"name":"t","operators":[
                {"id":"src","kind":"generator","parallelism":1},
                {"id":"m","kind":"map","input":"src","parallelism":4,"params":{"expr":"value"}}]}"#;
            let graph =
                JobGraph::build(&JobSpec::from_json(spec).unwrap(), &jobs::registry()).unwrap();
            let placement = [
                place(0, 0, me, &data.local_addr().to_string()),
                place(1, 0, gone, "127.0.0.1:1"),
                place(1, 1, bad, "not an address"),
                // Lost while the deployment was prepared: no address, not fenced yet.
                place(1, 2, dropped, ""),
                place(1, 3, dropped_lower, ""),
            ];
            let wiring = || {
                let local = LocalChannels::default();
                let g = Generation(1);
                Wiring::new(me, data.clone(), JobId(1), g, &graph, &placement, local)
            };
            let keys: Vec<ChannelKey> = output_keys(&graph, 0, 0).concat();
            let to = |subtask| keys.iter().find(|k| k.to == subtask).unwrap();

            let err = wiring().output(&graph, to(0)).await.err();
            let err = err.expect("a gone neighbour fails a deployment that does not sever");
            assert!(err.contains("is gone: declared dead"), "{err}");
            let severed = wiring().severing_gone().output(&graph, to(0)).await;
            assert!(severed.is_ok(), "{:?}", severed.err());
            let err = wiring().severing_gone().output(&graph, to(1)).await;
            let err = err
                .err()
                .expect("an unreachable neighbour fails the deployment");
            assert!(err.contains("cannot reach task manager"), "{err}");
            assert!(wiring().severing().output(&graph, to(1)).await.is_ok());
            // Whichever side would open the connection, a peer without an address is gone
            // at once (not after the connect timeout).
            for s in [2, 3] {
                let started = std::time::Instant::now();
                let err = wiring().output(&graph, to(s)).await.err().unwrap();
                assert!(
                    err.contains("is gone: the job manager lists no address"),
                    "{err}"
                );
                assert!(started.elapsed() < std::time::Duration::from_secs(1));
                let severed = wiring().severing_gone().output(&graph, to(s)).await;
                assert!(severed.is_ok(), "{:?}", severed.err());
            }
        });
    }

    /// Ensures a cancel that arrives while a deployment is still being wired is honoured:
    /// once its channels are up its subtasks are reported canceled, and none ever runs.
    #[test]
    fn a_cancel_during_wiring_stops_the_deployment() {
        actix::System::new().block_on(async {
            // The peer has the smaller id, so this task manager waits for it to connect:
            // wiring stays in flight until the test lets the peer in.
            let (me, peer) = (TaskManagerId(5), TaskManagerId(2));
            let data = DataPlane::bind(me, "127.0.0.1:0").await.unwrap();
            let peer_plane = DataPlane::bind(peer, "127.0.0.1:0").await.unwrap();
            let cache = CacheNode::bind(
                me,
                "127.0.0.1:0",
                NodeConfig {
                    memory_limit: 1 << 20,
                },
            );
            let cache = cache.await.unwrap();
            let config = TmConfig {
                slots: 2,
                ..TmConfig::default()
            };
            let me_addr = data.local_addr().to_string();
            let tm = TaskManager::new(me, config, data, cache, Arbiter::current()).start();
            let (to_jm, mut from_tm) = mpsc::unbounded_channel();
            let heartbeat_timeout = Duration::from_secs(60);
            tm.send(Connected {
                to_jm,
                heartbeat_timeout,
            })
            .await
            .unwrap();

            let (job, generation) = (JobId(1), Generation(1));
            let spec = r#"{"name":"t","operators":[
                {"id":"src","kind":"generator","parallelism":1},
                {"id":"m","kind":"map","input":"src","parallelism":2,"params":{"expr":"value"}},
                {"id":"out","kind":"discard","input":"m","parallelism":2}]}"#;
            let peer_addr = peer_plane.local_addr().to_string();
            let deployment = Deployment {
                job,
                generation,
                spec: spec.to_string(),
                subtasks: vec![(1, 0), (1, 1)],
                placement: vec![
                    place(0, 0, peer, &peer_addr),
                    place(1, 0, me, &me_addr),
                    place(1, 1, me, &me_addr),
                ],
                restore: None,
                cache_epoch: 0,
            };
            let from_jm = |m| tm.send(FromJobManager(m));
            from_jm(ToTaskManager::Deploy(deployment)).await.unwrap();
            from_jm(ToTaskManager::Cancel { job, generation })
                .await
                .unwrap();
            let channel = ChannelId {
                job,
                generation,
                edge: 0,
                from: 0,
                to: 0,
                epoch: 0,
            };
            peer_plane
                .register_output(channel, me, &me_addr)
                .await
                .unwrap();

            let mut ended = HashMap::new();
            while ended.len() < 2 {
                let msg = tokio::time::timeout(Duration::from_secs(10), from_tm.recv());
                match msg.await.expect("subtask reports").expect("the connection") {
                    ToJobManager::SubtaskState {
                        task,
                        subtask,
                        state,
                        ..
                    } => {
                        assert_ne!(state, SubtaskState::Running, "{task}.{subtask} ran");
                        ended.insert((task, subtask), state);
                    }
                    _ => continue,
                }
            }
            let canceled = HashMap::from([
                ((1, 0), SubtaskState::Canceled),
                ((1, 1), SubtaskState::Canceled),
            ]);
            assert_eq!(ended, canceled);
        });
    }
}
