//! A connection to the upstream agent, for one client connection.
//!
//! Opened lazily on the first request that needs it, so that per-connection
//! agent state (`session-bind@openssh.com`) stays per client. Every call has
//! a deadline; a connection that timed out or failed mid-answer is dropped
//! (its framing can no longer be trusted) and the next call reconnects.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use ssh_agent_lib::agent::Session;
use ssh_agent_lib::client::Client;
use ssh_agent_lib::error::AgentError;
use ssh_agent_lib::proto::{Extension, Identity, ProtoError, SignRequest};
use ssh_key::Signature;
use tokio::net::UnixStream;

/// Why the upstream agent gave no usable answer.
#[derive(Debug)]
pub enum UpstreamError {
    /// The socket could not be connected to.
    Unreachable(std::io::Error),
    /// No answer within the timeout.
    Timeout,
    /// The agent answered FAILURE (or something other than what was asked).
    Refused,
    /// The connection broke or the answer could not be decoded.
    Broken(String),
}

impl std::fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unreachable(e) => write!(f, "upstream agent unreachable: {e}"),
            Self::Timeout => f.write_str("upstream agent did not answer in time"),
            Self::Refused => f.write_str("upstream agent refused"),
            Self::Broken(e) => write!(f, "upstream agent connection failed: {e}"),
        }
    }
}

type AgentCall<'a, T> = Pin<Box<dyn Future<Output = Result<T, AgentError>> + Send + 'a>>;

/// A lazily opened upstream connection.
#[derive(Debug)]
pub struct Upstream {
    socket: PathBuf,
    timeout: Duration,
    client: Option<Client<UnixStream>>,
}

impl Upstream {
    /// An upstream connection to `socket`, not opened yet.
    pub fn new(socket: PathBuf, timeout: Duration) -> Self {
        Self {
            socket,
            timeout,
            client: None,
        }
    }

    /// Sets the deadline of later calls (after a configuration reload).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Connects now (if not connected yet), within the timeout.
    pub async fn connect(&mut self) -> Result<&mut Client<UnixStream>, UpstreamError> {
        let client = match self.client.take() {
            Some(client) => client,
            None => {
                let stream = tokio::time::timeout(self.timeout, UnixStream::connect(&self.socket))
                    .await
                    .map_err(|_| UpstreamError::Timeout)?
                    .map_err(UpstreamError::Unreachable)?;
                Client::new(stream)
            }
        };
        Ok(self.client.insert(client))
    }

    async fn call<T>(
        &mut self,
        op: impl for<'a> FnOnce(&'a mut Client<UnixStream>) -> AgentCall<'a, T>,
    ) -> Result<T, UpstreamError> {
        let timeout = self.timeout;
        let client = self.connect().await?;
        let result = tokio::time::timeout(timeout, op(client)).await;
        match result {
            Ok(Ok(value)) => Ok(value),
            // A well-framed answer of the wrong kind (FAILURE): the connection
            // is still in step.
            Ok(Err(AgentError::Proto(ProtoError::UnexpectedResponse)))
            | Ok(Err(AgentError::Failure))
            | Ok(Err(AgentError::ExtensionFailure)) => Err(UpstreamError::Refused),
            Ok(Err(e)) => {
                self.client = None;
                Err(UpstreamError::Broken(e.to_string()))
            }
            Err(_) => {
                self.client = None;
                Err(UpstreamError::Timeout)
            }
        }
    }

    /// REQUEST_IDENTITIES.
    pub async fn identities(&mut self) -> Result<Vec<Identity>, UpstreamError> {
        self.call(|c| c.request_identities()).await
    }

    /// SIGN_REQUEST, sent as given (flags included).
    pub async fn sign(&mut self, request: SignRequest) -> Result<Signature, UpstreamError> {
        self.call(move |c| c.sign(request)).await
    }

    /// EXTENSION; `Ok(None)` is SUCCESS, `Ok(Some(_))` an extension response.
    pub async fn extension(
        &mut self,
        extension: Extension,
    ) -> Result<Option<Extension>, UpstreamError> {
        self.call(move |c| c.extension(extension)).await
    }
}
