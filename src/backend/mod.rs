//! Whatever holds or reaches the keys, behind one small interface.
//!
//! [`open`] owns a backend's whole life: it starts what the backend needs
//! (a spawned agent and its supervisor, a pool of signing threads, the
//! root-only `agent.socket` of an in-process backend), and the [`Opened`]
//! value it returns stops all of it. The daemon holds an `Arc<dyn Backend>`
//! and never knows which backend it is: it asks for the identities, for a
//! signature and for the status. The admin side (add, remove, unlock, a
//! smartcard's PIN) is what [`admin`] serves on `agent.socket` to root. No
//! backend decides anything: every request a backend sees from a client has
//! already been allowed by [`crate::policy`].
//!
//! - [`upstream`]: an ssh-agent reached over its socket (OpenSSH's, spawned
//!   and supervised by the daemon, or external), through a bounded pool of
//!   connections.
//! - [`builtin`]: the in-process backend: keyholder holds the keys and signs
//!   on a bounded pool of threads.
//! - [`pkcs11`]: the keys stay on a PKCS#11 token; the daemon logs in with
//!   the PIN it is given and signs on one token session per thread.
//! - [`pool`]: the bounded pool of blocking worker threads the in-process
//!   backends sign on.
//! - [`admin`]: `agent.socket` served by the daemon for in-process backends.
//!
//! A backend must never log key material, never decode or alter a signature
//! it relays (the blob goes back to the client byte for byte), and never
//! block an async thread: every call is a future, and every call ends within
//! the deadline set by [`Backend::set_timeout`].

pub mod admin;
pub mod builtin;
pub mod openbao;
pub mod pkcs11;
pub mod pool;
pub mod upstream;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use ssh_agent_lib::proto::{AddIdentityConstrained, Identity, PublicCredential, SignRequest};

use tokio::sync::watch;
use tokio::task::JoinHandle;
use zeroize::Zeroizing;

use crate::config::{BackendKind, Config};
use crate::counter::Counter;
use crate::ratelog::RateLog;

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

    /// Adds a key (constraints may be empty); `origin` names who asked, for
    /// the log. A backend that does not support a constraint answers
    /// [`BackendError::Refused`].
    fn add(&self, identity: AddIdentityConstrained, origin: String) -> BackendFuture<'_, ()>;

    /// Removes one key.
    fn remove(&self, key: PublicCredential) -> BackendFuture<'_, ()>;

    /// Removes every key.
    fn remove_all(&self) -> BackendFuture<'_, ()>;

    /// SSH_AGENTC_ADD_SMARTCARD_KEY: `id` names the token (a PKCS#11
    /// module's path), `pin` unlocks it. Backends without tokens answer
    /// [`BackendError::Unsupported`].
    fn add_smartcard(&self, id: String, pin: Zeroizing<String>) -> BackendFuture<'_, ()> {
        let _ = (id, pin);
        Box::pin(async { Err(BackendError::Unsupported) })
    }

    /// SSH_AGENTC_REMOVE_SMARTCARD_KEY: forgets the token `id` and its PIN.
    fn remove_smartcard(&self, id: String) -> BackendFuture<'_, ()> {
        let _ = id;
        Box::pin(async { Err(BackendError::Unsupported) })
    }

    /// `unlock@keyholder`: the secret that lets the backend reach its keys
    /// (a secret id, a token), kept by the backend in locked memory until
    /// [`Backend::remove_all`]. Backends with nothing to unlock answer
    /// [`BackendError::Unsupported`].
    fn unlock(&self, secret: Zeroizing<Vec<u8>>) -> BackendFuture<'_, ()> {
        drop(secret);
        Box::pin(async { Err(BackendError::Unsupported) })
    }

    /// `[certificates] ca = "openbao:ROLE"`: a user certificate from a CA
    /// held elsewhere (the cluster's SSH engine), as an OpenSSH certificate
    /// line. Backends without such a CA answer [`BackendError::Unsupported`].
    fn issue(&self, request: IssueRequest) -> BackendFuture<'_, String> {
        drop(request);
        Box::pin(async { Err(BackendError::Unsupported) })
    }

    /// What `status@keyholder` needs: an error means the backend cannot be
    /// reached; otherwise the identities it holds.
    fn status(&self) -> BackendFuture<'_, BackendStatus>;

    /// Lines naming what is wrong now (a token not present or not logged
    /// in, a key not found or not matching), for `keyholder status`; no
    /// secrets, no I/O (what the backend already knows).
    fn notes(&self) -> Vec<String> {
        Vec::new()
    }

    /// The backend's own counters, as metric families named `keyholder_…`
    /// (`keyholder status --prometheus`); no secrets, no I/O.
    fn metrics(&self) -> Vec<crate::protocol::status::Family> {
        Vec::new()
    }

    /// The deadline of each later call (`limits.upstream_timeout_secs`; a
    /// reload applies to the next call).
    fn set_timeout(&self, timeout: Duration);
}

/// A user certificate asked of a CA held elsewhere ([`Backend::issue`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssueRequest {
    /// The signing role (`ca = "openbao:ROLE"`).
    pub role: String,
    /// The key certified.
    pub key: ssh_key::public::KeyData,
    /// Remote users it is valid for.
    pub principals: Vec<String>,
    /// Extensions (empty values).
    pub extensions: Vec<String>,
    /// Critical options (name, value).
    pub critical_options: Vec<(String, String)>,
    /// Seconds of validity.
    pub ttl_secs: u64,
    /// The key ID.
    pub key_id: String,
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
    /// The backend has no such operation (a smartcard request to a backend
    /// without tokens, say).
    Unsupported,
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
            Self::Unsupported => f.write_str("not supported by this backend"),
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
    /// Rate-limited logging, for lines a flood could repeat (a spawned
    /// agent's stderr).
    pub log: Arc<RateLog>,
    /// Counts restarts of whatever the backend runs (a spawned agent).
    pub restarts: Counter,
}

/// An opened backend and the tasks that run its services (a supervised
/// agent, `agent.socket`, expiry of keys). They end on the daemon's stop
/// signal; [`Opened::stopped`] waits for them.
#[derive(Debug)]
pub struct Opened {
    /// The backend the daemon serves requests with.
    pub backend: Arc<dyn Backend>,
    tasks: Vec<JoinHandle<()>>,
}

impl Opened {
    /// After the stop signal: waits until every service of the backend is
    /// down (a spawned agent stopped and its socket removed, keys held in
    /// memory dropped).
    pub async fn stopped(self) {
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// Opens the backend the configuration asks for, with everything it needs
/// running. Fails with one line when something it must start, bind, load or
/// lock cannot be (what it had started by then is stopped again).
pub async fn open(config: &Config, context: OpenContext) -> crate::error::Result<Opened> {
    let shutdown = context.shutdown.clone();
    let opened = match config.agent.backend {
        BackendKind::Upstream => upstream::open(config, context).await?,
        BackendKind::OpenBao => return openbao::open(config, context).await,
        BackendKind::Builtin => {
            let settings = builtin::Settings {
                timeout: config.limits.upstream_timeout,
                memory_locked: context.memory_locked,
                log: Arc::clone(&context.log),
            };
            let listener = admin::bind(&config.agent.socket)?;
            let (backend, task) = builtin::Builtin::start(&settings, context.shutdown.clone())?;
            let backend: Arc<dyn Backend> = Arc::new(backend);
            tracing::info!(
                "builtin backend: serving agent.socket {} (root only)",
                config.agent.socket.display()
            );
            let server = tokio::spawn(admin::serve(
                listener,
                config.agent.socket.clone(),
                Arc::clone(&backend),
                context.shutdown,
            ));
            // agent.socket closes before the keys are dropped.
            Opened {
                backend,
                tasks: vec![server, task],
            }
        }
        BackendKind::Pkcs11 => {
            let Some(settings) = config.pkcs11.as_deref().cloned() else {
                return Err(crate::error::Error::msg(
                    "agent.backend = \"pkcs11\" needs a [pkcs11] section",
                ));
            };
            let listener = admin::bind(&config.agent.socket)?;
            // Loading and initialising a module may block (a network HSM).
            let started = {
                let config = config.clone();
                tokio::task::spawn_blocking(move || {
                    pkcs11::Pkcs11Backend::start(&config, &settings)
                })
                .await
                .map_err(|e| crate::error::Error::msg(format!("pkcs11 backend: {e}")))?
            };
            let backend = match started {
                Ok(b) => Arc::new(b),
                Err(e) => {
                    drop(listener);
                    crate::sockets::remove(&config.agent.socket);
                    return Err(crate::error::Error::msg(e));
                }
            };
            tracing::info!(
                "pkcs11 backend: serving agent.socket {} (root only): `keyholder arm` or \
                 `ssh-add -s {}` logs in",
                config.agent.socket.display(),
                backend.module().display()
            );
            let server = tokio::spawn(admin::serve(
                listener,
                config.agent.socket.clone(),
                Arc::clone(&backend) as Arc<dyn Backend>,
                context.shutdown.clone(),
            ));
            let stopper = tokio::spawn({
                let backend = Arc::clone(&backend);
                let mut shutdown = context.shutdown;
                async move {
                    crate::shutdown::stopped(&mut shutdown).await;
                    let _ = tokio::task::spawn_blocking(move || backend.stop()).await;
                }
            });
            // agent.socket closes before the token is logged out.
            Opened {
                backend,
                tasks: vec![server, stopper],
            }
        }
    };
    // `[certificates] ca = "openbao:ROLE"` with another backend.
    openbao::ca::wrap(config, opened, shutdown).await
}
