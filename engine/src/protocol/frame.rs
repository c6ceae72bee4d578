//! Length-prefixed frames: `u32` little-endian payload length, then the payload.
//!
//! A reader never trusts the length: anything above [`MAX_FRAME`] is an error (the peer is
//! broken or hostile), so a corrupted length cannot make the process allocate gigabytes.
//! Decoding errors close the connection they came from; they never panic the process.

use std::io;

use rkyv::util::AlignedVec;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::codec::{decode, encode, CodecError, Serializer};

/// Largest accepted payload: 64 MiB.
pub const MAX_FRAME: usize = 64 << 20;

/// Error reading or decoding a frame.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The socket failed or closed mid-frame.
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    /// The length prefix exceeds [`MAX_FRAME`].
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    /// The payload is not a valid message.
    #[error("undecodable frame: {0}")]
    Decode(#[from] CodecError),
}

/// Writes one frame holding `msg`.
pub async fn write_msg<W, T>(w: &mut W, msg: &T) -> Result<(), FrameError>
where
    W: AsyncWrite + Unpin,
    T: for<'a> rkyv::Serialize<Serializer<'a>>,
{
    let bytes = encode(msg)?;
    write_frame(w, &bytes).await
}

/// Writes one frame with `payload`.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    payload: &[u8],
) -> Result<(), FrameError> {
    if payload.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(payload.len()));
    }
    w.write_all(&(payload.len() as u32).to_le_bytes()).await?;
    w.write_all(payload).await?;
    Ok(())
}

/// Bytes a connection reads ahead of the frame it decodes. Reading a frame from the socket
/// itself costs a `recv` for its length, one for its payload and, once drained, one that
/// finds nothing: three system calls per frame, on connections that carry thousands of
/// small frames a second (cache appends, their replication, acks). Read through a buffer,
/// frames that arrived together cost one.
pub const READ_AHEAD: usize = 64 << 10;

/// `r` read through a [`READ_AHEAD`] buffer: how every connection reads its frames.
pub fn buffered<R: AsyncRead>(r: R) -> tokio::io::BufReader<R> {
    tokio::io::BufReader::with_capacity(READ_AHEAD, r)
}

/// Reads one frame's payload into `buf`; `Ok(false)` on a clean end of stream before a frame.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut AlignedVec<16>,
) -> Result<bool, FrameError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(false),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    // Every byte is read over: only growth beyond the last frame's length is zeroed.
    buf.resize(len, 0);
    r.read_exact(buf.as_mut_slice()).await?;
    Ok(true)
}

/// Reads and decodes one message; `Ok(None)` on a clean end of stream.
pub async fn read_msg<R, T>(r: &mut R, buf: &mut AlignedVec<16>) -> Result<Option<T>, FrameError>
where
    R: AsyncRead + Unpin,
    T: rkyv::Archive,
    T::Archived: for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, rkyv::rancor::Error>>
        + rkyv::Deserialize<T, rkyv::api::high::HighDeserializer<rkyv::rancor::Error>>,
{
    if !read_frame(r, buf).await? {
        return Ok(None);
    }
    Ok(Some(decode(buf.as_slice())?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::StreamEvent;

    #[tokio::test]
    async fn frames_round_trip_and_reject_garbage() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        write_msg(&mut a, &StreamEvent::Watermark(7)).await.unwrap();
        write_frame(&mut a, &[1, 2, 3]).await.unwrap();
        a.write_all(&u32::MAX.to_le_bytes()).await.unwrap();
        let mut buf = AlignedVec::new();
        let ev: Option<StreamEvent> = read_msg(&mut b, &mut buf).await.unwrap();
        assert_eq!(ev, Some(StreamEvent::Watermark(7)));
        let bad = read_msg::<_, StreamEvent>(&mut b, &mut buf).await;
        assert!(matches!(bad, Err(FrameError::Decode(_))), "{bad:?}");
        let huge = read_msg::<_, StreamEvent>(&mut b, &mut buf).await;
        assert!(matches!(huge, Err(FrameError::TooLarge(_))), "{huge:?}");
        drop(a);
        assert!(read_msg::<_, StreamEvent>(&mut b, &mut buf)
            .await
            .unwrap()
            .is_none());
    }
}
