//! A Unix stream socket registered with the async runtime for reading only
//! (the upstream backend's connections to the agent).
//!
//! A socket registered for writing too gets an event each time its peer
//! reads what was sent (the buffer has room again), and a daemon thread
//! asleep in `epoll_wait` is woken for nothing: once per request on an
//! upstream connection, 10 to 60 µs after the request was sent (about one
//! `epoll_wait` more per signature). Client connections keep tokio's own
//! streams: there, taking a stream over costs two `epoll_ctl` per
//! connection and gains nothing measurable.
//! Requests and answers are small and socket buffers large, so a send
//! normally completes at once; when it cannot (the peer is not reading), the
//! writer waits for room through a second, temporary registration of a
//! duplicate of the descriptor, for writing only, dropped once there is
//! room.
//!
//! Never: raises SIGPIPE (sends use MSG_NOSIGNAL), blocks a thread, or
//! decides anything about what it carries.

use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::task::{Context, Poll};

use nix::errno::Errno;
use nix::sys::socket::{send, MsgFlags};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, Interest, ReadBuf};

/// A Unix stream registered for reading only (see the module's doc).
#[derive(Debug)]
pub struct Stream {
    fd: AsyncFd<std::os::unix::net::UnixStream>,
}

/// Registers `stream` with the current runtime for `interest`.
fn register(
    stream: std::os::unix::net::UnixStream,
    interest: Interest,
) -> io::Result<AsyncFd<std::os::unix::net::UnixStream>> {
    // SAFETY: the `UnixStream` owns its descriptor: it stays open, and is
    // the same one, until the `AsyncFd` (which owns the stream) drops it.
    unsafe { AsyncFd::register_with_interest(stream, interest) }
        .map_err(|e| io::Error::other(e.to_string()))
}

impl Stream {
    /// Takes over a connected stream (moving it off the runtime's
    /// read-and-write registration).
    pub fn new(stream: tokio::net::UnixStream) -> io::Result<Self> {
        let std = stream.into_std()?;
        Ok(Self {
            fd: register(std, Interest::READABLE)?,
        })
    }

    /// Whether the runtime has seen the socket become readable (data, end
    /// of file) since it was last drained. Asks the kernel nothing.
    pub fn seen_readable(&self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        self.fd.poll_read_ready(&mut cx).is_ready()
    }

    /// Sends all of `buf`, waiting for room when the peer is slow to read.
    pub async fn write_all(&self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            let flags = MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT;
            match send(self.fd.as_raw_fd(), buf, flags) {
                Ok(n) => buf = buf.get(n..).unwrap_or_default(),
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => self.room().await?,
                Err(e) => return Err(io::Error::from(e)),
            }
        }
        Ok(())
    }

    /// Waits until the socket has room to send: a duplicate descriptor,
    /// registered for writing only, for as long as this waits. (epoll keys
    /// its registrations by descriptor, so the duplicate is one of its own;
    /// registering it reports the socket at once if it has room already.)
    async fn room(&self) -> io::Result<()> {
        let dup = register(self.fd.get_ref().try_clone()?, Interest::WRITABLE)?;
        let _ = dup.writable().await?;
        Ok(())
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = match self.fd.poll_read_ready(cx) {
                Poll::Ready(Ok(guard)) => guard,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            };
            // Read into the buffer's unfilled part without initialising it
            // first: a large, mostly unread capacity (a frame announced at
            // 256 KiB of which little arrived) is never written to, so it
            // costs no memory.
            // SAFETY: only bytes `recv` reports written are marked as
            // initialised and filled.
            let unfilled = unsafe { buf.unfilled_mut() };
            let want = unfilled.len();
            let read = guard.try_io(|fd| {
                // SAFETY: the pointer and length describe `unfilled`, which
                // outlives the call; `recv` writes at most `want` bytes.
                let n = unsafe {
                    nix::libc::recv(fd.as_raw_fd(), unfilled.as_mut_ptr().cast(), want, 0)
                };
                usize::try_from(n).map_err(|_| io::Error::last_os_error())
            });
            match read {
                Ok(Ok(n)) => {
                    // A short read drained the socket: the next read waits
                    // for the runtime rather than asking the kernel first
                    // (as tokio's own streams do).
                    if n < want {
                        guard.clear_ready();
                    }
                    // SAFETY: `recv` wrote these `n` bytes.
                    unsafe { buf.assume_init(n) };
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn a_slow_reader_gets_everything_once_it_reads() {
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        let (a, b) = (Stream::new(a).unwrap(), Stream::new(b).unwrap());
        // Far more than a socket buffer holds: the writer must wait for room.
        let data: Vec<u8> = (0..4 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
        let expected = data.clone();
        let writer = tokio::spawn(async move {
            a.write_all(&data).await.unwrap();
            a
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!writer.is_finished());
        let mut got = vec![0; expected.len()];
        let mut b = b;
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(got, expected);
        drop(writer.await.unwrap());
        // The writer is gone: end of file.
        assert_eq!(b.read(&mut [0; 8]).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn a_send_to_a_closed_peer_fails_without_sigpipe() {
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        let a = Stream::new(a).unwrap();
        drop(b);
        let e = a.write_all(b"hello").await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
    }
}
