//! `Dispatcher`: every job's lifecycle — validation, scheduling, deployment, subtask
//! states, collected output, failure and cancellation.
//!
//! Receives REST requests (`SubmitJob`, `CancelJob`, queries, checkpoint triggers),
//! `SubtaskUpdate`, `CheckpointAcked` and `CollectedOutput` from control connections,
//! `Reports` from the resource manager, `TaskManagerLost` and `CacheEpoch` from the cache
//! master (which relays losses once it recorded them). Emits `Deploy`/`Cancel` and
//! checkpoint triggers and completions to task managers.
//!
//! ABS jobs: every 50 ms the dispatcher ticks each job's checkpoint `Coordinator`. A failure
//! (a subtask failed, a task manager was lost) starts a recovery: checkpoints in flight are
//! aborted, the deployment is canceled, and once every old subtask stopped (or 5 s passed)
//! and the restart delay elapsed, the whole job is placed again on the task managers alive
//! with free slots (waiting, and retrying every second, while there are too few) and
//! deployed as the next generation, restored from the newest intact completed checkpoint.
//! Each recovery is a `FailoverEvent` with the time of every phase.
//!
//! Invariant: messages of an older deployment generation never change a job; a job in a
//! terminal state (FINISHED, CANCELED, FAILED) never changes again.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use actix::prelude::*;
use engine::graph::JobGraph;
use engine::ids::{Generation, JobId, TaskManagerId};
use engine::protocol::control::{
    Deployment, OperatorState, Placement, SubtaskReport, SubtaskState, ToTaskManager,
};
use engine::runtime::dcas::DcasNames;
use engine::runtime::deploy::edge_sources;
use engine::spec::{CheckpointMode, CheckpointingSpec, JobSpec, SpecError};
use engine::Record;
use serde::Serialize;
use tracing::{debug, error, info, warn};

use crate::cache_master::{CacheEpoch, CacheMaster, DropEntries};
use crate::checkpoints::{CheckpointsView, Coordinator, Step};
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
    /// Subtasks without outputs (sinks): how old the latest latency marker was when it
    /// arrived, in ms — the end-to-end latency from the sources; once none came for a
    /// second (a stalled path), how old it is now (null before the first).
    pub latency_ms: Option<u64>,
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
    /// Recoveries so far.
    pub restarts: u32,
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
    /// DCAS restarts of this subtask within the deployment.
    attempt: u32,
    last: Option<(Instant, SubtaskReport)>,
    rate_in: f64,
    rate_out: f64,
    backpressure: f64,
    /// Records read per second over the last heartbeat interval alone (no smoothing), for
    /// recovery tracking.
    raw_rate_in: f64,
    /// Sources: the lag samples of the latest reports, oldest first, at most
    /// [`LAG_SAMPLES_KEPT`]: (ms since the epoch at the task manager, records).
    lag_samples: VecDeque<(u64, u64)>,
    /// Sinks: the latency markers of the latest reports, oldest first, at most
    /// [`LAG_SAMPLES_KEPT`]: (ms since the epoch at the task manager, the marker's origin).
    marker_samples: VecDeque<(u64, u64)>,
}

impl SubtaskInfo {
    fn deploying(tm: TaskManagerId) -> SubtaskInfo {
        SubtaskInfo {
            state: SubtaskState::Deploying,
            tm,
            attempt: 0,
            last: None,
            rate_in: 0.0,
            rate_out: 0.0,
            backpressure: 0.0,
            raw_rate_in: 0.0,
            lag_samples: VecDeque::new(),
            marker_samples: VecDeque::new(),
        }
    }

    /// Sinks: the end-to-end latency by the latest marker (see [`SubtaskView::latency_ms`]).
    fn latency_ms(&self, now: u64) -> Option<u64> {
        let &(at, origin) = self.marker_samples.back()?;
        let stalled = self.state == SubtaskState::Running && now > at + LATENCY_WINDOW_MS;
        Some(if stalled { now } else { at }.saturating_sub(origin))
    }

    fn stopped(&self) -> bool {
        matches!(
            self.state,
            SubtaskState::Finished | SubtaskState::Canceled | SubtaskState::Failed
        )
    }
}

/// One recovery of a job, with the time of each phase (ms since the epoch).
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct FailoverEvent {
    /// 1 for the first recovery of the job, and so on.
    pub attempt: u32,
    /// What failed.
    pub cause: String,
    /// Mode of the recovery (`abs`: the whole job restarts from a checkpoint; `dcas`: only
    /// the lost subtasks restart, from their cached snapshots and logs).
    pub mode: String,
    /// The failure was detected.
    pub detected_ms: u64,
    /// Every subtask of the failed deployment stopped (or the cancel timeout passed).
    pub canceled_ms: Option<u64>,
    /// The new deployment was sent.
    pub deployed_ms: Option<u64>,
    /// Every subtask restarted and runs (ABS: with its state restored).
    pub restored_ms: Option<u64>,
    /// DCAS: every restarted subtask restored its snapshot and replayed its log.
    pub replayed_ms: Option<u64>,
    /// The first record was processed after the restore (DCAS: the restarted subtasks
    /// replayed their logs and take live input; ABS: the sources' first poll when they tell
    /// their lag, else the first report of a record read).
    pub first_record_ms: Option<u64>,
    /// The sources are as close to their input again as before the failure (within 50 ms
    /// of input) when they report how far behind they are, else they read at 90% of their
    /// rate before the failure (or, when that rate was zero, the first record); and (DCAS)
    /// every restarted subtask logged the backlog its surviving senders kept for it. Timed
    /// by the task managers' clocks where they tell (the sources' lag samples, the senders'
    /// rewired channels), so the machines' clocks must agree.
    pub inputs_caught_up_ms: Option<u64>,
    /// The end of the recovery: from then on, the data the sources send goes through
    /// every queue of the job (channel buffers included, where the sources of an ABS
    /// recovery read their backlog) to every sink about as fast as before the failure. Per
    /// sink, the origin of the first latency marker sent after the inputs caught up that
    /// arrived within twice the usual latency plus the markers' spacing; the latest over
    /// sinks.
    pub caught_up_ms: Option<u64>,
    /// Checkpoint restored from (none: started from scratch).
    pub checkpoint: Option<u64>,
    /// Generation deployed.
    pub generation: Option<u64>,
    /// Subtasks restarted.
    pub subtasks_restarted: u32,
    /// DCAS: the restarted subtasks, as (task index, subtask index).
    pub restarted: Vec<(u32, u32)>,
    /// DCAS: log entries the restarted subtasks replayed.
    pub log_replayed: u64,
    /// DCAS: incremental snapshots the restarted subtasks applied after their whole ones.
    pub snapshot_links: u64,
    /// Source records per second before the failure.
    pub pre_failure_rate: f64,
    /// Records the sources had available but not read before the failure, when every
    /// source reports it (a generator behind its feed, a consumer behind its log end).
    pub pre_failure_lag: Option<u64>,
    /// The sinks' end-to-end latency before the failure, in ms: the median age of the
    /// latency markers over the last second each sink got before the failure was handled,
    /// the highest over sinks (none when no marker had arrived).
    pub pre_failure_latency_ms: Option<u64>,
    /// Why newer checkpoints could not be restored (corruption), if any.
    pub restore_errors: Vec<String>,
    /// A later recovery started before this one caught up (a whole-job restart from a DCAS
    /// job's fallback checkpoint replaces it; a new failure ends its timing).
    pub superseded_ms: Option<u64>,
    /// DCAS: the surviving senders of the restarted subtasks, each with the number of the
    /// rewire to its latest restarted receiver: the backlog it kept counts once it reports
    /// that rewire's receivers (and every earlier one's) logged it.
    #[serde(skip)]
    senders: BTreeMap<(u32, u32), u64>,
}

impl FailoverEvent {
    /// A recovery of `mode` detected now, before any of its phases.
    fn new(attempt: u32, cause: String, mode: &str, before: Before) -> FailoverEvent {
        FailoverEvent {
            attempt,
            cause,
            mode: mode.into(),
            detected_ms: now_ms(),
            canceled_ms: None,
            deployed_ms: None,
            restored_ms: None,
            replayed_ms: None,
            first_record_ms: None,
            inputs_caught_up_ms: None,
            caught_up_ms: None,
            checkpoint: None,
            generation: None,
            subtasks_restarted: 0,
            restarted: Vec::new(),
            log_replayed: 0,
            snapshot_links: 0,
            pre_failure_rate: before.rate,
            pre_failure_lag: before.lag,
            pre_failure_latency_ms: before.latency,
            restore_errors: Vec::new(),
            superseded_ms: None,
            senders: BTreeMap::new(),
        }
    }
}

/// The sources' progress when a failure was detected.
struct Before {
    /// Records read per second.
    rate: f64,
    /// Records available but not read, when every source knows.
    lag: Option<u64>,
    /// The sinks' end-to-end latency (see [`Job::sink_latency`]).
    latency: Option<u64>,
}

/// A recovery waiting for its old deployment to stop and its restart delay.
struct Recovery {
    since: Instant,
    delay: Duration,
    /// Placement requested (waiting for the alive task managers).
    deploying: bool,
    /// Not before (after a failed placement).
    next_try: Instant,
    /// Started by a symptom (a subtask its task manager stopped because a neighbour's
    /// channel closed) whose root cause has not been reported yet.
    by_symptom: bool,
}

/// Longest wait for a failed deployment's subtasks to report stopped before redeploying.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(5);

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
    /// ABS: the checkpoint coordinator.
    coordinator: Option<Coordinator>,
    /// Recoveries, oldest first.
    failovers: Vec<FailoverEvent>,
    /// Recoveries started.
    restarts: u32,
    /// What was taken of each collect subtask's epochs, by (operator, subtask): an
    /// exactly-once sink delivers an epoch again after a restore (the same records in the
    /// same parts), and only the first delivery of each part counts.
    collects: HashMap<(String, u32), CollectProgress>,
    /// A recovery in progress (until the new deployment is sent).
    recovery: Option<Recovery>,
    /// DCAS with fallback checkpoints: the checkpoint this deployment was restored from. A
    /// subtask restarted (DCAS) before it stored its first snapshot in the cache must start
    /// from it too, so every DCAS restart of the deployment carries it.
    restored_from: Option<u64>,
    /// DCAS: the cache table epoch the current generation's entries date from (see
    /// [`Deployment::cache_epoch`]); its subtasks restarted later carry it too.
    cache_epoch: u64,
}

impl Job {
    /// Subtasks of the job's source tasks (tasks without inputs).
    fn sources(&self) -> impl Iterator<Item = &SubtaskInfo> {
        self.subtasks_of_tasks(|t| !self.graph.edges.iter().any(|e| e.to == t))
    }

    /// Subtasks of the tasks `keep` selects (by task index).
    fn subtasks_of_tasks(
        &self,
        keep: impl Fn(usize) -> bool,
    ) -> impl Iterator<Item = &SubtaskInfo> {
        (0..self.graph.tasks.len())
            .filter(move |&t| keep(t))
            .flat_map(|t| self.subtasks.range((t as u32, 0)..(t as u32 + 1, 0)))
            .map(|(_, i)| i)
    }

    /// The latency markers of the running subtasks without outputs (sinks).
    fn sink_markers(&self) -> Vec<&VecDeque<(u64, u64)>> {
        self.subtasks_of_tasks(|t| !self.graph.edges.iter().any(|e| e.from == t))
            .filter(|i| !matches!(i.state, SubtaskState::Finishing | SubtaskState::Finished))
            .map(|i| &i.marker_samples)
            .collect()
    }

    /// The sinks' end-to-end latency: per sink, the median age of the markers that arrived
    /// in the second before its last one (a sink cut off by a failure stops receiving them,
    /// so this is its latency before the failure, however late the loss is detected); the
    /// highest over sinks. `None` when no sink had a marker.
    fn sink_latency(&self) -> Option<u64> {
        self.sink_markers()
            .into_iter()
            .filter_map(|samples| {
                let &(last, _) = samples.back()?;
                let recent = samples
                    .iter()
                    .filter(|&&(at, _)| at + LATENCY_WINDOW_MS > last)
                    .map(|&(at, origin)| at.saturating_sub(origin));
                median(recent.collect())
            })
            .max()
    }

    /// DCAS: when every surviving sender of the restarted subtasks (`senders`, with the
    /// number of its latest rewire) saw its receivers of that rewire log the backlog it
    /// kept for them; `None` until each has. None to wait for (ABS): 0.
    fn backlogs_logged(&self, senders: &BTreeMap<(u32, u32), u64>) -> Option<u64> {
        senders.iter().try_fold(0, |latest, (k, &rewire)| {
            let Some(i) = self.subtasks.get(k) else {
                return Some(latest);
            };
            if matches!(i.state, SubtaskState::Finishing | SubtaskState::Finished) {
                return Some(latest);
            }
            let (_, r) = i.last.as_ref()?;
            (r.receivers_caught_up >= rewire).then_some(latest.max(r.receivers_caught_up_ms))
        })
    }

    /// Records the sources have available but not read, when every source reports it.
    fn source_lag(&self) -> Option<u64> {
        self.sources()
            .map(|i| {
                let (_, r) = i.last.as_ref()?;
                u64::try_from(r.source_lag).ok()
            })
            .sum()
    }
}

/// How long after a DCAS recovery replayed its logs a source that knew its lag before the
/// failure may still not know it, before the rate rule decides whether it caught up.
const LAG_UNKNOWN_GRACE_MS: u64 = 3_000;

/// How long after a failure (or a subtask's new state during a recovery) the recovery
/// takes its next step: none, the dispatcher's next turn, so losses handled before it are
/// placed together. Waiting longer for losses of task managers killed together (found a
/// few ms apart) costs every single failure that wait; a loss found after the placement
/// joins the recovery, and its neighbours are rewired again.
const RECOVERY_COALESCE: Duration = Duration::ZERO;

/// Most lag samples kept per source subtask: eight seconds at one sample every 2 ms (and
/// of latency markers per sink, at least four seconds, one every 1 ms during a recovery
/// and every 5 ms otherwise, enough for a latency to settle over two seconds).
const LAG_SAMPLES_KEPT: usize = 4096;

/// Appends `new` samples to `kept`, keeping the newest [`LAG_SAMPLES_KEPT`].
fn keep_newest(kept: &mut VecDeque<(u64, u64)>, new: &[(u64, u64)]) {
    kept.extend(new.iter().copied());
    let excess = kept.len().saturating_sub(LAG_SAMPLES_KEPT);
    kept.drain(..excess);
}

/// A DCAS restart to place: the job and its deployment, its subtasks to restart, the task
/// managers lost.
type PendingRestart = (JobId, Generation, Vec<(u32, u32)>, Vec<TaskManagerId>);

/// The dispatcher actor.
pub struct Dispatcher {
    rm: Addr<ResourceManager>,
    /// The cache's membership master: drops an ended DCAS job's entries.
    cache: Addr<CacheMaster>,
    /// The newest cache table epoch the master announced: a DCAS deployment's entries date
    /// from it.
    cache_epoch: u64,
    store: Store,
    jobs: HashMap<JobId, Job>,
    /// Jobs from earlier job manager runs (listing only).
    archived: Vec<JobRecord>,
    collect_limit: usize,
    /// DCAS recoveries waiting to be placed (on the next tick).
    pending_dcas: Vec<PendingRestart>,
    /// Number of the latest DCAS rewire sent (rising over every job).
    rewires: u64,
    /// A recovery step is scheduled sooner than the next tick (see
    /// [`Dispatcher::recover_soon`]).
    recovering_soon: bool,
}

impl Dispatcher {
    /// A dispatcher; previous jobs are loaded from `store`.
    pub fn new(
        rm: Addr<ResourceManager>,
        cache: Addr<CacheMaster>,
        store: Store,
        collect_limit: usize,
    ) -> Dispatcher {
        let archived = store.load_and_close_unfinished();
        Dispatcher {
            rm,
            cache,
            cache_epoch: 0,
            store,
            jobs: HashMap::new(),
            archived,
            collect_limit,
            pending_dcas: Vec::new(),
            rewires: 0,
            recovering_soon: false,
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
        self.drop_cache_entries(job);
        self.persist(job);
    }

    /// DCAS: an ended job's logs, snapshots and progress leave the cache (nothing reads or
    /// writes them any more).
    fn drop_cache_entries(&self, job: &Job) {
        if CheckpointingSpec::dcas(job.spec.checkpointing.as_ref()).is_some() {
            self.cache.do_send(DropEntries {
                prefix: DcasNames::job_prefix(&job.id.to_string()),
            });
        }
    }

    /// Recomputes the job state after a subtask update.
    fn settle(&mut self, id: JobId) {
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        if job.state.is_terminal() || (job.recovery.is_some() && job.state != JobState::Cancelling)
        {
            return;
        }
        let all = |s: SubtaskState| job.subtasks.values().all(|i| i.state == s);
        let terminal = job.subtasks.values().all(|i| {
            matches!(
                i.state,
                SubtaskState::Finished | SubtaskState::Canceled | SubtaskState::Failed
            )
        });
        // With fallback checkpoints, sinks commit only on completed ones: subtasks finish
        // after the final one, as under ABS.
        // Under DCAS, subtasks marked failed are being restarted.
        let dcas_restarting = CheckpointingSpec::dcas(job.spec.checkpointing.as_ref()).is_some()
            && job.state == JobState::Restarting;
        let dcas_done = CheckpointingSpec::dcas(job.spec.checkpointing.as_ref()).is_some()
            && job.coordinator.is_none()
            && job.state != JobState::Restarting
            && job
                .subtasks
                .values()
                .all(|i| matches!(i.state, SubtaskState::Finishing | SubtaskState::Finished));
        if all(SubtaskState::Finished) || dcas_done {
            self.end(id, JobState::Finished, None);
        } else if terminal && job.state != JobState::Cancelling && !dcas_restarting {
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
            self.drop_cache_entries(job);
            self.persist(job);
        } else if matches!(job.state, JobState::Created | JobState::Restarting)
            && job.subtasks.values().all(|i| {
                matches!(
                    i.state,
                    SubtaskState::Running | SubtaskState::Finishing | SubtaskState::Finished
                )
            })
        {
            if job.state == JobState::Restarting {
                if let Some(e) = job.failovers.last_mut() {
                    e.restored_ms.get_or_insert_with(now_ms);
                }
            }
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
                            latency_ms: i.latency_ms(now_ms()),
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
            restarts: job.restarts,
            vertices,
            edges,
            exceptions: job.exceptions.clone(),
            spec: serde_json::from_str(&job.spec_json).unwrap_or(serde_json::Value::Null),
        }
    }
}

fn mode(spec: &JobSpec) -> &'static str {
    spec.checkpointing
        .as_ref()
        .map(|c| c.mode)
        .unwrap_or_default()
        .as_str()
}

impl Actor for Dispatcher {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(Duration::from_millis(50), |act, ctx| act.tick(ctx));
    }
}

/// Checkpoints and recoveries.
impl Dispatcher {
    /// Jobs not ended yet.
    fn live_jobs(&self) -> Vec<JobId> {
        self.jobs
            .values()
            .filter(|j| !j.state.is_terminal())
            .map(|j| j.id)
            .collect()
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        let live = self.live_jobs();
        for id in live {
            self.tick_checkpoints(id);
        }
        self.tick_recoveries(ctx);
    }

    /// Takes the next step of every recovery in progress [`RECOVERY_COALESCE`] after a
    /// failure or a subtask's new state, rather than at the next tick: a restart waiting
    /// for a tick would wait 25 ms on average.
    fn recover_soon(&mut self, ctx: &mut Context<Self>) {
        let recovering = self.jobs.values().any(|j| j.recovery.is_some());
        if self.recovering_soon || (self.pending_dcas.is_empty() && !recovering) {
            return;
        }
        self.recovering_soon = true;
        ctx.run_later(RECOVERY_COALESCE, |act, ctx| {
            act.recovering_soon = false;
            act.tick_recoveries(ctx);
        });
    }

    /// Moves each recovery on: redeploys jobs whose subtasks all stopped (ABS), places
    /// pending DCAS restarts.
    fn tick_recoveries(&mut self, ctx: &mut Context<Self>) {
        let live = self.live_jobs();
        for id in live {
            self.tick_recovery(id, ctx);
        }
        // Restarts of one job found before this turn (task managers lost at once) are
        // placed together, so no restarted subtask is wired to a neighbour about to move.
        let mut merged: Vec<PendingRestart> = Vec::new();
        for (id, generation, lost, lost_tms) in std::mem::take(&mut self.pending_dcas) {
            match merged.iter_mut().find(|m| m.0 == id && m.1 == generation) {
                Some(m) => {
                    for k in lost {
                        if !m.2.contains(&k) {
                            m.2.push(k);
                        }
                    }
                    m.3.extend(lost_tms);
                }
                None => merged.push((id, generation, lost, lost_tms)),
            }
        }
        for (id, generation, lost, lost_tms) in merged {
            let rm = self.rm.clone();
            ctx.spawn(
                async move { rm.send(GetAlive).await.unwrap_or_default() }
                    .into_actor(self)
                    .map(move |alive, act, _| {
                        act.dcas_place(id, generation, lost, lost_tms, alive)
                    }),
            );
        }
    }

    fn tick_checkpoints(&mut self, id: JobId) {
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        if job.recovery.is_some() || job.state == JobState::Cancelling {
            return;
        }
        let Some(coordinator) = &mut job.coordinator else {
            return;
        };
        // Subtasks that finished (after a final checkpoint, under DCAS while a restarted
        // one still finishes) take no further checkpoints.
        let subtasks: Vec<(u32, u32)> = job
            .subtasks
            .iter()
            .filter(|(_, i)| i.state != SubtaskState::Finished)
            .map(|(k, _)| *k)
            .collect();
        let running = job.state == JobState::Running
            && job
                .subtasks
                .values()
                .all(|i| i.state == SubtaskState::Running);
        let finishing = job
            .subtasks
            .values()
            .all(|i| matches!(i.state, SubtaskState::Finishing | SubtaskState::Finished))
            && job
                .subtasks
                .values()
                .any(|i| i.state == SubtaskState::Finishing);
        let steps = coordinator.tick(now_ms(), &subtasks, running, finishing);
        self.apply(id, steps);
    }

    /// Carries out what the coordinator decided.
    fn apply(&mut self, id: JobId, steps: Vec<Step>) {
        for step in steps {
            let Some(job) = self.jobs.get_mut(&id) else {
                return;
            };
            match step {
                Step::Trigger { id: n, final_ } => {
                    // Sources start a barrier checkpoint; a final one is taken by every
                    // (finishing) subtask.
                    let sources: HashSet<u32> = (0..job.graph.tasks.len())
                        .filter(|t| !job.graph.edges.iter().any(|e| e.to == *t))
                        .map(|t| t as u32)
                        .collect();
                    let mut per_tm: HashMap<TaskManagerId, Vec<(u32, u32)>> = HashMap::new();
                    for (k, i) in &job.subtasks {
                        let wanted = if final_ {
                            i.state == SubtaskState::Finishing
                        } else {
                            sources.contains(&k.0)
                        };
                        if wanted {
                            per_tm.entry(i.tm).or_default().push(*k);
                        }
                    }
                    debug!(job = %id, checkpoint = n, final_, "Triggering checkpoint.");
                    for tm in &job.tms {
                        if let Some(subtasks) = per_tm.remove(&tm.id) {
                            let _ = tm.tx.send(ToTaskManager::TriggerCheckpoint {
                                job: id,
                                generation: job.generation,
                                checkpoint: n,
                                subtasks,
                                final_,
                            });
                        }
                    }
                }
                Step::Complete(stats) => match self
                    .store
                    .checkpoints()
                    .inherit_missing(
                        id,
                        stats.id,
                        &job.subtasks.keys().copied().collect::<Vec<_>>(),
                    )
                    .and_then(|()| self.store.checkpoints().complete(id, &stats))
                {
                    Ok(pruned) => {
                        // Every subtask stored a DCAS snapshot of its own (before its ack).
                        job.restored_from = None;
                        info!(job = %id, checkpoint = stats.id, duration_ms = stats.duration_ms, alignment_us = stats.alignment_us, bytes = stats.state_bytes, pruned = ?pruned, "Checkpoint completed.");
                        for tm in &job.tms {
                            let _ = tm.tx.send(ToTaskManager::CheckpointComplete {
                                job: id,
                                generation: job.generation,
                                checkpoint: stats.id,
                            });
                        }
                    }
                    Err(e) => {
                        // Not durable, so not complete: sinks never commit it.
                        error!(job = %id, checkpoint = stats.id, error = %e, "Could not persist a completed checkpoint.");
                        job.exceptions.push(ExceptionView {
                            at: now_ms(),
                            location: "checkpoint storage".into(),
                            message: format!("checkpoint {} not persisted: {e}", stats.id),
                        });
                    }
                },
                Step::Failed(n) => {
                    debug!(job = %id, checkpoint = n, "Checkpoint failed.");
                    self.store.checkpoints().discard(id, n);
                }
            }
        }
    }

    /// Lists a failure among the job's exceptions; returns the sources' progress before it
    /// (`None` for an unknown job).
    fn record_failure(&mut self, id: JobId, location: &str, cause: &str) -> Option<Before> {
        let job = self.jobs.get(&id)?;
        let before = Before {
            rate: self.summary(job).throughput,
            lag: job.source_lag(),
            latency: job.sink_latency(),
        };
        self.jobs.get_mut(&id)?.exceptions.push(ExceptionView {
            at: now_ms(),
            location: location.to_string(),
            message: cause.to_string(),
        });
        Some(before)
    }

    /// Counts a restart of the job and returns it; `None` (and the job failed) when it
    /// used up its `max_restarts`.
    fn count_restart(&mut self, id: JobId, location: &str, cause: &str) -> Option<&mut Job> {
        let job = self.jobs.get(&id)?;
        let max = job.spec.checkpointing.as_ref().and_then(|c| c.max_restarts);
        if let Some(max) = max.filter(|m| job.restarts >= *m) {
            self.end(
                id,
                JobState::Failed,
                Some(format!(
                    "restart limit ({max}) reached; last failure: {location}: {cause}"
                )),
            );
            return None;
        }
        let job = self.jobs.get_mut(&id)?;
        job.restarts += 1;
        Some(job)
    }

    /// A failure in a job: recover (ABS) or fail the job.
    fn fail_over(&mut self, id: JobId, location: String, cause: String) {
        self.fail_over_on(id, location, cause, false);
    }

    /// `fail_over`, where a `symptom` is a failure caused by another one (a neighbour's
    /// channel closed). Such a report often comes before its root cause (the loss of a task
    /// manager's control connection is noticed after its data connections), so the root
    /// cause, when it follows during the same recovery, becomes the recovery's cause.
    fn fail_over_on(&mut self, id: JobId, location: String, cause: String, symptom: bool) {
        let Some(before) = self.record_failure(id, &location, &cause) else {
            return;
        };
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        if job.state.is_terminal() || job.state == JobState::Cancelling {
            self.settle(id);
            return;
        }
        if let Some(recovery) = job.recovery.as_mut() {
            // The deployment that failed again is already being replaced.
            if recovery.by_symptom && !symptom {
                recovery.by_symptom = false;
                if let Some(event) = job.failovers.last_mut() {
                    event.cause = format!("{location}: {cause} (first seen as {})", event.cause);
                }
                let job = &self.jobs[&id];
                self.persist(job);
            }
            return;
        }
        let Some(config) = CheckpointingSpec::barriers(job.spec.checkpointing.as_ref()).cloned()
        else {
            warn!(job = %id, "Job failed; no fault tolerance configured.");
            self.end(id, JobState::Failed, Some(format!("{location}: {cause}")));
            return;
        };
        let Some(job) = self.count_restart(id, &location, &cause) else {
            return;
        };
        warn!(job = %id, attempt = job.restarts, location = %location, cause = %cause, "Job failed; restarting from the last completed checkpoint.");
        let aborted = job
            .coordinator
            .as_mut()
            .map(|c| c.abort_all("the job is restarting"))
            .unwrap_or_default();
        for tm in &job.tms {
            let _ = tm.tx.send(ToTaskManager::Cancel {
                job: id,
                generation: job.generation,
            });
        }
        job.state = JobState::Restarting;
        job.recovery = Some(Recovery {
            since: Instant::now(),
            delay: Duration::from_millis(config.restart_delay_ms.unwrap_or(0)),
            deploying: false,
            next_try: Instant::now(),
            by_symptom: symptom,
        });
        for e in job
            .failovers
            .iter_mut()
            .filter(|e| e.caught_up_ms.is_none())
        {
            e.superseded_ms.get_or_insert_with(now_ms);
        }
        // A DCAS job restarts whole only from its fallback checkpoint.
        let mode = match config.mode {
            CheckpointMode::Dcas => "fallback",
            _ => "abs",
        };
        job.failovers.push(FailoverEvent::new(
            job.restarts,
            format!("{location}: {cause}"),
            mode,
            before,
        ));
        for n in aborted {
            self.store.checkpoints().discard(id, n);
        }
        let job = &self.jobs[&id];
        self.persist(job);
    }

    /// DCAS: restarts only subtasks `lost` (of task managers `lost_tms`, or failed alone)
    /// on surviving task managers; the rest of the job keeps running.
    fn dcas_recover(
        &mut self,
        id: JobId,
        lost: Vec<(u32, u32)>,
        lost_tms: Vec<TaskManagerId>,
        location: String,
        cause: String,
    ) {
        let Some(before) = self.record_failure(id, &location, &cause) else {
            return;
        };
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        if job.recovery.is_some() {
            // A whole-job restart from the fallback checkpoint replaces every subtask; the
            // lost ones are stopped already.
            for k in &lost {
                if let Some(i) = job.subtasks.get_mut(k) {
                    i.state = SubtaskState::Failed;
                }
            }
            return;
        }
        if job.state.is_terminal() || job.state == JobState::Cancelling || lost.is_empty() {
            return;
        }
        if cause.contains(engine::cache::client::LOST_EVERY_COPY) && job.coordinator.is_some() {
            warn!(job = %id, location = %location, cause = %cause, "DCAS: cache entries lost; restarting the whole job from its fallback checkpoint.");
            self.fail_over(
                id,
                location,
                format!("{cause} (more task managers failed at once than cache.backup_count covers; restored from the last fallback checkpoint)"),
            );
            return;
        }
        if cause.contains(engine::cache::client::LOST_EVERY_COPY) {
            // More members failed at once than the cache's backups cover: restarting from
            // what is left would silently miss data.
            self.end(
                id,
                JobState::Failed,
                Some(format!(
                    "DCAS cannot recover: {location}: {cause} (more task managers failed at once than cache.backup_count covers)"
                )),
            );
            return;
        }
        let Some(job) = self.count_restart(id, &location, &cause) else {
            return;
        };
        warn!(job = %id, attempt = job.restarts, location = %location, cause = %cause, subtasks = ?lost, "DCAS: restarting only the affected subtasks.");
        // Fallback checkpoints in flight may never get the restarted subtasks' barriers.
        let mut aborted = Vec::new();
        if let Some(c) = &mut job.coordinator {
            aborted = c.abort_all("a DCAS recovery restarted subtasks");
            let upto = c.last_triggered();
            for tm in &job.tms {
                let _ = tm.tx.send(ToTaskManager::AbortCheckpoints {
                    job: id,
                    generation: job.generation,
                    upto,
                });
            }
        }
        for k in &lost {
            if let Some(i) = job.subtasks.get_mut(k) {
                i.state = SubtaskState::Failed;
                // Its last counters are from the lost incarnation.
                i.last = None;
                i.raw_rate_in = 0.0;
            }
        }
        // The survivors' sources mark densely, so the recovery's end is timed precisely.
        for tm in &job.tms {
            let _ = tm.tx.send(ToTaskManager::Recovering {
                job: id,
                generation: job.generation,
            });
        }
        job.state = JobState::Restarting;
        // A failure while an earlier DCAS recovery is still catching up (a simultaneous
        // loss, or one during the recovery) joins that recovery: one episode, timed from
        // its first detection until everything restarted has caught up.
        if let Some(e) = job
            .failovers
            .last_mut()
            .filter(|e| e.mode == "dcas" && e.caught_up_ms.is_none())
        {
            e.cause = format!("{}; {location}: {cause}", e.cause);
            for k in &lost {
                if !e.restarted.contains(k) {
                    e.restarted.push(*k);
                }
            }
            e.subtasks_restarted = e.restarted.len() as u32;
            (e.deployed_ms, e.restored_ms, e.replayed_ms) = (None, None, None);
            (e.first_record_ms, e.inputs_caught_up_ms) = (None, None);
        } else {
            for e in job
                .failovers
                .iter_mut()
                .filter(|e| e.caught_up_ms.is_none())
            {
                e.superseded_ms.get_or_insert_with(now_ms);
            }
            let e =
                FailoverEvent::new(job.restarts, format!("{location}: {cause}"), "dcas", before);
            job.failovers.push(FailoverEvent {
                // Nothing is canceled: the rest of the job keeps running.
                canceled_ms: Some(e.detected_ms),
                generation: Some(job.generation.0),
                subtasks_restarted: lost.len() as u32,
                restarted: lost.clone(),
                ..e
            });
        }
        for n in aborted {
            self.store.checkpoints().discard(id, n);
        }
        let job = &self.jobs[&id];
        self.persist(job);
        // Placed on the next tick, once the alive task managers are known.
        self.pending_dcas.push((id, job.generation, lost, lost_tms));
    }

    /// DCAS: places restarted subtasks on the alive task managers, deploys them there and
    /// rewires every other task manager of the job to them.
    fn dcas_place(
        &mut self,
        id: JobId,
        generation: Generation,
        lost: Vec<(u32, u32)>,
        lost_tms: Vec<TaskManagerId>,
        alive: Vec<Alive>,
    ) {
        // The restarted subtasks' own slots are free: one restarted because it failed (a
        // neighbour it was wired to was lost too) may take its slot again.
        let used = self.used_slots(|job, k| job == id && lost.contains(&k));
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        if job.state.is_terminal()
            || job.state == JobState::Cancelling
            || job.recovery.is_some()
            || job.generation != generation
        {
            // Replaced meanwhile by a whole-job restart.
            return;
        }
        let alive: Vec<Alive> = alive
            .into_iter()
            .filter(|a| !lost_tms.contains(&a.id))
            .collect();
        if alive.is_empty() && job.coordinator.is_some() {
            // The fallback checkpoint restarts the job whole once task managers come back.
            let cause = "no task manager is alive to place restarted subtasks on".to_string();
            self.fail_over(id, "DCAS recovery".into(), cause);
            return;
        }
        if alive.is_empty() {
            self.end(
                id,
                JobState::Failed,
                Some("DCAS recovery: no task manager is alive".into()),
            );
            return;
        }
        let free = alive
            .iter()
            .map(|a| {
                let free = a.slots as i64 - used.get(&a.id).copied().unwrap_or(0) as i64;
                (a.id, free)
            })
            .collect();
        let group = |t: u32| job.graph.tasks[t as usize].slot_group.as_str();
        // A kept subtask on an alive task manager whose slot a restarted one can share.
        let peer = |g: &str, index: u32| {
            job.subtasks
                .iter()
                .find(|((t, s), info)| {
                    *s == index
                        && group(*t) == g
                        && !lost.contains(&(*t, *s))
                        && alive.iter().any(|a| a.id == info.tm)
                })
                .map(|(_, info)| info.tm)
        };
        let placed = restart_placement(&lost, group, peer, free);
        let mut per_tm: BTreeMap<TaskManagerId, Vec<(u32, u32)>> = BTreeMap::new();
        for (k, target) in placed {
            let Some(tm) = alive.iter().find(|a| a.id == target) else {
                continue; // restart_placement picks among `alive`
            };
            per_tm.entry(tm.id).or_default().push(k);
            let attempt = job.subtasks.get(&k).map_or(0, |i| i.attempt) + 1;
            job.subtasks.insert(
                k,
                SubtaskInfo {
                    attempt,
                    ..SubtaskInfo::deploying(tm.id)
                },
            );
            if !job.tms.iter().any(|t| t.id == tm.id) {
                job.tms.push(tm.clone());
            }
        }
        let addr: HashMap<TaskManagerId, String> = job
            .tms
            .iter()
            .map(|t| (t.id, t.data_addr.clone()))
            .collect();
        let placement: Vec<Placement> = job
            .subtasks
            .iter()
            .map(|((t, s), i)| Placement {
                task: *t,
                subtask: *s,
                tm: i.tm,
                // A subtask still on a task manager lost meanwhile (its own recovery is
                // queued) has none: task managers take an empty address for a gone peer.
                data_addr: addr.get(&i.tm).cloned().unwrap_or_default(),
                attempt: i.attempt,
            })
            .collect();
        let restored = match job.restored_from {
            Some(n) => match self.store.checkpoints().load(id, n, &lost) {
                Ok(loaded) => Some(loaded),
                Err(e) => {
                    let reason = format!(
                        "DCAS recovery: the deployment's fallback checkpoint {n} cannot be read: {e}"
                    );
                    self.fail_over(id, "checkpoint storage".into(), reason);
                    return;
                }
            },
            None => None,
        };
        self.rewires += 1;
        let rewire = self.rewires;
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        for tm in &job.tms {
            if let Some(subs) = per_tm.get(&tm.id) {
                let _ = tm.tx.send(ToTaskManager::Deploy(Deployment {
                    job: id,
                    generation: job.generation,
                    spec: job.spec_json.clone(),
                    subtasks: subs.clone(),
                    placement: placement.clone(),
                    restore: restored.as_ref().map(|l| l.restore_point(subs)),
                    cache_epoch: job.cache_epoch,
                }));
            }
            let _ = tm.tx.send(ToTaskManager::Rewire {
                job: id,
                generation: job.generation,
                placement: placement.clone(),
                moved: lost.clone(),
                lost: lost_tms.clone(),
                seq: rewire,
            });
        }
        info!(job = %id, subtasks = ?lost, on = ?per_tm.keys().collect::<Vec<_>>(), "DCAS: restarted subtasks deployed.");
        let senders = senders_of(&job.graph, &lost);
        if let Some(e) = job.failovers.last_mut() {
            e.deployed_ms = Some(now_ms());
            // A restarted subtask sends everything it retained again on its own; a survivor
            // rewired to a restarted one waits for its backlog to be logged.
            e.senders.retain(|k, _| !lost.contains(k));
            for k in senders.into_iter().filter(|k| !lost.contains(k)) {
                e.senders.insert(k, rewire);
            }
        }
    }

    fn tick_recovery(&mut self, id: JobId, ctx: &mut Context<Self>) {
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        let Some(r) = &mut job.recovery else {
            return;
        };
        if r.deploying {
            return;
        }
        let stopped = job.subtasks.values().all(SubtaskInfo::stopped);
        if !stopped && r.since.elapsed() < CANCEL_TIMEOUT {
            return;
        }
        if let Some(e) = job.failovers.last_mut() {
            e.canceled_ms.get_or_insert_with(now_ms);
        }
        if r.since.elapsed() < r.delay || Instant::now() < r.next_try {
            return;
        }
        r.deploying = true;
        let rm = self.rm.clone();
        ctx.spawn(
            async move { rm.send(GetAlive).await.unwrap_or_default() }
                .into_actor(self)
                .map(move |alive, act, _| act.redeploy(id, alive)),
        );
    }

    /// Deploys a recovering job again, restored from its newest intact checkpoint.
    fn redeploy(&mut self, id: JobId, alive: Vec<Alive>) {
        let Some(job) = self.jobs.get(&id) else {
            return;
        };
        if job.recovery.is_none() || job.state != JobState::Restarting {
            return;
        }
        let plan = match self.plan(&job.graph, alive, Some(id)) {
            Ok(p) => p,
            Err(reason) => {
                let Some(job) = self.jobs.get_mut(&id) else {
                    return;
                };
                if let Some(r) = &mut job.recovery {
                    r.deploying = false;
                    r.next_try = Instant::now() + Duration::from_secs(1);
                }
                let message = format!("cannot restart yet: {reason}");
                if job.exceptions.last().is_none_or(|e| e.message != message) {
                    warn!(job = %id, reason = %reason, "Waiting for slots to restart the job.");
                    job.exceptions.push(ExceptionView {
                        at: now_ms(),
                        location: "scheduler".into(),
                        message,
                    });
                }
                return;
            }
        };
        let subtasks: Vec<(u32, u32)> = job.subtasks.keys().copied().collect();
        let (loaded, errors) = self.store.checkpoints().load_latest(id, &subtasks);
        if CheckpointingSpec::dcas(job.spec.checkpointing.as_ref()).is_some() {
            // The new deployment's logs and snapshots start clean, under its own names.
            self.cache.do_send(DropEntries {
                prefix: DcasNames::job_prefix(&format!("{id}/g{}", job.generation.0)),
            });
        }
        let generation = Generation(job.generation.0 + 1);
        let spec_json = job.spec_json.clone();
        // Its entries date from now: partitions lost before (the loss that restarted it, or
        // one while it waited for slots) hold none of them and serve it.
        let cache_epoch = self.cache_epoch;
        let (tms, infos, unreachable) = self.deploy(
            id,
            generation,
            cache_epoch,
            &spec_json,
            plan,
            loaded.as_ref(),
        );
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        let restore_errors: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        for e in &restore_errors {
            error!(job = %id, error = %e, "Checkpoint not restorable; trying an older one.");
            job.exceptions.push(ExceptionView {
                at: now_ms(),
                location: "checkpoint storage".into(),
                message: e.clone(),
            });
        }
        let checkpoint = loaded.as_ref().map(|l| l.id);
        info!(job = %id, generation = %generation, checkpoint = ?checkpoint, subtasks = infos.len(), "Job redeployed.");
        job.generation = generation;
        job.cache_epoch = cache_epoch;
        job.subtasks = infos;
        job.tms = tms;
        job.recovery = None;
        if CheckpointingSpec::dcas(job.spec.checkpointing.as_ref()).is_some() {
            job.restored_from = checkpoint;
        }
        if let (Some(c), Some(n)) = (&mut job.coordinator, checkpoint) {
            c.restored_from(n, now_ms());
        }
        if let Some(e) = job.failovers.last_mut() {
            e.deployed_ms = Some(now_ms());
            e.checkpoint = checkpoint;
            e.generation = Some(generation.0);
            e.subtasks_restarted = job.subtasks.len() as u32;
            e.restore_errors = restore_errors;
        }
        if let Some(tm) = unreachable {
            self.fail_over(
                id,
                format!("task manager {tm}"),
                "went away during deployment".into(),
            );
        }
    }
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

/// What `deploy` sent: task managers, subtask infos, and a task manager that could not be
/// reached.
type Deployed = (
    Vec<Alive>,
    BTreeMap<(u32, u32), SubtaskInfo>,
    Option<TaskManagerId>,
);

/// Where every subtask of a job goes: slot `(group, i)` (subtask `i` of every task of slot
/// sharing group `group`, as Flink) on one task manager, slots spread round-robin over the
/// task managers with free slots.
struct Plan {
    placement: Vec<Placement>,
    /// Per task manager: its handle and the (task, subtask) pairs it runs.
    per_tm: Vec<(Alive, Vec<(u32, u32)>)>,
}

impl Dispatcher {
    /// Slots in use per task manager by the subtasks of live jobs, except those `skip`
    /// names (a job being placed, or subtasks being restarted).
    fn used_slots(
        &self,
        skip: impl Fn(JobId, (u32, u32)) -> bool,
    ) -> HashMap<TaskManagerId, usize> {
        let mut used: HashMap<TaskManagerId, usize> = HashMap::new();
        for job in self.jobs.values().filter(|j| !j.state.is_terminal()) {
            let kept = job.subtasks.iter().filter(|(k, _)| !skip(job.id, **k));
            let group = |t: u32| job.graph.tasks[t as usize].slot_group.as_str();
            count_slots(kept, group, &mut used);
        }
        used
    }

    /// Places `graph` on the free slots of `alive`; `Err` says how many slots are missing.
    fn plan(
        &self,
        graph: &JobGraph,
        alive: Vec<Alive>,
        except: Option<JobId>,
    ) -> Result<Plan, String> {
        let slots = graph.slots();
        let groups = slots.len();
        let used = self.used_slots(|job, _| Some(job) == except);
        let mut free: Vec<(Alive, usize)> = alive
            .into_iter()
            .map(|a| {
                let f = (a.slots as usize).saturating_sub(used.get(&a.id).copied().unwrap_or(0));
                (a, f)
            })
            .filter(|(_, f)| *f > 0)
            .collect();
        let total: usize = free.iter().map(|(_, f)| f).sum();
        if total < groups {
            return Err(format!(
                "the job needs {groups} slots (the highest parallelism of each slot sharing group) but only {total} are free on {} alive task managers",
                free.len()
            ));
        }
        let mut group_tm: Vec<usize> = Vec::with_capacity(groups);
        let mut i = 0;
        while group_tm.len() < groups {
            let k = i % free.len();
            if free[k].1 > 0 {
                free[k].1 -= 1;
                group_tm.push(k);
            }
            i += 1;
        }
        let mut placement = Vec::new();
        let mut per_tm: BTreeMap<usize, Vec<(u32, u32)>> = BTreeMap::new();
        for (t, task) in graph.tasks.iter().enumerate() {
            for s in 0..task.parallelism {
                let slot = slots
                    .iter()
                    .position(|(g, i)| *g == task.slot_group && *i == s)
                    .ok_or_else(|| format!("no slot for subtask {t}.{s}"))?;
                let k = group_tm[slot];
                let tm = &free[k].0;
                placement.push(Placement {
                    task: t as u32,
                    subtask: s as u32,
                    tm: tm.id,
                    data_addr: tm.data_addr.clone(),
                    attempt: 0,
                });
                per_tm.entry(k).or_default().push((t as u32, s as u32));
            }
        }
        let per_tm = per_tm
            .into_iter()
            .map(|(k, subs)| (free[k].0.clone(), subs))
            .collect();
        Ok(Plan { placement, per_tm })
    }

    /// Sends the deployments of `plan`; returns the task managers and subtask infos, and a
    /// task manager that could not be reached.
    fn deploy(
        &self,
        job: JobId,
        generation: Generation,
        cache_epoch: u64,
        spec_json: &str,
        plan: Plan,
        restore: Option<&crate::checkpoints::Loaded>,
    ) -> Deployed {
        let mut tms = Vec::new();
        let mut subtasks = BTreeMap::new();
        let mut unreachable = None;
        for (tm, subs) in plan.per_tm {
            for &k in &subs {
                subtasks.insert(k, SubtaskInfo::deploying(tm.id));
            }
            let restore = restore.map(|l| l.restore_point(&subs));
            let d = Deployment {
                job,
                generation,
                spec: spec_json.to_string(),
                subtasks: subs,
                placement: plan.placement.clone(),
                restore,
                cache_epoch,
            };
            if tm.tx.send(ToTaskManager::Deploy(d)).is_err() {
                unreachable = Some(tm.id);
            }
            tms.push(tm);
        }
        (tms, subtasks, unreachable)
    }

    fn start_job(
        &mut self,
        spec: JobSpec,
        spec_json: String,
        graph: JobGraph,
        alive: Vec<Alive>,
    ) -> Result<JobId, SubmitError> {
        let plan = self
            .plan(&graph, alive, None)
            .map_err(SubmitError::NoResources)?;
        let id = JobId::random();
        let generation = Generation(1);
        let cache_epoch = self.cache_epoch;
        let (tms, subtasks, unreachable) =
            self.deploy(id, generation, cache_epoch, &spec_json, plan, None);
        info!(job = %id, name = %spec.name, subtasks = subtasks.len(), taskmanagers = tms.len(), "Job submitted and deployed.");
        let coordinator = CheckpointingSpec::barriers(spec.checkpointing.as_ref()).map(|c| {
            Coordinator::new(
                c.barrier_interval(),
                c.timeout(),
                c.max_concurrent.unwrap_or(1) as usize,
                self.store.checkpoints().last_id(id),
            )
        });
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
            coordinator,
            failovers: Vec::new(),
            restarts: 0,
            collects: HashMap::new(),
            recovery: None,
            restored_from: None,
            cache_epoch,
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
        job.recovery = None;
        if let Some(c) = &mut job.coordinator {
            c.abort_all("the job was canceled");
        }
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
    /// Failure reason when failed; why, when canceled.
    pub message: Option<String>,
}

impl Handler<SubtaskUpdate> for Dispatcher {
    type Result = ();
    fn handle(&mut self, msg: SubtaskUpdate, ctx: &mut Self::Context) {
        self.update_subtask(msg);
        self.recover_soon(ctx);
    }
}

impl Dispatcher {
    /// A subtask's new state: settles the job, or starts its recovery.
    fn update_subtask(&mut self, msg: SubtaskUpdate) {
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
        let location = format!(
            "subtask {}.{} on task manager {}",
            msg.task, msg.subtask, msg.tm
        );
        let active = !matches!(job.state, JobState::Cancelling | JobState::Restarting);
        let why = msg.message.as_deref();
        let cause = if msg.state == SubtaskState::Failed {
            format!("failed: {}", why.unwrap_or("failed"))
        } else {
            // Stopped by its task manager (self-fencing), or by a neighbour gone away.
            let why = why.unwrap_or("no reason given");
            format!("canceled by its task manager ({why})")
        };
        // DCAS restarts a subtask that failed, and one its task manager canceled: that
        // manager fenced itself (no heartbeat acknowledged in time) while its connection
        // stayed up, so no loss follows. The job manager's own cancels come only while the
        // job is cancelling, ended or restarting whole.
        let by_tm = msg.state == SubtaskState::Canceled
            && job.recovery.is_none()
            && !job.state.is_terminal();
        if (msg.state == SubtaskState::Failed || by_tm)
            && CheckpointingSpec::dcas(job.spec.checkpointing.as_ref()).is_some()
            && job.state != JobState::Cancelling
        {
            self.dcas_recover(
                msg.job,
                vec![(msg.task, msg.subtask)],
                Vec::new(),
                location,
                cause,
            );
            return;
        }
        if msg.state == SubtaskState::Failed && active {
            self.fail_over(msg.job, location, cause);
            return;
        }
        if msg.state == SubtaskState::Canceled
            && active
            && CheckpointingSpec::abs(job.spec.checkpointing.as_ref()).is_some()
        {
            self.fail_over_on(msg.job, location, cause, true);
            return;
        }
        self.settle(msg.job);
    }
}

/// Records from a collect sink.
#[derive(Message)]
#[rtype(result = "()")]
pub struct CollectedOutput {
    /// Sending task manager.
    pub tm: TaskManagerId,
    /// Job.
    pub job: JobId,
    /// Deployment.
    pub generation: Generation,
    /// Collect operator.
    pub operator: String,
    /// Subtask.
    pub subtask: u32,
    /// Committing checkpoint (exactly-once sinks).
    pub epoch: Option<u64>,
    /// Part of the delivery (0, 1, ...; parts arrive in order).
    pub part: u32,
    /// The delivery's final part.
    pub last: bool,
    /// Records.
    pub records: Vec<Record>,
}

/// What becomes of one part of an epoch's collected output.
#[derive(Debug, PartialEq)]
struct PartFate {
    /// Its records are new: add them.
    take: bool,
    /// It ends the delivery and every part is here: tell the sink it may forget the epoch.
    confirm: bool,
}

/// What the job manager took of one collect subtask's epochs, which it delivers in order:
/// every epoch up to `done` whole, and the parts of the one being delivered. Its size stays
/// fixed however long the job runs.
#[derive(Debug, Default)]
struct CollectProgress {
    /// Every epoch up to this one was taken whole.
    done: Option<u64>,
    /// The epoch being delivered and how many of its parts were taken.
    open: Option<(u64, u32)>,
}

impl CollectProgress {
    /// The fate of part `part` of epoch `epoch` (`last`: the delivery's final part), or
    /// `None` when it is out of order (neither taken nor confirmed): a part beyond the next,
    /// or another epoch while one is only partly taken. A restored sink delivers its epochs
    /// again from its snapshot, oldest first, so neither happens on in-order connections.
    fn accept(&mut self, epoch: u64, part: u32, last: bool) -> Option<PartFate> {
        if self.done.is_some_and(|d| epoch <= d) {
            // Taken whole before; its confirmation may have been lost.
            return Some(PartFate {
                take: false,
                confirm: last,
            });
        }
        let parts = match &mut self.open {
            Some((e, parts)) if *e == epoch => parts,
            Some(_) => return None,
            None => &mut self.open.insert((epoch, 0)).1,
        };
        if part > *parts {
            return None;
        }
        let fate = accept_part(parts, part, last);
        if fate.confirm {
            self.done = Some(epoch);
            self.open = None;
        }
        Some(fate)
    }
}

/// The fate of part `part` (`last`: the delivery's final one) of an epoch's collected
/// output, given `parts` taken so far (counted up when it is taken). An epoch delivered
/// again after a restore comes in the same parts, so those already taken are dropped and
/// the rest of an interrupted delivery is taken; a part beyond the next would mean one was
/// lost, which an in-order connection does not do, and is neither taken nor confirmed.
fn accept_part(parts: &mut u32, part: u32, last: bool) -> PartFate {
    let take = part == *parts;
    // Not `*parts += u32::from(take)`: rustc 1.95 at opt-level 2 drops that increment once
    // inlined (rust-lang/rust#158206, seen here in this function's test).
    if take {
        *parts += 1;
    }
    PartFate {
        take,
        confirm: last && part < *parts,
    }
}

impl Handler<CollectedOutput> for Dispatcher {
    type Result = ();
    fn handle(&mut self, msg: CollectedOutput, _ctx: &mut Self::Context) {
        let limit = self.collect_limit;
        let Some(job) = self.jobs.get_mut(&msg.job) else {
            return;
        };
        // A task manager declared dead (and left the job) may still deliver once it resumes:
        // its subtasks were restarted elsewhere, so its output is fenced off.
        if job.generation != msg.generation || !job.tms.iter().any(|t| t.id == msg.tm) {
            return;
        }
        let mut records = msg.records;
        if let Some(epoch) = msg.epoch {
            let progress = job
                .collects
                .entry((msg.operator.clone(), msg.subtask))
                .or_default();
            let Some(fate) = progress.accept(epoch, msg.part, msg.last) else {
                warn!(job = %msg.job, operator = %msg.operator, subtask = msg.subtask, epoch, part = msg.part, ?progress, "Collected output out of order dropped.");
                return;
            };
            if !fate.take {
                records.clear();
            }
            if fate.confirm {
                if let Some(tm) = job.tms.iter().find(|t| t.id == msg.tm) {
                    let _ = tm.tx.send(ToTaskManager::CollectTaken {
                        job: msg.job,
                        generation: msg.generation,
                        operator: msg.operator.clone(),
                        subtask: msg.subtask,
                        epoch,
                    });
                }
            }
        }
        let out = job.collected.entry(msg.operator).or_default();
        let room = limit.saturating_sub(out.len());
        job.dropped += records.len().saturating_sub(room) as u64;
        out.extend(records.into_iter().take(room));
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
                    info.raw_rate_in = rate(r.records_in, prev.records_in);
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
            keep_newest(&mut info.lag_samples, &r.lag_samples);
            keep_newest(&mut info.marker_samples, &r.marker_samples);
            info.last = Some((now, r));
        }
        let ids: Vec<JobId> = self.jobs.keys().copied().collect();
        for id in ids {
            self.track_recovery(id);
        }
    }
}

impl Dispatcher {
    /// Marks the first record and the catch-up of the job's latest recovery, at the times
    /// the task managers sampled them where they tell (not when a heartbeat arrived).
    fn track_recovery(&mut self, id: JobId) {
        let Some(job) = self.jobs.get(&id) else {
            return;
        };
        let Some(last) = job.failovers.last() else {
            return;
        };
        if last.deployed_ms.is_none() || last.caught_up_ms.is_some() || job.recovery.is_some() {
            return;
        }
        let since = last.detected_ms;
        // Unsmoothed, so catching up is not hidden behind the dashboard's smoothing.
        let rate: f64 = job.sources().map(|i| i.raw_rate_in).sum();
        let lag = job.source_lag();
        // DCAS: only the restarted subtasks started over; they count once they have
        // restored their snapshot and replayed their log.
        let resumed: Vec<&SubtaskReport> = last
            .restarted
            .iter()
            .filter_map(|k| job.subtasks.get(k)?.last.as_ref().map(|(_, r)| r))
            .filter(|r| r.resumed_ms >= since)
            .collect();
        let replayed =
            (!last.restarted.is_empty() && resumed.len() == last.restarted.len()).then(|| {
                let at = resumed.iter().map(|r| r.resumed_ms).max().unwrap_or(0);
                let sum = |f: fn(&SubtaskReport) -> u64| resumed.iter().map(|r| f(r)).sum::<u64>();
                (at, sum(|r| r.replayed), sum(|r| r.snapshot_links))
            });
        // Sources still reading: a finished one has nothing left to catch up on.
        let sources: Vec<&VecDeque<(u64, u64)>> = job
            .sources()
            .filter(|i| !matches!(i.state, SubtaskState::Finishing | SubtaskState::Finished))
            .map(|i| &i.lag_samples)
            .collect();
        let first_poll = sources
            .iter()
            .filter_map(|s| s.iter().map(|&(at, _)| at).find(|&at| at >= since))
            .min();
        // As close to their input as before the failure, or within 50 ms of input (at the
        // rate before it).
        let threshold = (2 * last.pre_failure_lag.unwrap_or(0))
            .max((0.05 * last.pre_failure_rate) as u64)
            .max(100);
        let within = within_lag(&sources, since, threshold);
        let backlogs = job.backlogs_logged(&last.senders);
        // The first record after the restore. DCAS: the survivors never stopped; the
        // restarted subtasks process live input once replayed (a subtask behind a window
        // may see its first record only when the window fires, which is not part of the
        // recovery). ABS: the sources' first poll, when they sample their lag; else the
        // first report of a record read.
        let first_record = if !last.restarted.is_empty() {
            replayed.map(|(at, _, _)| at)
        } else if last.pre_failure_lag.is_some() && !sources.is_empty() {
            first_poll
        } else {
            let read = |i: &SubtaskInfo| i.last.as_ref().is_some_and(|(_, r)| r.records_in > 0);
            job.subtasks.values().any(read).then(now_ms)
        };
        let Some(e) = self.jobs.get_mut(&id).and_then(|j| j.failovers.last_mut()) else {
            return;
        };
        if let (None, Some((at, n, links))) = (e.replayed_ms, replayed) {
            e.replayed_ms = Some(at);
            e.log_replayed = n;
            e.snapshot_links = links;
        }
        if let (None, Some(at)) = (e.first_record_ms, first_record) {
            e.first_record_ms = Some(at);
        }
        // Caught up: the sources are within the threshold of their input (by their lag
        // samples, when they tell their lag), and every restarted subtask logged the backlog
        // its surviving senders kept for it.
        // A source that cannot tell its lag yet (a restarted Kafka consumer before its first
        // statistics, a second after it starts) is waited for; past a grace period the rate
        // rule decides, at the heartbeat. A generator knows its lag from its first poll.
        // When the lag was unknown before the failure (a Kafka consumer killed before its
        // first statistics), a lag known now decides as well as the rate: a failure during
        // a backlog drain has a rate before it that the live input never reaches again.
        let by_rate = (rate >= 0.9 * e.pre_failure_rate).then(now_ms);
        let sources_at = sources_caught_up(
            e.pre_failure_lag.is_some(),
            lag.is_some(),
            within,
            by_rate,
            e.replayed_ms,
        );
        if let (None, Some(first), Some(sources_at), Some(backlogs)) = (
            e.inputs_caught_up_ms,
            e.first_record_ms,
            sources_at,
            backlogs,
        ) {
            e.inputs_caught_up_ms = Some(first.max(sources_at).max(backlogs));
        }
        // Then the data sent from then on goes through every queue to every sink about as
        // fast as before the failure.
        let (Some(inputs), before) = (e.inputs_caught_up_ms, e.pre_failure_latency_ms) else {
            return;
        };
        let sinks = self
            .jobs
            .get(&id)
            .map(Job::sink_markers)
            .unwrap_or_default();
        let Some(at) = latency_normal(&sinks, inputs, before) else {
            return;
        };
        let Some(e) = self.jobs.get_mut(&id).and_then(|j| j.failovers.last_mut()) else {
            return;
        };
        e.caught_up_ms = Some(at);
        info!(job = %id, attempt = e.attempt, recovery_ms = at.saturating_sub(e.detected_ms), inputs_ms = inputs.saturating_sub(e.detected_ms), "Job caught up after recovery.");
    }
}

/// The subtasks that send to any of `subtasks` (over any edge into their tasks).
fn senders_of(graph: &JobGraph, subtasks: &[(u32, u32)]) -> BTreeSet<(u32, u32)> {
    let mut senders = BTreeSet::new();
    for &(t, s) in subtasks {
        for e in graph.edges.iter().filter(|e| e.to == t as usize) {
            for from in edge_sources(graph, e, s as usize) {
                senders.insert((e.from as u32, from as u32));
            }
        }
    }
    senders
}

/// The span of latency markers a sink's latency is taken over.
const LATENCY_WINDOW_MS: u64 = 1_000;

/// The median of `values`; `None` when empty.
fn median(mut values: Vec<u64>) -> Option<u64> {
    values.sort_unstable();
    values.get(values.len() / 2).copied()
}

/// The level a sink's latency settled at, by its markers sent at `from` or later
/// (arrival, origin): the median age over the latest [`LATENCY_WINDOW_MS`] of them, once
/// they span two such windows and the latest is no lower than the one before (the latency
/// stopped falling: no backlog still drains). `None` before.
fn settled_latency(samples: &VecDeque<(u64, u64)>, from: u64) -> Option<u64> {
    let sent: Vec<(u64, u64)> = samples
        .iter()
        .filter(|&&(_, origin)| origin >= from)
        .map(|&(at, origin)| (origin, at.saturating_sub(origin)))
        .collect();
    let &(last, _) = sent.last()?;
    let (first, _) = sent[0];
    if last < first + 2 * LATENCY_WINDOW_MS {
        return None;
    }
    let window = |lo: u64, hi: u64| {
        let ages = sent.iter().filter(|&&(o, _)| o > lo && o <= hi);
        median(ages.map(|&(_, age)| age).collect())
    };
    let latest = window(last - LATENCY_WINDOW_MS, last)?;
    let before = window(last - 2 * LATENCY_WINDOW_MS, last - LATENCY_WINDOW_MS)?;
    (latest + engine::runtime::task::MARKER_EVERY_MS >= before).then_some(latest)
}

/// From when the sinks' latency was back to normal, by their latency markers (arrival,
/// origin; ms since the epoch): per sink, the first marker sent at `since` or later that
/// arrived within twice the normal latency plus the markers' spacing — the data behind it
/// went through every queue of the job about as fast as usual — and the latest such origin
/// over sinks. Normal is `before` (the sinks' latency before the failure) or, when higher,
/// the level the sink's latency settled at after `since` ([`settled_latency`]: a restarted
/// subtask whose channels now cross the network). With neither, the first marker sent at
/// `since` or later counts when it arrived. `None` while a sink has none; no sinks:
/// `since`.
fn latency_normal(sinks: &[&VecDeque<(u64, u64)>], since: u64, before: Option<u64>) -> Option<u64> {
    let age = |&(at, origin): &(u64, u64)| at.saturating_sub(origin);
    sinks.iter().try_fold(since, |latest, samples| {
        let normal = before.max(settled_latency(samples, since));
        let bound = normal.map(|n| 2 * n + engine::runtime::task::MARKER_EVERY_MS);
        let within = |s: &&(u64, u64)| s.1 >= since && bound.is_none_or(|b| age(s) <= b);
        let &(at, origin) = samples.iter().find(within)?;
        Some(latest.max(if normal.is_some() { origin } else { at }))
    })
}

/// When the sources caught up with their input after a failure: by their lag samples
/// (`within`) when they knew their lag before it and know it now; by their rate (`by_rate`,
/// now, when it is back to 90% of the rate before) when they do not know it yet, once
/// `LAG_UNKNOWN_GRACE_MS` passed after the replay; and by either when the lag was unknown
/// before the failure but is known now.
fn sources_caught_up(
    lag_before: bool,
    lag_now: bool,
    within: Option<u64>,
    by_rate: Option<u64>,
    replayed_ms: Option<u64>,
) -> Option<u64> {
    match (lag_before, lag_now) {
        (true, true) => within,
        (true, false) => {
            by_rate.filter(|&now| replayed_ms.is_some_and(|r| now >= r + LAG_UNKNOWN_GRACE_MS))
        }
        (false, true) => within.or(by_rate),
        (false, false) => by_rate,
    }
}

/// When the sources, their lags summed, came within `threshold` records of their input
/// after `since` and stayed there, by their lag samples (ms since the epoch, records);
/// `None` while a source has no sample since then or they are further behind. No sources:
/// `since`.
fn within_lag(sources: &[&VecDeque<(u64, u64)>], since: u64, threshold: u64) -> Option<u64> {
    let mut samples: Vec<(u64, usize, u64)> = sources
        .iter()
        .enumerate()
        .flat_map(|(i, s)| {
            s.iter()
                .filter(|&&(at, _)| at >= since)
                .map(move |&(at, lag)| (at, i, lag))
        })
        .collect();
    samples.sort_unstable();
    let mut latest: Vec<Option<u64>> = vec![None; sources.len()];
    let (mut sum, mut known) = (0u64, 0);
    let mut within = sources.is_empty().then_some(since);
    for (at, i, lag) in samples {
        match latest[i].replace(lag) {
            Some(before) => sum -= before,
            None => known += 1,
        }
        sum += lag;
        if known == sources.len() && sum <= threshold {
            within.get_or_insert(at);
        } else {
            within = None;
        }
    }
    within
}

/// A subtask's state for a checkpoint (from a control connection).
#[derive(Message)]
#[rtype(result = "()")]
pub struct CheckpointAcked {
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
    /// Checkpoint.
    pub checkpoint: u64,
    /// Alignment time.
    pub alignment_us: u64,
    /// Synchronous copy time.
    pub sync_ms: u64,
    /// The state.
    pub operators: Vec<OperatorState>,
}

impl Handler<CheckpointAcked> for Dispatcher {
    type Result = ();
    fn handle(&mut self, msg: CheckpointAcked, _ctx: &mut Self::Context) {
        let store = self.store.checkpoints().clone();
        let Some(job) = self.jobs.get_mut(&msg.job) else {
            return;
        };
        if job.generation != msg.generation || job.recovery.is_some() {
            return;
        }
        let Some(c) = &mut job.coordinator else {
            return;
        };
        if !c.expects(msg.checkpoint, msg.task, msg.subtask) {
            return;
        }
        let bytes = match store.put_state(
            msg.job,
            msg.checkpoint,
            msg.task,
            msg.subtask,
            &msg.operators,
        ) {
            Ok(b) => b,
            Err(e) => {
                // The checkpoint then expires; the job keeps running.
                error!(job = %msg.job, checkpoint = msg.checkpoint, error = %e, "Could not store checkpoint state.");
                return;
            }
        };
        if let Some(step) = c.ack(
            msg.checkpoint,
            msg.task,
            msg.subtask,
            bytes,
            msg.alignment_us,
            msg.sync_ms,
        ) {
            self.apply(msg.job, vec![step]);
        }
    }
}

/// A job's checkpoints; `None` for an unknown job.
#[derive(Message)]
#[rtype(result = "Option<CheckpointsView>")]
pub struct GetCheckpoints(pub JobId);

impl Handler<GetCheckpoints> for Dispatcher {
    type Result = MessageResult<GetCheckpoints>;
    fn handle(&mut self, msg: GetCheckpoints, _ctx: &mut Self::Context) -> Self::Result {
        MessageResult(self.jobs.get(&msg.0).map(|j| match &j.coordinator {
            Some(c) => c.view(),
            None => Coordinator::new(Duration::ZERO, Duration::ZERO, 1, 0).view(),
        }))
    }
}

/// Why a checkpoint cannot be triggered.
#[derive(Debug)]
pub enum TriggerError {
    /// No such job.
    Unknown,
    /// The job does not take ABS checkpoints, or is not running.
    Refused(String),
}

/// Trigger a checkpoint now (REST).
#[derive(Message)]
#[rtype(result = "Result<u64, TriggerError>")]
pub struct TriggerCheckpoint(pub JobId);

impl Handler<TriggerCheckpoint> for Dispatcher {
    type Result = Result<u64, TriggerError>;
    fn handle(&mut self, msg: TriggerCheckpoint, _ctx: &mut Self::Context) -> Self::Result {
        let job = self.jobs.get_mut(&msg.0).ok_or(TriggerError::Unknown)?;
        let running = job.state == JobState::Running
            && job
                .subtasks
                .values()
                .all(|i| i.state == SubtaskState::Running);
        let subtasks: Vec<(u32, u32)> = job.subtasks.keys().copied().collect();
        let c = job
            .coordinator
            .as_mut()
            .ok_or_else(|| TriggerError::Refused("the job does not take ABS checkpoints".into()))?;
        if !running {
            return Err(TriggerError::Refused(format!(
                "the job is {:?}, not running with every subtask running",
                job.state
            )));
        }
        let step = c.trigger(now_ms(), &subtasks, "manual", false);
        let Step::Trigger { id, .. } = step else {
            return Err(TriggerError::Refused("not triggered".into()));
        };
        self.apply(msg.0, vec![step]);
        Ok(id)
    }
}

/// A job's recoveries; `None` for an unknown job.
#[derive(Message)]
#[rtype(result = "Option<Vec<FailoverEvent>>")]
pub struct GetFailovers(pub JobId);

impl Handler<GetFailovers> for Dispatcher {
    type Result = MessageResult<GetFailovers>;
    fn handle(&mut self, msg: GetFailovers, _ctx: &mut Self::Context) -> Self::Result {
        MessageResult(self.jobs.get(&msg.0).map(|j| j.failovers.clone()))
    }
}

/// Why a subtask could not be killed.
#[derive(Debug)]
pub enum KillError {
    /// No such job or subtask (HTTP 404).
    Unknown(String),
    /// Not running (HTTP 409).
    NotRunning(String),
}

/// Fail one subtask of a running job, as its crash would (REST, dashboard).
#[derive(Message)]
#[rtype(result = "Result<TaskManagerId, KillError>")]
pub struct KillSubtask {
    /// The job.
    pub job: JobId,
    /// The task.
    pub task: u32,
    /// The subtask.
    pub subtask: u32,
}

impl Handler<KillSubtask> for Dispatcher {
    type Result = Result<TaskManagerId, KillError>;
    fn handle(&mut self, msg: KillSubtask, _ctx: &mut Self::Context) -> Self::Result {
        let job = self
            .jobs
            .get(&msg.job)
            .ok_or_else(|| KillError::Unknown(format!("no running job '{}'", msg.job)))?;
        let info = job.subtasks.get(&(msg.task, msg.subtask)).ok_or_else(|| {
            KillError::Unknown(format!(
                "job '{}' has no subtask {}.{}",
                msg.job, msg.task, msg.subtask
            ))
        })?;
        if job.state != JobState::Running || info.state != SubtaskState::Running {
            return Err(KillError::NotRunning(format!(
                "subtask {}.{} is {:?} in a {:?} job",
                msg.task, msg.subtask, info.state, job.state
            )));
        }
        let tm =
            job.tms.iter().find(|t| t.id == info.tm).ok_or_else(|| {
                KillError::NotRunning(format!("task manager {} is gone", info.tm))
            })?;
        warn!(job = %msg.job, task = msg.task, subtask = msg.subtask, tm = %info.tm, "Killing a subtask on request.");
        let _ = tm.tx.send(ToTaskManager::KillSubtask {
            job: msg.job,
            generation: job.generation,
            task: msg.task,
            subtask: msg.subtask,
        });
        let killed = info.tm;
        if CheckpointingSpec::dcas(job.spec.checkpointing.as_ref()).is_some() {
            // DCAS restarts only that subtask, when it reports its failure; its neighbours
            // detach their channels and wait for it.
            return Ok(killed);
        }
        // Recover now, naming the kill as the cause: the reports that follow (the subtask's
        // own, its neighbours' broken channels) arrive in any order and are only symptoms.
        self.fail_over(
            msg.job,
            format!(
                "subtask {}.{} on task manager {killed}",
                msg.task, msg.subtask
            ),
            "killed on request".into(),
        );
        Ok(killed)
    }
}

/// A subtask of a live job and where it runs (task manager pages).
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct PlacedSubtask {
    /// Job id.
    pub job: String,
    /// Job name.
    pub job_name: String,
    /// Task index.
    pub task: u32,
    /// Task name (its chained operators).
    pub task_name: String,
    /// Subtask index.
    pub subtask: u32,
    /// DEPLOYING, RUNNING, FINISHED, FAILED or CANCELED.
    #[schema(value_type = String)]
    pub state: SubtaskState,
    /// The task manager it runs on.
    pub taskmanager: String,
    /// Records read per second.
    pub records_in_per_sec: f64,
}

/// Where the live jobs run.
#[derive(Default)]
pub struct Placements {
    /// Slots in use per task manager.
    pub used_slots: HashMap<TaskManagerId, usize>,
    /// Every subtask of every live job.
    pub subtasks: Vec<PlacedSubtask>,
}

/// Where the live jobs run (REST).
#[derive(Message)]
#[rtype(result = "Placements")]
pub struct GetPlacements;

impl Handler<GetPlacements> for Dispatcher {
    type Result = MessageResult<GetPlacements>;
    fn handle(&mut self, _msg: GetPlacements, _ctx: &mut Self::Context) -> Self::Result {
        let subtasks = self
            .jobs
            .values()
            .filter(|j| !j.state.is_terminal())
            .flat_map(|j| {
                j.subtasks.iter().map(|((t, s), i)| PlacedSubtask {
                    job: j.id.to_string(),
                    job_name: j.spec.name.clone(),
                    task: *t,
                    task_name: j.graph.tasks[*t as usize].name.clone(),
                    subtask: *s,
                    state: i.state,
                    taskmanager: i.tm.to_string(),
                    records_in_per_sec: i.rate_in,
                })
            })
            .collect();
        MessageResult(Placements {
            used_slots: self.used_slots(|_, _| false),
            subtasks,
        })
    }
}

impl Handler<CacheEpoch> for Dispatcher {
    type Result = ();
    fn handle(&mut self, msg: CacheEpoch, _ctx: &mut Self::Context) {
        self.cache_epoch = self.cache_epoch.max(msg.0);
    }
}

/// The oldest cache epoch a running DCAS deployment dates from (none: no DCAS job runs):
/// cache losses at or before it can be forgotten, no running deployment had entries there.
#[derive(Message)]
#[rtype(result = "Option<u64>")]
pub struct OldestCacheEpoch;

impl Handler<OldestCacheEpoch> for Dispatcher {
    type Result = Option<u64>;
    fn handle(&mut self, _msg: OldestCacheEpoch, _ctx: &mut Self::Context) -> Option<u64> {
        self.jobs
            .values()
            .filter(|j| {
                !j.state.is_terminal()
                    && CheckpointingSpec::dcas(j.spec.checkpointing.as_ref()).is_some()
            })
            .map(|j| j.cache_epoch)
            .min()
    }
}

impl Handler<TaskManagerLost> for Dispatcher {
    type Result = ();
    fn handle(&mut self, msg: TaskManagerLost, ctx: &mut Self::Context) {
        self.task_manager_lost(msg);
        self.recover_soon(ctx);
    }
}

impl Dispatcher {
    /// Recovers every job that ran on a lost task manager.
    fn task_manager_lost(&mut self, msg: TaskManagerLost) {
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
            if CheckpointingSpec::dcas(job.spec.checkpointing.as_ref()).is_some() {
                // A finished subtask (after the final fallback checkpoint) is done.
                let lost: Vec<(u32, u32)> = job
                    .subtasks
                    .iter()
                    .filter(|(_, i)| i.tm == msg.tm && i.state != SubtaskState::Finished)
                    .map(|(k, _)| *k)
                    .collect();
                self.dcas_recover(
                    id,
                    lost,
                    vec![msg.tm],
                    format!("task manager {}", msg.tm),
                    format!("was lost ({})", msg.reason),
                );
                continue;
            }
            for info in job.subtasks.values_mut().filter(|i| i.tm == msg.tm) {
                if !matches!(info.state, SubtaskState::Finished | SubtaskState::Canceled) {
                    info.state = SubtaskState::Failed;
                }
            }
            self.fail_over(
                id,
                format!("task manager {}", msg.tm),
                format!("was lost ({})", msg.reason),
            );
        }
    }
}

/// Test only: keeps the dispatcher's thread busy, as a slow disk under a flush would.
#[cfg(test)]
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Stall(pub Duration);

#[cfg(test)]
impl Handler<Stall> for Dispatcher {
    type Result = ();
    fn handle(&mut self, msg: Stall, _ctx: &mut Self::Context) {
        std::thread::sleep(msg.0);
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

/// Adds to `used` the slots that `subtasks` of one job hold on each task manager: the
/// subtasks of one slot-sharing group with the same index share a slot.
fn count_slots<'a, 'g>(
    subtasks: impl Iterator<Item = (&'a (u32, u32), &'a SubtaskInfo)>,
    group: impl Fn(u32) -> &'g str,
    used: &mut HashMap<TaskManagerId, usize>,
) {
    let mut per_tm: HashMap<TaskManagerId, HashSet<(&'g str, u32)>> = HashMap::new();
    for ((t, s), i) in subtasks {
        per_tm.entry(i.tm).or_default().insert((group(*t), *s));
    }
    for (tm, slots) in per_tm {
        *used.entry(tm).or_default() += slots.len();
    }
}

/// Where each restarted subtask goes. Restarted subtasks that share a slot (one slot group,
/// one index) stay together: beside a kept peer on an alive task manager (`peer`), whose slot
/// they share at no cost, or else in one slot `restart_targets` picks from `free`.
fn restart_placement<'a>(
    lost: &[(u32, u32)],
    group: impl Fn(u32) -> &'a str,
    peer: impl Fn(&str, u32) -> Option<TaskManagerId>,
    free: Vec<(TaskManagerId, i64)>,
) -> Vec<((u32, u32), TaskManagerId)> {
    let mut slots: BTreeMap<(&str, u32), Vec<(u32, u32)>> = BTreeMap::new();
    for &(t, s) in lost {
        slots.entry((group(t), s)).or_default().push((t, s));
    }
    let mut placed = Vec::with_capacity(lost.len());
    let mut unshared = Vec::new();
    for ((g, s), subtasks) in slots {
        match peer(g, s) {
            Some(tm) => placed.extend(subtasks.into_iter().map(|k| (k, tm))),
            None => unshared.push(subtasks),
        }
    }
    let targets = restart_targets(free, unshared.len());
    for (subtasks, tm) in unshared.into_iter().zip(targets) {
        placed.extend(subtasks.into_iter().map(|k| (k, tm)));
    }
    placed
}

/// A task manager for each of `n` slots of restarted subtasks, given each alive one's free slots
/// (negative: overcommitted): a free slot first, the most free first, then the least
/// loaded, spreading over equally loaded ones. Empty when no task manager is given.
fn restart_targets(mut free: Vec<(TaskManagerId, i64)>, n: usize) -> Vec<TaskManagerId> {
    let mut targets = Vec::with_capacity(n);
    for _ in 0..n {
        // Stable: ties keep the order given.
        free.sort_by_key(|(_, f)| -f);
        let Some((tm, f)) = free.first_mut() else {
            break;
        };
        *f -= 1;
        targets.push(*tm);
        // Among equally loaded ones, the others come first next time.
        free.rotate_left(1);
    }
    targets
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap, VecDeque};
    use std::time::Duration;

    use engine::ids::TaskManagerId;

    use super::{
        accept_part, count_slots, keep_newest, latency_normal, restart_placement, restart_targets,
        sources_caught_up, within_lag, CollectProgress, PartFate, SubtaskInfo, LAG_SAMPLES_KEPT,
        LAG_UNKNOWN_GRACE_MS,
    };

    /// Ensures a failure during a backlog drain, before the sources knew their lag, ends
    /// once they are at their input: the rate before it (the drain) never comes back. The
    /// lag, once known, decides; until then only the rate can.
    #[test]
    fn sources_at_their_input_catch_up_whatever_the_rate_before() {
        let (within, slow, replayed) = (Some(1_050), None, Some(1_000));
        assert_eq!(
            sources_caught_up(false, true, within, slow, replayed),
            within
        );
        assert_eq!(
            sources_caught_up(false, true, None, Some(7), replayed),
            Some(7)
        );
        assert_eq!(
            sources_caught_up(false, false, within, slow, replayed),
            None
        );
        assert_eq!(
            sources_caught_up(false, false, None, Some(7), replayed),
            Some(7)
        );
        // Known before and now: only the lag decides.
        assert_eq!(sources_caught_up(true, true, None, Some(7), replayed), None);
        assert_eq!(
            sources_caught_up(true, true, within, slow, replayed),
            within
        );
        // Known before, not yet now: the rate decides after the grace period.
        let grace = 1_000 + LAG_UNKNOWN_GRACE_MS;
        assert_eq!(
            sources_caught_up(true, false, within, Some(grace - 1), replayed),
            None
        );
        assert_eq!(
            sources_caught_up(true, false, within, Some(grace), replayed),
            Some(grace)
        );
    }

    /// An ABS failover first reported by a symptom (a neighbour's downstream channel closed)
    /// names the lost task manager once its loss arrives.
    #[test]
    fn a_failover_names_its_root_cause_when_a_symptom_came_first() {
        use actix::Actor;
        use engine::ids::Generation;
        use engine::protocol::control::SubtaskState;

        use super::{Dispatcher, SubtaskUpdate};
        use crate::cache_master::CacheMaster;
        use crate::resource_manager::{Alive, ResourceManager, TaskManagerLost};
        use crate::store::Store;

        actix::System::new().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let rm = ResourceManager::new(Duration::from_secs(1), Default::default()).start();
            let cache = CacheMaster::new(8, 1, 2).start();
            let mut d = Dispatcher::new(rm, cache, Store::open(dir.path()).unwrap(), 100);
            let json = r#"{"name":"w","checkpointing":{"mode":"abs","interval_ms":1000},
                "operators":[
                {"id":"g","kind":"generator","parallelism":2,"params":{"count":10}},
                {"id":"out","kind":"collect","input":"g","parallelism":2}]}"#;
            let spec = engine::spec::JobSpec::from_json(json).unwrap();
            let graph = engine::graph::JobGraph::build(&spec, &jobs::registry()).unwrap();
            let mut receivers = Vec::new();
            let alive: Vec<Alive> = [1, 2]
                .map(|i| {
                    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                    receivers.push(rx);
                    Alive {
                        id: TaskManagerId(i),
                        slots: 1,
                        data_addr: format!("127.0.0.1:{i}"),
                        tx,
                    }
                })
                .into();
            let id = d.start_job(spec, json.into(), graph, alive).unwrap();
            let on = |tm: TaskManagerId| {
                let (&(task, subtask), _) = d.jobs[&id]
                    .subtasks
                    .iter()
                    .find(|(_, i)| i.tm == tm)
                    .unwrap();
                SubtaskUpdate {
                    tm,
                    job: id,
                    generation: Generation(1),
                    task,
                    subtask,
                    state: SubtaskState::Canceled,
                    message: Some("a downstream channel closed".into()),
                }
            };
            let [a, b] = [1, 2].map(TaskManagerId);
            let symptom = on(a);
            d.update_subtask(symptom);
            let cause = |d: &Dispatcher| d.jobs[&id].failovers.last().unwrap().cause.clone();
            assert!(
                cause(&d).contains("a downstream channel closed"),
                "{}",
                cause(&d)
            );
            d.task_manager_lost(TaskManagerLost {
                tm: b,
                reason: "connection closed".into(),
            });
            let root = cause(&d);
            assert!(
                root.starts_with(&format!("task manager {b}: was lost")),
                "{root}"
            );
            assert!(root.contains("first seen as"), "{root}");
            assert_eq!(d.jobs[&id].failovers.len(), 1, "one recovery");
        });
    }

    /// Ensures restarted subtasks that share a slot restart together (beside a kept peer
    /// when one is alive, else in one slot), that the others take free slots first, and that
    /// a restarted subtask's own slot counts as free for the restart.
    #[test]
    fn restarted_subtasks_share_slots_and_take_free_ones_first() {
        let [a, b, c, d] = [1, 2, 3, 4].map(TaskManagerId);
        // Tasks 0 and 1 each have a slot group of their own; tasks 2 and 3 share one.
        let group = |t: u32| match t {
            0 => "t0",
            1 => "t1",
            _ => "shared",
        };
        let place = |on: &[((u32, u32), TaskManagerId)]| -> BTreeMap<(u32, u32), SubtaskInfo> {
            on.iter()
                .map(|&(k, tm)| (k, SubtaskInfo::deploying(tm)))
                .collect()
        };
        // One slot each on a, c and d (b is lost); what is left free once `lost` restart.
        let free = |subtasks: &BTreeMap<(u32, u32), SubtaskInfo>, lost: &[(u32, u32)]| {
            let mut used = HashMap::new();
            let kept = subtasks.iter().filter(|(k, _)| !lost.contains(*k));
            count_slots(kept, group, &mut used);
            [a, c, d].map(|tm| (tm, 1 - used.get(&tm).copied().unwrap_or(0) as i64))
        };
        let peer = |subtasks: &BTreeMap<(u32, u32), SubtaskInfo>, lost: &[(u32, u32)]| {
            let kept: Vec<((u32, u32), TaskManagerId)> = subtasks
                .iter()
                .filter(|(k, i)| !lost.contains(*k) && i.tm != b)
                .map(|(k, i)| (*k, i.tm))
                .collect();
            move |g: &str, index: u32| {
                kept.iter()
                    .find(|((t, s), _)| *s == index && group(*t) == g)
                    .map(|(_, tm)| *tm)
            }
        };
        let run = |subtasks: &BTreeMap<(u32, u32), SubtaskInfo>, lost: &[(u32, u32)]| {
            let free = free(subtasks, lost).to_vec();
            let placed = restart_placement(lost, group, peer(subtasks, lost), free);
            placed.into_iter().collect::<BTreeMap<_, _>>()
        };

        // (1,0) ran on the lost b; (2,0), on c, failed (wired to it). (3,0) keeps c's shared
        // slot, so (2,0) restarts beside it, and (1,0) takes d's free slot, not busy a.
        let shared = place(&[((0, 0), a), ((1, 0), b), ((2, 0), c), ((3, 0), c)]);
        let mut used = HashMap::new();
        count_slots(shared.iter(), group, &mut used);
        assert_eq!(used, HashMap::from([(a, 1), (b, 1), (c, 1)]));
        let lost = [(1, 0), (2, 0)];
        assert_eq!(
            run(&shared, &lost),
            BTreeMap::from([((1, 0), d), ((2, 0), c)])
        );

        // (2,0) alone on c: its own slot is free for it, so both restarts get a free slot.
        let alone = place(&[((0, 0), a), ((1, 0), b), ((2, 0), c)]);
        assert_eq!(
            run(&alone, &lost),
            BTreeMap::from([((1, 0), d), ((2, 0), c)])
        );

        // A whole shared slot lost with b: its subtasks restart together, in one free slot.
        let slot = place(&[((0, 0), a), ((2, 0), b), ((3, 0), b)]);
        let lost = [(2, 0), (3, 0)];
        let placed = run(&slot, &lost);
        assert_eq!(placed.len(), 2);
        assert_eq!(placed[&(2, 0)], placed[&(3, 0)], "{placed:?}");
        assert_ne!(placed[&(2, 0)], a, "a has no free slot: {placed:?}");

        let none = restart_placement(&lost, group, |_, _| None, Vec::new());
        assert!(none.is_empty(), "no task manager, no placement: {none:?}");
        assert_eq!(restart_targets(vec![(a, 0), (c, 0)], 3), vec![a, c, a]);
    }

    /// The sources caught up at the first sample after the last one where their summed lag
    /// was over the threshold, counting only samples since the failure, and only once each
    /// source has one.
    #[test]
    fn sources_catch_up_by_their_lag_samples() {
        let a: VecDeque<(u64, u64)> =
            [(90, 5_000), (100, 50), (102, 900), (104, 400), (106, 300)].into();
        let b: VecDeque<(u64, u64)> = [(101, 50), (103, 50), (105, 50)].into();
        // a alone: over 500 at 102, within from 104.
        assert_eq!(within_lag(&[&a], 100, 500), Some(104));
        // Both: a's 400 + b's 50 at 104 is within; at 102, 900 + 50 is not.
        assert_eq!(within_lag(&[&a, &b], 100, 500), Some(104));
        // Summed: 400 + 50 over 420 at 104, 300 + 50 within at 106.
        assert_eq!(within_lag(&[&a, &b], 100, 420), Some(106));
        // Still behind at the latest sample.
        assert_eq!(within_lag(&[&a, &b], 100, 100), None);
        // The sample before the failure does not count: within from the first one after.
        assert_eq!(within_lag(&[&a], 95, 60), None);
        assert_eq!(within_lag(&[&a], 95, 1_000), Some(100));
        // Samples before the failure are not counted, even within the threshold.
        let early: VecDeque<(u64, u64)> = [(90, 0), (100, 0)].into();
        assert_eq!(within_lag(&[&early], 95, 10), Some(100));
        // A source without a sample since the failure is waited for.
        let quiet: VecDeque<(u64, u64)> = [(80, 0)].into();
        assert_eq!(within_lag(&[&a, &quiet], 100, 1_000), None);
        assert_eq!(within_lag(&[], 100, 1_000), Some(100));
    }

    /// Ensures a recovery ends from the first marker sent after its inputs caught up that
    /// went through as fast as before the failure, at every sink: not an earlier marker
    /// (it waited behind less than the backlog), not a slow one (it waited behind the
    /// backlog), and not before the slowest sink; without a latency to compare with, at the
    /// arrival of the first marker sent after the inputs caught up.
    #[test]
    fn recovery_ends_when_the_latency_is_normal_at_every_sink() {
        let fast: VecDeque<(u64, u64)> = [(98, 90), (104, 95), (106, 100), (111, 105)].into();
        // The backlog drained at 154: the markers waiting behind it arrive together.
        let slow: VecDeque<(u64, u64)> =
            [(99, 90), (140, 95), (150, 100), (154, 145), (158, 150)].into();
        assert_eq!(latency_normal(&[&fast], 100, Some(10)), Some(100));
        assert_eq!(latency_normal(&[&fast, &slow], 100, Some(10)), Some(145));
        assert_eq!(latency_normal(&[&fast, &slow], 100, Some(50)), Some(100));
        assert_eq!(
            latency_normal(&[&fast, &slow], 100, Some(1)),
            None,
            "slow is not yet"
        );
        assert_eq!(latency_normal(&[&fast, &slow], 100, None), Some(150));
        assert_eq!(latency_normal(&[&fast], 106, None), None, "none sent since");
        assert_eq!(latency_normal(&[], 100, Some(10)), Some(100));
        // The latency settled at 20 ms, not the 2 ms from before: normal from the marker
        // sent at 300, once two seconds of markers show it steady.
        let mut settles: VecDeque<(u64, u64)> = [(160, 100), (260, 200)].into();
        settles.extend((3..=13).map(|i| (i * 100 + 20, i * 100)));
        assert_eq!(latency_normal(&[&settles], 100, Some(2)), None);
        settles.extend((14..=23).map(|i| (i * 100 + 20, i * 100)));
        assert_eq!(latency_normal(&[&settles], 100, Some(2)), Some(300));
        // A backlog still draining (the latency falling throughout) is not a new level.
        let draining: VecDeque<(u64, u64)> = (1..=30)
            .map(|i| (i * 100 + 400 - i * 10, i * 100))
            .collect();
        assert_eq!(latency_normal(&[&draining], 100, Some(2)), None);
    }

    /// Ensures kept samples are the newest, oldest first.
    #[test]
    fn the_newest_samples_are_kept() {
        let mut kept: VecDeque<(u64, u64)> = (0..LAG_SAMPLES_KEPT as u64).map(|i| (i, i)).collect();
        keep_newest(&mut kept, &[(5_000, 1), (5_001, 2)]);
        assert_eq!(kept.len(), LAG_SAMPLES_KEPT);
        assert_eq!(kept.front(), Some(&(2, 2)));
        assert_eq!(kept.back(), Some(&(5_001, 2)));
    }

    fn fates(parts: &mut u32, delivery: &[(u32, bool)]) -> Vec<PartFate> {
        delivery
            .iter()
            .map(|&(part, last)| accept_part(parts, part, last))
            .collect()
    }

    const fn fate(take: bool, confirm: bool) -> PartFate {
        PartFate { take, confirm }
    }

    /// Ensures an epoch's parts are each taken once — a large first delivery whole, a repeat
    /// after a restore not at all, the rest of an interrupted one from where it stopped —
    /// and that the final part is confirmed whenever every part is in (a repeat too, whose
    /// first confirmation may have been lost), never across a gap.
    #[test]
    fn collected_parts_are_taken_once() {
        let delivery = [(0, false), (1, false), (2, true)];
        let mut parts = 0;
        assert_eq!(
            fates(&mut parts, &delivery),
            [fate(true, false), fate(true, false), fate(true, true)],
            "every part of a large epoch counts, the last confirms it"
        );
        assert_eq!(
            fates(&mut parts, &delivery),
            [fate(false, false), fate(false, false), fate(false, true)],
            "a repeated epoch counts nothing, and is confirmed again"
        );

        let mut interrupted = 0;
        assert_eq!(accept_part(&mut interrupted, 0, false), fate(true, false));
        assert_eq!(
            fates(&mut interrupted, &delivery),
            [fate(false, false), fate(true, false), fate(true, true)],
            "the rest of an interrupted delivery"
        );

        let mut gap = 0;
        assert_eq!(
            accept_part(&mut gap, 2, true),
            fate(false, false),
            "a gap is neither filled nor confirmed"
        );
        assert_eq!(gap, 0);
    }

    /// Ensures a collect subtask's progress keeps one open epoch and a watermark: epochs
    /// taken whole are dropped (and confirmed again) when a restored sink delivers them
    /// again, an interrupted one continues where it stopped, and nothing out of order is
    /// taken.
    #[test]
    fn collect_progress_is_a_watermark() {
        let mut c = CollectProgress::default();
        assert_eq!(c.accept(3, 0, true), Some(fate(true, true)));
        assert_eq!(c.accept(5, 0, false), Some(fate(true, false)));
        assert_eq!(c.accept(5, 1, false), Some(fate(true, false)));
        assert_eq!(c.accept(6, 0, true), None, "epoch 5 is not whole yet");
        assert_eq!(c.accept(5, 3, true), None, "part 2 is missing");
        // The sink restarts and delivers its snapshot's epochs again, oldest first.
        assert_eq!(c.accept(3, 0, true), Some(fate(false, true)));
        assert_eq!(c.accept(5, 0, false), Some(fate(false, false)));
        assert_eq!(c.accept(5, 1, false), Some(fate(false, false)));
        assert_eq!(c.accept(5, 2, true), Some(fate(true, true)));
        assert_eq!(c.accept(6, 0, true), Some(fate(true, true)));
        assert_eq!((c.done, c.open), (Some(6), None));
    }
}
