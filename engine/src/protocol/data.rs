//! Task manager <-> task manager: the data plane's frames.
//!
//! One TCP connection per pair of task managers carries every logical channel between them,
//! in both directions. The connecting side sends `Hello` first. Events flow from sender to
//! receiver; `Credit` frames flow back and grant the sender more events (credit-based flow
//! control: the sender starts with none and may only send what it was granted), and under
//! DCAS `Logged` frames tell the sender what the receiver's input log holds.

use bytes::Bytes;

use crate::ids::{Generation, JobId, TaskManagerId};

/// One logical channel: from one subtask to one subtask over one edge of one deployment.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
#[rkyv(derive(PartialEq, Eq, Hash, Debug))]
pub struct ChannelId {
    /// The job.
    pub job: JobId,
    /// The deployment; channels of older generations are refused.
    pub generation: Generation,
    /// Index of the edge in the job graph.
    pub edge: u32,
    /// Upstream subtask index.
    pub from: u32,
    /// Downstream subtask index.
    pub to: u32,
    /// Incarnation of the channel within the deployment: the sum of both ends' restart
    /// counts (DCAS restarts one end without a new deployment). A restarted end's channels
    /// are new channels, so credits granted to or by its earlier instance never mix in.
    pub epoch: u32,
}

impl ChannelId {
    /// The owned id of a validated archived one.
    pub fn from_archived(a: &ArchivedChannelId) -> ChannelId {
        ChannelId {
            job: JobId(a.job.0.to_native()),
            generation: Generation(a.generation.0.to_native()),
            edge: a.edge.to_native(),
            from: a.from.to_native(),
            to: a.to.to_native(),
            epoch: a.epoch.to_native(),
        }
    }
}

/// A data-plane frame.
#[derive(Clone, Debug, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum DataFrame {
    /// First frame of a connection: who is connecting.
    Hello {
        /// The connecting task manager.
        tm: TaskManagerId,
    },
    /// An event on a channel (receiver side: the channel's input).
    Event {
        /// The channel.
        channel: ChannelId,
        /// The event, [`packed`](crate::codec::packed::encode_event): a ninth of rkyv's
        /// bytes for small records, and under DCAS the bytes the sender retains and the
        /// receiver logs, packed once.
        packed: Bytes,
    },
    /// The receiver of `channel` grants `credits` more events to its sender.
    Credit {
        /// The channel.
        channel: ChannelId,
        /// Events granted.
        credits: u32,
    },
    /// DCAS: the receiver of `channel` holds every record below `next_seq` in its input
    /// log. Sent during a recovery, so a sender learns that its restarted receiver logged
    /// the backlog without the cache round trips of the progress exchange (which still
    /// runs, and alone decides what a restarted sender resends).
    Logged {
        /// The channel.
        channel: ChannelId,
        /// Seq below which the receiver logged everything.
        next_seq: u64,
    },
}
