//! The PKCS#11 backend (`[agent] backend = "pkcs11"`): the keys never leave
//! a PKCS#11 token (an HSM, a YubiHSM, a TPM through tpm2-pkcs11, a
//! smartcard through opensc, SoftHSM2); keyholder asks the token for each
//! signature.
//!
//! - [`token`]: the module, the token, the login and the keys' objects.
//! - [`key`]: mechanisms, SSH signature encodings and the check of every
//!   signature against `NAME.pub`.
//! - [`pin`]: the kept PIN, in locked memory.
//!
//! Signing runs on the shared worker pool ([`crate::backend::pool`]): one
//! thread per token session (`[pkcs11] sessions`, default one per core),
//! each with its own session, behind a bounded queue. A monitor thread
//! checks every second that a logged-in token is still there, marks it
//! gone (signs then fail at once) and, while it is gone, re-initialises the
//! module until it is back, then logs in again with the kept PIN.
//!
//! The backend must never: relay a signature it has not verified against the
//! configured public key; try a PIN the token refused again by itself; log
//! or keep the PIN anywhere but [`pin::Pin`]; ask the token to create,
//! change, export or destroy an object (it only finds, reads public
//! attributes and signs); decide who may use a key (the policy does).

pub mod key;
pub mod pin;
pub mod token;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use ssh_agent_lib::proto::{AddIdentityConstrained, Identity, PublicCredential, SignRequest};
use zeroize::Zeroizing;

use super::pool::{Pool, PoolError};
use super::{Backend, BackendError, BackendFuture, BackendStatus};
use crate::config::pkcs11::Pkcs11Config;
use crate::config::Config;
use token::{Condition, KeySpec, KeyState, SignFailure, Token, WorkerSession};

/// How often the monitor checks the token.
const PROBE_EVERY: Duration = Duration::from_secs(1);

type Job = (usize, Vec<u8>, u32);

/// The running PKCS#11 backend.
pub struct Pkcs11Backend {
    token: Arc<Token>,
    pool: Pool<Job, Result<Vec<u8>, SignFailure>>,
    /// Configured public keys, in configuration order (the job's index).
    keys: Vec<(String, ssh_key::public::KeyData)>,
    timeout_ms: AtomicU64,
    wake: mpsc::SyncSender<()>,
    stopped: Arc<AtomicBool>,
}

impl std::fmt::Debug for Pkcs11Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11Backend")
            .field("token", &self.token)
            .field("pool", &self.pool)
            .finish_non_exhaustive()
    }
}

/// What `status` says about the token and each key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The token's state, as one line when it is not logged in.
    pub problem: Option<String>,
    /// Each configured key: `None` when armed, else why not.
    pub keys: Vec<(String, Option<String>)>,
    /// Armed keys that could leave the token (extractable, not sensitive).
    pub warnings: Vec<(String, String)>,
}

impl Pkcs11Backend {
    /// Loads the module, looks for the token and starts the sessions'
    /// threads and the monitor. `Err`: one line (module not loadable, not a
    /// PKCS#11 module, initialisation refused).
    pub fn start(config: &Config, settings: &Pkcs11Config) -> Result<Self, String> {
        let specs: Vec<KeySpec> = config
            .keys
            .iter()
            .map(|k| KeySpec {
                name: k.name.clone(),
                object: settings.object(&k.name),
                public: k.public_key.clone(),
            })
            .collect();
        let keys = specs
            .iter()
            .map(|s| (s.name.clone(), s.public.clone()))
            .collect();
        let token = Arc::new(Token::open(
            &settings.module,
            settings.token.clone(),
            specs,
        )?);
        let (wake, woken) = mpsc::sync_channel::<()>(1);
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let sessions = settings.sessions.unwrap_or(cores);
        let pool = {
            let token = Arc::clone(&token);
            let wake = wake.clone();
            Pool::start(
                "keyholder-pkcs11",
                sessions,
                sessions * super::builtin::QUEUE_PER_WORKER,
                move |_| {
                    let token = Arc::clone(&token);
                    let wake = wake.clone();
                    let mut session = Worker {
                        token,
                        session: WorkerSession::default(),
                    };
                    move |(index, data, flags): Job| {
                        let result = session
                            .token
                            .sign(&mut session.session, index, &data, flags);
                        if let Err(SignFailure::Token { gone: true, .. }) = &result {
                            let _ = wake.try_send(());
                        }
                        result
                    }
                },
            )
            .map_err(|e| format!("cannot start the token session threads: {e}"))?
        };
        let stopped = Arc::new(AtomicBool::new(false));
        {
            let token = Arc::clone(&token);
            let stopped = Arc::clone(&stopped);
            std::thread::Builder::new()
                .name("keyholder-pkcs11-monitor".into())
                .spawn(move || monitor(&token, &woken, &stopped))
                .map_err(|e| format!("cannot start the token monitor thread: {e}"))?;
        }
        tracing::info!(
            "pkcs11 backend: module {}, {} ({}); {} session thread(s), queue of {}",
            settings.module.display(),
            token.name(),
            match token.report().0 {
                Condition::Missing => "not present yet",
                _ => "present, not logged in: arm it",
            },
            pool.workers(),
            pool.capacity()
        );
        Ok(Self {
            token,
            pool,
            keys,
            timeout_ms: AtomicU64::new(millis(config.limits.upstream_timeout)),
            wake,
            stopped,
        })
    }

    /// The configured module path (what `ssh-add -s` must name).
    pub fn module(&self) -> &std::path::Path {
        self.token.module()
    }

    /// Logs in with `pin` and arms the keys (blocking: call off the async
    /// threads). `Err`: one line naming the token.
    pub fn arm_blocking(&self, pin: &[u8]) -> Result<(), String> {
        self.token.arm(pin)
    }

    /// Logs out and forgets the PIN (blocking).
    pub fn disarm_blocking(&self) {
        disarm(&self.token);
    }

    /// Whether `id` (from `ssh-add -s`/`-e`, which resolves symbolic links)
    /// names the configured module.
    fn is_module(&self, id: &str) -> bool {
        let given = std::path::Path::new(id);
        given == self.module()
            || std::fs::canonicalize(given)
                .is_ok_and(|p| Some(p) == std::fs::canonicalize(self.module()).ok())
    }

    /// The token's and the keys' state, no token call.
    pub fn report(&self) -> Report {
        let (condition, states) = self.token.report();
        let problem = match condition {
            Condition::LoggedIn => None,
            Condition::Missing => Some(format!("{} is not present", self.token.name())),
            Condition::NotLoggedIn => {
                Some(format!("{} is not logged in (arm it)", self.token.name()))
            }
            Condition::PinRefused(why) => Some(why),
        };
        let warnings = self
            .keys
            .iter()
            .zip(&states)
            .filter_map(|((name, _), state)| match state {
                KeyState::Armed(a) => a.warning.clone().map(|w| (name.clone(), w)),
                KeyState::NotArmed(_) => None,
            })
            .collect();
        let keys = self
            .keys
            .iter()
            .zip(states)
            .map(|((name, _), state)| {
                (
                    name.clone(),
                    match state {
                        KeyState::Armed(_) => None,
                        KeyState::NotArmed(why) => Some(why),
                    },
                )
            })
            .collect();
        Report {
            problem,
            keys,
            warnings,
        }
    }

    fn identities_now(&self) -> Vec<Identity> {
        let (_, states) = self.token.report();
        self.keys
            .iter()
            .zip(states)
            .filter(|(_, s)| matches!(s, KeyState::Armed(_)))
            .map(|((name, public), _)| Identity {
                credential: PublicCredential::Key(public.clone()),
                comment: name.clone(),
            })
            .collect()
    }

    /// Stops the monitor and the sessions; logs out and finalises.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        let _ = self.wake.try_send(());
        self.pool.stop();
        self.token.finish();
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms.load(Ordering::Relaxed))
    }
}

/// What `check-config` (as root) finds on the token, through a login of
/// its own (`pin`; without one only the token's presence is checked).
/// Blocking. `Err`: the module cannot be used at all (one line).
pub fn inspect(
    config: &Config,
    settings: &Pkcs11Config,
    pin: Option<&[u8]>,
) -> Result<Report, String> {
    let specs = config
        .keys
        .iter()
        .map(|k| KeySpec {
            name: k.name.clone(),
            object: settings.object(&k.name),
            public: k.public_key.clone(),
        })
        .collect();
    let token = Token::open(&settings.module, settings.token.clone(), specs)?;
    let logged_in = match pin {
        Some(pin) if !token.missing() => token.arm(pin).map(|()| true),
        _ => Ok(false),
    };
    let (condition, states) = token.report();
    token.finish();
    logged_in?;
    let names = config.keys.iter().map(|k| k.name.clone());
    let warnings = names
        .clone()
        .zip(&states)
        .filter_map(|(name, state)| match state {
            KeyState::Armed(a) => a.warning.clone().map(|w| (name, w)),
            KeyState::NotArmed(_) => None,
        })
        .collect();
    let keys = names
        .zip(states)
        .map(|(name, state)| match state {
            KeyState::Armed(_) => (name, None),
            KeyState::NotArmed(why) => (name, Some(why)),
        })
        .collect();
    let problem = match condition {
        Condition::LoggedIn => None,
        Condition::Missing => Some(format!("{} is not present", token.name())),
        Condition::NotLoggedIn | Condition::PinRefused(_) => None,
    };
    Ok(Report {
        problem,
        keys,
        warnings,
    })
}

/// One session thread's state; closes its session when the thread ends.
struct Worker {
    token: Arc<Token>,
    session: WorkerSession,
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.token.close(&mut self.session);
    }
}

fn monitor(token: &Token, woken: &mpsc::Receiver<()>, stopped: &AtomicBool) {
    loop {
        match woken.recv_timeout(PROBE_EVERY) {
            Ok(()) | Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
        if stopped.load(Ordering::SeqCst) {
            return;
        }
        if !token.missing() && !token.probe() {
            token.lost("its session or key objects no longer answer");
        }
        if token.missing() {
            token.recover();
        }
    }
}

fn disarm(token: &Token) {
    token.disarm();
    tracing::info!("pkcs11: {} logged out; PIN forgotten", token.name());
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Backend for Pkcs11Backend {
    fn name(&self) -> &'static str {
        "pkcs11"
    }

    fn identities(&self) -> BackendFuture<'_, Vec<Identity>> {
        let ids = self.identities_now();
        Box::pin(async move { Ok(ids) })
    }

    fn sign(&self, request: SignRequest) -> BackendFuture<'_, Vec<u8>> {
        Box::pin(async move {
            let PublicCredential::Key(public) = &request.credential else {
                return Err(BackendError::Refused);
            };
            let Some(index) = self.keys.iter().position(|(_, k)| k == public) else {
                return Err(BackendError::Refused);
            };
            match self
                .pool
                .run((index, request.data, request.flags), self.timeout())
                .await
            {
                Ok(Ok(sig)) => Ok(sig),
                Ok(Err(SignFailure::NotReady(why))) => Err(BackendError::Unreachable(
                    std::io::Error::other(format!("pkcs11: {why}")),
                )),
                Ok(Err(SignFailure::NotArmed(_))) => Err(BackendError::Refused),
                Ok(Err(e @ (SignFailure::Token { .. } | SignFailure::Bad(_)))) => {
                    Err(BackendError::Broken(format!("pkcs11: {e}")))
                }
                Err(PoolError::Busy) => Err(BackendError::Busy),
                Err(PoolError::Timeout) => Err(BackendError::Timeout),
                Err(PoolError::Stopped) => Err(BackendError::Broken(
                    "pkcs11: the session threads have stopped".into(),
                )),
            }
        })
    }

    fn add(&self, _identity: AddIdentityConstrained, _origin: String) -> BackendFuture<'_, ()> {
        Box::pin(async move {
            tracing::warn!(
                "pkcs11 backend: refused to add a key: the keys live on the token (arm with \
                 `keyholder arm` or `ssh-add -s MODULE`)"
            );
            Err(BackendError::Refused)
        })
    }

    fn remove(&self, _key: PublicCredential) -> BackendFuture<'_, ()> {
        Box::pin(async move { Err(BackendError::Refused) })
    }

    /// `ssh-add -D`: as `disarm`, logs out and forgets the PIN.
    fn remove_all(&self) -> BackendFuture<'_, ()> {
        let token = Arc::clone(&self.token);
        Box::pin(async move {
            tokio::task::spawn_blocking(move || disarm(&token))
                .await
                .map_err(|e| BackendError::Broken(format!("pkcs11: {e}")))
        })
    }

    fn add_smartcard(&self, id: String, pin: Zeroizing<String>) -> BackendFuture<'_, ()> {
        Box::pin(async move {
            if !self.is_module(&id) {
                tracing::warn!(
                    "pkcs11: refused to log in for module {id:?}: the configured module is {}",
                    self.module().display()
                );
                return Err(BackendError::Refused);
            }
            let token = Arc::clone(&self.token);
            let armed = tokio::task::spawn_blocking(move || token.arm(pin.as_bytes()))
                .await
                .map_err(|e| BackendError::Broken(format!("pkcs11: {e}")))?;
            match armed {
                Ok(()) => {
                    let report = self.report();
                    let armed = report.keys.iter().filter(|(_, why)| why.is_none()).count();
                    tracing::info!(
                        "pkcs11: {} logged in; {armed}/{} key(s) armed",
                        self.token.name(),
                        report.keys.len()
                    );
                    Ok(())
                }
                Err(why) => {
                    tracing::error!("pkcs11: not armed: {why}");
                    Err(BackendError::Refused)
                }
            }
        })
    }

    fn remove_smartcard(&self, id: String) -> BackendFuture<'_, ()> {
        Box::pin(async move {
            if !self.is_module(&id) {
                tracing::warn!(
                    "pkcs11: refused to log out of module {id:?}: the configured module is {}",
                    self.module().display()
                );
                return Err(BackendError::Refused);
            }
            let token = Arc::clone(&self.token);
            tokio::task::spawn_blocking(move || disarm(&token))
                .await
                .map_err(|e| BackendError::Broken(format!("pkcs11: {e}")))
        })
    }

    fn status(&self) -> BackendFuture<'_, BackendStatus> {
        let report = self.report();
        let identities = self.identities_now();
        Box::pin(async move {
            if self.token.missing() {
                return Err(BackendError::Unreachable(std::io::Error::other(format!(
                    "pkcs11: {}",
                    report.problem.unwrap_or_default()
                ))));
            }
            Ok(BackendStatus { identities })
        })
    }

    fn notes(&self) -> Vec<String> {
        let report = self.report();
        let mut notes: Vec<String> = report
            .problem
            .into_iter()
            .map(|p| format!("pkcs11: {p}"))
            .collect();
        // Per-key reasons only once the token is logged in (before that,
        // every key has the token's reason).
        if notes.is_empty() {
            notes.extend(
                report
                    .keys
                    .into_iter()
                    .filter_map(|(name, why)| why.map(|why| format!("{name}: {why}"))),
            );
        }
        notes.extend(
            report
                .warnings
                .into_iter()
                .map(|(name, w)| format!("{name}: warning: {w}")),
        );
        notes
    }

    fn set_timeout(&self, timeout: Duration) {
        self.timeout_ms.store(millis(timeout), Ordering::Relaxed);
    }
}
