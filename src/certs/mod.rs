//! Short-lived user certificates, one per (caller, key): minted, cached,
//! remembered.
//!
//! When a key has `certificate = "also" | "only"`, each caller who lists it
//! gets a certificate for that key minted for them: key ID from the
//! template (so the target's sshd log names the human), principals and
//! options from the key, a serial unique per CA across restarts. Minting is
//! one CA signature through the [`Backend`] (which holds the CA like any
//! other key); for an RSA CA it asks for `rsa-sha2-512`.
//!
//! The [`Authority`] caches the current certificate per (uid, key), reused
//! while more than half of its validity remains and the settings that went
//! into it are unchanged, never handed out expired; and it remembers, for
//! every certificate it minted that is still valid, whom it was minted for:
//! that is how the policy knows a certificate in user-auth data is the
//! caller's own ([`Minted`]), and under which terms it was minted (the
//! policy refuses one whose terms a reload changed). Both are bounded.
//!
//! This module never decides who may use a key (that is
//! [`crate::policy`]), never signs anything but a certificate with the CA,
//! and never alters a user name or host name to fit the key ID: one that
//! would break its format is refused.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use ssh_agent_lib::proto::{PublicCredential, SignRequest};
use ssh_encoding::Decode;
use ssh_key::certificate::{Builder, CertType};
use ssh_key::public::KeyData;
use ssh_key::{Algorithm, Certificate, HashAlg, Signature};

use crate::backend::{Backend, BackendError};
use crate::config::{CertMode, Config, KeyCertConfig};
use crate::policy::certificates::{self, Issued, Minted};

/// SSH_AGENT_RSA_SHA2_512: an RSA CA signs with SHA-512.
pub const RSA_SHA2_512: u32 = 4;
/// (uid, key) pairs whose current certificate is cached.
pub const MAX_CURRENT: usize = 16 * 1024;
/// Certificates remembered (with their owner) until they expire.
pub const MAX_REMEMBERED: usize = 64 * 1024;
/// Bits of a serial below the millisecond timestamp.
const SERIAL_COUNTER_BITS: u32 = 22;

/// What certificates are minted with: the `[certificates]` section and each
/// key's certificate fields, plus this host's name. Replaced whole on reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The CA's public key.
    pub ca: KeyData,
    /// Seconds after issue.
    pub validity_secs: u64,
    /// Seconds before issue.
    pub backdate_secs: u64,
    /// The key ID template.
    pub key_id: String,
    /// `{host}`: this host's name (`gethostname`), if it could be had.
    pub host: Result<String, String>,
    /// Keys with certificates on, by name.
    pub keys: BTreeMap<String, KeySettings>,
    /// `ca = "openbao:ROLE"`: the cluster's SSH engine signs, with this
    /// role (`ca` is then the engine's pinned CA key).
    pub openbao_role: Option<String>,
}

/// One key's certificate settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySettings {
    /// The key certified.
    pub key: KeyData,
    /// Its certificate fields.
    pub cert: KeyCertConfig,
    /// What its certificates say ([`certificates::terms`]), remembered with
    /// each one minted.
    pub terms: u64,
}

impl Settings {
    /// The settings of `config`, when it has `[certificates]`.
    pub fn from_config(config: &Config) -> Option<Self> {
        let c = config.certificates.as_ref()?;
        Some(Self {
            ca: c.ca.public_key.clone(),
            validity_secs: c.validity_secs,
            backdate_secs: c.backdate_secs,
            key_id: c.key_id.clone(),
            host: hostname(),
            keys: config
                .keys
                .iter()
                .filter(|k| k.cert.mode != CertMode::Off)
                .map(|k| {
                    (
                        k.name.clone(),
                        KeySettings {
                            key: k.public_key.clone(),
                            cert: k.cert.clone(),
                            terms: certificates::terms(Some(c), &k.cert),
                        },
                    )
                })
                .collect(),
            openbao_role: c.openbao_role.clone(),
        })
    }
}

/// This host's name, for `{host}`.
fn hostname() -> Result<String, String> {
    let name = nix::unistd::gethostname().map_err(|e| format!("cannot get the host name: {e}"))?;
    name.into_string()
        .map_err(|_| "the host name is not UTF-8".to_owned())
}

/// Why no certificate could be had.
#[derive(Debug)]
pub enum MintError {
    /// The key has no certificate settings (or there is no CA).
    NotConfigured,
    /// The user name or host name would break the key ID's format.
    BadName(String),
    /// The backend did not sign (the CA is not armed, or it failed).
    Backend(BackendError),
    /// The certificate could not be built or its signature did not verify.
    Build(String),
}

impl std::fmt::Display for MintError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotConfigured => f.write_str("no certificate settings for this key"),
            Self::BadName(why) => f.write_str(why),
            Self::Backend(e) => write!(f, "the CA did not sign: {e}"),
            Self::Build(e) => write!(f, "cannot build the certificate: {e}"),
        }
    }
}

/// A certificate handed out, and whether it was minted just now (then the
/// caller writes its audit line).
#[derive(Debug, Clone)]
pub struct Handed {
    /// The certificate.
    pub cert: Arc<Certificate>,
    /// Minted for this request (not from the cache).
    pub fresh: bool,
}

/// Everything that went into a certificate besides its serial and times:
/// when any of it changes, the cached one is not reused.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Profile {
    settings_ca: KeyData,
    openbao_role: Option<String>,
    validity_secs: u64,
    backdate_secs: u64,
    key_id: String,
    host: Result<String, String>,
    key: KeySettings,
    user: Option<String>,
}

impl Profile {
    fn new(settings: &Settings, key: &KeySettings, user: Option<&str>) -> Self {
        Self {
            settings_ca: settings.ca.clone(),
            openbao_role: settings.openbao_role.clone(),
            validity_secs: settings.validity_secs,
            backdate_secs: settings.backdate_secs,
            key_id: settings.key_id.clone(),
            host: settings.host.clone(),
            key: key.clone(),
            user: user.map(str::to_owned),
        }
    }

    /// Whether this is the profile of `settings`, `key`, `user` (compared
    /// in place: the cache hit allocates nothing).
    fn matches(&self, settings: &Settings, key: &KeySettings, user: Option<&str>) -> bool {
        self.settings_ca == settings.ca
            && self.openbao_role == settings.openbao_role
            && self.validity_secs == settings.validity_secs
            && self.backdate_secs == settings.backdate_secs
            && self.key_id == settings.key_id
            && self.host == settings.host
            && &self.key == key
            && self.user.as_deref() == user
    }
}

#[derive(Debug)]
struct Current {
    profile: Profile,
    cert: Arc<Certificate>,
}

/// One (uid, key): the current certificate, read without waiting, and a
/// lock taken only to mint, so that concurrent listings by the same caller
/// mint once.
#[derive(Debug, Default)]
struct Slot {
    current: Mutex<Option<Arc<Current>>>,
    minting: tokio::sync::Mutex<()>,
}

impl Slot {
    /// The current certificate when it may be handed out at `now`, valid
    /// no later than `cap` (a grant's end). One that already ends at the
    /// cap is reused to its end: a new one could not last longer.
    fn reusable(
        &self,
        settings: &Settings,
        key: &KeySettings,
        user: Option<&str>,
        now: u64,
        cap: Option<u64>,
    ) -> Option<Arc<Certificate>> {
        let current = lock(&self.current);
        let c = current.as_ref()?;
        let before = c.cert.valid_before();
        let remaining = before.saturating_sub(now);
        let within_cap = cap.is_none_or(|cap| before <= cap);
        let at_cap = cap.is_some_and(|cap| before == cap);
        (c.profile.matches(settings, key, user)
            && within_cap
            && remaining > 0
            && (at_cap || remaining.saturating_mul(2) > settings.validity_secs))
            .then(|| Arc::clone(&c.cert))
    }

    fn expired(&self, now: u64) -> bool {
        lock(&self.current)
            .as_ref()
            .is_none_or(|c| c.cert.valid_before() <= now)
    }
}

#[derive(Debug)]
struct Remembered {
    uid: u32,
    /// The terms it was minted under.
    terms: u64,
    /// Its wire encoding (the comment, which is not part of it, aside).
    blob: Vec<u8>,
    valid_before: u64,
}

fn encoded(cert: &Certificate) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    ssh_encoding::Encode::encode(cert, &mut out).ok()?;
    Some(out)
}

/// Serials: `max(last + 1, unix_ms << 22)`. Unique per CA across restarts
/// without any state on disk, as long as the clock does not step back
/// across a restart by more than the time the restart took, and fewer than
/// 4 million certificates are minted per millisecond. Ordered by issue time.
#[derive(Debug, Default)]
pub struct Serials {
    last: Mutex<u64>,
}

impl Serials {
    /// The next serial, given now in milliseconds since the epoch.
    pub fn next_at(&self, now_ms: u64) -> u64 {
        let mut last = lock(&self.last);
        let floor = now_ms.checked_shl(SERIAL_COUNTER_BITS).unwrap_or(u64::MAX);
        let next = last.saturating_add(1).max(floor);
        *last = next;
        next
    }

    /// The next serial.
    pub fn next(&self) -> u64 {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        self.next_at(now_ms)
    }
}

/// The certificate cache, the memory of issued certificates, the serials.
#[derive(Debug, Default)]
pub struct Authority {
    serials: Serials,
    current: Mutex<HashMap<u32, HashMap<String, Arc<Slot>>>>,
    remembered: Mutex<BTreeMap<u64, Remembered>>,
    ca_armed: Mutex<Option<bool>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Now, in Unix seconds.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Authority {
    /// An empty authority.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records whether the CA is armed now; returns the new state when it
    /// changed (the daemon logs that once per change).
    pub fn note_ca_armed(&self, armed: bool) -> Option<bool> {
        let mut state = lock(&self.ca_armed);
        if *state == Some(armed) {
            None
        } else {
            *state = Some(armed);
            Some(armed)
        }
    }

    /// The caller's current certificate for key `name`: the cached one when
    /// more than half its validity remains and nothing that went into it
    /// changed, else a new one minted through `backend`. `cap`: the end of
    /// the grant the key is used under; the certificate is valid no later.
    pub async fn certificate(
        &self,
        backend: &dyn Backend,
        settings: &Settings,
        name: &str,
        uid: u32,
        user: Option<&str>,
        cap: Option<u64>,
    ) -> Result<Handed, MintError> {
        let key = settings.keys.get(name).ok_or(MintError::NotConfigured)?;
        let slot = self.slot(uid, name);
        if let Some(cert) = slot.reusable(settings, key, user, unix_now(), cap) {
            return Ok(Handed { cert, fresh: false });
        }
        let _minting = slot.minting.lock().await;
        // Someone else may have minted while this waited.
        let now = unix_now();
        if let Some(cert) = slot.reusable(settings, key, user, now, cap) {
            return Ok(Handed { cert, fresh: false });
        }
        let cert = Arc::new(
            mint(
                backend,
                settings,
                name,
                &key.key,
                &key.cert,
                uid,
                user,
                self.serials.next(),
                (now, cap),
            )
            .await?,
        );
        self.remember(uid, key.terms, &cert, now);
        *lock(&slot.current) = Some(Arc::new(Current {
            profile: Profile::new(settings, key, user),
            cert: Arc::clone(&cert),
        }));
        Ok(Handed { cert, fresh: true })
    }

    /// The slot of (uid, key), created when missing; the map stays bounded
    /// (idle slots whose certificate expired go first, then any idle one).
    fn slot(&self, uid: u32, name: &str) -> Arc<Slot> {
        let mut map = lock(&self.current);
        if let Some(slot) = map.get(&uid).and_then(|m| m.get(name)) {
            return Arc::clone(slot);
        }
        let count = |map: &HashMap<u32, HashMap<String, Arc<Slot>>>| {
            map.values().map(HashMap::len).sum::<usize>()
        };
        if count(&map) >= MAX_CURRENT {
            let now = unix_now();
            for slots in map.values_mut() {
                slots.retain(|_, slot| Arc::strong_count(slot) > 1 || !slot.expired(now));
            }
            map.retain(|_, slots| !slots.is_empty());
            let mut excess = (count(&map) + 1).saturating_sub(MAX_CURRENT);
            for slots in map.values_mut() {
                if excess == 0 {
                    break;
                }
                slots.retain(|_, slot| {
                    if excess > 0 && Arc::strong_count(slot) == 1 {
                        excess -= 1;
                        false
                    } else {
                        true
                    }
                });
            }
            map.retain(|_, slots| !slots.is_empty());
        }
        Arc::clone(
            map.entry(uid)
                .or_default()
                .entry(name.to_owned())
                .or_default(),
        )
    }

    /// Remembers who `cert` was minted for, until it expires (bounded:
    /// expired ones go first, then the oldest).
    fn remember(&self, uid: u32, terms: u64, cert: &Certificate, now: u64) {
        let Some(blob) = encoded(cert) else {
            return;
        };
        let mut map = lock(&self.remembered);
        if map.len() >= MAX_REMEMBERED {
            map.retain(|_, r| r.valid_before > now);
            while map.len() >= MAX_REMEMBERED {
                if map.pop_first().is_none() {
                    break;
                }
            }
        }
        map.insert(
            cert.serial(),
            Remembered {
                uid,
                terms,
                blob,
                valid_before: cert.valid_before(),
            },
        );
    }
}

impl Minted for Authority {
    fn issued(&self, cert: &Certificate) -> Option<Issued> {
        let blob = encoded(cert)?;
        let map = lock(&self.remembered);
        let r = map.get(&cert.serial())?;
        (r.blob == blob).then_some(Issued {
            uid: r.uid,
            terms: r.terms,
            serial: cert.serial(),
        })
    }
}

/// A user name or host name that can go into a key ID unchanged: ASCII
/// letters, digits, `.`, `_`, `-`, not starting with `-`, at most 64
/// characters (POSIX portable user names; host names are a subset). Anything
/// else (spaces, quotes, `@`, `:`, control characters) could make one key ID
/// read like another's, or forge a log field.
pub fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The key ID from `template` (validated by the configuration).
pub fn key_id(
    template: &str,
    user: Option<&str>,
    uid: u32,
    host: &Result<String, String>,
    key: &str,
    serial: u64,
) -> Result<String, MintError> {
    let mut out = String::with_capacity(template.len() + 32);
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(rest.get(..open).unwrap_or(""));
        let after = rest.get(open + 1..).unwrap_or("");
        let close = after.find('}').unwrap_or(after.len());
        let name = after.get(..close).unwrap_or("");
        match name {
            "user" => match user {
                Some(u) if plain_name(u) => out.push_str(u),
                Some(u) => {
                    return Err(MintError::BadName(format!(
                    "user name {u:?} cannot go into a key ID (letters, digits, '.', '_', '-' only)"
                )))
                }
                None => {
                    return Err(MintError::BadName(format!(
                        "uid {uid} has no user name for the key ID"
                    )))
                }
            },
            "uid" => out.push_str(&uid.to_string()),
            "host" => match host {
                Ok(h) if plain_name(h) => out.push_str(h),
                Ok(h) => {
                    return Err(MintError::BadName(format!(
                        "host name {h:?} cannot go into a key ID"
                    )))
                }
                Err(e) => return Err(MintError::BadName(e.clone())),
            },
            "key" => out.push_str(key),
            "serial" => out.push_str(&serial.to_string()),
            other => {
                return Err(MintError::Build(format!(
                    "unknown placeholder {{{other}}} in the key ID template"
                )))
            }
        }
        rest = after.get(close + 1..).unwrap_or("");
    }
    out.push_str(rest);
    Ok(out)
}

/// Mints one certificate: the to-be-signed bytes are captured in a first
/// pass of ssh-key's builder, signed by the backend with the CA, and the
/// backend's signature replayed in a second pass; the result is verified.
/// `(now, cap)`: issued at `now`, valid until `now + validity_secs` but no
/// later than `cap` (the end of the grant it is minted under).
#[allow(clippy::too_many_arguments)]
pub async fn mint(
    backend: &dyn Backend,
    settings: &Settings,
    name: &str,
    key: &KeyData,
    cert: &KeyCertConfig,
    uid: u32,
    user: Option<&str>,
    serial: u64,
    (now, cap): (u64, Option<u64>),
) -> Result<Certificate, MintError> {
    let key_id = key_id(&settings.key_id, user, uid, &settings.host, name, serial)?;
    if let Some(role) = &settings.openbao_role {
        return issued_elsewhere(backend, settings, role, key, cert, key_id).await;
    }
    let mut nonce = [0u8; 32];
    getrandom::getrandom(&mut nonce)
        .map_err(|e| MintError::Build(format!("no random nonce: {e}")))?;
    let valid_after = now.saturating_sub(settings.backdate_secs);
    let valid_before = now
        .saturating_add(settings.validity_secs)
        .min(cap.unwrap_or(u64::MAX));
    let build = || -> Result<Builder, MintError> {
        let bad = |e: ssh_key::Error| MintError::Build(e.to_string());
        let mut b =
            Builder::new(nonce.to_vec(), key.clone(), valid_after, valid_before).map_err(bad)?;
        b.serial(serial).map_err(bad)?;
        b.cert_type(CertType::User).map_err(bad)?;
        b.key_id(key_id.clone()).map_err(bad)?;
        for p in &cert.principals {
            b.valid_principal(p.clone()).map_err(bad)?;
        }
        if let Some(command) = &cert.force_command {
            b.critical_option("force-command", command.clone())
                .map_err(bad)?;
        }
        if !cert.source_address.is_empty() {
            b.critical_option("source-address", cert.source_address.join(","))
                .map_err(bad)?;
        }
        for e in &cert.extensions {
            b.extension(e.clone(), String::new()).map_err(bad)?;
        }
        b.comment(key_id.clone()).map_err(bad)?;
        Ok(b)
    };

    // Pass 1: the bytes to sign. The capturing signer fails on purpose.
    let capture = CaSigner::new(&settings.ca, None);
    let _ = build()?.sign(&capture);
    let tbs = capture
        .take_message()
        .ok_or_else(|| MintError::Build("the builder asked for no signature".to_owned()))?;

    let flags = if matches!(settings.ca, KeyData::Rsa(_)) {
        RSA_SHA2_512
    } else {
        0
    };
    let blob = backend
        .sign(SignRequest {
            credential: PublicCredential::Key(settings.ca.clone()),
            data: tbs,
            flags,
        })
        .await
        .map_err(MintError::Backend)?;
    let signature = decode_signature(&blob)?;
    if matches!(settings.ca, KeyData::Rsa(_))
        && signature.algorithm()
            != (Algorithm::Rsa {
                hash: Some(HashAlg::Sha512),
            })
    {
        return Err(MintError::Build(format!(
            "the RSA CA signed with {} instead of rsa-sha2-512",
            signature.algorithm()
        )));
    }

    // Pass 2: the same certificate with the backend's signature.
    let replay = CaSigner::new(&settings.ca, Some(signature));
    let cert = build()?
        .sign(&replay)
        .map_err(|e| MintError::Build(e.to_string()))?;
    cert.verify_signature()
        .map_err(|e| MintError::Build(format!("the CA's signature does not verify: {e}")))?;
    Ok(cert)
}

/// A certificate from the cluster's SSH engine (`ca = "openbao:ROLE"`),
/// checked against what was asked: the pinned CA, the key, user type, key
/// ID, principals, and its signature.
async fn issued_elsewhere(
    backend: &dyn Backend,
    settings: &Settings,
    role: &str,
    key: &KeyData,
    cert: &KeyCertConfig,
    key_id: String,
) -> Result<Certificate, MintError> {
    let mut critical_options = Vec::new();
    if let Some(command) = &cert.force_command {
        critical_options.push(("force-command".to_owned(), command.clone()));
    }
    if !cert.source_address.is_empty() {
        critical_options.push(("source-address".to_owned(), cert.source_address.join(",")));
    }
    let line = backend
        .issue(crate::backend::IssueRequest {
            role: role.to_owned(),
            key: key.clone(),
            principals: cert.principals.clone(),
            extensions: cert.extensions.clone(),
            critical_options,
            ttl_secs: settings.validity_secs,
            key_id: key_id.clone(),
        })
        .await
        .map_err(MintError::Backend)?;
    let issued = Certificate::from_openssh(line.trim())
        .map_err(|e| MintError::Build(format!("the engine's certificate cannot be read: {e}")))?;
    let wrong = |what: &str| {
        Err(MintError::Build(format!(
            "the engine's certificate (role {role}) has {what}"
        )))
    };
    if issued.signature_key() != &settings.ca {
        return wrong("another CA than the pinned openbao-ca.pub");
    }
    if issued.public_key() != key {
        return wrong("another public key");
    }
    if !issued.cert_type().is_user() {
        return wrong("not the user type");
    }
    if issued.key_id() != key_id {
        return wrong("another key ID (the role must set allow_user_key_ids = true)");
    }
    let mut asked = cert.principals.clone();
    asked.sort();
    let mut got = issued.valid_principals().to_vec();
    got.sort();
    if asked != got {
        return wrong("other principals");
    }
    issued
        .verify_signature()
        .map_err(|e| MintError::Build(format!("the engine's signature does not verify: {e}")))?;
    Ok(issued)
}

fn decode_signature(blob: &[u8]) -> Result<Signature, MintError> {
    let mut r = blob;
    let sig = Signature::decode(&mut r)
        .map_err(|e| MintError::Build(format!("the CA's signature cannot be decoded: {e}")))?;
    if !r.is_empty() {
        return Err(MintError::Build(
            "trailing bytes after the CA's signature".to_owned(),
        ));
    }
    Ok(sig)
}

/// The CA as ssh-key's builder sees it: records the message it is asked to
/// sign and answers with the given signature (or fails, when there is none
/// yet).
struct CaSigner {
    public: KeyData,
    signature: Option<Signature>,
    message: Mutex<Option<Vec<u8>>>,
}

impl CaSigner {
    fn new(public: &KeyData, signature: Option<Signature>) -> Self {
        Self {
            public: public.clone(),
            signature,
            message: Mutex::new(None),
        }
    }

    fn take_message(&self) -> Option<Vec<u8>> {
        lock(&self.message).take()
    }
}

impl signature::Signer<Signature> for CaSigner {
    fn try_sign(&self, message: &[u8]) -> Result<Signature, signature::Error> {
        *lock(&self.message) = Some(message.to_vec());
        self.signature.clone().ok_or_else(signature::Error::new)
    }
}

impl From<&CaSigner> for KeyData {
    fn from(signer: &CaSigner) -> Self {
        signer.public.clone()
    }
}

#[cfg(test)]
mod tests;
