//! The actor runtime: channels with credits and seqs, subtask actors, and the in-process
//! executor.

pub mod channel;
pub mod credit;
pub mod dcas;
pub mod deploy;
pub mod local;
pub mod task;

pub use local::{JobHandle, JobOutcome, LocalConfig, LocalExecutor, LocalJob, TaskMetrics};
