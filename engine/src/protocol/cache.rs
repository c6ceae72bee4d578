//! The distributed cache's messages: client <-> node, primary -> backup, and the partition
//! table the job manager pushes to every member.
//!
//! Every cache connection carries [`CacheMsg`] frames: requests with an id, answered by a
//! response with the same id, in any order. The same conversation serves routing clients
//! (operations), primaries replicating to backups (mutations), and anyone asking for the
//! table or listing keys.

use crate::ids::TaskManagerId;

/// One member of the cache: a task manager and the address of its cache node.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Member {
    /// The task manager.
    pub id: TaskManagerId,
    /// `host:port` of its cache node.
    pub addr: String,
}

/// Who owns which partition, as decided by the membership master (the job manager).
///
/// `owners[p]` lists indices into `members`, primary first, then backups. `versions[p]`
/// changes whenever `owners[p]` does: a request names the version it routed by, and a node
/// serves it only when it agrees, so a stale client is redirected, never served wrongly.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct PartitionTable {
    /// Increases with every change of the table; members keep only the newest.
    pub epoch: u64,
    /// Live members.
    pub members: Vec<Member>,
    /// Per partition: member indices, primary first. Empty while a partition has no owner.
    pub owners: Vec<Vec<u16>>,
    /// Per partition: the epoch at which its owners last changed.
    pub versions: Vec<u64>,
    /// Partitions whose every copy was lost, with the epoch of the loss, in partition order.
    /// Operations on them by a writer whose entries date from before the loss fail with
    /// [`Failure::Lost`] instead of answering from an empty partition; members drop what
    /// they hold of a partition written before its loss.
    pub lost: Vec<(u32, u64)>,
    /// Backups per partition the master aims for.
    pub backup_count: u32,
}

/// A cache operation, addressed to the primary of its key's partition.
#[derive(Clone, Debug, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum Op {
    /// Value and version of a map entry.
    Get {
        /// Map name.
        map: String,
        /// Entry key.
        key: Vec<u8>,
    },
    /// Sets a map entry; answers the new version.
    Put {
        /// Map name.
        map: String,
        /// Entry key.
        key: Vec<u8>,
        /// New value.
        value: Vec<u8>,
        /// Time to live in ms (none: until deleted).
        ttl_ms: Option<u64>,
    },
    /// Sets a map entry only if its version is `version` (0: only if absent).
    PutIfVersion {
        /// Map name.
        map: String,
        /// Entry key.
        key: Vec<u8>,
        /// New value.
        value: Vec<u8>,
        /// Expected current version.
        version: u64,
    },
    /// Removes a map entry.
    Delete {
        /// Map name.
        map: String,
        /// Entry key.
        key: Vec<u8>,
    },
    /// Appends items to a list; answers the index of the first.
    Append {
        /// List name.
        list: String,
        /// Items, in order.
        items: Vec<Vec<u8>>,
    },
    /// Up to `limit` items from index `from`, or from the list's start when it was trimmed
    /// past `from` (so a reader that does not know where a list starts pages it from 0
    /// without a round trip to ask).
    Range {
        /// List name.
        list: String,
        /// First index wanted.
        from: u64,
        /// Most items answered.
        limit: u64,
    },
    /// Drops items before `upto`.
    TrimPrefix {
        /// List name.
        list: String,
        /// New first index.
        upto: u64,
    },
    /// The list's first retained index and its length (next index).
    Len {
        /// List name.
        list: String,
    },
    /// Appends items at `index`: the single writer's append, safe to retry. Applied when
    /// the list ends at `index`; when it ends at `index + items.len()` with these items (an
    /// earlier attempt landed on the primary), they are replicated again without change, so
    /// the answer always means every replica holds them. Otherwise refused with
    /// [`OpResult::Conflict`] and the list's end. Answers `index`.
    AppendAt {
        /// List name.
        list: String,
        /// Index of the first item.
        index: u64,
        /// Items, in order.
        items: Vec<Vec<u8>>,
    },
}

/// The answer to one [`Op`].
#[derive(Clone, Debug, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum OpResult {
    /// `Get`: the value and its version, if present.
    Value(Option<(Vec<u8>, u64)>),
    /// `Put`, `PutIfVersion`: the entry's version now.
    Version(u64),
    /// `PutIfVersion` refused: the entry's current version (0: absent). `AppendAt`
    /// refused: the list's end.
    Conflict(u64),
    /// `Delete`: whether an entry was removed.
    Deleted(bool),
    /// `Append`, `AppendAt`: the index of the first appended item.
    Appended(u64),
    /// `Range`: the first index returned and the items.
    Items(u64, Vec<Vec<u8>>),
    /// `Len`, `TrimPrefix`: first retained index and next index.
    Bounds(u64, u64),
    /// The operation was not applied, or its outcome is unknown (see [`Failure`]).
    Failed(Failure),
}

/// Why an operation failed.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum Failure {
    /// The node is not the partition's primary at the caller's version; not applied. The
    /// response carries the node's table when it is newer.
    Moved,
    /// The node has not seen the caller's (newer) table yet; not applied, retry shortly.
    Behind,
    /// The member is over its memory limit; not applied. Callers back off and retry.
    Full {
        /// Bytes held.
        used: u64,
        /// The limit.
        limit: u64,
    },
    /// Every copy of the partition was lost.
    Lost {
        /// The partition.
        partition: u32,
    },
    /// Applied on the primary, but a backup is over its memory limit and refused it: not
    /// acknowledged, and retried like [`Failure::Full`] (a retry of the same operation finds
    /// its own write on the primary and replicates it again).
    BackupFull {
        /// The backup's address.
        backup: String,
        /// Bytes it holds.
        used: u64,
        /// Its limit.
        limit: u64,
    },
    /// Applied on the primary, but a backup did not confirm: the write may or may not
    /// survive a failure. Never counts as acknowledged.
    Replication(String),
    /// The request is malformed.
    Invalid(String),
}

/// Absolute state changes a primary sends to its backups. Applying one twice, or applying
/// one that a replica already has, gives the same state.
#[derive(Clone, Debug, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum Mutation {
    /// Empty the partition (the start of a full copy).
    Clear,
    /// Set a map entry with this version.
    MapSet {
        /// Map name.
        map: String,
        /// Entry key.
        key: Vec<u8>,
        /// Value.
        value: Vec<u8>,
        /// Version.
        version: u64,
        /// Expiry (ms since the epoch).
        expires_ms: Option<u64>,
    },
    /// Remove a map entry.
    MapRemove {
        /// Map name.
        map: String,
        /// Entry key.
        key: Vec<u8>,
    },
    /// Truncate the list to `index`, then append `items` (so the list ends at
    /// `index + items.len()`).
    ListSet {
        /// List name.
        list: String,
        /// Index of the first item.
        index: u64,
        /// Items.
        items: Vec<Vec<u8>>,
    },
    /// Drop list items before `upto` (creating an empty list starting there if absent).
    ListTrim {
        /// List name.
        list: String,
        /// New first index.
        upto: u64,
    },
}

/// A request on a cache connection.
#[derive(Clone, Debug, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum Request {
    /// Operations, each with the partition and the partition version it was routed by.
    Ops {
        /// The table epoch the writer's entries date from (a DCAS deployment's start; 0:
        /// any time): an operation on a partition that lost every copy after it fails with
        /// [`Failure::Lost`], since some of those entries may be gone; a loss at or before
        /// it took none of them.
        since: u64,
        /// `(partition, version, op)`.
        ops: Vec<(u32, u64, Op)>,
    },
    /// From a primary: apply these mutations of `partition`, routed at `version`.
    Replicate {
        /// The partition.
        partition: u32,
        /// Its version in the sender's table.
        version: u64,
        /// The epoch at which it lost every copy in the sender's table, if it did: a
        /// replica that has not seen that table yet drops what it held from before.
        loss: Option<u64>,
        /// The changes, in order.
        mutations: Vec<Mutation>,
    },
    /// The node's partition table.
    Table,
    /// Keys held as primary whose map-qualified name starts with `prefix`, after `after`.
    Keys {
        /// Prefix of `map/key` (keys shown lossily as UTF-8).
        prefix: String,
        /// Resume after this name.
        after: Option<String>,
        /// At most this many.
        limit: u32,
    },
    /// Remove every map and list whose name starts with `prefix` from every partition the
    /// node holds, as primary or backup (a finished job's entries). Not empty.
    DropPrefix {
        /// Name prefix.
        prefix: String,
    },
}

/// A response on a cache connection.
#[derive(Clone, Debug, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum Response {
    /// One result per operation, and the node's table when the caller's was stale.
    Ops(Vec<OpResult>, Option<PartitionTable>),
    /// Mutations applied, or why not.
    Replicated(Result<(), Failure>),
    /// The node's table (none before the first push).
    Table(Option<PartitionTable>),
    /// `(name, bytes)` in name order.
    Keys(Vec<(String, u64)>),
    /// The request could not be served at all.
    Error(Failure),
    /// `DropPrefix`: bytes freed.
    Dropped(u64),
}

/// One frame of a cache connection.
#[derive(Clone, Debug, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum CacheMsg {
    /// A request; answered by a response with the same id.
    Request(u64, Request),
    /// The response to request `id`.
    Response(u64, Response),
}

/// A member's memory and contents, reported in heartbeats.
#[derive(
    Clone,
    Debug,
    Default,
    PartialEq,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
    serde::Serialize,
)]
pub struct CacheStats {
    /// Bytes held (keys, values, list items, with per-entry overhead).
    pub bytes: u64,
    /// The configured limit.
    pub limit: u64,
    /// Bytes in maps.
    pub map_bytes: u64,
    /// Bytes in lists.
    pub list_bytes: u64,
    /// Map entries.
    pub map_entries: u64,
    /// List items.
    pub list_items: u64,
    /// Operations served as primary.
    pub ops: u64,
    /// Mutations applied as backup.
    pub replicated: u64,
    /// Writes refused because the member was full.
    pub full_rejections: u64,
    /// Service-time histogram of operations (bucket upper bounds in `LATENCY_BUCKETS_US`).
    pub latency_us: Vec<u64>,
}

/// Upper bounds (µs) of the latency histogram buckets in [`CacheStats::latency_us`]; the
/// last bucket counts everything slower.
pub const LATENCY_BUCKETS_US: [u64; 12] = [
    25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 100_000, 1_000_000,
];
