//! The builtin backend (`[agent] backend = "builtin"`): keyholder holds the
//! decrypted keys itself and signs on a pool of worker threads.
//!
//! - [`key`]: one key, converted for OpenSSL, and the OpenSSH signature encodings.
//! - [`store`]: the keys held, in order, with lifetimes.
//! - [`pool`]: the bounded signing pool (one thread per core).
//! - [`admin`]: `agent.socket`, the admin side of the agent protocol, root only.
//!
//! The backend holds keys and signs; it never decides who may use them (that
//! is the policy's, the same for every backend) and never logs key material.

pub mod admin;
pub mod key;
pub mod pool;
pub mod store;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ssh_agent_lib::proto::{Identity, PublicCredential, SignRequest};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::error::{Error, Result};
use pool::{Pool, PoolError};
use store::KeyStore;

/// Environment knob: number of signing threads (default: one per core).
pub const WORKERS_ENV: &str = "KEYHOLDER_BUILTIN_WORKERS";
/// Environment knob: jobs queued or signing at once (default
/// [`QUEUE_PER_WORKER`] per worker).
pub const QUEUE_ENV: &str = "KEYHOLDER_BUILTIN_QUEUE";
/// Default queue capacity per worker thread.
pub const QUEUE_PER_WORKER: usize = 64;
/// How often expired keys are looked for.
const REAP_EVERY: Duration = Duration::from_millis(500);

/// Why the builtin backend gave no signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignError {
    /// The key is not held (never added, removed, or expired).
    NotHeld,
    /// The signing queue stayed full until the deadline.
    Busy(Duration),
    /// The signature did not come before the deadline.
    Timeout(Duration),
    /// OpenSSL refused, or the pool stopped.
    Failed(String),
}

impl std::fmt::Display for SignError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotHeld => f.write_str("key not held by the builtin backend"),
            Self::Busy(t) => write!(
                f,
                "builtin backend: signing queue full for {} s (upstream_timeout_secs)",
                t.as_secs()
            ),
            Self::Timeout(t) => write!(
                f,
                "builtin backend: no signature within {} s (upstream_timeout_secs)",
                t.as_secs()
            ),
            Self::Failed(e) => write!(f, "builtin backend: {e}"),
        }
    }
}

/// State shared by the admin socket, the proxy's requests and the reaper.
#[derive(Debug)]
pub struct Inner {
    store: KeyStore,
    pool: Pool,
    timeout_ms: AtomicU64,
    memory_locked: bool,
}

impl Inner {
    fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms.load(Ordering::Relaxed))
    }

    async fn sign(&self, request: &SignRequest) -> std::result::Result<Vec<u8>, SignError> {
        let PublicCredential::Key(public) = &request.credential else {
            return Err(SignError::NotHeld);
        };
        let key = self.store.get(public).ok_or(SignError::NotHeld)?;
        let timeout = self.timeout();
        self.pool
            .sign(key, request.data.clone(), request.flags, timeout)
            .await
            .map_err(|e| match e {
                PoolError::Busy => SignError::Busy(timeout),
                PoolError::Timeout => SignError::Timeout(timeout),
                other => SignError::Failed(other.to_string()),
            })
    }
}

/// The running builtin backend.
#[derive(Debug, Clone)]
pub struct Builtin {
    inner: Arc<Inner>,
}

/// Settings read once at start.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `agent.socket`.
    pub socket: PathBuf,
    /// `limits.upstream_timeout_secs`: queueing plus signing.
    pub timeout: Duration,
    /// Whether mlockall succeeded (an error is logged per added key if not).
    pub memory_locked: bool,
}

impl Builtin {
    /// Starts the pool, binds `agent.socket` and spawns its server and the
    /// expiry reaper; both stop (and every key is dropped) on shutdown.
    pub fn start(
        settings: &Settings,
        shutdown: watch::Receiver<bool>,
    ) -> Result<(Self, JoinHandle<()>)> {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let workers = knob(WORKERS_ENV).unwrap_or(cores);
        let capacity = knob(QUEUE_ENV).unwrap_or(workers.max(1) * QUEUE_PER_WORKER);
        let pool = Pool::start(workers, capacity)
            .map_err(|e| Error::msg(format!("cannot start the signing threads: {e}")))?;
        let listener = admin::bind(&settings.socket)?;
        tracing::info!(
            "builtin backend: serving agent.socket {} (root only); {} signing thread(s), \
             queue of {}",
            settings.socket.display(),
            pool.workers(),
            pool.capacity()
        );
        if !settings.memory_locked {
            tracing::error!(
                "builtin backend: the daemon's memory is not locked; keys added to it may \
                 be swapped out (run it with LimitMEMLOCK=infinity or CAP_IPC_LOCK)"
            );
        }
        let inner = Arc::new(Inner {
            store: KeyStore::default(),
            pool,
            timeout_ms: AtomicU64::new(millis(settings.timeout)),
            memory_locked: settings.memory_locked,
        });
        let server = tokio::spawn(admin::serve(
            listener,
            settings.socket.clone(),
            Arc::clone(&inner),
            shutdown.clone(),
        ));
        let reaper = tokio::spawn(reap(Arc::clone(&inner), shutdown));
        let task = tokio::spawn({
            let inner = Arc::clone(&inner);
            async move {
                let _ = server.await;
                let _ = reaper.await;
                let n = inner.store.remove_all();
                inner.pool.stop();
                tracing::info!("builtin backend stopped; {n} key(s) dropped from memory");
            }
        });
        Ok((Self { inner }, task))
    }

    /// The keys held, in the order added.
    pub fn identities(&self) -> Vec<Identity> {
        self.inner
            .store
            .list()
            .into_iter()
            .map(|(key, comment)| Identity {
                credential: PublicCredential::Key(key),
                comment,
            })
            .collect()
    }

    /// Signs on the pool; returns the signature blob (`string alg, string sig`).
    pub async fn sign(&self, request: &SignRequest) -> std::result::Result<Vec<u8>, SignError> {
        self.inner.sign(request).await
    }

    /// Removes every key; returns how many there were.
    pub fn remove_all(&self) -> usize {
        self.inner.store.remove_all()
    }

    /// Sets the deadline of later sign requests (after a reload).
    pub fn set_timeout(&self, timeout: Duration) {
        self.inner
            .timeout_ms
            .store(millis(timeout), Ordering::Relaxed);
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn knob(name: &str) -> Option<usize> {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
}

/// SIGN_RESPONSE framed around a signature blob, byte for byte.
pub fn sign_response(blob: &[u8]) -> Vec<u8> {
    let Ok(inner_len) = u32::try_from(blob.len()) else {
        return crate::protocol::response::FAILURE.to_vec();
    };
    let mut out = Vec::with_capacity(blob.len() + 9);
    out.extend_from_slice(&(inner_len + 5).to_be_bytes());
    out.push(14);
    out.extend_from_slice(&inner_len.to_be_bytes());
    out.extend_from_slice(blob);
    out
}

async fn reap(inner: Arc<Inner>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let (gone, _next) = inner.store.reap();
        for (key, comment) in gone {
            tracing::info!(
                "builtin backend: key {} ({comment:?}) reached its lifetime; removed",
                key.fingerprint(ssh_key::HashAlg::Sha256)
            );
        }
        tokio::select! {
            () = tokio::time::sleep(REAP_EVERY) => {}
            () = crate::shutdown::stopped(&mut shutdown) => return,
        }
    }
}
