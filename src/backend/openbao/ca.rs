//! `[certificates] ca = "openbao:ROLE"`: the cluster's SSH secrets engine
//! is the certificate CA, for any backend. [`EngineCa`] wraps the backend
//! the daemon uses: it answers [`Backend::issue`] through the engine and
//! counts the CA as held (listed in the identities, which the policy never
//! shows to a client) while the engine answers with the CA key pinned in
//! `key_dir/openbao-ca.pub`. Everything else goes to the wrapped backend.
//!
//! It never signs anything with the CA key itself (a sign request for it
//! is refused), and never accepts an engine CA other than the pinned one.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ssh_agent_lib::proto::{AddIdentityConstrained, Identity, PublicCredential, SignRequest};
use ssh_key::public::KeyData;
use zeroize::Zeroizing;

use super::OpenBao;
use crate::backend::{Backend, BackendError, BackendFuture, BackendStatus, IssueRequest};

/// How often an unconfirmed engine CA is asked again.
const RECHECK: Duration = Duration::from_secs(5);

/// A backend with the SSH engine as its certificate CA.
#[derive(Debug)]
pub struct EngineCa {
    inner: Arc<dyn Backend>,
    engine: OpenBao,
    ca: KeyData,
    role: String,
    /// The engine answered with the pinned CA key the last time it was asked.
    confirmed: AtomicBool,
    /// What the last status found wrong with the engine CA.
    problem: std::sync::Mutex<Option<String>>,
}

impl EngineCa {
    /// Wraps `inner`; `engine` reaches the cluster, `ca` is the pinned key.
    pub fn new(inner: Arc<dyn Backend>, engine: OpenBao, ca: KeyData, role: String) -> Self {
        Self {
            inner,
            engine,
            ca,
            role,
            confirmed: AtomicBool::new(false),
            problem: std::sync::Mutex::new(None),
        }
    }

    /// Wraps `inner` and starts the task that confirms the engine's CA
    /// (at once, then every [`RECHECK`] while it is not confirmed, and every
    /// minute once it is) until `shutdown`.
    pub fn start(
        inner: Arc<dyn Backend>,
        engine: OpenBao,
        ca: KeyData,
        role: String,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> (Arc<Self>, tokio::task::JoinHandle<()>) {
        let this = Arc::new(Self::new(inner, engine, ca, role));
        let checker = Arc::clone(&this);
        let task = tokio::spawn(async move {
            loop {
                let wait = if checker.engine.logged_in() {
                    let _ = checker.check().await;
                    if checker.confirmed.load(Ordering::Relaxed) {
                        Duration::from_secs(60)
                    } else {
                        RECHECK
                    }
                } else {
                    checker.confirmed.store(false, Ordering::Relaxed);
                    Duration::from_secs(1)
                };
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.changed() => return,
                }
                if *shutdown.borrow() {
                    return;
                }
            }
        });
        (this, task)
    }

    fn ca_identity(&self) -> Identity {
        Identity {
            credential: PublicCredential::Key(self.ca.clone()),
            comment: format!("openbao:{}", self.role),
        }
    }

    /// Asks the engine for its CA key; a problem line when it is not the
    /// pinned one or cannot be had.
    async fn check(&self) -> Option<String> {
        let problem = match self.engine.engine_ca().await {
            Ok(key) if key == self.ca => None,
            Ok(key) => Some(format!(
                "openbao: the SSH engine's CA is {}, not the pinned {} (key_dir/openbao-ca.pub)",
                key.fingerprint(ssh_key::HashAlg::Sha256),
                self.ca.fingerprint(ssh_key::HashAlg::Sha256)
            )),
            Err(e) => Some(format!("openbao: SSH engine CA: {e}")),
        };
        let ok = problem.is_none();
        if self.confirmed.swap(ok, Ordering::Relaxed) != ok {
            match &problem {
                None => tracing::info!("openbao: SSH engine CA confirmed (role {})", self.role),
                Some(p) => tracing::warn!("{p}"),
            }
        }
        problem
    }
}

impl Backend for EngineCa {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn identities(&self) -> BackendFuture<'_, Vec<Identity>> {
        Box::pin(async move {
            let mut ids = self.inner.identities().await?;
            // Never asks the cluster here (listings must not wait on it):
            // the checker task and `status` keep `confirmed` current.
            if self.confirmed.load(Ordering::Relaxed) && self.engine.logged_in() {
                ids.push(self.ca_identity());
            }
            Ok(ids)
        })
    }

    fn sign(&self, request: SignRequest) -> BackendFuture<'_, Vec<u8>> {
        if request.credential.key_data() == &self.ca {
            return Box::pin(async { Err(BackendError::Refused) });
        }
        self.inner.sign(request)
    }

    fn add(&self, identity: AddIdentityConstrained, origin: String) -> BackendFuture<'_, ()> {
        self.inner.add(identity, origin)
    }

    fn remove(&self, key: PublicCredential) -> BackendFuture<'_, ()> {
        self.inner.remove(key)
    }

    fn remove_all(&self) -> BackendFuture<'_, ()> {
        self.inner.remove_all()
    }

    fn add_smartcard(&self, id: String, pin: Zeroizing<String>) -> BackendFuture<'_, ()> {
        self.inner.add_smartcard(id, pin)
    }

    fn remove_smartcard(&self, id: String) -> BackendFuture<'_, ()> {
        self.inner.remove_smartcard(id)
    }

    fn unlock(&self, secret: Zeroizing<Vec<u8>>) -> BackendFuture<'_, ()> {
        self.inner.unlock(secret)
    }

    fn issue(&self, request: IssueRequest) -> BackendFuture<'_, String> {
        Box::pin(async move { self.engine.issue_certificate(&request).await })
    }

    fn status(&self) -> BackendFuture<'_, BackendStatus> {
        Box::pin(async move {
            let mut status = self.inner.status().await?;
            let problem = if self.engine.logged_in() {
                self.check().await
            } else {
                self.confirmed.store(false, Ordering::Relaxed);
                Some(format!(
                    "openbao: certificate CA openbao:{}: {}",
                    self.role,
                    self.engine.report().login
                ))
            };
            if problem.is_none() {
                status.identities.push(self.ca_identity());
            }
            *self
                .problem
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = problem;
            Ok(status)
        })
    }

    fn metrics(&self) -> Vec<crate::protocol::status::Family> {
        self.inner.metrics()
    }

    fn notes(&self) -> Vec<String> {
        let mut notes = self.inner.notes();
        if let Some(p) = self
            .problem
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
        {
            if !notes.contains(&p) {
                notes.push(p);
            }
        }
        notes
    }

    fn set_timeout(&self, timeout: Duration) {
        self.inner.set_timeout(timeout);
        self.engine.set_timeout(timeout);
    }
}

/// Wraps a backend other than openbao with the SSH engine as CA: a client
/// of the cluster with no keys, logging in by itself (certificate or agent
/// token file), kept alive until shutdown.
pub async fn wrap(
    config: &crate::config::Config,
    opened: super::super::Opened,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> crate::error::Result<super::super::Opened> {
    let Some(role) = config
        .certificates
        .as_deref()
        .and_then(|c| c.openbao_role.clone())
    else {
        return Ok(opened);
    };
    let mut keyless = config.clone();
    keyless.keys.clear();
    let (engine, revoke_at_exit) = super::engine_client(&keyless)?;
    let ca = config
        .certificates
        .as_deref()
        .map(|c| c.ca.public_key.clone())
        .ok_or_else(|| crate::error::Error::msg("no [certificates]"))?;
    let super::super::Opened { backend, mut tasks } = opened;
    let (wrapped, checker) =
        EngineCa::start(backend, engine.clone(), ca, role.clone(), shutdown.clone());
    let wrapped: Arc<dyn Backend> = wrapped;
    tracing::info!("certificates: signed by the cluster's SSH engine (role {role})");
    tasks.push(checker);
    tasks.push(tokio::spawn(async move {
        engine.run(shutdown).await;
        if revoke_at_exit {
            engine.revoke_at_exit().await;
        }
    }));
    Ok(super::super::Opened {
        backend: wrapped,
        tasks,
    })
}
