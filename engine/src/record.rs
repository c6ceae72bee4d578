//! `Record`, `Batch` and `StreamEvent`: what flows on a channel between tasks, each event in
//! a `Delivery` (with its packed bytes when its sender has them).
//!
//! Records never travel alone: a `Batch` carries hundreds to thousands of them with the
//! sequence number of the first, so record `i` of a batch has seq `first_seq + i`. Seqs are
//! dense and increasing per channel; receivers drop records whose seq they already consumed,
//! which is what makes replay after a partial recovery exactly-once.

use bytes::Bytes;

use crate::value::Value;

/// One element of a stream.
#[derive(
    Clone, Debug, Default, PartialEq, Eq, Hash, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub struct Record {
    /// Partitioning key set by `key_by` (or a keyed operator's output); `None` when unkeyed.
    pub key: Option<Value>,
    /// Event time in milliseconds since the epoch (or since the job's logical start).
    pub ts: i64,
    /// The payload.
    pub value: Value,
}

impl Record {
    /// An unkeyed record.
    pub fn new(ts: i64, value: Value) -> Record {
        Record {
            key: None,
            ts,
            value,
        }
    }

    /// A keyed record.
    pub fn keyed(key: Value, ts: i64, value: Value) -> Record {
        Record {
            key: Some(key),
            ts,
            value,
        }
    }
}

/// Sequence number of a record on a channel.
pub type Seq = u64;

/// Many records with the sequence number of the first.
#[derive(
    Clone, Debug, Default, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub struct Batch {
    /// Seq of `records[0]`; record `i` has seq `first_seq + i`.
    pub first_seq: Seq,
    /// The records, in channel order.
    pub records: Vec<Record>,
}

impl Batch {
    /// Number of records.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// True when the batch holds no record.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Seq one past the last record.
    pub fn end_seq(&self) -> Seq {
        self.first_seq + self.records.len() as u64
    }
}

/// Checkpoint (epoch) number carried by a barrier.
pub type CheckpointId = u64;

/// What a channel carries. Barriers and watermarks travel in order with the data.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum StreamEvent {
    /// A batch of records.
    Data(Batch),
    /// No record with an event time at or below this will follow on this channel.
    Watermark(i64),
    /// Checkpoint barrier: everything before it belongs to checkpoint `n`.
    Barrier(CheckpointId),
    /// Latency marker: every source upstream had emitted, by this wall-clock time (ms since
    /// the epoch), everything that arrives before the marker. A subtask forwards the oldest
    /// marker of its open inputs once every input delivered one newer, behind the records
    /// it had sent; so where a marker arrives, the time since its origin is how stale the
    /// data is end to end, queues included. Never logged or snapshotted (DCAS): it carries
    /// no data, and a replay regenerates none.
    Marker(i64),
    /// The sender finished; nothing follows.
    EndOfStream,
}

/// An event as a channel carries it: with, when its sender had it, the event's
/// [`packed`](crate::codec::packed) encoding. A DCAS sender packs each batch once, for the
/// output it retains; the same bytes go on the wire and into the receiver's input log, so
/// no one packs the records again. The bytes are shared, never copied, in process.
#[derive(Clone, Debug, PartialEq)]
pub struct Delivery {
    /// The event.
    pub event: StreamEvent,
    /// [`packed::encode_event`](crate::codec::packed::encode_event) of `event`, when known.
    pub packed: Option<Bytes>,
}

impl Delivery {
    /// An event without its encoding.
    pub fn new(event: StreamEvent) -> Delivery {
        Delivery {
            event,
            packed: None,
        }
    }
}

impl From<StreamEvent> for Delivery {
    fn from(event: StreamEvent) -> Delivery {
        Delivery::new(event)
    }
}
