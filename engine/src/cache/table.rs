//! Partitioning and placement: key -> partition by hash, partition -> members by consistent
//! hashing with virtual nodes, and [`Membership`], the master's state machine that moves the
//! partition table from what it is towards what the ring says it should be.
//!
//! Consistent hashing: every member owns `vnodes` points on a 64-bit ring (hashes of its id
//! and the point's index); partition `p` sits at `hash(p)` and its owners are the first
//! `backup_count + 1` distinct members clockwise from there, skipping members already 10%
//! above their fair share (bounded loads). A member joining or leaving moves mostly the
//! partitions next to its points, not a reshuffle of all, and the spread stays even (see
//! `ring_balance` in the tests).
//!
//! Changes never copy data under a client's feet: a member that should own a partition first
//! receives a full copy from the primary while new writes are forwarded to it (a *sync*),
//! and only when the copy is confirmed does the table name it an owner. When a member is
//! lost, its partitions' first surviving backup becomes primary in the very next table.

use std::collections::btree_map::Entry;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::ids::TaskManagerId;
use crate::protocol::cache::{Member, PartitionTable};
use crate::value::mix64;

/// Default number of partitions (a prime, as Hazelcast's 271).
pub const DEFAULT_PARTITIONS: u32 = 271;
/// A copy not confirmed within this time is planned again.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(60);
/// Points per member on the hash ring.
pub const VNODES: u32 = 128;

/// A stable 64-bit hash of bytes (independent of process and platform).
pub fn hash_bytes(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = mix64(seed ^ (bytes.len() as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        h = mix64(h ^ u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]));
    }
    let mut last = [0u8; 8];
    last[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
    mix64(h ^ u64::from_le_bytes(last))
}

/// The partition of map entry `key` of `map`.
pub fn map_partition(map: &str, key: &[u8], partitions: u32) -> u32 {
    (hash_bytes(hash_bytes(1, map.as_bytes()), key) % partitions as u64) as u32
}

/// The partition of list `list` (a list lives in one partition).
pub fn list_partition(list: &str, partitions: u32) -> u32 {
    (hash_bytes(2, list.as_bytes()) % partitions as u64) as u32
}

/// The ring of a set of members.
struct Ring {
    points: Vec<(u64, TaskManagerId)>,
    members: usize,
}

impl Ring {
    fn new(members: impl Iterator<Item = TaskManagerId>) -> Ring {
        let mut points: Vec<(u64, TaskManagerId)> = members
            .flat_map(|m| {
                let base = mix64(m.0 as u64 ^ mix64((m.0 >> 64) as u64));
                (0..VNODES).map(move |v| (mix64(base ^ mix64(v as u64 + 1)), m))
            })
            .collect();
        points.sort();
        let members = points.len() / VNODES as usize;
        Ring { points, members }
    }

    /// Owners of every partition: for partition `p`, the first `copies` distinct members
    /// clockwise from `hash(p)`, skipping members that already carry `LOAD_BOUND` times
    /// their fair share (consistent hashing with bounded loads, Mirrokni et al. 2016). The
    /// bound keeps the busiest member within 10% of the average, where plain consistent
    /// hashing of 271 partitions leaves some members with twice the share of others.
    fn assign(&self, partitions: u32, copies: usize) -> Vec<Vec<TaskManagerId>> {
        let mut out = vec![Vec::with_capacity(copies); partitions as usize];
        if self.points.is_empty() {
            return out;
        }
        let copies = copies.min(self.members);
        let cap = |total: usize| (total as f64 * LOAD_BOUND / self.members as f64).ceil() as usize;
        let (cap_primary, cap_all) = (cap(partitions as usize), cap(partitions as usize * copies));
        let mut primaries: BTreeMap<TaskManagerId, usize> = BTreeMap::new();
        let mut all: BTreeMap<TaskManagerId, usize> = BTreeMap::new();
        for (p, owners) in out.iter_mut().enumerate() {
            let at = mix64(0x5eed ^ p as u64);
            let start = self.points.partition_point(|(h, _)| *h < at);
            // First pass within the bounds; a second without, should the bounds not fit.
            for bounded in [true, false] {
                for i in 0..self.points.len() {
                    if owners.len() == copies {
                        break;
                    }
                    let m = self.points[(start + i) % self.points.len()].1;
                    let fits = !bounded
                        || (all.get(&m).copied().unwrap_or(0) < cap_all
                            && (!owners.is_empty()
                                || primaries.get(&m).copied().unwrap_or(0) < cap_primary));
                    if fits && !owners.contains(&m) {
                        if owners.is_empty() {
                            *primaries.entry(m).or_default() += 1;
                        }
                        *all.entry(m).or_default() += 1;
                        owners.push(m);
                    }
                }
            }
        }
        out
    }
}

/// Highest load of a member relative to the average.
const LOAD_BOUND: f64 = 1.1;

/// A copy the master asked for: `source` (the primary) sends partition `partition` to
/// `target`, which becomes an owner when copy `copy` is confirmed at the same `version`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncOrder {
    /// Which copy this is: the outcome of a copy planned again after [`SYNC_TIMEOUT`] names
    /// the new one, so the first one's late success cannot promote a target that the
    /// second is still sending to.
    pub copy: u64,
    /// The partition.
    pub partition: u32,
    /// Its version when the copy started.
    pub version: u64,
    /// The primary that sends.
    pub source: Member,
    /// The member that receives.
    pub target: Member,
}

/// Re-replication and migration progress, for `GET /cache`.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Progress {
    /// Partitions with fewer than `backup_count + 1` owners (among what the members allow).
    pub under_replicated: u32,
    /// Partitions whose owners differ from the ring's placement.
    pub misplaced: u32,
    /// Copies in flight.
    pub syncing: u32,
    /// Copies completed since the master started.
    pub synced_total: u64,
}

/// The membership master's state: live members, owners per partition, copies in flight.
pub struct Membership {
    backup_count: u32,
    max_syncs: usize,
    epoch: u64,
    members: BTreeMap<TaskManagerId, String>,
    owners: Vec<Vec<TaskManagerId>>,
    versions: Vec<u64>,
    lost: BTreeMap<u32, u64>,
    syncing: BTreeMap<u32, CopyInFlight>,
    synced_total: u64,
    /// Id of the last copy planned.
    copies: u64,
}

/// A copy in flight.
struct CopyInFlight {
    copy: u64,
    target: TaskManagerId,
    version: u64,
    started: Instant,
}

impl Membership {
    /// No members yet; `max_syncs` copies at most run at once (the re-replication rate limit).
    pub fn new(partitions: u32, backup_count: u32, max_syncs: usize) -> Membership {
        Membership {
            backup_count,
            max_syncs: max_syncs.max(1),
            epoch: 0,
            members: BTreeMap::new(),
            owners: vec![Vec::new(); partitions.max(1) as usize],
            versions: vec![0; partitions.max(1) as usize],
            lost: BTreeMap::new(),
            syncing: BTreeMap::new(),
            synced_total: 0,
            copies: 0,
        }
    }

    /// The current table.
    pub fn table(&self) -> PartitionTable {
        let index: BTreeMap<TaskManagerId, u16> = self
            .members
            .keys()
            .enumerate()
            .map(|(i, id)| (*id, i as u16))
            .collect();
        PartitionTable {
            epoch: self.epoch,
            members: self
                .members
                .iter()
                .map(|(id, addr)| Member {
                    id: *id,
                    addr: addr.clone(),
                })
                .collect(),
            owners: self
                .owners
                .iter()
                .map(|o| o.iter().filter_map(|m| index.get(m).copied()).collect())
                .collect(),
            versions: self.versions.clone(),
            lost: self.lost.iter().map(|(p, e)| (*p, *e)).collect(),
            backup_count: self.backup_count,
        }
    }

    /// Table epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    fn member(&self, id: TaskManagerId) -> Member {
        Member {
            id,
            addr: self.members.get(&id).cloned().unwrap_or_default(),
        }
    }

    fn set_owners(&mut self, p: usize, owners: Vec<TaskManagerId>) {
        self.epoch += 1;
        self.owners[p] = owners;
        self.versions[p] = self.epoch;
    }

    /// A member joins (or rejoins with a new address). Partitions without owners are given
    /// to the ring's choice at once (there is nothing to copy); the rest move by syncs.
    pub fn join(&mut self, id: TaskManagerId, addr: String) {
        self.members.insert(id, addr);
        self.epoch += 1;
        self.place_unowned();
    }

    /// A member is gone: every partition it owned loses it in the same new table, so the
    /// first surviving backup is primary at once. Returns the partitions that had no other
    /// copy (lost).
    pub fn leave(&mut self, id: TaskManagerId) -> Vec<u32> {
        if self.members.remove(&id).is_none() {
            return Vec::new();
        }
        self.epoch += 1;
        let mut lost = Vec::new();
        for p in 0..self.owners.len() {
            if self.owners[p].contains(&id) {
                let rest: Vec<TaskManagerId> = self.owners[p]
                    .iter()
                    .copied()
                    .filter(|m| *m != id)
                    .collect();
                if rest.is_empty() {
                    lost.push(p as u32);
                    self.lost.insert(p as u32, self.epoch);
                }
                self.owners[p] = rest;
                self.versions[p] = self.epoch;
            }
        }
        self.syncing
            .retain(|p, sync| sync.target != id && !self.owners[*p as usize].is_empty());
        self.place_unowned();
        lost
    }

    /// Where the ring places every partition among the live members.
    fn targets(&self) -> Vec<Vec<TaskManagerId>> {
        Ring::new(self.members.keys().copied())
            .assign(self.owners.len() as u32, self.backup_count as usize + 1)
    }

    fn place_unowned(&mut self) {
        if self.members.is_empty() {
            return;
        }
        let targets = self.targets();
        for (p, target) in targets.into_iter().enumerate() {
            if self.owners[p].is_empty() {
                self.set_owners(p, target);
            }
        }
    }

    /// Copies to start now (at most `max_syncs` in flight), after promoting partitions whose
    /// ring owners already hold the data. Returns the orders to send to the primaries.
    pub fn plan(&mut self) -> Vec<SyncOrder> {
        self.plan_at(Instant::now())
    }

    /// [`Membership::plan`] at time `now`.
    fn plan_at(&mut self, now: Instant) -> Vec<SyncOrder> {
        // A copy whose outcome never arrived (a message was lost) is forgotten after a while
        // and planned again, under a new id; one of a partition that changed meanwhile (its
        // primary died) cannot succeed and is planned again at once.
        let versions = &self.versions;
        self.syncing.retain(|p, sync| {
            versions[*p as usize] == sync.version
                && now.saturating_duration_since(sync.started) < SYNC_TIMEOUT
        });
        let mut orders = Vec::new();
        for (p, target) in self.targets().into_iter().enumerate() {
            let current = &self.owners[p];
            if current.is_empty() {
                continue;
            }
            let copying = self.syncing.contains_key(&(p as u32));
            match target.iter().find(|m| !current.contains(m)) {
                Some(missing) if !copying && self.syncing.len() < self.max_syncs => {
                    self.copies += 1;
                    let order = SyncOrder {
                        copy: self.copies,
                        partition: p as u32,
                        version: self.versions[p],
                        source: self.member(current[0]),
                        target: self.member(*missing),
                    };
                    let sync = CopyInFlight {
                        copy: self.copies,
                        target: *missing,
                        version: self.versions[p],
                        started: now,
                    };
                    self.syncing.insert(p as u32, sync);
                    orders.push(order);
                }
                Some(_) => {}
                None if *current != target && !copying => {
                    // Every ring owner holds the data: take the ring's order (which may make
                    // a synced backup the primary) and drop the extra copies.
                    self.set_owners(p, target);
                }
                None => {}
            }
        }
        orders
    }

    /// Copy `copy` of `partition` ended. On success, if it is the partition's copy in flight
    /// and nothing changed the partition meanwhile, the target becomes its newest backup. On
    /// failure the partition's version moves on, so the target drops what it received of
    /// the copy. Returns whether the table changed.
    pub fn sync_done(&mut self, partition: u32, copy: u64, ok: bool) -> bool {
        let p = partition as usize;
        let CopyInFlight {
            target, version, ..
        } = match self.syncing.entry(partition) {
            Entry::Occupied(sync) if sync.get().copy == copy => sync.remove(),
            _ => return false,
        };
        if p >= self.owners.len() || self.versions[p] != version {
            return false;
        }
        if !ok {
            self.set_owners(p, self.owners[p].clone());
            return true;
        }
        if !self.members.contains_key(&target) || self.owners[p].contains(&target) {
            return false;
        }
        let mut owners = self.owners[p].clone();
        owners.push(target);
        self.set_owners(p, owners);
        self.synced_total += 1;
        true
    }

    /// How far the table is from the ring's placement.
    pub fn progress(&self) -> Progress {
        let targets = self.targets();
        let copies = (self.backup_count as usize + 1).min(self.members.len());
        let mut pr = Progress {
            syncing: self.syncing.len() as u32,
            synced_total: self.synced_total,
            ..Progress::default()
        };
        for (owners, target) in self.owners.iter().zip(&targets) {
            if owners.len() < copies {
                pr.under_replicated += 1;
            }
            if owners != target {
                pr.misplaced += 1;
            }
        }
        pr
    }

    /// Partitions every copy of which was lost, with the epoch of the loss.
    pub fn lost(&self) -> Vec<(u32, u64)> {
        self.lost.iter().map(|(p, e)| (*p, *e)).collect()
    }

    /// Forgets the losses at or before epoch `upto` (an operator acknowledged them, and no
    /// writer from before them is left): those partitions serve every writer again, with
    /// what was written since the loss. Answers the partitions forgotten.
    pub fn clear_lost(&mut self, upto: u64) -> Vec<u32> {
        let cleared: Vec<u32> = self
            .lost
            .iter()
            .filter(|(_, e)| **e <= upto)
            .map(|(p, _)| *p)
            .collect();
        if !cleared.is_empty() {
            self.lost.retain(|_, e| *e > upto);
            self.epoch += 1;
        }
        cleared
    }
}

impl PartitionTable {
    /// Number of partitions.
    pub fn partitions(&self) -> u32 {
        self.owners.len() as u32
    }

    /// The primary of partition `p`.
    pub fn primary(&self, p: u32) -> Option<&Member> {
        let i = *self.owners.get(p as usize)?.first()?;
        self.members.get(i as usize)
    }

    /// The backups of partition `p`.
    pub fn backups(&self, p: u32) -> impl Iterator<Item = &Member> {
        self.owners
            .get(p as usize)
            .map(|o| o.get(1..).unwrap_or_default())
            .unwrap_or_default()
            .iter()
            .filter_map(|i| self.members.get(*i as usize))
    }

    /// The epoch at which every copy of `p` was last lost, if it was.
    pub fn loss(&self, p: u32) -> Option<u64> {
        // Checked on every operation, and a loss is kept until an operator clears it.
        self.lost
            .binary_search_by_key(&p, |(q, _)| *q)
            .ok()
            .map(|i| self.lost[i].1)
    }

    /// Whether `p` lost every copy after epoch `since`: a writer whose entries all date
    /// from `since` or later (a deployment started then) may have lost some. Data from
    /// before a loss is gone from every member, so an earlier loss took nothing of it.
    pub fn lost_after(&self, p: u32, since: u64) -> bool {
        self.loss(p).is_some_and(|e| e > since)
    }

    /// The version of partition `p` (0 when out of range).
    pub fn version(&self, p: u32) -> u64 {
        self.versions.get(p as usize).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<TaskManagerId> {
        (0..n)
            .map(|i| TaskManagerId(mix64(i as u64 + 7) as u128 * 0x1_0000_0001))
            .collect()
    }

    fn joined(n: usize, backups: u32) -> (Membership, Vec<TaskManagerId>) {
        let mut m = Membership::new(DEFAULT_PARTITIONS, backups, 8);
        let ids = ids(n);
        for (i, id) in ids.iter().enumerate() {
            m.join(*id, format!("127.0.0.1:{}", 7000 + i));
        }
        (m, ids)
    }

    /// Completes every copy until the table matches the ring.
    fn settle(m: &mut Membership) {
        for _ in 0..10_000 {
            let orders = m.plan();
            if orders.is_empty() && m.progress().misplaced == 0 {
                return;
            }
            for o in orders {
                m.sync_done(o.partition, o.copy, true);
            }
        }
        panic!("placement did not settle: {:?}", m.progress());
    }

    #[test]
    fn ring_balance() {
        // Primaries per member over 2..16 members: bounded loads keep the busiest member
        // within 10% of the average (and max/min well under 2x).
        for n in 2..=16 {
            let (mut m, ids) = joined(n, 1);
            settle(&mut m);
            let t = m.table();
            let mut primaries = vec![0u32; n];
            let mut all = vec![0u32; n];
            for p in 0..t.partitions() {
                let owners = &t.owners[p as usize];
                assert_eq!(owners.len(), 2, "partition {p} owners with {n} members");
                assert_ne!(owners[0], owners[1], "backup on the primary's member");
                primaries[owners[0] as usize] += 1;
                for o in owners {
                    all[*o as usize] += 1;
                }
            }
            let (max, min) = (
                primaries.iter().max().unwrap(),
                primaries.iter().min().unwrap(),
            );
            let ratio = *max as f64 / (*min).max(1) as f64;
            println!(
                "{n:2} members: primaries per member min {min} max {max} (x{ratio:.2}), copies min {} max {}",
                all.iter().min().unwrap(),
                all.iter().max().unwrap()
            );
            let bound = (DEFAULT_PARTITIONS as f64 * LOAD_BOUND / n as f64).ceil() as u32;
            assert!(*max <= bound, "{n} members: primaries {primaries:?}");
            assert!(ratio < 2.0, "{n} members: primaries {primaries:?}");
            assert_eq!(ids.len(), t.members.len());
        }
    }

    #[test]
    fn partition_hash_is_stable_and_spread() {
        assert_eq!(map_partition("m", b"k", 271), map_partition("m", b"k", 271));
        assert_ne!(hash_bytes(1, b"abc"), hash_bytes(1, b"abd"));
        assert_ne!(
            hash_bytes(1, b""),
            hash_bytes(1, b"\0"),
            "length is part of the hash"
        );
        let mut counts = vec![0u32; 271];
        for i in 0..271_000u32 {
            counts[map_partition("m", &i.to_le_bytes(), 271) as usize] += 1;
        }
        let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(*min > 800 && *max < 1200, "min {min} max {max}");
    }

    #[test]
    fn losing_a_member_promotes_backups_at_once() {
        let (mut m, ids) = joined(3, 1);
        settle(&mut m);
        let before = m.table();
        let victim = ids[1];
        let lost = m.leave(victim);
        assert!(
            lost.is_empty(),
            "backup_count 1 loses nothing to one failure"
        );
        let after = m.table();
        assert!(after.epoch > before.epoch);
        for p in 0..after.partitions() {
            let primary = after.primary(p).expect("every partition keeps a primary");
            assert_ne!(primary.id, victim);
            let old: Vec<TaskManagerId> = before.owners[p as usize]
                .iter()
                .map(|i| before.members[*i as usize].id)
                .collect();
            if old[0] == victim {
                assert_eq!(primary.id, old[1], "the backup is promoted");
                assert!(after.version(p) > before.version(p));
            } else {
                assert_eq!(
                    primary.id, old[0],
                    "unaffected partitions keep their primary"
                );
            }
        }
        // Re-replication restores a backup for every partition.
        assert!(m.progress().under_replicated > 0);
        settle(&mut m);
        assert_eq!(m.progress().under_replicated, 0);
    }

    #[test]
    fn two_simultaneous_losses_name_the_lost_partitions() {
        let (mut m, ids) = joined(4, 1);
        settle(&mut m);
        let t = m.table();
        let (a, b) = (ids[0], ids[2]);
        let expected: Vec<u32> = (0..t.partitions())
            .filter(|p| {
                let owners: Vec<TaskManagerId> = t.owners[*p as usize]
                    .iter()
                    .map(|i| t.members[*i as usize].id)
                    .collect();
                owners.iter().all(|o| *o == a || *o == b)
            })
            .collect();
        let mut lost = m.leave(a);
        lost.extend(m.leave(b));
        lost.sort();
        assert!(!expected.is_empty());
        assert_eq!(lost, expected);
        let table = m.table();
        for p in &expected {
            let e = table.loss(*p).expect("recorded with its epoch");
            assert!(e <= table.epoch);
            assert!(table.lost_after(*p, e - 1), "a writer from before");
            assert!(!table.lost_after(*p, e), "a writer from the loss on");
            assert!(
                table.primary(*p).is_some(),
                "a lost partition gets new (empty) owners"
            );
        }
        // Forgetting stops short of losses newer than a writer still running.
        let first = table.lost.iter().map(|(_, e)| *e).min().expect("losses");
        let newest = table.lost.iter().map(|(_, e)| *e).max().expect("losses");
        if first < newest {
            let older: Vec<u32> = m.clear_lost(first);
            assert!(!older.is_empty() && older.len() < expected.len());
        }
        assert_eq!(m.clear_lost(newest - 1), Vec::<u32>::new());
        assert!(!m.clear_lost(newest).is_empty());
        assert!(m.lost().is_empty());
        assert!(
            m.table().epoch > table.epoch,
            "a cleared table is a new table"
        );
    }

    #[test]
    fn a_join_moves_partitions_only_after_a_confirmed_copy() {
        let (mut m, _) = joined(2, 1);
        settle(&mut m);
        let newcomer = TaskManagerId(99);
        m.join(newcomer, "127.0.0.1:9999".into());
        let orders = m.plan();
        assert!(
            !orders.is_empty() && orders.len() <= 8,
            "rate limited to 8 copies"
        );
        let t = m.table();
        for o in &orders {
            assert_eq!(o.target.id, newcomer);
            let owners = &t.owners[o.partition as usize];
            assert!(owners.iter().all(|i| t.members[*i as usize].id != newcomer));
        }
        // A copy that fails or races with a change is not taken.
        let o = &orders[0];
        let version = m.table().version(o.partition);
        assert!(
            m.sync_done(o.partition, o.copy, false),
            "a failed copy moves the version"
        );
        assert!(m.table().version(o.partition) > version);
        assert!(
            !m.sync_done(o.partition, o.copy, true),
            "no longer in flight"
        );
        for o in &orders[1..] {
            assert!(m.sync_done(o.partition, o.copy, true));
        }
        settle(&mut m);
        let t = m.table();
        let me = t.members.iter().position(|x| x.id == newcomer).unwrap() as u16;
        let owned = t.owners.iter().filter(|o| o.contains(&me)).count();
        assert!(
            owned > 271 * 2 / 3 / 2,
            "the newcomer owns its share: {owned}"
        );
    }

    /// Ensures a copy planned again after its timeout is the one whose outcome counts: the
    /// first copy's late success must not promote the target while the second one (which
    /// starts with clearing the target's copy) is still arriving.
    #[test]
    fn only_the_latest_copy_of_a_partition_promotes_its_target() {
        let (mut m, _) = joined(2, 1);
        settle(&mut m);
        m.join(TaskManagerId(99), "127.0.0.1:9999".into());
        let first = m.plan()[0].clone();
        let later = Instant::now() + SYNC_TIMEOUT + Duration::from_secs(1);
        let again = m
            .plan_at(later)
            .into_iter()
            .find(|o| o.partition == first.partition)
            .expect("planned again after the timeout");
        assert_eq!(
            (again.target.id, again.version),
            (first.target.id, first.version),
            "the same copy, planned again"
        );
        assert_ne!(again.copy, first.copy);
        let owners_before = m.table().owners[first.partition as usize].clone();
        assert!(
            !m.sync_done(first.partition, first.copy, true),
            "superseded"
        );
        assert_eq!(m.table().owners[first.partition as usize], owners_before);
        assert!(m.sync_done(again.partition, again.copy, true));
    }
}
