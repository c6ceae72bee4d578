//! DCAS building blocks (DESIGN §7): a subtask's input log `log(t)` and its snapshots
//! `snap(t)` in the distributed cache, and the output a sender retains until its receivers
//! have logged it.
//!
//! - [`InputLog`] appends every consumed input (channel and event, in consumption order) to
//!   `log(t)` (a subtask that regenerates its output from its snapshot has nothing to log:
//!   `SubtaskRunner::regenerable`). Appends are *group-committed*: one append is in flight per subtask and
//!   everything consumed meanwhile goes in the next one, so the subtask never waits for a
//!   round trip per input — it waits only before it releases output ([`InputLog::synced`]),
//!   which is the log-before-release rule. A list append answers the index of its first
//!   item; the writer checks it against the index it expects, so a log can never silently
//!   gain a gap or a duplicate.
//! - [`SnapshotStore`] writes `snap(t)` (state, the log offset it reflects, channel seqs,
//!   retained output) into a cache map and then trims `log(t)` up to that offset; on restart
//!   it loads the snapshot and reads the log after it.
//! - [`RetainedOutput`] keeps, per output channel, the batches sent but not yet known to be in
//!   the receiver's log; trimmed by the receiver's logged seq, which receivers publish and
//!   senders read through [`ChannelProgress`] (acknowledgements through the cache: no frame
//!   type on the data plane, and they survive either side's restart).
//!
//! Entries are placed with the cache's placement hint so their primary avoids the subtask's
//! own task manager: a task manager's crash then costs the cache a backup, never the
//! primary copy of the logs of the subtasks being restarted.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use super::channel::{InputPosition, RouterPosition};
use crate::cache::{CacheClient, CacheError};
use crate::codec::{decode, encode, packed, CodecError};
use crate::ids::TaskManagerId;
use crate::protocol::control::OperatorState;
use crate::record::{Batch, Delivery, Record, Seq, StreamEvent};
use crate::telemetry::CpuTimes;

/// Most log entries in one append.
const MAX_GROUP: usize = 256;
/// Log entries read per range request on replay.
const READ_PAGE: u64 = 512;
/// Wait before retrying a write the cache refused as full (backpressure).
const FULL_BACKOFF: Duration = Duration::from_millis(20);
/// How long a write waits for a full cache to free room (trims after other subtasks'
/// snapshots) before the subtask fails with a reason naming the memory limit. A cache
/// that frees nothing in this time holds more state and log than fits, and waiting longer
/// would stall the job with no sign of why.
const FULL_WAIT: Duration = Duration::from_secs(10);
/// First wait before retrying an append whose member went away (doubling up to
/// [`FULL_BACKOFF`]), cut short when a newer partition table arrives: the master promotes
/// the backups within milliseconds, and every subtask whose log lived there waits for the
/// retry, with its output held back.
const TRANSIENT_BACKOFF: Duration = Duration::from_millis(1);

/// A pause before a retry that doubles, from `next` up to `max`, with each failure in a row.
#[derive(Clone, Copy, Debug)]
struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    const fn new(first: Duration, max: Duration) -> Backoff {
        Backoff { next: first, max }
    }

    /// The pause before this retry; the next one is twice as long (up to the max).
    fn pause(&mut self) -> Duration {
        let pause = self.next;
        self.next = (pause * 2).min(self.max);
        pause
    }
}

/// Errors of the DCAS log and snapshot store.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum DcasError {
    /// The cache refused or failed an operation.
    #[error("{what}: {source}{}", full_hint(source))]
    Cache {
        /// What was being done.
        what: String,
        /// The cache's error.
        source: CacheError,
    },
    /// A log or snapshot entry did not decode.
    #[error("{what}: {source}")]
    Codec {
        /// What was being read.
        what: String,
        /// The decoder's error.
        source: CodecError,
    },
    /// The log is not what this subtask wrote (an index gap or overlap).
    #[error("log {list}: {message}")]
    Corrupt {
        /// The list.
        list: String,
        /// What is wrong.
        message: String,
    },
    /// The log writer stopped (after an earlier error).
    #[error("log writer of {0} stopped")]
    Stopped(String),
    /// The whole snapshot changed since this incarnation of the subtask read or wrote it:
    /// an earlier incarnation's store landed late. Not overwritten.
    #[error(
        "snapshot {key} was written by another incarnation of its subtask \
         (version {current}, this one expected {expected})"
    )]
    Superseded {
        /// The snapshot's key.
        key: String,
        /// The entry's version now.
        current: u64,
        /// The version this incarnation read or wrote last.
        expected: u64,
    },
}

/// What a [`CacheError::Full`] that outlasted [`FULL_WAIT`] tells the user to do.
fn full_hint(e: &CacheError) -> String {
    match e {
        CacheError::Full { .. } => format!(
            ", for {} s: the job's snapshots and input logs need more memory than the cache \
             has (raise the task managers' --cache-memory-mb, or add task managers)",
            FULL_WAIT.as_secs()
        ),
        _ => String::new(),
    }
}

/// Where one subtask's DCAS entries live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DcasNames {
    /// The input log list.
    pub log: String,
    /// The map holding whole snapshots.
    pub map: String,
    /// The list of incremental snapshots since the whole one, indexed by snapshot id.
    pub changes: String,
    /// The map recording which partition holds each subtask's log and snapshot.
    pub placement: String,
    /// This subtask's key in both maps.
    pub key: Vec<u8>,
}

impl DcasNames {
    /// The prefix of every cache entry of `job` (logs, snapshots, placements, channel
    /// progress): `job` is a job's id (every deployment's entries, dropped when the job
    /// ends) or `<id>/g<generation>` (one deployment's, see [`DcasConfig::job`]).
    pub fn job_prefix(job: &str) -> String {
        format!("dcas/{job}/")
    }

    /// Names for subtask `subtask` of task `task` of job `job`.
    pub fn new(job: &str, task: usize, subtask: usize) -> DcasNames {
        let prefix = DcasNames::job_prefix(job);
        DcasNames {
            log: format!("{prefix}log/{task}.{subtask}"),
            map: format!("{prefix}snap"),
            changes: format!("{prefix}snapd/{task}.{subtask}"),
            placement: format!("{prefix}placement"),
            key: format!("{task}.{subtask}").into_bytes(),
        }
    }
}

/// Gate index logged for a source's polls (sources have no input channels).
pub const SOURCE_CHANNEL: u32 = u32::MAX;

/// One consumed input: the input channel (gate index), the event, and for a source's poll
/// the source's state after it (replay restores it, so the source then continues where the
/// logged polls ended). A replayable source's poll
/// ([`Source::replayable`](crate::operator::Source::replayable)) is logged as its record
/// count, with an empty batch: replay regenerates the records.
#[derive(Clone, Debug, PartialEq)]
pub struct LogEntry {
    /// Input channel index in the subtask's gate ([`SOURCE_CHANNEL`] for source polls).
    pub channel: u32,
    /// The event as consumed (data with its seqs, a watermark, or the end of a channel); an
    /// empty batch for a replayable source's poll, whose records the tail counts.
    pub event: StreamEvent,
    /// What follows the event: nothing, or a source poll's state (and count).
    pub tail: Tail,
}

impl LogEntry {
    /// An input consumed from gate channel `channel`.
    pub fn input(channel: usize, event: StreamEvent) -> LogEntry {
        LogEntry {
            channel: channel as u32,
            event,
            tail: Tail::None,
        }
    }

    /// Encodes as the channel and the event's length (4 bytes each, little endian), the
    /// [`packed`] event, then a tail: nothing; 1 and the source state; or 2, the regenerated
    /// count (8 bytes) and the source state.
    pub fn encode(&self) -> Result<Vec<u8>, CodecError> {
        encode_entry(self.channel, &self.event, None, self.tail.as_ref())
    }

    /// The records the entry replays: its batch's, or the count a replayable source's
    /// poll regenerates.
    pub fn records(&self) -> u64 {
        match (&self.event, &self.tail) {
            (_, Tail::Regenerate(n, _)) => *n,
            (StreamEvent::Data(b), _) => b.records.len() as u64,
            _ => 0,
        }
    }

    /// Decodes what [`LogEntry::encode`] wrote.
    pub fn decode(bytes: &[u8]) -> Result<LogEntry, CodecError> {
        let short = || CodecError("log entry shorter than its header".into());
        let (head, rest) = bytes.split_first_chunk::<4>().ok_or_else(short)?;
        let (len, rest) = rest.split_first_chunk::<4>().ok_or_else(short)?;
        let len = u32::from_le_bytes(*len) as usize;
        if rest.len() < len {
            return Err(CodecError(format!(
                "log entry event of {len} bytes, {} present",
                rest.len()
            )));
        }
        let (event, tail) = rest.split_at(len);
        let tail = match tail.split_first() {
            None => Tail::None,
            Some((1, state)) => Tail::State(state.to_vec()),
            Some((2, rest)) => {
                let (n, state) = rest
                    .split_first_chunk::<8>()
                    .ok_or_else(|| CodecError("log entry count cut short".into()))?;
                Tail::Regenerate(u64::from_le_bytes(*n), state.to_vec())
            }
            Some((tag, _)) => return Err(CodecError(format!("log entry trailer tag {tag}"))),
        };
        Ok(LogEntry {
            channel: u32::from_le_bytes(*head),
            event: packed::decode_event(event)?,
            tail,
        })
    }
}

/// The log entries a restart replays, each decoded as the replay takes it: a restart holds
/// the micro-window's encoded bytes and one decoded batch, never every record of it decoded
/// at once (in a freshly started process, each of those pages is a page fault).
pub struct LogTail {
    list: String,
    /// Index of the next entry.
    next: u64,
    items: std::vec::IntoIter<Vec<u8>>,
}

impl Iterator for LogTail {
    type Item = Result<LogEntry, DcasError>;

    fn next(&mut self) -> Option<Self::Item> {
        let item = self.items.next()?;
        let at = self.next;
        self.next += 1;
        if item.is_empty() {
            // No entry encodes to nothing: this is the placeholder a backup keeps for an
            // entry it never received (see `replicate_tail`), promoted since.
            return Some(Err(DcasError::Corrupt {
                list: self.list.clone(),
                message: format!(
                    "entry {at} is missing: the replica read holds an empty placeholder for an \
                     append it never received"
                ),
            }));
        }
        Some(LogEntry::decode(&item).map_err(|source| DcasError::Codec {
            what: format!("log entry {at} of {}", self.list),
            source,
        }))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.items.size_hint()
    }
}

impl ExactSizeIterator for LogTail {}

/// What follows a log entry's event: owned in a [`LogEntry`], borrowed (`Tail<&[u8]>`)
/// when the subtask logs a poll without copying the source's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tail<S = Vec<u8>> {
    /// Nothing: an input from a channel, a source's watermark or end.
    None,
    /// A source's poll: its state after it.
    State(S),
    /// A replayable source's poll: the records polled and its state after it.
    Regenerate(u64, S),
}

impl<S: AsRef<[u8]>> Tail<S> {
    /// The tail borrowing its state.
    pub fn as_ref(&self) -> Tail<&[u8]> {
        match self {
            Tail::None => Tail::None,
            Tail::State(s) => Tail::State(s.as_ref()),
            Tail::Regenerate(n, s) => Tail::Regenerate(*n, s.as_ref()),
        }
    }

    /// The source's state after the logged poll, if the entry is a poll.
    pub fn state(&self) -> Option<&[u8]> {
        match self {
            Tail::None => None,
            Tail::State(s) | Tail::Regenerate(_, s) => Some(s.as_ref()),
        }
    }
}

/// The encoding of [`LogEntry::encode`], from borrowed parts, in one buffer: the header,
/// the packed event (copied when `packed` holds it already), then the tail.
fn encode_entry(
    channel: u32,
    event: &StreamEvent,
    packed: Option<&[u8]>,
    tail: Tail<&[u8]>,
) -> Result<Vec<u8>, CodecError> {
    let state = tail.state().map_or(0, <[u8]>::len);
    let event_len = packed.map_or_else(|| packed::size_hint(event), <[u8]>::len);
    let mut out = Vec::with_capacity(16 + state + event_len);
    out.extend_from_slice(&channel.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    match packed {
        Some(bytes) => out.extend_from_slice(bytes),
        None => packed::encode_event(event, &mut out),
    }
    let len = u32::try_from(out.len() - 8)
        .map_err(|_| CodecError(format!("a log entry's event of {} bytes", out.len() - 8)))?;
    out[4..8].copy_from_slice(&len.to_le_bytes());
    match tail {
        Tail::None => {}
        Tail::State(state) => {
            out.push(1);
            out.extend_from_slice(state);
        }
        Tail::Regenerate(n, state) => {
            out.push(2);
            out.extend_from_slice(&n.to_le_bytes());
            out.extend_from_slice(state);
        }
    }
    Ok(out)
}

/// The group-committing writer of one subtask's `log(t)`.
pub struct InputLog {
    tx: mpsc::UnboundedSender<Vec<u8>>,
    /// Index the next pushed entry gets.
    next: u64,
    /// Bytes of every entry pushed by this writer.
    bytes: u64,
    /// Index below which every entry is replicated in the cache (or the writer's error).
    logged: watch::Receiver<Result<u64, DcasError>>,
    list: String,
}

impl InputLog {
    /// Starts the writer of list `names.log` in partition `partition`, whose next index is
    /// `next` (0 for a new log; after a restore, the list's end).
    pub fn start(client: CacheClient, partition: u32, list: String, next: u64) -> InputLog {
        InputLog::start_leased(client, partition, list, next, Vec::new(), Lease::default())
    }

    /// [`InputLog::start`] for a writer that stops appending once `lease` lapses, and
    /// first replicates `tail`, the last entries below `next` that a restart read from the
    /// log ([`replicate_tail`]).
    pub fn start_leased(
        client: CacheClient,
        partition: u32,
        list: String,
        next: u64,
        tail: Vec<Vec<u8>>,
        lease: Lease,
    ) -> InputLog {
        let (tx, rx) = mpsc::unbounded_channel();
        let (logged_tx, logged) = watch::channel(Ok(next));
        let writer = {
            let list = list.clone();
            async move {
                if !tail.is_empty() {
                    let open = || !logged_tx.is_closed();
                    let replicated = async {
                        lease.check(&list, "appending")?;
                        replicate_tail(&client, partition, &list, next, &tail, open).await
                    };
                    if let Err(e) = replicated.await {
                        warn!(list = %list, error = %e, "Input log not replicated; the log stops here.");
                        let _ = logged_tx.send(Err(e));
                        return;
                    }
                }
                write_log(client, partition, list, next, rx, logged_tx, lease).await
            }
        };
        tokio::spawn(writer);
        InputLog {
            tx,
            next,
            bytes: 0,
            logged,
            list,
        }
    }

    /// Queues `entry`; returns its index.
    #[cfg(test)]
    pub fn push(&mut self, entry: &LogEntry) -> Result<u64, DcasError> {
        self.push_parts(entry.channel, &entry.event, entry.tail.as_ref())
    }

    /// Queues the entry of an input from `channel`, `event`, and `tail`; returns its index.
    /// Never waits: the append happens in the background.
    pub fn push_parts(
        &mut self,
        channel: u32,
        event: &StreamEvent,
        tail: Tail<&[u8]>,
    ) -> Result<u64, DcasError> {
        self.push_encoded(channel, event, None, tail)
    }

    /// Queues the entry of `input` read from gate channel `channel`, logging the bytes its
    /// sender packed when it carries them; returns its index.
    pub fn push_input(&mut self, channel: usize, input: &Delivery) -> Result<u64, DcasError> {
        let packed = input.packed.as_deref();
        self.push_encoded(channel as u32, &input.event, packed, Tail::None)
    }

    fn push_encoded(
        &mut self,
        channel: u32,
        event: &StreamEvent,
        packed: Option<&[u8]>,
        tail: Tail<&[u8]>,
    ) -> Result<u64, DcasError> {
        // The writer publishes its error before it drops the queue: check both, so a
        // stopped log refuses entries from the moment it reports the error.
        if let Err(e) = &*self.logged.borrow() {
            return Err(e.clone());
        }
        let entry = encode_entry(channel, event, packed, tail);
        let bytes = entry.map_err(|source| DcasError::Codec {
            what: format!("encoding an entry of {}", self.list),
            source,
        })?;
        let len = bytes.len() as u64;
        self.tx.send(bytes).map_err(|_| self.stopped_error())?;
        self.next += 1;
        self.bytes += len;
        Ok(self.next - 1)
    }

    /// Index the next entry gets: every entry below it was pushed.
    pub fn next_index(&self) -> u64 {
        self.next
    }

    /// Bytes of the entries pushed by this writer (since the subtask started).
    pub fn pushed_bytes(&self) -> u64 {
        self.bytes
    }

    /// Index below which every entry is durably (replicated) in the cache.
    pub fn logged(&self) -> Result<u64, DcasError> {
        self.logged.borrow().clone()
    }

    /// Waits until everything pushed so far is in the cache (log before release).
    pub async fn synced(&mut self) -> Result<(), DcasError> {
        if matches!(*self.logged.borrow(), Ok(n) if n >= self.next) {
            return Ok(());
        }
        self.waiter().reached(self.next).await
    }

    /// A handle that waits for the log to reach an index from another task (the
    /// asynchronous snapshot waits for the entries it reflects).
    pub fn waiter(&self) -> LogWaiter {
        LogWaiter {
            logged: self.logged.clone(),
            list: self.list.clone(),
        }
    }

    fn stopped_error(&self) -> DcasError {
        match self.logged.borrow().clone() {
            Err(e) => e,
            Ok(_) => DcasError::Stopped(self.list.clone()),
        }
    }
}

/// Waits for an [`InputLog`] to reach an index.
#[derive(Clone)]
pub struct LogWaiter {
    logged: watch::Receiver<Result<u64, DcasError>>,
    list: String,
}

impl LogWaiter {
    /// Waits until every entry below `index` is in the cache.
    pub async fn reached(&mut self, index: u64) -> Result<(), DcasError> {
        let result = self
            .logged
            .wait_for(|r| r.as_ref().map_or(true, |&n| n >= index))
            .await
            .map(|r| r.clone());
        match result {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(DcasError::Stopped(self.list.clone())),
        }
    }
}

/// How long an append is retried while the cache recovers from a member's loss (the
/// partition table moves the primary to a backup within a heartbeat timeout or two).
const TRANSIENT_RETRY: Duration = Duration::from_secs(20);

/// Runs an idempotent cache operation of `client`, retrying it while the cache recovers
/// from a member's loss (outcome unknown, timeout, no member reachable) for up to
/// [`TRANSIENT_RETRY`]: as soon as the client has a newer table, or after a backoff; and
/// while the members refuse it for room, for up to [`FULL_WAIT`] in a row.
async fn retrying<T, F, Fut>(client: &CacheClient, what: &str, op: F) -> Result<T, CacheError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, CacheError>>,
{
    retrying_while(client, what, || true, op).await
}

/// [`retrying`], giving up as soon as `open()` turns false (the caller stopped).
async fn retrying_while<T, F, Fut>(
    client: &CacheClient,
    what: &str,
    open: impl Fn() -> bool,
    mut op: F,
) -> Result<T, CacheError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, CacheError>>,
{
    let started = tokio::time::Instant::now();
    let mut backoff = Backoff::new(TRANSIENT_BACKOFF, FULL_BACKOFF);
    let mut retries = 0u32;
    let mut full_since = None;
    loop {
        let epoch = client.table().epoch;
        match op().await {
            // Refused for room, on the primary or a backup: wait for trims (backpressure).
            // Steady backpressure holds many writes back a little: not worth a warning each.
            Err(e @ CacheError::Full { .. }) if open() => {
                let since = *full_since.get_or_insert_with(|| {
                    debug!(what, error = %e, wait_s = FULL_WAIT.as_secs(), "Cache full; waiting for room.");
                    tokio::time::Instant::now()
                });
                if since.elapsed() >= FULL_WAIT {
                    return Err(e);
                }
                tokio::time::sleep(FULL_BACKOFF).await;
                retries += 1;
            }
            Ok(v) if retries > 0 => {
                // What a member's loss, or a full cache, cost a subtask that did not fail.
                let stalled_us = started.elapsed().as_micros() as u64;
                info!(
                    what,
                    retries, stalled_us, "Cache operation succeeded after retrying."
                );
                return Ok(v);
            }
            Err(
                e @ (CacheError::Unacknowledged(_)
                | CacheError::Timeout(..)
                | CacheError::NoMembers(_)),
            ) if open() && started.elapsed() < TRANSIENT_RETRY => {
                let pause = backoff.pause();
                // A failover between two refusals for room: the new primary's wait for
                // room starts afresh (this arm ends at TRANSIENT_RETRY in any case).
                full_since = None;
                warn!(what, error = %e, retry_within_ms = pause.as_millis() as u64, "Cache operation failed; retrying.");
                client.table_after(epoch, pause).await;
                retries += 1;
            }
            other => return other,
        }
    }
}

/// Appends `items` at index `next` ([`Op::AppendAt`](crate::protocol::cache::Op)), retrying
/// while the cache is full (backpressure, up to [`FULL_WAIT`]) or recovering from a
/// member's loss; `Err(end)` when the list ends elsewhere. An attempt whose outcome is
/// unknown may have landed on the primary but not on a backup: its retry replicates the
/// items again, so success always means every replica holds them (a primary's length alone
/// would not).
async fn append_at(
    client: &CacheClient,
    partition: u32,
    list: &str,
    next: u64,
    items: &[Vec<u8>],
    open: impl Fn() -> bool,
) -> Result<Result<u64, u64>, CacheError> {
    retrying_while(client, list, open, || {
        client.append_at(partition, list, next, items.to_vec())
    })
    .await
}

/// A restarted writer's first write: `tail`, the last entries below `next` that the
/// restart read from the log's primary and replays (at most [`MAX_GROUP`], one append's
/// worth), appended at their index again. An earlier incarnation's last append (a writer
/// stops at its first failure, a killed one in the middle of an append) may have landed on
/// the primary alone, a backup having refused it (full, or gone); the primary answers this
/// retry as landed and replicates it, so every backup holds what the replay read before
/// the first new entry lands after it (a backup missing entries below a new one fills them
/// with empty placeholders, which a later restart from that backup could not replay). A
/// log that changed since it was read is left as it is: the writer's first append then
/// stops on the changed end.
async fn replicate_tail(
    client: &CacheClient,
    partition: u32,
    list: &str,
    next: u64,
    tail: &[Vec<u8>],
    open: impl Fn() -> bool,
) -> Result<(), DcasError> {
    let at = next - tail.len() as u64;
    match append_at(client, partition, list, at, tail, open).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(end)) => {
            warn!(
                list,
                end, at, "The log changed since the restart read it; not replicated again."
            );
            Ok(())
        }
        Err(source) => Err(DcasError::Cache {
            what: format!(
                "replicating the {} entries a restart read from {list}",
                tail.len()
            ),
            source,
        }),
    }
}

/// The writer task: one append in flight, everything queued meanwhile in the next.
async fn write_log(
    client: CacheClient,
    partition: u32,
    list: String,
    mut next: u64,
    mut rx: mpsc::UnboundedReceiver<Vec<u8>>,
    logged: watch::Sender<Result<u64, DcasError>>,
    lease: Lease,
) {
    while let Some(first) = rx.recv().await {
        if let Err(e) = lease.check(&list, "appending") {
            warn!(list = %list, error = %e, "Input log fenced.");
            let _ = logged.send(Err(e));
            return;
        }
        let mut items = vec![first];
        while items.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(item) => items.push(item),
                Err(_) => break,
            }
        }
        let n = items.len() as u64;
        let result = append_at(&client, partition, &list, next, &items, || {
            !logged.is_closed()
        })
        .await;
        let outcome = match result {
            Ok(Ok(_)) => {
                next += n;
                Ok(next)
            }
            Ok(Err(end)) => Err(DcasError::Corrupt {
                list: list.clone(),
                message: format!("the log ends at index {end}, this writer's next is {next}"),
            }),
            Err(source) => Err(DcasError::Cache {
                what: format!("appending {n} entries to {list}"),
                source,
            }),
        };
        let failed = outcome.is_err();
        if let Err(e) = &outcome {
            warn!(list = %list, error = %e, "Input log append failed; the log stops here.");
        }
        if logged.send(outcome).is_err() || failed {
            return;
        }
    }
}

/// A batch sent on an output channel and not yet known to be in the receiver's log, kept
/// [`packed`]: the bytes that went to the receiver, which it logged as they came (packing a
/// batch once costs less than cloning its records and later dropping them one by one), and
/// which snapshots carry as they are.
#[derive(Clone, Debug, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct RetainedBatch {
    /// Output channel: (route index, target index).
    pub channel: (u32, u32),
    /// Seq of the first record.
    pub first_seq: Seq,
    /// Records in it.
    pub len: u32,
    /// The batch's data event as sent (`first_seq` set), [`packed::pack_data`]; shared with
    /// the delivery that carried it.
    pub packed: Bytes,
}

impl RetainedBatch {
    /// The batch of `records` from seq `first_seq`, sent on `channel`, packed.
    pub fn pack(channel: (u32, u32), first_seq: Seq, records: &[Record]) -> RetainedBatch {
        debug_assert!(
            u32::try_from(records.len()).is_ok(),
            "a batch of 2^32 records"
        );
        RetainedBatch {
            channel,
            first_seq,
            len: records.len() as u32,
            packed: packed::pack_data(first_seq, records).into(),
        }
    }

    /// The batch again. An error only when the bytes were damaged; a restored snapshot's
    /// batches pass [`RetainedBatch::check`] first.
    pub fn unpack(&self) -> Result<Batch, CodecError> {
        packed::decode_data(&self.packed)
    }

    /// The batch as a delivery: decoded, with the bytes it was sent as.
    pub fn delivery(&self) -> Result<Delivery, CodecError> {
        Ok(Delivery {
            event: StreamEvent::Data(self.unpack()?),
            packed: Some(self.packed.clone()),
        })
    }

    /// Ensures the packed bytes decode to the batch the fields describe (its first seq and
    /// length), as [`RetainedOutput::trim`] and resending rely on.
    pub fn check(&self) -> Result<(), CodecError> {
        let batch = self.unpack()?;
        if (batch.first_seq, batch.len()) != (self.first_seq, self.len as usize) {
            return Err(CodecError(format!(
                "a retained batch described as {} records from seq {} holds {} from seq {}",
                self.len,
                self.first_seq,
                batch.len(),
                batch.first_seq
            )));
        }
        Ok(())
    }

    /// Seq after the last record.
    pub fn end_seq(&self) -> Seq {
        self.first_seq.saturating_add(u64::from(self.len))
    }
}

/// Output a sender keeps until its receivers logged it (DESIGN §7: "the sender keeps
/// unacknowledged outputs in a bounded buffer").
#[derive(Debug, Default)]
pub struct RetainedOutput {
    batches: VecDeque<RetainedBatch>,
    records: usize,
}

impl RetainedOutput {
    /// Remembers a batch about to be sent; returns it packed, to send as it is kept.
    pub fn push(&mut self, channel: (u32, u32), batch: &Batch) -> Bytes {
        self.records += batch.len();
        let retained = RetainedBatch::pack(channel, batch.first_seq, &batch.records);
        let packed = retained.packed.clone();
        self.batches.push_back(retained);
        packed
    }

    /// Forgets what the receivers have logged, in one pass: `logged[route][target]` is the
    /// seq below which channel `(route, target)`'s receiver has logged every record (a
    /// channel missing from it keeps everything). A batch logged in part is packed again
    /// without its logged records.
    pub fn trim(&mut self, logged: &[Vec<Seq>]) {
        let mut records = 0;
        self.batches.retain_mut(|b| {
            let (route, target) = (b.channel.0 as usize, b.channel.1 as usize);
            let logged = logged.get(route).and_then(|r| r.get(target)).copied();
            let logged = logged.unwrap_or(0);
            if b.end_seq() <= logged {
                return false;
            }
            if b.first_seq < logged {
                let batch = b.unpack();
                let skip = (logged - b.first_seq) as usize;
                if let Some(rest) = batch.as_ref().ok().and_then(|b| b.records.get(skip..)) {
                    *b = RetainedBatch::pack(b.channel, logged, rest);
                }
            }
            records += b.len as usize;
            true
        });
        self.records = records;
    }

    /// Records retained.
    pub fn records(&self) -> usize {
        self.records
    }

    /// The retained batches, oldest first.
    pub fn batches(&self) -> impl Iterator<Item = &RetainedBatch> {
        self.batches.iter()
    }

    /// A buffer holding `batches` (restored from a snapshot).
    pub fn from_batches(batches: Vec<RetainedBatch>) -> RetainedOutput {
        let records = batches.iter().map(|b| b.len as usize).sum();
        RetainedOutput {
            batches: batches.into(),
            records,
        }
    }
}

/// `snap(t)`: what a subtask needs to restart without its neighbours restarting.
///
/// Whole, or incremental: then the operator states marked in `changes` hold only what
/// changed since snapshot `follows` ([`Operator::snapshot_changes`]), and a restart
/// applies the chain from the last whole snapshot. Positions (inputs, router, log offset)
/// are always whole: they are small, and the last snapshot of a chain gives them.
///
/// [`Operator::snapshot_changes`]: crate::operator::Operator::snapshot_changes
#[derive(Clone, Debug, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct DcasSnapshot {
    /// Snapshot number (the subtask's micro-window count).
    pub id: u64,
    /// `None` for a whole snapshot; for an incremental one, the snapshot it follows
    /// (`id - 1`: [`SnapshotStore::load`] refuses a chain where it is not).
    pub follows: Option<u64>,
    /// Per entry of `operators`: whether it holds changes rather than a whole state.
    pub changes: Vec<bool>,
    /// Index of the first log entry the state does not reflect: replay starts here.
    pub log_offset: u64,
    /// State of the source and of every operator of the chain.
    pub operators: Vec<OperatorState>,
    /// Per input channel (gate order): the next seq expected, watermark, end.
    pub inputs: Vec<InputPosition>,
    /// The output side: seqs, unsent and retained output, last broadcast.
    pub router: RouterPosition,
    /// With fallback checkpoints, the newest snapshot id whose staged sink output was
    /// committed (a restore commits no further); `None`: a restore commits all it staged.
    pub committed: Option<u64>,
}

impl DcasSnapshot {
    /// Bytes of operator state it holds (changes only, in an incremental one).
    pub fn state_bytes(&self) -> usize {
        self.operators.iter().map(|o| o.state.len()).sum()
    }
}

/// Reads and writes one subtask's `snap(t)` and `log(t)`.
#[derive(Clone)]
pub struct SnapshotStore {
    client: CacheClient,
    /// The partition of the log and the snapshot (one partition: a snapshot and the trim it
    /// allows go to the same primary); `None` until [`SnapshotStore::place`] chose it.
    partition: Option<u32>,
    names: DcasNames,
}

impl SnapshotStore {
    /// The store of the subtask named `names`, in `partition`.
    #[cfg(test)]
    pub fn new(client: CacheClient, partition: u32, names: DcasNames) -> SnapshotStore {
        SnapshotStore {
            client,
            partition: Some(partition),
            names,
        }
    }

    /// The store of the subtask named `names`, whose partition [`SnapshotStore::place`]
    /// will find.
    pub fn unplaced(client: CacheClient, names: DcasNames) -> SnapshotStore {
        SnapshotStore {
            client,
            partition: None,
            names,
        }
    }

    /// The entries' partition, once placed.
    pub fn partition(&self) -> Result<u32, DcasError> {
        self.partition.ok_or_else(|| DcasError::Corrupt {
            list: self.names.log.clone(),
            message: "used before the log was placed".into(),
        })
    }

    /// Finds the partition of the log and the snapshot, choosing and recording it on the
    /// subtask's first start: one whose primary is not `avoid`, the subtask's own task
    /// manager, so that losing that task manager does not also take the primary copy of
    /// the log (the log-placement rule, DESIGN §7). A restarted subtask reads the recorded
    /// partition, since the table has changed by then. The placement entry itself is in
    /// its key's hash partition, replicated like every entry.
    pub async fn place(&mut self, avoid: TaskManagerId) -> Result<u32, DcasError> {
        let (map, key) = (&self.names.placement, &self.names.key);
        let chosen = self
            .client
            .partition_avoiding(&self.names.log, avoid)
            .to_le_bytes()
            .to_vec();
        let client = &self.client;
        // The put decides: a retry of ours that landed on the primary only is replicated
        // again by it, where a read alone would find it and stop. The read goes beside it,
        // so a restart (recorded before, by an earlier incarnation) takes one round trip.
        let recorded = retrying(client, "placing a log", || async {
            let (put, read) = tokio::join!(
                client.put_if_version(map, key, chosen.clone(), 0),
                client.get(map, key)
            );
            // A put that landed decides, whatever became of the read beside it.
            if put?.is_ok() {
                return Ok(Some(chosen.clone()));
            }
            match read? {
                Some((v, _)) => Ok(Some(v)),
                // The read overtook the put that found the record: read again.
                None => Ok(client.get(map, key).await?.map(|(v, _)| v)),
            }
        })
        .await
        .map_err(|e| self.cache_error("placing the log", e))?;
        let partitions = self.client.table().partitions();
        let partition = recorded
            .and_then(|v| <[u8; 4]>::try_from(v.as_slice()).ok())
            .map(u32::from_le_bytes)
            .filter(|p| *p < partitions)
            .ok_or_else(|| DcasError::Corrupt {
                list: self.names.log.clone(),
                message: format!("no valid partition recorded in {map}"),
            })?;
        self.partition = Some(partition);
        Ok(partition)
    }

    /// The entries' names.
    pub fn names(&self) -> &DcasNames {
        &self.names
    }

    fn cache_error(&self, what: &str, source: CacheError) -> DcasError {
        DcasError::Cache {
            what: format!("{what} of {}", self.names.log),
            source,
        }
    }

    /// Stores `snap`, then trims the log up to its offset. A whole snapshot replaces the
    /// previous one, only if that is still at `version` (the one this incarnation of the
    /// subtask loaded or stored last), and drops the incremental ones (the list then ends at
    /// its id + 1); an incremental one is appended to them at its id. Returns the
    /// snapshot's size in bytes and the whole snapshot's version after it.
    ///
    /// The version fences incarnations: a subtask that stopped (killed through the REST
    /// API, say) while its store waited on a slow cache may see that store land after its
    /// successor loaded. Written blindly, it would replace the successor's whole snapshot
    /// with an older state that the successor's incremental ones would then be applied to.
    pub async fn store(
        &self,
        snap: &DcasSnapshot,
        mut version: u64,
    ) -> Result<(usize, u64), DcasError> {
        let value = encode(snap).map_err(|source| DcasError::Codec {
            what: format!("encoding snapshot {}", snap.id),
            source,
        })?;
        let size = value.len();
        let (p, names) = (self.partition()?, &self.names);
        let value = value.to_vec();
        if snap.follows.is_none() {
            let put = retrying(&self.client, "storing a snapshot", || {
                self.client
                    .put_if_version_in(p, &names.map, &names.key, value.clone(), version)
            })
            .await
            .map_err(|e| self.cache_error("storing a snapshot", e))?;
            version = put.map_err(|current| DcasError::Superseded {
                key: String::from_utf8_lossy(&names.key).into_owned(),
                current,
                expected: version,
            })?;
            retrying(&self.client, "dropping incremental snapshots", || {
                self.client.trim_prefix(p, &names.changes, snap.id + 1)
            })
            .await
            .map_err(|e| self.cache_error("dropping incremental snapshots", e))?;
        } else {
            let appended = retrying(&self.client, "storing an incremental snapshot", || {
                self.client
                    .append_at(p, &names.changes, snap.id, vec![value.clone()])
            })
            .await
            .map_err(|e| self.cache_error("storing an incremental snapshot", e))?;
            if let Err(end) = appended {
                return Err(DcasError::Corrupt {
                    list: names.changes.clone(),
                    message: format!(
                        "incremental snapshot {} does not follow the stored ones (they end at {end})",
                        snap.id
                    ),
                });
            }
        }
        retrying(&self.client, "trimming a log", || {
            self.client.trim_prefix(p, &names.log, snap.log_offset)
        })
        .await
        .map_err(|e| self.cache_error("trimming the log", e))?;
        Ok((size, version))
    }

    /// The latest stored snapshot: the last whole one and the incremental ones after it,
    /// oldest first (empty before the first snapshot), and the whole one's version (0:
    /// none). The whole one and the list of incremental ones are read at once: a whole
    /// snapshot at id `w` trims the list to start at `w + 1`, and any entry left below (a
    /// store cut short) is skipped.
    pub async fn load(&self) -> Result<(Vec<DcasSnapshot>, u64), DcasError> {
        let (p, names) = (self.partition()?, &self.names);
        let whole = async {
            retrying(&self.client, "loading a snapshot", || {
                self.client.get_in(p, &names.map, &names.key)
            })
            .await
            .map_err(|e| self.cache_error("loading the snapshot", e))
        };
        let (whole, (first, items)) = tokio::try_join!(whole, self.range_all(&names.changes, 0))?;
        let Some((bytes, version)) = whole else {
            return Ok((Vec::new(), 0));
        };
        let decoded = |bytes: &[u8], what: String| {
            decode::<DcasSnapshot>(bytes).map_err(|source| DcasError::Codec { what, source })
        };
        let key = String::from_utf8_lossy(&names.key);
        let mut chain = vec![decoded(&bytes, format!("snapshot {key}"))?];
        let from = chain[0].id + 1;
        if first > from {
            return Err(DcasError::Corrupt {
                list: names.changes.clone(),
                message: format!(
                    "incremental snapshots from {from} are gone (the list starts at {first})"
                ),
            });
        }
        for (id, item) in (first..).zip(&items).skip_while(|(id, _)| *id < from) {
            let snap = decoded(item, format!("incremental snapshot {id} of {key}"))?;
            let prev = chain[chain.len() - 1].id;
            if snap.id != id || snap.follows != Some(prev) {
                return Err(DcasError::Corrupt {
                    list: names.changes.clone(),
                    message: format!(
                        "entry {id} holds snapshot {} following {:?}, expected {id} following {prev}",
                        snap.id, snap.follows
                    ),
                });
            }
            chain.push(snap);
        }
        Ok((chain, version))
    }

    /// Every log entry from index `from` to the end, in order, and the end index.
    pub async fn read_log(&self, from: u64) -> Result<(Vec<LogEntry>, u64), DcasError> {
        let (first, items) = self.range_all(&self.names.log, from).await?;
        let (tail, end) = self.log_tail(from, first, items)?;
        Ok((tail.collect::<Result<_, _>>()?, end))
    }

    /// The latest stored snapshot and its version ([`SnapshotStore::load`]), the log
    /// entries after it and the log's end. The log is read from its start beside the
    /// snapshot: it is trimmed only once a snapshot is stored, so it never starts after the
    /// latest one's offset.
    pub async fn load_with_log(
        &self,
    ) -> Result<((Vec<DcasSnapshot>, u64), LogTail, u64), DcasError> {
        let (loaded, (first, items)) =
            tokio::try_join!(self.load(), self.range_all(&self.names.log, 0))?;
        let from = loaded.0.last().map_or(0, |s| s.log_offset);
        let (tail, end) = self.log_tail(from, first, items)?;
        Ok((loaded, tail, end))
    }

    /// The entries from `from` of the log items read from index `first`, and the log's end.
    fn log_tail(
        &self,
        from: u64,
        first: u64,
        mut items: Vec<Vec<u8>>,
    ) -> Result<(LogTail, u64), DcasError> {
        let end = first + items.len() as u64;
        if first > from {
            return Err(DcasError::Corrupt {
                list: self.names.log.clone(),
                message: format!("entries from {from} are gone (the log starts at {first})"),
            });
        }
        items.drain(..(from - first).min(items.len() as u64) as usize);
        let tail = LogTail {
            list: self.names.log.clone(),
            next: from,
            items: items.into_iter(),
        };
        Ok((tail, end.max(from)))
    }

    /// The items of `list` from index `from` (or its start, if later) to its end: the first
    /// index and the items.
    async fn range_all(&self, list: &str, from: u64) -> Result<(u64, Vec<Vec<u8>>), DcasError> {
        let p = self.partition()?;
        read_pages(list, from, READ_PAGE, |at| {
            let range = retrying(&self.client, "reading a list", move || {
                self.client.range(p, list, at, READ_PAGE)
            });
            async move {
                range.await.map_err(|source| DcasError::Cache {
                    what: format!("reading {list}"),
                    source,
                })
            }
        })
        .await
    }
}

/// Reads `list` from index `from` (or its start, if later) to its end with `fetch`, which
/// answers up to `page` items from an index and the index of the first (later than asked
/// when the list was trimmed past it): a page per request until a page comes back short.
/// A list trimmed past the next index between two pages is an error: what was read
/// would not be contiguous.
async fn read_pages<F, R>(
    list: &str,
    from: u64,
    page: u64,
    mut fetch: F,
) -> Result<(u64, Vec<Vec<u8>>), DcasError>
where
    F: FnMut(u64) -> R,
    R: std::future::Future<Output = Result<(u64, Vec<Vec<u8>>), DcasError>>,
{
    let (mut start, mut out, mut at) = (None, Vec::new(), from);
    loop {
        let (first, items) = fetch(at).await?;
        if start.is_some() && first != at {
            return Err(DcasError::Corrupt {
                list: list.to_string(),
                message: format!("trimmed past {at} while being read"),
            });
        }
        let short = (items.len() as u64) < page;
        start.get_or_insert(first);
        at = first + items.len() as u64;
        out.extend(items);
        if short {
            return Ok((start.unwrap_or(from), out));
        }
    }
}

/// Identity of a channel that outlives deployments: edge and both subtask indexes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ChannelKey {
    /// Index of the edge in the job graph.
    pub edge: u32,
    /// Upstream subtask.
    pub from: u32,
    /// Downstream subtask.
    pub to: u32,
}

impl ChannelKey {
    fn bytes(&self) -> Vec<u8> {
        format!("{}:{}->{}", self.edge, self.from, self.to).into_bytes()
    }
}

/// Per channel, the next seq its receiver has logged: receivers publish (as their log
/// grows, and after each snapshot), senders read to trim their [`RetainedOutput`]. A value
/// is a lower bound of what the log holds, so one that lands late only delays a trim.
#[derive(Clone)]
pub struct ChannelProgress {
    client: CacheClient,
    map: String,
}

impl ChannelProgress {
    /// Progress of job `job`'s channels.
    pub fn new(client: CacheClient, job: &str) -> ChannelProgress {
        ChannelProgress {
            client,
            map: format!("{}progress", DcasNames::job_prefix(job)),
        }
    }

    /// Publishes the logged seqs of a receiver's input channels (one request per primary).
    pub async fn publish(&self, logged: &[(ChannelKey, Seq)]) -> Result<(), DcasError> {
        let entries: Vec<(Vec<u8>, Vec<u8>)> = logged
            .iter()
            .map(|(c, seq)| (c.bytes(), seq.to_le_bytes().to_vec()))
            .collect();
        retrying(&self.client, "publishing channel progress", || async {
            for r in self.client.put_many(&self.map, entries.clone()).await {
                r?;
            }
            Ok(())
        })
        .await
        .map_err(|source| DcasError::Cache {
            what: format!("publishing channel progress to {}", self.map),
            source,
        })
    }

    /// Publishes `logged` (if any), then reads the logged seq of every channel of
    /// `outputs` (per route, per target).
    pub async fn exchange(
        &self,
        logged: &[(ChannelKey, Seq)],
        outputs: &[Vec<ChannelKey>],
    ) -> Result<Vec<Vec<Seq>>, DcasError> {
        if !logged.is_empty() {
            self.publish(logged).await?;
        }
        let flat: Vec<ChannelKey> = outputs.iter().flatten().copied().collect();
        let mut seqs = if flat.is_empty() {
            Vec::new()
        } else {
            self.read(&flat).await?
        }
        .into_iter();
        Ok(outputs
            .iter()
            .map(|r| r.iter().map(|_| seqs.next().unwrap_or(0)).collect())
            .collect())
    }

    /// The logged seq of each channel (0 when its receiver has published nothing yet).
    pub async fn read(&self, channels: &[ChannelKey]) -> Result<Vec<Seq>, DcasError> {
        let keys: Vec<Vec<u8>> = channels.iter().map(ChannelKey::bytes).collect();
        let values = retrying(&self.client, "reading channel progress", || async {
            self.client
                .get_many(&self.map, keys.clone())
                .await
                .into_iter()
                .collect::<Result<Vec<_>, CacheError>>()
        })
        .await
        .map_err(|source| DcasError::Cache {
            what: format!("reading channel progress from {}", self.map),
            source,
        })?;
        let mut out = Vec::with_capacity(channels.len());
        for (value, c) in values.into_iter().zip(channels) {
            out.push(match value {
                None => 0,
                Some((bytes, _)) => {
                    let raw: [u8; 8] =
                        bytes.as_slice().try_into().map_err(|_| DcasError::Codec {
                            what: format!("progress of channel {c:?}"),
                            source: CodecError(format!("{} bytes, expected 8", bytes.len())),
                        })?;
                    u64::from_le_bytes(raw)
                }
            });
        }
        Ok(out)
    }
}

/// A snapshot stored in the cache, and what the receivers of the subtask's output had
/// logged then.
#[derive(Debug)]
pub struct Stored {
    /// The snapshot.
    pub id: u64,
    /// Whether it was whole (not incremental).
    pub whole: bool,
    /// Its encoded size.
    pub bytes: usize,
    /// The whole snapshot's version after it.
    pub version: u64,
    /// Per route, per target: the seq below which the receiver has logged everything.
    pub logged: Vec<Vec<Seq>>,
}

/// The task manager's lease on its subtasks (DESIGN §5, fencing): valid while the job
/// manager acknowledges its heartbeats. A task manager paused past it may already have been
/// declared dead and its subtasks restarted elsewhere, so its log writers stop appending
/// instead of writing after the restarted instance's entries. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Lease {
    /// Start of the lease clock.
    origin: std::time::Instant,
    /// Milliseconds on that clock until which the lease holds.
    until_ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Default for Lease {
    fn default() -> Lease {
        Lease {
            origin: std::time::Instant::now(),
            until_ms: std::sync::Arc::new(std::sync::atomic::AtomicU64::new(u64::MAX)),
        }
    }
}

impl Lease {
    /// Extends the lease to `span` from now (on every heartbeat acknowledgement).
    pub fn renew(&self, span: Duration) {
        let until = self.origin.elapsed() + span;
        self.until_ms.store(
            until.as_millis() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// True while the lease holds.
    pub fn valid(&self) -> bool {
        (self.origin.elapsed().as_millis() as u64)
            <= self.until_ms.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The fence before every write to the cache (`doing` it to `list`): an error once the
    /// lease lapsed, since the task manager may have been declared dead and its subtasks
    /// restarted elsewhere, whose log and snapshots it must not write into.
    pub fn check(&self, list: &str, doing: &str) -> Result<(), DcasError> {
        match self.valid() {
            true => Ok(()),
            false => Err(DcasError::Corrupt {
                list: list.to_string(),
                message: format!(
                    "the task manager's lease lapsed (it may have been declared dead and the subtask restarted elsewhere): not {doing}"
                ),
            }),
        }
    }
}

/// How a DCAS subtask is configured.
#[derive(Clone)]
pub struct DcasConfig {
    /// The task manager's lease; appends stop once it lapses.
    pub lease: Lease,
    /// The cache.
    pub client: CacheClient,
    /// Names the entries: the job and its deployment (`<job>/g<generation>`), so a restart
    /// of the whole job from a fallback checkpoint starts clean.
    pub job: String,
    /// The task manager running the subtasks: their logs' primaries avoid it.
    pub me: TaskManagerId,
    /// Snapshot after this many input records…
    pub every_records: u64,
    /// …or this long, whichever comes first.
    pub interval: Duration,
    /// Whether snapshots may carry only what changed since the previous one.
    pub incremental: bool,
    /// The deployment's generation: its snapshot ids start at [`first_snapshot_id`].
    pub generation: u64,
}

/// The first DCAS snapshot id of deployment `generation`: each generation's ids lie above
/// every earlier one's (2^40 apart), so sinks' epochs (snapshot ids) only grow across
/// whole-job restarts, even one from an older fallback checkpoint than the newest.
pub fn first_snapshot_id(generation: u64) -> u64 {
    (generation.saturating_sub(1) << 40) + 1
}

/// Most incremental snapshots after a whole one: a restart applies them all.
const MAX_CHAIN: u32 = 16;

/// Whole snapshots in a row after which a link is tried again, though the last one was too
/// large: the state may have come to change less.
const RETRY_LINK_AFTER: u32 = 8;

/// The incremental snapshots stored since the last whole one.
#[derive(Clone, Copy, Debug, Default)]
struct Chain {
    /// Size of the whole snapshot.
    base_bytes: usize,
    /// Incremental snapshots after it, and their total size.
    links: u32,
    bytes: usize,
}

/// Whether the next snapshot may be a link. A restart reads the whole snapshot and every
/// link after it, so links pay only while they stay small against it: a link that holds
/// most of the state (a window count whose every key changes between snapshots) saves
/// nothing when written and doubles what a restart reads. The next link is predicted to be
/// as large as the last one; the chain may grow to half the whole snapshot's size.
#[derive(Clone, Copy, Debug, Default)]
struct Links {
    /// Set once this incarnation stored a whole snapshot: the next may be incremental.
    chain: Option<Chain>,
    /// Size of the last link stored.
    last_link: Option<usize>,
    /// Whole snapshots stored since the last link.
    wholes: u32,
}

impl Links {
    fn may_link(&self) -> bool {
        let Some(c) = self.chain else {
            return false;
        };
        let next = match self.last_link {
            Some(n) if self.wholes < RETRY_LINK_AFTER => n,
            _ => 0,
        };
        c.links < MAX_CHAIN && c.bytes + next <= c.base_bytes / 2
    }

    fn stored(&mut self, whole: bool, bytes: usize) {
        self.chain = Some(match (whole, self.chain) {
            (false, Some(c)) => Chain {
                links: c.links + 1,
                bytes: c.bytes + bytes,
                ..c
            },
            _ => Chain {
                base_bytes: bytes,
                ..Chain::default()
            },
        });
        if whole {
            self.wholes = self.wholes.saturating_add(1);
        } else {
            (self.last_link, self.wholes) = (Some(bytes), 0);
        }
    }
}

/// How long a subtask's input must pause after records for a snapshot to fall due before
/// its micro-window is full: twice the data plane's default linger, so a steady stream,
/// whose batches leave at least that often, never looks paused.
const QUIET: Duration = Duration::from_millis(10);

/// Operator state (of its last whole snapshot) under which a subtask counts as small:
/// a map, a filter or a key_by hold none. See [`MicroWindow`].
const SMALL_STATE: u64 = 64 * 1024;

/// Log a small subtask writes before its next snapshot falls due early.
const SMALL_LOG: u64 = 64 * 1024;

/// When a subtask's next snapshot falls due: the micro-window (`every_records` records or
/// `interval`, whichever first), or earlier when its input paused after a burst — a sink
/// behind a window operator gets a window's results at once and then nothing until the
/// next window fires. A snapshot then leaves its log empty until the next burst, so a
/// restart almost never has a burst to replay. A paused subtask snapshots no more often
/// than every quarter `interval`.
///
/// A subtask with little state ([`SMALL_STATE`]) snapshots more often: once its log since
/// the last snapshot holds [`SMALL_LOG`] bytes, but no sooner than a tenth of `interval`
/// after the last. A restart replays the log after its snapshot record by record (about
/// 60 ns a record in `bench_dcas`), so for a map or a filter the log is nearly all of a
/// restart, while their snapshots cost little: positions, and the output their receivers
/// have not logged yet, kept packed.
///
/// A keyed state costs its size to encode and store at every whole snapshot, so a subtask
/// holding one snapshots early only while the machine has CPU to spare ([`Headroom`]):
/// once its log since the last snapshot outweighs its state, no sooner than a tenth of
/// `interval` after the last. A restart then reads and replays no more than a snapshot
/// writes. On saturated cores the same snapshots would cost throughput (`bench_dcas` (d)
/// lost about 5 points to them), so there the subtask keeps the interval, and asks again
/// a tenth of it later.
#[derive(Clone, Copy, Debug)]
struct MicroWindow {
    every_records: u64,
    interval: Duration,
    /// Records consumed since the last snapshot started.
    records: u64,
    /// When the last snapshot started (or the subtask).
    last: std::time::Instant,
    /// When the latest records arrived.
    last_input: std::time::Instant,
    /// The log's size ([`InputLog::pushed_bytes`]) when the last snapshot started.
    log_at_last: u64,
    /// The operator state of the last whole snapshot started; `None` before the first.
    state_bytes: Option<u64>,
    /// An early snapshot of a large state was refused for want of spare CPU: not asked
    /// again before this.
    early_from: Option<std::time::Instant>,
}

impl MicroWindow {
    fn new(every_records: u64, interval: Duration) -> MicroWindow {
        let now = std::time::Instant::now();
        MicroWindow {
            every_records: every_records.max(1),
            interval,
            records: 0,
            last: now,
            last_input: now,
            log_at_last: 0,
            state_bytes: None,
            early_from: None,
        }
    }

    fn consumed(&mut self, records: usize, now: std::time::Instant) {
        if records > 0 {
            self.records += records as u64;
            self.last_input = now;
        }
    }

    /// A snapshot started, the log holding `log_bytes`; a whole one holds `state` bytes of
    /// operator state (`None` for an incremental one).
    fn started(&mut self, now: std::time::Instant, log_bytes: u64, state: Option<u64>) {
        self.records = 0;
        self.last = now;
        self.log_at_last = log_bytes;
        self.state_bytes = state.or(self.state_bytes);
        self.early_from = None;
    }

    /// When the next snapshot falls due, the log holding `log_bytes`; `None` while no
    /// records arrived since the last. A large state's early snapshot ([`Self::spare_at`])
    /// counts: [`Self::due`] decides whether the CPU can spare it.
    fn due_at(&self, log_bytes: u64) -> Option<std::time::Instant> {
        let due = self.regular_at(log_bytes)?;
        Some(self.spare_at(log_bytes).map_or(due, |at| at.min(due)))
    }

    /// When the micro-window is full, its interval passed, the input paused, or a small
    /// state's log grew enough.
    fn regular_at(&self, log_bytes: u64) -> Option<std::time::Instant> {
        if self.records == 0 {
            return None;
        }
        if self.records >= self.every_records {
            return Some(self.last);
        }
        // An interval too long for the clock (a spec's `snapshot_interval_ms` is a u64)
        // only ever falls due by records.
        let after = |d: Duration| self.last.checked_add(d);
        let paused = self
            .last_input
            .checked_add(QUIET)?
            .max(after(self.interval / 4)?);
        let due = after(self.interval).map_or(paused, |due| paused.min(due));
        let small = self.state_bytes.is_some_and(|s| s < SMALL_STATE);
        let by_log =
            after(self.interval / 10).filter(|_| small && self.logged(log_bytes) >= SMALL_LOG);
        Some(by_log.map_or(due, |at| at.min(due)))
    }

    /// When a large state's log since the last snapshot outweighs it (and a refusal's wait
    /// is over): an early snapshot, if the CPU can spare it.
    fn spare_at(&self, log_bytes: u64) -> Option<std::time::Instant> {
        let state = self.state_bytes.filter(|&s| s >= SMALL_STATE)?;
        if self.records == 0 || self.logged(log_bytes) < state {
            return None;
        }
        let at = self.last.checked_add(self.interval / 10)?;
        Some(self.early_from.map_or(at, |from| at.max(from)))
    }

    /// Log bytes written since the last snapshot started.
    fn logged(&self, log_bytes: u64) -> u64 {
        log_bytes.saturating_sub(self.log_at_last)
    }

    /// True when a snapshot is due; `spare` tells whether the machine can spare the CPU
    /// for a large state's early one (asked only then). Refused, it is asked again a
    /// tenth of the interval later.
    fn due(
        &mut self,
        now: std::time::Instant,
        log_bytes: u64,
        spare: impl FnOnce() -> bool,
    ) -> bool {
        if self.regular_at(log_bytes).is_some_and(|at| at <= now) {
            return true;
        }
        if self.spare_at(log_bytes).is_none_or(|at| at > now) {
            return false;
        }
        if spare() {
            return true;
        }
        self.early_from = now.checked_add(self.interval / 10);
        false
    }
}

/// Whether the machine has had CPU to spare lately ([`MicroWindow`]): at least
/// [`SPARE_CPU`] of its CPU time idle over the last [`SPARE_SPAN`] to twice that (Linux;
/// never elsewhere). Read only when a large state's early snapshot is due, so at most
/// every tenth of a snapshot interval.
#[derive(Clone, Copy, Debug, Default)]
struct Headroom {
    /// The window's start: a reading at least [`SPARE_SPAN`] old once there is one.
    older: Option<(std::time::Instant, CpuTimes)>,
    /// The reading that becomes `older` once it is [`SPARE_SPAN`] old.
    newer: Option<(std::time::Instant, CpuTimes)>,
}

/// The idle share of the machine's CPU time under which it has none to spare.
const SPARE_CPU: f64 = 0.25;

/// The shortest span [`Headroom`] measures over: `/proc/stat` counts in ticks of 10 ms
/// per core, so a shorter one would be mostly rounding.
const SPARE_SPAN: Duration = Duration::from_millis(50);

impl Headroom {
    fn spare(&mut self, now: std::time::Instant) -> bool {
        CpuTimes::read().is_some_and(|times| self.spare_with(now, times))
    }

    /// [`Headroom::spare`] with the counters read at `now`.
    fn spare_with(&mut self, now: std::time::Instant, times: CpuTimes) -> bool {
        let aged = |r: Option<(std::time::Instant, CpuTimes)>| {
            r.filter(|(at, _)| now.saturating_duration_since(*at) >= SPARE_SPAN)
        };
        let idle = aged(self.older).and_then(|(_, old)| times.idle_since(&old));
        match aged(self.newer) {
            Some(newer) => (self.older, self.newer) = (Some(newer), Some((now, times))),
            None if self.newer.is_none() => {
                (self.older, self.newer) = (Some((now, times)), Some((now, times)))
            }
            None => {}
        }
        idle.is_some_and(|idle| idle >= SPARE_CPU)
    }
}

/// One subtask's DCAS machinery: its log writer, snapshot store, channel identities and
/// the snapshot in flight. Owned by the subtask's loop.
pub struct DcasSubtask {
    store: SnapshotStore,
    progress: ChannelProgress,
    /// Identity of each input channel (gate order).
    inputs: Vec<ChannelKey>,
    /// Identity of each output channel, per route, per target.
    outputs: Vec<Vec<ChannelKey>>,
    incremental: bool,
    links: Links,
    lease: Lease,
    me: TaskManagerId,
    log: Option<InputLog>,
    window: MicroWindow,
    headroom: Headroom,
    next_id: u64,
    /// The whole snapshot's version as this incarnation last read or wrote it.
    version: u64,
    in_flight: Option<InFlight>,
    acks: Acks,
}

/// A snapshot being stored in the background: its outcome, and the task, which stops
/// when the subtask does (dropped with it).
struct InFlight {
    outcome: oneshot::Receiver<Result<Stored, DcasError>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How often a subtask publishes what it has logged and reads what its receivers have,
/// between snapshots. Retained output (which every snapshot carries) is trimmed this often,
/// instead of once per snapshot of the receiver.
const PROGRESS_EVERY: Duration = Duration::from_millis(5);

/// How often a subtask waiting for an exchange without input looks at it, and how often
/// it exchanges while it hurries.
const PROGRESS_POLL: Duration = Duration::from_millis(1);

/// How long a recovery's neighbours exchange progress every [`PROGRESS_POLL`].
const RECOVERY_HURRY: Duration = Duration::from_millis(200);

/// Longest pause of the exchange after failed ones (a full or recovering cache).
const PROGRESS_RETRY: Duration = Duration::from_millis(200);

/// A subtask's side of the acknowledgements between snapshots: which input seqs its log
/// holds, published as the log grows, and what its receivers have published.
#[derive(Default)]
struct Acks {
    /// Log entries of input data not yet known to be in the cache: (index, gate channel,
    /// the channel's next seq after the entry).
    pending: VecDeque<(u64, usize, Seq)>,
    /// Per input channel, the next seq known to be logged.
    logged: Vec<Seq>,
    /// Per input channel, whether `logged` changed since it was last published.
    changed: Vec<bool>,
    /// Per input channel, the seq last acked on the channel ([`DcasSubtask::direct_acks`]).
    acked: Vec<Seq>,
    /// No exchange starts before this.
    next_at: Option<std::time::Instant>,
    /// The pause after the exchanges that failed in a row; `None` after a success.
    retry: Option<Backoff>,
    /// Restored positions not yet published ([`DcasSubtask::inputs_restored`]).
    republish: bool,
    /// The exchange in flight publishes restored positions (again due if it fails).
    republishing: bool,
    /// Until then the exchange runs every [`PROGRESS_POLL`] ([`DcasSubtask::hurry`]).
    hurry_until: Option<std::time::Instant>,
    in_flight: Option<oneshot::Receiver<Result<Vec<Vec<Seq>>, DcasError>>>,
}

impl Acks {
    /// True while a recovery has the exchange run every [`PROGRESS_POLL`].
    fn hurrying(&self, now: std::time::Instant) -> bool {
        self.hurry_until.is_some_and(|until| now < until)
    }
}

impl DcasSubtask {
    /// The DCAS side of subtask `subtask` of task `task`, whose channels are `inputs` and
    /// `outputs`.
    pub fn new(
        config: &DcasConfig,
        task: usize,
        subtask: usize,
        inputs: Vec<ChannelKey>,
        outputs: Vec<Vec<ChannelKey>>,
    ) -> DcasSubtask {
        let names = DcasNames::new(&config.job, task, subtask);
        DcasSubtask {
            // Placed by `load`.
            store: SnapshotStore::unplaced(config.client.clone(), names),
            progress: ChannelProgress::new(config.client.clone(), &config.job),
            inputs,
            outputs,
            incremental: config.incremental,
            links: Links::default(),
            lease: config.lease.clone(),
            me: config.me,
            log: None,
            window: MicroWindow::new(config.every_records, config.interval),
            headroom: Headroom::default(),
            next_id: first_snapshot_id(config.generation),
            version: 0,
            in_flight: None,
            acks: Acks::default(),
        }
    }

    /// Reads what the receivers of this subtask's output have logged (per route, per
    /// target), apart from the subtask, so it can run beside [`DcasSubtask::load`].
    pub fn receivers_logged(
        &self,
    ) -> impl std::future::Future<Output = Result<Vec<Vec<Seq>>, DcasError>> + 'static {
        let (progress, outputs) = (self.progress.clone(), self.outputs.clone());
        async move { progress.exchange(&[], &outputs).await }
    }

    /// Places the log ([`SnapshotStore::place`]), loads the latest snapshot (none for a
    /// first start) and the log entries after it, and starts the log writer after them.
    pub async fn load(&mut self) -> Result<(Vec<DcasSnapshot>, LogTail), DcasError> {
        let partition = self.store.place(self.me).await?;
        let ((snap, version), entries, end) = self.store.load_with_log().await?;
        if let Some(s) = snap.last() {
            self.next_id = s.id + 1;
        }
        self.version = version;
        self.log = Some(InputLog::start_leased(
            self.store.client.clone(),
            partition,
            self.store.names.log.clone(),
            end,
            // At most the last append an earlier incarnation made (see `replicate_tail`).
            entries.items.as_slice()[entries.items.len().saturating_sub(MAX_GROUP)..].to_vec(),
            self.lease.clone(),
        ));
        Ok((snap, entries))
    }

    /// The log writer (after [`DcasSubtask::load`]).
    pub fn log(&mut self) -> Result<&mut InputLog, DcasError> {
        self.log
            .as_mut()
            .ok_or_else(|| DcasError::Stopped(self.store.names.log.clone()))
    }

    /// Counts input records towards the micro-window.
    pub fn consumed(&mut self, records: usize) {
        self.window.consumed(records, std::time::Instant::now());
    }

    /// True when a snapshot is due and none is in flight.
    pub fn due(&mut self) -> bool {
        if self.in_flight.is_some() {
            return false;
        }
        let (now, log_bytes, headroom) = (
            std::time::Instant::now(),
            self.log_bytes(),
            &mut self.headroom,
        );
        self.window.due(now, log_bytes, || headroom.spare(now))
    }

    /// When the next snapshot falls due (if none is in flight and input arrived since the
    /// last).
    pub fn due_at(&self) -> Option<std::time::Instant> {
        self.in_flight
            .is_none()
            .then(|| self.window.due_at(self.log_bytes()))
            .flatten()
    }

    /// Bytes this incarnation wrote to its log.
    fn log_bytes(&self) -> u64 {
        self.log.as_ref().map_or(0, InputLog::pushed_bytes)
    }

    /// Snapshot ids continue after `id` (the DCAS snapshot that held a fallback checkpoint's
    /// state): sinks stage their output under these ids, so they only grow.
    pub fn continue_after(&mut self, id: u64) {
        self.next_id = self.next_id.max(id + 1);
    }

    /// The id the next snapshot gets.
    pub fn next_id(&self) -> u64 {
        self.next_id
    }

    /// What the next snapshot follows when it may be incremental: the previous snapshot,
    /// if this incarnation stored a whole one since starting and the chain after it stays
    /// short (`MAX_CHAIN`) and small against it ([`Links`]). `None`: the next snapshot is
    /// whole.
    pub fn follows(&self) -> Option<u64> {
        (self.incremental && self.links.may_link()).then(|| self.next_id - 1)
    }

    /// Extends the chain by a stored snapshot.
    fn stored(&mut self, result: &Result<Stored, DcasError>) {
        if let Ok(s) = result {
            self.links.stored(s.whole, s.bytes);
            self.version = s.version;
        }
    }

    /// Stores a snapshot in the background: once the log holds every entry the state
    /// reflects, writes `snap(t)`, trims the log, publishes what this subtask has logged per
    /// input channel and reads what its receivers have. [`DcasSubtask::done`] answers.
    pub fn start_snapshot(&mut self, snap: DcasSnapshot) -> Result<(), DcasError> {
        let mut waiter = self.log()?.waiter();
        self.next_id = snap.id + 1;
        let log_bytes = self.log_bytes();
        let state = snap.follows.is_none().then(|| snap.state_bytes() as u64);
        self.window
            .started(std::time::Instant::now(), log_bytes, state);
        let (store, progress) = (self.store.clone(), self.progress.clone());
        let lease = self.lease.clone();
        let published: Vec<(ChannelKey, Seq)> = self
            .inputs
            .iter()
            .zip(&snap.inputs)
            .map(|(k, p)| (*k, p.next_seq))
            .collect();
        let outputs = self.outputs.clone();
        let version = self.version;
        let (tx, outcome) = oneshot::channel();
        let task = tokio::spawn(async move {
            let result = async {
                waiter.reached(snap.log_offset).await?;
                lease.check(&store.names().changes, "storing a snapshot")?;
                let (bytes, version) = store.store(&snap, version).await?;
                let logged = progress.exchange(&published, &outputs).await?;
                Ok(Stored {
                    id: snap.id,
                    whole: snap.follows.is_none(),
                    bytes,
                    version,
                    logged,
                })
            }
            .await;
            let _ = tx.send(result);
        });
        self.in_flight = Some(InFlight { outcome, task });
        Ok(())
    }

    /// Waits for the snapshot in flight (never returns when there is none).
    pub async fn done(&mut self) -> Result<Stored, DcasError> {
        let Some(InFlight { outcome, .. }) = &mut self.in_flight else {
            return std::future::pending().await;
        };
        let result = outcome
            .await
            .unwrap_or_else(|_| Err(DcasError::Stopped(self.store.names.log.clone())));
        self.in_flight = None;
        self.stored(&result);
        result
    }

    /// The snapshot in flight, if it finished.
    pub fn try_done(&mut self) -> Option<Result<Stored, DcasError>> {
        let InFlight { outcome, .. } = self.in_flight.as_mut()?;
        let result = match outcome.try_recv() {
            Ok(r) => r,
            Err(oneshot::error::TryRecvError::Empty) => return None,
            Err(oneshot::error::TryRecvError::Closed) => {
                Err(DcasError::Stopped(self.store.names.log.clone()))
            }
        };
        self.in_flight = None;
        self.stored(&result);
        Some(result)
    }

    /// True while a snapshot is being stored.
    pub fn in_flight(&self) -> bool {
        self.in_flight.is_some()
    }

    /// Notes that log entry `index` holds input channel `channel`'s seqs below `next`.
    pub fn input_logged(&mut self, index: u64, channel: usize, next: Seq) {
        self.acks.pending.push_back((index, channel, next));
    }

    /// A restarted subtask restored and replayed: its log holds its input up to `next_seqs`
    /// (per input channel), which it publishes once even where no new input comes, so a
    /// sender whose backlog its predecessor had logged, unpublished, learns it.
    pub fn inputs_restored(&mut self, next_seqs: &[Seq]) {
        let acks = &mut self.acks;
        acks.logged.resize(self.inputs.len(), 0);
        acks.changed.resize(self.inputs.len(), false);
        for (i, &next) in next_seqs.iter().enumerate().take(self.inputs.len()) {
            if acks.logged[i] < next {
                acks.logged[i] = next;
                acks.changed[i] = true;
            }
        }
        acks.republish = acks.changed.iter().any(|c| *c);
    }

    /// Exchanges progress every millisecond instead of every 5 for the next 200 ms: a
    /// recovery's neighbours (a restarted subtask, a sender rewired to one) learn what the
    /// other logged within a millisecond or two.
    pub fn hurry(&mut self) {
        self.acks.hurry_until = Some(std::time::Instant::now() + RECOVERY_HURRY);
        self.acks.next_at = None;
    }

    /// When the progress exchange must run though no input arrives (else it runs as input
    /// comes): while hurrying, as soon as the log holds input not yet published; while
    /// restored positions wait to be published, or while `waiting` (the subtask's rewired
    /// receivers have a backlog to log), within [`PROGRESS_POLL`]; `None` otherwise.
    pub fn progress_due(&self, waiting: bool) -> Option<std::time::Instant> {
        let now = std::time::Instant::now();
        let soon = now + PROGRESS_POLL;
        let after_pause = self.acks.next_at.map_or(soon, |t| t.max(soon));
        if self.acks.hurrying(now) && self.logged_unpublished() {
            // An exchange in flight answers within the poll; otherwise the pause decides.
            let pause = self.acks.next_at.unwrap_or(now).max(now);
            return Some(match self.acks.in_flight {
                Some(_) => after_pause,
                None => pause,
            });
        }
        (waiting || self.acks.republish).then_some(after_pause)
    }

    /// While hurrying: the log index to wait for before input acks can be published (one
    /// past the oldest input entry not yet known to be logged, when the log does not hold
    /// it yet). A restarted subtask's senders wait for these acks to count their backlog
    /// logged; without this they would wait for the subtask's next input, a batch or a
    /// linger later.
    pub fn acks_wait_for(&self) -> Option<u64> {
        if !self.acks.hurrying(std::time::Instant::now()) {
            return None;
        }
        let &(index, _, _) = self.acks.pending.front()?;
        let logged = self.log.as_ref()?.logged().ok()?;
        (index >= logged).then_some(index + 1)
    }

    /// True when the log holds input whose acks are not yet published: entries not yet
    /// drained from `pending`, or drained ones ([`DcasSubtask::direct_acks`]) not yet
    /// published.
    fn logged_unpublished(&self) -> bool {
        let logged = self.log.as_ref().and_then(|l| l.logged().ok());
        let undrained = match (self.acks.pending.front(), logged) {
            (Some(&(index, _, _)), Some(logged)) => index < logged,
            _ => false,
        };
        undrained || self.acks.changed.iter().any(|c| *c)
    }

    /// Moves the input entries the log now holds from `pending` to `logged`; false when
    /// the log's writer stopped (it reports its error through the subtask's next push).
    fn drain_logged(&mut self) -> bool {
        let Some(Ok(logged)) = self.log.as_ref().map(InputLog::logged) else {
            return false;
        };
        let acks = &mut self.acks;
        acks.logged.resize(self.inputs.len(), 0);
        acks.changed.resize(self.inputs.len(), false);
        while let Some(&(index, channel, next)) = acks.pending.front() {
            if index >= logged {
                break;
            }
            acks.pending.pop_front();
            if let Some(l) = acks.logged.get_mut(channel).filter(|l| **l < next) {
                *l = next;
                acks.changed[channel] = true;
            }
        }
        true
    }

    /// While hurrying: the input channels whose logged seq moved since they were last
    /// acked on the channel itself, with that seq. The subtask sends these acks to the
    /// senders directly ([`crate::runtime::channel::InputGate::ack_logged`]), so a sender
    /// waiting for a restarted receiver to log its backlog learns it in one hop instead of
    /// a publish and a read through the cache.
    pub fn direct_acks(&mut self) -> Vec<(usize, Seq)> {
        if !self.acks.hurrying(std::time::Instant::now()) || !self.drain_logged() {
            return Vec::new();
        }
        let acks = &mut self.acks;
        acks.acked.resize(acks.logged.len(), 0);
        let mut moved = Vec::new();
        for (i, (&logged, acked)) in acks.logged.iter().zip(&mut acks.acked).enumerate() {
            if logged > *acked {
                *acked = logged;
                moved.push((i, logged));
            }
        }
        moved
    }

    /// Exchanges progress between snapshots, never waiting: at most every
    /// `PROGRESS_EVERY`, publishes the input seqs the log now holds and reads what the
    /// receivers of every output channel have published. Answers the receivers' progress
    /// (per route, per target) once a read finished.
    ///
    /// Best effort: a failed exchange only delays trimming (the snapshot path exchanges
    /// too), so it is retried after a pause that doubles, up to `PROGRESS_RETRY`; only a
    /// lost partition is an error.
    pub fn exchange_progress(&mut self) -> Result<Option<Vec<Vec<Seq>>>, DcasError> {
        let acks = &mut self.acks;
        let mut answer = None;
        if let Some(rx) = &mut acks.in_flight {
            let failed = match rx.try_recv() {
                Err(oneshot::error::TryRecvError::Empty) => return Ok(None),
                Ok(Ok(logged)) => {
                    answer = Some(logged);
                    acks.retry = None;
                    acks.republishing = false;
                    None
                }
                Ok(Err(e)) => Some(e),
                Err(oneshot::error::TryRecvError::Closed) => {
                    Some(DcasError::Stopped(self.store.names.log.clone()))
                }
            };
            acks.in_flight = None;
            if let Some(e) = failed {
                if matches!(
                    &e,
                    DcasError::Cache {
                        source: CacheError::Lost { .. },
                        ..
                    }
                ) {
                    return Err(e);
                }
                // From a few ms (a member lost, its backups promoted at once) up to
                // PROGRESS_RETRY (a full cache).
                let retry = acks
                    .retry
                    .get_or_insert(Backoff::new(PROGRESS_EVERY, PROGRESS_RETRY));
                let pause = retry.pause();
                warn!(log = %self.store.names.log, error = %e, retry_in_ms = pause.as_millis() as u64, "Progress exchange failed; retrying.");
                acks.changed.iter_mut().for_each(|c| *c = true);
                acks.republish |= std::mem::take(&mut acks.republishing);
                acks.next_at = Some(std::time::Instant::now() + pause);
            }
        }
        if acks.next_at.is_some_and(|t| std::time::Instant::now() < t) {
            return Ok(answer);
        }
        // A stopped writer reports its error through the subtask's next push.
        if !self.drain_logged() {
            return Ok(answer);
        }
        let acks = &mut self.acks;
        // Only channels that moved: a restarted receiver does not publish its zeros.
        let publish: Vec<(ChannelKey, Seq)> = (0..self.inputs.len())
            .filter(|&i| std::mem::take(&mut acks.changed[i]))
            .map(|i| (self.inputs[i], acks.logged[i]))
            .collect();
        if publish.is_empty() && self.outputs.iter().all(Vec::is_empty) {
            return Ok(answer);
        }
        let now = std::time::Instant::now();
        let every = if acks.hurrying(now) {
            PROGRESS_POLL
        } else {
            PROGRESS_EVERY
        };
        acks.next_at = Some(now + every);
        acks.republishing = std::mem::take(&mut acks.republish);
        let (progress, outputs) = (self.progress.clone(), self.outputs.clone());
        let (tx, rx) = oneshot::channel();
        acks.in_flight = Some(rx);
        tokio::spawn(async move {
            let _ = tx.send(progress.exchange(&publish, &outputs).await);
        });
        Ok(answer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::testing::Cluster;
    use crate::value::Value;

    /// Ensures links are stored while they stay small against the whole snapshot, and that
    /// state whose every key changes between snapshots is stored whole (a restart would
    /// otherwise read it twice), with a link tried again now and then.
    #[test]
    fn links_are_stored_only_while_small_against_the_whole() {
        let mut l = Links::default();
        assert!(!l.may_link(), "the first snapshot is whole");
        l.stored(true, 1000);
        assert!(l.may_link(), "no link seen yet: try one");
        // Small links, until the chain would pass half the whole one, or MAX_CHAIN.
        for _ in 0..4 {
            l.stored(false, 100);
            assert!(l.may_link());
        }
        l.stored(false, 100);
        assert!(
            !l.may_link(),
            "500 bytes of links, a sixth would pass half of 1000"
        );
        l.stored(true, 1000);
        assert!(l.may_link());
        let mut tiny = Links::default();
        tiny.stored(true, 1_000_000);
        for _ in 0..MAX_CHAIN {
            assert!(tiny.may_link());
            tiny.stored(false, 10);
        }
        assert!(
            !tiny.may_link(),
            "a restart applies at most MAX_CHAIN links"
        );
        // A link nearly as large as the whole: whole snapshots from then on...
        l.stored(false, 900);
        l.stored(true, 1000);
        for _ in 0..RETRY_LINK_AFTER - 1 {
            assert!(!l.may_link(), "the last link held most of the state");
            l.stored(true, 1000);
        }
        // ... until a link is tried again, and kept while it stays small.
        assert!(
            l.may_link(),
            "tried again after {RETRY_LINK_AFTER} whole ones"
        );
        l.stored(false, 50);
        assert!(l.may_link());
    }

    /// Ensures a backoff doubles from its first pause and stays at its max.
    #[test]
    fn backoff_doubles_up_to_its_max() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(5), ms(30));
        let pauses: Vec<Duration> = (0..5).map(|_| b.pause()).collect();
        assert_eq!(pauses, [ms(5), ms(10), ms(20), ms(30), ms(30)]);
    }

    /// Ensures a snapshot falls due at a full micro-window, at its interval under steady
    /// input, and early when the input pauses after a burst (but not sooner than a
    /// quarter interval after the last), and never without input.
    #[test]
    fn micro_window_is_due_when_full_late_or_paused() {
        let ms = Duration::from_millis;
        let t0 = std::time::Instant::now();
        let mut w = MicroWindow::new(1_000, ms(200));
        w.started(t0, 0, None);
        assert_eq!(w.due_at(0), None, "no input, no snapshot");
        assert!(!w.due(t0 + ms(10_000), 0, || false));

        // Full: due at once.
        w.consumed(1_000, t0 + ms(1));
        assert!(w.due(t0 + ms(1), 0, || false));

        // Steady input (a batch every 5 ms): only the interval makes it due.
        w.started(t0, 0, None);
        for i in 1..40 {
            w.consumed(10, t0 + ms(5 * i));
            assert!(!w.due(t0 + ms(5 * i), 0, || false), "due at {} ms", 5 * i);
        }
        assert_eq!(w.due_at(0), Some(t0 + ms(200)));

        // A burst, then a pause: due QUIET after its last records.
        w.started(t0, 0, None);
        w.consumed(500, t0 + ms(60));
        w.consumed(300, t0 + ms(61));
        assert!(!w.due(t0 + ms(70), 0, || false));
        assert_eq!(w.due_at(0), Some(t0 + ms(61) + QUIET));

        // A burst right after a snapshot: not before a quarter interval.
        w.started(t0, 0, None);
        w.consumed(5, t0 + ms(2));
        assert_eq!(w.due_at(0), Some(t0 + ms(50)));
        w.consumed(0, t0 + ms(45));
        assert_eq!(w.due_at(0), Some(t0 + ms(50)), "an empty batch is no input");

        // An interval beyond the clock's range: due by records only (or in ages), no
        // overflow.
        let mut w = MicroWindow::new(1_000, Duration::from_millis(u64::MAX));
        w.started(t0, 0, None);
        w.consumed(5, t0);
        let never = t0 + Duration::from_secs(1 << 40);
        assert!(w.due_at(0).is_none_or(|at| at > never), "{:?}", w.due_at(0));
        w.consumed(995, t0);
        assert_eq!(w.due_at(0), Some(t0));
    }

    /// Ensures a subtask with little state snapshots early once its log since the last
    /// snapshot holds [`SMALL_LOG`] bytes, never sooner than a tenth of the interval after
    /// the last; that one with a large state, or before its first whole snapshot, keeps the
    /// interval; and that an incremental snapshot does not make the state look small.
    #[test]
    fn micro_window_is_due_early_for_small_state_with_a_log() {
        let ms = Duration::from_millis;
        let t0 = std::time::Instant::now();
        let mut w = MicroWindow::new(u64::MAX, ms(100));
        w.started(t0, 1_000, None);
        // Steady input: the pause rule stays out of it.
        w.consumed(10, t0 + ms(99));
        let big_log = 1_000 + 100 * SMALL_LOG;
        assert_eq!(
            w.due_at(big_log),
            Some(t0 + ms(100)),
            "no state size known yet"
        );

        // A stateless subtask (a map).
        w.started(t0, 1_000, Some(0));
        w.consumed(10, t0 + ms(99));
        assert_eq!(w.due_at(1_000 + SMALL_LOG - 1), Some(t0 + ms(100)));
        assert_eq!(
            w.due_at(1_000 + SMALL_LOG),
            Some(t0 + ms(10)),
            "a tenth of the interval"
        );
        assert!(!w.due(t0 + ms(9), 1_000 + SMALL_LOG, || false));
        assert!(w.due(t0 + ms(10), 1_000 + SMALL_LOG, || false));

        // A keyed state (also after a small incremental snapshot) snapshots early only
        // once its log outweighs it, and only with CPU to spare; refused, it is asked
        // again a tenth of the interval later.
        let state = 2 * SMALL_STATE;
        w.started(t0, 0, Some(state));
        w.started(t0, 0, None);
        w.consumed(10, t0 + ms(99));
        assert_eq!(w.due_at(state - 1), Some(t0 + ms(100)));
        assert_eq!(w.due_at(state), Some(t0 + ms(10)));
        let unasked = || -> bool { panic!("the CPU asked about") };
        assert!(
            !w.due(t0 + ms(9), state, unasked),
            "before a tenth of the interval"
        );
        assert!(!w.due(t0 + ms(12), state, || false), "no CPU to spare");
        assert_eq!(w.due_at(state), Some(t0 + ms(22)));
        assert!(!w.due(t0 + ms(21), state, unasked), "asked again too soon");
        assert!(w.due(t0 + ms(22), state, || true));
        assert!(
            w.due(t0 + ms(100), state - 1, unasked),
            "the interval needs none"
        );
        w.started(t0, 0, None);
        w.consumed(10, t0 + ms(1));
        assert!(
            w.due(t0 + ms(10), state, || true),
            "a snapshot ends a refusal"
        );

        // Still no snapshot without input.
        w.started(t0, 0, Some(0));
        assert_eq!(w.due_at(big_log), None);
        w.started(t0, 0, Some(state));
        assert_eq!(w.due_at(big_log), None);
    }

    /// Ensures spare CPU is judged over at least [`SPARE_SPAN`] (never before a reading
    /// that old), by the idle share since a reading that moves on as readings age.
    #[test]
    fn headroom_judges_idle_cpu_over_a_span() {
        let t0 = std::time::Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let cpu = |idle, total| CpuTimes { idle, total };
        let mut h = Headroom::default();
        assert!(!h.spare_with(at(0), cpu(0, 0)), "nothing to compare with");
        assert!(
            !h.spare_with(at(40), cpu(80, 80)),
            "all idle, but over 40 ms only"
        );
        assert!(h.spare_with(at(50), cpu(100, 100)));

        // Busy, then idle: the window moves on to the reading of 50 ms at 100 ms.
        let mut h = Headroom::default();
        assert!(!h.spare_with(at(0), cpu(0, 0)));
        assert!(!h.spare_with(at(50), cpu(0, 100)), "busy");
        assert!(!h.spare_with(at(100), cpu(40, 200)), "a fifth idle");
        assert!(
            h.spare_with(at(130), cpu(60, 260)),
            "3/8 idle since 50 ms (since the start, under a quarter)"
        );
    }

    fn batch(first_seq: u64, n: usize) -> Batch {
        Batch {
            first_seq,
            records: (0..n)
                .map(|i| Record::new(i as i64, Value::Int((first_seq as usize + i) as i64)))
                .collect(),
        }
    }

    #[test]
    fn log_entries_round_trip() {
        for event in [
            StreamEvent::Data(batch(7, 3)),
            StreamEvent::Watermark(-5),
            StreamEvent::EndOfStream,
        ] {
            let e = LogEntry::input(3, event.clone());
            assert_eq!(LogEntry::decode(&e.encode().unwrap()).unwrap(), e);
            let polled = LogEntry {
                channel: SOURCE_CHANNEL,
                event,
                tail: Tail::State(vec![1, 2, 3]),
            };
            assert_eq!(LogEntry::decode(&polled.encode().unwrap()).unwrap(), polled);
            let counted = LogEntry {
                tail: Tail::Regenerate(1 << 40, vec![1, 2, 3]),
                ..polled
            };
            assert_eq!(
                LogEntry::decode(&counted.encode().unwrap()).unwrap(),
                counted
            );
            let empty_state = LogEntry {
                tail: Tail::Regenerate(1 << 40, Vec::new()),
                ..counted
            };
            let bytes = empty_state.encode().unwrap();
            assert_eq!(LogEntry::decode(&bytes).unwrap(), empty_state);
            let cut = LogEntry::decode(&bytes[..bytes.len() - 3]).unwrap_err();
            assert!(cut.to_string().contains("count cut short"), "{cut}");
        }
        assert!(LogEntry::decode(&[1, 2]).is_err());
        assert!(LogEntry::decode(&[1, 2, 3, 4, 9, 0, 0, 0, 1]).is_err());
    }

    /// Ensures the entry logged from the bytes a sender packed (and retained) is the entry
    /// the receiver would pack itself: it logs what it was sent without packing again.
    #[test]
    fn entries_from_sent_bytes_are_the_entries_packed_here() {
        let retained = RetainedBatch::pack((0, 1), 7, &batch(7, 300).records);
        let sent = retained.delivery().unwrap();
        assert_eq!(sent.event, StreamEvent::Data(batch(7, 300)));
        for event in [
            sent.event.clone(),
            StreamEvent::Watermark(-9),
            StreamEvent::EndOfStream,
        ] {
            let mut bytes = Vec::new();
            packed::encode_event(&event, &mut bytes);
            let here = encode_entry(4, &event, None, Tail::None).unwrap();
            let as_sent = encode_entry(4, &event, Some(&bytes), Tail::None).unwrap();
            assert_eq!(as_sent, here);
            assert_eq!(LogEntry::decode(&here).unwrap(), LogEntry::input(4, event));
        }
        let as_retained = encode_entry(4, &sent.event, sent.packed.as_deref(), Tail::None);
        let here = encode_entry(4, &sent.event, None, Tail::None);
        assert_eq!(as_retained.unwrap(), here.unwrap());
    }

    #[test]
    fn retained_output_trims_per_channel_and_inside_batches() {
        let mut r = RetainedOutput::default();
        r.push((0, 0), &batch(0, 10));
        r.push((0, 1), &batch(0, 5));
        r.push((0, 0), &batch(10, 10));
        assert_eq!(r.records(), 25);
        r.trim(&[vec![15]]);
        assert_eq!(r.records(), 10);
        let left: Vec<_> = r
            .batches()
            .map(|b| (b.channel, b.first_seq, b.len, b.unpack().unwrap().len()))
            .collect();
        assert_eq!(left, vec![((0, 1), 0, 5, 5), ((0, 0), 15, 5, 5)]);
        let rest = r.batches().nth(1).unwrap().unpack().unwrap();
        assert_eq!(rest.first_seq, 15);
        assert_eq!(
            rest.records,
            batch(10, 10).records[5..],
            "the logged ones are gone"
        );
        r.trim(&[vec![20, 100]]);
        assert_eq!(r.records(), 0);
        assert_eq!(r.batches().count(), 0);
    }

    /// Many entries pushed without waiting reach the cache in order, with dense indexes,
    /// in fewer appends than entries; `synced` returns once they are replicated.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn log_group_commits_in_order_and_replays() {
        let c = Cluster::start(3, 1 << 30).await;
        let client = c.client().await;
        let names = DcasNames::new("job", 1, 0);
        let p = client.partition_avoiding(&names.log, c.nodes[0].0);
        let mut log = InputLog::start(client.clone(), p, names.log.clone(), 0);
        let mut pushed = Vec::new();
        for i in 0..2000u64 {
            let e = LogEntry::input(
                (i % 3) as usize,
                if i % 10 == 9 {
                    StreamEvent::Watermark(i as i64)
                } else {
                    StreamEvent::Data(batch(i * 4, 4))
                },
            );
            assert_eq!(log.push(&e).unwrap(), i);
            pushed.push(e);
        }
        log.synced().await.unwrap();
        assert_eq!(log.logged().unwrap(), 2000);
        let store = SnapshotStore::new(client.clone(), p, names.clone());
        let (read, end) = store.read_log(0).await.unwrap();
        assert_eq!(end, 2000);
        assert_eq!(read, pushed);

        // A snapshot at offset 1500 trims the log; replay starts there.
        let snap = DcasSnapshot {
            id: 1,
            follows: None,
            changes: vec![false],
            log_offset: 1500,
            operators: vec![OperatorState {
                operator: "count".into(),
                state: vec![1, 2, 3],
            }],
            inputs: vec![InputPosition {
                next_seq: 10,
                watermark: 5,
                ended: false,
            }],
            router: RouterPosition {
                next_seqs: vec![vec![99]],
                rr: vec![0],
                pending: Vec::new(),
                retained: vec![RetainedBatch::pack((0, 0), 90, &batch(90, 9).records)],
                watermark: 4,
                ended: false,
            },
            committed: Some(7),
        };
        let (bytes, first) = store.store(&snap, 0).await.unwrap();
        assert!(bytes > 0);
        assert_eq!(store.load().await.unwrap(), (vec![snap.clone()], first));
        let (tail, end) = store.read_log(1500).await.unwrap();
        assert_eq!((tail.len(), end), (500, 2000));
        assert_eq!(tail[0], pushed[1500]);
        let err = store.read_log(10).await.unwrap_err();
        assert!(err.to_string().contains("gone"), "{err}");

        // Incremental snapshots chain after the whole one and load with it; the next whole
        // one drops them; one that does not follow the stored ones is a named error.
        let link = |id: u64, log_offset: u64| DcasSnapshot {
            id,
            follows: Some(id - 1),
            changes: vec![true],
            log_offset,
            ..snap.clone()
        };
        let (second, third) = (link(2, 1600), link(3, 1700));
        assert_eq!(store.store(&second, first).await.unwrap().1, first);
        store.store(&third, first).await.unwrap();
        let chain = vec![snap.clone(), second, third.clone()];
        assert_eq!(store.load().await.unwrap(), (chain, first));
        assert_eq!(store.read_log(1700).await.unwrap().0.len(), 300);
        let err = store.store(&link(7, 1700), first).await.unwrap_err();
        assert!(err.to_string().contains("does not follow"), "{err}");
        let whole = DcasSnapshot {
            id: 4,
            log_offset: 1800,
            ..snap.clone()
        };
        let (_, version) = store.store(&whole, first).await.unwrap();
        assert!(version > first);
        assert_eq!(store.load().await.unwrap(), (vec![whole.clone()], version));
        store.store(&link(5, 1900), version).await.unwrap();
        // An earlier incarnation's whole snapshot 4, stored late (it had read the first
        // version), is refused: it would replace the newer whole one under the link that
        // follows it, which would then be applied to an older state.
        let late = DcasSnapshot {
            id: 4,
            log_offset: 1750,
            ..snap.clone()
        };
        let err = store.store(&late, first).await.unwrap_err();
        assert!(
            matches!(err, DcasError::Superseded { current, expected, .. }
                     if current == version && expected == first),
            "{err}"
        );
        assert_eq!(
            store.load().await.unwrap(),
            (vec![whole.clone(), link(5, 1900)], version)
        );
        // A restart reads the snapshot and the log at once: the entries after the offset.
        let ((chain, _), tail, end) = store.load_with_log().await.unwrap();
        assert_eq!(chain, vec![whole.clone(), link(5, 1900)]);
        let tail: Vec<LogEntry> = tail.collect::<Result<_, _>>().unwrap();
        assert_eq!((tail.as_slice(), end), (&pushed[1900..], 2000));
        // A store cut short after the whole snapshot (log and incremental ones not
        // trimmed yet): what lies before it is skipped.
        let cut = DcasSnapshot {
            id: 6,
            log_offset: 1950,
            ..whole
        };
        client
            .put_in(
                p,
                &names.map,
                &names.key,
                encode(&cut).unwrap().to_vec(),
                None,
            )
            .await
            .unwrap();
        let ((chain, _), tail, end) = store.load_with_log().await.unwrap();
        assert_eq!(chain, vec![cut]);
        assert_eq!(tail.len(), 50);
        let tail: Vec<LogEntry> = tail.collect::<Result<_, _>>().unwrap();
        assert_eq!((tail.as_slice(), end), (&pushed[1950..], 2000));

        // Incremental snapshots the whole one needs trimmed away: a named error, never a
        // shorter chain.
        let whole = DcasSnapshot {
            id: 4,
            log_offset: 1800,
            ..snap
        };
        let whole = encode(&whole).unwrap().to_vec();
        client
            .put_in(p, &names.map, &names.key, whole, None)
            .await
            .unwrap();
        client.trim_prefix(p, &names.changes, 6).await.unwrap();
        let err = store.load().await.unwrap_err();
        assert!(
            err.to_string()
                .contains("incremental snapshots from 5 are gone (the list starts at 6)"),
            "{err}"
        );

        // A restarted writer continues at the end; a writer that starts at a wrong index
        // stops with a named error instead of writing a gap.
        let mut again = InputLog::start(client.clone(), p, names.log.clone(), 2000);
        again.push(&pushed[0]).unwrap();
        again.synced().await.unwrap();
        let mut wrong = InputLog::start(client.clone(), p, names.log.clone(), 5);
        wrong.push(&pushed[0]).unwrap();
        let err = wrong.synced().await.unwrap_err();
        assert!(err.to_string().contains("ends at index 2001"), "{err}");
        assert!(err.to_string().contains("next is 5"), "{err}");
        assert!(
            wrong.push(&pushed[0]).is_err(),
            "a stopped log refuses entries"
        );

        // Entries decode as the replay takes them: one that does not decode is an error
        // naming it when reached, after the good ones before it; an empty placeholder is
        // named as a missing entry.
        let garbage = vec![vec![1, 2], Vec::new()];
        assert_eq!(
            client
                .append_at(p, &names.log, 2001, garbage)
                .await
                .unwrap(),
            Ok(2001)
        );
        let (first, items) = store.range_all(&names.log, 1990).await.unwrap();
        let (tail, end) = store.log_tail(1995, first, items).unwrap();
        assert_eq!((tail.len(), end), (8, 2003));
        let decoded: Vec<_> = tail.collect();
        assert_eq!(decoded[0].as_ref().unwrap(), &pushed[1995]);
        assert!(decoded[..6].iter().all(Result::is_ok));
        let err = decoded[6].as_ref().unwrap_err().to_string();
        assert!(err.contains("log entry 2001 of"), "{err}");
        let err = decoded[7].as_ref().unwrap_err().to_string();
        assert!(err.contains("entry 2002 is missing"), "{err}");
        let err = store.read_log(1995).await.unwrap_err().to_string();
        assert!(err.contains("log entry 2001 of"), "{err}");
    }

    /// A list is read a page at a time to its end: also when its length is a multiple of
    /// the page (a short, empty page ends it) and when it was trimmed past where the reader
    /// asked (the answer starts at the list's start). A trim between two pages is a named
    /// error, not a gap in what was read.
    #[tokio::test]
    async fn lists_are_read_in_pages_to_their_end() {
        let items = |a: u64, b: u64| (a..b).map(|i| vec![i as u8]).collect::<Vec<_>>();
        let requests = std::cell::Cell::new(0);
        // The list [start, end) answered as the cache answers a range of 4.
        let list = |start: u64, end: u64| {
            let requests = &requests;
            move |at: u64| {
                requests.set(requests.get() + 1);
                let first = at.max(start);
                let last = (first + 4).min(end).max(first);
                std::future::ready(Ok((first, items(first, last))))
            }
        };
        for (start, end, from, pages) in [
            (0, 8, 0, 3),
            (0, 9, 0, 3),
            (0, 3, 0, 1),
            (0, 0, 0, 1),
            (3, 11, 0, 3),
            (3, 11, 6, 2),
        ] {
            requests.set(0);
            let (first, got) = read_pages("l", from, 4, list(start, end)).await.unwrap();
            let want = from.max(start);
            assert_eq!(
                (first, got),
                (want, items(want, end)),
                "{start}..{end} from {from}"
            );
            assert_eq!(requests.get(), pages, "{start}..{end} from {from}");
        }
        // Trimmed to 6 after the first page was read (0..4).
        let trimmed_while_read = |at: u64| {
            let first = if at == 0 { 0 } else { 6 };
            std::future::ready(Ok((first, items(first, first + 4))))
        };
        let err = read_pages("l", 0, 4, trimmed_while_read).await.unwrap_err();
        assert!(
            err.to_string().contains("trimmed past 4 while being read"),
            "{err}"
        );
    }

    /// A subtask's log is placed off its own task manager (even when its name hashes to a
    /// partition that task manager leads), and a restart on another task manager finds the
    /// same partition; a malformed placement entry is a named error.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn logs_are_placed_off_the_subtasks_task_manager_and_found_again() {
        let c = Cluster::start(3, 1 << 30).await;
        let client = c.client().await;
        let table = client.table();
        let primary = |p: u32| table.primary(p).map(|m| m.id);
        for s in 0..20 {
            let names = DcasNames::new("job", 0, s);
            let me = primary(client.list_partition(&names.log)).unwrap();
            let mut store = SnapshotStore::new(client.clone(), 0, names.clone());
            let p = store.place(me).await.unwrap();
            assert_eq!(store.partition().unwrap(), p);
            assert_ne!(
                primary(p),
                Some(me),
                "subtask {s}'s log is not on its own member"
            );
            let elsewhere = c.nodes.iter().map(|n| n.0).find(|id| *id != me).unwrap();
            let mut restarted = SnapshotStore::new(client.clone(), 0, names);
            assert_eq!(restarted.place(elsewhere).await.unwrap(), p);
        }
        client
            .put("dcas/job/placement", b"9.9", vec![1, 2], None)
            .await
            .unwrap();
        let mut bad = SnapshotStore::new(client.clone(), 0, DcasNames::new("job", 9, 9));
        let err = bad.place(c.nodes[0].0).await.unwrap_err();
        assert!(err.to_string().contains("no valid partition"), "{err}");
    }

    /// Receivers publish what they logged; the sender reads it and trims its retained output
    /// to exactly what is not yet logged.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn published_progress_trims_the_senders_retained_output() {
        let c = Cluster::start(3, 1 << 30).await;
        let client = c.client().await;
        let progress = ChannelProgress::new(client.clone(), "job");
        let to0 = ChannelKey {
            edge: 0,
            from: 1,
            to: 0,
        };
        let to1 = ChannelKey {
            edge: 0,
            from: 1,
            to: 1,
        };
        assert_eq!(progress.read(&[to0, to1]).await.unwrap(), vec![0, 0]);
        let mut retained = RetainedOutput::default();
        for i in 0..4 {
            retained.push((0, 0), &batch(i * 10, 10));
            retained.push((0, 1), &batch(i * 10, 10));
        }
        progress.publish(&[(to0, 25)]).await.unwrap();
        progress.publish(&[(to1, 40)]).await.unwrap();
        let logged = progress.read(&[to0, to1]).await.unwrap();
        assert_eq!(logged, vec![25, 40]);
        retained.trim(&[logged.to_vec()]);
        assert_eq!(retained.records(), 15, "seqs 25..40 of the first channel");
        // A later publication moves it on; a malformed entry is a named error, not a panic.
        progress.publish(&[(to0, 40)]).await.unwrap();
        assert_eq!(progress.read(&[to0]).await.unwrap(), vec![40]);
        client
            .put("dcas/job/progress", b"0:1->0", vec![1, 2, 3], None)
            .await
            .unwrap();
        let err = progress.read(&[to0]).await.unwrap_err();
        assert!(err.to_string().contains("3 bytes, expected 8"), "{err}");
    }

    /// A receiver (task 1) and its sender (task 0) over one channel, loaded, with the cache
    /// they share (kept alive by the caller).
    async fn receiver_and_sender() -> (Cluster, DcasSubtask, DcasSubtask) {
        let c = Cluster::start(3, 1 << 30).await;
        let config = DcasConfig {
            lease: Lease::default(),
            client: c.client().await,
            job: "job".into(),
            me: c.nodes[0].0,
            every_records: 1 << 40,
            interval: Duration::from_secs(3600),
            incremental: true,
            generation: 1,
        };
        let k = ChannelKey {
            edge: 0,
            from: 0,
            to: 0,
        };
        let mut receiver = DcasSubtask::new(&config, 1, 0, vec![k], Vec::new());
        let mut sender = DcasSubtask::new(&config, 0, 0, Vec::new(), vec![vec![k]]);
        receiver.load().await.unwrap();
        sender.load().await.unwrap();
        (c, receiver, sender)
    }

    /// Between snapshots, a receiver publishes the input seqs its log holds (only those) and
    /// its sender reads them, so retained output is trimmed as the log grows.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn progress_is_exchanged_between_snapshots_as_the_log_grows() {
        let (_c, mut receiver, mut sender) = receiver_and_sender().await;
        let event = StreamEvent::Data(batch(0, 10));
        let log = receiver.log().unwrap();
        let index = log.push_parts(0, &event, Tail::None).unwrap();
        log.synced().await.unwrap();
        receiver.input_logged(index, 0, 10);
        // Never pushed, so never logged: its seqs must not be published.
        receiver.input_logged(index + 100, 0, 50);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mut seen = Vec::new();
        while std::time::Instant::now() < deadline && seen.last() != Some(&10) {
            receiver.exchange_progress().unwrap();
            if let Some(logged) = sender.exchange_progress().unwrap() {
                seen.push(logged[0][0]);
            }
            tokio::time::sleep(PROGRESS_EVERY).await;
        }
        assert_eq!(seen.last(), Some(&10), "read {seen:?}");
        for _ in 0..5 {
            receiver.exchange_progress().unwrap();
            tokio::time::sleep(PROGRESS_EVERY * 2).await;
            if let Some(logged) = sender.exchange_progress().unwrap() {
                assert_eq!(logged, vec![vec![10]], "only logged seqs are published");
            }
        }
    }

    /// During a recovery, a receiver wakes for its log rather than its next input: it
    /// learns which entry to wait for, acks it on the channel once the log holds it, and
    /// the exchange that publishes it is due after the pause (not a poll later). Outside a
    /// recovery none of this applies.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hurrying_receiver_publishes_acks_once_its_log_holds_them() {
        let (_c, mut receiver, mut sender) = receiver_and_sender().await;
        let push = |receiver: &mut DcasSubtask, first: u64| {
            let event = StreamEvent::Data(batch(first, 10));
            let index = receiver.log().unwrap().push_parts(0, &event, Tail::None);
            let index = index.unwrap();
            receiver.input_logged(index, 0, first + 10);
            index
        };
        let first = push(&mut receiver, 0);
        assert_eq!(receiver.acks_wait_for(), None, "not hurrying");
        assert_eq!(receiver.progress_due(false), None, "not hurrying");
        receiver.log().unwrap().synced().await.unwrap();
        assert_eq!(receiver.progress_due(false), None, "not hurrying");

        // Publishes what `receiver` logged once due, until `sender` reads `seq`.
        async fn exchange_until(receiver: &mut DcasSubtask, sender: &mut DcasSubtask, seq: u64) {
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            let mut seen = None;
            while std::time::Instant::now() < deadline && seen != Some(seq) {
                if receiver
                    .progress_due(false)
                    .is_some_and(|t| t <= std::time::Instant::now())
                {
                    receiver.exchange_progress().unwrap();
                }
                if let Some(logged) = sender.exchange_progress().unwrap() {
                    seen = Some(logged[0][0]);
                }
                tokio::time::sleep(PROGRESS_POLL / 4).await;
            }
            assert_eq!(seen, Some(seq));
            // The exchange that published it has answered.
            while receiver.acks.in_flight.is_some() && std::time::Instant::now() < deadline {
                receiver.exchange_progress().unwrap();
                tokio::time::sleep(PROGRESS_POLL / 4).await;
            }
        }

        assert_eq!(receiver.direct_acks(), vec![], "not hurrying");
        receiver.hurry();
        let due = receiver
            .progress_due(false)
            .expect("logged acks to publish");
        assert!(due <= std::time::Instant::now(), "due at once");
        assert_eq!(
            receiver.direct_acks(),
            vec![(0, 10)],
            "acked on the channel"
        );
        assert_eq!(receiver.direct_acks(), vec![], "once");
        let due = receiver.progress_due(false).expect("still to publish");
        assert!(due <= std::time::Instant::now(), "due at once");
        exchange_until(&mut receiver, &mut sender, 10).await;

        let second = push(&mut receiver, 10);
        assert!(second > first);
        // The writer may have appended it already; then the exchange is due.
        if let Some(i) = receiver.acks_wait_for() {
            assert_eq!(i, second + 1, "one past the oldest unpublished entry");
        }
        let mut waiter = receiver.log().unwrap().waiter();
        waiter.reached(second + 1).await.unwrap();
        assert_eq!(receiver.acks_wait_for(), None, "the log holds it");
        assert_eq!(receiver.direct_acks(), vec![(0, 20)]);
        let due = receiver
            .progress_due(false)
            .expect("logged acks to publish");
        let pause = receiver.acks.next_at.expect("hurried exchanges pause");
        assert!(
            due <= pause.max(std::time::Instant::now()),
            "due after the pause, not a poll later"
        );
        // Published when due: the sender reads 20 without the receiver taking more input.
        exchange_until(&mut receiver, &mut sender, 20).await;
        assert_eq!(receiver.acks_wait_for(), None, "nothing left to publish");
    }

    /// A full cache is backpressure: `synced` waits, and completes once memory is freed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn full_cache_delays_the_log_until_trimmed() {
        let c = Cluster::start(2, 64 * 1024).await;
        let client = c.client().await;
        let names = DcasNames::new("job", 0, 0);
        let p = client.list_partition(&names.log);
        let store = SnapshotStore::new(client.clone(), p, names.clone());
        let mut log = InputLog::start(client.clone(), p, names.log.clone(), 0);
        let mut n = 0;
        // Fill until an append is refused.
        loop {
            log.push(&LogEntry::input(0, StreamEvent::Data(batch(n * 100, 100))))
                .unwrap();
            n += 1;
            let synced = tokio::time::timeout(Duration::from_millis(300), log.synced()).await;
            if synced.is_err() {
                break;
            }
            assert!(n < 10_000, "the limit never applied");
        }
        let logged = log.logged().unwrap();
        assert!(logged < log.next_index(), "the last entry waits");
        // Trimming frees memory; the waiting entry goes in.
        let trim = DcasSnapshot {
            id: 1,
            follows: None,
            changes: Vec::new(),
            log_offset: logged,
            operators: Vec::new(),
            inputs: Vec::new(),
            router: RouterPosition::default(),
            committed: None,
        };
        store.store(&trim, 0).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), log.synced())
            .await
            .expect("synced after the trim")
            .unwrap();
    }

    /// Ensures a write to a full cache waits for room (a trim elsewhere lets it through),
    /// and after [`FULL_WAIT`] without room fails with a reason naming the memory flag
    /// instead of waiting for ever.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_cache_holds_writes_back_then_fails_naming_the_limit() {
        let c = Cluster::start(2, 64 << 10).await;
        let client = c.client().await;
        let p = client.list_partition("log");
        let item = || vec![vec![1u8; 8 << 10]];
        let mut next = 0;
        while let Ok(Ok(_)) = client.append_at(p, "log", next, item()).await {
            next += 1;
            assert!(next < 64, "64 KiB fill up");
        }
        let waiting = tokio::spawn({
            let client = client.clone();
            async move { append_at(&client, p, "log", next, &item(), || true).await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!waiting.is_finished(), "held back while the cache is full");
        client.trim_prefix(p, "log", next).await.unwrap();
        assert_eq!(waiting.await.unwrap(), Ok(Ok(next)));

        while let Ok(Ok(_)) = client.append_at(p, "log", next + 1, item()).await {
            next += 1;
        }
        let started = std::time::Instant::now();
        let items = item();
        let gives_up = append_at(&client, p, "log", next + 1, &items, || true);
        let err = tokio::time::timeout(FULL_WAIT * 3, gives_up)
            .await
            .expect("gives up waiting for room")
            .unwrap_err();
        assert!(started.elapsed() >= FULL_WAIT, "{:?}", started.elapsed());
        assert!(matches!(err, CacheError::Full { .. }), "{err}");
        let err = DcasError::Cache {
            what: "appending 1 entries to log".into(),
            source: err,
        }
        .to_string();
        assert!(err.contains("cache full on 127.0.0.1:"), "{err}");
        assert!(err.contains("--cache-memory-mb"), "{err}");
    }

    /// Ensures a restarted writer first replicates the entries it read, so an append an
    /// earlier incarnation left on the primary alone (its backup was full) reaches the
    /// backup before a new entry lands after it; the promoted backup then holds the log the
    /// replay read, where before it held an empty placeholder in its place.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_restarted_writer_replicates_what_it_read_before_appending() {
        let mut c = Cluster::start_with_limits(&[1 << 30, 64 << 10]).await;
        let client = c.client().await;
        let (big, small) = (c.nodes[0].0, c.nodes[1].0);
        let p = client.partition_avoiding("log", small);
        let filler = client.partition_avoiding("fill", small);
        let item = |b: u8| vec![b; 20 << 10];
        assert_eq!(
            client.append_at(p, "log", 0, vec![item(1)]).await,
            Ok(Ok(0))
        );
        client
            .append(filler, "fill", vec![vec![0; 40 << 10]])
            .await
            .unwrap();
        // The earlier incarnation's last append: on the primary, refused by the backup.
        let refused = client.append_at(p, "log", 1, vec![item(2)]).await;
        assert!(
            matches!(refused, Err(CacheError::Full { .. })),
            "{refused:?}"
        );
        client.trim_prefix(filler, "fill", 1).await.unwrap();

        // The restart read [item 1, item 2] from the primary and continues at 2.
        let mut log = InputLog::start_leased(
            client.clone(),
            p,
            "log".into(),
            2,
            vec![item(1), item(2)],
            Lease::default(),
        );
        let e = LogEntry::input(0, StreamEvent::Data(batch(0, 4)));
        assert_eq!(log.push(&e).unwrap(), 2);
        log.synced().await.unwrap();

        // The primary is lost: the promoted backup holds what the replay read.
        c.nodes.retain(|(id, _)| *id != big);
        assert!(c.master.leave(big).is_empty());
        c.push();
        let client = c.client().await;
        let (first, items) = client.range(p, "log", 0, 10).await.unwrap();
        assert_eq!(first, 0);
        assert_eq!(items.len(), 3);
        assert_eq!(
            items[..2],
            [item(1), item(2)],
            "no placeholder in their place"
        );
    }
}
