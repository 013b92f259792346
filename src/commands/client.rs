//! A small blocking agent-protocol client for the commands: one Unix socket
//! connection (to the upstream agent, or to the proxy), one request at a
//! time, every step under a deadline so that a command never hangs.
//!
//! Messages are ssh-agent-lib's [`Request`] and [`Response`]; this client
//! adds what the commands need around them:
//! - answers are read with the proxy's own capped framing
//!   ([`crate::protocol::read_frame`], 256 KiB), so a misbehaving peer cannot
//!   make a command allocate without bound;
//! - requests are encoded into a zeroizing buffer of exactly the right size,
//!   so a private key sent with ADD_IDENTITY leaves no copy behind in a
//!   reallocated or dropped plain `Vec<u8>`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ssh_agent_lib::proto::{Identity, Request, Response};
use ssh_encoding::{Decode, Encode, Reader};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::runtime::Runtime;
use zeroize::Zeroizing;

use crate::protocol::{read_frame, FrameError, MAX_MESSAGE_LEN};

/// Why a call gave no answer.
#[derive(Debug)]
pub enum ClientError {
    /// The socket could not be connected to.
    Connect(std::io::Error),
    /// No answer (or no connection) within the deadline.
    Timeout(Duration),
    /// The connection broke or was closed.
    Io(String),
    /// The answer could not be decoded, or the request not encoded.
    Protocol(String),
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Connect(e) => write!(f, "{e}"),
            Self::Timeout(t) => write!(f, "no answer within {} s", t.as_secs()),
            Self::Io(e) => f.write_str(e),
            Self::Protocol(e) => write!(f, "unexpected answer: {e}"),
        }
    }
}

/// One connection to an agent socket.
pub struct AgentClient {
    runtime: Runtime,
    stream: UnixStream,
    timeout: Duration,
    socket: PathBuf,
    buf: Vec<u8>,
}

impl fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentClient")
            .field("socket", &self.socket)
            .finish_non_exhaustive()
    }
}

impl AgentClient {
    /// Connects to `socket` within `timeout`; every later call gets the same
    /// deadline.
    pub fn connect(socket: &Path, timeout: Duration) -> Result<Self, ClientError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(|e| ClientError::Io(format!("cannot start the I/O runtime: {e}")))?;
        let stream = runtime.block_on(async {
            tokio::time::timeout(timeout, UnixStream::connect(socket))
                .await
                .map_err(|_| ClientError::Timeout(timeout))?
                .map_err(ClientError::Connect)
        })?;
        Ok(Self {
            runtime,
            stream,
            timeout,
            socket: socket.to_owned(),
            buf: Vec::new(),
        })
    }

    /// The uid and pid of the process listening on the socket
    /// (`SO_PEERCRED`, as of when it started listening).
    pub fn peer(&self) -> std::io::Result<(u32, Option<i32>)> {
        let cred = self.stream.peer_cred()?;
        Ok((cred.uid(), cred.pid()))
    }

    /// The socket this client is connected to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends `request`, returns the decoded answer (FAILURE included: it is
    /// an answer, not an error).
    pub fn call(&mut self, request: &Request) -> Result<Response, ClientError> {
        let message = encode(request)?;
        let timeout = self.timeout;
        let stream = &mut self.stream;
        let buf = &mut self.buf;
        self.runtime.block_on(async {
            tokio::time::timeout(timeout, async {
                stream
                    .write_all(&message)
                    .await
                    .map_err(|e| ClientError::Io(format!("sending failed: {e}")))?;
                read_frame(stream, buf).await.map_err(|e| match e {
                    FrameError::Closed => ClientError::Io("connection closed".to_owned()),
                    other => ClientError::Io(format!("receiving failed: {other}")),
                })
            })
            .await
            .map_err(|_| ClientError::Timeout(timeout))?
        })?;
        drop(message);
        decode(&self.buf)
    }
}

/// Frames `request` (length header, type byte, body) into a zeroizing buffer
/// allocated once at its final size.
fn encode(request: &Request) -> Result<Zeroizing<Vec<u8>>, ClientError> {
    let bad = |e: ssh_encoding::Error| ClientError::Protocol(format!("cannot encode request: {e}"));
    let len = request.encoded_len().map_err(bad)?;
    if len > MAX_MESSAGE_LEN {
        return Err(ClientError::Protocol(format!(
            "request of {len} bytes exceeds the agent limit of {MAX_MESSAGE_LEN}"
        )));
    }
    let header = u32::try_from(len)
        .map_err(|_| ClientError::Protocol(format!("request of {len} bytes is too long")))?;
    let mut message = Zeroizing::new(Vec::with_capacity(len.saturating_add(4)));
    header.encode(&mut *message).map_err(bad)?;
    request.encode(&mut *message).map_err(bad)?;
    Ok(message)
}

/// Decodes one answer; trailing bytes are an error.
fn decode(body: &[u8]) -> Result<Response, ClientError> {
    let mut reader = body;
    let response =
        Response::decode(&mut reader).map_err(|e| ClientError::Protocol(e.to_string()))?;
    if !reader.is_finished() {
        return Err(ClientError::Protocol(format!(
            "{} trailing bytes",
            reader.remaining_len()
        )));
    }
    Ok(response)
}

/// A short name of an answer, for "expected X, got Y" messages.
pub fn describe(response: &Response) -> &'static str {
    match response {
        Response::Failure => "FAILURE",
        Response::Success => "SUCCESS",
        Response::IdentitiesAnswer(_) => "IDENTITIES_ANSWER",
        Response::SignResponse(_) => "SIGN_RESPONSE",
        Response::ExtensionFailure => "EXTENSION_FAILURE",
        Response::ExtensionResponse(_) => "EXTENSION_RESPONSE",
    }
}

/// The identities the daemon lists to this caller on the proxy socket at
/// `socket`, with a one-line error naming the socket.
pub fn daemon_identities(socket: &Path, timeout: Duration) -> crate::error::Result<Vec<Identity>> {
    use crate::error::Error;
    let shown = socket.display();
    let mut client = AgentClient::connect(socket, timeout)
        .map_err(|e| Error::msg(format!("daemon unreachable at {shown}: {e}")))?;
    match client.call(&Request::RequestIdentities) {
        Ok(Response::IdentitiesAnswer(ids)) => Ok(ids),
        Ok(other) => Err(Error::msg(format!(
            "daemon at {shown} answered {} to a request for identities",
            describe(&other)
        ))),
        Err(e) => Err(Error::msg(format!("daemon at {shown}: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_framed_with_their_length() {
        let m = encode(&Request::RequestIdentities).unwrap();
        assert_eq!(&m[..], &[0, 0, 0, 1, 11]);
        assert_eq!(m.capacity(), m.len());
    }

    #[test]
    fn answers_with_trailing_bytes_are_rejected() {
        assert!(matches!(decode(&[5]), Ok(Response::Failure)));
        assert!(decode(&[5, 0]).is_err());
        assert!(decode(&[12, 0, 0, 0, 1]).is_err());
        assert!(decode(&[99]).is_err());
    }
}
