//! `Dispatcher`: every job's lifecycle — validation, scheduling, deployment, subtask
//! states, collected output, failure and cancellation.
//!
//! Receives REST requests (`SubmitJob`, `CancelJob`, queries), `SubtaskUpdate` and
//! `CollectedOutput` from control connections, `Reports` and `TaskManagerLost` from the
//! resource manager. Emits `Deploy`/`Cancel` to task managers.
//! Invariant: messages of an older deployment generation never change a job; a job in a
//! terminal state (FINISHED, CANCELED, FAILED) never changes again.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use actix::prelude::*;
use engine::graph::JobGraph;
use engine::ids::{Generation, JobId, TaskManagerId};
use engine::protocol::control::{
    Deployment, Placement, SubtaskReport, SubtaskState, ToTaskManager,
};
use engine::spec::{CheckpointMode, JobSpec, SpecError};
use engine::Record;
use serde::Serialize;
use tracing::{error, info, warn};

use crate::now_ms;
use crate::resource_manager::{Alive, GetAlive, Reports, ResourceManager, TaskManagerLost};
use crate::store::{JobRecord, Store};

/// Flink's job states.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobState {
    /// Accepted, not yet deployed.
    Created,
    /// Deployed (subtasks running or starting).
    Running,
    /// Recovering from a failure.
    Restarting,
    /// Canceling: waiting for subtasks to stop.
    Cancelling,
    /// Every subtask finished.
    Finished,
    /// Canceled on request.
    Canceled,
    /// Failed (see `failure`).
    Failed,
}

impl JobState {
    /// FINISHED, CANCELED or FAILED.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Finished | JobState::Canceled | JobState::Failed
        )
    }
}

/// One subtask as the job manager tracks it.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct SubtaskView {
    /// Subtask index.
    pub subtask: u32,
    /// DEPLOYING, RUNNING, FINISHED, FAILED or CANCELED.
    #[schema(value_type = String)]
    pub state: SubtaskState,
    /// Task manager it runs on.
    pub taskmanager: String,
    /// Records read.
    pub records_in: u64,
    /// Records sent downstream.
    pub records_out: u64,
    /// Records read per second (last heartbeat interval).
    pub records_in_per_sec: f64,
    /// Records sent per second.
    pub records_out_per_sec: f64,
    /// Milliseconds spent waiting for credits in total.
    pub backpressure_ms: u64,
    /// Fraction of the last interval spent waiting for credits (0..1).
    pub backpressure: f64,
    /// Output watermark (null before the first).
    pub watermark: Option<i64>,
    /// Operator-specific metrics: Kafka offsets and lag per partition, late records, ...
    pub metrics: Vec<OperatorMetricView>,
}

/// One operator-specific metric of a subtask.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct OperatorMetricView {
    /// Operator id.
    pub operator: String,
    /// Metric name (`lag`, `offset`, `late_dropped`, ...).
    pub name: String,
    /// Part of the operator it measures (`topic/partition`), empty for the whole subtask.
    pub part: String,
    /// Value.
    pub value: i64,
}

/// A task (operator chain) of a job.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct VertexView {
    /// Task index.
    pub id: u32,
    /// Operator ids joined by " -> ".
    pub name: String,
    /// Operators in the chain, with their kinds.
    pub operators: Vec<OperatorView>,
    /// Parallelism.
    pub parallelism: u32,
    /// Subtasks.
    pub subtasks: Vec<SubtaskView>,
}

/// An operator in a chain.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct OperatorView {
    /// Operator id.
    pub id: String,
    /// Kind.
    pub kind: String,
}

/// An exchange between tasks.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct EdgeView {
    /// Upstream task.
    pub source: u32,
    /// Downstream task.
    pub target: u32,
    /// Exchange: forward, rebalance, broadcast, hash, hash(expr).
    pub exchange: String,
}

/// One line of the job list.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct JobSummary {
    /// Job id.
    pub jid: String,
    /// Name.
    pub name: String,
    /// State.
    pub state: JobState,
    /// Fault tolerance mode: none, abs or dcas.
    pub mode: String,
    /// Submission time (ms since the epoch).
    pub start_time: u64,
    /// End time (ms since the epoch), when ended.
    pub end_time: Option<u64>,
    /// Duration so far in ms.
    pub duration: u64,
    /// Records read per second by the job's sources.
    pub throughput: f64,
}

/// A job in full.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct JobDetail {
    /// Summary fields.
    #[serde(flatten)]
    pub summary: JobSummary,
    /// Why it failed.
    pub failure: Option<String>,
    /// Deployment generation.
    pub generation: u64,
    /// Tasks.
    pub vertices: Vec<VertexView>,
    /// Exchanges between tasks.
    pub edges: Vec<EdgeView>,
    /// Exceptions and failure reasons, oldest first.
    pub exceptions: Vec<ExceptionView>,
    /// The submitted spec.
    #[schema(value_type = Object)]
    pub spec: serde_json::Value,
}

/// A recorded exception.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct ExceptionView {
    /// When (ms since the epoch).
    pub at: u64,
    /// Where (subtask or task manager).
    pub location: String,
    /// What.
    pub message: String,
}

/// A page of collect-sink output.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct OutputPage {
    /// Collect operator.
    pub operator: String,
    /// Records available in total.
    pub total: usize,
    /// Records dropped beyond the collect limit.
    pub dropped: u64,
    /// Offset of the first record returned.
    pub offset: usize,
    /// Records as `{key, ts, value}`.
    #[schema(value_type = Vec<Object>)]
    pub records: Vec<serde_json::Value>,
}

struct SubtaskInfo {
    state: SubtaskState,
    tm: TaskManagerId,
    last: Option<(Instant, SubtaskReport)>,
    rate_in: f64,
    rate_out: f64,
    backpressure: f64,
}

struct Job {
    id: JobId,
    spec: JobSpec,
    spec_json: String,
    graph: JobGraph,
    state: JobState,
    failure: Option<String>,
    created_ms: u64,
    ended_ms: Option<u64>,
    generation: Generation,
    subtasks: BTreeMap<(u32, u32), SubtaskInfo>,
    collected: BTreeMap<String, Vec<Record>>,
    dropped: u64,
    exceptions: Vec<ExceptionView>,
    /// Task managers running part of the current deployment.
    tms: Vec<Alive>,
}

/// The dispatcher actor.
pub struct Dispatcher {
    rm: Addr<ResourceManager>,
    store: Store,
    jobs: HashMap<JobId, Job>,
    /// Jobs from earlier job manager runs (listing only).
    archived: Vec<JobRecord>,
    collect_limit: usize,
}

impl Dispatcher {
    /// A dispatcher; previous jobs are loaded from `store`.
    pub fn new(rm: Addr<ResourceManager>, store: Store, collect_limit: usize) -> Dispatcher {
        let archived = store.load_and_close_unfinished();
        Dispatcher {
            rm,
            store,
            jobs: HashMap::new(),
            archived,
            collect_limit,
        }
    }

    fn persist(&self, job: &Job) {
        let record = JobRecord {
            id: job.id.to_string(),
            name: job.spec.name.clone(),
            spec: job.spec_json.clone(),
            state: job.state,
            failure: job.failure.clone(),
            created_ms: job.created_ms,
            ended_ms: job.ended_ms,
            mode: mode(&job.spec).to_string(),
        };
        if let Err(e) = self.store.put(&record) {
            error!(job = %job.id, error = %e, "Could not persist the job.");
        }
    }

    fn end(&mut self, id: JobId, state: JobState, failure: Option<String>) {
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        if job.state.is_terminal() {
            return;
        }
        job.state = state;
        job.ended_ms = Some(now_ms());
        if let Some(f) = &failure {
            job.failure = Some(f.clone());
            error!(job = %id, reason = %f, "Job failed.");
        } else {
            info!(job = %id, state = ?state, "Job ended.");
        }
        for tm in &job.tms {
            let _ = tm.tx.send(ToTaskManager::Cancel {
                job: id,
                generation: job.generation,
            });
        }
        let job = &self.jobs[&id];
        self.persist(job);
    }

    /// Recomputes the job state after a subtask update.
    fn settle(&mut self, id: JobId) {
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        if job.state.is_terminal() {
            return;
        }
        let all = |s: SubtaskState| job.subtasks.values().all(|i| i.state == s);
        let terminal = job.subtasks.values().all(|i| {
            matches!(
                i.state,
                SubtaskState::Finished | SubtaskState::Canceled | SubtaskState::Failed
            )
        });
        if all(SubtaskState::Finished) {
            self.end(id, JobState::Finished, None);
        } else if terminal && job.state != JobState::Cancelling {
            self.end(
                id,
                JobState::Failed,
                Some("subtasks stopped without finishing".into()),
            );
        } else if job.state == JobState::Cancelling && terminal {
            job.state = JobState::Canceled;
            job.ended_ms = Some(now_ms());
            info!(job = %id, "Job canceled.");
            let job = &self.jobs[&id];
            self.persist(job);
        } else if job.state == JobState::Created
            && job
                .subtasks
                .values()
                .all(|i| i.state == SubtaskState::Running)
        {
            job.state = JobState::Running;
            info!(job = %id, "Job running.");
            let job = &self.jobs[&id];
            self.persist(job);
        }
    }

    fn summary(&self, job: &Job) -> JobSummary {
        let sources: f64 = job
            .graph
            .tasks
            .iter()
            .enumerate()
            .filter(|(t, _)| !job.graph.edges.iter().any(|e| e.to == *t))
            .flat_map(|(t, task)| (0..task.parallelism).map(move |s| (t as u32, s as u32)))
            .filter_map(|k| job.subtasks.get(&k))
            .map(|i| i.rate_in)
            .sum();
        let end = job.ended_ms.unwrap_or_else(now_ms);
        JobSummary {
            jid: job.id.to_string(),
            name: job.spec.name.clone(),
            state: job.state,
            mode: mode(&job.spec).into(),
            start_time: job.created_ms,
            end_time: job.ended_ms,
            duration: end.saturating_sub(job.created_ms),
            throughput: if job.state.is_terminal() {
                0.0
            } else {
                sources
            },
        }
    }

    fn detail(&self, job: &Job) -> JobDetail {
        let vertices = job
            .graph
            .tasks
            .iter()
            .enumerate()
            .map(|(t, task)| VertexView {
                id: t as u32,
                name: task.name.clone(),
                operators: task
                    .vertices
                    .iter()
                    .map(|&v| OperatorView {
                        id: job.graph.vertices[v].id.clone(),
                        kind: job.graph.vertices[v].kind.clone(),
                    })
                    .collect(),
                parallelism: task.parallelism as u32,
                subtasks: (0..task.parallelism as u32)
                    .filter_map(|s| job.subtasks.get(&(t as u32, s)).map(|i| (s, i)))
                    .map(|(s, i)| {
                        let r = i.last.as_ref().map(|(_, r)| r);
                        SubtaskView {
                            subtask: s,
                            state: i.state,
                            taskmanager: i.tm.to_string(),
                            records_in: r.map_or(0, |r| r.records_in),
                            records_out: r.map_or(0, |r| r.records_out),
                            records_in_per_sec: i.rate_in,
                            records_out_per_sec: i.rate_out,
                            backpressure_ms: r.map_or(0, |r| r.backpressure_ms),
                            backpressure: i.backpressure,
                            watermark: r.map(|r| r.watermark).filter(|w| *w != i64::MIN),
                            metrics: r
                                .map(|r| {
                                    r.operator_metrics
                                        .iter()
                                        .map(|(op, m)| OperatorMetricView {
                                            operator: op.clone(),
                                            name: m.name.clone(),
                                            part: m.part.clone(),
                                            value: m.value,
                                        })
                                        .collect()
                                })
                                .unwrap_or_default(),
                        }
                    })
                    .collect(),
            })
            .collect();
        let edges = job
            .graph
            .edges
            .iter()
            .map(|e| EdgeView {
                source: e.from as u32,
                target: e.to as u32,
                exchange: e.exchange.name(),
            })
            .collect();
        JobDetail {
            summary: self.summary(job),
            failure: job.failure.clone(),
            generation: job.generation.0,
            vertices,
            edges,
            exceptions: job.exceptions.clone(),
            spec: serde_json::from_str(&job.spec_json).unwrap_or(serde_json::Value::Null),
        }
    }
}

fn mode(spec: &JobSpec) -> &'static str {
    match spec
        .checkpointing
        .as_ref()
        .map(|c| c.mode)
        .unwrap_or_default()
    {
        CheckpointMode::None => "none",
        CheckpointMode::Abs => "abs",
        CheckpointMode::Dcas => "dcas",
    }
}

impl Actor for Dispatcher {
    type Context = Context<Self>;
}

/// Why a submission was refused.
#[derive(Debug)]
pub enum SubmitError {
    /// The spec is invalid (HTTP 400).
    Invalid(SpecError),
    /// Not enough task manager slots (HTTP 400, the spec may be fine later).
    NoResources(String),
}

/// Submit a job spec (JSON text).
#[derive(Message)]
#[rtype(result = "Result<JobId, SubmitError>")]
pub struct SubmitJob(pub String);

impl Handler<SubmitJob> for Dispatcher {
    type Result = ResponseActFuture<Self, Result<JobId, SubmitError>>;

    fn handle(&mut self, msg: SubmitJob, _ctx: &mut Self::Context) -> Self::Result {
        let registry = jobs::registry();
        let parsed = JobSpec::from_json(&msg.0).and_then(|spec| {
            JobGraph::build(&spec, &registry)?;
            Ok(spec)
        });
        let rm = self.rm.clone();
        let text = msg.0;
        Box::pin(
            async move {
                let submitted = parsed.map_err(SubmitError::Invalid)?;
                // Connectors look up partitions and offsets on their brokers (blocking, within
                // their timeouts); every task manager then builds the resolved spec.
                let (spec, registry) = tokio::task::spawn_blocking(move || {
                    let mut spec = submitted.clone();
                    registry
                        .resolve(&mut spec)
                        .map(|()| (submitted, spec, registry))
                })
                .await
                .map_err(|e| SubmitError::NoResources(e.to_string()))?
                .map(|(submitted, spec, registry)| {
                    let json = (spec != submitted)
                        .then(|| serde_json::to_string_pretty(&spec).ok())
                        .flatten()
                        .unwrap_or(text);
                    ((spec, json), registry)
                })
                .map_err(SubmitError::Invalid)?;
                let graph = JobGraph::build(&spec.0, &registry).map_err(SubmitError::Invalid)?;
                let alive = rm
                    .send(GetAlive)
                    .await
                    .map_err(|e| SubmitError::NoResources(e.to_string()))?;
                Ok((spec, graph, alive))
            }
            .into_actor(self)
            .map(move |res, act, _ctx| {
                let ((spec, json), graph, alive) = res?;
                act.start_job(spec, json, graph, alive)
            }),
        )
    }
}

impl Dispatcher {
    fn start_job(
        &mut self,
        spec: JobSpec,
        spec_json: String,
        graph: JobGraph,
        alive: Vec<Alive>,
    ) -> Result<JobId, SubmitError> {
        // Slot sharing (as Flink): slot group g holds subtask g of every task, so a job needs
        // as many slots as its highest parallelism.
        let groups = graph.tasks.iter().map(|t| t.parallelism).max().unwrap_or(1);
        let mut used: HashMap<TaskManagerId, usize> = HashMap::new();
        for job in self.jobs.values().filter(|j| !j.state.is_terminal()) {
            let mut per_tm: HashMap<TaskManagerId, std::collections::HashSet<u32>> = HashMap::new();
            for ((_, s), i) in &job.subtasks {
                per_tm.entry(i.tm).or_default().insert(*s);
            }
            for (tm, groups) in per_tm {
                *used.entry(tm).or_default() += groups.len();
            }
        }
        let free: Vec<(Alive, usize)> = alive
            .into_iter()
            .map(|a| {
                let f = (a.slots as usize).saturating_sub(used.get(&a.id).copied().unwrap_or(0));
                (a, f)
            })
            .filter(|(_, f)| *f > 0)
            .collect();
        let total: usize = free.iter().map(|(_, f)| f).sum();
        if total < groups {
            return Err(SubmitError::NoResources(format!(
                "the job needs {groups} slots (its highest parallelism) but only {total} are free on {} alive task managers",
                free.len()
            )));
        }
        // Spread slot groups evenly: round-robin over task managers with free slots.
        let mut remaining: Vec<(Alive, usize)> = free;
        let mut group_tm: Vec<usize> = Vec::with_capacity(groups);
        let mut i = 0;
        while group_tm.len() < groups {
            let k = i % remaining.len();
            if remaining[k].1 > 0 {
                remaining[k].1 -= 1;
                group_tm.push(k);
            }
            i += 1;
        }
        let id = JobId::random();
        let generation = Generation(1);
        let mut placement = Vec::new();
        let mut subtasks = BTreeMap::new();
        let mut per_tm: HashMap<usize, Vec<(u32, u32)>> = HashMap::new();
        for (t, task) in graph.tasks.iter().enumerate() {
            for (s, &k) in group_tm.iter().enumerate().take(task.parallelism) {
                let tm = &remaining[k].0;
                placement.push(Placement {
                    task: t as u32,
                    subtask: s as u32,
                    tm: tm.id,
                    data_addr: tm.data_addr.clone(),
                });
                per_tm.entry(k).or_default().push((t as u32, s as u32));
                subtasks.insert(
                    (t as u32, s as u32),
                    SubtaskInfo {
                        state: SubtaskState::Deploying,
                        tm: tm.id,
                        last: None,
                        rate_in: 0.0,
                        rate_out: 0.0,
                        backpressure: 0.0,
                    },
                );
            }
        }
        let mut tms = Vec::new();
        let mut unreachable = None;
        for (k, subs) in per_tm {
            let tm = remaining[k].0.clone();
            let d = Deployment {
                job: id,
                generation,
                spec: spec_json.clone(),
                subtasks: subs,
                placement: placement.clone(),
            };
            if tm.tx.send(ToTaskManager::Deploy(d)).is_err() {
                unreachable = Some(tm.id);
            }
            tms.push(tm);
        }
        info!(job = %id, name = %spec.name, subtasks = subtasks.len(), taskmanagers = tms.len(), "Job submitted and deployed.");
        let job = Job {
            id,
            spec,
            spec_json,
            graph,
            state: JobState::Created,
            failure: None,
            created_ms: now_ms(),
            ended_ms: None,
            generation,
            subtasks,
            collected: BTreeMap::new(),
            dropped: 0,
            exceptions: Vec::new(),
            tms,
        };
        self.persist(&job);
        self.jobs.insert(id, job);
        if let Some(tm) = unreachable {
            // Its connection closed between scheduling and deployment.
            self.end(
                id,
                JobState::Failed,
                Some(format!("task manager {tm} went away during deployment")),
            );
        }
        Ok(id)
    }
}

/// Cancel a job; `Err` when unknown.
#[derive(Message)]
#[rtype(result = "Result<JobState, ()>")]
pub struct CancelJob(pub JobId);

impl Handler<CancelJob> for Dispatcher {
    type Result = Result<JobState, ()>;
    fn handle(&mut self, msg: CancelJob, _ctx: &mut Self::Context) -> Self::Result {
        let Some(job) = self.jobs.get_mut(&msg.0) else {
            return if self.archived.iter().any(|r| r.id == msg.0.to_string()) {
                Ok(JobState::Failed)
            } else {
                Err(())
            };
        };
        if job.state.is_terminal() {
            return Ok(job.state);
        }
        info!(job = %msg.0, "Canceling job.");
        job.state = JobState::Cancelling;
        for tm in &job.tms {
            let _ = tm.tx.send(ToTaskManager::Cancel {
                job: msg.0,
                generation: job.generation,
            });
        }
        // Subtasks on dead task managers will never report: count them as canceled.
        self.settle(msg.0);
        Ok(JobState::Cancelling)
    }
}

/// A subtask changed state (from a task manager).
#[derive(Message)]
#[rtype(result = "()")]
pub struct SubtaskUpdate {
    /// Reporting task manager.
    pub tm: TaskManagerId,
    /// Job.
    pub job: JobId,
    /// Deployment.
    pub generation: Generation,
    /// Task.
    pub task: u32,
    /// Subtask.
    pub subtask: u32,
    /// New state.
    pub state: SubtaskState,
    /// Failure reason.
    pub message: Option<String>,
}

impl Handler<SubtaskUpdate> for Dispatcher {
    type Result = ();
    fn handle(&mut self, msg: SubtaskUpdate, _ctx: &mut Self::Context) {
        let Some(job) = self.jobs.get_mut(&msg.job) else {
            return;
        };
        if job.generation != msg.generation {
            return;
        }
        let Some(info) = job.subtasks.get_mut(&(msg.task, msg.subtask)) else {
            return;
        };
        let terminal = matches!(
            info.state,
            SubtaskState::Finished | SubtaskState::Canceled | SubtaskState::Failed
        );
        // States only move forward: a late report (e.g. from a task manager already declared
        // dead) never revives a subtask.
        if info.tm != msg.tm || terminal {
            return;
        }
        info.state = msg.state;
        if msg.state == SubtaskState::Failed {
            let location = format!(
                "subtask {}.{} on task manager {}",
                msg.task, msg.subtask, msg.tm
            );
            let message = msg.message.unwrap_or_else(|| "failed".into());
            job.exceptions.push(ExceptionView {
                at: now_ms(),
                location: location.clone(),
                message: message.clone(),
            });
            if !job.state.is_terminal() && job.state != JobState::Cancelling {
                self.end(
                    msg.job,
                    JobState::Failed,
                    Some(format!("{location} failed: {message}")),
                );
                return;
            }
        }
        self.settle(msg.job);
    }
}

/// Records from a collect sink.
#[derive(Message)]
#[rtype(result = "()")]
pub struct CollectedOutput {
    /// Job.
    pub job: JobId,
    /// Deployment.
    pub generation: Generation,
    /// Collect operator.
    pub operator: String,
    /// Records.
    pub records: Vec<Record>,
}

impl Handler<CollectedOutput> for Dispatcher {
    type Result = ();
    fn handle(&mut self, msg: CollectedOutput, _ctx: &mut Self::Context) {
        let limit = self.collect_limit;
        let Some(job) = self.jobs.get_mut(&msg.job) else {
            return;
        };
        if job.generation != msg.generation {
            return;
        }
        let out = job.collected.entry(msg.operator).or_default();
        let room = limit.saturating_sub(out.len());
        job.dropped += msg.records.len().saturating_sub(room) as u64;
        out.extend(msg.records.into_iter().take(room));
    }
}

impl Handler<Reports> for Dispatcher {
    type Result = ();
    fn handle(&mut self, msg: Reports, _ctx: &mut Self::Context) {
        let now = Instant::now();
        for r in msg.0 {
            let Some(job) = self.jobs.get_mut(&r.job) else {
                continue;
            };
            if job.generation != r.generation {
                continue;
            }
            let Some(info) = job.subtasks.get_mut(&(r.task, r.subtask)) else {
                continue;
            };
            if let Some((at, prev)) = &info.last {
                let dt = now.duration_since(*at).as_secs_f64();
                if dt > 0.0 {
                    let rate = |a: u64, b: u64| a.saturating_sub(b) as f64 / dt;
                    // Smooth over heartbeats so the dashboard does not flicker.
                    info.rate_in = 0.5 * info.rate_in + 0.5 * rate(r.records_in, prev.records_in);
                    info.rate_out =
                        0.5 * info.rate_out + 0.5 * rate(r.records_out, prev.records_out);
                    let bp = (r.backpressure_ms.saturating_sub(prev.backpressure_ms) as f64
                        / 1000.0
                        / dt)
                        .min(1.0);
                    info.backpressure = 0.5 * info.backpressure + 0.5 * bp;
                }
            }
            info.last = Some((now, r));
        }
    }
}

impl Handler<TaskManagerLost> for Dispatcher {
    type Result = ();
    fn handle(&mut self, msg: TaskManagerLost, _ctx: &mut Self::Context) {
        let affected: Vec<JobId> = self
            .jobs
            .values()
            .filter(|j| !j.state.is_terminal() && j.subtasks.values().any(|i| i.tm == msg.tm))
            .map(|j| j.id)
            .collect();
        for id in affected {
            let Some(job) = self.jobs.get_mut(&id) else {
                continue;
            };
            job.tms.retain(|t| t.id != msg.tm);
            for info in job.subtasks.values_mut().filter(|i| i.tm == msg.tm) {
                if !matches!(info.state, SubtaskState::Finished | SubtaskState::Canceled) {
                    info.state = SubtaskState::Failed;
                }
            }
            let reason = format!("task manager {} was lost ({})", msg.tm, msg.reason);
            job.exceptions.push(ExceptionView {
                at: now_ms(),
                location: format!("task manager {}", msg.tm),
                message: msg.reason.clone(),
            });
            if job.state == JobState::Cancelling {
                self.settle(id);
            } else {
                warn!(job = %id, tm = %msg.tm, "Job lost a task manager; no fault tolerance configured.");
                self.end(id, JobState::Failed, Some(reason));
            }
        }
    }
}

/// List jobs (current and from earlier runs).
#[derive(Message)]
#[rtype(result = "Vec<JobSummary>")]
pub struct ListJobs;

/// Operator metrics of every running subtask, for Prometheus.
#[derive(Message)]
#[rtype(result = "Vec<SubtaskMetrics>")]
pub struct ListOperatorMetrics;

/// Operator metrics of one running subtask.
#[derive(Debug, Clone)]
pub struct SubtaskMetrics {
    /// Job id.
    pub jid: String,
    /// Task index.
    pub task: u32,
    /// Subtask index.
    pub subtask: u32,
    /// (operator id, metric).
    pub metrics: Vec<(String, engine::operator::Metric)>,
}

impl Handler<ListOperatorMetrics> for Dispatcher {
    type Result = MessageResult<ListOperatorMetrics>;
    fn handle(&mut self, _msg: ListOperatorMetrics, _ctx: &mut Self::Context) -> Self::Result {
        let mut out = Vec::new();
        for job in self.jobs.values().filter(|j| !j.state.is_terminal()) {
            for ((task, subtask), info) in &job.subtasks {
                if let Some((_, r)) = &info.last {
                    out.push(SubtaskMetrics {
                        jid: job.id.to_string(),
                        task: *task,
                        subtask: *subtask,
                        metrics: r.operator_metrics.clone(),
                    });
                }
            }
        }
        MessageResult(out)
    }
}

impl Handler<ListJobs> for Dispatcher {
    type Result = MessageResult<ListJobs>;
    fn handle(&mut self, _msg: ListJobs, _ctx: &mut Self::Context) -> Self::Result {
        let mut out: Vec<JobSummary> = self.jobs.values().map(|j| self.summary(j)).collect();
        out.extend(self.archived.iter().map(|r| {
            JobSummary {
                jid: r.id.clone(),
                name: r.name.clone(),
                state: r.state,
                mode: r.mode.clone(),
                start_time: r.created_ms,
                end_time: r.ended_ms,
                duration: r
                    .ended_ms
                    .unwrap_or(r.created_ms)
                    .saturating_sub(r.created_ms),
                throughput: 0.0,
            }
        }));
        out.sort_by_key(|j| std::cmp::Reverse(j.start_time));
        MessageResult(out)
    }
}

/// One job in full; `None` when unknown.
#[derive(Message)]
#[rtype(result = "Option<JobDetail>")]
pub struct GetJob(pub JobId);

impl Handler<GetJob> for Dispatcher {
    type Result = MessageResult<GetJob>;
    fn handle(&mut self, msg: GetJob, _ctx: &mut Self::Context) -> Self::Result {
        MessageResult(self.jobs.get(&msg.0).map(|j| self.detail(j)))
    }
}

/// A page of a job's collect output; `None` for an unknown job.
#[derive(Message)]
#[rtype(result = "Option<Vec<OutputPage>>")]
pub struct GetOutput {
    /// Job.
    pub job: JobId,
    /// Only this collect operator (all when None).
    pub operator: Option<String>,
    /// First record.
    pub offset: usize,
    /// Records per operator at most.
    pub limit: usize,
}

impl Handler<GetOutput> for Dispatcher {
    type Result = MessageResult<GetOutput>;
    fn handle(&mut self, msg: GetOutput, _ctx: &mut Self::Context) -> Self::Result {
        let Some(job) = self.jobs.get(&msg.job) else {
            return MessageResult(None);
        };
        let collect_ops = job
            .graph
            .vertices
            .iter()
            .filter(|v| v.kind == "collect")
            .map(|v| v.id.clone());
        let pages = collect_ops
            .filter(|op| msg.operator.as_ref().is_none_or(|o| o == op))
            .map(|op| {
                let recs = job.collected.get(&op).map(Vec::as_slice).unwrap_or(&[]);
                let page = recs.iter().skip(msg.offset).take(msg.limit);
                OutputPage {
                    operator: op.clone(),
                    total: recs.len(),
                    dropped: job.dropped,
                    offset: msg.offset,
                    records: page
                        .map(|r| serde_json::json!({"key": r.key, "ts": r.ts, "value": r.value}))
                        .collect(),
                }
            })
            .collect();
        MessageResult(Some(pages))
    }
}
