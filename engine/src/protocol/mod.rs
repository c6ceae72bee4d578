//! Messages between processes, and how they are framed on TCP.
//!
//! - [`frame`] — length-prefixed frames (`u32` little-endian length, then an rkyv payload),
//!   with a size limit, shared by both conversations.
//! - [`control`] — task manager <-> job manager (registration, heartbeats, deployment,
//!   subtask state, collected output).
//! - [`cache`] — cache operations, replication and the partition table.
//! - [`data`] — task manager <-> task manager (stream events per logical channel, credits).
//!
//! Every message that belongs to a job carries its `JobId` and `Generation`, so a late
//! message from an earlier deployment is recognised and dropped, never obeyed.

// rkyv derives resolver types for enum variants without docs; our own items are documented.
#[allow(missing_docs)]
pub mod cache;
#[allow(missing_docs)]
pub mod control;
#[allow(missing_docs)]
pub mod data;
pub mod frame;

/// The version of every message's layout and meaning, and of the bytes processes hand each
/// other beyond this module: the packed event encoding of the data plane
/// ([`crate::codec::packed`]) and what DCAS keeps in the cache for another task manager to
/// read back (snapshots, log entries, progress). A task manager sends it in
/// [`control::ToJobManager::Register`] and the job manager refuses one that speaks another
/// ([`control::ToTaskManager::Refused`]), so a cluster never mixes builds whose messages
/// mean different things. A layout change mostly fails to decode on its own; a change of
/// meaning with the same layout (a field reinterpreted) would not, so bump this on any
/// change to any of them.
pub const WIRE_VERSION: u32 = 4;
