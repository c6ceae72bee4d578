//! ABS checkpoints in the job manager: the per-job `Coordinator` (when to trigger, which
//! acknowledgements are missing, when a checkpoint completes or expires) and the durable
//! `CheckpointStore` (sled) the state bytes and completion records go to.
//!
//! The coordinator is plain state driven by the dispatcher (its tick, acks, failures), so its
//! rules are unit-tested without actors. The store keeps, per job, the state blob of every
//! acknowledged subtask (`checkpoint_state`, key `job/id/task/subtask`, value
//! `crc32 ‖ rkyv(operators)`) and one JSON record per completed checkpoint
//! (`checkpoint_meta`, key `job/id`). Completion is written and flushed only after every
//! state blob of the checkpoint is in; the last three completed checkpoints of a job are
//! kept. Restore reads the newest completed checkpoint whose blobs all pass their checksum,
//! falling back to older ones and saying why.
//!
//! Invariant: a checkpoint counts as complete (and sinks are told to commit) only once its
//! metadata is durable; a restore never uses a blob whose checksum fails.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use engine::codec::{decode, encode};
use engine::ids::JobId;
use engine::protocol::control::{OperatorState, RestorePoint, SubtaskSnapshot};
use serde::{Deserialize, Serialize};

/// Completed checkpoints kept per job.
pub const RETAINED: usize = 3;

/// Checkpoints kept in the in-memory history shown over REST.
const HISTORY: usize = 50;

/// Lifecycle of a checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CheckpointStatus {
    /// Triggered, acknowledgements missing.
    InProgress,
    /// Every subtask acknowledged and the completion is durable.
    Completed,
    /// Expired or aborted (see `failure`).
    Failed,
}

/// What one task contributed to a checkpoint.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TaskCheckpointStats {
    /// Task index.
    pub task: u32,
    /// Subtasks that acknowledged.
    pub acknowledged: u32,
    /// State bytes of all its subtasks.
    pub state_bytes: u64,
    /// Longest alignment of its subtasks, µs (behind short queues it takes well under a
    /// millisecond).
    #[serde(default)] // records written before alignment was kept in µs
    pub alignment_us: u64,
    /// Longest synchronous state copy of its subtasks (ms).
    pub sync_ms: u64,
}

/// One checkpoint as REST and the store show it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CheckpointStats {
    /// Checkpoint id (increasing per job, across restarts).
    pub id: u64,
    /// State.
    pub status: CheckpointStatus,
    /// Triggered by the interval timer, a REST call, or the end of the input (`final`).
    pub trigger: String,
    /// Trigger time (ms since the epoch).
    pub trigger_ms: u64,
    /// Trigger to completion (or to now while in progress), ms.
    pub duration_ms: u64,
    /// Longest barrier alignment of any subtask, µs.
    #[serde(default)] // records written before alignment was kept in µs
    pub alignment_us: u64,
    /// Total state bytes.
    pub state_bytes: u64,
    /// Subtasks that acknowledged.
    pub acknowledged: u32,
    /// Subtasks that must acknowledge.
    pub total: u32,
    /// Per task.
    pub tasks: Vec<TaskCheckpointStats>,
    /// Why it failed.
    pub failure: Option<String>,
}

/// What the dispatcher must do after a coordinator call.
#[derive(Debug, PartialEq)]
pub enum Step {
    /// Tell the sources (or, for a final checkpoint, every subtask) to take checkpoint `id`.
    Trigger {
        /// The checkpoint.
        id: u64,
        /// The job's inputs all ended: every subtask snapshots, no barrier flows.
        final_: bool,
    },
    /// Every acknowledgement of `id` is in: persist it, then tell the sinks to commit.
    Complete(CheckpointStats),
    /// Checkpoint `id` failed (expired); its state blobs can go.
    Failed(u64),
}

struct Pending {
    stats: CheckpointStats,
    started: Instant,
    missing: BTreeSet<(u32, u32)>,
    final_: bool,
}

/// When and which checkpoints a job takes. Plain state; the dispatcher drives it.
pub struct Coordinator {
    interval: Duration,
    timeout: Duration,
    max_concurrent: usize,
    next_id: u64,
    last_trigger: Option<Instant>,
    pending: BTreeMap<u64, Pending>,
    history: VecDeque<CheckpointStats>,
    completed: u64,
    failed: u64,
    latest: Option<CheckpointStats>,
    /// (checkpoint, when) of the latest restore.
    restored: Option<(u64, u64)>,
}

impl Coordinator {
    /// A coordinator; ids start after `last_id` (the newest stored checkpoint).
    pub fn new(interval: Duration, timeout: Duration, max_concurrent: usize, last_id: u64) -> Self {
        Coordinator {
            interval,
            timeout,
            max_concurrent: max_concurrent.max(1),
            next_id: last_id + 1,
            last_trigger: None,
            pending: BTreeMap::new(),
            history: VecDeque::new(),
            completed: 0,
            failed: 0,
            latest: None,
            restored: None,
        }
    }

    /// Periodic work: expire overdue checkpoints, and trigger the next one when the interval
    /// passed and `running` (every subtask running) or `finishing` (every input ended).
    pub fn tick(
        &mut self,
        now_ms: u64,
        subtasks: &[(u32, u32)],
        running: bool,
        finishing: bool,
    ) -> Vec<Step> {
        let mut steps = Vec::new();
        let overdue: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.started.elapsed() > self.timeout)
            .map(|(id, _)| *id)
            .collect();
        for id in overdue {
            let missing = self.pending[&id].missing.len();
            let reason = format!(
                "expired after {} ms with {missing} subtask(s) not acknowledged",
                self.timeout.as_millis()
            );
            steps.push(self.fail(id, reason));
        }
        if finishing {
            // The final checkpoint replaces any barrier checkpoint still in flight: finished
            // sources will never send its barriers.
            let stale: Vec<u64> = self
                .pending
                .iter()
                .filter(|(_, p)| !p.final_)
                .map(|(id, _)| *id)
                .collect();
            for id in stale {
                steps.push(self.fail(id, "the job's inputs ended".into()));
            }
            if self.pending.is_empty() {
                steps.push(self.trigger(now_ms, subtasks, "final", true));
            }
        } else if running
            && self.pending.len() < self.max_concurrent
            && self
                .last_trigger
                .is_none_or(|t| t.elapsed() >= self.interval)
        {
            steps.push(self.trigger(now_ms, subtasks, "periodic", false));
        }
        steps
    }

    /// Starts checkpoint `next_id` (also the REST trigger); every subtask in `subtasks` must
    /// acknowledge it.
    pub fn trigger(
        &mut self,
        now_ms: u64,
        subtasks: &[(u32, u32)],
        why: &str,
        final_: bool,
    ) -> Step {
        let id = self.next_id;
        self.next_id += 1;
        self.last_trigger = Some(Instant::now());
        let stats = CheckpointStats {
            id,
            status: CheckpointStatus::InProgress,
            trigger: why.to_string(),
            trigger_ms: now_ms,
            duration_ms: 0,
            alignment_us: 0,
            state_bytes: 0,
            acknowledged: 0,
            total: subtasks.len() as u32,
            tasks: Vec::new(),
            failure: None,
        };
        self.pending.insert(
            id,
            Pending {
                stats,
                started: Instant::now(),
                missing: subtasks.iter().copied().collect(),
                final_,
            },
        );
        Step::Trigger { id, final_ }
    }

    /// Whether `id` is in flight and waits for (task, subtask).
    pub fn expects(&self, id: u64, task: u32, subtask: u32) -> bool {
        self.pending
            .get(&id)
            .is_some_and(|p| p.missing.contains(&(task, subtask)))
    }

    /// Records an acknowledgement (whose state is already stored); `Complete` when it was the
    /// last one.
    pub fn ack(
        &mut self,
        id: u64,
        task: u32,
        subtask: u32,
        bytes: u64,
        alignment_us: u64,
        sync_ms: u64,
    ) -> Option<Step> {
        let p = self.pending.get_mut(&id)?;
        if !p.missing.remove(&(task, subtask)) {
            return None;
        }
        let s = &mut p.stats;
        s.acknowledged += 1;
        s.state_bytes += bytes;
        s.alignment_us = s.alignment_us.max(alignment_us);
        let t = match s.tasks.iter().position(|t| t.task == task) {
            Some(i) => &mut s.tasks[i],
            None => {
                s.tasks.push(TaskCheckpointStats {
                    task,
                    ..Default::default()
                });
                s.tasks.sort_by_key(|t| t.task);
                let i = s.tasks.iter().position(|t| t.task == task)?;
                &mut s.tasks[i]
            }
        };
        t.acknowledged += 1;
        t.state_bytes += bytes;
        t.alignment_us = t.alignment_us.max(alignment_us);
        t.sync_ms = t.sync_ms.max(sync_ms);
        if !p.missing.is_empty() {
            return None;
        }
        let mut p = self.pending.remove(&id)?;
        p.stats.status = CheckpointStatus::Completed;
        p.stats.duration_ms = p.started.elapsed().as_millis() as u64;
        self.completed += 1;
        self.latest = Some(p.stats.clone());
        self.remember(p.stats.clone());
        // Older checkpoints still in flight are subsumed by this one.
        let older: Vec<u64> = self.pending.range(..id).map(|(i, _)| *i).collect();
        for i in older {
            self.fail(i, format!("subsumed by checkpoint {id}"));
        }
        Some(Step::Complete(p.stats))
    }

    /// Fails every checkpoint in flight (the job is restarting or ending); their ids.
    pub fn abort_all(&mut self, reason: &str) -> Vec<u64> {
        let ids: Vec<u64> = self.pending.keys().copied().collect();
        for id in &ids {
            self.fail(*id, reason.to_string());
        }
        ids
    }

    /// The newest checkpoint triggered (0 before the first).
    pub fn last_triggered(&self) -> u64 {
        self.next_id - 1
    }

    /// Records that the job was restored from checkpoint `id`.
    pub fn restored_from(&mut self, id: u64, now_ms: u64) {
        self.restored = Some((id, now_ms));
        self.last_trigger = Some(Instant::now());
    }

    fn fail(&mut self, id: u64, reason: String) -> Step {
        if let Some(mut p) = self.pending.remove(&id) {
            p.stats.status = CheckpointStatus::Failed;
            p.stats.duration_ms = p.started.elapsed().as_millis() as u64;
            p.stats.failure = Some(reason);
            self.failed += 1;
            self.remember(p.stats);
        }
        Step::Failed(id)
    }

    fn remember(&mut self, stats: CheckpointStats) {
        self.history.push_back(stats);
        while self.history.len() > HISTORY {
            self.history.pop_front();
        }
    }

    /// The REST view.
    pub fn view(&self) -> CheckpointsView {
        let mut history: Vec<CheckpointStats> = self.history.iter().cloned().collect();
        history.extend(self.pending.values().map(|p| {
            let mut s = p.stats.clone();
            s.duration_ms = p.started.elapsed().as_millis() as u64;
            s
        }));
        history.sort_by_key(|s| std::cmp::Reverse(s.id));
        CheckpointsView {
            counts: CheckpointCounts {
                completed: self.completed,
                failed: self.failed,
                in_progress: self.pending.len() as u64,
            },
            latest_completed: self.latest.clone(),
            restored: self.restored.map(|(id, at_ms)| RestoredView { id, at_ms }),
            interval_ms: self.interval.as_millis() as u64,
            history,
        }
    }
}

/// Checkpoint counters.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct CheckpointCounts {
    /// Completed since the job started.
    pub completed: u64,
    /// Failed (expired, aborted).
    pub failed: u64,
    /// In flight.
    pub in_progress: u64,
}

/// The latest restore.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct RestoredView {
    /// Checkpoint restored from.
    pub id: u64,
    /// When (ms since the epoch).
    pub at_ms: u64,
}

/// `GET /jobs/{id}/checkpoints`.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct CheckpointsView {
    /// Counters.
    pub counts: CheckpointCounts,
    /// Newest completed checkpoint.
    pub latest_completed: Option<CheckpointStats>,
    /// Latest restore.
    pub restored: Option<RestoredView>,
    /// Configured interval.
    pub interval_ms: u64,
    /// Newest first (the last 50, plus those in flight).
    pub history: Vec<CheckpointStats>,
}

/// Why a stored checkpoint cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// A state blob's checksum does not match: the bytes changed on disk.
    #[error(
        "checkpoint {id}: the state of subtask {task}.{subtask} is corrupted (checksum mismatch)"
    )]
    Corrupted {
        /// Checkpoint.
        id: u64,
        /// Task.
        task: u32,
        /// Subtask.
        subtask: u32,
    },
    /// A subtask's state is missing or undecodable.
    #[error("checkpoint {id}: the state of subtask {task}.{subtask} is {what}")]
    Unusable {
        /// Checkpoint.
        id: u64,
        /// Task.
        task: u32,
        /// Subtask.
        subtask: u32,
        /// Missing or why undecodable.
        what: String,
    },
    /// The database failed.
    #[error("checkpoint storage: {0}")]
    Storage(String),
}

/// A checkpoint loaded for a restore.
pub struct Loaded {
    /// Its id.
    pub id: u64,
    /// State per (task, subtask).
    pub states: HashMap<(u32, u32), Vec<OperatorState>>,
}

impl Loaded {
    /// What a deployment of `subtasks` restores from this checkpoint.
    pub fn restore_point(&self, subtasks: &[(u32, u32)]) -> RestorePoint {
        RestorePoint {
            checkpoint: self.id,
            subtasks: subtasks
                .iter()
                .filter_map(|k| {
                    self.states.get(k).map(|ops| SubtaskSnapshot {
                        task: k.0,
                        subtask: k.1,
                        operators: ops.clone(),
                    })
                })
                .collect(),
        }
    }
}

/// Durable checkpoint storage in the job manager's sled database.
#[derive(Clone)]
pub struct CheckpointStore {
    db: sled::Db,
    meta: sled::Tree,
    state: sled::Tree,
}

fn job_prefix(job: JobId) -> Vec<u8> {
    format!("{job}/").into_bytes()
}

fn meta_key(job: JobId, id: u64) -> Vec<u8> {
    format!("{job}/{id:020}").into_bytes()
}

fn state_key(job: JobId, id: u64, task: u32, subtask: u32) -> Vec<u8> {
    format!("{job}/{id:020}/{task:05}/{subtask:05}").into_bytes()
}

fn state_prefix(job: JobId, id: u64) -> Vec<u8> {
    format!("{job}/{id:020}/").into_bytes()
}

impl CheckpointStore {
    /// The checkpoint trees of `db`.
    pub fn open(db: &sled::Db) -> Result<CheckpointStore, String> {
        Ok(CheckpointStore {
            db: db.clone(),
            meta: db.open_tree("checkpoint_meta").map_err(|e| e.to_string())?,
            state: db
                .open_tree("checkpoint_state")
                .map_err(|e| e.to_string())?,
        })
    }

    /// Stores one subtask's state for checkpoint `id`; returns its size in bytes.
    pub fn put_state(
        &self,
        job: JobId,
        id: u64,
        task: u32,
        subtask: u32,
        operators: &[OperatorState],
    ) -> Result<u64, String> {
        let body = encode(&operators.to_vec()).map_err(|e| e.0)?;
        let mut blob = Vec::with_capacity(body.len() + 4);
        blob.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        blob.extend_from_slice(&body);
        let len = blob.len() as u64;
        self.state
            .insert(state_key(job, id, task, subtask), blob)
            .map_err(|e| e.to_string())?;
        Ok(len)
    }

    /// Persists a completed checkpoint (flushed before returning) and prunes the job's
    /// checkpoints beyond the newest `RETAINED`; returns the ids pruned.
    pub fn complete(&self, job: JobId, stats: &CheckpointStats) -> Result<Vec<u64>, String> {
        let json = serde_json::to_vec(stats).map_err(|e| e.to_string())?;
        self.meta
            .insert(meta_key(job, stats.id), json)
            .map_err(|e| e.to_string())?;
        self.db.flush().map_err(|e| e.to_string())?;
        let ids = self.completed_ids(job)?;
        let mut pruned = Vec::new();
        if ids.len() > RETAINED {
            for &old in &ids[..ids.len() - RETAINED] {
                self.meta
                    .remove(meta_key(job, old))
                    .map_err(|e| e.to_string())?;
                pruned.push(old);
            }
        }
        // Blobs of pruned checkpoints and of checkpoints that never completed.
        let keep: BTreeSet<u64> = ids[ids.len().saturating_sub(RETAINED)..]
            .iter()
            .copied()
            .collect();
        for item in self.state.scan_prefix(job_prefix(job)).keys() {
            let key = item.map_err(|e| e.to_string())?;
            let id = parse_id(&key);
            if id.is_some_and(|i| i < stats.id && !keep.contains(&i)) {
                self.state.remove(&key).map_err(|e| e.to_string())?;
            }
        }
        Ok(pruned)
    }

    /// Gives checkpoint `id` the state of each of `subtasks` it has none of, from the newest
    /// completed checkpoint: a DCAS job's final checkpoint taken again after a restart
    /// covers only the unfinished subtasks, and the finished ones' state has not changed
    /// since. The checkpoint then restores the whole job. Errors name a missing state.
    pub fn inherit_missing(
        &self,
        job: JobId,
        id: u64,
        subtasks: &[(u32, u32)],
    ) -> Result<(), String> {
        let from = self.completed_ids(job)?.into_iter().rfind(|&c| c < id);
        for &(task, subtask) in subtasks {
            let key = state_key(job, id, task, subtask);
            if self.state.contains_key(&key).map_err(|e| e.to_string())? {
                continue;
            }
            let blob = from
                .and_then(|f| self.raw_state(job, f, task, subtask))
                .ok_or_else(|| {
                    format!("checkpoint {id} has no state for subtask {task}.{subtask} and no earlier one to take it from")
                })?;
            self.state.insert(key, blob).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Deletes the state blobs of a checkpoint that will never complete.
    pub fn discard(&self, job: JobId, id: u64) {
        for key in self
            .state
            .scan_prefix(state_prefix(job, id))
            .keys()
            .flatten()
        {
            let _ = self.state.remove(key);
        }
    }

    /// Ids of the job's completed checkpoints, oldest first.
    pub fn completed_ids(&self, job: JobId) -> Result<Vec<u64>, String> {
        let mut ids = Vec::new();
        for item in self.meta.scan_prefix(job_prefix(job)).keys() {
            let key = item.map_err(|e| e.to_string())?;
            if let Some(id) = parse_id(&key) {
                ids.push(id);
            }
        }
        Ok(ids)
    }

    /// Newest id used by any checkpoint of the job (completed or with stored state).
    pub fn last_id(&self, job: JobId) -> u64 {
        let newest = |t: &sled::Tree| {
            t.scan_prefix(job_prefix(job))
                .keys()
                .flatten()
                .filter_map(|k| parse_id(&k))
                .max()
                .unwrap_or(0)
        };
        newest(&self.meta).max(newest(&self.state))
    }

    /// Loads checkpoint `id` for `subtasks`, checking every checksum.
    pub fn load(
        &self,
        job: JobId,
        id: u64,
        subtasks: &[(u32, u32)],
    ) -> Result<Loaded, RestoreError> {
        let mut states = HashMap::new();
        for &(task, subtask) in subtasks {
            let blob = self
                .state
                .get(state_key(job, id, task, subtask))
                .map_err(|e| RestoreError::Storage(e.to_string()))?
                .ok_or_else(|| RestoreError::Unusable {
                    id,
                    task,
                    subtask,
                    what: "missing".into(),
                })?;
            if blob.len() < 4 || crc32fast::hash(&blob[4..]).to_le_bytes() != blob[..4] {
                return Err(RestoreError::Corrupted { id, task, subtask });
            }
            let ops: Vec<OperatorState> =
                decode(&blob[4..]).map_err(|e| RestoreError::Unusable {
                    id,
                    task,
                    subtask,
                    what: format!("undecodable: {}", e.0),
                })?;
            states.insert((task, subtask), ops);
        }
        Ok(Loaded { id, states })
    }

    /// The newest completed checkpoint that loads cleanly, with the reasons the newer ones
    /// could not be used; `None` when there is none (start from scratch).
    pub fn load_latest(
        &self,
        job: JobId,
        subtasks: &[(u32, u32)],
    ) -> (Option<Loaded>, Vec<RestoreError>) {
        let mut errors = Vec::new();
        let ids = match self.completed_ids(job) {
            Ok(ids) => ids,
            Err(e) => return (None, vec![RestoreError::Storage(e)]),
        };
        for &id in ids.iter().rev() {
            match self.load(job, id, subtasks) {
                Ok(l) => return (Some(l), errors),
                Err(e) => errors.push(e),
            }
        }
        (None, errors)
    }

    /// The job's completed checkpoint records, oldest first.
    pub fn completed(&self, job: JobId) -> Vec<CheckpointStats> {
        self.meta
            .scan_prefix(job_prefix(job))
            .values()
            .flatten()
            .filter_map(|v| serde_json::from_slice(&v).ok())
            .collect()
    }

    /// The stored blob of one subtask's state (also raw access for fault-injection tests).
    pub fn raw_state(&self, job: JobId, id: u64, task: u32, subtask: u32) -> Option<Vec<u8>> {
        self.state
            .get(state_key(job, id, task, subtask))
            .ok()
            .flatten()
            .map(|v| v.to_vec())
    }

    /// Raw access for fault-injection tests: overwrites one subtask's stored blob.
    pub fn overwrite_raw_state(&self, job: JobId, id: u64, task: u32, subtask: u32, blob: Vec<u8>) {
        let _ = self.state.insert(state_key(job, id, task, subtask), blob);
    }
}

/// The checkpoint id in a `job/id[/...]` key.
fn parse_id(key: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(key).ok()?;
    text.split('/').nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops(tag: u8) -> Vec<OperatorState> {
        vec![OperatorState {
            operator: "count".into(),
            state: vec![tag; 16],
        }]
    }

    fn stats(id: u64) -> CheckpointStats {
        CheckpointStats {
            id,
            status: CheckpointStatus::Completed,
            trigger: "periodic".into(),
            trigger_ms: 0,
            duration_ms: 1,
            alignment_us: 0,
            state_bytes: 0,
            acknowledged: 2,
            total: 2,
            tasks: Vec::new(),
            failure: None,
        }
    }

    const SUBTASKS: [(u32, u32); 2] = [(0, 0), (1, 0)];

    fn store_with(ids: &[u64]) -> (tempfile::TempDir, CheckpointStore, JobId) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let store = CheckpointStore::open(&db).unwrap();
        let job = JobId::random();
        for &id in ids {
            for (t, s) in SUBTASKS {
                store.put_state(job, id, t, s, &ops(id as u8)).unwrap();
            }
            store.complete(job, &stats(id)).unwrap();
        }
        (dir, store, job)
    }

    /// Ensures a flipped byte in a stored state blob is detected at restore, named, and that
    /// the restore falls back to the previous checkpoint.
    #[test]
    fn corrupted_state_falls_back_to_the_previous_checkpoint() {
        let (_dir, store, job) = store_with(&[1, 2]);
        let mut blob = store.raw_state(job, 2, 1, 0).unwrap();
        let last = blob.len() - 1;
        blob[last] ^= 0x40;
        store.overwrite_raw_state(job, 2, 1, 0, blob);
        let (loaded, errors) = store.load_latest(job, &SUBTASKS);
        let loaded = loaded.expect("checkpoint 1 is intact");
        assert_eq!(loaded.id, 1);
        assert_eq!(loaded.states[&(1, 0)], ops(1));
        assert_eq!(errors.len(), 1);
        assert_eq!(
            errors[0].to_string(),
            "checkpoint 2: the state of subtask 1.0 is corrupted (checksum mismatch)"
        );
    }

    /// Ensures a checkpoint that covers only some subtasks takes the others' state from the
    /// newest completed one and then loads whole, and that a state found nowhere is named.
    #[test]
    fn missing_states_are_inherited_from_the_previous_checkpoint() {
        let (_dir, store, job) = store_with(&[4]);
        store.put_state(job, 6, 1, 0, &ops(9)).unwrap();
        store.inherit_missing(job, 6, &[(0, 0), (1, 0)]).unwrap();
        store.complete(job, &stats(6)).unwrap();
        let loaded = store.load(job, 6, &[(0, 0), (1, 0)]).unwrap();
        assert_eq!(loaded.states[&(1, 0)], ops(9), "its own state stays");
        assert_eq!(
            loaded.states[&(0, 0)],
            store.load(job, 4, &[(0, 0)]).unwrap().states[&(0, 0)]
        );
        let err = store.inherit_missing(job, 7, &[(5, 5)]).unwrap_err();
        assert!(err.contains("subtask 5.5"), "{err}");
    }

    #[test]
    fn only_the_newest_three_are_kept() {
        let (_dir, store, job) = store_with(&[1, 2, 3, 4, 5]);
        assert_eq!(store.completed_ids(job).unwrap(), vec![3, 4, 5]);
        assert!(store.raw_state(job, 2, 0, 0).is_none());
        assert!(store.raw_state(job, 3, 0, 0).is_some());
        assert_eq!(store.last_id(job), 5);
        let (loaded, errors) = store.load_latest(job, &SUBTASKS);
        assert_eq!(loaded.unwrap().id, 5);
        assert!(errors.is_empty());
    }

    #[test]
    fn a_missing_subtask_state_is_named() {
        let (_dir, store, job) = store_with(&[1]);
        let err = store.load(job, 1, &[(0, 0), (2, 3)]).err().unwrap();
        assert_eq!(
            err.to_string(),
            "checkpoint 1: the state of subtask 2.3 is missing"
        );
    }

    #[test]
    fn coordinator_completes_expires_and_finalizes() {
        let subs = [(0u32, 0u32), (1, 0)];
        let mut c = Coordinator::new(Duration::ZERO, Duration::from_millis(50), 1, 7);
        let steps = c.tick(0, &subs, true, false);
        assert_eq!(
            steps,
            vec![Step::Trigger {
                id: 8,
                final_: false
            }]
        );
        // At most one in flight.
        assert!(c.tick(0, &subs, true, false).is_empty());
        assert!(c.ack(8, 0, 0, 10, 0, 1).is_none());
        assert!(
            c.ack(8, 0, 0, 10, 0, 1).is_none(),
            "a duplicate ack counts once"
        );
        match c.ack(8, 1, 0, 5, 30, 1) {
            Some(Step::Complete(s)) => {
                assert_eq!((s.id, s.state_bytes, s.alignment_us), (8, 15, 30));
                assert_eq!(s.tasks.len(), 2);
            }
            other => panic!("{other:?}"),
        }
        // Not running: no trigger; an overdue checkpoint expires with a reason.
        assert!(c.tick(0, &subs, false, false).is_empty());
        c.trigger(0, &subs, "manual", false);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(c.tick(0, &subs, false, false), vec![Step::Failed(9)]);
        let v = c.view();
        assert_eq!((v.counts.completed, v.counts.failed), (1, 1));
        assert!(v.history[0].failure.as_ref().unwrap().contains("expired"));
        // Inputs ended: a final checkpoint replaces a periodic one in flight.
        c.trigger(0, &subs, "periodic", false);
        let steps = c.tick(0, &subs, true, true);
        assert_eq!(
            steps,
            vec![
                Step::Failed(10),
                Step::Trigger {
                    id: 11,
                    final_: true
                }
            ]
        );
        assert_eq!(c.last_triggered(), 11);
    }
}
