//! Task manager <-> job manager: the control conversation.
//!
//! A task manager connects to the job manager's control address, sends `Register`, gets
//! `Registered`, then heartbeats every `heartbeat.interval_ms`. The job manager deploys and
//! cancels subtasks over the same connection; the task manager reports subtask state changes
//! and what `collect` sinks received. The job manager, as the cache's membership master,
//! pushes partition tables and asks primaries to copy partitions; heartbeats carry each cache
//! node's memory. A dropped connection means the task manager is dead.

use crate::ids::{Generation, JobId, TaskManagerId};
use crate::operator::Metric;
use crate::protocol::cache::{CacheStats, Member, PartitionTable};
use crate::record::Record;

/// Task manager -> job manager.
#[derive(Clone, Debug, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum ToJobManager {
    /// First message of a connection.
    Register {
        /// The [`WIRE_VERSION`](crate::protocol::WIRE_VERSION) it speaks.
        wire: u32,
        /// The task manager's id (fresh per process).
        tm: TaskManagerId,
        /// Number of subtask slots it offers.
        slots: u32,
        /// `host:port` of its data-plane server.
        data_addr: String,
        /// Its process id (lets a local job manager kill it for real).
        pid: u32,
        /// `host:port` of its cache node.
        cache_addr: String,
    },
    /// Liveness and live counters.
    Heartbeat {
        /// Counters of every running subtask.
        subtasks: Vec<SubtaskReport>,
        /// Its cache node's memory and counters.
        cache: CacheStats,
    },
    /// A partition copy the job manager asked for ended.
    CacheCopied {
        /// The copy's id, from [`ToTaskManager::CacheCopy`].
        copy: u64,
        /// The partition.
        partition: u32,
        /// Its version when the copy started.
        version: u64,
        /// The member that received it.
        target: TaskManagerId,
        /// Why it failed, if it did.
        error: Option<String>,
    },
    /// A subtask changed state.
    SubtaskState {
        /// The job.
        job: JobId,
        /// The deployment.
        generation: Generation,
        /// Task index.
        task: u32,
        /// Subtask index.
        subtask: u32,
        /// New state.
        state: SubtaskState,
        /// Failure reason when failed; why, when canceled.
        message: Option<String>,
    },
    /// A subtask took its state for a checkpoint (ABS): the state bytes go to the job
    /// manager's checkpoint storage.
    CheckpointAck {
        /// The job.
        job: JobId,
        /// The deployment.
        generation: Generation,
        /// Task index.
        task: u32,
        /// Subtask index.
        subtask: u32,
        /// The checkpoint.
        checkpoint: u64,
        /// Microseconds from the first barrier to the last (alignment).
        alignment_us: u64,
        /// Milliseconds to copy the state (processing stopped for this long).
        sync_ms: u64,
        /// State of every operator of the chain.
        operators: Vec<OperatorState>,
    },
    /// Records received by a `collect` sink.
    Collected {
        /// The job.
        job: JobId,
        /// The deployment.
        generation: Generation,
        /// Collect operator id.
        operator: String,
        /// Subtask index.
        subtask: u32,
        /// The checkpoint whose completion made the records visible (exactly-once sinks,
        /// which may deliver an epoch again after a restore); `None` when not transactional.
        epoch: Option<u64>,
        /// Which part of the delivery this is (0, 1, ...): a task manager sends a large one
        /// in parts, in order, so that an epoch delivered again is told apart from the rest
        /// of its first delivery.
        part: u32,
        /// The delivery's final part: the job manager answers it with
        /// [`ToTaskManager::CollectTaken`] (exactly-once sinks).
        last: bool,
        /// The records.
        records: Vec<Record>,
    },
}

/// Job manager -> task manager.
#[derive(Clone, Debug, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum ToTaskManager {
    /// Registration accepted. A task manager that hears nothing (`HeartbeatAck`) from the
    /// job manager for `heartbeat_timeout_ms` stops its subtasks: by then the job manager
    /// has declared it dead and recovers without it.
    Registered {
        /// The job manager's heartbeat timeout.
        heartbeat_timeout_ms: u64,
    },
    /// Run these subtasks of a job.
    Deploy(Deployment),
    /// Stop every subtask of a job's deployment.
    Cancel {
        /// The job.
        job: JobId,
        /// The deployment.
        generation: Generation,
    },
    /// Exit the process at once, as a crash would (used by "kill task manager").
    Abort,
    /// DCAS: subtasks `moved` restarted on other task managers (now in `placement`); the
    /// receiving task manager connects its own subtasks of the deployment to them, and stops
    /// listening to the task managers in `lost` (fencing: a paused one that resumes must not
    /// reach anyone).
    Rewire {
        /// The job.
        job: JobId,
        /// The deployment.
        generation: Generation,
        /// Where every subtask of the job runs now.
        placement: Vec<Placement>,
        /// The restarted subtasks.
        moved: Vec<(u32, u32)>,
        /// Task managers declared dead.
        lost: Vec<TaskManagerId>,
        /// The job manager's number of this rewire (rising): a subtask reports the latest
        /// whose backlogs its receivers logged.
        seq: u64,
    },
    /// Fail one subtask at once, as its crash would (used by "kill subtask").
    KillSubtask {
        /// The job.
        job: JobId,
        /// The deployment.
        generation: Generation,
        /// The task.
        task: u32,
        /// The subtask.
        subtask: u32,
    },
    /// Take checkpoint `checkpoint`: the listed subtasks (sources, or every subtask for the
    /// final checkpoint of a job whose inputs all ended) snapshot and emit barriers.
    TriggerCheckpoint {
        /// The job.
        job: JobId,
        /// The deployment.
        generation: Generation,
        /// The checkpoint.
        checkpoint: u64,
        /// (task, subtask) pairs to trigger.
        subtasks: Vec<(u32, u32)>,
        /// The final checkpoint of a job whose inputs all ended.
        final_: bool,
    },
    /// Checkpoint `checkpoint` is complete: sinks commit what they staged up to it.
    CheckpointComplete {
        /// The job.
        job: JobId,
        /// The deployment.
        generation: Generation,
        /// The checkpoint.
        checkpoint: u64,
    },
    /// DCAS with fallback checkpoints: checkpoints up to `upto` were aborted (a recovery
    /// restarted subtasks, whose barriers may never come): subtasks stop aligning them.
    AbortCheckpoints {
        /// The job.
        job: JobId,
        /// The deployment.
        generation: Generation,
        /// The newest aborted checkpoint.
        upto: u64,
    },
    /// DCAS: a recovery restarted subtasks of the job elsewhere; the sources here send
    /// latency markers densely for a while, so the recovery's end is timed precisely.
    Recovering {
        /// The job.
        job: JobId,
        /// The deployment.
        generation: Generation,
    },
    /// The job manager holds every part of epoch `epoch` of a collect sink's subtask, so
    /// the sink's snapshots need not keep that epoch's records any longer.
    CollectTaken {
        /// The job.
        job: JobId,
        /// The deployment.
        generation: Generation,
        /// Collect operator id.
        operator: String,
        /// Subtask index.
        subtask: u32,
        /// The epoch (checkpoint or DCAS snapshot id).
        epoch: u64,
    },
    /// Answer to a heartbeat: the job manager still counts this task manager as alive.
    HeartbeatAck,
    /// The cache's new partition table.
    CacheTable(PartitionTable),
    /// As primary of `partition`, copy it to `target` (re-replication or migration).
    CacheCopy {
        /// The master's id of this copy, answered in [`ToJobManager::CacheCopied`].
        copy: u64,
        /// The partition.
        partition: u32,
        /// Its version now.
        version: u64,
        /// The member to copy to.
        target: Member,
    },
    /// Registration refused (another wire version): the task manager exits, since trying
    /// again cannot help. Last, so that its arrival does not move the others' tags.
    Refused {
        /// Why, for the task manager's log.
        reason: String,
    },
}

/// Everything a task manager needs to run its share of a job.
#[derive(Clone, Debug, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Deployment {
    /// The job.
    pub job: JobId,
    /// The deployment attempt.
    pub generation: Generation,
    /// The job spec as submitted (JSON); the task manager builds the same graph from it.
    pub spec: String,
    /// (task, subtask) pairs to run here.
    pub subtasks: Vec<(u32, u32)>,
    /// Where every subtask of the job runs.
    pub placement: Vec<Placement>,
    /// State to restore the subtasks deployed here from (a recovery).
    pub restore: Option<RestorePoint>,
    /// DCAS: the cache table epoch the deployment's entries date from (the job manager's
    /// newest when the generation was deployed; the same for its subtasks restarted
    /// later). Partitions that lost every copy at or before it hold none of them, so they
    /// serve the deployment; a later loss fails it.
    pub cache_epoch: u64,
}

/// The state a recovered deployment starts from.
#[derive(Clone, Debug, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct RestorePoint {
    /// The completed checkpoint.
    pub checkpoint: u64,
    /// State per subtask deployed on the receiving task manager.
    pub subtasks: Vec<SubtaskSnapshot>,
}

/// One subtask's state in a checkpoint.
#[derive(Clone, Debug, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct SubtaskSnapshot {
    /// Task index.
    pub task: u32,
    /// Subtask index.
    pub subtask: u32,
    /// Operator states.
    pub operators: Vec<OperatorState>,
}

/// One operator's state bytes (from `Operator::snapshot` or `Source::snapshot`).
#[derive(Clone, Debug, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct OperatorState {
    /// Operator id.
    pub operator: String,
    /// The bytes.
    pub state: Vec<u8>,
}

/// Location of one subtask.
#[derive(Clone, Debug, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Placement {
    /// Task index.
    pub task: u32,
    /// Subtask index.
    pub subtask: u32,
    /// The task manager running it.
    pub tm: TaskManagerId,
    /// That task manager's data-plane address.
    pub data_addr: String,
    /// Restarts of this subtask within the deployment (DCAS); names its channels' epoch.
    pub attempt: u32,
}

/// Lifecycle of a subtask.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
    serde::Serialize,
)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SubtaskState {
    /// Sent to a task manager, not yet running.
    Deploying,
    /// Running.
    Running,
    /// Inputs ended and everything was sent; waits for the final checkpoint to commit its
    /// output (exactly-once jobs only).
    Finishing,
    /// Inputs ended and everything was sent.
    Finished,
    /// Failed (see the message).
    Failed,
    /// Stopped on request.
    Canceled,
}

/// Live counters of one subtask.
#[derive(Clone, Debug, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct SubtaskReport {
    /// The job.
    pub job: JobId,
    /// The deployment.
    pub generation: Generation,
    /// Task index.
    pub task: u32,
    /// Subtask index.
    pub subtask: u32,
    /// Records read.
    pub records_in: u64,
    /// Records sent downstream.
    pub records_out: u64,
    /// Milliseconds spent waiting for credits.
    pub backpressure_ms: u64,
    /// Current output watermark.
    pub watermark: i64,
    /// DCAS: log entries replayed when the subtask (re)started.
    pub replayed: u64,
    /// DCAS: incremental snapshots applied after the whole one when the subtask
    /// (re)started.
    pub snapshot_links: u64,
    /// When the subtask had restored its state (and replayed its log), ms since the epoch;
    /// 0 before.
    pub resumed_ms: u64,
    /// Sources: records available but not read yet; -1 when unknown (or not a source).
    pub source_lag: i64,
    /// Sources: the lag sampled since the previous report, as (ms since the epoch,
    /// records), oldest first.
    pub lag_samples: Vec<(u64, u64)>,
    /// Subtasks without outputs (sinks): the latency markers that arrived since the
    /// previous report, as (ms since the epoch, the marker's origin), oldest first.
    pub marker_samples: Vec<(u64, u64)>,
    /// DCAS: the latest rewire (its number) whose restarted receivers, and every earlier
    /// one's, logged the backlog this subtask kept for them; 0 before.
    pub receivers_caught_up: u64,
    /// DCAS: when they had, ms since the epoch; 0 before.
    pub receivers_caught_up_ms: u64,
    /// Operator-specific metrics (Kafka offsets and lag, late records), by operator id.
    pub operator_metrics: Vec<(String, Metric)>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode, encode};
    use crate::Value;

    #[test]
    fn control_messages_round_trip() {
        let msgs = vec![
            ToTaskManager::Deploy(Deployment {
                job: JobId::random(),
                generation: Generation(3),
                spec: "{}".into(),
                subtasks: vec![(0, 1)],
                placement: vec![Placement {
                    task: 0,
                    subtask: 1,
                    tm: TaskManagerId::random(),
                    data_addr: "127.0.0.1:1".into(),
                    attempt: 0,
                }],
                restore: Some(RestorePoint {
                    checkpoint: 4,
                    subtasks: vec![SubtaskSnapshot {
                        task: 0,
                        subtask: 1,
                        operators: vec![OperatorState {
                            operator: "src".into(),
                            state: vec![1, 2, 3],
                        }],
                    }],
                }),
                cache_epoch: 7,
            }),
            ToTaskManager::Abort,
            ToTaskManager::KillSubtask {
                job: JobId::random(),
                generation: Generation(3),
                task: 1,
                subtask: 2,
            },
            ToTaskManager::Registered {
                heartbeat_timeout_ms: 1000,
            },
            ToTaskManager::Refused {
                reason: "wire version 1".into(),
            },
            ToTaskManager::TriggerCheckpoint {
                job: JobId::random(),
                generation: Generation(2),
                checkpoint: 7,
                subtasks: vec![(0, 0), (0, 1)],
                final_: true,
            },
            ToTaskManager::AbortCheckpoints {
                job: JobId::random(),
                generation: Generation(2),
                upto: 9,
            },
            ToTaskManager::Recovering {
                job: JobId::random(),
                generation: Generation(2),
            },
            ToTaskManager::CollectTaken {
                job: JobId::random(),
                generation: Generation(2),
                operator: "out".into(),
                subtask: 1,
                epoch: 12,
            },
        ];
        for m in msgs {
            assert_eq!(decode::<ToTaskManager>(&encode(&m).unwrap()).unwrap(), m);
        }
        let m = ToJobManager::Collected {
            job: JobId::random(),
            generation: Generation(1),
            operator: "out".into(),
            subtask: 0,
            epoch: Some(3),
            part: 2,
            last: true,
            records: vec![Record::new(1, Value::str("x"))],
        };
        assert_eq!(decode::<ToJobManager>(&encode(&m).unwrap()).unwrap(), m);
    }
}
