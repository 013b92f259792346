//! The pool of upstream connections: idle connections checked for being in
//! step before reuse, connects bounded in number and retried (with jitter)
//! while the agent's listen backlog is full, one round trip at a time on a
//! connection.
//!
//! Never: reuses a connection whose last answer was not read whole, or
//! retries a connect after an error other than a full backlog.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::PoisonError;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::socket::{recv, MsgFlags};
use tokio::io::BufReader;
use tokio::net::UnixStream;
use tokio::time::{timeout_at, Instant};

use super::stream::Stream;
use super::{UpstreamBackend, CONNECT_RETRY_MAX, CONNECT_RETRY_MIN};
use crate::backend::BackendError;
use crate::protocol::{read_frame, FrameError};

/// Read buffer of an upstream connection: a sign answer (and a short
/// listing) arrives whole in one read, header and body together.
pub(super) const UPSTREAM_READ_BUFFER: usize = 2048;

/// One upstream connection and its message buffer. Reads go through a
/// buffer, so an answer costs one `recv`, not one for its header and one for
/// its body; bytes left in it after an answer mean the connection is out of
/// step (it is then never reused, see [`Conn::is_open`]).
#[derive(Debug)]
pub(super) struct Conn {
    pub(super) stream: BufReader<Stream>,
    pub(super) buf: Vec<u8>,
}

/// How one round trip failed.
pub(super) enum Trip {
    /// Nothing of an answer arrived: the peer had closed the connection.
    /// On a reused connection the request is worth one more try.
    ClosedBeforeAnswer(String),
    /// Anything else: the connection is dropped.
    Failed(String),
}

impl UpstreamBackend {
    /// An idle connection the agent has not closed, if there is one.
    pub(super) fn checkout(&self) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some(conn) = idle.pop() {
            if conn.is_open() {
                return Some(conn);
            }
        }
        None
    }

    pub(super) fn checkin(&self, mut conn: Conn) {
        if conn.buf.capacity() > 16 * 1024 {
            conn.buf = Vec::new();
        }
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(conn);
    }

    /// Connects, retrying while the agent's listen backlog is full (EAGAIN),
    /// until `deadline`. Any other error fails at once.
    pub(super) async fn connect(&self, deadline: Instant) -> Result<UnixStream, BackendError> {
        let _permit = timeout_at(deadline, self.connects.acquire())
            .await
            .map_err(|_| BackendError::Timeout)?
            .map_err(|_| BackendError::Broken("connection pool closed".into()))?;
        let mut delay = CONNECT_RETRY_MIN;
        loop {
            match timeout_at(deadline, UnixStream::connect(&self.socket)).await {
                Err(_) => return Err(BackendError::Timeout),
                Ok(Ok(stream)) => return Ok(stream),
                Ok(Err(e)) if e.raw_os_error() == Some(Errno::EAGAIN as i32) => {
                    self.connect_retries.fetch_add(1, Ordering::Relaxed);
                    let pause = jittered(delay);
                    if Instant::now() + pause >= deadline {
                        return Err(BackendError::Timeout);
                    }
                    tokio::time::sleep(pause).await;
                    delay = (delay * 2).min(CONNECT_RETRY_MAX);
                }
                Ok(Err(e)) => return Err(BackendError::Unreachable(e)),
            }
        }
    }
}

impl Conn {
    /// Whether this idle connection is still in step: nothing left in its
    /// buffer, and nothing (an answer nobody asked for, or end of file)
    /// readable on it. The kernel is asked only when the runtime has seen
    /// the socket become readable since it was last drained: an idle
    /// connection normally has not, and one the agent closed without the
    /// runtime noticing yet fails its request with "closed before the
    /// answer", which is retried on a fresh connection.
    pub(super) fn is_open(&self) -> bool {
        if !self.stream.buffer().is_empty() {
            return false;
        }
        if !self.stream.get_ref().seen_readable() {
            return true;
        }
        let mut byte = [0u8; 1];
        matches!(
            recv(
                self.stream.get_ref().as_raw_fd(),
                &mut byte,
                MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT
            ),
            Err(Errno::EAGAIN)
        )
    }

    pub(super) async fn round_trip(&mut self, frame: &[u8]) -> Result<(), Trip> {
        self.stream.get_ref().write_all(frame).await.map_err(|e| {
            if matches!(
                e.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            ) {
                Trip::ClosedBeforeAnswer(e.to_string())
            } else {
                Trip::Failed(e.to_string())
            }
        })?;
        match read_frame(&mut self.stream, &mut self.buf).await {
            Ok(()) => Ok(()),
            Err(FrameError::Closed) => Err(Trip::ClosedBeforeAnswer("connection closed".into())),
            Err(FrameError::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                Err(Trip::ClosedBeforeAnswer(e.to_string()))
            }
            Err(e) => Err(Trip::Failed(e.to_string())),
        }
    }
}

/// `base` give or take half, so that connects retried after one burst do
/// not all come back at the same instant.
pub(super) fn jittered(base: Duration) -> Duration {
    let random = RandomState::new().build_hasher().finish();
    let nanos = u64::try_from(base.as_nanos()).unwrap_or(u64::MAX).max(2);
    Duration::from_nanos(nanos / 2 + random % nanos)
}
