//! The REST API (actix-web), Flink-shaped: JSON in and out, errors as
//! `{"errors": ["..."]}` (plus `operator`, `field`, `line`, `column` for a bad spec).
//!
//! Handlers only translate HTTP to actor messages. Mutating calls need
//! `Authorization: Bearer <token>` when the job manager has an API token. The OpenAPI
//! document at `/openapi.json` is generated from the handlers' annotations.

// Error responses are built on cold paths; boxing them would only add noise.
#![allow(clippy::result_large_err)]

use actix::Addr;
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use engine::ids::{JobId, TaskManagerId};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use utoipa::OpenApi;

use crate::cache_master::{CacheMaster, CacheView, ClearLost, GetCache, GetTable, MemberView};
use crate::checkpoints::CheckpointsView;
use crate::dispatcher::{
    CancelJob, Dispatcher, FailoverEvent, GetCheckpoints, GetFailovers, GetJob, GetOutput,
    GetPlacements, JobDetail, JobState, JobSummary, KillError, KillSubtask, ListJobs,
    ListOperatorMetrics, OldestCacheEpoch, OutputPage, PlacedSubtask, SubmitError, SubmitJob,
    TriggerCheckpoint, TriggerError,
};
use crate::resource_manager::{
    ClusterEvent, GetEvents, KillTaskManager, ListTaskManagers, ResourceManager, TaskManagerView,
};

/// Shared state of the handlers.
#[derive(Clone)]
pub struct ApiState {
    /// Task manager registry.
    pub rm: Addr<ResourceManager>,
    /// Jobs.
    pub dispatcher: Addr<Dispatcher>,
    /// The cache's membership master.
    pub cache: Addr<CacheMaster>,
    /// Required bearer token for mutating calls.
    pub token: Option<String>,
    /// Largest accepted body.
    pub max_body: usize,
}

/// An error body.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// What went wrong.
    pub errors: Vec<String>,
    /// The offending operator (bad spec).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub operator: Option<String>,
    /// The offending field (bad spec).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// Line in the submitted JSON (syntax errors).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
    /// Column in the submitted JSON (syntax errors).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub column: Option<usize>,
}

fn error(status: StatusCode, message: impl Into<String>) -> HttpResponse {
    HttpResponse::build(status).json(ErrorBody {
        errors: vec![message.into()],
        operator: None,
        field: None,
        line: None,
        column: None,
    })
}

fn unavailable(e: actix::MailboxError) -> HttpResponse {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("job manager busy: {e}"),
    )
}

fn authorize(req: &HttpRequest, state: &ApiState) -> Result<(), HttpResponse> {
    let Some(token) = &state.token else {
        return Ok(());
    };
    let given = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if given == Some(token.as_str()) {
        Ok(())
    } else {
        Err(error(
            StatusCode::UNAUTHORIZED,
            "this call needs 'Authorization: Bearer <token>'",
        ))
    }
}

fn parse_job(id: &str) -> Result<JobId, HttpResponse> {
    id.parse()
        .map_err(|_| error(StatusCode::NOT_FOUND, format!("no job '{id}'")))
}

fn parse_tm(id: &str) -> Result<TaskManagerId, HttpResponse> {
    id.parse()
        .map_err(|_| error(StatusCode::NOT_FOUND, format!("no task manager '{id}'")))
}

/// Cluster overview.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Overview {
    /// Alive task managers.
    pub taskmanagers: usize,
    /// Dead task managers.
    pub taskmanagers_dead: usize,
    /// Slots of alive task managers.
    pub slots_total: u32,
    /// Slots of alive task managers in use by live jobs.
    pub slots_used: u32,
    /// Bytes held by the distributed cache over all members.
    pub cache_bytes: u64,
    /// Sum of the members' cache limits.
    pub cache_limit: u64,
    /// Jobs running (or starting).
    pub jobs_running: usize,
    /// Jobs finished.
    pub jobs_finished: usize,
    /// Jobs canceled.
    pub jobs_cancelled: usize,
    /// Jobs failed.
    pub jobs_failed: usize,
    /// Records per second read by all running jobs' sources.
    pub throughput: f64,
    /// Weir version.
    pub version: &'static str,
    /// Recent task manager events.
    pub events: Vec<ClusterEvent>,
}

/// Cluster overview.
#[utoipa::path(get, path = "/overview", responses((status = 200, body = Overview)))]
pub async fn overview(state: web::Data<ApiState>) -> HttpResponse {
    match overview_of(&state).await {
        Ok(o) => HttpResponse::Ok().json(o),
        Err(e) => unavailable(e),
    }
}

/// The cluster overview (REST and the dashboard's event stream).
pub async fn overview_of(state: &ApiState) -> Result<Overview, actix::MailboxError> {
    let (tms, jobs) = (
        taskmanagers_of(state).await?,
        state.dispatcher.send(ListJobs).await?,
    );
    Ok(summarize(&tms, &jobs, state.rm.send(GetEvents).await?))
}

/// The overview of these task managers and jobs.
pub fn summarize(
    tms: &[TaskManagerInfo],
    jobs: &[JobSummary],
    events: Vec<ClusterEvent>,
) -> Overview {
    let count = |s: JobState| jobs.iter().filter(|j| j.state == s).count();
    let alive: Vec<&TaskManagerInfo> = tms.iter().filter(|t| t.view.state == "ALIVE").collect();
    let cache =
        |f: fn(&CacheUse) -> u64| alive.iter().filter_map(|t| t.cache.as_ref()).map(f).sum();
    Overview {
        taskmanagers: alive.len(),
        taskmanagers_dead: tms.len() - alive.len(),
        slots_total: alive.iter().map(|t| t.view.slots).sum(),
        slots_used: alive.iter().map(|t| t.slots_used).sum(),
        cache_bytes: cache(|c| c.bytes),
        cache_limit: cache(|c| c.limit),
        jobs_running: jobs.iter().filter(|j| !j.state.is_terminal()).count(),
        jobs_finished: count(JobState::Finished),
        jobs_cancelled: count(JobState::Canceled),
        jobs_failed: count(JobState::Failed),
        throughput: jobs.iter().map(|j| j.throughput).sum(),
        version: env!("CARGO_PKG_VERSION"),
        events: events.into_iter().rev().take(50).collect(),
    }
}

/// A task manager's share of the cache.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct CacheUse {
    /// Bytes held.
    pub bytes: u64,
    /// Its limit.
    pub limit: u64,
    /// Partitions it is primary of.
    pub primaries: u32,
    /// Partitions it holds a backup of.
    pub backups: u32,
    /// Map entries.
    pub map_entries: u64,
    /// List items.
    pub list_items: u64,
}

impl From<&MemberView> for CacheUse {
    fn from(m: &MemberView) -> CacheUse {
        CacheUse {
            bytes: m.stats.bytes,
            limit: m.stats.limit,
            primaries: m.primaries,
            backups: m.backups,
            map_entries: m.stats.map_entries,
            list_items: m.stats.list_items,
        }
    }
}

/// A task manager with what runs on it.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct TaskManagerInfo {
    /// What the registry knows.
    #[serde(flatten)]
    pub view: TaskManagerView,
    /// Slots in use by live jobs.
    pub slots_used: u32,
    /// Its cache share (alive members only).
    pub cache: Option<CacheUse>,
}

/// Every task manager with its slot and cache use; `subtasks` gets the subtasks of live
/// jobs as well.
async fn task_managers(
    state: &ApiState,
) -> Result<(Vec<TaskManagerInfo>, Vec<PlacedSubtask>), actix::MailboxError> {
    let (tms, placements, cache) = (
        state.rm.send(ListTaskManagers).await?,
        state.dispatcher.send(GetPlacements).await?,
        state.cache.send(GetCache).await?,
    );
    let infos = tms
        .into_iter()
        .map(|view| {
            let used = view
                .id
                .parse::<TaskManagerId>()
                .ok()
                .and_then(|id| placements.used_slots.get(&id))
                .map_or(0, |n| *n as u32);
            let cache = cache
                .members
                .iter()
                .find(|m| m.id == view.id)
                .map(CacheUse::from);
            TaskManagerInfo {
                view,
                slots_used: used,
                cache,
            }
        })
        .collect();
    Ok((infos, placements.subtasks))
}

/// Every task manager with its slot and cache use (REST and the dashboard's event stream).
pub async fn taskmanagers_of(
    state: &ApiState,
) -> Result<Vec<TaskManagerInfo>, actix::MailboxError> {
    Ok(task_managers(state).await?.0)
}

/// The job list.
#[derive(Serialize, utoipa::ToSchema)]
pub struct JobList {
    /// Jobs, newest first.
    pub jobs: Vec<JobSummary>,
}

/// List jobs.
#[utoipa::path(get, path = "/jobs", responses((status = 200, body = JobList)))]
pub async fn list_jobs(state: web::Data<ApiState>) -> HttpResponse {
    match state.dispatcher.send(ListJobs).await {
        Ok(jobs) => HttpResponse::Ok().json(JobList { jobs }),
        Err(e) => unavailable(e),
    }
}

/// A submitted job's id.
#[derive(Serialize, Deserialize, utoipa::ToSchema)]
pub struct Submitted {
    /// The new job's id.
    pub jobid: String,
}

/// Submit a job spec (JSON body).
#[utoipa::path(post, path = "/jobs", request_body(content = Object, description = "job spec"),
    responses((status = 200, body = Submitted), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 413, body = ErrorBody)))]
pub async fn submit_job(
    req: HttpRequest,
    mut body: web::Payload,
    state: web::Data<ApiState>,
) -> HttpResponse {
    if let Err(r) = authorize(&req, &state) {
        return r;
    }
    let mut bytes = web::BytesMut::new();
    while let Some(chunk) = body.next().await {
        let Ok(chunk) = chunk else {
            return error(StatusCode::BAD_REQUEST, "could not read the request body");
        };
        if bytes.len() + chunk.len() > state.max_body {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the job spec exceeds {} bytes", state.max_body),
            );
        }
        bytes.extend_from_slice(&chunk);
    }
    let Ok(text) = String::from_utf8(bytes.to_vec()) else {
        return error(StatusCode::BAD_REQUEST, "the job spec is not UTF-8");
    };
    match state.dispatcher.send(SubmitJob(text)).await {
        Ok(Ok(id)) => HttpResponse::Ok().json(Submitted {
            jobid: id.to_string(),
        }),
        Ok(Err(SubmitError::Invalid(e))) => HttpResponse::BadRequest().json(ErrorBody {
            errors: vec![e.to_string()],
            operator: e.operator,
            field: e.field,
            line: e.line,
            column: e.column,
        }),
        Ok(Err(SubmitError::NoResources(m))) => error(StatusCode::BAD_REQUEST, m),
        Err(e) => unavailable(e),
    }
}

/// One job with its tasks, subtasks and placement.
#[utoipa::path(get, path = "/jobs/{id}", responses((status = 200, body = JobDetail), (status = 404, body = ErrorBody)))]
pub async fn get_job(path: web::Path<String>, state: web::Data<ApiState>) -> HttpResponse {
    ask_about_job(&path, &state, GetJob, |job| HttpResponse::Ok().json(job)).await
}

/// Asks the dispatcher a question about the job named in the path: 404 for a malformed id
/// or an unknown job, `found(answer)` otherwise.
async fn ask_about_job<M, T>(
    path: &str,
    state: &ApiState,
    question: impl FnOnce(JobId) -> M,
    found: impl FnOnce(T) -> HttpResponse,
) -> HttpResponse
where
    M: actix::Message<Result = Option<T>> + Send + 'static,
    T: Send + 'static,
    Dispatcher: actix::Handler<M>,
{
    let id = match parse_job(path) {
        Ok(id) => id,
        Err(r) => return r,
    };
    match state.dispatcher.send(question(id)).await {
        Ok(Some(answer)) => found(answer),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no job '{id}'")),
        Err(e) => unavailable(e),
    }
}

/// The state a cancel left the job in.
#[derive(Serialize, utoipa::ToSchema)]
pub struct CancelResult {
    /// CANCELLING, or the terminal state it was already in.
    pub state: JobState,
}

/// Cancel a job: every subtask stops and its slots are freed.
#[utoipa::path(delete, path = "/jobs/{id}", responses((status = 202, body = CancelResult), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn cancel_job(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<ApiState>,
) -> HttpResponse {
    if let Err(r) = authorize(&req, &state) {
        return r;
    }
    let id = match parse_job(&path) {
        Ok(id) => id,
        Err(r) => return r,
    };
    match state.dispatcher.send(CancelJob(id)).await {
        Ok(Ok(s)) => HttpResponse::Accepted().json(CancelResult { state: s }),
        Ok(Err(())) => error(StatusCode::NOT_FOUND, format!("no job '{id}'")),
        Err(e) => unavailable(e),
    }
}

/// A job's checkpoints: counts, the latest completed, the latest restore, and the history.
#[utoipa::path(get, path = "/jobs/{id}/checkpoints", responses((status = 200, body = CheckpointsView), (status = 404, body = ErrorBody)))]
pub async fn job_checkpoints(path: web::Path<String>, state: web::Data<ApiState>) -> HttpResponse {
    ask_about_job(&path, &state, GetCheckpoints, |v| {
        HttpResponse::Ok().json(v)
    })
    .await
}

/// A triggered checkpoint.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Triggered {
    /// Its id; follow it in `GET /jobs/{id}/checkpoints`.
    pub id: u64,
}

/// Trigger a checkpoint now (ABS jobs whose subtasks all run).
#[utoipa::path(post, path = "/jobs/{id}/checkpoints", responses((status = 202, body = Triggered), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn trigger_checkpoint(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<ApiState>,
) -> HttpResponse {
    if let Err(r) = authorize(&req, &state) {
        return r;
    }
    let id = match parse_job(&path) {
        Ok(id) => id,
        Err(r) => return r,
    };
    match state.dispatcher.send(TriggerCheckpoint(id)).await {
        Ok(Ok(n)) => HttpResponse::Accepted().json(Triggered { id: n }),
        Ok(Err(TriggerError::Unknown)) => error(StatusCode::NOT_FOUND, format!("no job '{id}'")),
        Ok(Err(TriggerError::Refused(why))) => error(StatusCode::CONFLICT, why),
        Err(e) => unavailable(e),
    }
}

/// A job's recoveries.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Failovers {
    /// Oldest first, each with the time of every recovery phase.
    pub failovers: Vec<FailoverEvent>,
}

/// A job's recoveries with their phase timings.
#[utoipa::path(get, path = "/jobs/{id}/failovers", responses((status = 200, body = Failovers), (status = 404, body = ErrorBody)))]
pub async fn job_failovers(path: web::Path<String>, state: web::Data<ApiState>) -> HttpResponse {
    ask_about_job(&path, &state, GetFailovers, |failovers| {
        HttpResponse::Ok().json(Failovers { failovers })
    })
    .await
}

/// Paging of collect output.
#[derive(Deserialize, utoipa::IntoParams)]
pub struct OutputQuery {
    /// Only this collect operator.
    pub operator: Option<String>,
    /// First record (default 0).
    pub offset: Option<usize>,
    /// Records per page (default 1000, at most 100000).
    pub limit: Option<usize>,
}

/// Collect output of a job, per collect operator.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Output {
    /// One page per collect operator.
    pub outputs: Vec<OutputPage>,
}

/// Records received by a job's collect sinks, paged.
#[utoipa::path(get, path = "/jobs/{id}/output", params(OutputQuery), responses((status = 200, body = Output), (status = 404, body = ErrorBody)))]
pub async fn job_output(
    path: web::Path<String>,
    q: web::Query<OutputQuery>,
    state: web::Data<ApiState>,
) -> HttpResponse {
    let id = match parse_job(&path) {
        Ok(id) => id,
        Err(r) => return r,
    };
    let msg = GetOutput {
        job: id,
        operator: q.operator.clone(),
        offset: q.offset.unwrap_or(0),
        limit: q.limit.unwrap_or(1000).min(100_000),
    };
    match state.dispatcher.send(msg).await {
        Ok(Some(outputs)) => HttpResponse::Ok().json(Output { outputs }),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no job '{id}'")),
        Err(e) => unavailable(e),
    }
}

/// Per-task metrics of a job.
#[derive(Serialize, utoipa::ToSchema)]
pub struct TaskMetricsView {
    /// Task index.
    pub id: u32,
    /// Task name.
    pub name: String,
    /// Records read (all subtasks).
    pub records_in: u64,
    /// Records sent.
    pub records_out: u64,
    /// Records read per second.
    pub records_in_per_sec: f64,
    /// Records sent per second.
    pub records_out_per_sec: f64,
    /// Highest backpressure fraction among subtasks.
    pub backpressure: f64,
    /// Lowest subtask watermark.
    pub watermark: Option<i64>,
}

/// Metrics of a job.
#[derive(Serialize, utoipa::ToSchema)]
pub struct JobMetrics {
    /// Per task.
    pub tasks: Vec<TaskMetricsView>,
}

/// Live per-task counters and rates of a job.
#[utoipa::path(get, path = "/jobs/{id}/metrics", responses((status = 200, body = JobMetrics), (status = 404, body = ErrorBody)))]
pub async fn job_metrics(path: web::Path<String>, state: web::Data<ApiState>) -> HttpResponse {
    let id = match parse_job(&path) {
        Ok(id) => id,
        Err(r) => return r,
    };
    match state.dispatcher.send(GetJob(id)).await {
        Ok(Some(job)) => HttpResponse::Ok().json(JobMetrics {
            tasks: job
                .vertices
                .iter()
                .map(|v| TaskMetricsView {
                    id: v.id,
                    name: v.name.clone(),
                    records_in: v.subtasks.iter().map(|s| s.records_in).sum(),
                    records_out: v.subtasks.iter().map(|s| s.records_out).sum(),
                    records_in_per_sec: v.subtasks.iter().map(|s| s.records_in_per_sec).sum(),
                    records_out_per_sec: v.subtasks.iter().map(|s| s.records_out_per_sec).sum(),
                    backpressure: v
                        .subtasks
                        .iter()
                        .map(|s| s.backpressure)
                        .fold(0.0, f64::max),
                    watermark: v.subtasks.iter().map(|s| s.watermark).min().flatten(),
                })
                .collect(),
        }),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no job '{id}'")),
        Err(e) => unavailable(e),
    }
}

/// Task managers.
#[derive(Serialize, utoipa::ToSchema)]
pub struct TaskManagerList {
    /// Every task manager that registered, alive or dead.
    pub taskmanagers: Vec<TaskManagerInfo>,
}

/// One task manager and the subtasks it runs.
#[derive(Serialize, utoipa::ToSchema)]
pub struct TaskManagerDetail {
    /// The task manager.
    #[serde(flatten)]
    pub info: TaskManagerInfo,
    /// Subtasks of live jobs placed on it.
    pub subtasks: Vec<PlacedSubtask>,
}

/// List task managers.
#[utoipa::path(get, path = "/taskmanagers", responses((status = 200, body = TaskManagerList)))]
pub async fn list_taskmanagers(state: web::Data<ApiState>) -> HttpResponse {
    match taskmanagers_of(&state).await {
        Ok(taskmanagers) => HttpResponse::Ok().json(TaskManagerList { taskmanagers }),
        Err(e) => unavailable(e),
    }
}

/// One task manager.
#[utoipa::path(get, path = "/taskmanagers/{id}", responses((status = 200, body = TaskManagerDetail), (status = 404, body = ErrorBody)))]
pub async fn get_taskmanager(path: web::Path<String>, state: web::Data<ApiState>) -> HttpResponse {
    let id = match parse_tm(&path) {
        Ok(id) => id,
        Err(r) => return r,
    };
    match task_managers(&state).await {
        Ok((tms, subtasks)) => match tms.into_iter().find(|t| t.view.id == id.to_string()) {
            Some(info) => HttpResponse::Ok().json(TaskManagerDetail {
                subtasks: subtasks
                    .into_iter()
                    .filter(|s| s.taskmanager == info.view.id)
                    .collect(),
                info,
            }),
            None => error(StatusCode::NOT_FOUND, format!("no task manager '{id}'")),
        },
        Err(e) => unavailable(e),
    }
}

/// How a task manager was killed.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Killed {
    /// `SIGKILL` (a process this job manager started) or `ABORT` (asked to abort at once).
    pub method: &'static str,
}

/// Crash a task manager (SIGKILL for a local process, an immediate abort otherwise).
#[utoipa::path(post, path = "/taskmanagers/{id}/kill", responses((status = 200, body = Killed), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn kill_taskmanager(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<ApiState>,
) -> HttpResponse {
    if let Err(r) = authorize(&req, &state) {
        return r;
    }
    let id = match parse_tm(&path) {
        Ok(id) => id,
        Err(r) => return r,
    };
    match state.rm.send(KillTaskManager(id)).await {
        Ok(Ok(method)) => HttpResponse::Ok().json(Killed { method }),
        Ok(Err(m)) if m.starts_with("unknown") => {
            error(StatusCode::NOT_FOUND, format!("no task manager '{id}'"))
        }
        Ok(Err(m)) => error(StatusCode::CONFLICT, m),
        Err(e) => unavailable(e),
    }
}

/// Which subtask `POST /jobs/{id}/tasks/{task}/{subtask}/kill` killed.
#[derive(Serialize, utoipa::ToSchema)]
pub struct SubtaskKilled {
    /// The task manager it ran on.
    pub taskmanager: String,
}

/// Fail one running subtask at once, as its crash would; the job recovers as its
/// fault-tolerance mode says (ABS: restart from the last checkpoint; none: the job fails).
#[utoipa::path(post, path = "/jobs/{id}/tasks/{task}/{subtask}/kill", responses((status = 200, body = SubtaskKilled), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn kill_subtask(
    req: HttpRequest,
    path: web::Path<(String, String, String)>,
    state: web::Data<ApiState>,
) -> HttpResponse {
    if let Err(r) = authorize(&req, &state) {
        return r;
    }
    let (job, task, subtask) = path.into_inner();
    let job = match parse_job(&job) {
        Ok(id) => id,
        Err(r) => return r,
    };
    let (Ok(task), Ok(subtask)) = (task.parse(), subtask.parse()) else {
        return error(
            StatusCode::NOT_FOUND,
            format!("no subtask '{task}/{subtask}' (task and subtask are indexes)"),
        );
    };
    match state
        .dispatcher
        .send(KillSubtask { job, task, subtask })
        .await
    {
        Ok(Ok(tm)) => HttpResponse::Ok().json(SubtaskKilled {
            taskmanager: tm.to_string(),
        }),
        Ok(Err(KillError::Unknown(m))) => error(StatusCode::NOT_FOUND, m),
        Ok(Err(KillError::NotRunning(m))) => error(StatusCode::CONFLICT, m),
        Err(e) => unavailable(e),
    }
}

/// The distributed cache: members with their partitions (primary/backup), memory and
/// entry counts, lost partitions, re-replication progress.
#[utoipa::path(get, path = "/cache", responses((status = 200, body = CacheView)))]
pub async fn get_cache(state: web::Data<ApiState>) -> HttpResponse {
    match state.cache.send(GetCache).await {
        Ok(view) => HttpResponse::Ok().json(view),
        Err(e) => unavailable(e),
    }
}

/// Query of `GET /cache/entries`.
#[derive(Deserialize, utoipa::IntoParams)]
pub struct EntriesQuery {
    /// Only names (`map/key`, or `list[]`) starting with this.
    #[serde(default)]
    pub prefix: String,
    /// Continue after this name (the last of the previous page).
    pub after: Option<String>,
    /// Page size (default 100, at most 10000).
    pub limit: Option<u32>,
}

/// A page of cache entries.
#[derive(Serialize, utoipa::ToSchema)]
pub struct EntryPage {
    /// `(name, bytes)` in name order.
    pub entries: Vec<(String, u64)>,
    /// Pass as `after` for the next page; absent on the last.
    pub next: Option<String>,
}

/// Keys and sizes held in the cache, paged.
#[utoipa::path(get, path = "/cache/entries", params(EntriesQuery), responses((status = 200, body = EntryPage), (status = 503, body = ErrorBody)))]
pub async fn cache_entries(
    query: web::Query<EntriesQuery>,
    state: web::Data<ApiState>,
) -> HttpResponse {
    let table = match state.cache.send(GetTable).await {
        Ok(t) => t,
        Err(e) => return unavailable(e),
    };
    let limit = query.limit.unwrap_or(100).clamp(1, 10_000);
    let client = engine::cache::CacheClient::new(table, std::time::Duration::from_secs(5));
    match client.keys(&query.prefix, query.after.clone(), limit).await {
        Ok(entries) => {
            let next = (entries.len() == limit as usize)
                .then(|| entries.last().map(|(n, _)| n.clone()))
                .flatten();
            HttpResponse::Ok().json(EntryPage { entries, next })
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// Partitions whose losses were forgotten.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Cleared {
    /// The partitions that serve every client again (with what was written since the loss).
    pub partitions: Vec<u32>,
}

/// Forget recorded partition losses, except those a running DCAS job dates from before
/// (it must still be told its entries there are gone): the partitions serve every client
/// again, with what was written since the loss.
#[utoipa::path(delete, path = "/cache/lost", responses((status = 200, body = Cleared), (status = 401, body = ErrorBody)))]
pub async fn clear_cache_losses(req: HttpRequest, state: web::Data<ApiState>) -> HttpResponse {
    if let Err(r) = authorize(&req, &state) {
        return r;
    }
    let upto = match state.dispatcher.send(OldestCacheEpoch).await {
        Ok(oldest) => oldest.unwrap_or(u64::MAX),
        Err(e) => return unavailable(e),
    };
    match state.cache.send(ClearLost { upto }).await {
        Ok(partitions) => HttpResponse::Ok().json(Cleared { partitions }),
        Err(e) => unavailable(e),
    }
}

/// Prometheus metrics (text format).
#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
pub async fn prometheus_metrics(state: web::Data<ApiState>) -> HttpResponse {
    let (tms, jobs, operators, cache) = match (
        state.rm.send(ListTaskManagers).await,
        state.dispatcher.send(ListJobs).await,
        state.dispatcher.send(ListOperatorMetrics).await,
        state.cache.send(GetCache).await,
    ) {
        (Ok(t), Ok(j), Ok(o), Ok(c)) => (t, j, o, c),
        (Err(e), ..) | (_, Err(e), ..) | (_, _, Err(e), _) | (.., Err(e)) => return unavailable(e),
    };
    match crate::metrics::render(&tms, &jobs, &operators, &cache) {
        Ok(text) => HttpResponse::Ok()
            .content_type("text/plain; version=0.0.4")
            .body(text),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// The OpenAPI document of this API.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Weir job manager",
        description = "Submit, watch and cancel stream-processing jobs; inspect and kill task managers."
    ),
    paths(
        overview,
        list_jobs,
        submit_job,
        get_job,
        cancel_job,
        job_output,
        job_metrics,
        job_checkpoints,
        trigger_checkpoint,
        job_failovers,
        kill_subtask,
        crate::ui::examples,
        list_taskmanagers,
        get_taskmanager,
        kill_taskmanager,
        get_cache,
        cache_entries,
        clear_cache_losses,
        prometheus_metrics,
        openapi_json
    ),
    components(schemas(
        ErrorBody,
        Overview,
        JobList,
        Submitted,
        CancelResult,
        Triggered,
        Failovers,
        Output,
        JobMetrics,
        TaskMetricsView,
        TaskManagerList,
        TaskManagerDetail,
        Killed,
        SubtaskKilled,
        CacheView,
        EntryPage,
        Cleared
    ))
)]
pub struct ApiDoc;

/// This document.
#[utoipa::path(get, path = "/openapi.json", responses((status = 200, description = "OpenAPI 3 document")))]
pub async fn openapi_json() -> HttpResponse {
    HttpResponse::Ok().json(ApiDoc::openapi())
}

async fn not_found(req: HttpRequest) -> HttpResponse {
    error(
        StatusCode::NOT_FOUND,
        format!("no such endpoint: {} {}", req.method(), req.path()),
    )
}

/// A query string that does not parse (`?limit=abc`): a 400 in the API's error format,
/// naming what is wrong, instead of actix's plain-text default.
fn bad_query(err: actix_web::error::QueryPayloadError, _: &HttpRequest) -> actix_web::Error {
    let response = error(StatusCode::BAD_REQUEST, format!("bad query string: {err}"));
    actix_web::error::InternalError::from_response(err, response).into()
}

/// Registers every route.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.app_data(web::QueryConfig::default().error_handler(bad_query))
        .route("/", web::get().to(crate::ui::index))
        .route("/ui/{file}", web::get().to(crate::ui::file))
        .route("/events", web::get().to(crate::ui::events))
        .route("/examples", web::get().to(crate::ui::examples))
        .route("/overview", web::get().to(overview))
        .route("/jobs", web::get().to(list_jobs))
        .route("/jobs", web::post().to(submit_job))
        .route("/jobs/{id}", web::get().to(get_job))
        .route("/jobs/{id}", web::delete().to(cancel_job))
        .route("/jobs/{id}/output", web::get().to(job_output))
        .route("/jobs/{id}/metrics", web::get().to(job_metrics))
        .route("/jobs/{id}/checkpoints", web::get().to(job_checkpoints))
        .route("/jobs/{id}/checkpoints", web::post().to(trigger_checkpoint))
        .route("/jobs/{id}/failovers", web::get().to(job_failovers))
        .route(
            "/jobs/{id}/tasks/{task}/{subtask}/kill",
            web::post().to(kill_subtask),
        )
        .route("/taskmanagers", web::get().to(list_taskmanagers))
        .route("/taskmanagers/{id}", web::get().to(get_taskmanager))
        .route("/taskmanagers/{id}/kill", web::post().to(kill_taskmanager))
        .route("/cache", web::get().to(get_cache))
        .route("/cache/entries", web::get().to(cache_entries))
        .route("/cache/lost", web::delete().to(clear_cache_losses))
        .route("/metrics", web::get().to(prometheus_metrics))
        .route("/openapi.json", web::get().to(openapi_json))
        .default_service(web::to(not_found));
}
