//! Weir engine: the vocabulary and mechanisms shared by the job manager and task managers.
//!
//! - [`value`], [`record`] — the data model (`Value`, `Record`, `Batch`, `StreamEvent`,
//!   `Delivery`).
//! - [`codec`] — rkyv encoding of messages and state; the packed encoding of stream events.
//! - [`expr`] — the expression language used in job specs, compiled once per operator.
//! - [`spec`] — job specs (JSON) and their validation.
//! - [`graph`] — from a spec to tasks (operator chains) and exchanges.
//! - [`operator`] — the operator trait and the built-in operator library.
//! - [`runtime`] — subtask actors, credit-based channels, and the in-process executor.
//! - [`ids`], [`protocol`] — identifiers and the messages between processes.
//! - [`cache`] — the distributed in-memory cache hosted by the task managers.
#![warn(missing_docs)]

pub mod cache;
pub mod codec;
pub mod error;
pub mod expr;
pub mod graph;
pub mod ids;
pub mod kafka;
pub mod net;
pub mod operator;
pub mod protocol;
pub mod record;
pub mod runtime;
pub mod spec;
pub mod telemetry;
pub mod value;

pub use error::EngineError;
pub use record::{Batch, Record, StreamEvent};
pub use value::Value;

/// Every Weir process (and test) allocates with jemalloc (librdkafka's C code keeps the
/// system malloc). The cache takes a log's records as thousands of small buffers per append
/// and frees as many at each trim; glibc's malloc then stalls the next large allocation for
/// about a millisecond while it consolidates them, which alone set the p99 of a replicated
/// append (BENCHMARKS.md, "Distributed cache"). mimalloc was tried too: it paused for 6 ms
/// every ~200 ms under the same load.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
