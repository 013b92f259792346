//! The openbao backend (`[agent] backend = "openbao"`): the keys never
//! leave an OpenBao or HashiCorp Vault cluster. Each configured key is a
//! non-exportable transit key; keyholder lists the keys whose transit
//! version equals `NAME.pub` (that version is pinned) and asks transit to
//! sign.
//!
//! - [`http`]: the cluster's HTTP client: pooled keep-alive connections,
//!   verified TLS, failover across the configured addresses.
//! - [`auth`]: the host's login (AppRole, token, TLS certificate, agent
//!   token file), renewal and logging in again.
//! - [`keys`]: transit public keys and signatures as SSH keys and blobs.
//!
//! Signatures for one key that arrive while others are on their way go
//! to the cluster together in one `batch_input` request; one that arrives
//! alone goes at once. Every signature is verified against the key's public
//! key before it is returned.
//!
//! This backend never holds a private key, never relays a signature that
//! does not verify, never logs a token or a secret, never decides who may
//! use a key (the policy does), and never blocks an async thread.

pub mod auth;
pub mod ca;
pub mod http;
pub mod keys;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hyper::Method;
use serde_json::{json, Map, Value};
use ssh_agent_lib::proto::{AddIdentityConstrained, Identity, PublicCredential, SignRequest};
use ssh_key::public::KeyData;
use tokio::sync::oneshot;
use zeroize::Zeroizing;

use super::{Backend, BackendError, BackendFuture, BackendStatus};
use auth::{LoginState, Session};
use http::{CallError, Cluster};
use keys::{Params, VerifyKey};

pub use auth::Method_ as AuthMethod;

/// Requests to transit per key and algorithm on their way at once; more
/// signatures wait and go together in the next request.
pub const IN_FLIGHT: usize = 4;
/// The most signatures in one `batch_input` request.
pub const MAX_BATCH: usize = 256;

/// One configured key.
#[derive(Debug, Clone)]
pub struct KeySpec {
    /// The key's configured name.
    pub name: String,
    /// Its public key (`NAME.pub` or inline).
    pub public: KeyData,
    /// The transit key's name.
    pub transit_key: String,
}

/// Everything the backend needs, already read and checked.
pub struct Settings {
    /// The cluster's addresses.
    pub addresses: Vec<String>,
    /// TLS trust and client certificate.
    pub tls: http::Tls,
    /// `X-Vault-Namespace`, if any.
    pub namespace: Option<String>,
    /// How the host logs in.
    pub auth: AuthMethod,
    /// The transit mount.
    pub transit_mount: String,
    /// The SSH secrets engine's mount (`[certificates] ca = "openbao:ROLE"`).
    pub ssh_mount: String,
    /// The configured keys.
    pub keys: Vec<KeySpec>,
    /// Deadline of each call (`upstream_timeout_secs`).
    pub timeout: Duration,
}

/// What is known about one key's transit key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyState {
    /// Not looked up yet (or the lookup failed for lack of a token).
    Unknown,
    /// Version `N` equals the configured public key.
    Pinned(u64),
    /// No such transit key (or no permission to read it).
    Missing(String),
    /// The transit key exists; no version equals the configured key.
    Mismatch(String),
}

/// The backend's view of itself, for `status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The login, or why there is none.
    pub login: LoginState,
    /// Each key by name, and its state.
    pub keys: Vec<(String, KeyState)>,
}

impl Report {
    /// One line per problem, naming the key or the cluster (empty: all armed).
    pub fn problems(&self) -> Vec<String> {
        if self.login != LoginState::LoggedIn {
            return vec![format!("openbao: {}", self.login)];
        }
        self.keys
            .iter()
            .filter_map(|(name, state)| match state {
                KeyState::Pinned(_) => None,
                KeyState::Unknown => Some(format!("key {name}: not looked up in transit yet")),
                KeyState::Missing(why) => Some(format!("key {name}: transit key missing ({why})")),
                KeyState::Mismatch(why) => Some(format!("key {name}: public key mismatch ({why})")),
            })
            .collect()
    }
}

struct Job {
    data: Vec<u8>,
    reply: oneshot::Sender<Result<Vec<u8>, BackendError>>,
}

#[derive(Default)]
struct Lane {
    in_flight: usize,
    queue: VecDeque<Job>,
}

struct Entry {
    spec: KeySpec,
    verify: VerifyKey,
    state: Mutex<KeyState>,
    /// Per SSH signature algorithm (RSA keys have three).
    lanes: Mutex<Vec<(Params, Lane)>>,
}

struct Inner {
    cluster: Cluster,
    session: Session,
    transit: String,
    ssh: String,
    keys: Vec<Entry>,
    timeout_ms: AtomicU64,
    /// What the last status found wrong with the cluster as a whole.
    cluster_problem: Mutex<Option<String>>,
    batches: AtomicU64,
    batched: AtomicU64,
}

/// The openbao backend.
#[derive(Clone)]
pub struct OpenBao {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for OpenBao {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenBao")
            .field("cluster", &self.inner.cluster)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn failed(message: impl std::fmt::Display) -> BackendError {
    BackendError::Broken(format!("openbao: {message}"))
}

fn login_error(state: LoginState) -> BackendError {
    match state {
        LoginState::Unavailable(CallError::Timeout(_)) => BackendError::Timeout,
        other => failed(other),
    }
}

/// Whether an error says the cluster as a whole cannot sign now (sealed,
/// unreachable, no answer in time), not one key or the login.
fn cluster_down(e: &BackendError) -> bool {
    match e {
        BackendError::Timeout => true,
        BackendError::Broken(text) => {
            text.contains("sealed")
                || text.contains("no cluster address answered")
                || text.contains("no usable answer from the cluster")
        }
        _ => false,
    }
}

fn call_error(e: CallError) -> BackendError {
    match e {
        CallError::Timeout(_) => BackendError::Timeout,
        other => failed(other),
    }
}

impl OpenBao {
    /// The backend (no call to the cluster yet: see [`OpenBao::run`]).
    pub fn new(settings: Settings) -> Result<Self, String> {
        let cluster = Cluster::new(
            &settings.addresses,
            &settings.tls,
            settings.namespace.as_deref(),
        )?;
        let keys = settings
            .keys
            .into_iter()
            .map(|spec| {
                let verify =
                    VerifyKey::new(&spec.public).map_err(|e| format!("key {}: {e}", spec.name))?;
                Ok(Entry {
                    spec,
                    verify,
                    state: Mutex::new(KeyState::Unknown),
                    lanes: Mutex::new(Vec::new()),
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Self {
            inner: Arc::new(Inner {
                cluster,
                session: Session::new(settings.auth),
                transit: settings.transit_mount.trim_matches('/').to_string(),
                ssh: settings.ssh_mount.trim_matches('/').to_string(),
                keys,
                timeout_ms: AtomicU64::new(millis(settings.timeout)),
                cluster_problem: Mutex::new(None),
                batches: AtomicU64::new(0),
                batched: AtomicU64::new(0),
            }),
        })
    }

    fn deadline(&self) -> Instant {
        Instant::now() + Duration::from_millis(self.inner.timeout_ms.load(Ordering::Relaxed))
    }

    /// The session's upkeep until `shutdown` fires: logs in when it can by
    /// itself (cert, agent), renews, logs in again, and looks the keys up
    /// after each new login.
    pub async fn run(&self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut seen_generation = None;
        loop {
            let timeout = Duration::from_millis(self.inner.timeout_ms.load(Ordering::Relaxed));
            self.inner
                .session
                .upkeep(&self.inner.cluster, timeout)
                .await;
            let generation = self.inner.session.token().map(|t| t.generation);
            if generation.is_some() && generation != seen_generation {
                seen_generation = generation;
                self.resolve_all().await;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.changed() => return,
            }
            if *shutdown.borrow() {
                return;
            }
        }
    }

    /// Arms: logs in with `secret` (AppRole secret id, or a token), keeps
    /// it, and looks every key up. The error is one line naming the cause.
    pub async fn arm(&self, secret: &[u8]) -> Result<Report, String> {
        self.inner
            .session
            .unlock(&self.inner.cluster, secret, self.deadline())
            .await
            .map_err(|e| e.to_string())?;
        self.resolve_all().await;
        Ok(self.report())
    }

    /// Disarms: revokes the token at the cluster and forgets the secret.
    pub async fn disarm(&self) -> Result<(), String> {
        for entry in &self.inner.keys {
            *lock(&entry.state) = KeyState::Unknown;
        }
        self.inner
            .session
            .logout(&self.inner.cluster, self.deadline())
            .await
            .map_err(|e| e.to_string())
    }

    /// At exit: revokes a token the daemon obtained itself (within 3 s).
    async fn revoke_at_exit(&self) {
        let deadline = Instant::now() + Duration::from_secs(3);
        if self.inner.session.token().is_some() {
            match self
                .inner
                .session
                .logout(&self.inner.cluster, deadline)
                .await
            {
                Ok(()) => tracing::info!("openbao: token revoked at exit"),
                Err(e) => tracing::warn!("openbao: revoking the token at exit: {e}"),
            }
        }
    }

    /// The state of the login and of each key, as last seen.
    pub fn report(&self) -> Report {
        Report {
            login: self.inner.session.state(),
            keys: self
                .inner
                .keys
                .iter()
                .map(|e| (e.spec.name.clone(), lock(&e.state).clone()))
                .collect(),
        }
    }

    /// Counters: (logins, renewals, failovers, batch requests, signatures in batches).
    pub fn counters(&self) -> (u64, u64, u64, u64, u64) {
        let s = &self.inner.session;
        (
            s.logins.load(Ordering::Relaxed),
            s.renewals.load(Ordering::Relaxed),
            self.inner.cluster.failovers(),
            self.inner.batches.load(Ordering::Relaxed),
            self.inner.batched.load(Ordering::Relaxed),
        )
    }

    /// Looks every key up in transit (with the current token).
    pub async fn resolve_all(&self) {
        for index in 0..self.inner.keys.len() {
            let _ = self.resolve(index).await;
        }
    }

    /// Looks one key up: finds the version equal to the configured key.
    async fn resolve(&self, index: usize) -> Result<u64, BackendError> {
        let inner = &self.inner;
        let entry = inner.keys.get(index).ok_or(BackendError::Refused)?;
        let deadline = self.deadline();
        let path = format!("{}/keys/{}", inner.transit, entry.spec.transit_key);
        let mut token = inner
            .session
            .ensure(&inner.cluster, deadline)
            .await
            .map_err(login_error)?;
        let mut reply = inner
            .cluster
            .call(Method::GET, &path, Some(token.value()), None, deadline)
            .await
            .map_err(call_error)?;
        if reply.status == 403 {
            token = inner
                .session
                .relogin_after(&inner.cluster, token.generation, deadline)
                .await
                .map_err(login_error)?;
            reply = inner
                .cluster
                .call(Method::GET, &path, Some(token.value()), None, deadline)
                .await
                .map_err(call_error)?;
        }
        let state = if reply.status == 404
            || reply.status == 403
            || (reply.status == 400 && reply.errors().contains("not found"))
        {
            KeyState::Missing(format!(
                "{}/keys/{}: {}",
                inner.transit,
                entry.spec.transit_key,
                reply.errors()
            ))
        } else if !reply.ok() {
            return Err(failed(format!("reading {path}: {}", reply.errors())));
        } else {
            match pinned_version(&entry.spec.public, entry.verify.kind(), &reply) {
                Ok(v) => KeyState::Pinned(v),
                Err(why) => KeyState::Mismatch(why),
            }
        };
        let mut current = lock(&entry.state);
        if *current != state {
            match &state {
                KeyState::Pinned(v) => tracing::info!(
                    "openbao: key {} is transit key {}/{} version {v}",
                    entry.spec.name,
                    inner.transit,
                    entry.spec.transit_key
                ),
                KeyState::Missing(why) => tracing::warn!(
                    "openbao: key {}: transit key missing: {why}",
                    entry.spec.name
                ),
                KeyState::Mismatch(why) => {
                    tracing::warn!("openbao: key {}: not armed: {why}", entry.spec.name)
                }
                KeyState::Unknown => {}
            }
        }
        *current = state.clone();
        drop(current);
        match state {
            KeyState::Pinned(v) => Ok(v),
            other => Err(failed(format!("key {}: {other:?}", entry.spec.name))),
        }
    }

    /// Signs `data` with key `index` (queued behind requests on their way).
    async fn sign_with(
        &self,
        index: usize,
        data: Vec<u8>,
        flags: u32,
    ) -> Result<Vec<u8>, BackendError> {
        let entry = self.inner.keys.get(index).ok_or(BackendError::Refused)?;
        let params = entry.verify.kind().params(flags);
        let (tx, rx) = oneshot::channel();
        let job = Job { data, reply: tx };
        let start_now = {
            let mut lanes = lock(&entry.lanes);
            let lane = match lanes.iter().position(|(p, _)| *p == params) {
                Some(i) => i,
                None => {
                    lanes.push((params, Lane::default()));
                    lanes.len() - 1
                }
            };
            let Some((_, lane)) = lanes.get_mut(lane) else {
                return Err(BackendError::Refused);
            };
            if lane.in_flight < IN_FLIGHT {
                lane.in_flight += 1;
                Some(job)
            } else {
                lane.queue.push_back(job);
                None
            }
        };
        if let Some(job) = start_now {
            let this = self.clone();
            tokio::spawn(async move { this.drive(index, params, vec![job]).await });
        }
        let deadline = self.deadline() + Duration::from_secs(1);
        match tokio::time::timeout_at(deadline.into(), rx).await {
            Err(_) => Err(BackendError::Timeout),
            Ok(Err(_)) => Err(failed("the signing task ended")),
            Ok(Ok(result)) => result,
        }
    }

    /// Sends `jobs`, then whatever queued meanwhile, until the lane is empty.
    async fn drive(&self, index: usize, params: Params, mut jobs: Vec<Job>) {
        loop {
            let data: Vec<&[u8]> = jobs.iter().map(|j| j.data.as_slice()).collect();
            let results = self.sign_batch(index, &params, &data).await;
            match results {
                Ok(list) => {
                    for (job, result) in jobs.drain(..).zip(list) {
                        let _ = job.reply.send(result);
                    }
                }
                Err(e) => {
                    let text = e.to_string();
                    let timeout = matches!(e, BackendError::Timeout);
                    for job in jobs.drain(..) {
                        let _ = job.reply.send(Err(if timeout {
                            BackendError::Timeout
                        } else {
                            BackendError::Broken(text.clone())
                        }));
                    }
                }
            }
            let Some(entry) = self.inner.keys.get(index) else {
                return;
            };
            let mut lanes = lock(&entry.lanes);
            let Some((_, lane)) = lanes.iter_mut().find(|(p, _)| *p == params) else {
                return;
            };
            if lane.queue.is_empty() {
                lane.in_flight = lane.in_flight.saturating_sub(1);
                return;
            }
            let take = lane.queue.len().min(MAX_BATCH);
            jobs.extend(lane.queue.drain(..take));
        }
    }

    /// One transit request for `data` (one or many), with the pinned
    /// version; each signature verified. Logs in again once on "permission
    /// denied"; looks the key up again once on a version error.
    async fn sign_batch(
        &self,
        index: usize,
        params: &Params,
        data: &[&[u8]],
    ) -> Result<Vec<Result<Vec<u8>, BackendError>>, BackendError> {
        let inner = &self.inner;
        let entry = inner.keys.get(index).ok_or(BackendError::Refused)?;
        let deadline = self.deadline();
        let mut token = inner
            .session
            .ensure(&inner.cluster, deadline)
            .await
            .map_err(login_error)?;
        let pinned = lock(&entry.state).clone();
        let mut version = match pinned {
            KeyState::Pinned(v) => v,
            _ => self.resolve(index).await?,
        };
        let path = format!("{}/sign/{}", inner.transit, entry.spec.transit_key);
        let mut retried_login = false;
        let mut retried_version = false;
        let reply = loop {
            let body = sign_body(params, version, data);
            let reply = inner
                .cluster
                .call(
                    Method::POST,
                    &path,
                    Some(token.value()),
                    Some(http::json_body(&body)),
                    deadline,
                )
                .await
                .map_err(call_error)?;
            if reply.status == 403 && !retried_login {
                retried_login = true;
                token = inner
                    .session
                    .relogin_after(&inner.cluster, token.generation, deadline)
                    .await
                    .map_err(login_error)?;
                continue;
            }
            if !reply.ok() && !retried_version {
                let text = reply.errors();
                if text.contains("version") || text.contains("not found") {
                    retried_version = true;
                    *lock(&entry.state) = KeyState::Unknown;
                    version = self.resolve(index).await?;
                    continue;
                }
            }
            break reply;
        };
        if !reply.ok() {
            return Err(failed(format!(
                "transit refused to sign with {path}: {}",
                reply.errors()
            )));
        }
        if data.len() > 1 {
            inner.batches.fetch_add(1, Ordering::Relaxed);
            inner
                .batched
                .fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        let signatures =
            parse_signatures(&reply, data.len()).map_err(|e| failed(format!("{path}: {e}")))?;
        // Verifying is CPU work: a batch's is done off the async threads.
        let verify_all = {
            let this = self.clone();
            let params = *params;
            let data: Vec<Vec<u8>> = data.iter().map(|d| d.to_vec()).collect();
            move || -> Vec<Result<Vec<u8>, BackendError>> {
                let Some(entry) = this.inner.keys.get(index) else {
                    return Vec::new();
                };
                signatures
                    .into_iter()
                    .zip(data.iter())
                    .map(|(sig, data)| {
                        let (sig_version, raw) = sig.map_err(|e| failed(format!("{path}: {e}")))?;
                        if sig_version != version {
                            return Err(failed(format!("{path}: signed with version {sig_version}, not the pinned {version}")));
                        }
                        entry
                            .verify
                            .ssh_signature(&params, &raw, data)
                            .map_err(|e| failed(format!("{path}: {e}")))
                    })
                    .collect()
            }
        };
        let results = if data.len() == 1 {
            verify_all()
        } else {
            tokio::task::spawn_blocking(verify_all)
                .await
                .map_err(|e| failed(format!("verifying: {e}")))?
        };
        if results.len() != data.len() {
            return Err(failed("verifying: lost results"));
        }
        Ok(results)
    }

    /// A call with the session's token, logging in again once when the
    /// cluster answers "permission denied".
    async fn authed(
        &self,
        method: Method,
        path: &str,
        body: Option<bytes::Bytes>,
    ) -> Result<http::Reply, BackendError> {
        let inner = &self.inner;
        let deadline = self.deadline();
        let token = inner
            .session
            .ensure(&inner.cluster, deadline)
            .await
            .map_err(login_error)?;
        let reply = inner
            .cluster
            .call(
                method.clone(),
                path,
                Some(token.value()),
                body.clone(),
                deadline,
            )
            .await
            .map_err(call_error)?;
        if reply.status != 403 {
            return Ok(reply);
        }
        let token = inner
            .session
            .relogin_after(&inner.cluster, token.generation, deadline)
            .await
            .map_err(login_error)?;
        inner
            .cluster
            .call(method, path, Some(token.value()), body, deadline)
            .await
            .map_err(call_error)
    }

    /// The SSH engine's CA public key (`{ssh_mount}/config/ca`).
    pub async fn engine_ca(&self) -> Result<KeyData, BackendError> {
        let path = format!("{}/config/ca", self.inner.ssh);
        let reply = self.authed(Method::GET, &path, None).await?;
        if !reply.ok() {
            return Err(failed(format!("reading {path}: {}", reply.errors())));
        }
        let line = reply
            .body
            .as_ref()
            .ok()
            .and_then(|b| b.get("data"))
            .and_then(|d| d.get("public_key"))
            .and_then(Value::as_str)
            .ok_or_else(|| failed(format!("{path}: the answer has no public_key")))?;
        ssh_key::PublicKey::from_openssh(line.trim())
            .map(|k| k.key_data().clone())
            .map_err(|e| failed(format!("{path}: {e}")))
    }

    /// A user certificate from the SSH engine (`{ssh_mount}/sign/ROLE`).
    pub async fn issue_certificate(
        &self,
        request: &super::IssueRequest,
    ) -> Result<String, BackendError> {
        let path = format!("{}/sign/{}", self.inner.ssh, request.role);
        let public = ssh_key::PublicKey::from(request.key.clone())
            .to_openssh()
            .map_err(|e| failed(format!("encoding the public key: {e}")))?;
        let extensions: Map<String, Value> = request
            .extensions
            .iter()
            .map(|e| (e.clone(), Value::String(String::new())))
            .collect();
        let options: Map<String, Value> = request
            .critical_options
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        let body = json!({
            "public_key": public,
            "cert_type": "user",
            "valid_principals": request.principals.join(","),
            "key_id": request.key_id,
            "ttl": format!("{}s", request.ttl_secs),
            "extensions": extensions,
            "critical_options": options,
        });
        let reply = self
            .authed(Method::POST, &path, Some(http::json_body(&body)))
            .await?;
        if !reply.ok() {
            return Err(failed(format!(
                "the SSH engine refused a certificate (role {}): {}",
                request.role,
                reply.errors()
            )));
        }
        reply
            .body
            .as_ref()
            .ok()
            .and_then(|b| b.get("data"))
            .and_then(|d| d.get("signed_key"))
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| failed(format!("{path}: the answer has no signed_key")))
    }

    /// Whether the session holds a token now.
    pub fn logged_in(&self) -> bool {
        self.inner.session.token().is_some()
    }

    fn index_of(&self, key: &KeyData) -> Option<usize> {
        self.inner.keys.iter().position(|e| e.spec.public == *key)
    }
}

/// Opens the backend: reads the TLS files through the trust check, serves
/// `agent.socket` (for `keyholder arm/disarm`), and keeps the login alive
/// until shutdown, when a token the daemon obtained itself is revoked.
/// The backend for `config`'s `[openbao]` and keys (TLS files read through
/// the trust check), and whether a token it obtains is its own to revoke
/// at exit (AppRole, certificate; not a token given to it or an agent's).
pub(super) fn engine_client(
    config: &crate::config::Config,
) -> crate::error::Result<(OpenBao, bool)> {
    use crate::config::openbao::AuthKind;
    use crate::error::Error;
    let file = config.path.display();
    let o = config
        .openbao
        .as_deref()
        .ok_or_else(|| Error::msg(format!("{file}: no [openbao] section")))?;
    let text = |field: &str, path: &std::path::Path| {
        crate::trust::read_text(path)
            .map(String::into_bytes)
            .map_err(|e| Error::msg(format!("{file}: openbao.{field} {}: {e}", path.display())))
    };
    let tls = http::Tls {
        ca_pem: o
            .ca_file
            .as_deref()
            .map(|p| text("ca_file", p))
            .transpose()?,
        client_cert_pem: o
            .client_cert
            .as_deref()
            .map(|p| text("client_cert", p))
            .transpose()?,
        client_key_pem: o
            .client_key
            .as_deref()
            .map(|p| {
                crate::trust::read_secret(p).map_err(|e| {
                    Error::msg(format!("{file}: openbao.client_key {}: {e}", p.display()))
                })
            })
            .transpose()?,
    };
    let auth = match o.auth {
        AuthKind::AppRole => AuthMethod::AppRole {
            mount: o.auth_mount.clone(),
            role_id: o.role_id.clone().unwrap_or_default(),
        },
        AuthKind::Cert => AuthMethod::Cert {
            mount: o.auth_mount.clone(),
        },
        AuthKind::Token => AuthMethod::Token,
        AuthKind::Agent => AuthMethod::Agent {
            token_file: o.token_file.clone().unwrap_or_default(),
        },
    };
    let revoke_at_exit = matches!(o.auth, AuthKind::AppRole | AuthKind::Cert);
    let settings = Settings {
        addresses: o.addresses.clone(),
        tls,
        namespace: o.namespace.clone(),
        auth,
        transit_mount: o.transit_mount.clone(),
        ssh_mount: o.ssh_mount.clone(),
        keys: config
            .keys
            .iter()
            .map(|k| KeySpec {
                name: k.name.clone(),
                public: k.public_key.clone(),
                transit_key: k.transit_key.clone().unwrap_or_else(|| k.name.clone()),
            })
            .collect(),
        timeout: config.limits.upstream_timeout,
    };
    let backend =
        OpenBao::new(settings).map_err(|e| Error::msg(format!("{file}: openbao: {e}")))?;
    Ok((backend, revoke_at_exit))
}

pub(super) async fn open(
    config: &crate::config::Config,
    context: super::OpenContext,
) -> crate::error::Result<super::Opened> {
    use crate::error::Error;
    let file = config.path.display();
    let o = config.openbao.as_deref().ok_or_else(|| {
        Error::msg(format!(
            "{file}: agent.backend = \"openbao\" needs an [openbao] section"
        ))
    })?;
    let (backend, revoke_at_exit) = engine_client(config)?;
    let listener = super::admin::bind(&config.agent.socket)?;
    tracing::info!(
        "openbao backend: {} (auth {}), serving agent.socket {} (root only)",
        o.addresses.join(", "),
        o.auth.name(),
        config.agent.socket.display()
    );
    let mut shared: Arc<dyn Backend> = Arc::new(backend.clone());
    let mut tasks = Vec::new();
    if let Some(c) = config.certificates.as_deref() {
        if let Some(role) = &c.openbao_role {
            let (wrapped, checker) = ca::EngineCa::start(
                Arc::clone(&shared),
                backend.clone(),
                c.ca.public_key.clone(),
                role.clone(),
                context.shutdown.clone(),
            );
            shared = wrapped;
            tasks.push(checker);
        }
    }
    let server = tokio::spawn(super::admin::serve(
        listener,
        config.agent.socket.clone(),
        Arc::clone(&shared),
        context.shutdown.clone(),
    ));
    let upkeep = tokio::spawn(async move {
        backend.run(context.shutdown).await;
        if revoke_at_exit {
            backend.revoke_at_exit().await;
        }
    });
    tasks.push(server);
    tasks.push(upkeep);
    Ok(super::Opened {
        backend: shared,
        tasks,
    })
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The transit request body.
fn sign_body(params: &Params, version: u64, data: &[&[u8]]) -> Value {
    let mut body = Map::new();
    match data {
        [one] => {
            body.insert("input".into(), json!(keys::encode_b64(one)));
        }
        many => {
            let items: Vec<Value> = many
                .iter()
                .map(|d| json!({"input": keys::encode_b64(d)}))
                .collect();
            body.insert("batch_input".into(), Value::Array(items));
        }
    }
    body.insert("key_version".into(), json!(version));
    if let Some(h) = params.hash {
        body.insert("hash_algorithm".into(), json!(h));
    }
    if let Some(s) = params.signature_algorithm {
        body.insert("signature_algorithm".into(), json!(s));
    }
    if let Some(m) = params.marshaling {
        body.insert("marshaling_algorithm".into(), json!(m));
    }
    Value::Object(body)
}

type Parsed = Result<(u64, Vec<u8>), String>;

/// The signatures of a transit sign answer, one per input, in order.
fn parse_signatures(reply: &http::Reply, count: usize) -> Result<Vec<Parsed>, String> {
    let body = reply.body.as_ref().map_err(Clone::clone)?;
    if body.get("errors").is_some_and(|e| !e.is_null()) {
        return Err(format!("the answer carries errors: {}", reply.errors()));
    }
    let data = body.get("data").ok_or("the answer has no data")?;
    let one = |item: &Value| -> Parsed {
        if let Some(e) = item
            .get("error")
            .and_then(Value::as_str)
            .filter(|e| !e.is_empty())
        {
            return Err(format!("transit: {e}"));
        }
        let text = item
            .get("signature")
            .and_then(Value::as_str)
            .ok_or("no signature in the answer")?;
        keys::transit_signature(text)
    };
    if count == 1 && data.get("batch_results").is_none() {
        return Ok(vec![one(data)]);
    }
    let list = data
        .get("batch_results")
        .and_then(Value::as_array)
        .ok_or("the answer has no batch_results")?;
    if list.len() != count {
        return Err(format!("{} batch results for {count} inputs", list.len()));
    }
    Ok(list.iter().map(one).collect())
}

/// The version of a `transit/keys/NAME` answer whose public key equals
/// `public`, or why none does.
fn pinned_version(public: &KeyData, kind: keys::Kind, reply: &http::Reply) -> Result<u64, String> {
    let body = reply.body.as_ref().map_err(Clone::clone)?;
    let data = body.get("data").ok_or("the answer has no data")?;
    let key_type = data
        .get("type")
        .and_then(Value::as_str)
        .ok_or("the answer has no key type")?;
    if !kind.transit_types().contains(&key_type) {
        return Err(format!(
            "transit key type {key_type} does not hold a {} key",
            public.algorithm().as_str()
        ));
    }
    let versions = data
        .get("keys")
        .and_then(Value::as_object)
        .ok_or("the answer lists no versions")?;
    let mut best: Option<u64> = None;
    for (version, info) in versions {
        let Ok(v) = version.parse::<u64>() else {
            continue;
        };
        let Some(pem) = info.get("public_key").and_then(Value::as_str) else {
            continue;
        };
        if keys::transit_public(key_type, pem).is_ok_and(|k| k == *public) {
            best = Some(best.map_or(v, |b| b.max(v)));
        }
    }
    best.ok_or_else(|| {
        format!(
            "no version of the transit key ({} versions) equals {}",
            versions.len(),
            public.fingerprint(ssh_key::HashAlg::Sha256)
        )
    })
}

impl Backend for OpenBao {
    fn name(&self) -> &'static str {
        "openbao"
    }

    fn identities(&self) -> BackendFuture<'_, Vec<Identity>> {
        Box::pin(async move {
            if self.inner.session.token().is_none() {
                return Ok(Vec::new());
            }
            Ok(self
                .inner
                .keys
                .iter()
                .filter(|e| matches!(*lock(&e.state), KeyState::Pinned(_)))
                .map(|e| Identity {
                    credential: PublicCredential::Key(e.spec.public.clone()),
                    comment: e.spec.name.clone(),
                })
                .collect())
        })
    }

    fn sign(&self, request: SignRequest) -> BackendFuture<'_, Vec<u8>> {
        Box::pin(async move {
            let key = match &request.credential {
                PublicCredential::Key(key) => key,
                PublicCredential::Cert(cert) => cert.public_key(),
            };
            let Some(index) = self.index_of(key) else {
                return Err(BackendError::Refused);
            };
            self.sign_with(index, request.data, request.flags).await
        })
    }

    fn add(&self, _identity: AddIdentityConstrained, origin: String) -> BackendFuture<'_, ()> {
        tracing::warn!(
            "openbao: refused adding a key ({origin}): the keys live in transit \
             (create or import them there)"
        );
        Box::pin(async { Err(BackendError::Refused) })
    }

    fn issue(&self, request: super::IssueRequest) -> BackendFuture<'_, String> {
        Box::pin(async move { self.issue_certificate(&request).await })
    }

    fn unlock(&self, secret: Zeroizing<Vec<u8>>) -> BackendFuture<'_, ()> {
        Box::pin(async move {
            match self.arm(&secret).await {
                Ok(report) => {
                    for problem in report.problems() {
                        tracing::warn!("{problem}");
                    }
                    Ok(())
                }
                Err(e) => {
                    tracing::error!("openbao: arming failed: {e}");
                    Err(BackendError::Refused)
                }
            }
        })
    }

    fn remove(&self, _key: PublicCredential) -> BackendFuture<'_, ()> {
        Box::pin(async { Err(BackendError::Refused) })
    }

    fn remove_all(&self) -> BackendFuture<'_, ()> {
        Box::pin(async move { self.disarm().await.map_err(failed) })
    }

    fn status(&self) -> BackendFuture<'_, BackendStatus> {
        Box::pin(async move {
            let mut problems = Vec::new();
            let mut reachable = true;
            if self.inner.session.token().is_some() {
                for index in 0..self.inner.keys.len() {
                    if let Err(e) = self.resolve(index).await {
                        if cluster_down(&e) {
                            problems.push(match e {
                                BackendError::Timeout => {
                                    "openbao: no answer from the cluster within \
                                     upstream_timeout_secs"
                                        .to_string()
                                }
                                BackendError::Broken(text) => text,
                                other => other.to_string(),
                            });
                            reachable = false;
                            break;
                        }
                    }
                }
            }
            *lock(&self.inner.cluster_problem) = problems.first().cloned();
            let identities = if reachable {
                self.identities().await?
            } else {
                Vec::new()
            };
            Ok(BackendStatus { identities })
        })
    }

    fn metrics(&self) -> Vec<crate::protocol::status::Family> {
        use crate::protocol::status::{Family, Sample};
        let (logins, renewals, failovers, batches, batched) = self.counters();
        let family = |name: &str, help: &str, value: u64| Family {
            name: name.to_owned(),
            kind: "counter".to_owned(),
            help: help.to_owned(),
            samples: vec![Sample {
                labels: Vec::new(),
                value,
            }],
        };
        let outcomes = self.inner.cluster.outcomes();
        let requests = Family {
            name: "keyholder_openbao_requests_total".to_owned(),
            kind: "counter".to_owned(),
            help: "Calls to the cluster (each over as many addresses as it took), by outcome: \
                   ok, refused (a 4xx answer), sealed, unreachable, timeout."
                .to_owned(),
            samples: outcomes
                .into_iter()
                .map(|(outcome, value)| Sample {
                    labels: vec![("outcome".to_owned(), outcome.to_owned())],
                    value,
                })
                .collect(),
        };
        vec![
            requests,
            family(
                "keyholder_openbao_logins_total",
                "Logins at the OpenBao/Vault cluster that got a token.",
                logins,
            ),
            family(
                "keyholder_openbao_token_renewals_total",
                "Renewals of the daemon's token.",
                renewals,
            ),
            family(
                "keyholder_openbao_failovers_total",
                "Calls answered by another cluster address than the call before.",
                failovers,
            ),
            family(
                "keyholder_openbao_batch_requests_total",
                "Transit sign requests that carried more than one signature (batch_input).",
                batches,
            ),
            family(
                "keyholder_openbao_batched_signatures_total",
                "Signatures made in batch requests (divided by the batch requests: signatures \
                 per batch).",
                batched,
            ),
        ]
    }

    fn notes(&self) -> Vec<String> {
        let mut notes: Vec<String> = lock(&self.inner.cluster_problem).iter().cloned().collect();
        for p in self.report().problems() {
            if !notes.contains(&p) {
                notes.push(p);
            }
        }
        notes
    }

    fn set_timeout(&self, timeout: Duration) {
        self.inner
            .timeout_ms
            .store(millis(timeout), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    //! Bad answers from a cluster: a loopback HTTP server that answers
    //! every request with canned bodies. (The real server is in
    //! tests/openbao.rs; only a fake one can send broken answers.)

    use super::*;
    use openssl::pkey::PKey;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct Fake {
        addr: String,
        sign_answer: Arc<Mutex<(u16, String)>>,
    }

    async fn fake(public_b64: String) -> Fake {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = format!("http://{}", listener.local_addr().unwrap());
        let sign_answer = Arc::new(Mutex::new((200, String::new())));
        let answer = sign_answer.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let answer = answer.clone();
                let public_b64 = public_b64.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    // Read headers and the body (Content-Length).
                    loop {
                        let Ok(n) = stream.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        let text = String::from_utf8_lossy(&buf).to_string();
                        if let Some(end) = text.find("\r\n\r\n") {
                            let len = text
                                .lines()
                                .find_map(|l| {
                                    l.to_ascii_lowercase()
                                        .strip_prefix("content-length:")
                                        .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                                })
                                .unwrap_or(0);
                            if buf.len() >= end + 4 + len {
                                break;
                            }
                        }
                    }
                    let head = String::from_utf8_lossy(&buf).to_string();
                    let (status, body) = if head.contains("/v1/auth/token/lookup-self") {
                        (200, r#"{"data":{"ttl":0,"renewable":false}}"#.to_string())
                    } else if head.contains("/v1/transit/keys/") {
                        (
                            200,
                            format!(
                                r#"{{"data":{{"type":"ed25519","keys":{{"1":{{"public_key":"{public_b64}"}}}}}}}}"#
                            ),
                        )
                    } else {
                        lock(&answer).clone()
                    };
                    let reply = format!(
                        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(reply.as_bytes()).await;
                });
            }
        });
        Fake { addr, sign_answer }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bad_answers_are_clear_failures_never_relayed() {
        let key = PKey::generate_ed25519().unwrap();
        let raw = key.raw_public_key().unwrap();
        let public = keys::transit_public("ed25519", &keys::encode_b64(&raw)).unwrap();
        let fake = fake(keys::encode_b64(&raw)).await;
        let backend = OpenBao::new(Settings {
            addresses: vec![fake.addr.clone()],
            tls: http::Tls::default(),
            namespace: None,
            auth: AuthMethod::Token,
            transit_mount: "transit".into(),
            ssh_mount: "ssh".into(),
            keys: vec![KeySpec {
                name: "deploy".into(),
                public: public.clone(),
                transit_key: "deploy".into(),
            }],
            timeout: Duration::from_secs(10),
        })
        .unwrap();
        backend.arm(b"a-token").await.unwrap();
        assert_eq!(backend.report().keys[0].1, KeyState::Pinned(1));

        let good = {
            let mut s = openssl::sign::Signer::new_without_digest(&key).unwrap();
            s.sign_oneshot_to_vec(b"data").unwrap()
        };
        let b64 = keys::encode_b64;
        let cases: Vec<(u16, String, &str)> = vec![
            (
                200,
                r#"{"data":{"signature":"vault:v1:AAA"#.into(),
                "not JSON",
            ),
            (200, r#"{"data":{"signature":12}}"#.into(), "no signature"),
            (200, r#"{"data":[]}"#.into(), "no signature"),
            (200, r#"[1,2]"#.into(), "no data"),
            (
                200,
                format!(
                    r#"{{"data":{{"signature":"vault:v1:{}"}}}}"#,
                    b64(&good[..63])
                ),
                "of 63 bytes",
            ),
            (
                200,
                format!(
                    r#"{{"data":{{"signature":"vault:v1:{}"}}}}"#,
                    b64(&[7u8; 64])
                ),
                "does not verify",
            ),
            (
                200,
                format!(r#"{{"data":{{"signature":"vault:v2:{}"}}}}"#, b64(&good)),
                "not the pinned 1",
            ),
            (200, r#"{"errors":["boom"]}"#.into(), "carries errors"),
            (200, r#"{"data":{"signature":"bao:x"}}"#.into(), "vault:vN"),
            (200, String::new(), "no data"),
            (400, r#"{"errors":["bad input"]}"#.into(), "bad input"),
        ];
        for (status, body, expect) in cases {
            *lock(&fake.sign_answer) = (status, body.clone());
            let result = backend
                .sign(SignRequest {
                    credential: PublicCredential::Key(public.clone()),
                    data: b"data".to_vec(),
                    flags: 0,
                })
                .await;
            match result {
                Err(BackendError::Broken(text)) => {
                    assert!(text.contains(expect), "{body}: {text}")
                }
                other => panic!("{body}: {other:?}"),
            }
        }
        // The good one is relayed.
        *lock(&fake.sign_answer) = (
            200,
            format!(r#"{{"data":{{"signature":"vault:v1:{}"}}}}"#, b64(&good)),
        );
        let blob = backend
            .sign(SignRequest {
                credential: PublicCredential::Key(public.clone()),
                data: b"data".to_vec(),
                flags: 0,
            })
            .await
            .unwrap();
        assert!(blob.ends_with(&good));
        // A batch answer with the wrong count fails every signature in it.
        let body = serde_json::json!({"data": {"batch_results": [{"signature": "x"}]}});
        let reply = http::Reply {
            status: 200,
            body: Ok(body),
        };
        assert!(parse_signatures(&reply, 2)
            .unwrap_err()
            .contains("1 batch results for 2"));
    }
}
