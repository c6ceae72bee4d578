//! The cache node every task manager hosts: serves operations for the partitions it is
//! primary of, applies replication from other primaries, and copies partitions to new
//! owners when the master asks.
//!
//! A write is applied under its partition's lock, and its mutation is queued to every backup
//! (and to a member receiving a copy of the partition) before the lock is released, so each
//! backup sees one partition's mutations in the primary's order. The client is answered
//! when every one of them confirmed; if one fails, the answer is
//! [`Failure::Replication`]: not acknowledged.
//!
//! A request is served only if the node agrees with the partition version the client routed
//! by: an older version is answered [`Failure::Moved`] with the node's table, a newer one
//! [`Failure::Behind`]. Replication from a primary with an older version is refused, so a
//! deposed primary cannot overwrite what its successor accepted.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures::future::join_all;
use rkyv::util::AlignedVec;
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use super::conn::{Conn, ConnError};
use super::store::{self, Partition, Usage};
use crate::codec::Encoder;
use crate::ids::TaskManagerId;
use crate::protocol::cache::{
    CacheMsg, CacheStats, Failure, Member, Mutation, Op, OpResult, PartitionTable, Request,
    Response, LATENCY_BUCKETS_US,
};
use crate::protocol::frame::{buffered, read_msg, write_frame};
use crate::telemetry::now_ms;

/// How long a primary waits for a backup's confirmation.
pub const REPLICATION_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Size of the chunks a partition copy is sent in.
const COPY_CHUNK_BYTES: usize = 1 << 20;

/// A node's settings.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Bytes this member may hold (primary and backup copies); writes beyond fail with
    /// [`Failure::Full`].
    pub memory_limit: u64,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            memory_limit: 1 << 30,
        }
    }
}

/// A copy in progress from this primary: forwarded writes go to `target` too.
#[derive(Clone)]
struct Forward {
    target: Member,
    version: u64,
    /// Which `copy_to` call set it (a copy planned again may overlap the first).
    copy: u64,
}

type Confirmation = oneshot::Receiver<Result<Response, ConnError>>;

/// Operations applied on the primary, waiting for their replicas.
struct Started {
    results: Vec<OpResult>,
    /// Per written operation (by index): the replicas' confirmations.
    waits: Vec<(usize, Vec<(String, Confirmation)>)>,
    /// The node's table, when the caller's was stale.
    table: Option<PartitionTable>,
    started: Instant,
}

impl Started {
    /// Waits for every confirmation; a write whose replica failed is answered
    /// [`Failure::BackupFull`] when the backup had no room, [`Failure::Replication`]
    /// otherwise.
    async fn finish(mut self, node: &Node) -> Response {
        let confirmations = join_all(self.waits.into_iter().map(|(i, pending)| async move {
            for (addr, rx) in pending {
                let why = match tokio::time::timeout(REPLICATION_TIMEOUT, rx).await {
                    Ok(Ok(Ok(Response::Replicated(Ok(()))))) => continue,
                    Ok(Ok(Ok(Response::Replicated(Err(Failure::Full { used, limit }))))) => {
                        return Some((
                            i,
                            Failure::BackupFull {
                                backup: addr,
                                used,
                                limit,
                            },
                        ))
                    }
                    Ok(Ok(Ok(Response::Replicated(Err(f))))) => format!("backup {addr}: {f:?}"),
                    Ok(Ok(Ok(other))) => format!("backup {addr} answered {other:?}"),
                    Ok(Ok(Err(e))) => format!("backup {addr}: {e}"),
                    Ok(Err(_)) => format!("backup {addr}: connection closed"),
                    Err(_) => format!(
                        "backup {addr} did not confirm within {} ms",
                        REPLICATION_TIMEOUT.as_millis()
                    ),
                };
                return Some((i, Failure::Replication(why)));
            }
            None
        }))
        .await;
        for (i, failure) in confirmations.into_iter().flatten() {
            self.results[i] = OpResult::Failed(failure);
        }
        node.record_latency(self.started);
        Response::Ops(self.results, self.table)
    }
}

struct Node {
    me: TaskManagerId,
    config: NodeConfig,
    table: RwLock<Option<Arc<PartitionTable>>>,
    parts: RwLock<Vec<Arc<Mutex<Partition>>>>,
    forwards: Mutex<HashMap<u32, Forward>>,
    peers: Mutex<HashMap<String, Conn>>,
    budget: Budget,
    map_bytes: AtomicU64,
    list_bytes: AtomicU64,
    map_entries: AtomicU64,
    list_items: AtomicU64,
    ops: AtomicU64,
    /// Copies started (ids for their forwards).
    copies: AtomicU64,
    replicated: AtomicU64,
    full_rejections: AtomicU64,
    latency: [AtomicU64; LATENCY_BUCKETS_US.len() + 1],
}

/// Handle to a running cache node. Cheap to clone.
#[derive(Clone)]
pub struct CacheNode {
    node: Arc<Node>,
    addr: SocketAddr,
}

/// How far trims may take a member past its memory limit: the lists they make (a name and
/// [`store::LIST_OVERHEAD`] each), about eight thousand of them.
const TRIM_ALLOWANCE: u64 = 1 << 20;

/// The bytes a member holds, against its limit. A write reserves what it may add before it
/// is applied, in one compare-and-swap, and settles what it did add afterwards: writes to
/// different partitions run on several threads at once, and a check of the bytes held
/// followed by an addition would let them pass the limit together.
struct Budget {
    used: AtomicU64,
    limit: u64,
}

impl Budget {
    fn new(limit: u64) -> Budget {
        Budget {
            used: AtomicU64::new(0),
            limit,
        }
    }

    fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Reserves `adding` bytes, or answers the bytes held when they do not fit in the limit
    /// plus `allowance`.
    fn reserve(&self, adding: u64, allowance: u64) -> Result<Reservation<'_>, u64> {
        let limit = self.limit.saturating_add(allowance);
        let fits = |used: u64| used.checked_add(adding).filter(|&n| n <= limit);
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, fits)
            .map(|_| Reservation {
                budget: self,
                bytes: adding,
            })
    }

    /// Replaces a reservation of `reserved` bytes by the `added` bytes the write added
    /// (fewer, or a negative number when it freed some).
    fn settle(&self, reserved: u64, added: i64) {
        add_signed(&self.used, added - reserved as i64);
    }
}

/// Bytes one write reserved. Settling replaces them by what the write added; a reservation
/// dropped before its write was applied (refused elsewhere, or a panic on the way) gives
/// them back, so no such path leaves bytes held for a write that did not happen.
#[must_use = "a reservation is given back when dropped"]
struct Reservation<'a> {
    budget: &'a Budget,
    bytes: u64,
}

impl Reservation<'_> {
    /// Keeps the bytes held whatever happens next, and answers them: from here the write
    /// is applied, and a panic midway may leave the partition half-changed. Holding too
    /// many bytes then only refuses writes early; giving back bytes the partition holds
    /// would let later frees take the count below what it holds.
    fn keep(mut self) -> u64 {
        std::mem::take(&mut self.bytes)
    }

    #[cfg(test)]
    fn settle(self, added: i64) {
        let budget = self.budget;
        budget.settle(self.keep(), added);
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

fn add_signed(a: &AtomicU64, d: i64) {
    if d >= 0 {
        a.fetch_add(d as u64, Ordering::Relaxed);
    } else {
        a.fetch_sub(d.unsigned_abs(), Ordering::Relaxed);
    }
}

impl CacheNode {
    /// Binds `addr` and serves until the runtime stops. Must run inside a tokio runtime.
    pub async fn bind(
        me: TaskManagerId,
        addr: &str,
        config: NodeConfig,
    ) -> std::io::Result<CacheNode> {
        let listener = TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        let node = Arc::new(Node {
            me,
            budget: Budget::new(config.memory_limit),
            config,
            table: RwLock::new(None),
            parts: RwLock::new(Vec::new()),
            forwards: Mutex::new(HashMap::new()),
            peers: Mutex::new(HashMap::new()),
            map_bytes: AtomicU64::new(0),
            list_bytes: AtomicU64::new(0),
            map_entries: AtomicU64::new(0),
            list_items: AtomicU64::new(0),
            ops: AtomicU64::new(0),
            copies: AtomicU64::new(0),
            replicated: AtomicU64::new(0),
            full_rejections: AtomicU64::new(0),
            latency: Default::default(),
        });
        tokio::spawn(accept(listener, node.clone()));
        tokio::spawn(expire(Arc::downgrade(&node)));
        info!(tm = %me, addr = %local, "Cache node listening.");
        Ok(CacheNode { node, addr: local })
    }

    /// The address it serves on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Adopts `table` if it is newer than the one held.
    pub fn set_table(&self, table: PartitionTable) {
        self.node.set_table(table);
    }

    /// Copies partition `partition` (version `version`) to `target`; while the copy runs and
    /// until the table names `target` an owner, writes are forwarded to it too.
    pub async fn copy_to(
        &self,
        partition: u32,
        version: u64,
        target: Member,
    ) -> Result<(), String> {
        self.node.copy_to(partition, version, target).await
    }

    /// Memory and counters.
    pub fn stats(&self) -> CacheStats {
        let n = &self.node;
        CacheStats {
            bytes: n.budget.used(),
            limit: n.config.memory_limit,
            map_bytes: n.map_bytes.load(Ordering::Relaxed),
            list_bytes: n.list_bytes.load(Ordering::Relaxed),
            map_entries: n.map_entries.load(Ordering::Relaxed),
            list_items: n.list_items.load(Ordering::Relaxed),
            ops: n.ops.load(Ordering::Relaxed),
            replicated: n.replicated.load(Ordering::Relaxed),
            full_rejections: n.full_rejections.load(Ordering::Relaxed),
            latency_us: n
                .latency
                .iter()
                .map(|a| a.load(Ordering::Relaxed))
                .collect(),
        }
    }
}

impl Node {
    fn table(&self) -> Option<Arc<PartitionTable>> {
        self.table.read().ok().and_then(|t| t.clone())
    }

    /// Adopts `table` if it is newer. Callers are serialized (the task manager's actor).
    ///
    /// The table is swapped first and the partitions are changed after, each under its own
    /// lock, never while holding the table's lock: a write holds its partition's lock while
    /// it reads the table again ([`Node::start_ops`]), so it either ran under the old table
    /// with everything that table's copies need (a forward still in place), or sees the new
    /// one and is refused.
    fn set_table(&self, table: PartitionTable) {
        let table = Arc::new(table);
        {
            let Ok(mut held) = self.table.write() else {
                return;
            };
            if held.as_ref().is_some_and(|t| t.epoch >= table.epoch) {
                return;
            }
            if let Ok(mut parts) = self.parts.write() {
                while parts.len() < table.owners.len() {
                    parts.push(Arc::default());
                }
            }
            held.replace(table.clone());
        }
        debug!(tm = %self.me, epoch = table.epoch, "Cache table updated.");
        let me = table.members.iter().position(|m| m.id == self.me);
        let parts = self.parts.read().map(|p| p.clone()).unwrap_or_default();
        // A forward ends when the partition changed (the copy was taken or abandoned) or its
        // target left.
        let stale = |p: u32, fw: &Forward| {
            fw.version != table.version(p) || !table.members.iter().any(|m| m.id == fw.target.id)
        };
        for (p, part) in parts.iter().enumerate() {
            let ended = self
                .forwards
                .lock()
                .ok()
                .and_then(|f| f.get(&(p as u32)).map(|fw| stale(p as u32, fw)))
                .unwrap_or(false);
            let owned = me.is_some_and(|i| table.owners[p].contains(&(i as u16)));
            let lost = table.loss(p as u32).is_some();
            if !ended && owned && !lost {
                continue;
            }
            let mut part = part.lock().unwrap_or_else(|e| e.into_inner());
            if ended {
                if let Ok(mut f) = self.forwards.lock() {
                    f.retain(|q, fw| *q != p as u32 || !stale(*q, fw));
                }
            }
            // Drop what this member holds of a partition it does not own, unless it was
            // written at the partition's current version: then it is a copy arriving (sent
            // before this member learnt of the table that asked for it), not a leftover.
            let leftover = !owned && part.version() < table.version(p as u32);
            if leftover && !part.is_empty() {
                let d = part.apply(Mutation::Clear);
                self.account(d);
            }
            self.forget_lost(table.loss(p as u32), &mut part);
        }
    }

    /// Empties a partition if what it holds was written before the partition lost every
    /// copy at epoch `loss` (a member that was not its owner then, say one a copy was
    /// reaching): after a loss a partition holds only what was written since, so this
    /// empties it once and the entries of writers that started after the loss stay. Called
    /// under the partition's lock by everything that writes it, as well as on a new table:
    /// a write routed by the table of the loss may come before the new table is applied to
    /// the partitions, or before this member has it at all (a replica: the primary sends
    /// the loss it knows).
    fn forget_lost(&self, loss: Option<u64>, part: &mut Partition) {
        if loss.is_some_and(|e| part.version() < e) && !part.is_empty() {
            let d = part.apply(Mutation::Clear);
            self.account(d);
        }
    }

    fn part(&self, p: u32) -> Option<Arc<Mutex<Partition>>> {
        self.parts.read().ok()?.get(p as usize).cloned()
    }

    /// Counts a change that reserved nothing (one that frees bytes).
    fn account(&self, d: Usage) {
        self.budget.settle(0, d.bytes());
        self.count(d);
    }

    /// Applies a write that reserved its bytes, and counts its change.
    fn apply_reserved(&self, part: &mut Partition, m: Mutation, reserved: Reservation) {
        let reserved = reserved.keep();
        let d = part.apply(m);
        self.budget.settle(reserved, d.bytes());
        self.count(d);
    }

    fn count(&self, d: Usage) {
        add_signed(&self.map_bytes, d.map_bytes);
        add_signed(&self.list_bytes, d.list_bytes);
        add_signed(&self.map_entries, d.map_entries);
        add_signed(&self.list_items, d.list_items);
    }

    /// Reserves the bytes `m` may add, or answers why it is refused. A trim may pass the
    /// limit by [`TRIM_ALLOWANCE`]: it frees memory, and one that names a list not yet
    /// here (a first snapshot drops the incremental ones before there are any) makes the
    /// list, which is charged; refusing it on a full member would stop the writer before
    /// its next trim, the one that frees the log.
    fn reserve(&self, part: &Partition, m: &Mutation) -> Result<Reservation<'_>, Failure> {
        let adding = part.growth(m);
        let allowance = match m {
            Mutation::ListTrim { .. } => TRIM_ALLOWANCE,
            _ => 0,
        };
        self.budget.reserve(adding, allowance).map_err(|used| {
            self.full_rejections.fetch_add(1, Ordering::Relaxed);
            Failure::Full {
                used,
                limit: self.config.memory_limit,
            }
        })
    }

    fn peer(&self, addr: &str) -> Conn {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        match peers.get(addr) {
            Some(c) if !c.is_dead() => c.clone(),
            _ => {
                let c = Conn::open(addr, CONNECT_TIMEOUT);
                peers.insert(addr.to_string(), c.clone());
                c
            }
        }
    }

    /// Where partition `p`'s mutations must go besides this primary.
    fn replicas(&self, table: &PartitionTable, p: u32) -> Vec<Member> {
        let mut out: Vec<Member> = table.backups(p).cloned().collect();
        if let Some(f) = self.forwards.lock().ok().and_then(|f| f.get(&p).cloned()) {
            if f.version == table.version(p) && !out.iter().any(|m| m.id == f.target.id) {
                out.push(f.target);
            }
        }
        out
    }

    /// Checks that this node may serve an operation on `p` routed at `version`, for a
    /// writer whose entries date from epoch `since`.
    fn check(
        &self,
        table: &PartitionTable,
        p: u32,
        version: u64,
        since: u64,
    ) -> Result<(), Failure> {
        // A writer dating from a newer table than this node's: the node may not know of a
        // loss the writer's epoch covers (or be a member declared dead, still holding a
        // table from before it), and must not take a write it would drop when it learns.
        if table.epoch < since {
            return Err(Failure::Behind);
        }
        if p >= table.partitions() {
            return Err(Failure::Invalid(format!(
                "partition {p} does not exist (there are {})",
                table.partitions()
            )));
        }
        let mine = table.version(p);
        if version > mine {
            return Err(Failure::Behind);
        }
        if version < mine || table.primary(p).map(|m| m.id) != Some(self.me) {
            return Err(Failure::Moved);
        }
        if table.lost_after(p, since) {
            return Err(Failure::Lost { partition: p });
        }
        Ok(())
    }

    /// Applies operations in order and queues their replication; [`Started::finish`] waits
    /// for the confirmations. Synchronous, so one connection's requests apply in order.
    fn start_ops(&self, since: u64, ops: Vec<(u32, u64, Op)>) -> Started {
        let started = Instant::now();
        let Some(table) = self.table() else {
            return Started {
                results: vec![OpResult::Failed(Failure::Behind); ops.len()],
                waits: Vec::new(),
                table: None,
                started,
            };
        };
        let now = now_ms();
        let mut results = Vec::with_capacity(ops.len());
        let mut waits = Vec::new();
        let mut stale = false;
        for (i, (p, version, op)) in ops.into_iter().enumerate() {
            if let Err(f) = self.check(&table, p, version, since) {
                stale |= f == Failure::Moved;
                results.push(OpResult::Failed(f));
                continue;
            }
            let Some(part) = self.part(p) else {
                results.push(OpResult::Failed(Failure::Behind));
                continue;
            };
            let mut part = part.lock().unwrap_or_else(|e| e.into_inner());
            // Checked again under the partition's lock: a new table may have come meanwhile,
            // and with it the end of a copy's forward (see `set_table`). And data written at
            // a newer version (a copy from the partition's next primary) takes no writes of
            // an older one.
            let table = match self.table() {
                Some(t) if t.version(p) == version && part.version() <= version => t,
                _ => {
                    stale = true;
                    results.push(OpResult::Failed(Failure::Moved));
                    continue;
                }
            };
            self.forget_lost(table.loss(p), &mut part);
            let (result, mutation) = match part.plan(op, now) {
                Ok(x) => x,
                Err(f) => {
                    results.push(OpResult::Failed(f));
                    continue;
                }
            };
            if let Some(m) = mutation {
                let reserved = match self.reserve(&part, &m) {
                    Ok(reserved) => reserved,
                    Err(f) => {
                        results.push(OpResult::Failed(f));
                        continue;
                    }
                };
                let replicas = self.replicas(&table, p);
                let mut pending = Vec::with_capacity(replicas.len());
                for r in &replicas {
                    let rx = self.peer(&r.addr).send(Request::Replicate {
                        partition: p,
                        version,
                        loss: table.loss(p),
                        mutations: vec![m.clone()],
                    });
                    pending.push((r.addr.clone(), rx));
                }
                part.written_at(version);
                self.apply_reserved(&mut part, m, reserved);
                if !pending.is_empty() {
                    waits.push((i, pending));
                }
            }
            results.push(result);
        }
        self.ops.fetch_add(results.len() as u64, Ordering::Relaxed);
        Started {
            results,
            waits,
            // The newest table, which may have come while these ran.
            table: stale.then(|| self.table().map(|t| (*t).clone())).flatten(),
            started,
        }
    }

    fn record_latency(&self, started: Instant) {
        let us = started.elapsed().as_micros() as u64;
        let bucket = LATENCY_BUCKETS_US
            .iter()
            .position(|b| us <= *b)
            .unwrap_or(LATENCY_BUCKETS_US.len());
        self.latency[bucket].fetch_add(1, Ordering::Relaxed);
    }

    /// Applies a primary's mutations, unless the primary's table is older than ours. `loss`:
    /// the partition's loss in the primary's table.
    fn replicate(
        &self,
        partition: u32,
        version: u64,
        loss: Option<u64>,
        mutations: Vec<Mutation>,
    ) -> Response {
        let table = self.table();
        if let Some(t) = &table {
            if partition >= t.partitions() {
                return Response::Replicated(Err(Failure::Invalid(format!(
                    "partition {partition} does not exist"
                ))));
            }
            if version < t.version(partition) {
                return Response::Replicated(Err(Failure::Moved));
            }
        }
        let Some(part) = self.part(partition) else {
            return Response::Replicated(Err(Failure::Behind));
        };
        let mut part = part.lock().unwrap_or_else(|e| e.into_inner());
        // Again under the partition's lock: a newer table may have come while this waited,
        // and with it a new primary whose writes must not be overwritten by the old one's.
        // Nor over data written at a newer version (a copy from the next primary that came
        // before the table naming it).
        let table = self.table();
        if part.version() > version
            || table
                .as_ref()
                .is_some_and(|t| version < t.version(partition))
        {
            return Response::Replicated(Err(Failure::Moved));
        }
        self.forget_lost(loss.max(table.and_then(|t| t.loss(partition))), &mut part);
        for m in mutations {
            // Each checked against the partition as the ones before it left it, so a gap
            // past a list's end counts what filling it takes. A refusal midway fails the
            // message: a write carries one mutation, and a copy that fails is dropped.
            if let Err(f) = store::check(&m) {
                return Response::Replicated(Err(f));
            }
            let reserved = match self.reserve(&part, &m) {
                Ok(reserved) => reserved,
                Err(f) => return Response::Replicated(Err(f)),
            };
            part.written_at(version);
            self.apply_reserved(&mut part, m, reserved);
            self.replicated.fetch_add(1, Ordering::Relaxed);
        }
        Response::Replicated(Ok(()))
    }

    async fn copy_to(&self, partition: u32, version: u64, target: Member) -> Result<(), String> {
        let table = self.table().ok_or("no partition table yet")?;
        if table.version(partition) != version
            || table.primary(partition).map(|m| m.id) != Some(self.me)
        {
            return Err(format!(
                "not the primary of partition {partition} at version {version}"
            ));
        }
        let part = self.part(partition).ok_or("no such partition")?;
        let conn = self.peer(&target.addr);
        let copy = self.copies.fetch_add(1, Ordering::Relaxed);
        let pending = {
            let mut part = part.lock().unwrap_or_else(|e| e.into_inner());
            // Nothing from before a loss goes out as part of the partition.
            self.forget_lost(table.loss(partition), &mut part);
            if let Ok(mut f) = self.forwards.lock() {
                f.insert(
                    partition,
                    Forward {
                        target: target.clone(),
                        version,
                        copy,
                    },
                );
            }
            // Queued under the lock: the copy reaches the target before any write after it.
            part.copy(COPY_CHUNK_BYTES)
                .into_iter()
                .map(|mutations| {
                    conn.send(Request::Replicate {
                        partition,
                        version,
                        loss: table.loss(partition),
                        mutations,
                    })
                })
                .collect::<Vec<_>>()
        };
        for rx in pending {
            match tokio::time::timeout(REPLICATION_TIMEOUT * 4, rx).await {
                Ok(Ok(Ok(Response::Replicated(Ok(()))))) => {}
                other => {
                    // Only this copy's forward: the master may have planned the copy again.
                    let _held = part.lock().unwrap_or_else(|e| e.into_inner());
                    if let Ok(mut f) = self.forwards.lock() {
                        if f.get(&partition).is_some_and(|fw| fw.copy == copy) {
                            f.remove(&partition);
                        }
                    }
                    return Err(format!(
                        "copy of partition {partition} to {}: {other:?}",
                        target.addr
                    ));
                }
            }
        }
        Ok(())
    }

    fn drop_prefix(&self, prefix: &str) -> Response {
        if prefix.is_empty() {
            return Response::Dropped(0);
        }
        let parts: Vec<Arc<Mutex<Partition>>> = match self.parts.read() {
            Ok(p) => p.clone(),
            Err(e) => e.into_inner().clone(),
        };
        let mut freed = 0;
        for part in parts {
            let d = part
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .drop_prefix(prefix);
            self.account(d);
            freed -= d.bytes();
        }
        if freed > 0 {
            debug!(tm = %self.me, prefix, freed, "Cache entries dropped.");
        }
        Response::Dropped(freed.max(0) as u64)
    }

    fn keys(&self, prefix: &str, after: Option<String>, limit: u32) -> Response {
        let Some(table) = self.table() else {
            return Response::Keys(Vec::new());
        };
        let mut out = Vec::new();
        for p in 0..table.partitions() {
            if table.primary(p).map(|m| m.id) == Some(self.me) {
                if let Some(part) = self.part(p) {
                    part.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .names(prefix, &mut out);
                }
            }
        }
        out.sort();
        if let Some(after) = after {
            out.retain(|(n, _)| *n > after);
        }
        out.truncate(limit as usize);
        Response::Keys(out)
    }
}

async fn accept(listener: TcpListener, node: Arc<Node>) {
    loop {
        match listener.accept().await {
            Ok((stream, from)) => {
                let node = node.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve(stream, node).await {
                        warn!(remote = %from, error = %e, "Cache connection closed.");
                    }
                });
            }
            Err(e) => {
                warn!(error = %e, "Cache accept failed.");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Removes expired map entries once a second, for as long as the node exists.
async fn expire(node: std::sync::Weak<Node>) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let Some(node) = node.upgrade() else {
            return;
        };
        let parts = node.parts.read().map(|p| p.clone()).unwrap_or_default();
        let now = now_ms();
        for part in parts {
            let d = part.lock().unwrap_or_else(|e| e.into_inner()).expire(now);
            node.account(d);
        }
    }
}

/// One connection: requests in, responses out (in completion order). A frame that does not
/// decode closes this connection only.
async fn serve(stream: TcpStream, node: Arc<Node>) -> Result<(), String> {
    let _ = stream.set_nodelay(true);
    let (read, write) = stream.into_split();
    let mut read = buffered(read);
    let (tx, mut rx) = mpsc::unbounded_channel::<(u64, Response)>();
    let writer = tokio::spawn(async move {
        let mut out = BufWriter::with_capacity(256 << 10, write);
        let mut encoder = Encoder::default();
        while let Some((id, resp)) = rx.recv().await {
            let mut next = Some((id, resp));
            while let Some((id, resp)) = next {
                let bytes = encoder
                    .encode(&CacheMsg::Response(id, resp))
                    .map_err(|e| e.to_string())?;
                write_frame(&mut out, bytes)
                    .await
                    .map_err(|e| e.to_string())?;
                next = rx.try_recv().ok();
            }
            out.flush().await.map_err(|e| e.to_string())?;
        }
        Ok::<(), String>(())
    });
    let mut buf = AlignedVec::new();
    let result = loop {
        let msg = match read_msg::<_, CacheMsg>(&mut read, &mut buf).await {
            Ok(Some(m)) => m,
            Ok(None) => break Ok(()),
            Err(e) => break Err(format!("reading a cache frame: {e}")),
        };
        let (id, req) = match msg {
            CacheMsg::Request(id, req) => (id, req),
            CacheMsg::Response(..) => break Err("a response sent to a cache node".into()),
        };
        match req {
            Request::Ops { since, ops } => {
                // Applied here, in arrival order; confirmations are awaited without holding
                // up the connection.
                let started = node.start_ops(since, ops);
                if started.waits.is_empty() {
                    node.record_latency(started.started);
                    let _ = tx.send((id, Response::Ops(started.results, started.table)));
                } else {
                    let (node, tx) = (node.clone(), tx.clone());
                    tokio::spawn(async move {
                        let _ = tx.send((id, started.finish(&node).await));
                    });
                }
            }
            Request::Replicate {
                partition,
                version,
                loss,
                mutations,
            } => {
                // In order: a backup applies one primary's mutations as they arrive.
                let _ = tx.send((id, node.replicate(partition, version, loss, mutations)));
            }
            Request::Table => {
                let _ = tx.send((id, Response::Table(node.table().map(|t| (*t).clone()))));
            }
            Request::Keys {
                prefix,
                after,
                limit,
            } => {
                let _ = tx.send((id, node.keys(&prefix, after, limit.min(10_000))));
            }
            Request::DropPrefix { prefix } => {
                let _ = tx.send((id, node.drop_prefix(&prefix)));
            }
        }
    };
    drop(tx);
    let _ = writer.await;
    result
}

#[cfg(test)]
mod tests {
    use super::Budget;

    /// Ensures a reservation counts at once: a second write cannot pass the limit on the
    /// bytes held before the first one was applied.
    #[test]
    fn reservations_count_before_the_write_is_applied() {
        let b = Budget::new(100);
        let first = b.reserve(60, 0).expect("fits");
        assert_eq!(
            b.reserve(50, 0).err(),
            Some(60),
            "60 reserved, not yet applied"
        );
        first.settle(40);
        assert_eq!(b.used(), 40, "the write added less than it reserved");
        let second = b.reserve(60, 0).expect("fits");
        assert_eq!(b.reserve(1, 0).err(), Some(100));
        second.settle(-30);
        assert_eq!(b.used(), 10, "a write that freed bytes");
        assert_eq!(b.reserve(u64::MAX, 0).err(), Some(10), "no overflow");
        assert_eq!(b.reserve(95, 0).err(), Some(10));
        let allowed = b.reserve(95, 5).expect("within the allowance");
        assert_eq!(b.reserve(1, 5).err(), Some(105));
        allowed.settle(0);
        assert_eq!(b.used(), 10);
    }

    /// Ensures a write that is never applied leaves nothing held (refused elsewhere, or
    /// panicking before it is applied), and one that panics while being applied keeps its
    /// bytes: the partition may hold some of them.
    #[test]
    fn an_unsettled_reservation_is_given_back_unless_kept() {
        let b = Budget::new(100);
        b.reserve(10, 0).expect("fits").settle(10);
        drop(b.reserve(70, 0).expect("fits"));
        assert_eq!(b.used(), 10, "dropped unsettled");
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _held = b.reserve(90, 0).expect("fits");
            panic!("the write failed before it was applied");
        }));
        assert!(panicked.is_err());
        assert_eq!(b.used(), 10, "given back as the panic unwound");
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _applying = b.reserve(30, 0).expect("fits").keep();
            panic!("the write failed while being applied");
        }));
        assert!(panicked.is_err());
        assert_eq!(b.used(), 40, "kept once the write was being applied");
    }

    /// Ensures writes on many threads at once never hold more than the limit together.
    #[test]
    fn concurrent_reservations_stay_within_the_limit() {
        let b = Budget::new(100);
        let granted: usize = std::thread::scope(|s| {
            let threads: Vec<_> = (0..16)
                .map(|_| {
                    // Kept, as applied writes: each holds its bytes.
                    s.spawn(|| usize::from(b.reserve(20, 0).map(|r| r.settle(20)).is_ok()))
                })
                .collect();
            threads.into_iter().map(|t| t.join().unwrap_or(0)).sum()
        });
        assert_eq!(granted, 5);
        assert_eq!(b.used(), 100);
    }
}
