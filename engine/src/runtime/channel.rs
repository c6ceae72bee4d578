//! Channels between subtasks: credit-based flow control, per-channel sequence numbers, and
//! the routing of a task's output over its exchanges.
//!
//! A channel connects one upstream subtask to one downstream subtask. The receiver grants
//! `credits` batch slots up front; a sender holding no credit waits (backpressure) and gets
//! one back each time the receiver takes a batch. So each channel buffers at most
//! `credits × batch_size` records, and a slow consumer bounds the memory of the whole job.
//! (In process the credits are the slots of a bounded tokio channel; across processes the
//! receiver announces them in frames.)
//!
//! Sequence numbers are dense per channel: batch `b` carries records
//! `b.first_seq .. b.end_seq()`. The receiver drops any record whose seq it already took,
//! and treats a gap as data loss (an error), never silently.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;

use super::credit;
use super::dcas::{RetainedBatch, RetainedOutput};
use crate::codec::CodecError;
use crate::graph::{subtask_for_hash, Exchange};
use crate::net::RemoteSender;
use crate::operator::{eval, OpError};
use crate::record::{Batch, Delivery, Record, Seq, StreamEvent};

/// Error of a channel: the other side is gone, or the stream broke its seq invariant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    /// The receiver was dropped (its subtask stopped).
    #[error("downstream channel closed")]
    Closed,
    /// The sender was dropped without sending `EndOfStream`.
    #[error("upstream channel {channel} closed before end of stream{}", match cause {
        Some(credit::CloseCause::Failed(why)) => format!(": {why}"),
        Some(credit::CloseCause::Released) => ": deployment released".to_string(),
        Some(credit::CloseCause::UpstreamFailed) => ": the upstream subtask failed".to_string(),
        None => String::new(),
    })]
    Disconnected {
        /// Index of the channel in the input gate.
        channel: usize,
        /// Why, when the sender said.
        cause: Option<credit::CloseCause>,
    },
    /// A batch skipped sequence numbers: records were lost.
    #[error("channel {channel}: expected seq {expected}, got {got}")]
    Gap {
        /// Index of the channel in the input gate.
        channel: usize,
        /// Next seq the receiver expected.
        expected: Seq,
        /// First seq of the batch that arrived.
        got: Seq,
    },
}

/// Creates a channel granting `credits` batches.
pub fn channel(credits: usize, input: usize) -> (OutputChannel, InputChannel) {
    let (tx, rx) = credit::channel(credits);
    (OutputChannel::local(tx), InputChannel::new(rx, input))
}

/// DCAS: both ends of a channel whose other end is gone already (its task manager died
/// while this end was being wired, before the job manager knew): the input reads as
/// disconnected, so its subtask detaches it, and the output as closed, so its router
/// retains what it sends; a rewire to the restarted neighbour replaces either.
pub fn severed(input: usize, why: String) -> (OutputChannel, InputChannel) {
    let (tx, rx) = credit::channel(1);
    tx.close(credit::CloseCause::Failed(why));
    let output = OutputChannel {
        tx: Tx::Local(tx),
        next_seq: 0,
        detached: true,
        logged: 0,
    };
    (output, InputChannel::new(rx, input))
}

impl InputChannel {
    /// The receiving end of a channel feeding logical input `input`.
    pub fn new(rx: credit::Receiver, input: usize) -> InputChannel {
        InputChannel {
            rx,
            input,
            next_seq: 0,
            watermark: i64::MIN,
            marker: i64::MIN,
            ended: false,
            detached: false,
        }
    }
}

/// Sending end of a channel.
pub struct OutputChannel {
    tx: Tx,
    /// Seq of the next record sent.
    next_seq: Seq,
    /// DCAS: the receiver went away; sends are dropped (the router retains them) until the
    /// channel is rewired to the receiver's restarted instance.
    detached: bool,
    /// DCAS: the receiver is known to have logged every seq below this, so a batch wholly
    /// below it is not sent (a restarted sender replaying its log regenerates such output).
    logged: Seq,
}

/// Where an output channel's events go: a subtask in this process, or one on another task
/// manager through the data plane. Both wait for credits the receiver granted.
enum Tx {
    Local(credit::Sender),
    Remote(RemoteSender),
}

impl OutputChannel {
    /// The sending end of a channel whose receiver is in this process.
    pub fn local(tx: credit::Sender) -> OutputChannel {
        OutputChannel {
            tx: Tx::Local(tx),
            next_seq: 0,
            detached: false,
            logged: 0,
        }
    }

    /// DCAS: the seq below which the receiver acked every record as logged (0 before any
    /// ack).
    pub fn receiver_logged(&self) -> Seq {
        match &self.tx {
            Tx::Local(tx) => tx.receiver_logged(),
            Tx::Remote(tx) => tx.receiver_logged(),
        }
    }

    /// The sending end of a channel whose receiver is on another task manager.
    pub fn remote(tx: RemoteSender) -> OutputChannel {
        OutputChannel {
            tx: Tx::Remote(tx),
            next_seq: 0,
            detached: false,
            logged: 0,
        }
    }

    /// Sends records as one batch, waiting for a credit. Returns the time spent waiting.
    pub async fn send_records(
        &mut self,
        records: Vec<Record>,
    ) -> Result<std::time::Duration, ChannelError> {
        let batch = Batch {
            first_seq: self.next_seq,
            records,
        };
        self.next_seq = batch.end_seq();
        self.send(StreamEvent::Data(batch).into()).await
    }

    /// Sends an event, waiting for a credit. Returns the time spent waiting.
    pub async fn send(&mut self, event: Delivery) -> Result<std::time::Duration, ChannelError> {
        let tried = match &self.tx {
            Tx::Local(tx) => tx.try_send(event),
            Tx::Remote(tx) => tx.try_send(event),
        };
        match tried.map_err(|_| ChannelError::Closed)? {
            Ok(()) => Ok(std::time::Duration::ZERO),
            Err(event) => {
                let started = Instant::now();
                let sent = match &self.tx {
                    Tx::Local(tx) => tx.send(event).await,
                    Tx::Remote(tx) => tx.send(event).await,
                };
                sent.map_err(|_| ChannelError::Closed)?;
                Ok(started.elapsed())
            }
        }
    }

    /// Tells a local receiver why this sender stops (remote receivers learn it from their
    /// own task manager's release).
    pub fn close(&self, cause: credit::CloseCause) {
        if let Tx::Local(tx) = &self.tx {
            tx.close(cause);
        }
    }

    /// Batches currently buffered in a local channel (credits in use); 0 for remote ones.
    pub fn in_flight(&self) -> usize {
        match &self.tx {
            Tx::Local(tx) => tx.in_flight(),
            Tx::Remote(_) => 0,
        }
    }
}

/// Receiving end of a channel, with its progress.
pub struct InputChannel {
    rx: credit::Receiver,
    /// Logical input of the head operator this channel feeds (0, or 1 for a join's right).
    pub input: usize,
    /// Seq of the next record expected.
    next_seq: Seq,
    /// Latest watermark received.
    pub watermark: i64,
    /// Origin of the latest latency marker received (`i64::MIN`: none yet).
    marker: i64,
    /// `EndOfStream` received.
    pub ended: bool,
    /// DCAS: the sender went away; not read until rewired to its restarted instance.
    detached: bool,
}

/// Where a channel's receiver stands: what a DCAS snapshot keeps of each input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct InputPosition {
    /// Seq of the next record expected.
    pub next_seq: Seq,
    /// Latest watermark received.
    pub watermark: i64,
    /// `EndOfStream` received.
    pub ended: bool,
}

/// Where a router stands: what a DCAS snapshot keeps of the output side, so a restarted
/// subtask assigns the same seqs to the same records.
#[derive(Clone, Debug, Default, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct RouterPosition {
    /// Per route, per target: the next seq to assign.
    pub next_seqs: Vec<Vec<Seq>>,
    /// Per route: the rebalance target receiving the next record.
    pub rr: Vec<u32>,
    /// Records partitioned but not sent yet, per (route, target).
    pub pending: Vec<RetainedBatch>,
    /// Output sent but not yet known to be logged by the receivers.
    pub retained: Vec<RetainedBatch>,
    /// The last watermark broadcast.
    pub watermark: i64,
    /// `EndOfStream` was broadcast.
    pub ended: bool,
}

/// The inputs of a subtask, read fairly.
pub struct InputGate {
    channels: Vec<InputChannel>,
    /// Channel polled first next time (round-robin fairness).
    next: usize,
    /// Channels held back by barrier alignment: not read until released.
    blocked: Vec<bool>,
}

impl InputGate {
    /// A gate over `channels`.
    pub fn new(channels: Vec<InputChannel>) -> InputGate {
        let blocked = vec![false; channels.len()];
        InputGate {
            channels,
            next: 0,
            blocked,
        }
    }

    /// Stops reading channel `i` (it delivered a barrier; its data after the barrier waits
    /// in the channel, and its sender runs out of credits: backpressure, no buffering).
    pub fn block(&mut self, i: usize) {
        self.blocked[i] = true;
    }

    /// Reads every channel again.
    pub fn unblock_all(&mut self) {
        self.blocked.iter_mut().for_each(|b| *b = false);
    }

    /// True when every channel is blocked or ended (alignment done).
    pub fn all_blocked_or_ended(&self) -> bool {
        self.channels
            .iter()
            .zip(&self.blocked)
            .all(|(c, b)| *b || c.ended)
    }

    /// Number of channels.
    pub fn len(&self) -> usize {
        self.channels.len()
    }

    /// True when the gate has no channel (a source task).
    pub fn is_empty(&self) -> bool {
        self.channels.is_empty()
    }

    /// The channels.
    pub fn channels(&self) -> &[InputChannel] {
        &self.channels
    }

    /// True when every channel delivered `EndOfStream`.
    pub fn all_ended(&self) -> bool {
        self.channels.iter().all(|c| c.ended)
    }

    /// Minimum watermark over channels still open (ended channels do not hold it back).
    pub fn watermark(&self) -> i64 {
        self.channels
            .iter()
            .filter(|c| !c.ended)
            .map(|c| c.watermark)
            .min()
            .unwrap_or(i64::MAX)
    }

    /// The oldest latency marker over channels still open, once each delivered one (ended
    /// channels do not hold it back); `None` before, or when every channel ended. A
    /// detached channel holds it back: nothing from its sender gets through.
    pub fn marker(&self) -> Option<i64> {
        let open = self.channels.iter().filter(|c| !c.ended);
        open.map(|c| c.marker).min().filter(|&m| m != i64::MIN)
    }

    /// The next event of any channel, with the channel index. Already-seen records are
    /// removed from data batches (a batch left empty is skipped; one left shorter loses the
    /// encoding it came with). Waits while every open, unblocked channel is empty; must not
    /// be called once all channels ended or blocked.
    pub async fn next(&mut self) -> Result<(usize, Delivery), ChannelError> {
        loop {
            let (i, event) = poll_fn(|cx| {
                let n = self.channels.len();
                for k in 0..n {
                    let i = (self.next + k) % n;
                    let ch = &mut self.channels[i];
                    if ch.ended || ch.detached || self.blocked[i] {
                        continue;
                    }
                    match ch.rx.poll_recv(cx) {
                        Poll::Ready(Some(ev)) => {
                            self.next = (i + 1) % n;
                            return Poll::Ready(Ok((i, ev)));
                        }
                        Poll::Ready(None) => {
                            return Poll::Ready(Err(ChannelError::Disconnected {
                                channel: i,
                                cause: ch.rx.close_cause(),
                            }))
                        }
                        Poll::Pending => {}
                    }
                }
                Poll::Pending
            })
            .await?;
            match self.channels[i].accept(event) {
                Ok(Some(event)) => return Ok((i, event)),
                Ok(None) => continue,
                Err((expected, got)) => {
                    return Err(ChannelError::Gap {
                        channel: i,
                        expected,
                        got,
                    })
                }
            }
        }
    }

    /// DCAS: stops reading channel `i` (its sender went away) until it is rewired.
    pub fn detach(&mut self, i: usize) {
        if let Some(c) = self.channels.get_mut(i) {
            c.detached = true;
        }
    }

    /// DCAS: tells channel `i`'s sender that every record below `next_seq` is in this
    /// subtask's input log.
    pub fn ack_logged(&self, i: usize, next_seq: Seq) {
        if let Some(c) = self.channels.get(i) {
            c.rx.ack_logged(next_seq);
        }
    }

    /// DCAS: channel `i` now receives from `ch` (the restarted sender's channel), keeping
    /// its position: what the restarted sender sends again is dropped as already seen.
    pub fn rewire(&mut self, i: usize, ch: InputChannel) {
        if let Some(c) = self.channels.get_mut(i) {
            c.rx = ch.rx;
            c.detached = false;
        }
    }

    /// Every channel's position, in gate order.
    pub fn positions(&self) -> Vec<InputPosition> {
        self.channels
            .iter()
            .map(|c| InputPosition {
                next_seq: c.next_seq,
                watermark: c.watermark,
                ended: c.ended,
            })
            .collect()
    }

    /// Sets every channel's position (a restored snapshot); `Err` when the counts differ.
    pub fn restore_positions(&mut self, positions: &[InputPosition]) -> Result<(), String> {
        if positions.len() != self.channels.len() {
            return Err(format!(
                "the snapshot has {} input channels, the subtask {}",
                positions.len(),
                self.channels.len()
            ));
        }
        for (c, p) in self.channels.iter_mut().zip(positions) {
            c.next_seq = p.next_seq;
            c.watermark = p.watermark;
            c.ended = p.ended;
        }
        Ok(())
    }

    /// Replays a logged event of channel `i` as if it was read now: the channel's position
    /// moves exactly as it did when the event was first consumed. Returns what reading it
    /// returned then (`None`: nothing new).
    pub fn replay(&mut self, i: usize, event: StreamEvent) -> Result<Option<StreamEvent>, String> {
        let n = self.channels.len();
        let c = self
            .channels
            .get_mut(i)
            .ok_or_else(|| format!("logged channel {i}, the subtask has {n}"))?;
        let accepted = c.accept(Delivery::new(event)).map_err(|(expected, got)| {
            format!("logged channel {i} skips from seq {expected} to {got}")
        })?;
        Ok(accepted.map(|d| d.event))
    }
}

impl InputChannel {
    /// Takes an event read from the channel into its position; drops records already
    /// seen. `Ok(None)`: a batch with nothing new. `Err` (from [`InputGate::next`] as a
    /// `Gap`) when records were skipped.
    fn accept(&mut self, input: Delivery) -> Result<Option<Delivery>, (Seq, Seq)> {
        match input.event {
            StreamEvent::Data(mut batch) => {
                if batch.first_seq > self.next_seq {
                    return Err((self.next_seq, batch.first_seq));
                }
                let end = batch.end_seq();
                if end <= self.next_seq {
                    return Ok(None); // a resent batch we already have entirely
                }
                let seen = (self.next_seq - batch.first_seq) as usize;
                self.next_seq = end;
                if seen == 0 {
                    let event = StreamEvent::Data(batch);
                    return Ok(Some(Delivery { event, ..input }));
                }
                batch.records.drain(..seen);
                batch.first_seq = end - batch.len() as u64;
                return Ok(Some(Delivery::new(StreamEvent::Data(batch))));
            }
            StreamEvent::Watermark(w) => self.watermark = self.watermark.max(w),
            StreamEvent::EndOfStream => self.ended = true,
            StreamEvent::Marker(at) => self.marker = self.marker.max(at),
            StreamEvent::Barrier(_) => {}
        }
        Ok(Some(input))
    }
}

/// Counters of a router, shared with whoever reports metrics.
#[derive(Debug, Default)]
pub struct RouterCounters {
    /// Records sent downstream.
    pub records_out: AtomicU64,
    /// Nanoseconds spent waiting for credits (backpressure).
    pub backpressure_ns: AtomicU64,
    /// DCAS: the latest rewire (the job manager's number) after which every receiver
    /// rewired to its restarted instance had logged what was sent to it before (its
    /// backlog); 0 before any. Stored after `receivers_caught_up_ms` (Release): a reader
    /// that loads it first (Acquire) reads that time or a later one.
    pub receivers_caught_up: AtomicU64,
    /// DCAS: when they had, in ms since the epoch; 0 before any rewire.
    pub receivers_caught_up_ms: AtomicU64,
}

/// One outgoing edge: its exchange, channels (one per target subtask) and pending batches.
pub struct Route {
    exchange: Exchange,
    targets: Vec<OutputChannel>,
    buffers: Vec<Vec<Record>>,
    /// Batches of each target that left the buffers (sent, or sealed for the log): a
    /// latency marker waits until the batches holding the records before it have.
    released: Vec<u64>,
    /// Rebalance: the target receiving the next record.
    rr: usize,
}

impl Route {
    /// A route over `targets`; a `Forward` route has exactly one target.
    pub fn new(exchange: Exchange, targets: Vec<OutputChannel>, start: usize) -> Route {
        let n = targets.len();
        Route {
            exchange,
            targets,
            buffers: (0..n).map(|_| Vec::new()).collect(),
            released: vec![0; n],
            rr: start % n.max(1),
        }
    }
}

/// Routes a task's output over its edges, batching per target.
pub struct Router {
    routes: Vec<Route>,
    batch_size: usize,
    /// When the oldest unsent record was buffered (for the linger timeout).
    pending_since: Option<Instant>,
    counters: Arc<RouterCounters>,
    /// DCAS: every batch sent, until its receiver logged it; `None` without DCAS. With it,
    /// a channel whose receiver went away is detached instead of failing the subtask.
    retained: Option<RetainedOutput>,
    /// Hash and rebalance routes: buffers that reached the batch size while records were
    /// dealt out, cut there, oldest first: a buffer never grows past a batch (no
    /// reallocation, and no split leaving a small batch behind). Sent (or sealed) before
    /// the buffers.
    full: VecDeque<((usize, usize), Vec<Record>)>,
    /// DCAS (log before release): batches cut from the buffers, oldest first, each waiting
    /// until the input log holds the entries its records came from.
    sealed: VecDeque<Sealed>,
    /// The last watermark broadcast (sent again to a rewired receiver).
    watermark: i64,
    /// `EndOfStream` was broadcast.
    ended: bool,
    /// DCAS: rewired channels whose restarted receiver has not yet logged everything sent
    /// before the rewire, with the seq it must reach.
    backlogs: Vec<((usize, usize), Seq)>,
    /// DCAS: the number of the latest rewire applied.
    rewire: u64,
    /// Latency markers waiting for the records buffered before them to leave, oldest
    /// first.
    markers: VecDeque<WaitingMarker>,
}

/// Latency markers waiting at once, at most: a newer one is dropped while this many wait.
const MAX_WAITING_MARKERS: usize = 8;

/// A latency marker waiting for the batches holding the records routed before it.
struct WaitingMarker {
    at: i64,
    /// For each channel that held records when the marker came, the count of its released
    /// batches (see [`Route::released`]) that includes them.
    after: Vec<((usize, usize), u64)>,
}

/// Output waiting for the input log (DCAS), or a latency marker behind such output.
struct Sealed {
    /// Log entries (count from the start of the log) that must be logged first; a marker
    /// waits for nothing but the output ahead of it.
    required: u64,
    what: Held,
}

/// What a [`Sealed`] holds.
enum Held {
    /// Records for (route, target).
    Records((usize, usize), Vec<Record>),
    /// A latency marker for every channel.
    Marker(i64),
}

impl Router {
    /// A router over `routes` that sends batches of `batch_size` records.
    pub fn new(routes: Vec<Route>, batch_size: usize, counters: Arc<RouterCounters>) -> Router {
        Router {
            routes,
            batch_size: batch_size.max(1),
            pending_since: None,
            counters,
            retained: None,
            full: VecDeque::new(),
            sealed: VecDeque::new(),
            watermark: i64::MIN,
            ended: false,
            backlogs: Vec::new(),
            rewire: 0,
            markers: VecDeque::new(),
        }
    }

    /// DCAS: retain every batch sent until its receiver logged it, and detach channels
    /// whose receiver went away instead of failing.
    pub fn retain_output(&mut self) {
        self.retained.get_or_insert_with(RetainedOutput::default);
    }

    /// True when the router has somewhere to send (a subtask without routes ends in
    /// sinks).
    pub fn has_routes(&self) -> bool {
        !self.routes.is_empty()
    }

    /// DCAS: whether a rewired receiver has yet to log its backlog.
    pub fn awaits_backlogs(&self) -> bool {
        !self.backlogs.is_empty()
    }

    /// Records retained (0 without DCAS).
    pub fn retained_records(&self) -> usize {
        self.retained.as_ref().map_or(0, RetainedOutput::records)
    }

    /// Forgets retained output its receivers have logged: below `logged[route][target]`.
    /// Marks the time when the last rewired receiver's backlog is logged.
    pub fn trim(&mut self, logged: &[Vec<Seq>]) {
        if let Some(r) = &mut self.retained {
            r.trim(logged);
        }
        if self.backlogs.is_empty() {
            return;
        }
        let at = |(r, t): (usize, usize)| logged.get(r).and_then(|l| l.get(t)).copied();
        self.backlogs
            .retain(|&(channel, end)| at(channel).is_none_or(|seq| seq < end));
        if self.backlogs.is_empty() {
            self.counters
                .receivers_caught_up_ms
                .store(crate::telemetry::now_ms(), Ordering::Relaxed);
            self.counters
                .receivers_caught_up
                .store(self.rewire, Ordering::Release);
        }
    }

    /// DCAS, during a recovery: counts the backlogs the rewired receivers acked on their
    /// channels as logged (and trims what they acked), without waiting for the progress
    /// exchange through the cache.
    pub fn receivers_acked(&mut self) {
        if self.backlogs.is_empty() {
            return;
        }
        let acked: Vec<Vec<Seq>> = self
            .routes
            .iter()
            .map(|r| {
                r.targets
                    .iter()
                    .map(OutputChannel::receiver_logged)
                    .collect()
            })
            .collect();
        self.trim(&acked);
    }

    /// The router's position: seqs, unsent records, retained output, last broadcast.
    pub fn position(&self) -> RouterPosition {
        // Unsent records of a channel in order: its sealed batches, the batches cut while
        // partitioning, then its buffer; each with the seqs it will be sent with.
        let mut next: Vec<Vec<Seq>> = self
            .routes
            .iter()
            .map(|r| r.targets.iter().map(|t| t.next_seq).collect())
            .collect();
        let mut pack = |(r, t): (usize, usize), records: &[Record]| {
            let first_seq = next[r][t];
            next[r][t] += records.len() as u64;
            RetainedBatch::pack((r as u32, t as u32), first_seq, records)
        };
        let sealed = self.sealed.iter().filter_map(|s| match &s.what {
            Held::Records(channel, records) => Some((*channel, records)),
            Held::Marker(_) => None,
        });
        let cut = self
            .full
            .iter()
            .map(|(channel, records)| (*channel, records));
        let mut pending: Vec<RetainedBatch> = sealed
            .chain(cut)
            .map(|(c, records)| pack(c, records))
            .collect();
        for (r, route) in self.routes.iter().enumerate() {
            for (t, buf) in route.buffers.iter().enumerate() {
                if !buf.is_empty() {
                    pending.push(pack((r, t), buf));
                }
            }
        }
        RouterPosition {
            next_seqs: self
                .routes
                .iter()
                .map(|r| r.targets.iter().map(|t| t.next_seq).collect())
                .collect(),
            rr: self.routes.iter().map(|r| r.rr as u32).collect(),
            pending,
            retained: self
                .retained
                .as_ref()
                .map(|r| r.batches().cloned().collect())
                .unwrap_or_default(),
            watermark: self.watermark,
            ended: self.ended,
        }
    }

    /// Restores a position taken by [`Router::position`] on a router of the same shape.
    pub fn restore_position(&mut self, p: RouterPosition) -> Result<(), String> {
        let shape: Vec<usize> = self.routes.iter().map(|r| r.targets.len()).collect();
        let theirs: Vec<usize> = p.next_seqs.iter().map(Vec::len).collect();
        if shape != theirs || p.rr.len() != shape.len() {
            return Err(format!(
                "the snapshot's output channels {theirs:?} do not match the subtask's {shape:?}"
            ));
        }
        for b in &p.retained {
            b.check().map_err(|e| {
                let (r, t) = b.channel;
                format!("the snapshot's retained output for channel {r}.{t}: {e}")
            })?;
        }
        for ((route, seqs), rr) in self.routes.iter_mut().zip(&p.next_seqs).zip(&p.rr) {
            for (t, &seq) in route.targets.iter_mut().zip(seqs) {
                t.next_seq = seq;
            }
            route.rr = *rr as usize % route.targets.len().max(1);
        }
        for b in p.pending {
            let (r, t) = (b.channel.0 as usize, b.channel.1 as usize);
            let batch = b
                .unpack()
                .map_err(|e| format!("the snapshot's unsent output for channel {r}.{t}: {e}"))?;
            let buf = self
                .routes
                .get_mut(r)
                .and_then(|route| route.buffers.get_mut(t))
                .ok_or_else(|| format!("the snapshot has output for channel {r}.{t}"))?;
            buf.extend(batch.records);
            self.pending_since.get_or_insert_with(Instant::now);
        }
        self.sealed.clear();
        self.full.clear();
        self.markers.clear();
        self.retained = Some(RetainedOutput::from_batches(p.retained));
        self.watermark = p.watermark;
        self.ended = p.ended;
        Ok(())
    }

    /// DCAS: channel `(route, target)` now goes to `ch` (its receiver's restarted
    /// instance), by the job manager's rewire number `seq`; everything retained for it is
    /// sent again, then the last watermark and end of stream. The receiver drops what it
    /// already logged.
    pub async fn rewire(
        &mut self,
        route: usize,
        target: usize,
        mut ch: OutputChannel,
        seq: u64,
    ) -> Result<(), RouteError> {
        let Some(old) = self
            .routes
            .get_mut(route)
            .and_then(|r| r.targets.get_mut(target))
        else {
            return Ok(());
        };
        ch.next_seq = old.next_seq;
        ch.logged = old.logged;
        *old = ch;
        self.backlogs.retain(|&(c, _)| c != (route, target));
        self.backlogs.push(((route, target), old.next_seq));
        self.rewire = self.rewire.max(seq);
        self.resend(route, target).await
    }

    /// DCAS, a restarted subtask before it replays its log: its receivers have logged
    /// every seq below `logged[route][target]`. Forgets the retained output they have, and
    /// sends no batch that lies wholly below: the replay regenerates such output only to
    /// reach the seqs after it, and a receiver would drop it.
    pub fn receivers_logged(&mut self, logged: &[Vec<Seq>]) {
        self.trim(logged);
        for (route, seqs) in self.routes.iter_mut().zip(logged) {
            for (t, &seq) in route.targets.iter_mut().zip(seqs) {
                t.logged = t.logged.max(seq);
            }
        }
    }

    /// Sends everything retained again on every channel (a restarted subtask's first
    /// step: its receivers may have missed what it sent before the crash).
    pub async fn resend_all(&mut self) -> Result<(), RouteError> {
        for r in 0..self.routes.len() {
            for t in 0..self.routes[r].targets.len() {
                self.resend(r, t).await?;
            }
        }
        Ok(())
    }

    async fn resend(&mut self, route: usize, target: usize) -> Result<(), RouteError> {
        let channel = (route as u32, target as u32);
        let batches: Vec<Delivery> = self
            .retained
            .as_ref()
            .map(|r| {
                r.batches()
                    .filter(|b| b.channel == channel)
                    .map(|b| b.delivery().map_err(RouteError::Retained))
                    .collect()
            })
            .transpose()?
            .unwrap_or_default();
        let keep = self.retained.is_some();
        let ch = &mut self.routes[route].targets[target];
        for b in batches {
            deliver(ch, b, keep).await?;
        }
        if self.watermark > i64::MIN {
            let wm = StreamEvent::Watermark(self.watermark);
            deliver(ch, wm.into(), keep).await?;
        }
        if self.ended {
            deliver(ch, StreamEvent::EndOfStream.into(), keep).await?;
        }
        Ok(())
    }

    /// Whether `EndOfStream` was sent (the subtask finished).
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// When buffered records were first held back, if any are.
    pub fn pending_since(&self) -> Option<Instant> {
        self.pending_since
    }

    /// Partitions `records` into the routes' buffers (leaving `records` empty) and sends
    /// every buffer that is full.
    pub async fn push(&mut self, records: &mut Vec<Record>) -> Result<(), RouteError> {
        self.stage(records)?;
        self.send_full().await
    }

    /// Partitions `records` into the routes' buffers (leaving `records` empty) without
    /// sending anything.
    pub fn stage(&mut self, records: &mut Vec<Record>) -> Result<(), RouteError> {
        if records.is_empty() {
            return Ok(());
        }
        if self.routes.is_empty() {
            records.clear();
            return Ok(());
        }
        self.pending_since.get_or_insert_with(Instant::now);
        let last = self.routes.len() - 1;
        for r in 0..self.routes.len() {
            if r < last {
                let mut copy = records.clone();
                self.push_route(r, &mut copy)?;
            } else {
                self.push_route(r, records)?;
            }
        }
        Ok(())
    }

    fn push_route(&mut self, r: usize, records: &mut Vec<Record>) -> Result<(), RouteError> {
        let size = self.batch_size;
        let full = &mut self.full;
        let route = &mut self.routes[r];
        let n = route.targets.len();
        // Puts one record into target `t`'s buffer, cutting the buffer when it is full.
        let mut put = |t: usize, rec: Record| {
            let buf = &mut route.buffers[t];
            if buf.capacity() == 0 {
                buf.reserve_exact(size);
            }
            buf.push(rec);
            if buf.len() >= size {
                full.push_back(((r, t), std::mem::replace(buf, Vec::with_capacity(size))));
            }
        };
        match &route.exchange {
            // With one target every exchange but broadcast is a forward: skip hashing.
            Exchange::Forward | Exchange::Rebalance | Exchange::Hash(_) if n == 1 => {
                // Copied (one `memcpy`), not swapped in: the caller keeps its vector, which
                // its core has in cache, and fills it again. Handing it over made the caller
                // write its next records into memory the allocator recycled from the receiving
                // core's batches, a cache-line transfer per record: a two-thread pipeline ran
                // at 11 M records/s in one run of three, 24-29 M copying (BENCHMARKS.md).
                route.buffers[0].append(records);
            }
            // A forward route has one target (`deploy`), so it takes the arm above.
            Exchange::Forward | Exchange::Rebalance => {
                // One record to each target in turn, so a record's channel and seq follow
                // from the records before it alone, wherever the linger timer cut the
                // batches: a DCAS replay, which has no timer, deals them out the same.
                let mut t = route.rr;
                for rec in records.drain(..) {
                    put(t, rec);
                    t = if t + 1 == n { 0 } else { t + 1 };
                }
                route.rr = t;
            }
            Exchange::Broadcast => {
                for (i, buf) in route.buffers.iter_mut().enumerate() {
                    if i + 1 == n {
                        buf.append(records);
                    } else {
                        buf.extend(records.iter().cloned());
                    }
                }
            }
            Exchange::Hash(None) => {
                for rec in records.drain(..) {
                    let h = rec.key.as_ref().map_or(0, |k| k.stable_hash());
                    put(subtask_for_hash(h, n), rec);
                }
            }
            Exchange::Hash(Some(e)) => {
                for rec in records.drain(..) {
                    let h = eval(e, &rec).map_err(RouteError::Partition)?.stable_hash();
                    put(subtask_for_hash(h, n), rec);
                }
            }
        }
        Ok(())
    }

    /// True when a buffer is full, so the next [`Router::send_full`] sends.
    pub fn has_full(&self) -> bool {
        !self.full.is_empty()
            || self
                .routes
                .iter()
                .any(|r| r.buffers.iter().any(|b| b.len() >= self.batch_size))
    }

    /// DCAS (log before release): cuts every full buffer (with `all`, every non-empty one)
    /// into a sealed batch that leaves once the input log holds `required` entries — the
    /// inputs its records came from — so the subtask goes on while the log catches up.
    pub fn seal(&mut self, required: u64, all: bool) {
        let size = self.batch_size;
        for ((r, t), records) in self.full.drain(..) {
            self.routes[r].released[t] += 1;
            self.sealed.push_back(Sealed {
                required,
                what: Held::Records((r, t), records),
            });
        }
        for (r, route) in self.routes.iter_mut().enumerate() {
            for (t, buf) in route.buffers.iter_mut().enumerate() {
                if buf.len() >= size || all && !buf.is_empty() {
                    let records = std::mem::replace(buf, Vec::with_capacity(size));
                    route.released[t] += 1;
                    self.sealed.push_back(Sealed {
                        required,
                        what: Held::Records((r, t), records),
                    });
                }
            }
        }
        if self.buffers_empty() {
            self.pending_since = None;
        }
        self.queue_marker();
    }

    /// Sends a latency marker from `at` on every channel, behind every record buffered so
    /// far: at once when none is, else as soon as each batch holding such records has left
    /// (or has been sealed; then the marker leaves right after the last sealed batch).
    /// Records buffered before a marker leave within the linger time, so a marker waits no
    /// longer than they do, and records routed after it do not hold it back: batching is
    /// the same with markers as without.
    ///
    /// While [`MAX_WAITING_MARKERS`] wait, a newer marker is dropped: the waiting ones
    /// stand for the records that have waited longest, and the oldest origin is the
    /// earliest moment whose data is known to have left. Keeping newer ones instead would
    /// hide that time, and a recovery's end (the first marker after the inputs caught up
    /// that arrives in time) would be timed late.
    pub async fn mark(&mut self, at: i64) -> Result<(), RouteError> {
        if self.markers.len() < MAX_WAITING_MARKERS {
            let mut after = Vec::new();
            for (r, route) in self.routes.iter().enumerate() {
                for (t, buf) in route.buffers.iter().enumerate() {
                    let cut = self.full.iter().filter(|(c, _)| *c == (r, t)).count();
                    let held = cut as u64 + u64::from(!buf.is_empty());
                    if held > 0 {
                        after.push(((r, t), route.released[t] + held));
                    }
                }
            }
            self.markers.push_back(WaitingMarker { at, after });
        }
        self.queue_marker();
        self.send_markers().await
    }

    /// Queues, oldest first, each waiting marker whose records have left behind the sealed
    /// output. Markers with nothing between them all go, one after the other: each times
    /// the data sent before it, so a newer one behind the same batch is no duplicate (a
    /// recovery's end is the first marker sent after the inputs caught up, and merging it
    /// into an older one would time the end a batch late). While
    /// [`MAX_WAITING_MARKERS`] are queued in a row (the log holds the batch ahead), a newer
    /// one is dropped, as in [`Router::mark`].
    fn queue_marker(&mut self) {
        let routes = &self.routes;
        let released = |&((r, t), n): &((usize, usize), u64)| routes[r].released[t] >= n;
        while let Some(m) = self.markers.front() {
            if !m.after.iter().all(released) {
                return;
            }
            let at = m.at;
            self.markers.pop_front();
            let in_a_row = self
                .sealed
                .iter()
                .rev()
                .take_while(|s| matches!(s.what, Held::Marker(_)))
                .count();
            if in_a_row < MAX_WAITING_MARKERS {
                let what = Held::Marker(at);
                self.sealed.push_back(Sealed { required: 0, what });
            }
        }
    }

    /// Sends the markers at the head of the sealed output.
    async fn send_markers(&mut self) -> Result<(), RouteError> {
        while let Some(&Sealed {
            what: Held::Marker(at),
            ..
        }) = self.sealed.front()
        {
            self.sealed.pop_front();
            self.deliver_all(StreamEvent::Marker(at)).await?;
        }
        Ok(())
    }

    /// Sealed batches waiting for the log.
    pub fn sealed(&self) -> usize {
        let batches = self.sealed.iter();
        batches
            .filter(|s| matches!(s.what, Held::Records(..)))
            .count()
    }

    /// Log entries the oldest sealed batch waits for, if any waits.
    pub fn sealed_requires(&self) -> Option<u64> {
        self.sealed.front().map(|s| s.required)
    }

    /// Sends, oldest first, every sealed batch whose inputs are among the first `logged`
    /// log entries, and the markers behind them.
    pub async fn send_sealed(&mut self, logged: u64) -> Result<(), RouteError> {
        while let Some(s) = self.sealed.pop_front() {
            let ((r, t), records) = match s.what {
                Held::Marker(at) => {
                    self.deliver_all(StreamEvent::Marker(at)).await?;
                    continue;
                }
                Held::Records(..) if s.required > logged => {
                    self.sealed.push_front(s);
                    break;
                }
                Held::Records(channel, records) => (channel, records),
            };
            let out = Out {
                channel: (r as u32, t as u32),
                counters: &self.counters,
                retained: &mut self.retained,
            };
            send_chunked(
                &mut self.routes[r].targets[t],
                records,
                self.batch_size,
                out,
            )
            .await?;
        }
        Ok(())
    }

    fn buffers_empty(&self) -> bool {
        self.full.is_empty()
            && self
                .routes
                .iter()
                .all(|r| r.buffers.iter().all(Vec::is_empty))
    }

    /// Sends the batches cut while partitioning, oldest first.
    async fn send_cut(&mut self) -> Result<(), RouteError> {
        while let Some(((r, t), records)) = self.full.pop_front() {
            self.routes[r].released[t] += 1;
            let out = Out {
                channel: (r as u32, t as u32),
                counters: &self.counters,
                retained: &mut self.retained,
            };
            let target = &mut self.routes[r].targets[t];
            send_chunked(target, records, self.batch_size, out).await?;
        }
        Ok(())
    }

    /// Sends every full buffer.
    pub async fn send_full(&mut self) -> Result<(), RouteError> {
        self.send_cut().await?;
        let size = self.batch_size;
        for (r, route) in self.routes.iter_mut().enumerate() {
            for (t, buf) in route.buffers.iter_mut().enumerate() {
                if buf.len() >= size {
                    let records = std::mem::replace(buf, Vec::with_capacity(size));
                    route.released[t] += 1;
                    let out = Out {
                        channel: (r as u32, t as u32),
                        counters: &self.counters,
                        retained: &mut self.retained,
                    };
                    send_chunked(&mut route.targets[t], records, size, out).await?;
                }
            }
        }
        if self.buffers_empty() {
            self.pending_since = None;
        }
        self.queue_marker();
        self.send_markers().await
    }

    /// Sends every sealed batch and every non-empty buffer (DCAS: the caller waited for
    /// the log to hold every input).
    pub async fn flush(&mut self) -> Result<(), RouteError> {
        self.send_sealed(u64::MAX).await?;
        self.send_cut().await?;
        for (r, route) in self.routes.iter_mut().enumerate() {
            for (t, buf) in route.buffers.iter_mut().enumerate() {
                if !buf.is_empty() {
                    let records = std::mem::take(buf);
                    route.released[t] += 1;
                    let out = Out {
                        channel: (r as u32, t as u32),
                        counters: &self.counters,
                        retained: &mut self.retained,
                    };
                    send_chunked(&mut route.targets[t], records, self.batch_size, out).await?;
                }
            }
        }
        self.pending_since = None;
        self.queue_marker();
        self.send_markers().await
    }

    /// Flushes, then sends `event` on every channel of every route.
    pub async fn broadcast(&mut self, event: StreamEvent) -> Result<(), RouteError> {
        self.flush().await?;
        match event {
            StreamEvent::Watermark(w) => self.watermark = self.watermark.max(w),
            StreamEvent::EndOfStream => self.ended = true,
            _ => {}
        }
        self.deliver_all(event).await
    }

    /// Sends `event` on every channel of every route, as it is (nothing flushed first).
    async fn deliver_all(&mut self, event: StreamEvent) -> Result<(), RouteError> {
        let keep = self.retained.is_some();
        for target in self.routes.iter_mut().flat_map(|r| r.targets.iter_mut()) {
            let waited = deliver(target, event.clone().into(), keep).await?;
            self.counters
                .backpressure_ns
                .fetch_add(waited.as_nanos() as u64, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Closes every output channel, telling receivers why.
    pub fn close(&self, cause: credit::CloseCause) {
        for t in self.routes.iter().flat_map(|r| r.targets.iter()) {
            t.close(cause.clone());
        }
    }

    /// Batches buffered in channels, summed over all targets (credits in use).
    pub fn in_flight(&self) -> usize {
        self.routes
            .iter()
            .flat_map(|r| r.targets.iter())
            .map(OutputChannel::in_flight)
            .sum()
    }
}

/// Where a sent batch is accounted: its channel, the counters, the retained output.
struct Out<'a> {
    channel: (u32, u32),
    counters: &'a RouterCounters,
    retained: &'a mut Option<RetainedOutput>,
}

/// Sends `records` as batches of at most `size` (an operator that multiplies records, such
/// as `flat_map`, can fill a buffer far past the batch size in one step).
async fn send_chunked(
    target: &mut OutputChannel,
    mut records: Vec<Record>,
    size: usize,
    mut out: Out<'_>,
) -> Result<(), RouteError> {
    while records.len() > size {
        let rest = records.split_off(size);
        send(target, records, &mut out).await?;
        records = rest;
    }
    send(target, records, &mut out).await
}

async fn send(
    target: &mut OutputChannel,
    records: Vec<Record>,
    out: &mut Out<'_>,
) -> Result<(), RouteError> {
    let n = records.len() as u64;
    let batch = Batch {
        first_seq: target.next_seq,
        records,
    };
    target.next_seq = batch.end_seq();
    let counters = out.counters;
    if target.next_seq <= target.logged {
        // Logged by the receiver already: neither sent nor retained.
        counters.records_out.fetch_add(n, Ordering::Relaxed);
        return Ok(());
    }
    let keep = out.retained.is_some();
    // DCAS: packed once, kept, and sent as kept (the receiver logs those bytes).
    let packed = out.retained.as_mut().map(|r| r.push(out.channel, &batch));
    let event = StreamEvent::Data(batch);
    let waited = deliver(target, Delivery { event, packed }, keep).await?;
    counters.records_out.fetch_add(n, Ordering::Relaxed);
    if !waited.is_zero() {
        counters
            .backpressure_ns
            .fetch_add(waited.as_nanos() as u64, Ordering::Relaxed);
    }
    Ok(())
}

/// Sends `event` on `target`. With `detach` (DCAS), a channel whose receiver went away
/// is detached (its output is retained for the receiver's restarted instance) instead of
/// failing; a detached channel drops what it is given.
async fn deliver(
    target: &mut OutputChannel,
    event: Delivery,
    detach: bool,
) -> Result<std::time::Duration, RouteError> {
    if target.detached {
        return Ok(std::time::Duration::ZERO);
    }
    match target.send(event).await {
        Err(ChannelError::Closed) if detach => {
            target.detached = true;
            Ok(std::time::Duration::ZERO)
        }
        other => other.map_err(RouteError::Channel),
    }
}

/// Error while routing output.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RouteError {
    /// A channel failed.
    #[error(transparent)]
    Channel(ChannelError),
    /// A `hash(<expr>)` partition expression failed on a record.
    #[error("partition {0}")]
    Partition(OpError),
    /// Retained output could not be read back (damaged bytes).
    #[error("retained output: {0}")]
    Retained(CodecError),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::packed;
    use crate::value::Value;

    fn recs(range: std::ops::Range<i64>) -> Vec<Record> {
        range
            .map(|i| Record::keyed(Value::Int(i), i, Value::Int(i)))
            .collect()
    }

    #[tokio::test]
    async fn gate_drops_duplicates_and_detects_gaps() {
        let (mut tx, rx) = channel(8, 0);
        let mut gate = InputGate::new(vec![rx]);
        let first = RetainedBatch::pack((0, 0), 0, &recs(0..3));
        tx.send(first.delivery().unwrap()).await.unwrap();
        // A replay of seqs 1..4: 1 and 2 are dropped, 3 is new.
        tx.send(Delivery {
            event: StreamEvent::Data(Batch {
                first_seq: 1,
                records: recs(1..4),
            }),
            packed: Some(bytes::Bytes::from_static(b"stale once cut")),
        })
        .await
        .unwrap();
        tx.send(
            StreamEvent::Data(Batch {
                first_seq: 0,
                records: recs(0..2),
            })
            .into(),
        )
        .await
        .unwrap();
        tx.send(
            StreamEvent::Data(Batch {
                first_seq: 9,
                records: recs(9..10),
            })
            .into(),
        )
        .await
        .unwrap();
        let (_, a) = gate.next().await.unwrap();
        let (_, b) = gate.next().await.unwrap();
        assert!(matches!(a.event, StreamEvent::Data(ref bt) if bt.len() == 3));
        // A batch taken whole keeps the bytes it came with, for the log.
        assert_eq!(a.packed, Some(first.packed));
        // What is left of a cut batch no longer matches the bytes it came with.
        assert_eq!(b.packed, None);
        match b.event {
            StreamEvent::Data(bt) => {
                assert_eq!(bt.first_seq, 3);
                assert_eq!(bt.records, recs(3..4));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            gate.next().await.unwrap_err(),
            ChannelError::Gap {
                channel: 0,
                expected: 4,
                got: 9
            }
        );
    }

    #[tokio::test]
    async fn gate_watermark_is_min_of_open_channels() {
        let (mut a, ra) = channel(4, 0);
        let (mut b, rb) = channel(4, 0);
        let mut gate = InputGate::new(vec![ra, rb]);
        a.send(StreamEvent::Watermark(10).into()).await.unwrap();
        gate.next().await.unwrap();
        assert_eq!(gate.watermark(), i64::MIN);
        b.send(StreamEvent::Watermark(5).into()).await.unwrap();
        gate.next().await.unwrap();
        assert_eq!(gate.watermark(), 5);
        b.send(StreamEvent::EndOfStream.into()).await.unwrap();
        gate.next().await.unwrap();
        assert_eq!(gate.watermark(), 10);
        a.send(StreamEvent::EndOfStream.into()).await.unwrap();
        gate.next().await.unwrap();
        assert!(gate.all_ended());
        drop(a);
    }

    /// Ensures a severed channel's input reads as disconnected by a failure (which a DCAS
    /// subtask detaches, not a release it stops for) and its output takes events without
    /// waiting, as a channel detached after its receiver went away does.
    #[tokio::test]
    async fn severed_ends_detach() {
        let (mut out, input) = severed(0, "peer gone".into());
        let mut gate = InputGate::new(vec![input]);
        match gate.next().await {
            Err(ChannelError::Disconnected { channel: 0, cause }) => {
                assert_eq!(cause, Some(credit::CloseCause::Failed("peer gone".into())))
            }
            other => panic!("expected a disconnect, got {other:?}"),
        }
        for _ in 0..4 {
            let sent = deliver(&mut out, StreamEvent::Marker(1).into(), true).await;
            assert_eq!(sent, Ok(std::time::Duration::ZERO));
        }
    }

    /// Ensures the gate's marker is the oldest over open channels once each delivered one.
    #[tokio::test]
    async fn gate_marker_is_oldest_of_open_channels() {
        let (mut a, ra) = channel(4, 0);
        let (mut b, rb) = channel(4, 0);
        let mut gate = InputGate::new(vec![ra, rb]);
        a.send(StreamEvent::Marker(10).into()).await.unwrap();
        gate.next().await.unwrap();
        assert_eq!(gate.marker(), None, "b delivered none yet");
        b.send(StreamEvent::Marker(5).into()).await.unwrap();
        gate.next().await.unwrap();
        assert_eq!(gate.marker(), Some(5));
        b.send(StreamEvent::EndOfStream.into()).await.unwrap();
        gate.next().await.unwrap();
        assert_eq!(
            gate.marker(),
            Some(10),
            "an ended channel holds nothing back"
        );
        a.send(StreamEvent::EndOfStream.into()).await.unwrap();
        gate.next().await.unwrap();
        assert_eq!(gate.marker(), None);
    }

    /// What arrived on `rx` so far: `d<first seq>+<records>` or `m<origin>`.
    fn arrived(rx: &mut InputChannel) -> Vec<String> {
        let waker = futures::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        let mut out = Vec::new();
        while let Poll::Ready(Some(d)) = rx.rx.poll_recv(&mut cx) {
            out.push(match d.event {
                StreamEvent::Data(b) => format!("d{}+{}", b.first_seq, b.len()),
                StreamEvent::Marker(at) => format!("m{at}"),
                other => format!("{other:?}"),
            });
        }
        out
    }

    /// Ensures a latency marker never overtakes a record routed before it: it waits for a
    /// partly filled buffer to leave, and (DCAS) behind the batches sealed for the log.
    /// Markers behind the same batch all go, oldest first, up to [`MAX_WAITING_MARKERS`]
    /// in a row.
    #[tokio::test]
    async fn markers_go_behind_the_records_before_them() {
        let (t, mut rx) = channel(64, 0);
        let mut router = Router::new(
            vec![Route::new(Exchange::Forward, vec![t], 0)],
            10,
            Default::default(),
        );
        router.mark(1).await.unwrap();
        assert_eq!(arrived(&mut rx), ["m1"], "nothing buffered: at once");
        router.push(&mut recs(0..5)).await.unwrap();
        router.mark(2).await.unwrap();
        assert_eq!(
            arrived(&mut rx),
            Vec::<String>::new(),
            "behind 5 buffered records"
        );
        router.push(&mut recs(5..10)).await.unwrap();
        assert_eq!(arrived(&mut rx), ["d0+10", "m2"]);
        router.push(&mut recs(10..13)).await.unwrap();
        router.mark(3).await.unwrap();
        router.mark(4).await.unwrap();
        router.flush().await.unwrap();
        assert_eq!(
            arrived(&mut rx),
            ["d10+3", "m3", "m4"],
            "both behind the batch, oldest first"
        );

        // DCAS: sealed output leaves when the log holds its inputs; the marker behind it.
        router.retain_output();
        router.stage(&mut recs(0..10)).unwrap();
        router.seal(3, false);
        router.mark(5).await.unwrap();
        router.mark(7).await.unwrap();
        assert_eq!(router.sealed(), 1, "only batches count");
        router.send_sealed(2).await.unwrap();
        assert_eq!(
            arrived(&mut rx),
            Vec::<String>::new(),
            "the log holds 2 of 3"
        );
        router.stage(&mut recs(10..14)).unwrap();
        router.mark(6).await.unwrap();
        router.seal(4, true);
        router.send_sealed(3).await.unwrap();
        assert_eq!(
            arrived(&mut rx),
            ["d13+10", "m5", "m7"],
            "m6 waits for the second batch"
        );
        router.send_sealed(4).await.unwrap();
        assert_eq!(arrived(&mut rx), ["d23+4", "m6"]);

        // While the log holds a batch back, at most MAX_WAITING_MARKERS queue behind it.
        router.stage(&mut recs(27..37)).unwrap();
        router.seal(5, false);
        for at in 10..20 {
            router.mark(at).await.unwrap();
        }
        router.send_sealed(5).await.unwrap();
        let sent: Vec<String> = (10..10 + MAX_WAITING_MARKERS as i64)
            .map(|at| format!("m{at}"))
            .collect();
        assert_eq!(arrived(&mut rx)[1..], sent[..], "the newest dropped");
    }

    /// Ensures a marker leaves as soon as the batches holding the records before it have,
    /// on every channel, however many records came after it: with two hash targets always
    /// holding something, a marker that waited for every buffer to be empty would wait
    /// until a flush.
    #[tokio::test]
    async fn a_marker_waits_only_for_the_records_before_it() {
        let (t0, mut r0) = channel(64, 0);
        let (t1, mut r1) = channel(64, 0);
        let mut router = Router::new(
            vec![Route::new(Exchange::Hash(None), vec![t0, t1], 0)],
            4,
            Default::default(),
        );
        let keys = |target: usize| {
            (0..)
                .filter(move |&i| subtask_for_hash(Value::Int(i).stable_hash(), 2) == target)
                .map(|i| Record::keyed(Value::Int(i), i, Value::Int(i)))
        };
        let (mut to0, mut to1) = (keys(0), keys(1));
        let mut push = |n0: usize, n1: usize| {
            let mut batch: Vec<Record> = to0.by_ref().take(n0).collect();
            batch.extend(to1.by_ref().take(n1));
            batch
        };
        router.push(&mut push(2, 1)).await.unwrap();
        router.mark(1).await.unwrap();
        router.push(&mut push(3, 0)).await.unwrap();
        assert_eq!(
            arrived(&mut r0),
            ["d0+4"],
            "target 1 still holds a record of m1"
        );
        assert!(arrived(&mut r1).is_empty());
        router.mark(2).await.unwrap();
        router.push(&mut push(0, 3)).await.unwrap();
        assert_eq!(arrived(&mut r1), ["d0+4", "m1"]);
        assert_eq!(
            arrived(&mut r0),
            ["m1"],
            "target 0 holds records after m1 only"
        );
        router.push(&mut push(3, 2)).await.unwrap();
        assert_eq!(arrived(&mut r0), ["d4+4", "m2"]);
        assert_eq!(arrived(&mut r1), ["m2"]);
        router.push(&mut push(1, 0)).await.unwrap();
        router.mark(3).await.unwrap();
        router.flush().await.unwrap();
        assert_eq!(arrived(&mut r0), ["d8+1", "m3"]);
        assert_eq!(arrived(&mut r1), ["d4+2", "m3"]);

        // DCAS: target 0's records are sealed for the log while target 1 still buffers
        // a record of m4; m4 goes behind the batch sealed for target 1 once it is cut.
        router.retain_output();
        router.stage(&mut push(2, 1)).unwrap();
        router.mark(4).await.unwrap();
        router.stage(&mut push(2, 0)).unwrap();
        router.seal(1, false);
        assert_eq!(router.sealed(), 1, "target 0's full batch");
        router.stage(&mut push(1, 3)).unwrap();
        router.seal(2, false);
        router.send_sealed(1).await.unwrap();
        assert_eq!(arrived(&mut r0), ["d9+4"]);
        assert!(
            arrived(&mut r1).is_empty(),
            "m4 waits behind target 1's sealed batch"
        );
        router.send_sealed(2).await.unwrap();
        assert_eq!(
            arrived(&mut r0),
            ["m4"],
            "target 0 holds records after m4 only"
        );
        assert_eq!(arrived(&mut r1), ["d6+4", "m4"]);
    }

    #[tokio::test]
    async fn dropped_sender_is_reported() {
        let (a, ra) = channel(4, 0);
        let mut gate = InputGate::new(vec![ra]);
        drop(a);
        assert_eq!(
            gate.next().await.unwrap_err(),
            ChannelError::Disconnected {
                channel: 0,
                cause: None
            }
        );
    }

    /// Ensures a sender without credits waits instead of buffering more.
    #[tokio::test]
    async fn credits_bound_the_channel() {
        let (mut tx, mut rx) = channel(2, 0);
        tx.send_records(recs(0..1)).await.unwrap();
        tx.send_records(recs(1..2)).await.unwrap();
        assert_eq!(tx.in_flight(), 2);
        let blocked = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            tx.send_records(recs(2..3)),
        )
        .await;
        assert!(blocked.is_err(), "third batch must wait for a credit");
        rx.rx.recv().await.unwrap();
        rx.rx.recv().await.unwrap();
        tx.send_records(recs(2..3)).await.unwrap();
    }

    async fn drain(rx: &mut InputChannel) -> Vec<Record> {
        let mut out = Vec::new();
        let waker = futures::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        while let Poll::Ready(Some(ev)) = rx.rx.poll_recv(&mut cx) {
            if let StreamEvent::Data(b) = ev.event {
                out.extend(b.records);
            }
        }
        out
    }

    #[tokio::test]
    async fn hash_route_partitions_by_key_groups() {
        let (t0, mut r0) = channel(64, 0);
        let (t1, mut r1) = channel(64, 0);
        let mut router = Router::new(
            vec![Route::new(Exchange::Hash(None), vec![t0, t1], 0)],
            4,
            Default::default(),
        );
        router.push(&mut recs(0..100)).await.unwrap();
        router.flush().await.unwrap();
        let (a, b) = (drain(&mut r0).await, drain(&mut r1).await);
        assert_eq!(a.len() + b.len(), 100);
        assert!(a
            .iter()
            .all(|r| subtask_for_hash(r.key.as_ref().unwrap().stable_hash(), 2) == 0));
        assert!(b
            .iter()
            .all(|r| subtask_for_hash(r.key.as_ref().unwrap().stable_hash(), 2) == 1));
        assert!(!a.is_empty() && !b.is_empty());
    }

    /// Ensures a hash route cuts a target's buffer when it reaches the batch size, while
    /// partitioning: every batch but the flushed last is full, and seqs stay dense.
    #[tokio::test]
    async fn hash_route_cuts_full_batches_while_partitioning() {
        let (t0, mut r0) = channel(64, 0);
        let (t1, mut r1) = channel(64, 0);
        let mut router = Router::new(
            vec![Route::new(Exchange::Hash(None), vec![t0, t1], 0)],
            10,
            Default::default(),
        );
        for i in 0..7 {
            router.push(&mut recs(i * 13..i * 13 + 13)).await.unwrap();
        }
        router.flush().await.unwrap();
        let waker = futures::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        let mut total = 0;
        for rx in [&mut r0, &mut r1] {
            let mut sizes = Vec::new();
            let mut next_seq = 0;
            while let Poll::Ready(Some(d)) = rx.rx.poll_recv(&mut cx) {
                let StreamEvent::Data(b) = d.event else {
                    continue;
                };
                assert_eq!(b.first_seq, next_seq, "dense seqs");
                next_seq = b.end_seq();
                sizes.push(b.len());
            }
            let (last, whole) = sizes.split_last().unwrap();
            assert!(whole.iter().all(|&n| n == 10), "{sizes:?}");
            assert!(*last <= 10, "{sizes:?}");
            total += sizes.iter().sum::<usize>();
        }
        assert_eq!(total, 91);
    }

    /// Ensures a buffer filled past the batch size in one step leaves in batch-sized pieces.
    #[tokio::test]
    async fn oversized_buffers_go_in_batch_sized_pieces() {
        let (t0, mut r0) = channel(64, 0);
        let mut router = Router::new(
            vec![Route::new(Exchange::Forward, vec![t0], 0)],
            10,
            Default::default(),
        );
        router.push(&mut recs(0..25)).await.unwrap();
        router.flush().await.unwrap();
        let waker = futures::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        let mut sizes = Vec::new();
        while let Poll::Ready(Some(Delivery {
            event: StreamEvent::Data(b),
            packed: None,
        })) = r0.rx.poll_recv(&mut cx)
        {
            sizes.push(b.len());
        }
        assert_eq!(sizes, vec![10, 10, 5]);
    }

    /// Retained output survives the router's position and a restore, and is resent with
    /// its seqs; a restored batch whose bytes do not match its description is an error.
    #[tokio::test]
    async fn retained_output_is_restored_and_resent_with_its_seqs() {
        let (t0, mut r0) = channel(64, 0);
        let mut router = Router::new(
            vec![Route::new(Exchange::Forward, vec![t0], 0)],
            10,
            Default::default(),
        );
        router.retain_output();
        router.push(&mut recs(0..25)).await.unwrap();
        router.flush().await.unwrap();
        router.trim(&[vec![12]]);
        assert_eq!(router.retained_records(), 13);
        let position = router.position();

        let (t1, mut r1) = channel(64, 0);
        let mut restored = Router::new(
            vec![Route::new(Exchange::Forward, vec![t1], 0)],
            10,
            Default::default(),
        );
        restored.restore_position(position.clone()).unwrap();
        restored.resend_all().await.unwrap();
        let waker = futures::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        // Every batch goes with the bytes it is retained as: those a receiver logs.
        let mut resent = Vec::new();
        while let Poll::Ready(Some(d)) = r1.rx.poll_recv(&mut cx) {
            let packed = d.packed.expect("resent with its packed bytes");
            let StreamEvent::Data(b) = d.event else {
                panic!("{:?}", d.event)
            };
            assert_eq!(packed::decode_data(&packed).unwrap(), b);
            resent.push((b.first_seq, b.records));
        }
        let mut sent = Vec::new();
        while let Poll::Ready(Some(d)) = r0.rx.poll_recv(&mut cx) {
            let packed = d.packed.expect("sent with its packed bytes");
            let StreamEvent::Data(b) = d.event else {
                panic!("{:?}", d.event)
            };
            assert_eq!(packed::decode_data(&packed).unwrap(), b);
            sent.extend(b.records);
        }
        assert_eq!(
            resent,
            vec![(12, sent[12..20].to_vec()), (20, sent[20..25].to_vec())],
            "seqs 12..25 again, in the batches they were sent in"
        );

        let mut damaged = position;
        damaged.retained[0].len += 1;
        let err = restored.restore_position(damaged.clone()).unwrap_err();
        assert!(err.contains("retained output for channel 0.0"), "{err}");
        damaged.retained[0].packed.truncate(3);
        assert!(restored.restore_position(damaged).is_err());
    }

    /// A restarted sender replaying its log sends and retains no batch its receiver has
    /// logged wholly, sends the one that straddles the receiver's position (which drops
    /// the records it has), and forgets retained output below that position.
    #[tokio::test]
    async fn a_replay_sends_nothing_the_receiver_logged() {
        let (t0, r0) = channel(64, 0);
        let mut gate = InputGate::new(vec![r0]);
        // The receiver has the first 25 records (a gap before them would be an error).
        let at = InputPosition {
            next_seq: 25,
            watermark: i64::MIN,
            ended: false,
        };
        gate.restore_positions(&[at]).unwrap();
        let mut router = Router::new(
            vec![Route::new(Exchange::Forward, vec![t0], 0)],
            10,
            Arc::default(),
        );
        router.retain_output();
        router.receivers_logged(&[vec![25]]);
        router.push(&mut recs(0..40)).await.unwrap();
        router.flush().await.unwrap();
        assert_eq!(router.retained_records(), 20, "the batches from seq 20 on");
        assert_eq!(router.in_flight(), 2, "two of the four batches sent");
        let mut firsts = Vec::new();
        for _ in 0..2 {
            match gate.next().await.unwrap().1.event {
                StreamEvent::Data(b) => firsts.push(b.first_seq),
                other => panic!("{other:?}"),
            }
        }
        // The gate drops seqs 20..25 of the batch that straddles its position.
        assert_eq!(firsts, vec![25, 30], "nothing wholly below seq 25 is sent");

        // Retained output (a restored snapshot's) below a receiver's position is forgotten.
        router.receivers_logged(&[vec![30]]);
        assert_eq!(router.retained_records(), 10);
    }

    /// During a recovery a rewired receiver's acks on its channel count its backlog logged
    /// without the progress exchange; an ack short of the backlog does not.
    #[tokio::test]
    async fn rewired_receivers_catch_up_by_their_acks_on_the_channel() {
        let (t0, _r0) = channel(64, 0);
        let counters: Arc<RouterCounters> = Arc::default();
        let mut router = Router::new(
            vec![Route::new(Exchange::Forward, vec![t0], 0)],
            10,
            counters.clone(),
        );
        router.retain_output();
        router.push(&mut recs(0..25)).await.unwrap();
        router.flush().await.unwrap();
        let (t0, r0) = channel(64, 0);
        router.rewire(0, 0, t0, 7).await.unwrap();
        router.receivers_acked();
        assert!(router.awaits_backlogs(), "no ack yet");
        r0.rx.ack_logged(24);
        router.receivers_acked();
        assert!(
            router.awaits_backlogs(),
            "one record of the backlog not acked"
        );
        assert_eq!(router.retained_records(), 1, "what was acked is trimmed");
        r0.rx.ack_logged(25);
        router.receivers_acked();
        assert!(!router.awaits_backlogs());
        assert_eq!(counters.receivers_caught_up.load(Ordering::Acquire), 7);
        r0.rx.ack_logged(3);
        assert_eq!(
            router.routes[0].targets[0].receiver_logged(),
            25,
            "acks only rise"
        );
    }

    /// A rewired receiver's backlog is what was sent before the rewire: the router marks
    /// the time when its receivers have logged all of it, and not before; a later rewire
    /// waits again.
    #[tokio::test]
    async fn rewired_receivers_catch_up_when_their_backlog_is_logged() {
        let (t0, _r0) = channel(64, 0);
        let (t1, _r1) = channel(64, 0);
        let counters: Arc<RouterCounters> = Arc::default();
        let mut router = Router::new(
            vec![Route::new(Exchange::Hash(None), vec![t0, t1], 0)],
            10,
            counters.clone(),
        );
        router.retain_output();
        let caught_up = || counters.receivers_caught_up.load(Ordering::Acquire);
        router.push(&mut recs(0..40)).await.unwrap();
        router.flush().await.unwrap();
        let sent: Vec<Seq> = router.routes[0]
            .targets
            .iter()
            .map(|t| t.next_seq)
            .collect();
        assert!(sent.iter().all(|&n| n > 0), "{sent:?}");
        router.trim(&[vec![0, 0]]);
        assert_eq!(caught_up(), 0, "no rewire yet");

        let (t1, _r1) = channel(64, 0);
        router.rewire(0, 1, t1, 3).await.unwrap();
        router.push(&mut recs(40..60)).await.unwrap();
        router.flush().await.unwrap();
        router.trim(&[vec![sent[0], sent[1] - 1]]);
        assert_eq!(caught_up(), 0, "one record of the backlog not logged");
        let before = crate::telemetry::now_ms();
        router.trim(&[vec![sent[0], sent[1]]]);
        assert_eq!(caught_up(), 3, "the backlog of rewire 3 logged");
        assert!(counters.receivers_caught_up_ms.load(Ordering::Relaxed) >= before);

        assert!(!router.awaits_backlogs());
        let (t0, _r0) = channel(64, 0);
        router.rewire(0, 0, t0, 5).await.unwrap();
        assert!(
            router.awaits_backlogs(),
            "the second rewire's backlog counts"
        );
        let now: Vec<Seq> = router.routes[0]
            .targets
            .iter()
            .map(|t| t.next_seq)
            .collect();
        router.trim(&[vec![now[0] - 1, now[1]]]);
        assert_eq!(caught_up(), 3, "the backlog of rewire 5 not logged");
        assert!(router.awaits_backlogs());
        router.trim(&[now]);
        assert!(!router.awaits_backlogs());
        assert_eq!(caught_up(), 5, "the backlog of rewire 5 logged");
    }

    /// Ensures a rebalance route deals each record to the same channel, at the same seq,
    /// however its batches were cut: a DCAS replay runs without the linger timer whose
    /// flushes cut the live run's batches, and receivers drop records by seq. Dealt batch
    /// by batch, the flushed run sent every record to the first target and the other run
    /// half of them to the second: its receiver took replayed records twice.
    #[tokio::test]
    async fn rebalance_deals_records_whatever_cut_the_batches() {
        let mut seen = Vec::new();
        for flush_between in [true, false] {
            let (t0, mut r0) = channel(64, 0);
            let (t1, mut r1) = channel(64, 0);
            let mut router = Router::new(
                vec![Route::new(Exchange::Rebalance, vec![t0, t1], 1)],
                10,
                Default::default(),
            );
            for i in 0..7 {
                router.push(&mut recs(i * 3..i * 3 + 3)).await.unwrap();
                if flush_between {
                    router.flush().await.unwrap();
                }
            }
            assert_eq!(
                router.position().rr,
                vec![0],
                "21 records dealt from target 1"
            );
            router.broadcast(StreamEvent::EndOfStream).await.unwrap();
            seen.push((drain(&mut r0).await, drain(&mut r1).await));
        }
        assert_eq!(seen[0], seen[1]);
        let second: Vec<i64> = seen[0]
            .1
            .iter()
            .map(|r| r.value.as_int().unwrap())
            .collect();
        assert_eq!(
            second,
            (0..21).step_by(2).collect::<Vec<_>>(),
            "target 1 first"
        );
    }

    #[tokio::test]
    async fn rebalance_and_broadcast() {
        let (t0, mut r0) = channel(64, 0);
        let (t1, mut r1) = channel(64, 0);
        let (b0, mut s0) = channel(64, 0);
        let (b1, mut s1) = channel(64, 0);
        let mut router = Router::new(
            vec![
                Route::new(Exchange::Rebalance, vec![t0, t1], 0),
                Route::new(Exchange::Broadcast, vec![b0, b1], 0),
            ],
            10,
            Default::default(),
        );
        for i in 0..4 {
            router.push(&mut recs(i * 10..i * 10 + 10)).await.unwrap();
        }
        router.broadcast(StreamEvent::EndOfStream).await.unwrap();
        assert_eq!(drain(&mut r0).await.len(), 20);
        assert_eq!(drain(&mut r1).await.len(), 20);
        assert_eq!(drain(&mut s0).await, recs(0..40));
        assert_eq!(drain(&mut s1).await, recs(0..40));
    }
}
