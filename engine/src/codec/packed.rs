//! A packed encoding of stream events: what the data plane carries between task managers,
//! and what DCAS copies (the input log's entries, a sender's retained output and its
//! snapshots). Varints, timestamps as deltas, one tag byte per record for the key's and the
//! value's type.
//!
//! rkyv's archive gives every record a fixed layout with aligned 8-byte fields: 48 bytes for
//! a keyed integer count's input, of which about 6 carry information. Packed, that record
//! takes 4–8 bytes, and every copy, socket write and cached byte shrinks with it: a DCAS
//! input log crosses loopback twice (to the log's primary and on to its backup) and sits in
//! the cache's memory until the next snapshot. Packing is also faster than archiving (about
//! half the time per record), and decoding the common record is as fast as reading it from
//! an archive. Under DCAS a batch is packed once, by its sender: the same bytes are
//! retained, sent, and logged by the receiver ([`Delivery`](crate::record::Delivery)).
//!
//! An event is a tag byte (data, watermark, barrier, end) and its body: a batch, or a
//! watermark or checkpoint id as a varint. Layout of a batch: `first_seq` and the record
//! count as varints, then per record a tag byte (key type in the high nibble, 15 when there
//! is none; value type in the low one), the timestamp's difference from the previous
//! record's (zigzag varint, from 0), the key's payload, the value's payload. Payloads: an
//! integer as a zigzag varint, a float as its 8 bytes, a string or bytes as a varint length
//! and the bytes, a list as a varint count and tagged values, a map as a varint count and
//! (name, tagged value) pairs.
//!
//! Decoding checks every length against the bytes left, reserves room ahead of reading for
//! at most [`MAX_RESERVE`] items of a list or map and 65,536 records, and nests no deeper than
//! [`MAX_VALUE_DEPTH`]: malformed input is an error, never a panic or a large allocation.
//! Map field names are shared within an event: up to 32 names of up to 64 bytes are kept,
//! so the records of a batch of one shape allocate each name once.
//! The format has no version, like the rest of the data plane: events live only between the
//! task managers of one build and in the cache's memory, which does not outlive them.
//! Operator state packed with it ([`Unpacker`]) is also kept in ABS checkpoints on disk;
//! the operators begin it with a format byte, so a checkpoint of another build whose
//! encoding changed is refused with an error rather than misread.

use std::sync::Arc;

use super::{CodecError, MAX_VALUE_DEPTH};
use crate::record::{Batch, Record, StreamEvent};
use crate::value::Value;

const NULL: u8 = 0;
const FALSE: u8 = 1;
const TRUE: u8 = 2;
const INT: u8 = 3;
const FLOAT: u8 = 4;
const STR: u8 = 5;
const BYTES: u8 = 6;
const LIST: u8 = 7;
const MAP: u8 = 8;
/// Key nibble of a record without a key.
const NO_KEY: u8 = 0xf;
/// Most items a decoder reserves room for before reading them: a count read from the bytes
/// is checked against the bytes left, but every nesting level could claim them all.
pub const MAX_RESERVE: usize = 1024;

const DATA: u8 = 0;
const WATERMARK: u8 = 1;
const BARRIER: u8 = 2;
const END: u8 = 3;
const MARKER: u8 = 4;

/// Bytes to reserve for `event` packed: enough for records of small integers and short
/// strings, so the common batch never regrows its buffer.
pub fn size_hint(event: &StreamEvent) -> usize {
    match event {
        StreamEvent::Data(b) => size_hint_records(b.len()),
        _ => 24,
    }
}

/// [`size_hint`] of a batch of `n` records, with the room the last record is packed in.
pub fn size_hint_records(n: usize) -> usize {
    24 + n * 8 + Small::ROOM
}

/// Appends `event`, packed, to `out`.
pub fn encode_event(event: &StreamEvent, out: &mut Vec<u8>) {
    match event {
        StreamEvent::Data(b) => {
            out.push(DATA);
            encode_batch(b, out);
        }
        StreamEvent::Watermark(w) => {
            out.push(WATERMARK);
            put_varint(out, zigzag(*w));
        }
        StreamEvent::Barrier(n) => {
            out.push(BARRIER);
            put_varint(out, *n);
        }
        StreamEvent::EndOfStream => out.push(END),
        StreamEvent::Marker(at) => {
            out.push(MARKER);
            put_varint(out, zigzag(*at));
        }
    }
}

/// Decodes an event [`encode_event`] wrote, which must fill `bytes` exactly.
pub fn decode_event(bytes: &[u8]) -> Result<StreamEvent, CodecError> {
    let (tag, body) = bytes
        .split_first()
        .ok_or_else(|| CodecError("packed event: no bytes".into()))?;
    let mut r = Reader::new(body);
    let event = match *tag {
        DATA => return decode_batch(body).map(StreamEvent::Data),
        WATERMARK => r.varint().map(|w| StreamEvent::Watermark(unzigzag(w))),
        BARRIER => r.varint().map(StreamEvent::Barrier),
        END => Ok(StreamEvent::EndOfStream),
        MARKER => r.varint().map(|at| StreamEvent::Marker(unzigzag(at))),
        t => return Err(CodecError(format!("packed event: unknown tag {t}"))),
    };
    let event = event.and_then(|e| r.end().map(|()| e));
    event.map_err(|m| r.error(m))
}

/// Packs the data event of the batch of `records` from seq `first_seq`: what
/// [`encode_event`] writes for it, in a buffer sized for it.
pub fn pack_data(first_seq: u64, records: &[Record]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + size_hint_records(records.len()));
    out.push(DATA);
    encode_records(first_seq, records, &mut out);
    out
}

/// Decodes a data event [`encode_event`] wrote: its batch, or an error for another event.
pub fn decode_data(bytes: &[u8]) -> Result<Batch, CodecError> {
    match bytes.split_first() {
        Some((&DATA, body)) => decode_batch(body),
        Some((tag, _)) => Err(CodecError(format!(
            "packed event: tag {tag}, expected data"
        ))),
        None => Err(CodecError("packed event: no bytes".into())),
    }
}

/// Appends `batch`, packed, to `out`.
pub fn encode_batch(batch: &Batch, out: &mut Vec<u8>) {
    encode_records(batch.first_seq, &batch.records, out);
}

/// Appends the batch of `records` from seq `first_seq`, packed, to `out`.
pub fn encode_records(first_seq: u64, records: &[Record], out: &mut Vec<u8>) {
    put_varint(out, first_seq);
    put_varint(out, records.len() as u64);
    let mut prev_ts = 0i64;
    for r in records {
        let head = r.key.as_ref().map_or(NO_KEY, tag) << 4 | tag(&r.value);
        let ts = zigzag(r.ts.wrapping_sub(prev_ts));
        prev_ts = r.ts;
        // The common record (fixed-size key and value) is written in place: no capacity
        // check per byte, and no copy. Strings and nested values take the general path.
        if r.key.as_ref().is_none_or(fixed_size) && fixed_size(&r.value) {
            let at = out.len();
            out.resize(at + Small::ROOM, 0);
            if let Some(room) = out.get_mut(at..).and_then(<[u8]>::first_chunk_mut) {
                let mut small = Small { room, len: 0 };
                small.put(head);
                small.varint(ts);
                if let Some(k) = &r.key {
                    small.payload(k);
                }
                small.payload(&r.value);
                let len = small.len;
                out.truncate(at + len);
                continue;
            }
            out.truncate(at);
        }
        out.push(head);
        put_varint(out, ts);
        if let Some(k) = &r.key {
            put_payload(out, k);
        }
        put_payload(out, &r.value);
    }
}

/// Whether `v`'s payload has a bounded size (at most 10 bytes): no string, bytes or nesting.
fn fixed_size(v: &Value) -> bool {
    matches!(
        v,
        Value::Null | Value::Bool(_) | Value::Int(_) | Value::Float(_)
    )
}

/// A record of fixed-size values packed in place, into room made for its worst case: a
/// tag, then three varints or floats, at most 31 of [`Small::ROOM`] bytes (so the index
/// mask never wraps).
struct Small<'a> {
    room: &'a mut [u8; Small::ROOM],
    len: usize,
}

impl Small<'_> {
    const ROOM: usize = 32;

    #[inline]
    fn put(&mut self, b: u8) {
        self.room[self.len & (Self::ROOM - 1)] = b;
        self.len += 1;
    }

    #[inline]
    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.put(v as u8 | 0x80);
            v >>= 7;
        }
        self.put(v as u8)
    }

    /// The payload of a [`fixed_size`] value (nothing for the others, which never come
    /// here).
    #[inline]
    fn payload(&mut self, v: &Value) {
        match v {
            Value::Int(i) => self.varint(zigzag(*i)),
            Value::Float(f) => {
                for b in f.to_le_bytes() {
                    self.put(b);
                }
            }
            // The tag says it all; the variable-size ones never come here.
            Value::Null
            | Value::Bool(_)
            | Value::Str(_)
            | Value::Bytes(_)
            | Value::List(_)
            | Value::Map(_) => {}
        }
    }
}

/// Decodes a batch [`encode_batch`] wrote, which must fill `bytes` exactly.
pub fn decode_batch(bytes: &[u8]) -> Result<Batch, CodecError> {
    let mut r = Reader::new(bytes);
    let batch = r.batch();
    batch.map_err(|m| r.error(m))
}

fn tag(v: &Value) -> u8 {
    match v {
        Value::Null => NULL,
        Value::Bool(false) => FALSE,
        Value::Bool(true) => TRUE,
        Value::Int(_) => INT,
        Value::Float(_) => FLOAT,
        Value::Str(_) => STR,
        Value::Bytes(_) => BYTES,
        Value::List(_) => LIST,
        Value::Map(_) => MAP,
    }
}

fn put_payload(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Null | Value::Bool(_) => {}
        Value::Int(i) => put_varint(out, zigzag(*i)),
        Value::Float(f) => out.extend_from_slice(&f.to_le_bytes()),
        Value::Str(s) => put_bytes(out, s.as_bytes()),
        Value::Bytes(b) => put_bytes(out, b),
        Value::List(items) => {
            put_varint(out, items.len() as u64);
            for i in items.iter() {
                out.push(tag(i));
                put_payload(out, i);
            }
        }
        Value::Map(entries) => {
            put_varint(out, entries.len() as u64);
            for (name, v) in entries.iter() {
                put_bytes(out, name.as_bytes());
                out.push(tag(v));
                put_payload(out, v);
            }
        }
    }
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

#[inline]
fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

#[inline]
fn zigzag(i: i64) -> u64 {
    ((i << 1) ^ (i >> 63)) as u64
}

#[inline]
fn unzigzag(u: u64) -> i64 {
    (u >> 1) as i64 ^ -((u & 1) as i64)
}

/// Appends `v` as a varint: operator state packed like the data plane ([`Unpacker`]).
#[inline]
pub fn put_u64(out: &mut Vec<u8>, v: u64) {
    put_varint(out, v);
}

/// Appends `v` as a zigzag varint.
#[inline]
pub fn put_i64(out: &mut Vec<u8>, v: i64) {
    put_varint(out, zigzag(v));
}

/// Appends `v`'s 8 bytes.
#[inline]
pub fn put_f64(out: &mut Vec<u8>, v: f64) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// Appends `v` as one byte.
#[inline]
pub fn put_bool(out: &mut Vec<u8>, v: bool) {
    out.push(if v { TRUE } else { FALSE });
}

/// Appends `v`: its type's tag byte and its payload, as a record's value is packed.
#[inline]
pub fn put_value(out: &mut Vec<u8>, v: &Value) {
    out.push(tag(v));
    put_payload(out, v);
}

/// Reads what [`put_bool`], [`put_u64`], [`put_i64`], [`put_f64`] and [`put_value`] wrote, in the same
/// order: operator state in the data plane's encoding (keyed accumulators take a few bytes
/// per key, against 40 and more in rkyv's archive). Every read checks the bytes left, a
/// count is checked against them, and values nest no deeper than [`MAX_VALUE_DEPTH`], as
/// for events; errors name the byte.
pub struct Unpacker<'a>(Reader<'a>);

impl<'a> Unpacker<'a> {
    /// Reads `bytes` from the start.
    pub fn new(bytes: &'a [u8]) -> Unpacker<'a> {
        let mut r = Reader::new(bytes);
        r.what = "packed state";
        Unpacker(r)
    }

    fn read<T>(
        &mut self,
        f: impl FnOnce(&mut Reader<'a>) -> Result<T, Malformed>,
    ) -> Result<T, CodecError> {
        f(&mut self.0).map_err(|m| self.0.error(m))
    }

    /// One byte.
    pub fn u8(&mut self) -> Result<u8, CodecError> {
        self.read(Reader::byte)
    }

    /// A [`put_bool`].
    pub fn bool(&mut self) -> Result<bool, CodecError> {
        self.read(|r| match r.byte()? {
            FALSE => Ok(false),
            TRUE => Ok(true),
            t => Err(Malformed::Tag(t)),
        })
    }

    /// A [`put_u64`].
    pub fn u64(&mut self) -> Result<u64, CodecError> {
        self.read(Reader::varint)
    }

    /// A [`put_i64`].
    pub fn i64(&mut self) -> Result<i64, CodecError> {
        self.read(|r| r.varint().map(unzigzag))
    }

    /// A [`put_f64`].
    pub fn f64(&mut self) -> Result<f64, CodecError> {
        self.read(|r| {
            let b = r.take(8)?;
            let mut f = [0; 8];
            f.copy_from_slice(b);
            Ok(f64::from_le_bytes(f))
        })
    }

    /// A [`put_value`].
    pub fn value(&mut self) -> Result<Value, CodecError> {
        self.read(|r| {
            let t = r.byte()?;
            r.value(t)
        })
    }

    /// A count ([`put_u64`]) of items that take at least `min_bytes` each (at least 1): a
    /// count the bytes left cannot hold is an error. Reserve room for at most
    /// [`MAX_RESERVE`] of them ahead of reading: every item may hold a count of its own.
    pub fn count(&mut self, min_bytes: usize) -> Result<usize, CodecError> {
        self.read(|r| r.count(min_bytes.max(1)))
    }

    /// Ensures every byte was read.
    pub fn finish(&self) -> Result<(), CodecError> {
        self.0.end().map_err(|m| self.0.error(m))
    }
}

/// What made packed bytes undecodable. One byte, so that the reader's results stay in
/// registers on the per-record path; [`Reader::error`] turns it into a [`CodecError`]
/// naming the byte it stopped at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Malformed {
    Short,
    Trailing,
    LongVarint,
    Count,
    Utf8,
    Deep,
    Tag(u8),
}

/// Most records a decoder reserves room for before reading them (the count is checked
/// against the bytes left, so this only bounds what a hostile count could reserve).
const MAX_RESERVE_RECORDS: usize = 1 << 16;

/// Most distinct map field names a decoder shares per event ([`Reader::name`]), and the
/// longest it shares.
const MAX_NAMES: usize = 32;
const MAX_NAME_BYTES: usize = 64;

/// `bytes` as a shared string, if they are UTF-8.
fn utf8(bytes: &[u8]) -> Result<Arc<str>, Malformed> {
    std::str::from_utf8(bytes)
        .map(Arc::from)
        .map_err(|_| Malformed::Utf8)
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
    /// Map field names met so far in this event, in order of first sight: the records of
    /// a batch mostly share their fields, so each name is allocated (and checked to be
    /// UTF-8) once per event and then shared, instead of once per record.
    names: Vec<Arc<str>>,
    /// What the bytes are, for errors: "packed event", "packed state".
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Reader<'a> {
        Reader {
            bytes,
            at: 0,
            names: Vec::new(),
            what: "packed event",
        }
    }

    /// The error for `m`, met at the current byte.
    fn error(&self, m: Malformed) -> CodecError {
        let (at, len, what) = (self.at, self.bytes.len(), self.what);
        CodecError(match m {
            Malformed::Short => format!("{what} cut short at byte {at} of {len}"),
            Malformed::Trailing => format!("{what}: {} bytes after its end", len - at),
            Malformed::LongVarint => format!("{what}: varint past 64 bits at byte {at}"),
            Malformed::Count => {
                format!("{what}: a count at byte {at} exceeds the {len} bytes present")
            }
            Malformed::Utf8 => format!("{what}: a string before byte {at} is not UTF-8"),
            Malformed::Deep => {
                format!("{what}: value nested deeper than {MAX_VALUE_DEPTH} levels")
            }
            Malformed::Tag(t) => format!("{what}: unknown value tag {t} at byte {at}"),
        })
    }

    fn batch(&mut self) -> Result<Batch, Malformed> {
        let first_seq = self.varint()?;
        let n = self.count(2)?;
        let mut records = Vec::with_capacity(n.min(MAX_RESERVE_RECORDS));
        let mut ts = 0i64;
        // Records are written straight into the vector by `extend` over an exact-size
        // iterator; a record returned from a fallible step and pushed went through the
        // stack and cost a stalled load each. After an error the rest are defaults, thrown
        // away. Chunks keep what a hostile count reserves bounded.
        let mut failed = None;
        while records.len() < n && failed.is_none() {
            let chunk = (n - records.len()).min(MAX_RESERVE_RECORDS);
            records.extend((0..chunk).map(|_| match failed {
                Some(_) => Record::default(),
                None => self.record(&mut ts).unwrap_or_else(|m| {
                    failed = Some(m);
                    Record::default()
                }),
            }));
        }
        if let Some(m) = failed {
            return Err(m);
        }
        self.end()?;
        Ok(Batch { first_seq, records })
    }

    /// One record; `ts` is the previous record's timestamp, and becomes this one's.
    #[inline(always)]
    fn record(&mut self, ts: &mut i64) -> Result<Record, Malformed> {
        let t = self.byte()?;
        *ts = ts.wrapping_add(unzigzag(self.varint()?));
        let ts = *ts;
        // The common records' scalars are read into registers, not through `value`.
        Ok(match (t >> 4, t & 0xf) {
            (INT, INT) => {
                let k = unzigzag(self.varint()?);
                let v = unzigzag(self.varint()?);
                Record {
                    key: Some(Value::Int(k)),
                    ts,
                    value: Value::Int(v),
                }
            }
            (NO_KEY, INT) => Record {
                key: None,
                ts,
                value: Value::Int(unzigzag(self.varint()?)),
            },
            (k, v) => {
                let key = match k {
                    NO_KEY => None,
                    k => Some(self.value(k)?),
                };
                let value = self.value(v)?;
                Record { key, ts, value }
            }
        })
    }

    /// Ensures nothing follows what was read.
    fn end(&self) -> Result<(), Malformed> {
        match self.at == self.bytes.len() {
            true => Ok(()),
            false => Err(Malformed::Trailing),
        }
    }

    #[inline]
    fn byte(&mut self) -> Result<u8, Malformed> {
        let b = *self.bytes.get(self.at).ok_or(Malformed::Short)?;
        self.at += 1;
        Ok(b)
    }

    /// A varint; one byte (the common timestamp delta) without a loop.
    #[inline]
    fn varint(&mut self) -> Result<u64, Malformed> {
        match self.bytes.get(self.at) {
            Some(&b) if b < 0x80 => {
                self.at += 1;
                Ok(u64::from(b))
            }
            _ => self.long_varint(),
        }
    }

    #[inline(never)]
    fn long_varint(&mut self) -> Result<u64, Malformed> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            // The tenth byte holds the top bit only.
            if shift == 63 && b > 1 {
                break;
            }
            v |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                return Ok(v);
            }
        }
        Err(Malformed::LongVarint)
    }

    /// A count of items taking at least `min_bytes` each: more than the bytes left can hold
    /// is an error, so a corrupt count never allocates.
    fn count(&mut self, min_bytes: usize) -> Result<usize, Malformed> {
        let n = self.varint()?;
        let left = (self.bytes.len() - self.at) as u64;
        if n > left / min_bytes as u64 {
            return Err(Malformed::Count);
        }
        Ok(n as usize)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        let end = self.at.checked_add(n).filter(|e| *e <= self.bytes.len());
        let end = end.ok_or(Malformed::Short)?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn sized(&mut self) -> Result<&'a [u8], Malformed> {
        let n = self.count(1)?;
        self.take(n)
    }

    fn str(&mut self) -> Result<Arc<str>, Malformed> {
        utf8(self.sized()?)
    }

    /// The name of a map's field number `i`: shared with an earlier record's field of the
    /// same name when there is one. When the maps of an event have one shape, field `i`
    /// finds its name at `names[i]` without a scan. Only short names are kept, so a field
    /// costs at most [`MAX_NAMES`] comparisons of that many bytes.
    fn name(&mut self, i: usize) -> Result<Arc<str>, Malformed> {
        let bytes = self.sized()?;
        let same = |n: &Arc<str>| n.as_bytes() == bytes;
        if let Some(n) = self.names.get(i).filter(|n| same(n)) {
            return Ok(n.clone());
        }
        if let Some(n) = self.names.iter().find(|n| same(n)) {
            return Ok(n.clone());
        }
        let name = utf8(bytes)?;
        if self.names.len() < MAX_NAMES && bytes.len() <= MAX_NAME_BYTES {
            self.names.push(name.clone());
        }
        Ok(name)
    }

    /// A record's key or value: the fixed-size ones inline, the rest through
    /// [`Reader::payload`].
    #[inline]
    fn value(&mut self, tag: u8) -> Result<Value, Malformed> {
        match tag {
            INT => Ok(Value::Int(unzigzag(self.varint()?))),
            NULL => Ok(Value::Null),
            FALSE => Ok(Value::Bool(false)),
            TRUE => Ok(Value::Bool(true)),
            _ => self.payload(tag, 0),
        }
    }

    #[inline(never)]
    fn payload(&mut self, tag: u8, depth: usize) -> Result<Value, Malformed> {
        if matches!(tag, LIST | MAP) && depth >= MAX_VALUE_DEPTH {
            return Err(Malformed::Deep);
        }
        Ok(match tag {
            NULL => Value::Null,
            FALSE => Value::Bool(false),
            TRUE => Value::Bool(true),
            INT => Value::Int(unzigzag(self.varint()?)),
            FLOAT => {
                let b = self.take(8)?;
                let mut f = [0; 8];
                f.copy_from_slice(b);
                Value::Float(f64::from_le_bytes(f))
            }
            STR => Value::Str(self.str()?),
            BYTES => Value::Bytes(Arc::from(self.sized()?)),
            LIST => {
                let n = self.count(1)?;
                let mut items = Vec::with_capacity(n.min(MAX_RESERVE));
                for _ in 0..n {
                    let t = self.byte()?;
                    items.push(self.payload(t, depth + 1)?);
                }
                Value::List(items.into())
            }
            MAP => {
                let n = self.count(2)?;
                let mut entries = Vec::with_capacity(n.min(MAX_RESERVE));
                for i in 0..n {
                    let name = self.name(i)?;
                    let t = self.byte()?;
                    entries.push((name, self.payload(t, depth + 1)?));
                }
                Value::Map(entries.into())
            }
            t => return Err(Malformed::Tag(t)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::tests::{random_value, sample_batch};
    use crate::value::mix64;

    /// Decodes `b` packed, and checks that the decoded batch packs to the same bytes (which
    /// tells apart what `Value`'s equality does not: `Int(1)` and `Float(1.0)`, NaNs).
    fn round_trip(b: &Batch) -> Batch {
        let mut out = Vec::new();
        encode_batch(b, &mut out);
        let decoded = decode_batch(&out).unwrap();
        let mut again = Vec::new();
        encode_batch(&decoded, &mut again);
        assert_eq!(again, out, "{b:?}");
        decoded
    }

    /// Ensures a batch larger than what the decoder reserves ahead is decoded in pieces,
    /// whole, and that an error in a later piece is still an error.
    #[test]
    fn batches_past_the_reserve_round_trip() {
        let n = MAX_RESERVE_RECORDS as i64 * 2 + 5;
        let b = Batch {
            first_seq: 3,
            records: (0..n)
                .map(|i| Record::keyed(Value::Int(i), i / 2, Value::Int(-i)))
                .collect(),
        };
        assert_eq!(round_trip(&b), b);
        let mut out = Vec::new();
        encode_batch(&b, &mut out);
        assert!(decode_batch(&out[..out.len() - 2]).is_err());
    }

    /// Ensures every kind of value, nesting, and extreme timestamps and seqs survive.
    #[test]
    fn batches_round_trip() {
        let b = sample_batch();
        assert_eq!(round_trip(&b), b);
        let extremes = Batch {
            first_seq: u64::MAX,
            records: [i64::MIN, i64::MAX, 0, -1, i64::MIN, 1]
                .into_iter()
                .map(|ts| Record::keyed(Value::Int(ts), ts, Value::Float(f64::MIN)))
                .collect(),
        };
        assert_eq!(round_trip(&extremes), extremes);
        let floats = Batch {
            first_seq: 0,
            records: [f64::NAN, -0.0, 0.0, 1.0, f64::INFINITY, -f64::NAN]
                .into_iter()
                .map(|f| Record::keyed(Value::Int(1), 0, Value::Float(f)))
                .chain([Record::keyed(Value::Float(1.0), 0, Value::Int(1))])
                .collect(),
        };
        let decoded = round_trip(&floats);
        for (got, want) in decoded.records.iter().zip(&floats.records) {
            match (&got.key, &got.value, &want.key, &want.value) {
                (Some(Value::Int(_)), Value::Float(a), _, Value::Float(b)) => {
                    assert_eq!(a.to_bits(), b.to_bits())
                }
                (Some(Value::Float(_)), Value::Int(1), Some(Value::Float(_)), _) => {}
                other => panic!("types changed: {other:?}"),
            }
        }
        assert_eq!(round_trip(&Batch::default()), Batch::default());
        let mut state = 0x9ac4_u64;
        for n in 0..300 {
            let b = Batch {
                first_seq: mix64(n),
                records: (0..n % 23)
                    .map(|i| Record {
                        key: (i % 3 != 0).then(|| random_value(&mut state, 2)),
                        ts: mix64(state ^ i) as i64 >> (i % 60),
                        value: random_value(&mut state, 3),
                    })
                    .collect(),
            };
            assert_eq!(round_trip(&b), b, "case {n}");
        }
    }

    /// Ensures the packed form of a keyed integer count's input is a fraction of rkyv's.
    #[test]
    fn flat_records_pack_small() {
        let b = Batch {
            first_seq: 1_000_000,
            records: (0..1000)
                .map(|i| {
                    Record::keyed(Value::Int(i % 10_000), 1_700_000_000_000 + i, Value::Int(i))
                })
                .collect(),
        };
        let mut packed = Vec::new();
        encode_batch(&b, &mut packed);
        let archived = crate::codec::encode(&b).unwrap().len();
        assert!(
            packed.len() * 5 < archived,
            "packed {} bytes, archived {archived}",
            packed.len()
        );
        assert!(packed.len() < 7 * 1000, "{} bytes", packed.len());
    }

    /// Ensures records of one shape share their map field names after decoding, that maps
    /// of other shapes (more names than are kept, nesting) still decode to what was
    /// encoded, and that a name that is not UTF-8 is still an error.
    #[test]
    fn map_field_names_are_shared() {
        let shaped = |i: i64| {
            Value::map([
                ("count", Value::Int(i)),
                ("key", Value::str("k")),
                ("inner", Value::map([("key", Value::Int(-i))])),
            ])
        };
        let wide = Value::map((0..MAX_NAMES as i64 + 8).map(|f| (format!("f{f}"), Value::Int(f))));
        let mut records: Vec<Record> = (0..4).map(|i| Record::new(i, shaped(i))).collect();
        records.push(Record::new(9, wide));
        records.push(Record::new(10, shaped(10)));
        let b = Batch {
            first_seq: 1,
            records,
        };
        let decoded = round_trip(&b);
        assert_eq!(decoded, b);
        let fields = |r: &Record| match &r.value {
            Value::Map(m) => m.clone(),
            other => panic!("not a map: {other:?}"),
        };
        let (first, last) = (fields(&decoded.records[0]), fields(&decoded.records[5]));
        for (a, b) in first.iter().zip(last.iter()) {
            assert!(Arc::ptr_eq(&a.0, &b.0), "{} is not shared", a.0);
        }
        let Value::Map(inner) = &first.iter().find(|(n, _)| &**n == "inner").unwrap().1 else {
            panic!("inner is not a map");
        };
        let key = &first.iter().find(|(n, _)| &**n == "key").unwrap().0;
        assert!(Arc::ptr_eq(key, &inner[0].0), "nested maps share names too");
        // One map with a field named by the bytes [0xff]: not UTF-8.
        let bad = [0, 1, NO_KEY << 4 | MAP, 0, 1, 1, 0xff, INT, 2];
        let err = decode_batch(&bad).unwrap_err();
        assert!(err.0.contains("not UTF-8"), "{err}");
    }

    /// Ensures truncated, corrupted or hostile input is an error, never a panic or a huge
    /// allocation.
    #[test]
    fn malformed_input_is_an_error() {
        let mut bytes = Vec::new();
        encode_batch(&sample_batch(), &mut bytes);
        for cut in 0..bytes.len() {
            assert!(decode_batch(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(decode_batch(&longer).is_err());
        let mut state = 7u64;
        for _ in 0..5000 {
            let mut b = bytes.clone();
            state = mix64(state + 1);
            let i = (state as usize) % b.len();
            b[i] ^= (state >> 8) as u8 | 1;
            let _ = decode_batch(&b);
        }
        // A count of 2^63 records, and a list nested past the limit.
        let mut huge = Vec::new();
        put_varint(&mut huge, 0);
        put_varint(&mut huge, 1 << 63);
        assert!(decode_batch(&huge).is_err());
        let mut deep = vec![0, 1, NO_KEY << 4 | LIST, 0];
        for _ in 0..MAX_VALUE_DEPTH + 1 {
            deep.extend_from_slice(&[1, LIST]);
        }
        deep.push(0);
        let err = decode_batch(&deep).unwrap_err();
        assert!(err.0.contains("nested deeper"), "{err}");
        assert!(decode_batch(&[0, 1, 0x09, 0]).is_err(), "unknown tag");
        // u64::MAX has a tenth byte of 1; anything above it is past 64 bits.
        let mut max = Vec::new();
        put_varint(&mut max, u64::MAX);
        assert_eq!(max.last(), Some(&1));
        max.push(0);
        assert_eq!(decode_batch(&max).unwrap().first_seq, u64::MAX);
        let over = [
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02, 0,
        ];
        let err = decode_batch(&over).unwrap_err();
        assert!(err.0.contains("past 64 bits"), "{err}");
        assert!(decode_batch(&[0, 0, 0xff]).is_err(), "trailing byte");
    }

    /// Ensures every kind of event round-trips, and a bad tag or trailing byte is an error.
    #[test]
    fn events_round_trip() {
        for ev in [
            StreamEvent::Data(sample_batch()),
            StreamEvent::Watermark(i64::MIN),
            StreamEvent::Watermark(-5),
            StreamEvent::Barrier(u64::MAX),
            StreamEvent::EndOfStream,
            StreamEvent::Marker(1_764_000_000_000),
        ] {
            let mut out = Vec::new();
            encode_event(&ev, &mut out);
            assert_eq!(decode_event(&out).unwrap(), ev);
            out.push(0);
            assert!(decode_event(&out).is_err(), "{ev:?} with a trailing byte");
        }
        assert!(decode_event(&[]).is_err());
        assert!(decode_event(&[4]).is_err());
    }
}
