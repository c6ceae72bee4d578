//! `SubtaskActor`: runs one parallel instance (subtask) of an operator chain.
//!
//! Receives `SubtaskCommand`s (cancel, checkpoint trigger and completion) from whoever deployed it and `StreamEvent`s from its input
//! channels. Emits `StreamEvent`s downstream through its `Router` and one `SubtaskEvent`
//! (finished or failed) to its supervisor's `Recipient`.
//!
//! The actor owns the subtask's lifecycle; its body is one async loop (spawned into the
//! actor's context, so it runs on the actor's arbiter) that `select!`s, biased, over control
//! messages, then the linger timer, then inputs. Records move as batches; a source task polls
//! its source for one batch per iteration and yields between batches so co-located subtasks
//! and control messages get their turn.
//!
//! Invariant: output produced from an input is routed before the next input is read, and a
//! watermark or `EndOfStream` goes downstream only after everything before it.
//!
//! Checkpoints (ABS, when the runner has a `CheckpointReporter`): a source subtask told to
//! trigger checkpoint *n* snapshots its source and chain between two polls and sends
//! `Barrier(n)` on every output channel. A subtask with inputs aligns: a channel that
//! delivered `Barrier(n)` is not read again until every other channel delivered it (or
//! ended); the held channel's sender then runs out of credits, so alignment buffers nothing.
//! Aligned, it snapshots (sinks stage their output first), forwards the barrier and reads
//! everything again. A newer barrier abandons an unfinished alignment. State is copied
//! synchronously and handed to the reporter, which ships it; processing continues. When all
//! inputs ended, the subtask reports that it is finishing and waits for the final checkpoint
//! to complete before it ends, so a failure after some sinks finished still restores every
//! sink from one consistent checkpoint.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use tokio::sync::mpsc;
use tracing::{debug, info, warn, Instrument};

use super::channel::{
    ChannelError, InputChannel, InputGate, OutputChannel, RouteError, Router, RouterCounters,
};
use super::credit::CloseCause;
use super::dcas::{
    DcasError, DcasSnapshot, DcasSubtask, LogEntry, LogWaiter, Stored, Tail, SOURCE_CHANNEL,
};
use crate::error::{EngineError, ErrorKind};
use crate::operator::{Metric, OpError, Operator, Source, SourcePoll};
use crate::protocol::control::OperatorState;
use crate::record::{Batch, CheckpointId, Record, Seq, StreamEvent};

/// Identity of a subtask within a job, for logs and events.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SubtaskId {
    /// Task index in the job graph.
    pub task: usize,
    /// Subtask index.
    pub index: usize,
}

impl std::fmt::Display for SubtaskId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.task, self.index)
    }
}

/// Live counters of a subtask, updated once per batch, read by metrics reporting.
#[derive(Debug)]
pub struct SubtaskMetrics {
    /// Records taken from inputs (or produced by the source).
    pub records_in: AtomicU64,
    /// Records sent downstream (and counters of waiting for credits).
    pub router: Arc<RouterCounters>,
    /// Records consumed by sinks of the chain.
    pub records_sunk: AtomicU64,
    /// Current output watermark.
    pub watermark: AtomicI64,
    /// DCAS: log entries replayed when the subtask (re)started.
    pub replayed: AtomicU64,
    /// DCAS: incremental snapshots applied after the whole one when the subtask
    /// (re)started.
    pub snapshot_links: AtomicU64,
    /// When the subtask had restored its state (and, under DCAS, replayed its log), in ms
    /// since the epoch; 0 before.
    pub resumed_ms: AtomicU64,
    /// Sources: records available but not read yet (`Source::lag`); -1 when unknown.
    pub source_lag: AtomicI64,
    /// Sources: the lag as it was at each poll, at most one sample per
    /// [`LAG_SAMPLE_EVERY_MS`], the newest [`LAG_SAMPLES`] until reported: (ms since the
    /// epoch, records). Tells when a source caught up to within a few ms, where reports
    /// come every heartbeat.
    pub lag_samples: Mutex<std::collections::VecDeque<(u64, u64)>>,
    /// Subtasks without outputs (sinks): the latency markers that arrived, the newest
    /// [`LAG_SAMPLES`] until reported: (ms since the epoch when it arrived, its origin).
    pub marker_samples: Mutex<std::collections::VecDeque<(u64, u64)>>,
    /// Subtasks without outputs: how old the latest latency marker was when it arrived,
    /// in ms (end-to-end latency); -1 before the first.
    pub latency_ms: AtomicI64,
    /// Operator-specific metrics by operator id, refreshed about once a second.
    pub operators: Mutex<Vec<(String, Metric)>>,
}

impl Default for SubtaskMetrics {
    fn default() -> Self {
        SubtaskMetrics {
            records_in: AtomicU64::new(0),
            router: Arc::default(),
            records_sunk: AtomicU64::new(0),
            watermark: AtomicI64::new(i64::MIN),
            replayed: AtomicU64::new(0),
            snapshot_links: AtomicU64::new(0),
            resumed_ms: AtomicU64::new(0),
            source_lag: AtomicI64::new(-1),
            lag_samples: Mutex::default(),
            marker_samples: Mutex::default(),
            latency_ms: AtomicI64::new(-1),
            operators: Mutex::new(Vec::new()),
        }
    }
}

/// Shortest time between two samples of a source's lag.
pub const LAG_SAMPLE_EVERY_MS: u64 = 2;

/// Most lag samples kept between two reports (the oldest go first).
pub const LAG_SAMPLES: usize = 256;

impl SubtaskMetrics {
    /// Records a source's lag after a poll, and samples it unless the last sample is
    /// younger than [`LAG_SAMPLE_EVERY_MS`].
    fn source_polled(&self, lag: Option<u64>) {
        self.source_lag
            .store(lag.map_or(-1, |l| l as i64), Ordering::Relaxed);
        let (Some(lag), Ok(mut samples)) = (lag, self.lag_samples.lock()) else {
            return;
        };
        let now = crate::telemetry::now_ms();
        if samples
            .back()
            .is_some_and(|&(at, _)| now < at + LAG_SAMPLE_EVERY_MS)
        {
            return;
        }
        push_sample(&mut samples, (now, lag));
    }

    /// The lag samples since the last call.
    pub fn take_lag_samples(&self) -> Vec<(u64, u64)> {
        take_samples(&self.lag_samples)
    }

    /// Records a latency marker from `origin` arriving at a subtask without outputs.
    fn marker_arrived(&self, origin: i64) {
        let now = crate::telemetry::now_ms();
        let origin = origin.max(0) as u64;
        self.latency_ms
            .store(now.saturating_sub(origin) as i64, Ordering::Relaxed);
        if let Ok(mut samples) = self.marker_samples.lock() {
            push_sample(&mut samples, (now, origin));
        }
    }

    /// The latency markers that arrived since the last call: (when, origin).
    pub fn take_marker_samples(&self) -> Vec<(u64, u64)> {
        take_samples(&self.marker_samples)
    }
}

/// Appends `sample`, dropping the oldest when [`LAG_SAMPLES`] are kept.
fn push_sample(samples: &mut std::collections::VecDeque<(u64, u64)>, sample: (u64, u64)) {
    if samples.len() == LAG_SAMPLES {
        samples.pop_front();
    }
    samples.push_back(sample);
}

/// Empties `samples`, returning what they held.
fn take_samples(samples: &Mutex<std::collections::VecDeque<(u64, u64)>>) -> Vec<(u64, u64)> {
    samples
        .lock()
        .map(|mut s| s.drain(..).collect())
        .unwrap_or_default()
}

/// How often sources send latency markers, in ms. A marker's origin is the wall clock
/// rounded down to a multiple of this, so markers from every source carry the same
/// origins and a subtask merging several forwards one per interval.
pub const MARKER_EVERY_MS: u64 = 5;

/// How often sources send latency markers during a recovery, in ms: the end of a recovery
/// is the origin of the first marker that gets through (README, "When is a recovery
/// over?"), so markers every [`MARKER_EVERY_MS`] would time it up to that much late.
pub const MARKER_EVERY_RECOVERING_MS: u64 = 1;

/// How long a source sends its markers every [`MARKER_EVERY_RECOVERING_MS`] after it
/// restored state or heard of a recovery ([`Command::Recovering`]).
const RECOVERY_MARKING: Duration = Duration::from_secs(1);

/// DCAS: most output batches waiting for the input log before the subtask waits too.
const MAX_SEALED: usize = 16;

/// DCAS: most input entries not yet in the log before the subtask stops taking input (or
/// polling). A subtask with little output (a window, a sink, a source chained with a
/// window) is not held back by log-before-release, and without this bound its log falls
/// behind its input without limit, and with it the output its senders must retain (and
/// carry in every snapshot).
const MAX_UNLOGGED: u64 = 32;

/// How often a subtask refreshes its operator metrics.
const OPERATOR_METRICS_INTERVAL: Duration = Duration::from_secs(1);

/// An operator of the chain with its id (for errors).
pub struct ChainOperator {
    /// Operator id.
    pub id: String,
    /// The instance.
    pub op: Box<dyn Operator>,
    /// Whether it is a sink (its input counts as records sunk).
    pub is_sink: bool,
}

/// Everything a subtask runs: its source (if the chain starts with one), the rest of the
/// chain, its inputs and outputs.
pub struct SubtaskRunner {
    /// The job it belongs to (its id, or its name in process), for logs.
    pub job: String,
    /// Which subtask.
    pub id: SubtaskId,
    /// Task name (operator ids of the chain).
    pub name: String,
    /// The head source and its id, for source tasks.
    pub source: Option<(String, Box<dyn Source>)>,
    /// Operators after the source (or all of them for non-source tasks).
    pub chain: Vec<ChainOperator>,
    /// Input channels (empty for source tasks).
    pub gate: InputGate,
    /// Output routes.
    pub router: Router,
    /// Records per source poll.
    pub batch_size: usize,
    /// Longest time a partly filled output batch waits.
    pub linger: Duration,
    /// Shortest time between two source watermarks.
    pub watermark_interval: Duration,
    /// Counters.
    pub metrics: Arc<SubtaskMetrics>,
    /// When operator metrics were last published.
    pub metrics_published: Option<Instant>,
    /// Where checkpoint acknowledgements go; `None` when the job does not checkpoint.
    pub checkpoints: Option<Arc<dyn CheckpointReporter>>,
    /// DCAS: the input log, snapshots in the cache, and whom to tell the subtask finished.
    pub dcas: Option<(DcasSubtask, Arc<dyn CheckpointReporter>)>,
    /// DCAS: the subtask regenerates its output from its snapshot instead of logging its
    /// polls ([`SubtaskRunner::regenerable`]); set once, when it is built.
    pub regenerates: bool,
    /// The last watermark this subtask emitted.
    pub emitted_wm: i64,
    /// The origin of the last latency marker this subtask sent (0 before the first).
    pub emitted_marker: i64,
    /// Sources: until then latency markers go every [`MARKER_EVERY_RECOVERING_MS`].
    pub recovering_until: Option<Instant>,
    /// Channels replacing those of a restarted neighbour (DCAS).
    pub rewires: mpsc::UnboundedReceiver<Rewire>,
    /// DCAS: this instance's attempt in the job manager's placement (one more with every
    /// restart of the subtask). A rewire built for another attempt is dropped: a subtask
    /// restarted on the same task manager must not take channels wired for its previous
    /// instance.
    pub attempt: u32,
    /// DCAS: per rewired channel — `(None, input)` or `(Some(route), target)` — the number
    /// of the rewire that wired it last. A task manager wires rewires concurrently, so they
    /// may arrive out of order, and an older one must not replace a newer channel.
    pub rewired: std::collections::HashMap<(Option<usize>, usize), u64>,
    /// Barrier checkpoints at this subtask.
    pub barriers: Barriers,
}

/// Operator id under which a DCAS job's fallback checkpoint stores the id of the DCAS
/// snapshot that holds its state (not a valid operator id: specs allow no `$`).
pub const DCAS_SNAPSHOT_STATE: &str = "$dcas.snapshot";

/// The [`DCAS_SNAPSHOT_STATE`] entry naming DCAS snapshot `id`.
fn dcas_snapshot_state(id: u64) -> OperatorState {
    OperatorState {
        operator: DCAS_SNAPSHOT_STATE.to_string(),
        state: id.to_le_bytes().to_vec(),
    }
}

/// The DCAS snapshot a fallback checkpoint's states name, if they name one.
fn dcas_snapshot_of(states: &[OperatorState]) -> Option<u64> {
    let s = states.iter().find(|s| s.operator == DCAS_SNAPSHOT_STATE)?;
    <[u8; 8]>::try_from(s.state.as_slice())
        .ok()
        .map(u64::from_le_bytes)
}

/// Barrier checkpoints (ABS, and a DCAS job's fallback checkpoints) at one subtask.
#[derive(Debug, Default)]
pub struct Barriers {
    /// The checkpoint being aligned and when its first barrier arrived.
    aligning: Option<(CheckpointId, Instant)>,
    /// Barriers of checkpoints up to this one are ignored: aligned already, or aborted.
    floor: CheckpointId,
    /// DCAS fallback: (checkpoint, the DCAS snapshot holding its state), oldest first, until
    /// the checkpoint completes. Sinks stage under DCAS snapshot ids, so completing a
    /// checkpoint commits its snapshot's id.
    epochs: Vec<(CheckpointId, u64)>,
    /// DCAS fallback: the newest DCAS snapshot id sinks committed. A DCAS snapshot records
    /// it: restored from that snapshot, sinks commit this far and no further, since output
    /// past the last completed fallback checkpoint could be produced again after a restore
    /// from that checkpoint.
    committed: u64,
    /// DCAS fallback: the checkpoint the deployment was restored from. It is the subtask's
    /// starting state when the cache has no snapshot of its own (a first start, or a restart
    /// before its first snapshot, which then replays its log from the start).
    restore_point: Option<Vec<OperatorState>>,
}

/// New channels for a subtask whose neighbour restarted elsewhere (DCAS): each replaces the
/// channel at the same position, keeping its seqs.
#[derive(Default)]
pub struct Rewire {
    /// (gate index, channel from the restarted sender).
    pub inputs: Vec<(usize, InputChannel)>,
    /// (route, target, channel to the restarted receiver).
    pub outputs: Vec<(usize, usize, OutputChannel)>,
    /// The job manager's number of the rewire.
    pub seq: u64,
    /// The attempt of the subtask it was built for ([`SubtaskRunner::attempt`]).
    pub attempt: u32,
}

/// Rewire a subtask (DCAS).
#[derive(Message)]
#[rtype(result = "()")]
pub struct RewireSubtask(pub Rewire);

/// A subtask's state for one checkpoint.
#[derive(Debug)]
pub struct CheckpointAck {
    /// The checkpoint.
    pub checkpoint: CheckpointId,
    /// From the first barrier to the last (zero for sources).
    pub alignment: Duration,
    /// Time spent copying the state (processing stopped meanwhile).
    pub sync: Duration,
    /// State of every operator of the chain, source first.
    pub operators: Vec<OperatorState>,
}

/// Receives what a checkpointing subtask reports; the task manager ships it to the job
/// manager.
pub trait CheckpointReporter: Send + Sync {
    /// The subtask took its state for a checkpoint.
    fn acknowledge(&self, id: &SubtaskId, ack: CheckpointAck);
    /// Every input of the subtask ended and everything was sent: it waits for the final
    /// checkpoint.
    fn finishing(&self, id: &SubtaskId);
}

/// What the actor tells its loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Stop at once, and why (reported with the subtask's end).
    Cancel(&'static str),
    /// Take checkpoint `n` (sources start its barriers).
    Trigger(CheckpointId),
    /// Take the final checkpoint `n` (every subtask, once all inputs ended).
    Final(CheckpointId),
    /// Checkpoint `n` completed: sinks commit.
    Complete(CheckpointId),
    /// Fail at once, as a crash of this subtask would (fault injection on request).
    Kill,
    /// Checkpoints up to `n` were aborted (DCAS: a recovery restarted subtasks, so their
    /// barriers may never all arrive): stop aligning them and ignore their barriers.
    Abort(CheckpointId),
    /// A recovery restarted subtasks of the job elsewhere (DCAS): sources send latency
    /// markers densely for a while ([`MARKER_EVERY_RECOVERING_MS`]).
    Recovering,
}

/// A command for a subtask.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct SubtaskCommand(pub Command);

/// How a subtask ended.
#[derive(Debug)]
pub enum SubtaskOutcome {
    /// Its inputs ended and everything was sent.
    Finished,
    /// It was canceled; why (on request, or stopped by a neighbour that went away).
    Canceled(&'static str),
    /// It failed.
    Failed(EngineError),
}

/// Reported to the supervisor when a subtask stops.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct SubtaskEvent {
    /// Which subtask.
    pub id: SubtaskId,
    /// How it ended.
    pub outcome: SubtaskOutcome,
}

/// The actor of one subtask.
pub struct SubtaskActor {
    id: SubtaskId,
    /// The loop, until `started` spawns it.
    runner: Option<SubtaskRunner>,
    control: mpsc::UnboundedSender<Command>,
    control_rx: Option<mpsc::UnboundedReceiver<Command>>,
    rewires: mpsc::UnboundedSender<Rewire>,
    /// Where the outcome goes.
    report: Recipient<SubtaskEvent>,
}

impl SubtaskActor {
    /// A subtask actor; nothing runs until it is started.
    pub fn new(mut runner: SubtaskRunner, report: Recipient<SubtaskEvent>) -> SubtaskActor {
        let (control, control_rx) = mpsc::unbounded_channel();
        let (rewires, rewires_rx) = mpsc::unbounded_channel();
        runner.rewires = rewires_rx;
        SubtaskActor {
            id: runner.id.clone(),
            runner: Some(runner),
            control,
            control_rx: Some(control_rx),
            rewires,
            report,
        }
    }
}

impl Actor for SubtaskActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let (Some(runner), Some(control)) = (self.runner.take(), self.control_rx.take()) else {
            return;
        };
        let span = tracing::info_span!("subtask", job = %runner.job, task = %runner.name, subtask = %runner.id);
        let body = runner.run(control).instrument(span);
        ctx.spawn(body.into_actor(self).map(|outcome, act, ctx| {
            act.report.do_send(SubtaskEvent {
                id: act.id.clone(),
                outcome,
            });
            ctx.stop();
        }));
    }
}

impl Handler<SubtaskCommand> for SubtaskActor {
    type Result = ();

    fn handle(&mut self, msg: SubtaskCommand, _ctx: &mut Self::Context) {
        // The loop may already have ended; then there is nothing to do.
        let _ = self.control.send(msg.0);
    }
}

impl Handler<RewireSubtask> for SubtaskActor {
    type Result = ();

    fn handle(&mut self, msg: RewireSubtask, _ctx: &mut Self::Context) {
        let _ = self.rewires.send(msg.0);
    }
}

/// Why a subtask was canceled when the job manager asked.
pub const ON_REQUEST: &str = "on request";

/// Why a subtask whose actor dropped its control channel stops.
const CONTROL_CLOSED: &str = "its control channel closed";

/// A command, or the cancel a closed control channel means.
fn or_cancel(cmd: Option<Command>) -> Command {
    cmd.unwrap_or(Command::Cancel(CONTROL_CLOSED))
}

/// Why the loop stopped early.
enum Stop {
    /// Canceled, and why.
    Canceled(&'static str),
    Failed(EngineError),
}

impl SubtaskRunner {
    /// True when, under DCAS, the subtask needs no input log: its source is replayable
    /// ([`Source::replayable`]: its records are a function of its position), every operator
    /// of its chain is [record-driven](crate::operator::Operator::record_driven), and every
    /// route sends each record to a channel the records before it decide (all of them do:
    /// `Router::push_route`). Restored from
    /// its snapshot, it then emits again exactly what it emitted after the snapshot, the same
    /// records with the same seqs, whatever the pace of its polls; so nothing it polls needs
    /// logging, and its output need not wait for a log (log before release holds trivially).
    /// Watermarks are not logged either: a receiver keeps the highest it saw, and the source
    /// derives them from records it emits again.
    ///
    /// A Kafka source still logs what it reads: the broker may not serve the same records
    /// again (retention), and the paper's cached source replays from memory.
    pub fn regenerable(&self) -> bool {
        self.dcas.is_some()
            && self.source.as_ref().is_some_and(|(_, s)| s.replayable())
            && self.chain.iter().all(|c| c.op.record_driven())
    }

    /// DCAS with an input log: the subtask's log and snapshots, unless it regenerates.
    fn logging(&mut self) -> Option<&mut DcasSubtask> {
        match self.regenerates {
            true => None,
            false => self.dcas.as_mut().map(|(d, _)| d),
        }
    }

    async fn run(mut self, mut control: mpsc::UnboundedReceiver<Command>) -> SubtaskOutcome {
        debug!("Subtask started.");
        let mut result = match self.resume().await {
            Ok(true) => Ok(()),
            Ok(false) if self.source.is_some() => self.run_source(&mut control).await,
            Ok(false) => self.run_inputs(&mut control).await,
            Err(stop) => Err(stop),
        };
        if result.is_ok() && self.dcas.is_none() {
            result = self.await_final_checkpoint(&mut control).await;
        }
        if result.is_ok() && self.dcas.is_some() {
            result = self.linger(&mut control).await;
        }
        match result {
            Ok(()) => {
                info!(
                    records_in = self.metrics.records_in.load(Ordering::Relaxed),
                    "Subtask finished."
                );
                SubtaskOutcome::Finished
            }
            Err(Stop::Canceled(why)) => {
                // The job manager logs a cancel it did not ask for, with this reason.
                debug!(why, "Subtask canceled.");
                // Downstream subtasks in this process then stop as canceled, not failed.
                self.router.close(CloseCause::Released);
                SubtaskOutcome::Canceled(why)
            }
            Err(Stop::Failed(e)) => {
                warn!(error = %e, "Subtask failed.");
                // Downstream subtasks in this process stop as canceled: the failure is ours.
                self.router.close(CloseCause::UpstreamFailed);
                SubtaskOutcome::Failed(e)
            }
        }
    }

    /// DCAS: input (a poll, or an input batch) waits while more than [`MAX_UNLOGGED`]
    /// entries are not yet in the log: what to wait for, until half of them are.
    fn log_behind(&mut self) -> Option<(LogWaiter, u64)> {
        let (d, _) = self.dcas.as_mut()?;
        let l = d.log().ok()?;
        let next = l.next_index();
        match l.logged() {
            Ok(logged) if next - logged <= MAX_UNLOGGED => None,
            // Behind, or stopped: the waiter answers the writer's error.
            _ => Some((l.waiter(), next.saturating_sub(MAX_UNLOGGED / 2))),
        }
    }

    async fn run_source(
        &mut self,
        control: &mut mpsc::UnboundedReceiver<Command>,
    ) -> Result<(), Stop> {
        let mut batch: Vec<Record> = Vec::with_capacity(self.batch_size);
        let mut last_wm_at = tokio::time::Instant::now();
        loop {
            while let Ok(cmd) = control.try_recv() {
                self.command(cmd).await?;
            }
            while let Ok(rw) = self.rewires.try_recv() {
                self.apply_rewire(rw).await?;
            }
            if let Some(stored) = self.dcas.as_mut().and_then(|(d, _)| d.try_done()) {
                self.snapshot_stored(stored)?;
            }
            self.exchange_progress()?;
            if let Some(mut behind) = self.log_behind() {
                tokio::select! {
                    biased;
                    cmd = control.recv() => self.command(or_cancel(cmd)).await?,
                    Some(rw) = self.rewires.recv() => self.apply_rewire(rw).await?,
                    reached = logged(Some(&mut behind)) => {
                        reached.map_err(|e| self.dcas_failure(e))?;
                    }
                }
                continue;
            }
            let (source_id, source) = self.source.as_mut().ok_or(Stop::Canceled("no source"))?;
            let poll = source
                .poll(self.batch_size, &mut batch)
                .map_err(|e| op_failure(source_id, self.id.index, e))?;
            let wm = source.watermark();
            self.metrics.source_polled(source.lag());
            // DCAS: the poll is an input like any other: logged with the source's position
            // (unless the subtask regenerates its output: then it only counts the records).
            if let (Some((d, _)), true) = (&mut self.dcas, self.regenerates) {
                d.consumed(batch.len());
            }
            let state = match &self.dcas {
                Some(_) if !batch.is_empty() && !self.regenerates => Some(
                    source
                        .snapshot()
                        .map_err(|e| op_failure(source_id, self.id.index, e))?,
                ),
                _ => None,
            };
            if !batch.is_empty() {
                self.metrics
                    .records_in
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                if let (Some((d, _)), Some(state)) = (&mut self.dcas, &state) {
                    d.consumed(batch.len());
                    let logged = d.log().and_then(|log| {
                        if source.replayable() {
                            // Logged as its count: replay regenerates the records.
                            let counted = Tail::Regenerate(batch.len() as u64, state.as_slice());
                            let event = StreamEvent::Data(Batch::default());
                            return log.push_parts(SOURCE_CHANNEL, &event, counted);
                        }
                        let event = StreamEvent::Data(Batch {
                            first_seq: 0,
                            records: std::mem::take(&mut batch),
                        });
                        let polled = Tail::State(state.as_slice());
                        let index = log.push_parts(SOURCE_CHANNEL, &event, polled);
                        if let StreamEvent::Data(b) = event {
                            batch = b.records;
                        }
                        index
                    });
                    logged.map_err(|e| self.dcas_failure(e))?;
                }
                self.process(0, &mut batch).await?;
            }
            match poll {
                SourcePoll::Ready => {}
                SourcePoll::Finished => {
                    self.log_source(StreamEvent::EndOfStream)?;
                    return self.finish().await;
                }
                SourcePoll::Wait(d) => {
                    let linger = self
                        .router
                        .pending_since()
                        .map(|_| self.linger)
                        .unwrap_or(d);
                    // DCAS: a recovery waiting for the progress exchange does not wait for
                    // a slow feed.
                    let progress = self
                        .dcas
                        .as_ref()
                        .and_then(|(dcas, _)| dcas.progress_due(self.router.awaits_backlogs()))
                        .map_or(d, |at| at.saturating_duration_since(Instant::now()));
                    // An idle source still sends its latency markers.
                    let marker = Duration::from_millis(self.marker_every());
                    tokio::select! {
                        biased;
                        cmd = control.recv() => self.command(or_cancel(cmd)).await?,
                        Some(rw) = self.rewires.recv() => self.apply_rewire(rw).await?,
                        _ = tokio::time::sleep(d.min(linger).min(progress).min(marker)) => {}
                    }
                    self.release().await?;
                }
            }
            // Also while the source is busy: a hash route's buffer for a slow key group
            // may take long to fill, and its records (and a latency marker behind them)
            // must still leave within the linger time.
            if self.linger_expired() {
                self.linger_flush().await?;
            }
            if let Some(wm) = wm {
                if wm > self.emitted_wm && last_wm_at.elapsed() >= self.watermark_interval {
                    self.emitted_wm = wm;
                    last_wm_at = tokio::time::Instant::now();
                    self.log_source(StreamEvent::Watermark(wm))?;
                    self.advance_watermark(wm).await?;
                }
            }
            let (now, every) = (crate::telemetry::now_ms(), self.marker_every());
            let at = (now - now % every) as i64;
            if at > self.emitted_marker {
                self.emitted_marker = at;
                self.mark(at).await?;
            }
            self.maybe_snapshot(false)?;
            self.publish_operator_metrics();
            // Let co-located subtasks and the control channel run between batches.
            tokio::task::yield_now().await;
        }
    }

    async fn run_inputs(
        &mut self,
        control: &mut mpsc::UnboundedReceiver<Command>,
    ) -> Result<(), Stop> {
        loop {
            let linger_at = self
                .router
                .pending_since()
                .map(|t| tokio::time::Instant::from_std(t + self.linger));
            let snapshot_at = self
                .dcas
                .as_ref()
                .and_then(|(d, _)| d.due_at())
                .map(tokio::time::Instant::from_std);
            // DCAS: sealed output leaves when the log reaches what it waits for.
            let mut sealed = match (&mut self.dcas, self.router.sealed_requires()) {
                (Some((d, _)), Some(required)) => d.log().ok().map(|l| (l.waiter(), required)),
                _ => None,
            };
            let mut log_behind = self.log_behind();
            // DCAS, during a recovery: input acks leave as soon as the log holds them.
            let mut acks_logged = match &mut self.dcas {
                Some((d, _)) => d
                    .acks_wait_for()
                    .and_then(|index| Some((d.log().ok()?.waiter(), index))),
                None => None,
            };
            // DCAS: progress exchanged without input, while a recovery waits for it.
            let progress_at = self
                .dcas
                .as_ref()
                .and_then(|(d, _)| d.progress_due(self.router.awaits_backlogs()))
                .map(tokio::time::Instant::from_std);
            let event = tokio::select! {
                biased;
                cmd = control.recv() => {
                    self.command(or_cancel(cmd)).await?;
                    continue;
                }
                Some(rw) = self.rewires.recv() => {
                    self.apply_rewire(rw).await?;
                    continue;
                }
                stored = snapshot_done(self.dcas.as_mut().map(|(d, _)| d)) => {
                    self.snapshot_stored(stored)?;
                    continue;
                }
                _ = sleep_until(linger_at), if linger_at.is_some() => {
                    self.linger_flush().await?;
                    continue;
                }
                reached = logged(sealed.as_mut()), if sealed.is_some() => {
                    reached.map_err(|e| self.dcas_failure(e))?;
                    self.release().await?;
                    continue;
                }
                reached = logged(log_behind.as_mut()), if log_behind.is_some() => {
                    reached.map_err(|e| self.dcas_failure(e))?;
                    self.exchange_progress()?;
                    continue;
                }
                reached = logged(acks_logged.as_mut()), if acks_logged.is_some() => {
                    reached.map_err(|e| self.dcas_failure(e))?;
                    self.exchange_progress()?;
                    continue;
                }
                _ = sleep_until(snapshot_at), if snapshot_at.is_some() => {
                    self.maybe_snapshot(false)?;
                    continue;
                }
                _ = sleep_until(progress_at), if progress_at.is_some() => {
                    self.exchange_progress()?;
                    continue;
                }
                ev = self.gate.next(), if log_behind.is_none() => match ev {
                    Ok(ev) => ev,
                    Err(e) => match self.detachable(&e) {
                        // DCAS: the sender's task manager died; its restarted instance is
                        // wired in later and resends what this subtask has not logged.
                        Some(ch) => {
                            debug!(channel = ch, error = %e, "Input detached until rewired.");
                            self.gate.detach(ch);
                            continue;
                        }
                        None => return Err(self.input_failure(e)),
                    },
                },
            };
            self.publish_operator_metrics();
            let (ch, input) = event;
            // Markers carry no data: nothing to log, and a replay regenerates none.
            let marker = matches!(input.event, StreamEvent::Marker(_));
            if let (false, Some(d)) = (marker, self.logging()) {
                // The bytes the sender packed, when they came along: logged as they are.
                let logged = d.log().and_then(|l| l.push_input(ch, &input));
                match (logged, &input.event) {
                    (Ok(index), StreamEvent::Data(b)) => {
                        d.consumed(b.len());
                        d.input_logged(index, ch, b.end_seq());
                    }
                    (Ok(_), _) => {}
                    (Err(e), _) => return Err(self.dcas_failure(e)),
                }
                self.exchange_progress()?;
            }
            match (ch, input.event) {
                (ch, StreamEvent::EndOfStream) => {
                    // An ended channel will not deliver the barrier being aligned.
                    self.try_align().await?;
                    if self.on_input(ch, StreamEvent::EndOfStream).await? {
                        return Ok(());
                    }
                }
                (ch, ev @ (StreamEvent::Data(_) | StreamEvent::Watermark(_))) => {
                    self.on_input(ch, ev).await?;
                    self.maybe_snapshot(false)?;
                }
                (ch, ev @ StreamEvent::Marker(_)) => {
                    self.on_input(ch, ev).await?;
                }
                (_, StreamEvent::Barrier(n)) if self.checkpoints.is_none() => {
                    self.broadcast(StreamEvent::Barrier(n)).await?
                }
                // Aligned already, aborted, or abandoned for a newer one.
                (_, StreamEvent::Barrier(n)) if n <= self.barriers.floor => {}
                (_, StreamEvent::Barrier(n))
                    if self
                        .barriers
                        .aligning
                        .is_some_and(|(current, _)| n < current) => {}
                (ch, StreamEvent::Barrier(n)) => {
                    match self.barriers.aligning {
                        Some((current, _)) if n == current => {}
                        other => {
                            if let Some((abandoned, _)) = other {
                                debug!(checkpoint = abandoned, newer = n, "Alignment abandoned.");
                                self.gate.unblock_all();
                            }
                            self.barriers.aligning = Some((n, Instant::now()));
                        }
                    }
                    self.gate.block(ch);
                    self.try_align().await?;
                }
            }
        }
    }

    /// Handles a command between two inputs (or polls).
    async fn command(&mut self, cmd: Command) -> Result<(), Stop> {
        match cmd {
            Command::Cancel(why) => Err(Stop::Canceled(why)),
            Command::Kill => Err(Stop::Failed(EngineError::Killed)),
            // Only sources start checkpoints while running; other subtasks follow barriers.
            Command::Trigger(n) if self.source.is_some() => {
                self.take_snapshot(n, Duration::ZERO).await?;
                self.broadcast(StreamEvent::Barrier(n)).await
            }
            Command::Trigger(_) | Command::Final(_) => Ok(()),
            Command::Complete(n) => self.complete(n),
            Command::Abort(n) => {
                self.abort(n);
                Ok(())
            }
            Command::Recovering => {
                self.recovering();
                Ok(())
            }
        }
    }

    /// A recovery is under way (or this subtask restored state): latency markers go densely
    /// for [`RECOVERY_MARKING`].
    fn recovering(&mut self) {
        self.recovering_until = Some(Instant::now() + RECOVERY_MARKING);
    }

    /// How often the source sends latency markers now, in ms.
    fn marker_every(&self) -> u64 {
        match self.recovering_until {
            Some(until) if Instant::now() < until => MARKER_EVERY_RECOVERING_MS,
            _ => MARKER_EVERY_MS,
        }
    }

    /// Checkpoints up to `n` were aborted: an alignment of one of them ends, and their
    /// barriers are ignored from now on.
    fn abort(&mut self, n: CheckpointId) {
        self.barriers.floor = self.barriers.floor.max(n);
        if let Some((current, _)) = self.barriers.aligning.filter(|(c, _)| *c <= n) {
            debug!(checkpoint = current, "Alignment aborted.");
            self.barriers.aligning = None;
            self.gate.unblock_all();
        }
        self.barriers.epochs.retain(|(c, _)| *c > n);
    }

    /// A DCAS job with fallback checkpoints: barrier checkpoints to disk besides the DCAS
    /// snapshots in the cache.
    fn fallback(&self) -> bool {
        self.dcas.is_some() && self.checkpoints.is_some()
    }

    /// Checkpoint `n` completed: sinks commit its output (under DCAS fallback checkpoints,
    /// the output staged up to the DCAS snapshot that holds `n`'s state).
    fn complete(&mut self, n: CheckpointId) -> Result<(), Stop> {
        if !self.fallback() {
            return self.commit(n);
        }
        let done = self.barriers.epochs.partition_point(|(c, _)| *c <= n);
        let Some(&(_, k)) = self.barriers.epochs[..done].last() else {
            return Ok(());
        };
        self.barriers.epochs.drain(..done);
        self.barriers.committed = self.barriers.committed.max(k);
        self.commit(k)
    }

    /// When every channel delivered the barrier being aligned (or ended): snapshot, forward
    /// the barrier, read every channel again.
    async fn try_align(&mut self) -> Result<(), Stop> {
        let Some((n, since)) = self.barriers.aligning else {
            return Ok(());
        };
        if !self.gate.all_blocked_or_ended() {
            return Ok(());
        }
        self.barriers.aligning = None;
        self.barriers.floor = n;
        self.take_snapshot(n, since.elapsed()).await?;
        self.broadcast(StreamEvent::Barrier(n)).await?;
        self.gate.unblock_all();
        Ok(())
    }

    /// Copies the state of the source and every operator of the chain (sinks stage their
    /// output first) and hands it to the reporter.
    async fn take_snapshot(&mut self, n: CheckpointId, alignment: Duration) -> Result<(), Stop> {
        let Some(reporter) = self.checkpoints.clone() else {
            return Ok(());
        };
        let started = Instant::now();
        let operators = match self.dcas.is_some() {
            false => self.copy_state(n, false)?.0,
            true => self.fallback_state(n).await?,
        };
        debug!(
            checkpoint = n,
            alignment_us = alignment.as_micros() as u64,
            "Snapshot taken."
        );
        reporter.acknowledge(
            &self.id,
            CheckpointAck {
                checkpoint: n,
                alignment,
                sync: started.elapsed(),
                operators,
            },
        );
        Ok(())
    }

    /// Copies the state of the source and every operator of the chain; sinks first stage
    /// their output under epoch `n`. With `incremental`, operators that can give only what
    /// changed since their previous snapshot do (marked true in the second vector).
    fn copy_state(
        &mut self,
        n: CheckpointId,
        incremental: bool,
    ) -> Result<(Vec<OperatorState>, Vec<bool>), Stop> {
        let mut operators = Vec::with_capacity(self.chain.len() + 1);
        let mut changes = Vec::with_capacity(self.chain.len() + 1);
        if let Some((id, source)) = &mut self.source {
            let state = source
                .snapshot()
                .map_err(|e| op_failure(id, self.id.index, e))?;
            operators.push(OperatorState {
                operator: id.clone(),
                state,
            });
            changes.push(false);
        }
        for c in self.chain.iter_mut() {
            let failed = |e| op_failure(&c.id, self.id.index, e);
            c.op.pre_commit(n).map_err(failed)?;
            let changed = match incremental {
                true => c.op.snapshot_changes().map_err(failed)?,
                false => None,
            };
            changes.push(changed.is_some());
            let state = match changed {
                Some(state) => state,
                None => c.op.snapshot().map_err(failed)?,
            };
            operators.push(OperatorState {
                operator: c.id.clone(),
                state,
            });
        }
        Ok((operators, changes))
    }

    /// Checkpoint `n` completed: every operator commits.
    fn commit(&mut self, n: CheckpointId) -> Result<(), Stop> {
        for c in self.chain.iter_mut() {
            c.op.commit(n)
                .map_err(|e| op_failure(&c.id, self.id.index, e))?;
        }
        Ok(())
    }

    /// Every input ended: with checkpoints, report finishing and wait for the final
    /// checkpoint (taken on `Trigger`) to complete, committing what sinks staged.
    async fn await_final_checkpoint(
        &mut self,
        control: &mut mpsc::UnboundedReceiver<Command>,
    ) -> Result<(), Stop> {
        let Some(reporter) = self.checkpoints.clone() else {
            return Ok(());
        };
        reporter.finishing(&self.id);
        let mut last = None;
        loop {
            match or_cancel(control.recv().await) {
                Command::Cancel(why) => return Err(Stop::Canceled(why)),
                Command::Kill => return Err(Stop::Failed(EngineError::Killed)),
                Command::Trigger(n) | Command::Final(n) => {
                    self.take_snapshot(n, Duration::ZERO).await?;
                    last = Some(n);
                }
                Command::Abort(n) => self.abort(n),
                Command::Recovering => {}
                Command::Complete(n) => {
                    self.complete(n)?;
                    if last.is_some_and(|f| n >= f) {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Restores the source and every operator of the chain from a checkpoint (before the
    /// subtask runs). Sinks commit what the checkpoint had staged. Under DCAS the
    /// checkpoint (a fallback one) is kept, and applied only when the cache holds no
    /// snapshot of the subtask (a first start, or a restart before its first snapshot).
    pub fn restore(&mut self, states: &[OperatorState]) -> Result<(), EngineError> {
        if self.dcas.is_some() {
            self.barriers.restore_point = Some(states.to_vec());
            return Ok(());
        }
        self.recovering();
        self.restore_checkpoint(states).map_err(|stop| match stop {
            Stop::Failed(e) => e,
            Stop::Canceled(_) => EngineError::Internal("canceled while restoring".into()),
        })
    }

    /// Restores a checkpoint's states, and sinks commit what it staged. A DCAS job's
    /// fallback checkpoint also names the DCAS snapshot that held the state: snapshot ids
    /// (sinks stage under them) continue after it.
    fn restore_checkpoint(&mut self, states: &[OperatorState]) -> Result<(), Stop> {
        self.restore_layers(&[(states, &[])])
            .map_err(Stop::Failed)?;
        if let (Some((d, _)), Some(k)) = (&mut self.dcas, dcas_snapshot_of(states)) {
            d.continue_after(k);
            self.barriers.committed = k;
        }
        self.commit(CheckpointId::MAX)
    }

    /// Restores from snapshot layers, oldest first: a whole snapshot, then incremental ones
    /// (per operator state, whether it holds changes; missing means whole). Each operator
    /// restores its last whole state and then every later change. Nothing to do without
    /// layers.
    fn restore_layers(
        &mut self,
        layers: &[(&[OperatorState], &[bool])],
    ) -> Result<(), EngineError> {
        let subtask = &self.id;
        // Per operator: its last whole state and the changes after it.
        let plan = |id: &str| -> Result<Vec<(&[u8], bool)>, EngineError> {
            let mut states = Vec::with_capacity(layers.len());
            for (operators, changes) in layers {
                let i = operators
                    .iter()
                    .position(|s| s.operator == id)
                    .ok_or_else(|| {
                        EngineError::Internal(format!(
                            "the checkpoint has no state for operator '{id}' of subtask {subtask}"
                        ))
                    })?;
                let changed = changes.get(i).copied().unwrap_or(false);
                states.push((operators[i].state.as_slice(), changed));
            }
            let from = states.iter().rposition(|(_, changed)| !changed);
            match from {
                Some(from) => Ok(states.split_off(from)),
                None if states.is_empty() => Ok(states),
                None => Err(EngineError::Internal(format!(
                    "the checkpoint has only changes, no whole state, for operator '{id}' of subtask {subtask}"
                ))),
            }
        };
        let failed = |id: &str, e: OpError| EngineError::Operator {
            operator: id.to_string(),
            subtask: subtask.index,
            message: format!("restore failed: {e}"),
            kind: ErrorKind::Internal,
        };
        if let Some((id, source)) = &mut self.source {
            for (state, _) in plan(id)? {
                source.restore(state).map_err(|e| failed(id, e))?;
            }
        }
        for c in &mut self.chain {
            for (state, changed) in plan(&c.id)? {
                match changed {
                    true => c.op.restore_changes(state),
                    false => c.op.restore(state),
                }
                .map_err(|e| failed(&c.id, e))?;
            }
        }
        Ok(())
    }

    /// Copies every operator's metrics to `SubtaskMetrics`, at most once per interval.
    fn publish_operator_metrics(&mut self) {
        if self
            .metrics_published
            .is_some_and(|t| t.elapsed() < OPERATOR_METRICS_INTERVAL)
        {
            return;
        }
        self.metrics_published = Some(Instant::now());
        let mut all: Vec<(String, Metric)> = Vec::new();
        if let Some((id, source)) = &self.source {
            all.extend(source.metrics().into_iter().map(|m| (id.clone(), m)));
        }
        for c in &self.chain {
            all.extend(c.op.metrics().into_iter().map(|m| (c.id.clone(), m)));
        }
        if let Ok(mut g) = self.metrics.operators.lock() {
            *g = all;
        }
    }

    fn linger_expired(&self) -> bool {
        self.router
            .pending_since()
            .is_some_and(|t| t.elapsed() >= self.linger)
    }

    /// Runs `records` (from logical input `input`) through the chain and routes the result.
    async fn process(&mut self, input: usize, records: &mut Vec<Record>) -> Result<(), Stop> {
        let mut input = input;
        let mut next: Vec<Record> = Vec::new();
        for c in self.chain.iter_mut() {
            if records.is_empty() {
                break;
            }
            if c.is_sink {
                self.metrics
                    .records_sunk
                    .fetch_add(records.len() as u64, Ordering::Relaxed);
            }
            c.op.process(input, records, &mut next)
                .map_err(|e| op_failure(&c.id, self.id.index, e))?;
            records.clear();
            std::mem::swap(records, &mut next);
            input = 0;
        }
        self.emit(records).await
    }

    /// Routes `records`. DCAS (log before release): a full batch is sealed with the number
    /// of inputs consumed so far and leaves once the log holds them; the subtask goes on
    /// meanwhile (appends are pipelined), and waits only when [`MAX_SEALED`] batches do.
    async fn emit(&mut self, records: &mut Vec<Record>) -> Result<(), Stop> {
        let Some(d) = self.logging() else {
            return self
                .router
                .push(records)
                .await
                .map_err(|e| self.route_failure(e));
        };
        let consumed = d.log().map(|l| l.next_index());
        let consumed = consumed.map_err(|e| self.dcas_failure(e))?;
        self.router
            .stage(records)
            .map_err(|e| self.route_failure(e))?;
        if self.router.has_full() {
            self.router.seal(consumed, false);
        }
        self.release().await
    }

    /// DCAS: sends the sealed batches the log covers; waits for the log while more than
    /// [`MAX_SEALED`] batches wait.
    async fn release(&mut self) -> Result<(), Stop> {
        loop {
            let Some(d) = self.logging() else {
                return Ok(());
            };
            let logged = d.log().and_then(|l| l.logged());
            let logged = logged.map_err(|e| self.dcas_failure(e))?;
            self.router
                .send_sealed(logged)
                .await
                .map_err(|e| self.route_failure(e))?;
            let Some(required) = self.router.sealed_requires() else {
                return Ok(());
            };
            if self.router.sealed() <= MAX_SEALED {
                return Ok(());
            }
            let Some(d) = self.logging() else {
                return Ok(());
            };
            let reached = match d.log() {
                Ok(log) => log.waiter().reached(required).await,
                Err(e) => Err(e),
            };
            reached.map_err(|e| self.dcas_failure(e))?;
        }
    }

    /// The linger timeout passed: sends the partial batches (DCAS: seals them, to leave
    /// once logged, without waiting here).
    async fn linger_flush(&mut self) -> Result<(), Stop> {
        let Some(d) = self.logging() else {
            return self.flush().await;
        };
        let consumed = d.log().map(|l| l.next_index());
        let consumed = consumed.map_err(|e| self.dcas_failure(e))?;
        self.router.seal(consumed, true);
        self.release().await
    }

    /// Sends every buffered record (after the log caught up, with DCAS).
    async fn flush(&mut self) -> Result<(), Stop> {
        self.log_synced().await?;
        self.router.flush().await.map_err(|e| self.route_failure(e))
    }

    /// Broadcasts `event` (after the log caught up, with DCAS).
    async fn broadcast(&mut self, event: StreamEvent) -> Result<(), Stop> {
        self.log_synced().await?;
        self.router
            .broadcast(event)
            .await
            .map_err(|e| self.route_failure(e))
    }

    /// DCAS: waits until every input consumed so far is in the log.
    async fn log_synced(&mut self) -> Result<(), Stop> {
        let Some(d) = self.logging() else {
            return Ok(());
        };
        let synced = match d.log() {
            Ok(log) => log.synced().await,
            Err(e) => Err(e),
        };
        synced.map_err(|e| self.dcas_failure(e))
    }

    /// Takes one input (live, or replayed from the log) through the subtask; true when it
    /// was the last (every input ended and the subtask finished).
    async fn on_input(&mut self, ch: usize, event: StreamEvent) -> Result<bool, Stop> {
        match event {
            StreamEvent::Data(batch) => {
                let input = self.gate.channels()[ch].input;
                self.metrics
                    .records_in
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                let mut records = batch.records;
                self.process(input, &mut records).await?;
            }
            StreamEvent::EndOfStream if self.gate.all_ended() => {
                self.finish().await?;
                return Ok(true);
            }
            StreamEvent::Watermark(_) | StreamEvent::EndOfStream => {
                let wm = self.gate.watermark();
                if wm > self.emitted_wm && wm != i64::MAX {
                    self.emitted_wm = wm;
                    self.advance_watermark(wm).await?;
                }
                // An ended channel no longer holds the markers back.
                self.forward_marker().await?;
            }
            StreamEvent::Marker(_) => self.forward_marker().await?,
            StreamEvent::Barrier(_) => {}
        }
        Ok(false)
    }

    /// Sends the oldest latency marker of the inputs on, once it is newer than the last.
    async fn forward_marker(&mut self) -> Result<(), Stop> {
        match self.gate.marker() {
            Some(at) if at > self.emitted_marker => {
                self.emitted_marker = at;
                self.mark(at).await
            }
            _ => Ok(()),
        }
    }

    /// Sends a latency marker from `at` behind the output so far; a subtask without
    /// outputs (a sink) records its arrival instead.
    async fn mark(&mut self, at: i64) -> Result<(), Stop> {
        if !self.router.has_routes() {
            self.metrics.marker_arrived(at);
            return Ok(());
        }
        self.router
            .mark(at)
            .await
            .map_err(|e| self.route_failure(e))
    }

    /// DCAS: logs a source's watermark or end (polls are logged where polled).
    fn log_source(&mut self, event: StreamEvent) -> Result<(), Stop> {
        let Some(d) = self.logging() else {
            return Ok(());
        };
        d.log()
            .and_then(|l| l.push_parts(SOURCE_CHANNEL, &event, Tail::None))
            .map(|_| ())
            .map_err(|e| self.dcas_failure(e))
    }

    /// DCAS, before the loop: restores the latest snapshot, sends the output it retained
    /// again, and replays the log after it — the same inputs in the same order, so the
    /// same outputs with the same seqs (receivers drop what they have). True when the
    /// subtask had finished.
    async fn resume(&mut self) -> Result<bool, Stop> {
        let Some((d, _)) = &mut self.dcas else {
            self.resumed();
            return Ok(false);
        };
        let started = Instant::now();
        // What the receivers logged, read beside the load: replayed output below it is
        // not sent again.
        let receivers = d.receivers_logged();
        let (loaded, receivers) = tokio::join!(d.load(), receivers);
        let ((snap, entries), receivers) = match loaded.and_then(|l| Ok((l, receivers?))) {
            Ok(both) => both,
            Err(e) => return Err(self.dcas_failure(e)),
        };
        let load_us = started.elapsed().as_micros() as u64;
        let restored = snap.last().map(|s| s.id);
        let state_bytes: usize = snap.iter().map(DcasSnapshot::state_bytes).sum();
        // Incremental snapshots applied after the whole one.
        let links = snap.len().saturating_sub(1);
        let layers: Vec<_> = snap
            .iter()
            .map(|s| (s.operators.as_slice(), s.changes.as_slice()))
            .collect();
        self.restore_layers(&layers).map_err(Stop::Failed)?;
        let restore_point = self.barriers.restore_point.take();
        if let Some(s) = snap.last() {
            // What a DCAS snapshot staged is committed, unless fallback checkpoints decide.
            let bound = s.committed.unwrap_or(CheckpointId::MAX);
            self.barriers.committed = s.committed.unwrap_or(s.id);
            self.commit(bound)?;
        } else if let Some(states) = restore_point {
            self.restore_checkpoint(&states)?;
        }
        if let Some(snap) = snap.into_iter().last() {
            let fail = |e: String| Stop::Failed(EngineError::Internal(format!("restoring: {e}")));
            self.gate.restore_positions(&snap.inputs).map_err(fail)?;
            self.emitted_wm = snap.router.watermark;
            self.router.restore_position(snap.router).map_err(fail)?;
        }
        // Sends the retained output the receivers lack (none without a snapshot).
        self.router.receivers_logged(&receivers);
        self.router
            .resend_all()
            .await
            .map_err(|e| self.route_failure(e))?;
        let (replayed, mut records) = (entries.len(), 0);
        let restore_us = started.elapsed().as_micros() as u64 - load_us;
        let replaying = Instant::now();
        // Restored from a snapshot taken after it finished (sent `EndOfStream`).
        let mut finished = self.source.is_none() && self.router.ended();
        for entry in entries {
            if finished {
                break;
            }
            let entry = entry.map_err(|e| self.dcas_failure(e))?;
            records += entry.records();
            finished = self.replay(entry).await?;
        }
        let positions: Vec<Seq> = self.gate.positions().iter().map(|p| p.next_seq).collect();
        if let Some(d) = self.logging() {
            d.inputs_restored(&positions);
        }
        // A restart (not a first start): its senders wait for it to log their backlog.
        if restored.is_some() || replayed > 0 {
            if let Some((d, _)) = &mut self.dcas {
                d.hurry();
            }
            self.recovering();
            // The restored positions, acked to the senders at once.
            self.exchange_progress()?;
        }
        self.metrics
            .replayed
            .store(replayed as u64, Ordering::Relaxed);
        self.metrics
            .snapshot_links
            .store(links as u64, Ordering::Relaxed);
        self.resumed();
        if restored.is_some() || replayed > 0 {
            let replay_us = replaying.elapsed().as_micros() as u64;
            info!(snapshot = ?restored, links, state_bytes, replayed, records, load_us, restore_us, replay_us, "Subtask restored from the cache.");
        }
        Ok(finished)
    }

    /// Marks the moment the subtask is ready for live input (for failover timelines).
    /// Release: what the restart counted (`replayed`, `snapshot_links`) is stored before, and
    /// a reader that sees this time sees those counts.
    fn resumed(&self) {
        self.metrics
            .resumed_ms
            .store(crate::telemetry::now_ms(), Ordering::Release);
    }

    /// Replays one log entry; true when the subtask finished with it.
    async fn replay(&mut self, entry: LogEntry) -> Result<bool, Stop> {
        if entry.channel != SOURCE_CHANNEL {
            let ch = entry.channel as usize;
            let event = self.gate.replay(ch, entry.event).map_err(|e| {
                Stop::Failed(EngineError::Internal(format!(
                    "subtask {}: replay: {e}",
                    self.id
                )))
            })?;
            return match event {
                Some(event) => self.on_input(ch, event).await,
                None => Ok(false),
            };
        }
        match entry.event {
            StreamEvent::Data(batch) => {
                let mut records = batch.records;
                if let Tail::Regenerate(n, _) = entry.tail {
                    // A poll returns at most a batch: a larger count is not this log's.
                    let (Some((id, source)), true) =
                        (&mut self.source, n <= self.batch_size as u64)
                    else {
                        return Err(Stop::Failed(EngineError::Internal(format!(
                            "subtask {}: replay: a logged poll of {n} records to regenerate, \
                             but the subtask has no source or polls at most {}",
                            self.id, self.batch_size
                        ))));
                    };
                    source
                        .regenerate(n as usize, &mut records)
                        .map_err(|e| op_failure(id, self.id.index, e))?;
                }
                self.metrics
                    .records_in
                    .fetch_add(records.len() as u64, Ordering::Relaxed);
                self.process(0, &mut records).await?;
                if let (Some((id, source)), Some(state)) = (&mut self.source, entry.tail.state()) {
                    source
                        .restore(state)
                        .map_err(|e| op_failure(id, self.id.index, e))?;
                }
            }
            StreamEvent::Watermark(wm) => {
                self.emitted_wm = wm;
                self.advance_watermark(wm).await?;
            }
            StreamEvent::EndOfStream => {
                self.finish().await?;
                return Ok(true);
            }
            // Never logged.
            StreamEvent::Barrier(_) | StreamEvent::Marker(_) => {}
        }
        Ok(false)
    }

    /// DCAS: starts a snapshot when the micro-window is full (or its interval passed), or
    /// at once with `force`. The state is copied here; the cache write is asynchronous.
    fn maybe_snapshot(&mut self, force: bool) -> Result<(), Stop> {
        let due = match &mut self.dcas {
            Some((d, _)) => !d.in_flight() && (force || d.due()),
            None => false,
        };
        if due {
            self.dcas_snapshot(false)?;
        }
        Ok(())
    }

    /// DCAS: starts snapshot `next_id` (none may be in flight). With `whole`, it is a whole
    /// snapshot and its id and operator states are answered too.
    fn dcas_snapshot(&mut self, whole: bool) -> Result<Option<(u64, Vec<OperatorState>)>, Stop> {
        let (id, follows) = match &self.dcas {
            Some((d, _)) => (d.next_id(), d.follows().filter(|_| !whole)),
            None => return Ok(None),
        };
        let (operators, changes) = self.copy_state(id, follows.is_some())?;
        // Nothing incremental in it (no operator keeps changes): store it whole.
        let follows = follows.filter(|_| changes.contains(&true));
        let inputs = self.gate.positions();
        let router = self.router.position();
        let committed = self.fallback().then_some(self.barriers.committed);
        let kept = whole.then(|| (id, operators.clone()));
        let Some((d, _)) = &mut self.dcas else {
            return Ok(None);
        };
        let started = d.log().map(|l| l.next_index()).and_then(|log_offset| {
            d.start_snapshot(DcasSnapshot {
                id,
                follows,
                changes,
                log_offset,
                operators,
                inputs,
                router,
                committed,
            })
        });
        started.map_err(|e| self.dcas_failure(e))?;
        Ok(kept)
    }

    /// DCAS fallback checkpoint `n`: its state is a whole DCAS snapshot, stored in the cache
    /// before `n` is acknowledged, so no later DCAS restart goes back behind what `n`'s
    /// completion commits. The operator states carry the snapshot's id
    /// ([`DCAS_SNAPSHOT_STATE`]).
    async fn fallback_state(&mut self, n: CheckpointId) -> Result<Vec<OperatorState>, Stop> {
        self.wait_snapshot().await?;
        let Some((k, mut operators)) = self.dcas_snapshot(true)? else {
            return Ok(Vec::new());
        };
        self.wait_snapshot().await?;
        self.barriers.epochs.push((n, k));
        operators.push(dcas_snapshot_state(k));
        Ok(operators)
    }

    /// DCAS: a snapshot is in the cache: sinks commit its epoch (with fallback checkpoints,
    /// only a completed one commits: [`SubtaskRunner::complete`]), and output the receivers
    /// have logged is forgotten.
    fn snapshot_stored(&mut self, stored: Result<Stored, DcasError>) -> Result<(), Stop> {
        let stored = stored.map_err(|e| self.dcas_failure(e))?;
        if !self.fallback() {
            self.commit(stored.id)?;
        }
        self.router.trim(&stored.logged);
        debug!(
            snapshot = stored.id,
            bytes = stored.bytes,
            retained = self.router.retained_records(),
            "DCAS snapshot stored."
        );
        Ok(())
    }

    /// DCAS, between snapshots: publishes what the log holds and trims retained output by
    /// what the receivers have published (see [`DcasSubtask::exchange_progress`]). During
    /// a recovery the same progress also goes directly over the channels: this subtask
    /// acks its logged input to its senders, and counts the acks of its rewired receivers.
    fn exchange_progress(&mut self) -> Result<(), Stop> {
        let Some((d, _)) = &mut self.dcas else {
            return Ok(());
        };
        // During a recovery: acks on the channels themselves, both ways.
        for (ch, next_seq) in d.direct_acks() {
            self.gate.ack_logged(ch, next_seq);
        }
        self.router.receivers_acked();
        match d.exchange_progress() {
            Ok(Some(logged)) => self.router.trim(&logged),
            Ok(None) => {}
            Err(e) => return Err(self.dcas_failure(e)),
        }
        Ok(())
    }

    /// DCAS: waits for the snapshot in flight, if any, and completes it.
    async fn wait_snapshot(&mut self) -> Result<(), Stop> {
        if let Some((d, _)) = self.dcas.as_mut().filter(|(d, _)| d.in_flight()) {
            let stored = d.done().await;
            self.snapshot_stored(stored)?;
        }
        Ok(())
    }

    /// DCAS: swaps in channels to and from a neighbour's restarted instance.
    async fn apply_rewire(&mut self, rw: Rewire) -> Result<(), Stop> {
        if rw.attempt != self.attempt {
            debug!(
                seq = rw.seq,
                attempt = rw.attempt,
                mine = self.attempt,
                "A rewire for another instance of this subtask; dropped."
            );
            return Ok(());
        }
        let (inputs, outputs) = (rw.inputs.len(), rw.outputs.len());
        let mut newer = |end: (Option<usize>, usize)| {
            let last = self.rewired.entry(end).or_default();
            let newer = rw.seq >= *last;
            *last = (*last).max(rw.seq);
            if !newer {
                debug!(seq = rw.seq, end = ?end, "An older rewire arrived late; ignored.");
            }
            newer
        };
        let rw_inputs: Vec<_> = rw
            .inputs
            .into_iter()
            .filter(|(i, _)| newer((None, *i)))
            .collect();
        let rw_outputs: Vec<_> = (rw.outputs.into_iter())
            .filter(|(r, t, _)| newer((Some(*r), *t)))
            .collect();
        for (i, ch) in rw_inputs {
            self.gate.rewire(i, ch);
        }
        for (r, t, ch) in rw_outputs {
            self.router
                .rewire(r, t, ch, rw.seq)
                .await
                .map_err(|e| self.route_failure(e))?;
        }
        if let Some((d, _)) = &mut self.dcas {
            d.hurry();
        }
        info!(inputs, outputs, "Rewired to a restarted neighbour.");
        Ok(())
    }

    /// DCAS: the gate channel to detach for an input error caused by the sender going away.
    fn detachable(&self, e: &ChannelError) -> Option<usize> {
        match e {
            ChannelError::Disconnected { channel, cause }
                if self.dcas.is_some() && *cause != Some(CloseCause::Released) =>
            {
                Some(*channel)
            }
            _ => None,
        }
    }

    fn dcas_failure(&self, e: DcasError) -> Stop {
        Stop::Failed(EngineError::Internal(format!(
            "subtask {}: DCAS: {e}",
            self.id
        )))
    }

    /// DCAS, after the subtask finished: a last snapshot commits what sinks hold, then the
    /// subtask reports finishing and stays (its retained output may be asked for again by
    /// a restarted receiver) until the job ends. With fallback checkpoints the last snapshot
    /// commits nothing: the subtask takes the final checkpoint here and ends once it
    /// completed (its sinks committed everything).
    async fn linger(&mut self, control: &mut mpsc::UnboundedReceiver<Command>) -> Result<(), Stop> {
        let Some(reporter) = self.dcas.as_ref().map(|(_, r)| r.clone()) else {
            return Ok(());
        };
        self.wait_snapshot().await?;
        self.maybe_snapshot(true)?;
        self.wait_snapshot().await?;
        reporter.finishing(&self.id);
        // Fallback checkpoints: the final one is taken here, and once it completed (sinks
        // committed everything) the subtask ends.
        let mut last = None;
        loop {
            tokio::select! {
                cmd = control.recv() => match or_cancel(cmd) {
                    Command::Cancel(why) => return Err(Stop::Canceled(why)),
                    Command::Kill => return Err(Stop::Failed(EngineError::Killed)),
                    // A periodic one that raced the end of the input.
                    Command::Trigger(n) => self.take_snapshot(n, Duration::ZERO).await?,
                    Command::Final(n) => {
                        self.take_snapshot(n, Duration::ZERO).await?;
                        last = Some(n);
                    }
                    Command::Complete(n) => {
                        self.complete(n)?;
                        if last.is_some_and(|f| n >= f) {
                            return Ok(());
                        }
                    }
                    Command::Abort(n) => self.abort(n),
                    Command::Recovering => {}
                },
                Some(rw) = self.rewires.recv() => self.apply_rewire(rw).await?,
            }
        }
    }

    /// Tells every operator of the chain, in order, that the watermark advanced (feeding what
    /// each fires to the next), then routes the output and forwards the watermark.
    async fn advance_watermark(&mut self, wm: i64) -> Result<(), Stop> {
        let mut out = self.through_chain(|op, out| op.on_watermark(wm, out))?;
        self.emit(&mut out).await?;
        self.metrics.watermark.store(wm, Ordering::Relaxed);
        self.broadcast(StreamEvent::Watermark(wm)).await
    }

    /// All inputs ended: finishes every operator in order, sends what remains and
    /// `EndOfStream`.
    async fn finish(&mut self) -> Result<(), Stop> {
        let mut out = self.through_chain(|op, out| op.finish(out))?;
        self.emit(&mut out).await?;
        self.broadcast(StreamEvent::EndOfStream).await
    }

    fn through_chain(
        &mut self,
        mut f: impl FnMut(&mut dyn Operator, &mut Vec<Record>) -> Result<(), OpError>,
    ) -> Result<Vec<Record>, Stop> {
        let mut pending: Vec<Record> = Vec::new();
        for c in self.chain.iter_mut() {
            let mut produced = Vec::new();
            if !pending.is_empty() {
                if c.is_sink {
                    self.metrics
                        .records_sunk
                        .fetch_add(pending.len() as u64, Ordering::Relaxed);
                }
                c.op.process(0, &mut pending, &mut produced)
                    .map_err(|e| op_failure(&c.id, self.id.index, e))?;
            }
            f(c.op.as_mut(), &mut produced).map_err(|e| op_failure(&c.id, self.id.index, e))?;
            pending = produced;
        }
        Ok(pending)
    }

    fn input_failure(&self, e: ChannelError) -> Stop {
        match e {
            // Our own deployment, or an upstream subtask in this process, was canceled: not a
            // failure.
            ChannelError::Disconnected {
                cause: Some(CloseCause::Released),
                ..
            } => Stop::Canceled("its input was released"),
            // An upstream subtask in this process failed and reports the cause: stopping
            // as canceled keeps this consequence from standing in for it.
            ChannelError::Disconnected {
                cause: Some(CloseCause::UpstreamFailed),
                ..
            } => Stop::Canceled("an upstream subtask failed"),
            e => Stop::Failed(EngineError::Internal(format!("subtask {}: {e}", self.id))),
        }
    }

    fn route_failure(&self, e: RouteError) -> Stop {
        match e {
            // A downstream subtask went away: it was canceled or failed, and reports that itself.
            RouteError::Channel(_) => Stop::Canceled("a downstream channel closed"),
            RouteError::Partition(err) => Stop::Failed(EngineError::Operator {
                operator: self.name.clone(),
                subtask: self.id.index,
                message: err.to_string(),
                kind: ErrorKind::User,
            }),
            RouteError::Retained(err) => Stop::Failed(EngineError::Internal(format!(
                "subtask {}: retained output: {err}",
                self.id
            ))),
        }
    }
}

fn op_failure(operator: &str, subtask: usize, e: OpError) -> Stop {
    let kind = match e {
        OpError::Io(_) => ErrorKind::External,
        OpError::State(_) => ErrorKind::Internal,
        OpError::Eval { .. } | OpError::Type { .. } | OpError::Data(_) => ErrorKind::User,
    };
    Stop::Failed(EngineError::Operator {
        operator: operator.to_string(),
        subtask,
        message: e.to_string(),
        kind,
    })
}

/// Waits for the DCAS snapshot in flight (never, without one).
async fn snapshot_done(dcas: Option<&mut DcasSubtask>) -> Result<Stored, DcasError> {
    match dcas {
        Some(d) => d.done().await,
        None => std::future::pending().await,
    }
}

/// Waits until the log reached the index (never without one).
async fn logged(waiting: Option<&mut (LogWaiter, u64)>) -> Result<(), DcasError> {
    match waiting {
        Some((w, at)) => w.reached(*at).await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::JobGraph;
    use crate::operator::OperatorRegistry;
    use crate::runtime::channel::channel;
    use crate::runtime::deploy::{build_runner, SubtaskEnv};
    use crate::runtime::local::CollectBuffer;
    use crate::spec::JobSpec;

    /// Ensures a subtask takes only rewires built for its own attempt: one restarted on the
    /// same task manager must not take the channels a late rewire wired for its previous
    /// instance, and it still takes its own.
    #[tokio::test]
    async fn rewires_for_another_attempt_are_dropped() {
        let spec = JobSpec::from_json(
            r#"{"name":"t","operators":[
            {"id":"src","kind":"generator","parallelism":1},
            {"id":"m","kind":"map","input":"src","parallelism":2,"params":{"expr":"value"}},
            {"id":"out","kind":"discard","input":"m","parallelism":2}]}"#,
        )
        .unwrap();
        let graph = JobGraph::build(&spec, &OperatorRegistry::builtin()).unwrap();
        let env = SubtaskEnv {
            collect: Arc::new(CollectBuffer::default()),
            checkpoints: None,
            attempt: 1,
            dcas: None,
        };
        let (mut first, input) = channel(4, 0);
        let (mut runner, _) = build_runner("t", &graph, 1, 0, vec![input], vec![], &env).unwrap();
        runner.attempt = 2;
        let rewire = |attempt| {
            let (tx, rx) = channel(4, 0);
            let rw = Rewire {
                inputs: vec![(0, rx)],
                outputs: vec![],
                seq: 7,
                attempt,
            };
            (tx, rw)
        };
        async fn read(runner: &mut SubtaskRunner, tx: &mut OutputChannel, wm: i64) -> StreamEvent {
            tx.send(StreamEvent::Watermark(wm).into()).await.unwrap();
            let next = tokio::time::timeout(Duration::from_secs(5), runner.gate.next());
            next.await.expect("an event").unwrap().1.event
        }

        let (_stale, rw) = rewire(1);
        assert!(runner.apply_rewire(rw).await.is_ok());
        let got = read(&mut runner, &mut first, 1).await;
        assert_eq!(
            got,
            StreamEvent::Watermark(1),
            "the stale rewire was dropped"
        );

        let (mut own, rw) = rewire(2);
        assert!(runner.apply_rewire(rw).await.is_ok());
        let got = read(&mut runner, &mut own, 2).await;
        assert_eq!(got, StreamEvent::Watermark(2), "its own rewire applies");
    }
}
