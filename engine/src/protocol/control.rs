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
        /// Failure reason, when failed.
        message: Option<String>,
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
        /// The records.
        records: Vec<Record>,
    },
}

/// Job manager -> task manager.
#[derive(Clone, Debug, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum ToTaskManager {
    /// Registration accepted.
    Registered,
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
    /// The cache's new partition table.
    CacheTable(PartitionTable),
    /// As primary of `partition`, copy it to `target` (re-replication or migration).
    CacheCopy {
        /// The partition.
        partition: u32,
        /// Its version now.
        version: u64,
        /// The member to copy to.
        target: Member,
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
                }],
            }),
            ToTaskManager::Abort,
        ];
        for m in msgs {
            assert_eq!(decode::<ToTaskManager>(&encode(&m).unwrap()).unwrap(), m);
        }
        let m = ToJobManager::Collected {
            job: JobId::random(),
            generation: Generation(1),
            operator: "out".into(),
            subtask: 0,
            records: vec![Record::new(1, Value::str("x"))],
        };
        assert_eq!(decode::<ToJobManager>(&encode(&m).unwrap()).unwrap(), m);
    }
}
