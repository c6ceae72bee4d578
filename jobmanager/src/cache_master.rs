//! `CacheMaster`: the distributed cache's membership master (DESIGN §8).
//!
//! Receives `MemberUp` from the control server when a task manager registers, `TaskManagerLost`
//! from the resource manager's failure detector, `CopyEnded` and `MemberStats` from control
//! connections. Owns [`Membership`] (the versioned partition table) and pushes every new table
//! to all members. Every `tick` it asks primaries to copy partitions where the placement is
//! short of backups or should move (at most `max_copies` at once: the re-replication rate
//! limit). Invariant: a member is named an owner of a partition only after its copy was
//! confirmed, and a lost member disappears from every partition in the same table.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use actix::prelude::*;
use engine::cache::table::Progress;
use engine::cache::{CacheClient, Membership};
use engine::ids::TaskManagerId;
use engine::protocol::cache::{CacheStats, PartitionTable, LATENCY_BUCKETS_US};
use engine::protocol::control::ToTaskManager;
use serde::Serialize;
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::now_ms;
use crate::resource_manager::TaskManagerLost;

/// How often copies are planned.
const TICK: Duration = Duration::from_millis(100);

/// A partition loss, for the REST API.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct LossView {
    /// The partition.
    pub partition: u32,
    /// Table epoch at which its last copy was lost.
    pub epoch: u64,
}

/// One member as `GET /cache` shows it.
#[derive(Clone, Debug, Default, Serialize, utoipa::ToSchema)]
pub struct MemberView {
    /// Task manager id.
    pub id: String,
    /// Cache node address.
    pub addr: String,
    /// Partitions it is primary of.
    pub primaries: u32,
    /// Partitions it holds a backup of.
    pub backups: u32,
    /// Memory, entries and operation counters (the heartbeat's `CacheStats`).
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub stats: CacheStats,
}

/// `GET /cache`.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct CacheView {
    /// Table epoch.
    pub epoch: u64,
    /// Number of partitions.
    pub partitions: u32,
    /// Backups per partition.
    pub backup_count: u32,
    /// Live members.
    pub members: Vec<MemberView>,
    /// Partitions whose every copy was lost.
    pub lost_partitions: Vec<LossView>,
    /// Re-replication and migration progress.
    #[schema(value_type = Object)]
    pub progress: Progress,
    /// Upper bounds of the latency buckets, in µs (the last bucket is everything slower).
    pub latency_buckets_us: Vec<u64>,
}

/// The master actor.
pub struct CacheMaster {
    membership: Membership,
    txs: HashMap<TaskManagerId, mpsc::UnboundedSender<ToTaskManager>>,
    stats: HashMap<TaskManagerId, CacheStats>,
    pushed: u64,
    /// Told the epoch of every table pushed and every member lost (the dispatcher).
    follower: Option<Follow>,
}

impl CacheMaster {
    /// A master for `partitions` partitions with `backup_count` backups each, copying at
    /// most `max_copies` partitions at once.
    pub fn new(partitions: u32, backup_count: u32, max_copies: usize) -> CacheMaster {
        CacheMaster {
            membership: Membership::new(partitions, backup_count, max_copies),
            txs: HashMap::new(),
            stats: HashMap::new(),
            pushed: 0,
            follower: None,
        }
    }

    /// Pushes the table to every member if it changed since the last push.
    fn publish(&mut self) {
        if self.membership.epoch() == self.pushed {
            return;
        }
        let table = self.membership.table();
        self.pushed = table.epoch;
        for tx in self.txs.values() {
            let _ = tx.send(ToTaskManager::CacheTable(table.clone()));
        }
        // After the tables: a deployment dating from this epoch reaches a task manager
        // after its table (nodes refuse writers newer than their table, so this only
        // spares retries).
        if let Some(f) = &self.follower {
            f.epochs.do_send(CacheEpoch(table.epoch));
        }
    }

    fn tick(&mut self) {
        for order in self.membership.plan() {
            match self.txs.get(&order.source.id) {
                Some(tx) => {
                    let _ = tx.send(ToTaskManager::CacheCopy {
                        copy: order.copy,
                        partition: order.partition,
                        version: order.version,
                        target: order.target,
                    });
                }
                None => warn!(partition = order.partition, "Copy source is not connected."),
            }
        }
        self.publish();
    }

    fn view(&self) -> CacheView {
        let table = self.membership.table();
        let mut members: BTreeMap<u16, MemberView> = table
            .members
            .iter()
            .enumerate()
            .map(|(i, m)| {
                (
                    i as u16,
                    MemberView {
                        id: m.id.to_string(),
                        addr: m.addr.clone(),
                        stats: self.stats.get(&m.id).cloned().unwrap_or_default(),
                        ..MemberView::default()
                    },
                )
            })
            .collect();
        for owners in &table.owners {
            for (k, i) in owners.iter().enumerate() {
                if let Some(m) = members.get_mut(i) {
                    if k == 0 {
                        m.primaries += 1;
                    } else {
                        m.backups += 1;
                    }
                }
            }
        }
        CacheView {
            epoch: table.epoch,
            partitions: table.partitions(),
            backup_count: table.backup_count,
            members: members.into_values().collect(),
            lost_partitions: table
                .lost
                .iter()
                .map(|(p, e)| LossView {
                    partition: *p,
                    epoch: *e,
                })
                .collect(),
            progress: self.membership.progress(),
            latency_buckets_us: LATENCY_BUCKETS_US.to_vec(),
        }
    }
}

impl Actor for CacheMaster {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(TICK, |act, _| act.tick());
    }
}

/// A task manager registered; its cache node is at `addr`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct MemberUp {
    /// The task manager.
    pub tm: TaskManagerId,
    /// Its cache node.
    pub addr: String,
    /// Control messages to it.
    pub tx: mpsc::UnboundedSender<ToTaskManager>,
}

impl Handler<MemberUp> for CacheMaster {
    type Result = ();
    fn handle(&mut self, msg: MemberUp, _ctx: &mut Self::Context) {
        info!(tm = %msg.tm, addr = %msg.addr, "Cache member joined.");
        let _ = msg
            .tx
            .send(ToTaskManager::CacheTable(self.membership.table()));
        self.txs.insert(msg.tm, msg.tx);
        self.membership.join(msg.tm, msg.addr);
        self.publish();
    }
}

impl Handler<TaskManagerLost> for CacheMaster {
    type Result = ();
    fn handle(&mut self, msg: TaskManagerLost, _ctx: &mut Self::Context) {
        self.txs.remove(&msg.tm);
        self.stats.remove(&msg.tm);
        let lost = self.membership.leave(msg.tm);
        if lost.is_empty() {
            info!(tm = %msg.tm, "Cache member lost; backups promoted.");
        } else {
            error!(tm = %msg.tm, partitions = ?lost, "Cache member lost; these partitions lost every copy.");
        }
        // Promotions go out at once, not at the next tick.
        self.publish();
        if let Some(f) = &self.follower {
            f.losses.do_send(msg);
        }
    }
}

/// The epoch of the table the master just pushed.
#[derive(Message)]
#[rtype(result = "()")]
pub struct CacheEpoch(pub u64);

/// Makes the master tell the dispatcher the epoch of every table it pushes (the current
/// one at once), and relay every task manager loss after it has recorded the loss and
/// pushed the table that drops the member. The dispatcher hears of a loss from here, not
/// from the resource manager directly, so a deployment it makes after hearing of a loss
/// dates from an epoch at or after it: the deployment is not refused the partitions that
/// loss took (it has nothing there), which it would be if it dated from before.
#[derive(Message, Clone)]
#[rtype(result = "()")]
pub struct Follow {
    /// Told each epoch.
    pub epochs: Recipient<CacheEpoch>,
    /// Told each loss.
    pub losses: Recipient<TaskManagerLost>,
}

impl Handler<Follow> for CacheMaster {
    type Result = ();
    fn handle(&mut self, msg: Follow, _ctx: &mut Self::Context) {
        msg.epochs.do_send(CacheEpoch(self.pushed));
        self.follower = Some(msg);
    }
}

/// A copy ended (from the source primary's task manager).
#[derive(Message)]
#[rtype(result = "()")]
pub struct CopyEnded {
    /// The master's id of the copy.
    pub copy: u64,
    /// The partition.
    pub partition: u32,
    /// Its version when the copy started.
    pub version: u64,
    /// The receiving member.
    pub target: TaskManagerId,
    /// Why it failed.
    pub error: Option<String>,
}

impl Handler<CopyEnded> for CacheMaster {
    type Result = ();
    fn handle(&mut self, msg: CopyEnded, _ctx: &mut Self::Context) {
        if let Some(e) = &msg.error {
            warn!(copy = msg.copy, partition = msg.partition, version = msg.version, target = %msg.target, error = %e, "Cache copy failed.");
        }
        if self
            .membership
            .sync_done(msg.partition, msg.copy, msg.error.is_none())
        {
            self.publish();
        }
    }
}

/// A member's cache statistics from its heartbeat.
#[derive(Message)]
#[rtype(result = "()")]
pub struct MemberStats {
    /// The task manager.
    pub tm: TaskManagerId,
    /// Its statistics.
    pub stats: CacheStats,
}

impl Handler<MemberStats> for CacheMaster {
    type Result = ();
    fn handle(&mut self, msg: MemberStats, _ctx: &mut Self::Context) {
        if self.txs.contains_key(&msg.tm) {
            self.stats.insert(msg.tm, msg.stats);
        }
    }
}

/// The cache's state for the REST API.
#[derive(Message)]
#[rtype(result = "CacheView")]
pub struct GetCache;

impl Handler<GetCache> for CacheMaster {
    type Result = MessageResult<GetCache>;
    fn handle(&mut self, _msg: GetCache, _ctx: &mut Self::Context) -> Self::Result {
        MessageResult(self.view())
    }
}

/// The current partition table (for a routing client in the job manager).
#[derive(Message)]
#[rtype(result = "PartitionTable")]
pub struct GetTable;

impl Handler<GetTable> for CacheMaster {
    type Result = MessageResult<GetTable>;
    fn handle(&mut self, _msg: GetTable, _ctx: &mut Self::Context) -> Self::Result {
        MessageResult(self.membership.table())
    }
}

/// Drop every cache entry whose name starts with `prefix` (an ended DCAS job's logs,
/// snapshots and progress), once the job's subtasks have had time to stop.
#[derive(Message)]
#[rtype(result = "()")]
pub struct DropEntries {
    /// Name prefix of the entries.
    pub prefix: String,
}

/// When, after a job ended, its cache entries are dropped: once canceled subtasks had time
/// to stop, and again after the longest a stopped subtask's snapshot write may still be
/// retried (20 s) — the drop is per member, not ordered with replication or partition
/// copies, so a write or copy in flight can bring an entry back; dropping is idempotent.
const DROP_AFTER: [Duration; 2] = [Duration::from_secs(2), Duration::from_secs(30)];

impl Handler<DropEntries> for CacheMaster {
    type Result = ();
    fn handle(&mut self, msg: DropEntries, ctx: &mut Self::Context) -> Self::Result {
        for delay in DROP_AFTER {
            let prefix = msg.prefix.clone();
            ctx.run_later(delay, move |act, _| {
                let client = CacheClient::new(act.membership.table(), Duration::from_secs(5));
                actix::spawn(async move {
                    match client.drop_prefix(&prefix).await {
                        Ok(bytes) => info!(prefix = %prefix, bytes, "Dropped an ended job's cache entries."),
                        Err(e) => warn!(prefix = %prefix, error = %e, "Could not drop an ended job's cache entries; members that missed it keep them."),
                    }
                });
            });
        }
    }
}

/// Forget recorded partition losses at or before epoch `upto` (after the operator dealt
/// with them); answers the partitions forgotten.
#[derive(Message)]
#[rtype(result = "Vec<u32>")]
pub struct ClearLost {
    /// The newest loss epoch to forget: no writer from before a later one may remain.
    pub upto: u64,
}

impl Handler<ClearLost> for CacheMaster {
    type Result = MessageResult<ClearLost>;
    fn handle(&mut self, msg: ClearLost, _ctx: &mut Self::Context) -> Self::Result {
        let cleared = self.membership.clear_lost(msg.upto);
        if !cleared.is_empty() {
            info!(partitions = ?cleared, at = now_ms(), "Cache partition losses cleared.");
            self.publish();
        }
        MessageResult(cleared)
    }
}
