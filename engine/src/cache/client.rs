//! The routing client: sends each operation to its partition's primary, follows table
//! changes, and retries only what it knows was not applied.
//!
//! Reads are retried until the deadline whatever happened (they change nothing). Writes are
//! retried when the node refused them before applying (`Moved`, `Behind`) or the request
//! never left (`NotSent`); when a connection breaks after the request may have arrived, or a
//! backup did not confirm, the write fails with an error that says its outcome is unknown.
//! So a write either returned `Ok` (it is on the primary and every live backup) or an error.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures::future::join_all;

use super::conn::{Conn, ConnError};
use super::table::{list_partition, map_partition};
use crate::ids::TaskManagerId;
use crate::protocol::cache::{Failure, Op, OpResult, PartitionTable, Request, Response};

/// Default time an operation may take, retries included.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why an operation failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CacheError {
    /// A member holding the partition is over its memory limit: the primary (nothing was
    /// written) or a backup (the primary applied it, unacknowledged). Retrying the same
    /// operation is safe either way: a plain `Append` refused by a backup, whose retry
    /// would append its items again, is answered [`CacheError::Unacknowledged`] instead.
    #[error("cache full on {member}: {used} of {limit} bytes used")]
    Full {
        /// The member's address.
        member: String,
        /// Bytes held.
        used: u64,
        /// Its limit.
        limit: u64,
    },
    /// Every copy of the partition was lost.
    #[error("cache partition {partition} {}", LOST_EVERY_COPY)]
    Lost {
        /// The partition.
        partition: u32,
    },
    /// The write may or may not have been applied (a connection broke, or a backup did not
    /// confirm); it was not acknowledged.
    #[error("write outcome unknown: {0}")]
    Unacknowledged(String),
    /// No answer within the deadline.
    #[error("cache operation timed out after {0} ms: {1}")]
    Timeout(u64, String),
    /// The request is invalid.
    #[error("invalid cache request: {0}")]
    Invalid(String),
    /// No member is known.
    #[error("no cache member reachable: {0}")]
    NoMembers(String),
}

/// How [`CacheError::Lost`] reads: a failure message containing it (a subtask's, which
/// reaches the job manager as text) means data is gone.
pub const LOST_EVERY_COPY: &str = "lost every copy";

/// A routing client. Cheap to clone; all clones share table and connections.
#[derive(Clone)]
pub struct CacheClient {
    inner: Arc<Inner>,
    /// The table epoch this client's entries date from (see [`CacheClient::since`]).
    since: u64,
}

struct Inner {
    table: RwLock<Arc<PartitionTable>>,
    /// The epoch of `table`, for retries waiting for a newer one.
    epoch: tokio::sync::watch::Sender<u64>,
    conns: Mutex<HashMap<String, Conn>>,
    timeout: Duration,
}

fn is_read(op: &Op) -> bool {
    matches!(op, Op::Get { .. } | Op::Range { .. } | Op::Len { .. })
}

impl CacheClient {
    /// A client starting from `table`.
    pub fn new(table: PartitionTable, timeout: Duration) -> CacheClient {
        CacheClient {
            inner: Arc::new(Inner {
                epoch: tokio::sync::watch::Sender::new(table.epoch),
                table: RwLock::new(Arc::new(table)),
                conns: Mutex::new(HashMap::new()),
                timeout,
            }),
            since: 0,
        }
    }

    /// The same client (table and connections shared) for a writer whose entries all date
    /// from table epoch `epoch` or later, such as a DCAS deployment that started then under
    /// names of its own: partitions that lost every copy at or before `epoch` serve it (what
    /// they held then is gone from every member, none of it the writer's); only a later loss
    /// fails its operations with [`CacheError::Lost`]. A client from [`CacheClient::new`]
    /// dates from epoch 0: every recorded loss fails it.
    pub fn since(&self, epoch: u64) -> CacheClient {
        CacheClient {
            inner: self.inner.clone(),
            since: epoch,
        }
    }

    /// Fetches the table from the first of `seeds` (cache node addresses) that answers.
    pub async fn connect(seeds: &[String], timeout: Duration) -> Result<CacheClient, CacheError> {
        let deadline = Instant::now() + timeout;
        let mut last = "no seed addresses given".to_string();
        while Instant::now() < deadline {
            for seed in seeds {
                let conn = Conn::open(seed, Duration::from_secs(2));
                match conn.call(Request::Table, Duration::from_secs(2)).await {
                    Ok(Response::Table(Some(t))) => {
                        let client = CacheClient::new(t, timeout);
                        client.conns().insert(seed.clone(), conn);
                        return Ok(client);
                    }
                    Ok(Response::Table(None)) => last = format!("{seed} has no table yet"),
                    Ok(other) => last = format!("{seed} answered {other:?}"),
                    Err(e) => last = e.to_string(),
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(CacheError::NoMembers(last))
    }

    fn conns(&self) -> std::sync::MutexGuard<'_, HashMap<String, Conn>> {
        self.inner.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The table the client routes by.
    pub fn table(&self) -> Arc<PartitionTable> {
        self.inner
            .table
            .read()
            .map(|t| t.clone())
            .unwrap_or_else(|e| e.into_inner().clone())
    }

    /// Adopts `table` if it is newer.
    pub fn update_table(&self, table: PartitionTable) {
        let epoch = table.epoch;
        {
            let mut t = self.inner.table.write().unwrap_or_else(|e| e.into_inner());
            if epoch <= t.epoch {
                return;
            }
            *t = Arc::new(table);
        }
        self.inner.epoch.send_if_modified(|e| {
            let newer = epoch > *e;
            *e = (*e).max(epoch);
            newer
        });
    }

    /// Waits until the client routes by a table newer than `epoch`, or for `max`. A retry
    /// after a member's loss waits for this rather than a fixed pause: the new table
    /// (backups promoted) arrives within milliseconds of the loss, and every write of a
    /// partition the lost member held waits for it, the DCAS logs of running subtasks
    /// among them.
    pub async fn table_after(&self, epoch: u64, max: Duration) {
        let mut rx = self.inner.epoch.subscribe();
        let _ = tokio::time::timeout(max, rx.wait_for(|&e| e > epoch)).await;
    }

    fn conn(&self, addr: &str) -> Conn {
        let mut conns = self.conns();
        match conns.get(addr) {
            Some(c) if !c.is_dead() => c.clone(),
            _ => {
                let c = Conn::open(addr, Duration::from_secs(2));
                conns.insert(addr.to_string(), c.clone());
                c
            }
        }
    }

    /// Asks the members for a newer table (after a failure to reach a primary).
    async fn refresh(&self) {
        let table = self.table();
        for m in &table.members {
            if let Ok(Response::Table(Some(t))) = self
                .conn(&m.addr)
                .call(Request::Table, Duration::from_millis(500))
                .await
            {
                if t.epoch > table.epoch {
                    self.update_table(t);
                    return;
                }
            }
        }
    }

    /// The partition of map entry `key`.
    pub fn map_partition(&self, map: &str, key: &[u8]) -> u32 {
        map_partition(map, key, self.table().partitions().max(1))
    }

    /// The partition of list `list`.
    pub fn list_partition(&self, list: &str) -> u32 {
        list_partition(list, self.table().partitions().max(1))
    }

    /// A placement hint: a partition for `name` whose primary, in the current table, is not
    /// `avoid` (DCAS keeps a task's log off its own task manager). Deterministic for a given
    /// table; callers remember the partition they got.
    pub fn partition_avoiding(&self, name: &str, avoid: TaskManagerId) -> u32 {
        let table = self.table();
        let n = table.partitions().max(1);
        let first = list_partition(name, n);
        (0..n)
            .map(|i| (first + i) % n)
            .find(|p| {
                !table.lost_after(*p, self.since)
                    && table.primary(*p).is_some_and(|m| m.id != avoid)
            })
            .unwrap_or(first)
    }

    /// Runs operations, each on the given partition, grouping them per primary into one
    /// request each. Results are in the order of `ops`.
    pub async fn run(&self, ops: Vec<(u32, Op)>) -> Vec<Result<OpResult, CacheError>> {
        let deadline = Instant::now() + self.inner.timeout;
        let mut results: Vec<Option<Result<OpResult, CacheError>>> = vec![None; ops.len()];
        let mut backoff = Duration::from_millis(2);
        let mut last = String::new();
        loop {
            let pending: Vec<usize> = (0..ops.len()).filter(|i| results[*i].is_none()).collect();
            if pending.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                for i in pending {
                    results[i] = Some(Err(CacheError::Timeout(
                        self.inner.timeout.as_millis() as u64,
                        last.clone(),
                    )));
                }
                break;
            }
            let table = self.table();
            let mut groups: HashMap<String, Vec<usize>> = HashMap::new();
            for i in pending {
                // Losses are the node's to report: its table may say they were cleared.
                let p = ops[i].0;
                match table.primary(p) {
                    Some(m) => groups.entry(m.addr.clone()).or_default().push(i),
                    None if p >= table.partitions() => {
                        results[i] = Some(Err(CacheError::Invalid(format!(
                            "partition {p} does not exist"
                        ))))
                    }
                    None => last = format!("partition {p} has no primary"),
                }
            }
            let calls = groups.into_iter().map(|(addr, idx)| {
                let req = Request::Ops {
                    since: self.since,
                    ops: idx
                        .iter()
                        .map(|i| (ops[*i].0, table.version(ops[*i].0), ops[*i].1.clone()))
                        .collect(),
                };
                let conn = self.conn(&addr);
                let timeout = deadline.saturating_duration_since(Instant::now());
                async move { (addr, idx, conn.call(req, timeout).await) }
            });
            for (addr, idx, outcome) in join_all(calls).await {
                match outcome {
                    Ok(Response::Ops(res, newer)) if res.len() == idx.len() => {
                        if let Some(t) = newer {
                            self.update_table(t);
                        }
                        for (i, r) in idx.into_iter().zip(res) {
                            match r {
                                OpResult::Failed(Failure::Moved) => {
                                    last = format!("{addr} no longer owns partition {}", ops[i].0);
                                }
                                OpResult::Failed(Failure::Behind) => {
                                    last = format!("{addr} has an older table");
                                }
                                OpResult::Failed(Failure::Full { used, limit }) => {
                                    results[i] = Some(Err(CacheError::Full {
                                        member: addr.clone(),
                                        used,
                                        limit,
                                    }))
                                }
                                OpResult::Failed(Failure::BackupFull {
                                    backup,
                                    used,
                                    limit,
                                }) => {
                                    // A plain append may have landed on the primary: retrying
                                    // it would append twice, so its outcome is unknown.
                                    let error = if matches!(ops[i].1, Op::Append { .. }) {
                                        CacheError::Unacknowledged(format!(
                                            "backup {backup} is full ({used} of {limit} bytes used)"
                                        ))
                                    } else {
                                        CacheError::Full {
                                            member: backup,
                                            used,
                                            limit,
                                        }
                                    };
                                    results[i] = Some(Err(error))
                                }
                                OpResult::Failed(Failure::Lost { partition }) => {
                                    results[i] = Some(Err(CacheError::Lost { partition }))
                                }
                                OpResult::Failed(Failure::Replication(why)) => {
                                    results[i] = Some(Err(CacheError::Unacknowledged(why)))
                                }
                                OpResult::Failed(Failure::Invalid(why)) => {
                                    results[i] = Some(Err(CacheError::Invalid(why)))
                                }
                                ok => results[i] = Some(Ok(ok)),
                            }
                        }
                    }
                    Ok(other) => {
                        for i in idx {
                            results[i] = Some(Err(CacheError::Invalid(format!(
                                "{addr} answered {other:?}"
                            ))));
                        }
                    }
                    Err(e) => {
                        last = e.to_string();
                        for i in idx {
                            if matches!(e, ConnError::Lost(_)) && !is_read(&ops[i].1) {
                                results[i] =
                                    Some(Err(CacheError::Unacknowledged(format!("{addr}: {e}"))));
                            }
                        }
                        self.refresh().await;
                    }
                }
            }
            // What is left is retried once the table changes (a newer one came with a
            // refusal, or arrives from the master), or after the backoff. Writes whose
            // outcome is unknown are already answered: the caller decides.
            if results.iter().any(Option::is_none) {
                let backoff_us = backoff.as_micros() as u64;
                tracing::debug!(reason = %last, backoff_us, "Cache operation retried.");
                self.table_after(table.epoch, backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(100));
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(CacheError::Timeout(0, "no result".into()))))
            .collect()
    }

    async fn one(&self, p: u32, op: Op) -> Result<OpResult, CacheError> {
        self.run(vec![(p, op)])
            .await
            .pop()
            .unwrap_or_else(|| Err(CacheError::Invalid("no result".into())))
    }

    /// A map entry's value and version.
    pub async fn get(&self, map: &str, key: &[u8]) -> Result<Option<(Vec<u8>, u64)>, CacheError> {
        self.get_in(self.map_partition(map, key), map, key).await
    }

    /// A map entry's value and version, the entry living in partition `p` (placed there
    /// with [`CacheClient::put_in`]).
    pub async fn get_in(
        &self,
        p: u32,
        map: &str,
        key: &[u8],
    ) -> Result<Option<(Vec<u8>, u64)>, CacheError> {
        match self
            .one(
                p,
                Op::Get {
                    map: map.into(),
                    key: key.into(),
                },
            )
            .await?
        {
            OpResult::Value(v) => Ok(v),
            other => Err(unexpected(other)),
        }
    }

    /// Many entries of one map, one request per primary; results in order.
    pub async fn get_many(
        &self,
        map: &str,
        keys: Vec<Vec<u8>>,
    ) -> Vec<Result<Option<(Vec<u8>, u64)>, CacheError>> {
        let ops = keys
            .into_iter()
            .map(|key| {
                (
                    self.map_partition(map, &key),
                    Op::Get {
                        map: map.into(),
                        key,
                    },
                )
            })
            .collect();
        self.run(ops)
            .await
            .into_iter()
            .map(|r| match r? {
                OpResult::Value(v) => Ok(v),
                other => Err(unexpected(other)),
            })
            .collect()
    }

    /// Sets a map entry (with an optional time to live); returns its new version.
    pub async fn put(
        &self,
        map: &str,
        key: &[u8],
        value: Vec<u8>,
        ttl: Option<Duration>,
    ) -> Result<u64, CacheError> {
        self.put_in(self.map_partition(map, key), map, key, value, ttl)
            .await
    }

    /// Sets a map entry in partition `p` instead of its key's (a placement hint, e.g. from
    /// [`CacheClient::partition_avoiding`]); read it with [`CacheClient::get_in`].
    pub async fn put_in(
        &self,
        p: u32,
        map: &str,
        key: &[u8],
        value: Vec<u8>,
        ttl: Option<Duration>,
    ) -> Result<u64, CacheError> {
        let op = Op::Put {
            map: map.into(),
            key: key.into(),
            value,
            ttl_ms: ttl.map(|t| t.as_millis() as u64),
        };
        match self.one(p, op).await? {
            OpResult::Version(v) => Ok(v),
            other => Err(unexpected(other)),
        }
    }

    /// Sets many entries of one map, one request per primary; results in order.
    pub async fn put_many(
        &self,
        map: &str,
        entries: Vec<(Vec<u8>, Vec<u8>)>,
    ) -> Vec<Result<u64, CacheError>> {
        let ops = entries
            .into_iter()
            .map(|(key, value)| {
                (
                    self.map_partition(map, &key),
                    Op::Put {
                        map: map.into(),
                        key,
                        value,
                        ttl_ms: None,
                    },
                )
            })
            .collect();
        self.run(ops)
            .await
            .into_iter()
            .map(|r| match r? {
                OpResult::Version(v) => Ok(v),
                other => Err(unexpected(other)),
            })
            .collect()
    }

    /// Sets an entry only if its version is `version` (0: only if absent). `Ok(Ok(v))` is
    /// the new version, `Ok(Err(current))` a conflict with the current version. A retry
    /// finding the entry one version on and holding `value` (its own first attempt, not
    /// acknowledged) succeeds, and replicates it again.
    pub async fn put_if_version(
        &self,
        map: &str,
        key: &[u8],
        value: Vec<u8>,
        version: u64,
    ) -> Result<Result<u64, u64>, CacheError> {
        self.put_if_version_in(self.map_partition(map, key), map, key, value, version)
            .await
    }

    /// [`CacheClient::put_if_version`] in partition `p` (as [`CacheClient::put_in`]).
    pub async fn put_if_version_in(
        &self,
        p: u32,
        map: &str,
        key: &[u8],
        value: Vec<u8>,
        version: u64,
    ) -> Result<Result<u64, u64>, CacheError> {
        let op = Op::PutIfVersion {
            map: map.into(),
            key: key.into(),
            value,
            version,
        };
        match self.one(p, op).await? {
            OpResult::Version(v) => Ok(Ok(v)),
            OpResult::Conflict(v) => Ok(Err(v)),
            other => Err(unexpected(other)),
        }
    }

    /// Removes a map entry; whether it existed.
    pub async fn delete(&self, map: &str, key: &[u8]) -> Result<bool, CacheError> {
        let p = self.map_partition(map, key);
        let op = Op::Delete {
            map: map.into(),
            key: key.into(),
        };
        match self.one(p, op).await? {
            OpResult::Deleted(d) => Ok(d),
            other => Err(unexpected(other)),
        }
    }

    /// Appends a batch to list `list` in partition `p`; returns the first item's index.
    pub async fn append(&self, p: u32, list: &str, items: Vec<Vec<u8>>) -> Result<u64, CacheError> {
        let op = Op::Append {
            list: list.into(),
            items,
        };
        match self.one(p, op).await? {
            OpResult::Appended(i) => Ok(i),
            other => Err(unexpected(other)),
        }
    }

    /// Appends a batch to list `list` in partition `p` at `index`
    /// ([`Op::AppendAt`]: retrying it after an unacknowledged attempt is safe); `Ok(index)`,
    /// or `Err(end)` when the list ends elsewhere.
    pub async fn append_at(
        &self,
        p: u32,
        list: &str,
        index: u64,
        items: Vec<Vec<u8>>,
    ) -> Result<Result<u64, u64>, CacheError> {
        let op = Op::AppendAt {
            list: list.into(),
            index,
            items,
        };
        match self.one(p, op).await? {
            OpResult::Appended(i) => Ok(Ok(i)),
            OpResult::Conflict(end) => Ok(Err(end)),
            other => Err(unexpected(other)),
        }
    }

    /// Up to `limit` items of list `list` in partition `p` from index `from`, or from the
    /// list's start when it was trimmed past `from`: the first index returned and the
    /// items (fewer when the list ends first).
    pub async fn range(
        &self,
        p: u32,
        list: &str,
        from: u64,
        limit: u64,
    ) -> Result<(u64, Vec<Vec<u8>>), CacheError> {
        let op = Op::Range {
            list: list.into(),
            from,
            limit,
        };
        match self.one(p, op).await? {
            OpResult::Items(first, items) => Ok((first, items)),
            other => Err(unexpected(other)),
        }
    }

    /// Drops items before `upto`; returns (first retained index, next index).
    pub async fn trim_prefix(
        &self,
        p: u32,
        list: &str,
        upto: u64,
    ) -> Result<(u64, u64), CacheError> {
        let op = Op::TrimPrefix {
            list: list.into(),
            upto,
        };
        match self.one(p, op).await? {
            OpResult::Bounds(a, b) => Ok((a, b)),
            other => Err(unexpected(other)),
        }
    }

    /// (first retained index, next index) of a list.
    pub async fn len(&self, p: u32, list: &str) -> Result<(u64, u64), CacheError> {
        match self.one(p, Op::Len { list: list.into() }).await? {
            OpResult::Bounds(a, b) => Ok((a, b)),
            other => Err(unexpected(other)),
        }
    }

    /// Entry names starting with `prefix`, with sizes, from every member's primaries,
    /// in name order, at most `limit` after `after`.
    pub async fn keys(
        &self,
        prefix: &str,
        after: Option<String>,
        limit: u32,
    ) -> Result<Vec<(String, u64)>, CacheError> {
        let req = Request::Keys {
            prefix: prefix.into(),
            after,
            limit,
        };
        let mut out = Vec::new();
        for r in self.each_member(req).await {
            match r? {
                Response::Keys(k) => out.extend(k),
                other => return Err(CacheError::Invalid(format!("keys: {other:?}"))),
            }
        }
        out.sort();
        out.truncate(limit as usize);
        Ok(out)
    }

    /// Removes every map and list whose name starts with `prefix` from every member (its
    /// primaries and backups), for entries nobody writes any more (a finished job's).
    /// Returns the bytes freed. Members unreachable now keep their copies.
    pub async fn drop_prefix(&self, prefix: &str) -> Result<u64, CacheError> {
        if prefix.is_empty() {
            return Err(CacheError::Invalid(
                "dropping entries needs a non-empty prefix".into(),
            ));
        }
        let req = Request::DropPrefix {
            prefix: prefix.into(),
        };
        let mut freed = 0;
        for r in self.each_member(req).await {
            match r? {
                Response::Dropped(n) => freed += n,
                other => return Err(CacheError::Invalid(format!("drop: {other:?}"))),
            }
        }
        Ok(freed)
    }

    /// Sends `req` to every member of the table at once; their answers.
    async fn each_member(&self, req: Request) -> Vec<Result<Response, CacheError>> {
        let table = self.table();
        let calls = table.members.iter().map(|m| {
            let (conn, req) = (self.conn(&m.addr), req.clone());
            async move {
                conn.call(req, Duration::from_secs(5))
                    .await
                    .map_err(|e| CacheError::NoMembers(e.to_string()))
            }
        });
        join_all(calls).await
    }
}

fn unexpected(r: OpResult) -> CacheError {
    CacheError::Invalid(format!("unexpected answer {r:?}"))
}
