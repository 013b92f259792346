//! The host's login at the cluster: AppRole (the secret id given at arm
//! time, kept zeroized in locked memory to log in again), a token given at
//! arm time, a TLS client certificate (logs in by itself), or a token file
//! kept fresh by an OpenBao/Vault Agent (re-read when it changes).
//!
//! The token is renewed before it expires; when renewal is refused, the
//! token is revoked or the cluster answers "permission denied" to a call
//! made with it, the session logs in again with what it keeps (one login
//! at a time, whoever notices first). `logout` revokes the token at the
//! cluster and forgets the secret.
//!
//! This module never logs, prints or copies a secret or a token outside
//! the zeroized buffers it keeps, and never logs in on its own after
//! `logout` until it is given a secret (or asked to arm) again.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant, SystemTime};

use hyper::Method;
use serde_json::{json, Value};
use zeroize::Zeroizing;

use super::http::{json_body, secret_body, CallError, Cluster, Reply};

/// How the host logs in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Method_ {
    /// AppRole at `auth/MOUNT/login`; the secret id comes from `arm`.
    AppRole {
        /// The auth mount (default `approle`).
        mount: String,
        /// The role id (not a secret).
        role_id: String,
    },
    /// A token given by `arm`; it cannot be replaced by the daemon.
    Token,
    /// TLS client certificate at `auth/MOUNT/login` (default `cert`).
    Cert {
        /// The auth mount.
        mount: String,
    },
    /// A token file kept fresh by an agent's auto-auth sink.
    Agent {
        /// The sink file.
        token_file: PathBuf,
    },
}

/// Why there is no usable token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginState {
    /// Logged in.
    LoggedIn,
    /// Never armed, or disarmed.
    NotLoggedIn,
    /// The token was revoked (or expired) and cannot be replaced.
    Revoked,
    /// The cluster refused the login (its reason).
    Refused(String),
    /// The cluster could not be asked.
    Unavailable(CallError),
}

impl std::fmt::Display for LoginState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::LoggedIn => f.write_str("logged in"),
            Self::NotLoggedIn => f.write_str("not logged in (run keyholder arm)"),
            Self::Revoked => f.write_str("token revoked or expired (run keyholder arm)"),
            Self::Refused(why) => write!(f, "login refused by the cluster: {why}"),
            Self::Unavailable(e) => write!(f, "{e}"),
        }
    }
}

/// A token and when it was obtained (its generation).
pub struct Token {
    value: Zeroizing<String>,
    /// Increases with each new token.
    pub generation: u64,
}

impl Token {
    /// The token, for the `X-Vault-Token` header.
    pub fn value(&self) -> &str {
        &self.value
    }
}

/// A secret kept in memory locked against swapping (best effort; the
/// daemon also locks all its memory), zeroized when dropped.
pub struct Secret(Zeroizing<Vec<u8>>);

impl Secret {
    /// Keeps `bytes` (trailing newlines trimmed).
    pub fn new(bytes: &[u8]) -> Self {
        let end = bytes
            .iter()
            .rposition(|b| !b.is_ascii_whitespace())
            .map_or(0, |i| i + 1);
        let mut v = Zeroizing::new(Vec::with_capacity(end.max(1)));
        v.extend_from_slice(bytes.get(..end).unwrap_or_default());
        if let Some(ptr) = std::ptr::NonNull::new(v.as_mut_ptr().cast::<std::ffi::c_void>()) {
            // SAFETY: the buffer is live for the duration of the call; mlock
            // only changes paging.
            let _ = unsafe { nix::sys::mman::mlock(ptr, v.capacity().max(1)) };
        }
        Self(v)
    }

    fn as_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.0).ok()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        let capacity = self.0.capacity().max(1);
        // Wiped before the pages are unlocked (and again by Zeroizing).
        self.0.zeroize();
        if let Some(ptr) = std::ptr::NonNull::new(self.0.as_mut_ptr().cast::<std::ffi::c_void>()) {
            // SAFETY: the buffer is still allocated; munlock only changes paging.
            let _ = unsafe { nix::sys::mman::munlock(ptr, capacity) };
        }
    }
}

/// The lease of the current token.
#[derive(Debug, Clone, Copy)]
struct Lease {
    obtained: Instant,
    /// Lease granted at login (0: never expires).
    login_ttl: Duration,
    /// When the token expires (None: never).
    expires: Option<Instant>,
    renewable: bool,
}

/// The session: the token, what logs in again, and the counters.
pub struct Session {
    method: Method_,
    secret: Mutex<Option<Secret>>,
    token: RwLock<Option<Arc<Token>>>,
    state: Mutex<(LoginState, Option<Lease>)>,
    relogin: tokio::sync::Mutex<()>,
    generation: AtomicU64,
    disarmed: std::sync::atomic::AtomicBool,
    agent_stamp: Mutex<Option<(u64, u64, i64, i64)>>,
    /// Logins that got a token.
    pub logins: AtomicU64,
    /// Renewals that extended the token.
    pub renewals: AtomicU64,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("method", &self.method)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Session {
    /// A session that has not logged in.
    pub fn new(method: Method_) -> Self {
        Self {
            method,
            secret: Mutex::new(None),
            token: RwLock::new(None),
            state: Mutex::new((LoginState::NotLoggedIn, None)),
            relogin: tokio::sync::Mutex::new(()),
            generation: AtomicU64::new(0),
            disarmed: std::sync::atomic::AtomicBool::new(false),
            agent_stamp: Mutex::new(None),
            logins: AtomicU64::new(0),
            renewals: AtomicU64::new(0),
        }
    }

    /// The login method.
    pub fn method(&self) -> &Method_ {
        &self.method
    }

    /// Why there is (or is not) a token.
    pub fn state(&self) -> LoginState {
        lock(&self.state).0.clone()
    }

    /// The current token, if any.
    pub fn token(&self) -> Option<Arc<Token>> {
        self.token
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Whether the session can log in without being given anything.
    fn can_login(&self) -> bool {
        if self.disarmed.load(Ordering::Relaxed) {
            return false;
        }
        match &self.method {
            Method_::AppRole { .. } => lock(&self.secret).is_some(),
            Method_::Token => false,
            Method_::Cert { .. } | Method_::Agent { .. } => true,
        }
    }

    /// Arms: keeps `secret` (AppRole secret id, or the token for `token`;
    /// ignored by `cert` and `agent`) and logs in with it. The secret is kept
    /// only when the login succeeds.
    pub async fn unlock(
        &self,
        cluster: &Cluster,
        secret: &[u8],
        deadline: Instant,
    ) -> Result<(), LoginState> {
        let _guard = self.relogin.lock().await;
        let secret = Secret::new(secret);
        let needs_secret = matches!(self.method, Method_::AppRole { .. } | Method_::Token);
        if needs_secret && secret.is_empty() {
            return Err(LoginState::Refused("an empty secret was given".into()));
        }
        self.disarmed.store(false, Ordering::Relaxed);
        let result = match &self.method {
            Method_::Token => {
                let Some(token) = secret.as_str() else {
                    return Err(LoginState::Refused("the token is not text".into()));
                };
                self.adopt_token(cluster, token, deadline).await
            }
            Method_::Agent { .. } => self.read_agent_token(cluster, deadline).await,
            _ => self.login_with(cluster, Some(&secret), deadline).await,
        };
        match result {
            Ok(()) => {
                if needs_secret {
                    *lock(&self.secret) = Some(secret);
                }
                Ok(())
            }
            Err(state) => {
                self.set_state(state.clone(), None);
                Err(state)
            }
        }
    }

    /// Logs in now if the session can by itself (cert, agent, AppRole
    /// with a kept secret). Used at start and when no token is held.
    pub async fn ensure(
        &self,
        cluster: &Cluster,
        deadline: Instant,
    ) -> Result<Arc<Token>, LoginState> {
        if let Some(t) = self.token() {
            return Ok(t);
        }
        let seen = self.generation.load(Ordering::Relaxed);
        self.relogin_after(cluster, seen, deadline).await
    }

    /// The token of generation `seen` was refused: log in again (unless
    /// someone already did), or mark it revoked.
    pub async fn relogin_after(
        &self,
        cluster: &Cluster,
        seen: u64,
        deadline: Instant,
    ) -> Result<Arc<Token>, LoginState> {
        let _guard = self.relogin.lock().await;
        if self.generation.load(Ordering::Relaxed) != seen {
            if let Some(t) = self.token() {
                return Ok(t);
            }
        }
        if !self.can_login() {
            let state = if self.token().is_some() || matches!(self.state(), LoginState::Revoked) {
                LoginState::Revoked
            } else {
                match self.state() {
                    LoginState::LoggedIn => LoginState::Revoked,
                    other => other,
                }
            };
            self.clear_token();
            self.set_state(state.clone(), None);
            return Err(state);
        }
        self.clear_token();
        let result = if let Method_::Agent { .. } = self.method {
            self.read_agent_token(cluster, deadline).await
        } else {
            let secret = lock(&self.secret).take();
            let r = self.login_with(cluster, secret.as_ref(), deadline).await;
            if let Some(s) = secret {
                let mut kept = lock(&self.secret);
                if kept.is_none() && !self.disarmed.load(Ordering::Relaxed) {
                    *kept = Some(s);
                }
            }
            r
        };
        match result {
            Ok(()) => self.token().ok_or(LoginState::NotLoggedIn),
            Err(state) => {
                self.set_state(state.clone(), None);
                Err(state)
            }
        }
    }

    async fn login_with(
        &self,
        cluster: &Cluster,
        secret: Option<&Secret>,
        deadline: Instant,
    ) -> Result<(), LoginState> {
        let (path, body) = match &self.method {
            Method_::AppRole { mount, role_id } => {
                let secret_id = secret
                    .and_then(Secret::as_str)
                    .ok_or(LoginState::NotLoggedIn)?;
                (
                    format!("auth/{mount}/login"),
                    Some(secret_body(
                        &json!({"role_id": role_id, "secret_id": secret_id}),
                    )),
                )
            }
            Method_::Cert { mount } => (format!("auth/{mount}/login"), None),
            Method_::Token | Method_::Agent { .. } => return Err(LoginState::NotLoggedIn),
        };
        let mut reply = cluster
            .call(Method::POST, &path, None, body.clone(), deadline)
            .await
            .map_err(LoginState::Unavailable)?;
        if !reply.ok() && reply.status < 500 && Instant::now() < deadline {
            // A standby's stale copy may refuse a fresh secret id: ask again,
            // once, starting at another address.
            tokio::time::sleep(Duration::from_millis(200)).await;
            reply = cluster
                .call_elsewhere(Method::POST, &path, None, body.clone(), deadline)
                .await
                .map_err(LoginState::Unavailable)?;
        }
        if !reply.ok() {
            return Err(LoginState::Refused(reply.errors()));
        }
        let auth = reply
            .body
            .as_ref()
            .ok()
            .and_then(|b| b.get("auth"))
            .ok_or_else(|| LoginState::Refused("the login answer has no auth".into()))?;
        let token = auth
            .get("client_token")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| LoginState::Refused("the login answer has no client_token".into()))?;
        let ttl = auth
            .get("lease_duration")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        let renewable = auth
            .get("renewable")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        self.install(token, ttl, renewable);
        Ok(())
    }

    /// Checks a token with `lookup-self` and adopts it.
    async fn adopt_token(
        &self,
        cluster: &Cluster,
        token: &str,
        deadline: Instant,
    ) -> Result<(), LoginState> {
        let reply = cluster
            .call(
                Method::GET,
                "auth/token/lookup-self",
                Some(token),
                None,
                deadline,
            )
            .await
            .map_err(LoginState::Unavailable)?;
        if reply.status == 403 {
            return Err(LoginState::Refused(
                "the token is not valid (permission denied)".into(),
            ));
        }
        if !reply.ok() {
            return Err(LoginState::Refused(reply.errors()));
        }
        let data = reply.body.as_ref().ok().and_then(|b| b.get("data"));
        let ttl = data
            .and_then(|d| d.get("ttl"))
            .and_then(Value::as_u64)
            .unwrap_or(0);
        let renewable = data
            .and_then(|d| d.get("renewable"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        self.install(token, ttl, renewable);
        Ok(())
    }

    fn agent_file_stamp(path: &std::path::Path) -> Option<(u64, u64, i64, i64)> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        Some((
            m.dev(),
            m.ino(),
            m.size() as i64,
            m.mtime_nsec() + m.mtime() * 1_000_000_000,
        ))
    }

    /// Reads the agent's token file (through the trust check) and adopts it.
    async fn read_agent_token(
        &self,
        cluster: &Cluster,
        deadline: Instant,
    ) -> Result<(), LoginState> {
        let Method_::Agent { token_file } = &self.method else {
            return Err(LoginState::NotLoggedIn);
        };
        let stamp = Self::agent_file_stamp(token_file);
        let bytes = read_token_file(token_file).map_err(|e| {
            LoginState::Refused(format!("token_file {}: {e}", token_file.display()))
        })?;
        let secret = Secret::new(&bytes);
        let token = secret.as_str().filter(|t| !t.is_empty()).ok_or_else(|| {
            LoginState::Refused(format!("token_file {} is empty", token_file.display()))
        })?;
        self.adopt_token(cluster, token, deadline).await?;
        *lock(&self.agent_stamp) = stamp;
        Ok(())
    }

    fn install(&self, token: &str, ttl: u64, renewable: bool) {
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let now = Instant::now();
        let lease = Lease {
            obtained: now,
            login_ttl: Duration::from_secs(ttl),
            expires: (ttl > 0).then(|| now + Duration::from_secs(ttl)),
            renewable,
        };
        *self
            .token
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Arc::new(Token {
            value: Zeroizing::new(token.to_string()),
            generation,
        }));
        self.logins.fetch_add(1, Ordering::Relaxed);
        self.set_state(LoginState::LoggedIn, Some(lease));
    }

    fn clear_token(&self) {
        *self
            .token
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    }

    fn set_state(&self, state: LoginState, lease: Option<Lease>) {
        let mut s = lock(&self.state);
        let changed = s.0 != state;
        *s = (state.clone(), lease);
        drop(s);
        if changed {
            match &state {
                LoginState::LoggedIn => tracing::info!("openbao: logged in"),
                other => tracing::warn!("openbao: {other}"),
            }
        }
    }

    /// Disarm: revokes the token at the cluster (best effort) and forgets
    /// the token and the secret. No login happens by itself until `unlock`.
    pub async fn logout(&self, cluster: &Cluster, deadline: Instant) -> Result<(), CallError> {
        let _guard = self.relogin.lock().await;
        self.disarmed.store(true, Ordering::Relaxed);
        *lock(&self.secret) = None;
        let token = self.token();
        self.clear_token();
        self.generation.fetch_add(1, Ordering::Relaxed);
        self.set_state(LoginState::NotLoggedIn, None);
        if let Some(token) = token {
            let reply = cluster
                .call(
                    Method::POST,
                    "auth/token/revoke-self",
                    Some(token.value()),
                    None,
                    deadline,
                )
                .await?;
            if !reply.ok() && reply.status != 403 {
                return Err(CallError::Unreachable(format!(
                    "revoking the token: {}",
                    reply.errors()
                )));
            }
        }
        Ok(())
    }

    /// One step of upkeep, called about once a second: renews the token
    /// when half its lease has passed, logs in again when renewal is refused
    /// or capped, re-reads the agent's token file when it changed, and logs
    /// in (cert, agent) when no token is held.
    pub async fn upkeep(&self, cluster: &Cluster, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        if let Method_::Agent { token_file } = &self.method {
            let stamp = Self::agent_file_stamp(token_file);
            if stamp.is_some() && stamp != *lock(&self.agent_stamp) && self.can_login() {
                let seen = self.generation.load(Ordering::Relaxed);
                let _ = self.relogin_after(cluster, seen, deadline).await;
                return;
            }
        }
        let Some(token) = self.token() else {
            if self.can_login() && !matches!(self.method, Method_::AppRole { .. }) {
                let _ = self.ensure(cluster, deadline).await;
            }
            return;
        };
        let lease = lock(&self.state).1;
        let Some(lease) = lease else { return };
        let Some(expires) = lease.expires else { return };
        let now = Instant::now();
        let half = lease.login_ttl / 2;
        let renew_at = lease.obtained + (expires - lease.obtained) / 2;
        if now < renew_at {
            return;
        }
        // Renew; fall back to logging in again.
        let relogin = if lease.renewable {
            match self.renew(cluster, &token, lease.login_ttl, deadline).await {
                Ok(granted) => granted < half && self.can_login(),
                Err(RenewError::Denied) => true,
                Err(RenewError::Other) => {
                    expires.saturating_duration_since(now) < half && self.can_login()
                }
            }
        } else {
            true
        };
        if relogin && self.can_login() {
            let _ = self
                .relogin_after(cluster, token.generation, deadline)
                .await;
        }
    }

    async fn renew(
        &self,
        cluster: &Cluster,
        token: &Token,
        ask: Duration,
        deadline: Instant,
    ) -> Result<Duration, RenewError> {
        let body = json!({"increment": format!("{}s", ask.as_secs())});
        let reply: Reply = cluster
            .call(
                Method::POST,
                "auth/token/renew-self",
                Some(token.value()),
                Some(json_body(&body)),
                deadline,
            )
            .await
            .map_err(|_| RenewError::Other)?;
        if reply.status == 403 {
            return Err(RenewError::Denied);
        }
        if !reply.ok() {
            return Err(RenewError::Other);
        }
        let auth = reply.body.as_ref().ok().and_then(|b| b.get("auth"));
        let ttl = auth
            .and_then(|a| a.get("lease_duration"))
            .and_then(Value::as_u64)
            .ok_or(RenewError::Other)?;
        let now = Instant::now();
        let mut s = lock(&self.state);
        let logged_in = s.0 == LoginState::LoggedIn;
        if let (true, Some(lease)) = (logged_in, s.1.as_mut()) {
            if self.generation.load(Ordering::Relaxed) == token.generation {
                lease.obtained = now;
                lease.expires = Some(now + Duration::from_secs(ttl));
            }
        }
        drop(s);
        self.renewals.fetch_add(1, Ordering::Relaxed);
        Ok(Duration::from_secs(ttl))
    }

    /// Seconds of validity left on the token (None: never expires, or none).
    pub fn remaining(&self) -> Option<Duration> {
        let s = lock(&self.state);
        s.1.and_then(|l| l.expires)
            .map(|e| e.saturating_duration_since(Instant::now()))
    }

    /// A `SystemTime` for logs of when the token expires (tests).
    pub fn expires_at(&self) -> Option<SystemTime> {
        self.remaining().map(|r| SystemTime::now() + r)
    }
}

enum RenewError {
    Denied,
    Other,
}

fn read_token_file(path: &std::path::Path) -> Result<Zeroizing<Vec<u8>>, String> {
    // TRUST: replaced by crate::trust::read_secret once it is on main.
    std::fs::read(path)
        .map(Zeroizing::new)
        .map_err(|e| e.to_string())
}
