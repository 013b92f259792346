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

pub mod key;
pub mod pool;
pub mod store;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ssh_agent_lib::proto::{
    AddIdentityConstrained, Identity, KeyConstraint, PrivateCredential, PublicCredential,
    SignRequest,
};
use ssh_key::HashAlg;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{Backend, BackendError, BackendFuture, BackendStatus};
use crate::error::{Error, Result};
use crate::ratelog::{Kind, RateLog, Who};
use key::HeldKey;
use pool::{Pool, PoolError};
use store::{Added, KeyStore};

/// Environment knob: number of signing threads (default: one per core).
pub const WORKERS_ENV: &str = "KEYHOLDER_BUILTIN_WORKERS";
/// Environment knob: jobs queued or signing at once (default
/// [`QUEUE_PER_WORKER`] per worker).
pub const QUEUE_ENV: &str = "KEYHOLDER_BUILTIN_QUEUE";
/// Default queue capacity per worker thread.
pub const QUEUE_PER_WORKER: usize = 64;
/// How often expired keys are looked for.
const REAP_EVERY: Duration = Duration::from_millis(500);
/// Signs refused because the work queue stayed full: the first of a burst,
/// then a count per window.
pub static SIGNERS_BUSY: Kind = Kind {
    name: "signs refused with the work queue full",
    burst: 1,
    level: tracing::Level::WARN,
};

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
    /// Rate-limited logging of full-queue lines.
    log: Arc<RateLog>,
}

impl Inner {
    /// Converts and holds a key (`lifetime` in seconds), logging what it
    /// did; or the one-line reason it is refused (logged by the caller).
    fn add_key(
        &self,
        credential: PrivateCredential,
        lifetime: Option<u32>,
        who: &str,
    ) -> std::result::Result<(), String> {
        let PrivateCredential::Key { privkey, comment } = credential else {
            return Err(
                "certificates are not held by the builtin backend (keyholder mints its own: \
                 see [certificates]); add the plain key"
                    .to_owned(),
            );
        };
        let key = HeldKey::new(&privkey).map_err(|e| e.0)?;
        drop(privkey);
        let fingerprint = key.public().fingerprint(HashAlg::Sha256);
        let (kind, bits) = (key.type_name(), key.bits());
        let added = self.store.add(
            key,
            comment,
            lifetime.map(|s| Duration::from_secs(s.into())),
        );
        let life = lifetime.map_or_else(|| "no lifetime".to_owned(), |s| format!("lifetime {s} s"));
        tracing::info!(
            "builtin backend: {} key {kind} {bits} bits {fingerprint} ({life}) for {who}",
            if added == Added::New {
                "added"
            } else {
                "replaced"
            }
        );
        if !self.memory_locked {
            tracing::error!(
                "builtin backend: holding keys but the daemon's memory is not locked \
                 (mlockall failed or was skipped): key material may be swapped out; run the \
                 daemon with LimitMEMLOCK=infinity or CAP_IPC_LOCK"
            );
        }
        Ok(())
    }

    /// Logs a sign that waited for the full queue: the first of a burst,
    /// then a count per window.
    fn note_busy(&self, e: &SignError) {
        if self.log.allow(&SIGNERS_BUSY, Who::Unattributed) {
            tracing::warn!(
                "{e}: answering FAILURE ({} workers, queue of {})",
                self.pool.workers(),
                self.pool.capacity()
            );
        }
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms.load(Ordering::Relaxed))
    }

    async fn sign(&self, request: &SignRequest) -> std::result::Result<Vec<u8>, SignError> {
        let PublicCredential::Key(public) = &request.credential else {
            return Err(SignError::NotHeld);
        };
        let key = self.store.get(public).ok_or(SignError::NotHeld)?;
        let timeout = self.timeout();
        let result = self
            .pool
            .sign(key, request.data.clone(), request.flags, timeout)
            .await
            .map_err(|e| match e {
                PoolError::Busy => SignError::Busy(timeout),
                PoolError::Timeout => SignError::Timeout(timeout),
                other => SignError::Failed(other.to_string()),
            });
        if let Err(e @ (SignError::Busy(_) | SignError::Timeout(_))) = &result {
            self.note_busy(e);
        }
        result
    }
}

/// The running builtin backend.
#[derive(Debug, Clone)]
pub struct Builtin {
    inner: Arc<Inner>,
}

impl Inner {
    /// The keys held, in the order added (for the proxy and `agent.socket`).
    fn identities(&self) -> Vec<Identity> {
        self.store
            .list()
            .into_iter()
            .map(|(key, comment)| Identity {
                credential: PublicCredential::Key(key),
                comment,
            })
            .collect()
    }
}

/// Settings read once at start.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `limits.upstream_timeout_secs`: queueing plus signing.
    pub timeout: Duration,
    /// Whether mlockall succeeded (an error is logged per added key if not).
    pub memory_locked: bool,
    /// Rate-limited logging (signs refused because the queue stayed full).
    pub log: Arc<RateLog>,
}

impl Builtin {
    /// Starts the pool and spawns the expiry reaper; on shutdown the reaper
    /// stops and every key is dropped.
    pub fn start(
        settings: &Settings,
        shutdown: watch::Receiver<bool>,
    ) -> Result<(Self, JoinHandle<()>)> {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let workers = knob(WORKERS_ENV).unwrap_or(cores);
        let capacity = knob(QUEUE_ENV).unwrap_or(workers.max(1) * QUEUE_PER_WORKER);
        let pool = Pool::start(workers, capacity)
            .map_err(|e| Error::msg(format!("cannot start the signing threads: {e}")))?;
        tracing::info!(
            "builtin backend: {} signing thread(s), queue of {}",
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
            log: Arc::clone(&settings.log),
        });
        let reaper = tokio::spawn(reap(Arc::clone(&inner), shutdown));
        let task = tokio::spawn({
            let inner = Arc::clone(&inner);
            async move {
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
        self.inner.identities()
    }

    /// Signs on the pool; returns the signature blob (`string alg, string sig`).
    pub async fn sign(&self, request: &SignRequest) -> std::result::Result<Vec<u8>, SignError> {
        self.inner.sign(request).await
    }
}

impl Backend for Builtin {
    fn name(&self) -> &'static str {
        "builtin"
    }

    fn identities(&self) -> BackendFuture<'_, Vec<Identity>> {
        let ids = Builtin::identities(self);
        Box::pin(async move { Ok(ids) })
    }

    fn sign(&self, request: SignRequest) -> BackendFuture<'_, Vec<u8>> {
        Box::pin(async move {
            self.inner.sign(&request).await.map_err(|e| match e {
                SignError::NotHeld => BackendError::Refused,
                SignError::Busy(_) | SignError::Timeout(_) => BackendError::Busy,
                SignError::Failed(e) => BackendError::Broken(e),
            })
        })
    }

    fn add(&self, identity: AddIdentityConstrained, origin: String) -> BackendFuture<'_, ()> {
        Box::pin(async move {
            let mut lifetime = None;
            for constraint in &identity.constraints {
                match constraint {
                    KeyConstraint::Lifetime(s) if lifetime.is_none() => lifetime = Some(*s),
                    other => {
                        tracing::warn!(
                            "builtin backend: refused to add a key: constraint {other:?} is \
                             not supported"
                        );
                        return Err(BackendError::Refused);
                    }
                }
            }
            self.inner
                .add_key(identity.identity.credential, lifetime, &origin)
                .map_err(|why| {
                    tracing::warn!("builtin backend: refused to add a key: {why}");
                    BackendError::Refused
                })
        })
    }

    fn remove(&self, key: PublicCredential) -> BackendFuture<'_, ()> {
        Box::pin(async move {
            match &key {
                PublicCredential::Key(k) if self.inner.store.remove(k) => Ok(()),
                _ => Err(BackendError::Refused),
            }
        })
    }

    fn remove_all(&self) -> BackendFuture<'_, ()> {
        Box::pin(async move {
            let n = self.inner.store.remove_all();
            if n > 0 {
                tracing::info!("builtin backend: removed all keys ({n})");
            }
            Ok(())
        })
    }

    fn status(&self) -> BackendFuture<'_, BackendStatus> {
        let identities = Builtin::identities(self);
        Box::pin(async move { Ok(BackendStatus { identities }) })
    }

    fn set_timeout(&self, timeout: Duration) {
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
