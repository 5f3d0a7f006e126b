//! QEMU's stream netdev framing: each Ethernet frame follows its length as a 4-byte
//! big-endian integer (QEMU's net/stream.c, the same as the older socket netdev).

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::limits::MAX_FRAME;

/// Reads one frame; `None` at a clean end of stream. A length of zero or above
/// [`MAX_FRAME`] is an error: the peer is not speaking the protocol.
pub async fn read_frame<R: AsyncRead + Unpin>(reader: &mut R) -> io::Result<Option<Vec<u8>>> {
    let mut header = [0u8; 4];
    match reader.read_exact(&mut header).await {
        Ok(_) => {}
        Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(err) => return Err(err),
    }
    let len = u32::from_be_bytes(header) as usize;
    if len == 0 || len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame length {len} is outside 1..={MAX_FRAME}"),
        ));
    }
    let mut frame = vec![0u8; len];
    reader.read_exact(&mut frame).await?;
    Ok(Some(frame))
}

/// Appends `frame` with its length header to `out`.
pub fn encode_frame(frame: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(frame.len() as u32).to_be_bytes());
    out.extend_from_slice(frame);
}

/// Writes out what [`encode_frame`] gathered.
pub async fn write_frames<W: AsyncWrite + Unpin>(writer: &mut W, frames: &[u8]) -> io::Result<()> {
    writer.write_all(frames).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_bad_lengths_are_refused() {
        let mut out = Vec::new();
        encode_frame(&[1, 2, 3], &mut out);
        encode_frame(&[4; 60], &mut out);
        assert_eq!(&out[..4], &[0, 0, 0, 3]);
        let mut reader = &out[..];
        assert_eq!(read_frame(&mut reader).await.unwrap(), Some(vec![1, 2, 3]));
        assert_eq!(read_frame(&mut reader).await.unwrap(), Some(vec![4; 60]));
        assert_eq!(read_frame(&mut reader).await.unwrap(), None);

        for bad in [0u32, MAX_FRAME as u32 + 1, u32::MAX] {
            let bytes = bad.to_be_bytes();
            let err = read_frame(&mut &bytes[..]).await.unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{bad}");
        }
        // A frame cut short is an error, not a clean end.
        let mut cut = Vec::new();
        encode_frame(&[9; 10], &mut cut);
        cut.truncate(8);
        assert!(read_frame(&mut &cut[..]).await.is_err());
    }
}
