//! Message framing: `uint32 length` then `length` bytes, the first of which is
//! the message type. A length of 0 or above [`MAX_MESSAGE_LEN`] ends the
//! connection before anything of the body is read.

use tokio::io::{AsyncRead, AsyncReadExt};

/// The largest message accepted, as in OpenSSH's `ssh-agent` (256 KiB).
pub const MAX_MESSAGE_LEN: usize = 256 * 1024;

/// How much a message buffer grows at a time while the body arrives.
const READ_STEP: usize = 16 * 1024;

/// Why no message could be read.
#[derive(Debug)]
pub enum FrameError {
    /// The peer closed the connection between messages: a normal end.
    Closed,
    /// The length header said 0.
    Empty,
    /// The length header exceeds [`MAX_MESSAGE_LEN`].
    TooLong(u32),
    /// The connection failed, or closed in the middle of a message.
    Io(std::io::Error),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Closed => f.write_str("connection closed"),
            Self::Empty => f.write_str("message of length 0"),
            Self::TooLong(n) => write!(f, "message length {n} exceeds {MAX_MESSAGE_LEN}"),
            Self::Io(e) => write!(f, "{e}"),
        }
    }
}

/// Checks a length header; returns the body length.
pub fn check_len(header: [u8; 4]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header);
    match usize::try_from(len) {
        Ok(0) => Err(FrameError::Empty),
        Ok(n) if n <= MAX_MESSAGE_LEN => Ok(n),
        _ => Err(FrameError::TooLong(len)),
    }
}

/// Reads one message body (type byte first) into `buf`, replacing its
/// contents. `buf` never grows beyond [`MAX_MESSAGE_LEN`].
pub async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
) -> Result<(), FrameError> {
    let mut header = [0u8; 4];
    let mut got = 0;
    while got < header.len() {
        let rest = header.get_mut(got..).unwrap_or_default();
        match reader.read(rest).await {
            Ok(0) if got == 0 => return Err(FrameError::Closed),
            Ok(0) => {
                return Err(FrameError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
            Ok(n) => got += n,
            Err(e) => return Err(FrameError::Io(e)),
        }
    }
    let len = check_len(header)?;
    // The buffer grows with the bytes that actually arrive, not with the
    // length announced: a client that sends a 256 KiB header and then stalls
    // costs a few KiB, not the cap. Growth doubles (for few reallocations)
    // but never past `len`, and unread capacity is never written to.
    buf.clear();
    while buf.len() < len {
        let got = buf.len();
        let want = (len - got).min(READ_STEP);
        if buf.capacity() == got {
            let target = buf.capacity().saturating_mul(2).max(got + want).min(len);
            buf.reserve_exact(target - got);
        }
        let rest = u64::try_from(len - got).unwrap_or(u64::MAX);
        let n = (&mut *reader)
            .take(rest)
            .read_buf(buf)
            .await
            .map_err(FrameError::Io)?;
        if n == 0 {
            return Err(FrameError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
    }
    Ok(())
}

/// A message body and the bytes after it.
pub type Split<'a> = (&'a [u8], &'a [u8]);

/// Splits complete frames off the front of `bytes` (for synchronous callers
/// and the fuzz target): `Ok(Some((body, rest)))`, `Ok(None)` when more bytes
/// are needed, or the framing error.
pub fn split_frame(bytes: &[u8]) -> Result<Option<Split<'_>>, FrameError> {
    let Some((header, rest)) = bytes.split_first_chunk::<4>() else {
        return Ok(None);
    };
    let len = check_len(*header)?;
    Ok(rest.split_at_checked(len))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read(bytes: &[u8]) -> Result<Vec<u8>, FrameError> {
        let mut buf = Vec::new();
        let mut r = bytes;
        read_frame(&mut r, &mut buf).await.map(|()| buf)
    }

    #[tokio::test]
    async fn reads_a_frame() {
        assert_eq!(read(&[0, 0, 0, 1, 11]).await.unwrap(), vec![11]);
    }

    #[tokio::test]
    async fn clean_close_between_frames() {
        assert!(matches!(read(&[]).await, Err(FrameError::Closed)));
    }

    #[tokio::test]
    async fn truncated_header_and_body_are_errors() {
        assert!(matches!(read(&[0, 0]).await, Err(FrameError::Io(_))));
        assert!(matches!(
            read(&[0, 0, 0, 5, 13]).await,
            Err(FrameError::Io(_))
        ));
    }

    #[tokio::test]
    async fn zero_and_oversized_lengths_are_refused_before_reading() {
        assert!(matches!(read(&[0, 0, 0, 0]).await, Err(FrameError::Empty)));
        // A 2 GiB header: refused without allocating.
        assert!(matches!(
            read(&[0x80, 0, 0, 0]).await,
            Err(FrameError::TooLong(0x8000_0000))
        ));
        let over = (MAX_MESSAGE_LEN as u32 + 1).to_be_bytes();
        assert!(matches!(read(&over).await, Err(FrameError::TooLong(_))));
    }

    #[tokio::test]
    async fn a_stalled_message_costs_what_was_sent_not_what_was_announced() {
        // Announces the cap, sends 100 bytes, then stalls (the mock reader
        // would block forever after its script).
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        let mut msg = (MAX_MESSAGE_LEN as u32).to_be_bytes().to_vec();
        msg.extend([13u8; 100]);
        tokio::io::AsyncWriteExt::write_all(&mut client, &msg)
            .await
            .unwrap();
        let mut buf = Vec::new();
        let read = tokio::time::timeout(
            std::time::Duration::from_millis(100),
            read_frame(&mut server, &mut buf),
        )
        .await;
        assert!(read.is_err(), "still waiting for the rest");
        assert_eq!(buf.len(), 100);
        assert!(buf.capacity() <= READ_STEP, "{}", buf.capacity());
    }

    #[tokio::test]
    async fn capacity_never_exceeds_the_message() {
        // Also with a buffer left over from an earlier, smaller message.
        let mut buf: Vec<u8> = Vec::with_capacity(10_000);
        for len in [
            1,
            100,
            READ_STEP - 1,
            READ_STEP,
            READ_STEP + 1,
            100_000,
            MAX_MESSAGE_LEN - 1,
            MAX_MESSAGE_LEN,
        ] {
            let mut msg = (len as u32).to_be_bytes().to_vec();
            msg.resize(4 + len, 9);
            let before = buf.capacity();
            let mut r = &msg[..];
            read_frame(&mut r, &mut buf).await.unwrap();
            assert_eq!(buf.len(), len);
            assert!(
                buf.capacity() <= len.max(before) && buf.capacity() <= MAX_MESSAGE_LEN,
                "{len}: {before} -> {}",
                buf.capacity()
            );
            assert!(buf.iter().all(|&b| b == 9));
        }
    }

    #[tokio::test]
    async fn the_cap_itself_is_accepted() {
        let mut msg = (MAX_MESSAGE_LEN as u32).to_be_bytes().to_vec();
        msg.resize(4 + MAX_MESSAGE_LEN, 7);
        assert_eq!(read(&msg).await.unwrap().len(), MAX_MESSAGE_LEN);
    }

    #[test]
    fn split_frame_handles_partial_input() {
        assert!(matches!(split_frame(&[0, 0]), Ok(None)));
        assert!(matches!(split_frame(&[0, 0, 0, 2, 1]), Ok(None)));
        let (body, rest) = split_frame(&[0, 0, 0, 1, 11, 9]).unwrap().unwrap();
        assert_eq!((body, rest), (&[11u8][..], &[9u8][..]));
    }
}
