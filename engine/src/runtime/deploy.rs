//! Turning a `JobGraph` into runnable subtasks: which channels exist, and how one subtask's
//! runner is assembled from its channels. Shared by the in-process executor and the task
//! manager, so both wire jobs identically.
//!
//! Channel layout: an edge `from -> to` has one channel per (upstream subtask, downstream
//! subtask) pair that can exchange records: the same index for `forward`, every pair
//! otherwise. A subtask's input channels are ordered by edge, then upstream index; its routes
//! by edge, each with its targets in downstream index order.

use std::sync::Arc;
use std::time::Duration;

use super::channel::{InputChannel, InputGate, OutputChannel, Route, Router};
use super::dcas::{ChannelKey, DcasConfig, DcasSubtask};
use super::task::{ChainOperator, CheckpointReporter, SubtaskId, SubtaskMetrics, SubtaskRunner};
use crate::error::{EngineError, ErrorKind};
use crate::graph::{Edge, Exchange, JobGraph};
use crate::operator::{CollectTarget, Instance, Shape, SubtaskContext};

/// Upstream subtasks that send to downstream subtask `to` over `edge`.
pub fn edge_sources(graph: &JobGraph, edge: &Edge, to: usize) -> Vec<usize> {
    match edge.exchange {
        Exchange::Forward => vec![to],
        _ => (0..graph.tasks[edge.from].parallelism).collect(),
    }
}

/// Downstream subtasks that upstream subtask `from` sends to over `edge`.
pub fn edge_targets(graph: &JobGraph, edge: &Edge, from: usize) -> Vec<usize> {
    match edge.exchange {
        Exchange::Forward => vec![from],
        _ => (0..graph.tasks[edge.to].parallelism).collect(),
    }
}

/// The channels into subtask `subtask` of task `task`, in gate order (by edge, then
/// upstream subtask).
pub fn input_keys(graph: &JobGraph, task: usize, subtask: usize) -> Vec<ChannelKey> {
    let mut keys = Vec::new();
    for (ei, e) in graph.edges.iter().enumerate().filter(|(_, e)| e.to == task) {
        for u in edge_sources(graph, e, subtask) {
            keys.push(ChannelKey {
                edge: ei as u32,
                from: u as u32,
                to: subtask as u32,
            });
        }
    }
    keys
}

/// The channels out of subtask `subtask` of task `task`: per outgoing edge (a route), per
/// downstream subtask (a target).
pub fn output_keys(graph: &JobGraph, task: usize, subtask: usize) -> Vec<Vec<ChannelKey>> {
    graph
        .edges
        .iter()
        .enumerate()
        .filter(|(_, e)| e.from == task)
        .map(|(ei, e)| {
            edge_targets(graph, e, subtask)
                .into_iter()
                .map(|v| ChannelKey {
                    edge: ei as u32,
                    from: subtask as u32,
                    to: v as u32,
                })
                .collect()
        })
        .collect()
}

/// DCAS settings of a deployment: the cache configuration, and whom a finished subtask
/// tells.
#[derive(Clone)]
pub struct DcasEnv {
    /// Cache, job name, micro-window.
    pub config: DcasConfig,
    /// Told when a subtask finished.
    pub reporter: Arc<dyn CheckpointReporter>,
}

/// What the subtasks of one deployment share: where `collect` sinks deliver, and, when the
/// job checkpoints, where acknowledgements go and which attempt this is (sinks are then
/// exactly-once).
#[derive(Clone)]
pub struct SubtaskEnv {
    /// Where `collect` sinks deliver.
    pub collect: Arc<dyn CollectTarget>,
    /// Checkpoint reporter; `None` when the job does not checkpoint.
    pub checkpoints: Option<Arc<dyn CheckpointReporter>>,
    /// The deployment attempt (generation).
    pub attempt: u64,
    /// DCAS: input logs and snapshots in the cache; `None` for other modes.
    pub dcas: Option<DcasEnv>,
}

/// Builds the runner of subtask `subtask` of task `task`.
///
/// `outputs[k]` are the channels of the task's `k`-th outgoing edge (in `graph.edges`
/// order), one per target from [`edge_targets`].
pub fn build_runner(
    job: &str,
    graph: &JobGraph,
    task: usize,
    subtask: usize,
    inputs: Vec<InputChannel>,
    outputs: Vec<Vec<OutputChannel>>,
    env: &SubtaskEnv,
) -> Result<(SubtaskRunner, Arc<SubtaskMetrics>), EngineError> {
    let rt = &graph.runtime;
    let t = &graph.tasks[task];
    let out_edges: Vec<&Edge> = graph.edges.iter().filter(|e| e.from == task).collect();
    if out_edges.len() != outputs.len() {
        return Err(EngineError::Internal(format!(
            "task {task} has {} outgoing edges but {} output groups",
            out_edges.len(),
            outputs.len()
        )));
    }
    let routes = out_edges
        .iter()
        .zip(outputs)
        .map(|(e, senders)| Route::new(e.exchange.clone(), senders, subtask))
        .collect();
    let metrics = Arc::new(SubtaskMetrics::default());
    let mut source = None;
    let mut chain = Vec::new();
    for &v in &t.vertices {
        let vertex = &graph.vertices[v];
        let ctx = SubtaskContext {
            operator: vertex.id.clone(),
            subtask,
            parallelism: t.parallelism,
            collect: env.collect.clone(),
            transactional: env.checkpoints.is_some() || env.dcas.is_some(),
            attempt: env.attempt,
            job: job.to_string(),
        };
        let instance = vertex
            .factory
            .instantiate(&ctx)
            .map_err(|e| EngineError::Operator {
                operator: vertex.id.clone(),
                subtask,
                message: e.to_string(),
                kind: ErrorKind::User,
            })?;
        match instance {
            Instance::Source(src) => source = Some((vertex.id.clone(), src)),
            Instance::Operator(op) => chain.push(ChainOperator {
                id: vertex.id.clone(),
                op,
                is_sink: vertex.shape == Shape::Sink,
            }),
        }
    }
    let mut router = Router::new(routes, rt.batch_size, metrics.router.clone());
    let dcas = env.dcas.as_ref().map(|d| {
        router.retain_output();
        let sub = DcasSubtask::new(
            &d.config,
            task,
            subtask,
            input_keys(graph, task, subtask),
            output_keys(graph, task, subtask),
        );
        (sub, d.reporter.clone())
    });
    let mut runner = SubtaskRunner {
        job: job.to_string(),
        id: SubtaskId {
            task,
            index: subtask,
        },
        name: t.name.clone(),
        source,
        chain,
        gate: InputGate::new(inputs),
        router,
        batch_size: rt.batch_size,
        linger: Duration::from_millis(rt.linger_ms),
        watermark_interval: Duration::from_millis(rt.watermark_interval_ms),
        metrics: metrics.clone(),
        metrics_published: None,
        checkpoints: env.checkpoints.clone(),
        dcas,
        regenerates: false,
        emitted_wm: i64::MIN,
        emitted_marker: 0,
        recovering_until: None,
        rewires: tokio::sync::mpsc::unbounded_channel().1,
        attempt: 0,
        rewired: Default::default(),
        barriers: Default::default(),
    };
    runner.regenerates = runner.regenerable();
    Ok((runner, metrics))
}
