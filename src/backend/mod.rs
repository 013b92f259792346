//! Whatever holds or reaches the keys, behind one small interface.
//!
//! The daemon holds an `Arc<dyn Backend>` and never knows which backend it
//! is: it asks for the identities, for a signature, for the status, and (for
//! admin callers such as `keyholder arm/disarm` when the daemon serves them)
//! adds and removes keys. It never decides anything here: every request a
//! backend sees has already been allowed by [`crate::policy`].
//!
//! - [`upstream`]: an ssh-agent reached over its socket (OpenSSH's, spawned
//!   or external), through a bounded pool of connections.
//! - [`supervisor`]: starts OpenSSH's `ssh-agent` when `agent.spawn = true`,
//!   restarts it when it dies, stops it on exit.
//! - [`builtin`]: the in-process backend: keyholder holds the keys, signs on
//!   a bounded pool of threads and serves `agent.socket` itself.
//!
//! A backend must never log key material, never decode or alter a signature
//! it relays (the blob goes back to the client byte for byte), and never
//! block an async thread: every call is a future, and every call ends within
//! the deadline set by [`Backend::set_timeout`].

pub mod builtin;
pub mod openbao;
pub mod supervisor;
pub mod upstream;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use ssh_agent_lib::proto::{AddIdentityConstrained, Identity, PublicCredential, SignRequest};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{BackendKind, Config};

pub use upstream::UpstreamBackend;

/// The future a [`Backend`] call returns.
pub type BackendFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, BackendError>> + Send + 'a>>;

/// Holds or reaches the keys. Dyn-compatible: the daemon uses it as
/// `Arc<dyn Backend>`.
pub trait Backend: Send + Sync + std::fmt::Debug {
    /// A short name for logs and status ("upstream", "builtin", …).
    fn name(&self) -> &'static str;

    /// Every identity the backend holds, in its order.
    fn identities(&self) -> BackendFuture<'_, Vec<Identity>>;

    /// Signs as asked (flags unchanged). The answer is the `string signature`
    /// of SSH_AGENT_SIGN_RESPONSE's body, exactly as produced (algorithm
    /// name and blob), never decoded: `ssh-rsa` (SHA-1) included.
    fn sign(&self, request: SignRequest) -> BackendFuture<'_, Vec<u8>>;

    /// Adds a key (constraints may be empty). A backend that does not support
    /// a constraint answers [`BackendError::Refused`].
    fn add(&self, identity: AddIdentityConstrained) -> BackendFuture<'_, ()>;

    /// Removes one key.
    fn remove(&self, key: PublicCredential) -> BackendFuture<'_, ()>;

    /// Removes every key.
    fn remove_all(&self) -> BackendFuture<'_, ()>;

    /// What `status@keyholder` needs: an error means the backend cannot be
    /// reached; otherwise the identities it holds.
    fn status(&self) -> BackendFuture<'_, BackendStatus>;

    /// The deadline of each later call (`limits.upstream_timeout_secs`; a
    /// reload applies to the next call).
    fn set_timeout(&self, timeout: Duration);
}

/// A backend that answered a status request.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendStatus {
    /// The identities it holds now.
    pub identities: Vec<Identity>,
}

/// Why a backend gave no usable answer.
#[derive(Debug)]
pub enum BackendError {
    /// The backend (its socket) could not be reached.
    Unreachable(std::io::Error),
    /// No answer within the timeout.
    Timeout,
    /// An in-process backend had no free signer within the timeout (its
    /// work queue stayed full). Counted and audited as a timeout.
    Busy,
    /// The backend answered FAILURE (or refused what was asked).
    Refused,
    /// The connection broke or the answer could not be decoded.
    Broken(String),
}

impl std::fmt::Display for BackendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unreachable(e) => write!(f, "upstream agent unreachable: {e}"),
            Self::Timeout => f.write_str("upstream agent did not answer in time"),
            Self::Busy => f.write_str(
                "no signing worker free within upstream_timeout_secs (the work queue stayed full)",
            ),
            Self::Refused => f.write_str("upstream agent refused"),
            Self::Broken(e) => write!(f, "upstream agent connection failed: {e}"),
        }
    }
}

impl std::error::Error for BackendError {}

/// What a backend may need from the daemon when it is opened.
#[derive(Debug, Clone)]
pub struct OpenContext {
    /// The daemon's stop signal: a backend's own tasks end on it.
    pub shutdown: watch::Receiver<bool>,
    /// Whether the daemon's memory is locked (`mlockall`).
    pub memory_locked: bool,
}

/// An opened backend, and the task that runs its own services (if any).
pub type Opened = (Arc<dyn Backend>, Option<JoinHandle<()>>);

/// The backend the configuration asks for, and the task (if any) that runs
/// its own services until shutdown (await it before exiting: the builtin
/// backend drops its keys there). Fallible, so that a backend that must
/// bind, load or lock something at start reports it as one line without the
/// daemon knowing which backend it is.
pub fn open(config: &Config, context: OpenContext) -> crate::error::Result<Opened> {
    match config.agent.backend {
        BackendKind::Upstream => {
            if !config.agent.spawn {
                tracing::info!(
                    "using the upstream agent at {}",
                    config.agent.socket.display()
                );
            }
            let backend = UpstreamBackend::new(
                config.agent.socket.clone(),
                config.limits.upstream_timeout,
                config.limits.max_connections,
            );
            Ok((Arc::new(backend), None))
        }
        BackendKind::Builtin => {
            let settings = builtin::Settings {
                socket: config.agent.socket.clone(),
                timeout: config.limits.upstream_timeout,
                memory_locked: context.memory_locked,
            };
            let (backend, task) = builtin::Builtin::start(&settings, context.shutdown)?;
            Ok((Arc::new(backend), Some(task)))
        }
    }
}
