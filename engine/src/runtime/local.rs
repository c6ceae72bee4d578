//! `LocalExecutor`: runs a `JobGraph` in this process — every task subtask an actor on one
//! of `slots` arbiters (threads), connected by in-process credit-based channels.
//!
//! The `JobSupervisor` actor receives each subtask's outcome; the first failure cancels the
//! rest and becomes the job's failure. `LocalJob` is the handle the caller keeps: it cancels,
//! reads live metrics, and awaits the `JobOutcome` (with everything `collect` sinks received).
//!
//! This is what `jobmanager run-local` uses; the distributed runtime deploys the same
//! `SubtaskRunner`s into task managers instead.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use tokio::sync::oneshot;
use tracing::info;

use super::channel::{channel, InputChannel, OutputChannel};
use super::deploy::{build_runner, edge_targets, SubtaskEnv};
use super::task::{
    Command, SubtaskActor, SubtaskCommand, SubtaskEvent, SubtaskId, SubtaskMetrics, SubtaskOutcome,
    ON_REQUEST,
};
use crate::error::EngineError;
use crate::graph::JobGraph;
use crate::operator::CollectTarget;
use crate::record::Record;

/// Records received by `collect` sinks, by operator id, in arrival order per subtask.
#[derive(Default)]
pub struct CollectBuffer {
    records: Mutex<BTreeMap<String, Vec<Record>>>,
}

impl CollectTarget for CollectBuffer {
    fn deliver(&self, operator: &str, _subtask: usize, _epoch: Option<u64>, records: Vec<Record>) {
        // A poisoned lock means a sink panicked mid-delivery; keep collecting what arrives.
        let mut map = self.records.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(operator.to_string()).or_default().extend(records);
    }
}

impl CollectBuffer {
    /// Takes everything collected so far.
    pub fn take(&self) -> BTreeMap<String, Vec<Record>> {
        std::mem::take(&mut *self.records.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// How a job ended.
#[derive(Debug)]
pub struct JobOutcome {
    /// `Ok` when every subtask finished; the first failure otherwise.
    pub result: Result<(), EngineError>,
    /// Records of `collect` sinks by operator id.
    pub collected: BTreeMap<String, Vec<Record>>,
    /// Wall time from start to the last subtask's end.
    pub elapsed: Duration,
    /// Final per-task counters.
    pub metrics: Vec<TaskMetrics>,
}

/// Counters of one task summed over its subtasks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskMetrics {
    /// Task name (operator ids of the chain).
    pub name: String,
    /// Records read by the task.
    pub records_in: u64,
    /// Records the task sent downstream.
    pub records_out: u64,
    /// Records consumed by sinks in the task.
    pub records_sunk: u64,
    /// Time its subtasks waited for credits, in ms.
    pub backpressure_ms: u64,
    /// A task without outputs (sinks): the highest end-to-end latency of its subtasks by
    /// their latest latency markers, in ms; `None` before the first marker.
    pub latency_ms: Option<i64>,
}

/// Settings of the in-process executor.
#[derive(Debug, Clone)]
pub struct LocalConfig {
    /// Arbiters (threads) to spread subtasks over.
    pub slots: usize,
    /// Pin slot `i` to CPU core `i mod cores`. Without pinning the kernel tends to pull a
    /// woken consumer onto its producer's core, halving a two-stage pipeline's throughput
    /// now and then.
    pub pin_slots: bool,
}

impl Default for LocalConfig {
    fn default() -> Self {
        LocalConfig {
            slots: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
            pin_slots: true,
        }
    }
}

/// Starts the arbiter (thread) of slot `slot`, pinned to a core when asked and possible.
fn start_slot(slot: usize, pin: bool) -> Arbiter {
    let arbiter = Arbiter::new();
    if pin {
        arbiter.spawn_fn(move || {
            let cores = core_affinity::get_core_ids().unwrap_or_default();
            if let Some(core) = cores.get(slot % cores.len().max(1)) {
                if !core_affinity::set_for_current(*core) {
                    tracing::debug!(slot, "Could not pin slot to a core.");
                }
            }
        });
    }
    arbiter
}

/// A running job.
pub struct LocalJob {
    supervisor: Addr<JobSupervisor>,
    done: oneshot::Receiver<JobOutcome>,
    metrics: Arc<Vec<(String, Vec<Arc<SubtaskMetrics>>)>>,
    arbiters: Vec<Arbiter>,
}

/// A cloneable handle to a running job: cancel it, read its counters.
#[derive(Clone)]
pub struct JobHandle {
    supervisor: Addr<JobSupervisor>,
    metrics: Arc<Vec<(String, Vec<Arc<SubtaskMetrics>>)>>,
}

impl JobHandle {
    /// Asks every subtask to stop; the job then ends with `EngineError::Canceled`.
    pub fn cancel(&self) {
        self.supervisor.do_send(CancelJob);
    }

    /// Current per-task counters.
    pub fn metrics(&self) -> Vec<TaskMetrics> {
        summarize(&self.metrics)
    }
}

impl LocalJob {
    /// A handle for canceling and reading metrics while `wait` runs.
    pub fn handle(&self) -> JobHandle {
        JobHandle {
            supervisor: self.supervisor.clone(),
            metrics: self.metrics.clone(),
        }
    }

    /// Asks every subtask to stop; `wait` then returns a canceled outcome.
    pub fn cancel(&self) {
        self.handle().cancel()
    }

    /// Current per-task counters.
    pub fn metrics(&self) -> Vec<TaskMetrics> {
        summarize(&self.metrics)
    }

    /// Waits until every subtask stopped.
    pub async fn wait(self) -> JobOutcome {
        let outcome = match self.done.await {
            Ok(o) => o,
            Err(_) => JobOutcome {
                result: Err(EngineError::Internal(
                    "job supervisor stopped without an outcome".into(),
                )),
                collected: BTreeMap::new(),
                elapsed: Duration::ZERO,
                metrics: summarize(&self.metrics),
            },
        };
        for a in self.arbiters {
            a.stop();
        }
        outcome
    }
}

fn summarize(metrics: &[(String, Vec<Arc<SubtaskMetrics>>)]) -> Vec<TaskMetrics> {
    metrics
        .iter()
        .map(|(name, subs)| TaskMetrics {
            name: name.clone(),
            records_in: subs
                .iter()
                .map(|m| m.records_in.load(Ordering::Relaxed))
                .sum(),
            records_out: subs
                .iter()
                .map(|m| m.router.records_out.load(Ordering::Relaxed))
                .sum(),
            records_sunk: subs
                .iter()
                .map(|m| m.records_sunk.load(Ordering::Relaxed))
                .sum(),
            backpressure_ms: subs
                .iter()
                .map(|m| m.router.backpressure_ns.load(Ordering::Relaxed))
                .sum::<u64>()
                / 1_000_000,
            latency_ms: subs
                .iter()
                .map(|m| m.latency_ms.load(Ordering::Relaxed))
                .filter(|&l| l >= 0)
                .max(),
        })
        .collect()
}

/// Runs job graphs in this process.
pub struct LocalExecutor;

impl LocalExecutor {
    /// Deploys every subtask of `graph` and returns the running job. Must be called inside
    /// an actix `System`.
    pub fn start(graph: &JobGraph, config: &LocalConfig) -> Result<LocalJob, EngineError> {
        let collect = Arc::new(CollectBuffer::default());
        // In process nothing fails over: no checkpoints, sinks write at once.
        let env = SubtaskEnv {
            collect: collect.clone(),
            checkpoints: None,
            attempt: 1,
            dcas: None,
        };
        let rt = &graph.runtime;

        // Channels: one per (upstream subtask, downstream subtask) pair of each edge.
        let mut outputs: Vec<Vec<Vec<Vec<OutputChannel>>>> = graph
            .tasks
            .iter()
            .map(|t| (0..t.parallelism).map(|_| Vec::new()).collect())
            .collect();
        let mut inputs: Vec<Vec<Vec<InputChannel>>> = graph
            .tasks
            .iter()
            .map(|t| (0..t.parallelism).map(|_| Vec::new()).collect())
            .collect();
        for edge in &graph.edges {
            for (i, outs) in outputs[edge.from].iter_mut().enumerate() {
                let mut senders = Vec::new();
                for j in edge_targets(graph, edge, i) {
                    let (tx, rx) = channel(rt.credits, edge.input);
                    senders.push(tx);
                    inputs[edge.to][j].push(rx);
                }
                outs.push(senders);
            }
        }

        let arbiters: Vec<Arbiter> = (0..config.slots.max(1))
            .map(|slot| start_slot(slot, config.pin_slots))
            .collect();
        let started = Instant::now();
        let (done_tx, done) = oneshot::channel();
        let supervisor = JobSupervisor {
            name: graph.name.clone(),
            running: HashSet::new(),
            actors: Vec::new(),
            failure: None,
            canceled: false,
            done: Some(done_tx),
            collect: collect.clone(),
            started,
            metrics: Arc::new(Vec::new()),
        }
        .start();

        let mut runners = Vec::new();
        let mut metrics = Vec::new();
        for (t, task) in graph.tasks.iter().enumerate() {
            let mut task_metrics = Vec::new();
            let subtask_channels = std::mem::take(&mut outputs[t])
                .into_iter()
                .zip(std::mem::take(&mut inputs[t]));
            for (s, (outs, ins)) in subtask_channels.enumerate() {
                let (runner, m) = build_runner(&graph.name, graph, t, s, ins, outs, &env)?;
                task_metrics.push(m);
                runners.push(runner);
            }
            metrics.push((task.name.clone(), task_metrics));
        }
        let metrics = Arc::new(metrics);

        // Place subtasks round-robin over the arbiters, a task's subtasks on different ones.
        let report = supervisor.clone().recipient();
        let mut actors = Vec::new();
        let mut ids = HashSet::new();
        for (n, runner) in runners.into_iter().enumerate() {
            ids.insert(runner.id.clone());
            let arbiter = &arbiters[n % arbiters.len()];
            let report = report.clone();
            actors.push(SubtaskActor::start_in_arbiter(
                &arbiter.handle(),
                move |_| SubtaskActor::new(runner, report),
            ));
        }
        info!(job = %graph.name, subtasks = ids.len(), slots = arbiters.len(), "Job deployed.");
        supervisor.do_send(Deployed {
            actors,
            ids,
            metrics: metrics.clone(),
        });
        Ok(LocalJob {
            supervisor,
            done,
            metrics,
            arbiters,
        })
    }
}

/// Watches the subtasks of one in-process job.
struct JobSupervisor {
    name: String,
    running: HashSet<SubtaskId>,
    actors: Vec<Addr<SubtaskActor>>,
    failure: Option<EngineError>,
    canceled: bool,
    done: Option<oneshot::Sender<JobOutcome>>,
    collect: Arc<CollectBuffer>,
    started: Instant,
    metrics: Arc<Vec<(String, Vec<Arc<SubtaskMetrics>>)>>,
}

impl Actor for JobSupervisor {
    type Context = Context<Self>;
}

/// Every subtask was started.
#[derive(Message)]
#[rtype(result = "()")]
struct Deployed {
    actors: Vec<Addr<SubtaskActor>>,
    ids: HashSet<SubtaskId>,
    metrics: Arc<Vec<(String, Vec<Arc<SubtaskMetrics>>)>>,
}

/// Cancel the whole job.
#[derive(Message)]
#[rtype(result = "()")]
struct CancelJob;

impl Handler<Deployed> for JobSupervisor {
    type Result = ();

    fn handle(&mut self, msg: Deployed, ctx: &mut Self::Context) {
        self.actors = msg.actors;
        self.metrics = msg.metrics;
        // Subtasks may have ended before this message arrived; those ids are already gone.
        let ended: HashSet<SubtaskId> = std::mem::take(&mut self.running);
        self.running = msg.ids.difference(&ended).cloned().collect();
        if self.canceled || self.failure.is_some() {
            self.cancel_all();
        }
        self.maybe_done(ctx);
    }
}

impl Handler<SubtaskEvent> for JobSupervisor {
    type Result = ();

    fn handle(&mut self, msg: SubtaskEvent, ctx: &mut Self::Context) {
        // Before `Deployed` arrives, remember the id as ended by inserting it.
        if !self.running.remove(&msg.id) && self.actors.is_empty() {
            self.running.insert(msg.id.clone());
        }
        if let SubtaskOutcome::Failed(e) = msg.outcome {
            if self.failure.is_none() && !self.canceled {
                tracing::error!(job = %self.name, subtask = %msg.id, error = %e, "Job failed.");
                self.failure = Some(e);
                self.cancel_all();
            }
        }
        self.maybe_done(ctx);
    }
}

impl Handler<CancelJob> for JobSupervisor {
    type Result = ();

    fn handle(&mut self, _msg: CancelJob, _ctx: &mut Self::Context) {
        if !self.canceled && self.failure.is_none() {
            info!(job = %self.name, "Job canceled.");
            self.canceled = true;
            self.cancel_all();
        }
    }
}

impl JobSupervisor {
    fn cancel_all(&self) {
        for a in &self.actors {
            a.do_send(SubtaskCommand(Command::Cancel(ON_REQUEST)));
        }
    }

    fn maybe_done(&mut self, ctx: &mut Context<Self>) {
        if self.actors.is_empty() || !self.running.is_empty() {
            return;
        }
        let result = match (self.failure.take(), self.canceled) {
            (Some(e), _) => Err(e),
            (None, true) => Err(EngineError::Canceled),
            (None, false) => Ok(()),
        };
        if result.is_ok() {
            info!(job = %self.name, elapsed_ms = self.started.elapsed().as_millis() as u64, "Job finished.");
        }
        if let Some(done) = self.done.take() {
            let _ = done.send(JobOutcome {
                result,
                collected: self.collect.take(),
                elapsed: self.started.elapsed(),
                metrics: summarize(&self.metrics),
            });
        }
        ctx.stop();
    }
}
