//! The distributed in-memory cache: the memory of every task manager fused into one
//! partitioned, replicated store (DESIGN §8), where DCAS keeps its input logs and snapshots.
//!
//! - [`table`] — key → partition hashing, partition → members by consistent hashing, and
//!   [`table::Membership`], the master's state machine (promotion, re-replication, migration).
//! - [`store`] — one partition's maps and lists, changed only through absolute mutations.
//! - [`node`] — the server each task manager hosts: primaries apply and replicate, backups
//!   apply in order, copies move partitions to new owners.
//! - [`client`] — the routing client any actor (or test) uses.
//! - [`conn`] — a multiplexed request/response connection.
//!
//! Messages are in [`crate::protocol::cache`].

pub mod client;
pub mod conn;
pub mod node;
pub mod store;
pub mod table;

pub use client::{CacheClient, CacheError};
pub use node::{CacheNode, NodeConfig};
pub use table::{Membership, DEFAULT_PARTITIONS};

#[cfg(test)]
pub(crate) mod testing;
#[cfg(test)]
mod tests;
