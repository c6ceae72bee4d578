//! rkyv encoding of messages, cache requests and operator state; the [`packed`] encoding of
//! stream events, which the data plane carries and DCAS logs and retains.
//!
//! Encoding happens at process boundaries, in snapshots, and (packed) for what DCAS logs
//! and retains; a job without DCAS never encodes what stays in process. Decoding validates the bytes first (`bytecheck`, or the packed decoder's own
//! checks), so a corrupted or truncated frame is an error, never undefined behaviour or a
//! panic.

pub mod packed;

use rkyv::rancor;
use rkyv::util::AlignedVec;

/// A frame or snapshot that could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CodecError(pub String);

/// The serializer [`encode`] runs: rkyv's high-level one, into an [`AlignedVec`].
pub type Serializer<'a> = rkyv::api::high::HighSerializer<
    AlignedVec,
    rkyv::ser::allocator::ArenaHandle<'a>,
    rancor::Error,
>;

/// Encodes any rkyv-serializable value.
pub fn encode<T: for<'a> rkyv::Serialize<Serializer<'a>>>(
    value: &T,
) -> Result<AlignedVec, CodecError> {
    encode_sized(value, 0)
}

/// Encodes into a buffer of `capacity` bytes reserved up front, so a large batch is not
/// copied again and again while the buffer grows.
pub fn encode_sized<T: for<'a> rkyv::Serialize<Serializer<'a>>>(
    value: &T,
    capacity: usize,
) -> Result<AlignedVec, CodecError> {
    encode_in(value, AlignedVec::with_capacity(capacity))
}

/// Encodes into `buf`, which is empty.
fn encode_in<T: for<'a> rkyv::Serialize<Serializer<'a>>>(
    value: &T,
    buf: AlignedVec,
) -> Result<AlignedVec, CodecError> {
    rkyv::api::high::to_bytes_in::<_, rancor::Error>(value, buf)
        .map_err(|e| CodecError(format!("encode failed: {e}")))
}

/// A reusable encoding buffer, one per connection writer: frames are encoded into memory
/// already faulted in instead of a fresh allocation each. A buffer that grew past
/// [`Encoder::KEEP`] bytes (a large snapshot) is let go before the next frame.
#[derive(Default)]
pub struct Encoder {
    buf: AlignedVec,
}

impl Encoder {
    /// Largest buffer kept between frames.
    pub const KEEP: usize = 4 << 20;

    /// Encodes `value`; the bytes live until the next call.
    pub fn encode<T: for<'a> rkyv::Serialize<Serializer<'a>>>(
        &mut self,
        value: &T,
    ) -> Result<&[u8], CodecError> {
        let mut buf = std::mem::take(&mut self.buf);
        if buf.capacity() > Self::KEEP {
            buf = AlignedVec::new();
        }
        buf.clear();
        self.buf = encode_in(value, buf)?;
        Ok(&self.buf)
    }
}

/// Validates and decodes bytes produced by [`encode`]. Copies into an aligned buffer when
/// the input is not aligned, so any byte slice is accepted.
pub fn decode<T>(bytes: &[u8]) -> Result<T, CodecError>
where
    T: rkyv::Archive,
    T::Archived: for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, rancor::Error>>
        + rkyv::Deserialize<T, rkyv::api::high::HighDeserializer<rancor::Error>>,
{
    let decoded = if (bytes.as_ptr() as usize).is_multiple_of(16) {
        rkyv::from_bytes::<T, rancor::Error>(bytes)
    } else {
        let mut aligned = AlignedVec::<16>::with_capacity(bytes.len());
        aligned.extend_from_slice(bytes);
        rkyv::from_bytes::<T, rancor::Error>(&aligned)
    };
    decoded.map_err(|e| CodecError(format!("invalid frame: {e}")))
}

/// Deepest list/map nesting accepted in a decoded value.
pub const MAX_VALUE_DEPTH: usize = 128;

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::record::{Batch, Record, StreamEvent};
    use crate::value::{mix64, Value};

    fn encode_event(event: &StreamEvent) -> Result<AlignedVec, CodecError> {
        encode(event)
    }

    fn decode_event(bytes: &[u8]) -> Result<StreamEvent, CodecError> {
        decode(bytes)
    }

    pub(crate) fn sample_batch() -> Batch {
        Batch {
            first_seq: 41,
            records: vec![
                Record::new(5, Value::Int(7)),
                Record::keyed(Value::str("k"), -3, Value::map([("a", Value::Float(1.5))])),
                Record::new(
                    0,
                    Value::list(vec![
                        Value::Null,
                        Value::Bool(true),
                        Value::Bytes(vec![1u8, 2].into()),
                    ]),
                ),
            ],
        }
    }

    #[test]
    fn encoder_reuses_its_buffer_and_lets_a_huge_one_go() {
        let mut enc = Encoder::default();
        let small = StreamEvent::Data(sample_batch());
        let huge = StreamEvent::Data(Batch {
            first_seq: 0,
            records: vec![Record::new(
                1,
                Value::Bytes(vec![7u8; Encoder::KEEP].into()),
            )],
        });
        for ev in [&small, &huge, &small, &StreamEvent::Watermark(3), &small] {
            let bytes = enc.encode(ev).unwrap().to_vec();
            assert_eq!(decode_event(&bytes).unwrap(), *ev);
            assert_eq!(bytes, encode_event(ev).unwrap().as_slice());
        }
        assert!(
            enc.buf.capacity() <= Encoder::KEEP,
            "the huge buffer was kept"
        );
    }

    #[test]
    fn batch_round_trips() {
        let ev = StreamEvent::Data(sample_batch());
        let bytes = encode_event(&ev).unwrap();
        assert_eq!(decode_event(&bytes).unwrap(), ev);
        for ev in [
            StreamEvent::Watermark(-5),
            StreamEvent::Barrier(9),
            StreamEvent::EndOfStream,
        ] {
            assert_eq!(decode_event(&encode_event(&ev).unwrap()).unwrap(), ev);
        }
    }

    /// A deterministic random `Value` of bounded depth.
    pub(crate) fn random_value(state: &mut u64, depth: u32) -> Value {
        *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let r = mix64(*state);
        let pick = if depth == 0 { r % 6 } else { r % 8 };
        match pick {
            0 => Value::Null,
            1 => Value::Bool(r & 1 == 1),
            2 => Value::Int((r >> 3) as i64 - (1 << 59)),
            3 => Value::Float((r >> 11) as f64 / 3.0 - 1e15),
            4 => Value::from(format!("s{}-\u{e9}\u{1F600}", r % 1000)),
            5 => Value::Bytes((0..(r % 9) as u8).collect::<Vec<u8>>().into()),
            6 => Value::list((0..r % 4).map(|_| random_value(state, depth - 1)).collect()),
            _ => Value::map(
                (0..r % 4)
                    .map(|i| (format!("f{i}"), random_value(state, depth - 1)))
                    .collect::<Vec<_>>(),
            ),
        }
    }

    /// Ensures that random batches of random values survive an encode/decode round trip.
    #[test]
    fn random_batches_round_trip() {
        let seed = 0x5eed_u64;
        println!("seed {seed}");
        let mut state = seed;
        for n in 0..200 {
            let records = (0..n % 17)
                .map(|i| Record {
                    key: if i % 2 == 0 {
                        None
                    } else {
                        Some(random_value(&mut state, 2))
                    },
                    ts: mix64(state ^ i) as i64,
                    value: random_value(&mut state, 3),
                })
                .collect();
            let ev = StreamEvent::Data(Batch {
                first_seq: mix64(n),
                records,
            });
            let decoded = decode_event(&encode_event(&ev).unwrap()).unwrap();
            // NaN != NaN under total order is fine: total_cmp treats equal bit patterns as equal.
            assert_eq!(decoded, ev, "seed {seed} case {n}");
        }
    }

    /// Ensures that truncated or corrupted frames are rejected with an error, not a panic.
    #[test]
    fn corrupt_frames_are_errors() {
        let bytes = encode_event(&StreamEvent::Data(sample_batch())).unwrap();
        for cut in 0..bytes.len() {
            let _ = decode_event(&bytes[..cut]);
        }
        let mut state = 1u64;
        for _ in 0..2000 {
            let mut b = bytes.to_vec();
            state = mix64(state + 1);
            let i = (state as usize) % b.len();
            b[i] ^= (state >> 8) as u8 | 1;
            let _ = decode_event(&b);
        }
        assert!(decode_event(&[]).is_err());
        assert!(decode_event(&[0xff; 7]).is_err());
    }
}
