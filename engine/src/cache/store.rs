//! One partition's data on one member: maps and lists, with byte accounting.
//!
//! The primary turns an [`Op`] into an absolute [`Mutation`] ([`Partition::plan`]) and both
//! primary and backups apply mutations ([`Partition::apply`]), so every replica changes
//! through the same code and a replayed mutation changes nothing.

use std::collections::{HashMap, VecDeque};

use crate::protocol::cache::{Failure, Mutation, Op, OpResult};

/// Bookkeeping bytes charged per map entry and per list item on top of their payload.
pub const ENTRY_OVERHEAD: u64 = 48;
/// Bookkeeping bytes charged per list item.
pub const ITEM_OVERHEAD: u64 = 24;
/// Bookkeeping bytes charged per list on top of its name. A list outlives its items (a
/// trimmed list keeps its start index, so appends and reads go on at the right index), so
/// without a charge for the list itself, writes naming ever new lists would grow a member
/// without limit.
pub const LIST_OVERHEAD: u64 = 64;

/// A map entry.
#[derive(Clone, Debug)]
struct Entry {
    value: Vec<u8>,
    version: u64,
    expires_ms: Option<u64>,
}

impl Entry {
    fn live(&self, now_ms: u64) -> bool {
        self.expires_ms.is_none_or(|e| e > now_ms)
    }
}

/// A list, held as the batches it was appended in: one append moves its items in whole, so
/// a list's growth never copies the items it holds, and a trim drops whole batches.
#[derive(Clone, Debug, Default)]
struct List {
    /// Index of the first item held; the next index when none is.
    start: u64,
    /// Items held.
    len: u64,
    /// Non-empty batches in index order, each with the index of its first item.
    chunks: VecDeque<(u64, Vec<Vec<u8>>)>,
}

impl List {
    fn end(&self) -> u64 {
        self.start + self.len
    }

    /// Items from index `from` (clamped to what is held) to the end.
    fn items_from(&self, from: u64) -> impl Iterator<Item = &Vec<u8>> {
        let from = from.max(self.start);
        // The chunk holding `from`: the last one starting at or before it.
        let c = self.chunks.partition_point(|(first, _)| *first <= from);
        let skip = match c {
            0 => 0,
            c => (from - self.chunks[c - 1].0) as usize,
        };
        self.chunks
            .range(c.saturating_sub(1)..)
            .flat_map(|(_, items)| items)
            .skip(skip)
    }

    fn items(&self) -> impl Iterator<Item = &Vec<u8>> {
        self.chunks.iter().flat_map(|(_, items)| items)
    }

    /// Appends `items` at the end.
    fn push(&mut self, items: Vec<Vec<u8>>, d: &mut Usage) {
        if items.is_empty() {
            return;
        }
        for item in &items {
            d.list_bytes += item_bytes(item);
        }
        d.list_items += items.len() as i64;
        self.len += items.len() as u64;
        self.chunks
            .push_back((self.end() - items.len() as u64, items));
    }

    /// Drops the items from index `index` on.
    fn truncate(&mut self, index: u64, d: &mut Usage) {
        while self.end() > index {
            let Some((first, items)) = self.chunks.back_mut() else {
                break;
            };
            let keep = index.saturating_sub(*first) as usize;
            self.len -= released(items.drain(keep..), d);
            if items.is_empty() {
                self.chunks.pop_back();
            }
        }
    }

    /// Drops the items before index `upto`; an empty list moves its start to `upto`.
    fn trim(&mut self, upto: u64, d: &mut Usage) {
        while self.start < upto {
            let Some((first, items)) = self.chunks.front_mut() else {
                self.start = upto;
                break;
            };
            let n = (upto - *first).min(items.len() as u64) as usize;
            let n = released(items.drain(..n), d);
            *first += n;
            self.start += n;
            self.len -= n;
            if items.is_empty() {
                self.chunks.pop_front();
            }
        }
    }
}

/// Takes list items dropped from a list out of `d`; returns how many there were.
fn released(old: impl Iterator<Item = Vec<u8>>, d: &mut Usage) -> u64 {
    let mut n = 0;
    for item in old {
        d.list_bytes -= item_bytes(&item);
        n += 1;
    }
    d.list_items -= n as i64;
    n
}

/// Bytes and counts held, by structure.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Bytes in maps.
    pub map_bytes: i64,
    /// Bytes in lists.
    pub list_bytes: i64,
    /// Map entries.
    pub map_entries: i64,
    /// List items.
    pub list_items: i64,
}

impl Usage {
    /// Total bytes.
    pub fn bytes(&self) -> i64 {
        self.map_bytes + self.list_bytes
    }

    fn add(&mut self, o: Usage) {
        self.map_bytes += o.map_bytes;
        self.list_bytes += o.list_bytes;
        self.map_entries += o.map_entries;
        self.list_items += o.list_items;
    }
}

fn entry_bytes(map: &str, key: &[u8], value: &[u8]) -> i64 {
    (map.len() + key.len() + value.len()) as i64 + ENTRY_OVERHEAD as i64
}

fn item_bytes(item: &[u8]) -> i64 {
    item.len() as i64 + ITEM_OVERHEAD as i64
}

fn list_bytes(name: &str) -> i64 {
    name.len() as i64 + LIST_OVERHEAD as i64
}

/// Refuses a mutation that cannot be held: list items whose indices would pass `u64::MAX`
/// (after a trim up to there). Clients' appends are checked when planned, a primary's
/// mutations again on each replica.
pub fn check(m: &Mutation) -> Result<(), Failure> {
    match m {
        Mutation::ListSet { list, index, items }
            if index.checked_add(items.len() as u64).is_none() =>
        {
            Err(Failure::Invalid(format!(
                "list '{list}': {} items at index {index} run past the last index",
                items.len()
            )))
        }
        _ => Ok(()),
    }
}

/// The version a map entry at `current` is written at next; only a forged replica write
/// can have brought an entry to the last one.
fn next_version(current: u64) -> Result<u64, Failure> {
    current
        .checked_add(1)
        .ok_or_else(|| Failure::Invalid(format!("entry version {current} cannot grow")))
}

/// The bytes a mutation adds at most (for the memory limit check).
fn growth(m: &Mutation) -> u64 {
    match m {
        Mutation::MapSet {
            map, key, value, ..
        } => entry_bytes(map, key, value) as u64,
        Mutation::ListSet { items, .. } => items.iter().map(|i| item_bytes(i) as u64).sum(),
        _ => 0,
    }
}

/// One partition's maps and lists.
#[derive(Debug, Default)]
pub struct Partition {
    maps: HashMap<String, HashMap<Vec<u8>, Entry>>,
    lists: HashMap<String, List>,
    usage: Usage,
    /// Map entries with a time to live (the expiry sweep skips partitions without any).
    expiring: usize,
    /// The newest partition version a write was applied under, here or by the primary
    /// that replicated it (0 before any).
    version: u64,
}

impl Partition {
    /// The newest partition version a write was applied under.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Notes that writes of partition version `version` are being applied.
    pub fn written_at(&mut self, version: u64) {
        self.version = self.version.max(version);
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.maps.is_empty() && self.lists.is_empty()
    }

    /// What this partition holds.
    pub fn usage(&self) -> Usage {
        self.usage
    }

    /// Bytes `m` may add (checked against the memory limit before it is applied): what it
    /// writes, less the list items it replaces, so an `AppendAt` retry whose items are
    /// already here adds nothing (a full member must not refuse it: the trim that would
    /// free memory may wait for it). A map entry's old value is not subtracted. A write past
    /// a list's end counts the placeholders that fill the gap, so a replication message
    /// naming an absurd index is refused as full instead of allocating them. A write that
    /// makes a list (an append or a trim naming one not here) adds its charge.
    pub fn growth(&self, m: &Mutation) -> u64 {
        let new_list = |list: &str| match self.lists.contains_key(list) {
            true => 0,
            false => list_bytes(list) as u64,
        };
        let (replaced, added) = match m {
            Mutation::ListSet { list, index, .. } => {
                self.lists.get(list).map_or((0, new_list(list)), |l| {
                    let replaced = l.items_from(*index).map(|i| item_bytes(i) as u64).sum();
                    let gap = if l.len > 0 {
                        index.saturating_sub(l.end())
                    } else {
                        0
                    };
                    (replaced, gap.saturating_mul(ITEM_OVERHEAD))
                })
            }
            Mutation::ListTrim { list, .. } => (0, new_list(list)),
            _ => (0, 0),
        };
        growth(m).saturating_add(added).saturating_sub(replaced)
    }

    /// The list named `name`, made (and charged to `d`) if there is none.
    fn list(&mut self, name: String, d: &mut Usage) -> &mut List {
        match self.lists.entry(name) {
            std::collections::hash_map::Entry::Occupied(l) => l.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                d.list_bytes += list_bytes(v.key());
                v.insert(List::default())
            }
        }
    }

    /// Answers a read, or decides the mutation a write makes (not yet applied). Takes the
    /// operation by value so a write's payload moves into its mutation without a copy.
    pub fn plan(&self, op: Op, now_ms: u64) -> Result<(OpResult, Option<Mutation>), Failure> {
        let entry = |map: &str, key: &[u8]| {
            self.maps
                .get(map)
                .and_then(|m| m.get(key))
                .filter(|e| e.live(now_ms))
        };
        let planned = match op {
            Op::Get { map, key } => (
                OpResult::Value(entry(&map, &key).map(|e| (e.value.clone(), e.version))),
                None,
            ),
            Op::Put {
                map,
                key,
                value,
                ttl_ms,
            } => {
                let version = next_version(entry(&map, &key).map_or(0, |e| e.version))?;
                (
                    OpResult::Version(version),
                    Some(Mutation::MapSet {
                        map,
                        key,
                        value,
                        version,
                        expires_ms: ttl_ms.map(|t| now_ms.saturating_add(t)),
                    }),
                )
            }
            Op::PutIfVersion {
                map,
                key,
                value,
                version,
            } => {
                let current = entry(&map, &key);
                // A retry whose first attempt landed here (its replication failed): the
                // entry is what it wrote, one version on. Answered and replicated again,
                // so a backup that missed it converges.
                let landed = current.is_some_and(|e| {
                    next_version(version).ok() == Some(e.version) && e.value == value
                });
                let current = current.map_or(0, |e| e.version);
                if landed {
                    (
                        OpResult::Version(current),
                        Some(Mutation::MapSet {
                            map,
                            key,
                            value,
                            version: current,
                            expires_ms: None,
                        }),
                    )
                } else if current != version {
                    (OpResult::Conflict(current), None)
                } else {
                    let version = next_version(current)?;
                    (
                        OpResult::Version(version),
                        Some(Mutation::MapSet {
                            map,
                            key,
                            value,
                            version,
                            expires_ms: None,
                        }),
                    )
                }
            }
            // Replicated even when there is nothing to delete: a retry whose first attempt
            // landed here reaches a backup that missed it.
            Op::Delete { map, key } => (
                OpResult::Deleted(entry(&map, &key).is_some()),
                Some(Mutation::MapRemove { map, key }),
            ),
            Op::Append { list, items } => {
                let index = self.lists.get(&list).map_or(0, List::end);
                (
                    OpResult::Appended(index),
                    Some(Mutation::ListSet { list, index, items }),
                )
            }
            Op::AppendAt { list, index, items } => {
                let end = self.lists.get(&list).map_or(0, List::end);
                let landed = || {
                    let l = self.lists.get(&list)?;
                    if index < l.start || index > l.end() {
                        // Past the end: nothing of it landed (empty items included).
                        return Some(false);
                    }
                    Some(
                        l.end() - index == items.len() as u64
                            && l.items_from(index).eq(items.iter()),
                    )
                };
                if end == index || landed() == Some(true) {
                    (
                        OpResult::Appended(index),
                        Some(Mutation::ListSet { list, index, items }),
                    )
                } else {
                    (OpResult::Conflict(end), None)
                }
            }
            Op::Range { list, from, limit } => {
                let items = match self.lists.get(&list) {
                    // A range from past the end holds nothing (and indexes nothing).
                    Some(l) if from >= l.end() => (from, Vec::new()),
                    Some(l) => {
                        let first = from.max(l.start);
                        let n = limit.min(l.end() - first);
                        let items = l.items_from(first).take(n as usize).cloned().collect();
                        (first, items)
                    }
                    None => (from, Vec::new()),
                };
                (OpResult::Items(items.0, items.1), None)
            }
            Op::TrimPrefix { list, upto } => {
                let (start, end) = self.lists.get(&list).map_or((0, 0), |l| (l.start, l.end()));
                let upto = upto.max(start);
                // Replicated even when already trimmed here, as `Delete`.
                (
                    OpResult::Bounds(upto, end.max(upto)),
                    Some(Mutation::ListTrim { list, upto }),
                )
            }
            Op::Len { list } => {
                let (start, end) = self.lists.get(&list).map_or((0, 0), |l| (l.start, l.end()));
                (OpResult::Bounds(start, end), None)
            }
        };
        if let Some(m) = &planned.1 {
            check(m)?;
        }
        Ok(planned)
    }

    /// Applies a mutation; returns the change in usage.
    pub fn apply(&mut self, m: Mutation) -> Usage {
        let mut d = Usage::default();
        match m {
            Mutation::Clear => {
                d.map_bytes = -self.usage.map_bytes;
                d.list_bytes = -self.usage.list_bytes;
                d.map_entries = -self.usage.map_entries;
                d.list_items = -self.usage.list_items;
                self.maps.clear();
                self.lists.clear();
                self.expiring = 0;
            }
            Mutation::MapSet {
                map,
                key,
                value,
                version,
                expires_ms,
            } => {
                let added = entry_bytes(&map, &key, &value);
                let value_len = value.len() as i64;
                self.expiring += usize::from(expires_ms.is_some());
                let entries = self.maps.entry(map).or_default();
                match entries.insert(
                    key,
                    Entry {
                        value,
                        version,
                        expires_ms,
                    },
                ) {
                    // Same map and key: only the value's size changes.
                    Some(old) => {
                        self.expiring -= usize::from(old.expires_ms.is_some());
                        d.map_bytes += value_len - old.value.len() as i64;
                    }
                    None => {
                        d.map_bytes += added;
                        d.map_entries += 1;
                    }
                }
            }
            Mutation::MapRemove { map, key } => {
                if let Some(entries) = self.maps.get_mut(&map) {
                    if let Some(old) = entries.remove(&key) {
                        self.expiring -= usize::from(old.expires_ms.is_some());
                        d.map_bytes -= entry_bytes(&map, &key, &old.value);
                        d.map_entries -= 1;
                    }
                    if entries.is_empty() {
                        self.maps.remove(&map);
                    }
                }
            }
            Mutation::ListSet { list, index, items } => {
                let l = self.list(list, &mut d);
                if l.len == 0 || index < l.start {
                    l.truncate(l.start, &mut d);
                    l.start = index;
                }
                l.truncate(index, &mut d);
                // A gap (the replica missed items) is filled with empty placeholders, which
                // never happens on an in-order replication stream; it keeps indices true.
                let gap = index - l.end();
                l.push(vec![Vec::new(); gap as usize], &mut d);
                l.push(items, &mut d);
            }
            Mutation::ListTrim { list, upto } => {
                self.list(list, &mut d).trim(upto, &mut d);
            }
        }
        self.usage.add(d);
        d
    }

    /// Removes every map and list whose name starts with `prefix`; returns the change in
    /// usage.
    pub fn drop_prefix(&mut self, prefix: &str) -> Usage {
        let mut d = Usage::default();
        let expiring = &mut self.expiring;
        self.maps.retain(|map, entries| {
            let keep = !map.starts_with(prefix);
            if !keep {
                for (key, e) in entries.iter() {
                    *expiring -= usize::from(e.expires_ms.is_some());
                    d.map_bytes -= entry_bytes(map, key, &e.value);
                    d.map_entries -= 1;
                }
            }
            keep
        });
        self.lists.retain(|list, l| {
            let keep = !list.starts_with(prefix);
            if !keep {
                d.list_bytes -= list_bytes(list) + l.items().map(|i| item_bytes(i)).sum::<i64>();
                d.list_items -= l.len as i64;
            }
            keep
        });
        self.usage.add(d);
        d
    }

    /// Removes expired map entries; returns the change in usage.
    pub fn expire(&mut self, now_ms: u64) -> Usage {
        let mut d = Usage::default();
        if self.expiring == 0 {
            return d;
        }
        let expiring = &mut self.expiring;
        for (map, entries) in &mut self.maps {
            entries.retain(|key, e| {
                let keep = e.live(now_ms);
                if !keep {
                    *expiring -= 1;
                    d.map_bytes -= entry_bytes(map, key, &e.value);
                    d.map_entries -= 1;
                }
                keep
            });
        }
        self.maps.retain(|_, m| !m.is_empty());
        self.usage.add(d);
        d
    }

    /// The whole partition as mutations that rebuild it on an empty replica, in chunks of
    /// about `chunk_bytes`, the first starting with [`Mutation::Clear`].
    pub fn copy(&self, chunk_bytes: usize) -> Vec<Vec<Mutation>> {
        let mut chunks = vec![vec![Mutation::Clear]];
        let mut size = 0usize;
        let mut push = |m: Mutation, bytes: usize, chunks: &mut Vec<Vec<Mutation>>| {
            if size + bytes > chunk_bytes && size > 0 {
                chunks.push(Vec::new());
                size = 0;
            }
            size += bytes;
            chunks.last_mut().expect("one chunk").push(m);
        };
        for (map, entries) in &self.maps {
            for (key, e) in entries {
                let bytes = map.len() + key.len() + e.value.len() + 16;
                push(
                    Mutation::MapSet {
                        map: map.clone(),
                        key: key.clone(),
                        value: e.value.clone(),
                        version: e.version,
                        expires_ms: e.expires_ms,
                    },
                    bytes,
                    &mut chunks,
                );
            }
        }
        for (name, l) in &self.lists {
            push(
                Mutation::ListTrim {
                    list: name.clone(),
                    upto: l.start,
                },
                name.len(),
                &mut chunks,
            );
            let mut index = l.start;
            let mut batch = Vec::new();
            let mut batch_bytes = 0;
            for item in l.items() {
                batch_bytes += item.len() + 8;
                batch.push(item.clone());
                if batch_bytes >= chunk_bytes / 4 {
                    let n = batch.len() as u64;
                    push(
                        Mutation::ListSet {
                            list: name.clone(),
                            index,
                            items: std::mem::take(&mut batch),
                        },
                        batch_bytes,
                        &mut chunks,
                    );
                    index += n;
                    batch_bytes = 0;
                }
            }
            if !batch.is_empty() {
                push(
                    Mutation::ListSet {
                        list: name.clone(),
                        index,
                        items: batch,
                    },
                    batch_bytes,
                    &mut chunks,
                );
            }
        }
        chunks
    }

    /// `map/key` names (keys lossily as UTF-8) with their bytes, for listings.
    pub fn names(&self, prefix: &str, out: &mut Vec<(String, u64)>) {
        for (map, entries) in &self.maps {
            for (key, e) in entries {
                let name = format!("{map}/{}", String::from_utf8_lossy(key));
                if name.starts_with(prefix) {
                    out.push((name, entry_bytes(map, key, &e.value) as u64));
                }
            }
        }
        for (list, l) in &self.lists {
            let name = format!("{list}[]");
            if name.starts_with(prefix) {
                let bytes: i64 = l.items().map(|i| item_bytes(i)).sum();
                out.push((name, (list_bytes(list) + bytes) as u64));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(p: &mut Partition, key: &str, value: &str) -> OpResult {
        let (r, m) = p
            .plan(
                Op::Put {
                    map: "m".into(),
                    key: key.into(),
                    value: value.into(),
                    ttl_ms: None,
                },
                0,
            )
            .unwrap();
        p.apply(m.unwrap());
        r
    }

    fn run(p: &mut Partition, op: Op, now: u64) -> OpResult {
        let (r, m) = p.plan(op, now).unwrap();
        if let Some(m) = m {
            p.apply(m);
        }
        r
    }

    #[test]
    fn map_versions_and_compare_and_set() {
        let mut p = Partition::default();
        assert_eq!(put(&mut p, "a", "1"), OpResult::Version(1));
        assert_eq!(put(&mut p, "a", "2"), OpResult::Version(2));
        let cas = |version| Op::PutIfVersion {
            map: "m".into(),
            key: b"a".to_vec(),
            value: b"3".to_vec(),
            version,
        };
        assert_eq!(run(&mut p, cas(1), 0), OpResult::Conflict(2));
        assert_eq!(run(&mut p, cas(2), 0), OpResult::Version(3));
        let get = Op::Get {
            map: "m".into(),
            key: b"a".to_vec(),
        };
        assert_eq!(
            run(&mut p, get.clone(), 0),
            OpResult::Value(Some((b"3".to_vec(), 3)))
        );
        let del = Op::Delete {
            map: "m".into(),
            key: b"a".to_vec(),
        };
        assert_eq!(run(&mut p, del.clone(), 0), OpResult::Deleted(true));
        assert_eq!(run(&mut p, del, 0), OpResult::Deleted(false));
        assert_eq!(run(&mut p, get, 0), OpResult::Value(None));
        assert_eq!(p.usage(), Usage::default(), "accounting returns to zero");
    }

    /// A write whose first attempt landed on the primary but not on a backup (the backup
    /// refused it: its table moved on) is retried by the client. The retry finds the write
    /// already applied, yet must still send the backup a mutation, or the backup keeps the
    /// old state and serves it once it is promoted. Seen as a DCAS snapshot chain that
    /// "does not follow the stored ones" after a trim retried across a table change.
    #[test]
    fn a_retry_that_already_landed_is_replicated_again() {
        let (mut primary, mut backup) = (Partition::default(), Partition::default());
        let history = [
            Op::Append {
                list: "l".into(),
                items: vec![vec![1], vec![2], vec![3]],
            },
            Op::Put {
                map: "m".into(),
                key: b"gone".to_vec(),
                value: b"v".to_vec(),
                ttl_ms: None,
            },
        ];
        for op in history {
            run(&mut primary, op.clone(), 0);
            run(&mut backup, op, 0);
        }
        let writes = [
            Op::TrimPrefix {
                list: "l".into(),
                upto: 2,
            },
            Op::Delete {
                map: "m".into(),
                key: b"gone".to_vec(),
            },
            Op::PutIfVersion {
                map: "m".into(),
                key: b"placed".to_vec(),
                value: b"7".to_vec(),
                version: 0,
            },
        ];
        // First attempts: applied on the primary only.
        let first: Vec<OpResult> = writes
            .iter()
            .map(|op| run(&mut primary, op.clone(), 0))
            .collect();
        // Retries: answered as the first attempt was (a delete now finds nothing), and
        // each replicates a mutation that brings the backup level.
        for (op, answered) in writes.into_iter().zip(first) {
            let (r, m) = primary.plan(op, 0).unwrap();
            match (&r, &answered) {
                (OpResult::Deleted(false), OpResult::Deleted(true)) => {}
                _ => assert_eq!(r, answered),
            }
            let m = m.expect("a retry that landed is replicated again");
            backup.apply(m.clone());
            primary.apply(m);
        }
        for p in [&mut primary, &mut backup] {
            let len = Op::Len { list: "l".into() };
            assert_eq!(run(p, len, 0), OpResult::Bounds(2, 3));
            let get = |key: &[u8]| Op::Get {
                map: "m".into(),
                key: key.to_vec(),
            };
            assert_eq!(run(p, get(b"gone"), 0), OpResult::Value(None));
            assert_eq!(
                run(p, get(b"placed"), 0),
                OpResult::Value(Some((b"7".to_vec(), 1)))
            );
        }
        // A conditional put by someone else (another value) still conflicts.
        let other = Op::PutIfVersion {
            map: "m".into(),
            key: b"placed".to_vec(),
            value: b"8".to_vec(),
            version: 0,
        };
        assert_eq!(run(&mut primary, other, 0), OpResult::Conflict(1));
    }

    /// Dropping a prefix removes exactly the maps and lists named by it, with their bytes.
    #[test]
    fn drop_prefix_removes_named_structures_and_their_bytes() {
        let set = |map: &str, key: &str, ttl_ms| Op::Put {
            map: map.into(),
            key: key.into(),
            value: vec![7; 100],
            ttl_ms,
        };
        let append = |list: &str| Op::Append {
            list: list.into(),
            items: vec![vec![1; 50]; 10],
        };
        let mut kept = Partition::default();
        run(&mut kept, set("job/b/snap", "0.0", None), 0);
        run(&mut kept, append("job/b/log/0.0"), 0);
        let mut p = Partition::default();
        for op in [
            set("job/a/snap", "0.0", None),
            set("job/a/snap", "0.1", Some(60_000)),
            set("job/b/snap", "0.0", None),
            append("job/a/log/0.0"),
            append("job/b/log/0.0"),
        ] {
            run(&mut p, op, 0);
        }
        let before = p.usage();
        let d = p.drop_prefix("job/a/");
        assert_eq!(p.usage(), kept.usage(), "only job/b's entries are left");
        assert_eq!(d.bytes(), kept.usage().bytes() - before.bytes());
        assert_eq!(p.expiring, 0, "the expiring entry went with its map");
        let len = Op::Len {
            list: "job/a/log/0.0".into(),
        };
        assert_eq!(run(&mut p, len, 0), OpResult::Bounds(0, 0));
        assert_eq!(p.drop_prefix("job/a/"), Usage::default());
    }

    /// Ensures a list is charged while it exists, items or not: a write naming a new list
    /// (even a trim, which leaves an empty list behind) grows what a member holds, so a full
    /// member refuses it.
    #[test]
    fn lists_are_charged_even_when_empty() {
        let mut p = Partition::default();
        let trim = |list: &str| Mutation::ListTrim {
            list: list.into(),
            upto: 5,
        };
        for name in ["job/a/log/0.0", "job/a/log/1.0"] {
            assert_eq!(p.growth(&trim(name)), name.len() as u64 + LIST_OVERHEAD);
            p.apply(trim(name));
        }
        let names = 2 * ("job/a/log/0.0".len() as i64 + LIST_OVERHEAD as i64);
        assert_eq!(p.usage().list_bytes, names);
        assert_eq!(p.growth(&trim("job/a/log/0.0")), 0, "it exists");
        let append = Mutation::ListSet {
            list: "job/a/log/0.0".into(),
            index: 5,
            items: vec![vec![1; 10]],
        };
        assert_eq!(p.growth(&append), 10 + ITEM_OVERHEAD);
        p.apply(append);
        assert_eq!(
            p.drop_prefix("job/a/").bytes(),
            -(names + 10 + ITEM_OVERHEAD as i64)
        );
        assert_eq!(p.usage(), Usage::default());
    }

    #[test]
    fn ttl_hides_and_expires_entries() {
        let mut p = Partition::default();
        run(
            &mut p,
            Op::Put {
                map: "m".into(),
                key: b"k".to_vec(),
                value: b"v".to_vec(),
                ttl_ms: Some(100),
            },
            1000,
        );
        let get = Op::Get {
            map: "m".into(),
            key: b"k".to_vec(),
        };
        assert!(matches!(
            run(&mut p, get.clone(), 1099),
            OpResult::Value(Some(_))
        ));
        assert_eq!(run(&mut p, get, 1100), OpResult::Value(None));
        assert_eq!(p.expiring, 1);
        p.expire(1100);
        assert_eq!(p.usage(), Usage::default());
        assert_eq!(p.expiring, 0, "nothing left for the sweep");
    }

    #[test]
    fn lists_append_range_trim_len() {
        let mut p = Partition::default();
        let append = |n: u8| Op::Append {
            list: "l".into(),
            items: (0..n).map(|i| vec![i]).collect(),
        };
        assert_eq!(run(&mut p, append(3), 0), OpResult::Appended(0));
        assert_eq!(run(&mut p, append(2), 0), OpResult::Appended(3));
        let range = |from, limit| Op::Range {
            list: "l".into(),
            from,
            limit,
        };
        assert_eq!(
            run(&mut p, range(2, 2), 0),
            OpResult::Items(2, vec![vec![2], vec![0]])
        );
        assert_eq!(
            run(
                &mut p,
                Op::TrimPrefix {
                    list: "l".into(),
                    upto: 2
                },
                0
            ),
            OpResult::Bounds(2, 5)
        );
        assert_eq!(
            run(&mut p, range(0, 100), 0),
            OpResult::Items(2, vec![vec![2], vec![0], vec![1]])
        );
        // From before the start: a page from the start, as long as asked.
        assert_eq!(
            run(&mut p, range(0, 2), 0),
            OpResult::Items(2, vec![vec![2], vec![0]])
        );
        assert_eq!(
            run(&mut p, Op::Len { list: "l".into() }, 0),
            OpResult::Bounds(2, 5)
        );
        assert_eq!(run(&mut p, range(3, 0), 0), OpResult::Items(3, vec![]));
        // From past the end (or the end of a list trimmed whole): nothing, not a panic.
        assert_eq!(run(&mut p, range(9, 11), 0), OpResult::Items(9, vec![]));
        let trim = |upto| Op::TrimPrefix {
            list: "l".into(),
            upto,
        };
        assert_eq!(run(&mut p, trim(7), 0), OpResult::Bounds(7, 7));
        assert_eq!(run(&mut p, range(7, 2), 0), OpResult::Items(7, vec![]));
        assert_eq!(run(&mut p, range(8, 1), 0), OpResult::Items(8, vec![]));
        assert_eq!(run(&mut p, range(0, 9), 0), OpResult::Items(7, vec![]));
    }

    /// `AppendAt` applies at the list's end, re-applies items that already landed there
    /// (adding no bytes, so a full member still takes the retry), and refuses anything else
    /// with the end: other items, an index past the end (empty items too) or before it.
    #[test]
    fn append_at_is_retry_safe_and_refuses_gaps() {
        let mut p = Partition::default();
        let at = |index: u64, items: &[u8]| Op::AppendAt {
            list: "l".into(),
            index,
            items: items.iter().map(|b| vec![*b; 10]).collect(),
        };
        assert_eq!(run(&mut p, at(0, &[1, 2]), 0), OpResult::Appended(0));
        let before = p.usage();
        let (r, m) = p.plan(at(0, &[1, 2]), 0).unwrap();
        assert_eq!(r, OpResult::Appended(0), "a landed retry is answered again");
        let m = m.expect("and replicated again");
        assert_eq!(p.growth(&m), 0, "adding nothing");
        p.apply(m);
        assert_eq!(p.usage(), before);
        for refused in [
            at(0, &[1, 3]),
            at(1, &[1]),
            at(3, &[]),
            at(5, &[1]),
            at(1, &[]),
        ] {
            assert_eq!(run(&mut p, refused, 0), OpResult::Conflict(2));
        }
        assert_eq!(run(&mut p, at(2, &[3]), 0), OpResult::Appended(2));
        assert_eq!(p.usage().list_items, 3);
    }

    #[test]
    fn mutations_are_idempotent_and_copies_rebuild_the_partition() {
        let mut p = Partition::default();
        for i in 0..50u8 {
            put(&mut p, &format!("k{i}"), "value");
        }
        let mut last = None;
        for _ in 0..20 {
            let (_, m) = p
                .plan(
                    Op::Append {
                        list: "log".into(),
                        items: vec![vec![7; 100]; 10],
                    },
                    0,
                )
                .unwrap();
            p.apply(m.clone().unwrap());
            last = m;
        }
        run(
            &mut p,
            Op::TrimPrefix {
                list: "log".into(),
                upto: 15,
            },
            0,
        );
        // Re-applying the last append changes nothing.
        let before = p.usage();
        p.apply(last.unwrap());
        assert_eq!(p.usage(), before);
        let mut replica = Partition::default();
        replica.apply(Mutation::MapSet {
            map: "stale".into(),
            key: b"x".to_vec(),
            value: b"y".to_vec(),
            version: 1,
            expires_ms: None,
        });
        for chunk in p.copy(1024) {
            for m in chunk {
                replica.apply(m);
            }
        }
        assert_eq!(replica.usage(), p.usage());
        for op in [
            Op::Len { list: "log".into() },
            Op::Range {
                list: "log".into(),
                from: 0,
                limit: 1000,
            },
            Op::Get {
                map: "m".into(),
                key: b"k7".to_vec(),
            },
            Op::Get {
                map: "stale".into(),
                key: b"x".to_vec(),
            },
        ] {
            assert_eq!(
                replica.plan(op.clone(), 0).unwrap(),
                p.plan(op.clone(), 0).unwrap(),
                "{op:?}"
            );
        }
    }

    /// A list held in append batches behaves as one flat sequence: random appends, replayed
    /// writes at earlier indices, writes past the end, trims inside and past batches, and
    /// ranges across batches agree with a plain vector, bytes and counts included.
    #[test]
    fn a_list_of_batches_behaves_as_one_sequence() {
        let mut p = Partition::default();
        // The model: first index held, and the items from there.
        let (mut start, mut model) = (0u64, Vec::<Vec<u8>>::new());
        // Whether a write made the list (it is charged from then on, even when empty).
        let mut made = false;
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for step in 0..2000u64 {
            let end = start + model.len() as u64;
            let items: Vec<Vec<u8>> = (0..next(5)).map(|i| vec![step as u8; i as usize]).collect();
            match next(4) {
                0 | 1 => {
                    // A write at the end, a replayed one before it, one past it (a gap), or
                    // one before the start (which replaces the list). An empty list starts
                    // where it is written.
                    let index = (end + 3).saturating_sub(next(model.len() as u64 + 8));
                    if model.is_empty() || index < start {
                        model.clear();
                        start = index;
                    }
                    let m = Mutation::ListSet {
                        list: "l".into(),
                        index,
                        items: items.clone(),
                    };
                    made = true;
                    let (before, growth) = (p.usage().list_bytes, p.growth(&m));
                    p.apply(m);
                    let added = p.usage().list_bytes - before;
                    assert_eq!(growth, added.max(0) as u64, "growth, step {step}");
                    model.truncate(index.min(end).saturating_sub(start) as usize);
                    model.resize((index - start) as usize, Vec::new());
                    model.extend(items);
                }
                2 => {
                    made = true;
                    let upto = start + next(model.len() as u64 + 3);
                    run(
                        &mut p,
                        Op::TrimPrefix {
                            list: "l".into(),
                            upto,
                        },
                        0,
                    );
                    let n = (upto.max(start) - start).min(model.len() as u64) as usize;
                    model.drain(..n);
                    start = start.max(upto);
                }
                _ => {
                    let from = start.saturating_sub(2) + next(model.len() as u64 + 4);
                    let limit = next(10);
                    let first = from.max(start);
                    let want: Vec<Vec<u8>> = model
                        .iter()
                        .skip((first - start) as usize)
                        .take(limit as usize)
                        .cloned()
                        .collect();
                    let range = Op::Range {
                        list: "l".into(),
                        from,
                        limit,
                    };
                    let got = run(&mut p, range, 0);
                    if from < start + model.len() as u64 {
                        assert_eq!(got, OpResult::Items(first, want), "step {step}");
                    } else {
                        assert_eq!(got, OpResult::Items(from, Vec::new()), "step {step}");
                    }
                }
            }
            let len = Op::Len { list: "l".into() };
            let bounds = OpResult::Bounds(start, start + model.len() as u64);
            assert_eq!(run(&mut p, len, 0), bounds, "step {step}");
            let bytes: i64 = model.iter().map(|i| item_bytes(i)).sum();
            let list = list_bytes("l") * i64::from(made);
            assert_eq!(p.usage().list_bytes, list + bytes, "step {step}");
            assert_eq!(p.usage().list_items, model.len() as i64, "step {step}");
        }
    }

    /// A list trimmed up to the last index takes no items that would run past it.
    #[test]
    fn list_indices_never_overflow() {
        let mut p = Partition::default();
        let trim = Op::TrimPrefix {
            list: "l".into(),
            upto: u64::MAX,
        };
        assert_eq!(run(&mut p, trim, 0), OpResult::Bounds(u64::MAX, u64::MAX));
        let append = Op::Append {
            list: "l".into(),
            items: vec![vec![1]],
        };
        assert!(matches!(p.plan(append, 0), Err(Failure::Invalid(_))));
        let overflowing = Mutation::ListSet {
            list: "l".into(),
            index: u64::MAX - 1,
            items: vec![vec![1]; 2],
        };
        assert!(check(&overflowing).is_err());
        let empty = Op::Append {
            list: "l".into(),
            items: vec![],
        };
        assert_eq!(run(&mut p, empty, 0), OpResult::Appended(u64::MAX));
    }

    /// An entry at the last version (only a forged replica write gets there) refuses writes
    /// instead of wrapping its version.
    #[test]
    fn entry_versions_never_overflow() {
        let mut p = Partition::default();
        p.apply(Mutation::MapSet {
            map: "m".into(),
            key: b"k".to_vec(),
            value: b"v".to_vec(),
            version: u64::MAX,
            expires_ms: None,
        });
        let put = Op::Put {
            map: "m".into(),
            key: b"k".to_vec(),
            value: b"w".to_vec(),
            ttl_ms: None,
        };
        assert!(matches!(p.plan(put, 0), Err(Failure::Invalid(_))));
        let cas = Op::PutIfVersion {
            map: "m".into(),
            key: b"k".to_vec(),
            value: b"w".to_vec(),
            version: u64::MAX,
        };
        assert!(matches!(p.plan(cas, 0), Err(Failure::Invalid(_))));
    }
}
