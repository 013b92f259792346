//! The configuration file (`/etc/keyholder/keyholder.toml`): parsing, defaults
//! and validation.
//!
//! Loading resolves every key's public key (inline `public_key`, or
//! `key_dir/NAME.pub`), so a loaded [`Config`] is complete: nothing later has to
//! touch the file system to know which key is which. Every error names the
//! file, and where it applies the key and the field.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use ssh_key::public::KeyData;
use ssh_key::{HashAlg, PublicKey};

pub mod openbao;

use crate::error::{Error, Result};
use crate::known_hosts::KnownHosts;
use crate::trust::TrustError;
pub use openbao::OpenBaoConfig;

pub mod grants;
pub use grants::GrantsConfig;
pub mod pkcs11;

/// Where the configuration is read from when neither `--config` nor
/// `$KEYHOLDER_CONFIG` says otherwise.
pub const DEFAULT_CONFIG: &str = "/etc/keyholder/keyholder.toml";
/// Default proxy socket (world-connectable).
pub const DEFAULT_SOCKET: &str = "/run/keyholder/proxy.sock";
/// Default upstream agent socket (root only).
pub const DEFAULT_AGENT_SOCKET: &str = "/run/keyholder/agent.sock";
/// Default directory of key files.
pub const DEFAULT_KEY_DIR: &str = "/etc/keyholder.d";
/// Default upstream agent program.
pub const DEFAULT_AGENT_PROGRAM: &str = "/usr/bin/ssh-agent";

/// Where log lines go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogTarget {
    /// The system log, facility authpriv.
    Syslog,
    /// Standard error (the journal, under systemd).
    Stderr,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    socket: Option<PathBuf>,
    key_dir: Option<PathBuf>,
    log: Option<LogTarget>,
    require_encrypted: Option<bool>,
    state_dir: Option<PathBuf>,
    #[serde(default)]
    agent: RawAgent,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    keys: BTreeMap<String, RawKey>,
    certificates: Option<RawCertificates>,
    openbao: Option<openbao::RawOpenBao>,
    pkcs11: Option<pkcs11::RawPkcs11>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCertificates {
    ca: String,
    validity_secs: Option<u64>,
    backdate_secs: Option<u64>,
    key_id: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    backend: Option<BackendKind>,
    socket: Option<PathBuf>,
    spawn: Option<bool>,
    program: Option<PathBuf>,
}

/// Which backend holds the keys (`[agent] backend`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// An ssh-agent (spawned or external) holds the keys.
    #[default]
    Upstream,
    /// keyholder holds the keys itself and serves `agent.socket`.
    Builtin,
    /// The keys are transit keys of an OpenBao / Vault cluster (`[openbao]`).
    #[serde(rename = "openbao")]
    OpenBao,
    /// The keys stay on a PKCS#11 token (`[pkcs11]`).
    Pkcs11,
}

impl BackendKind {
    /// The name used in the configuration file.
    pub fn name(self) -> &'static str {
        match self {
            Self::Upstream => "upstream",
            Self::Builtin => "builtin",
            Self::OpenBao => "openbao",
            Self::Pkcs11 => "pkcs11",
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_connections: Option<u32>,
    max_connections_per_user: Option<u32>,
    idle_timeout_secs: Option<u64>,
    upstream_timeout_secs: Option<u64>,
    lookup_cache_secs: Option<u64>,
    lookup_timeout_secs: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    public_key: Option<String>,
    groups: Vec<String>,
    #[serde(default)]
    allow_any_data: bool,
    certificate: Option<CertMode>,
    principals: Option<Vec<String>>,
    cert_extensions: Option<Vec<String>>,
    force_command: Option<String>,
    source_address: Option<Vec<String>>,
    destinations: Option<PathBuf>,
    remote_users: Option<Vec<String>>,
    #[serde(default)]
    allow_forwarding: bool,
    transit_key: Option<String>,
    grants: Option<grants::RawGrants>,
    pkcs11_label: Option<String>,
    pkcs11_id: Option<String>,
}

/// Whether a key is listed with a certificate minted for each caller
/// (`certificate = "off" | "also" | "only"`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CertMode {
    /// No certificates: the plain key only.
    #[default]
    Off,
    /// The caller's certificate, then the plain key; both sign.
    Also,
    /// The caller's certificate, then the plain key; user-auth data
    /// carrying the plain key is refused.
    Only,
}

impl CertMode {
    /// The configuration's spelling.
    pub fn name(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Also => "also",
            Self::Only => "only",
        }
    }
}

/// What goes into a key's certificates (`[keys.NAME]` certificate fields).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyCertConfig {
    /// `certificate`.
    pub mode: CertMode,
    /// Remote users the certificate is valid for (non-empty unless off).
    pub principals: Vec<String>,
    /// Certificate extensions (default `["permit-pty"]`), sorted, unique.
    pub extensions: Vec<String>,
    /// Critical option `force-command`.
    pub force_command: Option<String>,
    /// Critical option `source-address`, as listed.
    pub source_address: Vec<String>,
}

/// The `[certificates]` section: the CA and what every certificate gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificatesConfig {
    /// The CA key, `key_dir/NAME` (+ `.pub`). Its `groups` are empty: it is
    /// never a key callers may use.
    pub ca: KeyConfig,
    /// `valid_before = issue time + validity_secs` (10..=86400).
    pub validity_secs: u64,
    /// `valid_after = issue time - backdate_secs` (0..=3600).
    pub backdate_secs: u64,
    /// The key ID template (`{user}`, `{uid}`, `{host}`, `{key}`, `{serial}`).
    pub key_id: String,
    /// `ca = "openbao:ROLE"`: the role of the cluster's SSH engine that
    /// signs (the CA's public key is pinned in `key_dir/openbao-ca.pub`).
    pub openbao_role: Option<String>,
}

/// Default `[certificates] validity_secs`.
pub const DEFAULT_CERT_VALIDITY_SECS: u64 = 300;
/// Default `[certificates] backdate_secs`.
pub const DEFAULT_CERT_BACKDATE_SECS: u64 = 60;
/// Default `[certificates] key_id`.
pub const DEFAULT_KEY_ID: &str = "keyholder:{user}@{host}:{key}";
/// Placeholders a key ID template may use.
pub const KEY_ID_PLACEHOLDERS: [&str; 5] = ["user", "uid", "host", "key", "serial"];

/// The upstream agent settings (`[agent]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    /// Which backend holds the keys.
    pub backend: BackendKind,
    /// The upstream agent's socket (with `backend = "builtin"`: the admin
    /// socket the daemon serves itself).
    pub socket: PathBuf,
    /// Whether the daemon starts and supervises the agent itself.
    pub spawn: bool,
    /// The agent program started when `spawn` is true.
    pub program: PathBuf,
}

/// Resource limits (`[limits]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once, all users together.
    pub max_connections: u32,
    /// Connections open at once by one uid.
    pub max_connections_per_user: u32,
    /// A connection with no complete request for this long is closed.
    pub idle_timeout: Duration,
    /// An upstream answer that takes longer than this yields FAILURE.
    pub upstream_timeout: Duration,
    /// A caller's user name and groups are reused for at most this long
    /// (zero: looked up for every request).
    pub lookup_cache: Duration,
    /// A user-database lookup that takes longer leaves the request without
    /// groups (`user-lookup-timeout`).
    pub lookup_timeout: Duration,
}

/// The largest `lookup_cache_secs` and `lookup_timeout_secs` accepted: an
/// hour is already far beyond any useful value.
pub const MAX_LOOKUP_SECS: u64 = 3600;

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            max_connections_per_user: 512,
            idle_timeout: Duration::from_secs(300),
            upstream_timeout: Duration::from_secs(30),
            lookup_cache: Duration::from_secs(5),
            lookup_timeout: Duration::from_secs(5),
        }
    }
}

/// Where a key's public half came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublicKeySource {
    /// `public_key = "…"` in the configuration file.
    Inline,
    /// `key_dir/NAME.pub`.
    File(PathBuf),
}

/// One configured key (`[keys.NAME]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyConfig {
    /// The key's name: the TOML table name and the file name in `key_dir`.
    pub name: String,
    /// The public key the upstream agent's identity must match.
    pub public_key: KeyData,
    /// `SHA256:…` fingerprint of the public key.
    pub fingerprint: String,
    /// Where the public key was read from.
    pub source: PublicKeySource,
    /// The encrypted private key file, `key_dir/NAME` (used by `arm`).
    pub private_key_path: PathBuf,
    /// Unix groups whose members may use the key.
    pub groups: Vec<String>,
    /// Sign any data, not only SSH user-authentication requests.
    pub allow_any_data: bool,
    /// Certificates for this key.
    pub cert: KeyCertConfig,
    /// The host keys and CAs the key may be used towards (`destinations`).
    pub destinations: Option<Destinations>,
    /// The remote user names the user-auth request may name.
    pub remote_users: Option<Vec<String>>,
    /// May be used through a forwarded agent.
    pub allow_forwarding: bool,
    /// The transit key holding it (`backend = "openbao"`; default: the name).
    pub transit_key: Option<String>,
    /// Members need a grant (`[keys.NAME.grants]`).
    pub grants: Option<GrantsConfig>,
}

/// A key's `destinations` file, read and parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destinations {
    /// Where it was read from.
    pub path: PathBuf,
    /// Its keys; `None` when a user other than root may not read it (the
    /// commands for everyone still load the configuration; the daemon runs
    /// as root and always reads it).
    pub hosts: Option<Arc<KnownHosts>>,
}

/// A loaded, validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The file it was read from.
    pub path: PathBuf,
    /// The proxy socket.
    pub socket: PathBuf,
    /// The directory of key files.
    pub key_dir: PathBuf,
    /// Where logs go.
    pub log: LogTarget,
    /// `arm` refuses private keys without a passphrase.
    pub require_encrypted: bool,
    /// Upstream agent settings.
    pub agent: AgentConfig,
    /// Resource limits.
    pub limits: Limits,
    /// Configured keys, sorted by name.
    pub keys: Vec<KeyConfig>,
    /// `[certificates]`, when present.
    pub certificates: Option<Box<CertificatesConfig>>,
    /// `[openbao]`, when present.
    pub openbao: Option<Box<OpenBaoConfig>>,
    /// Where the daemon keeps state (grants).
    pub state_dir: PathBuf,
    /// `[pkcs11]` (with `backend = "pkcs11"` only).
    pub pkcs11: Option<Box<pkcs11::Pkcs11Config>>,
}

impl Config {
    /// Reads and validates the configuration file at `path`, which must be
    /// a regular file owned by root and writable by no one else (see
    /// [`crate::trust`]).
    pub fn load(path: &Path) -> Result<Self> {
        let text = crate::trust::read_text(path)
            .map_err(|e| Error::msg(format!("{}: {e}", path.display())))?;
        Self::parse(path, &text)
    }

    /// Parses and validates configuration text; `path` names it in errors and
    /// anchors relative paths.
    pub fn parse(path: &Path, text: &str) -> Result<Self> {
        let file = path.display();
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            // toml's message spans several lines (it quotes the source); keep
            // the first, which names the field, plus the line number.
            let line = e
                .span()
                .map(|s| text.get(..s.start).map_or(0, |t| t.lines().count().max(1)))
                .map(|n| format!(" (line {n})"))
                .unwrap_or_default();
            let what = e
                .message()
                .lines()
                .next()
                .unwrap_or("invalid TOML")
                .to_owned();
            Error::msg(format!("{file}{line}: {what}"))
        })?;

        let base = path.parent().unwrap_or(Path::new("."));
        let resolve = |p: PathBuf| if p.is_relative() { base.join(p) } else { p };

        let key_dir = resolve(raw.key_dir.unwrap_or_else(|| DEFAULT_KEY_DIR.into()));
        // Whoever can write in key_dir can rename public keys into each
        // other's names and choose which key a group gets. A missing one is
        // named by the first key file it should hold.
        match crate::trust::check_dir(&key_dir) {
            Err(e) if !e.is_not_found() => {
                return Err(Error::msg(format!(
                    "{file}: key_dir {}: {e}",
                    key_dir.display()
                )))
            }
            _ => {}
        }
        let defaults = Limits::default();
        let limits = Limits {
            max_connections: positive(
                &file,
                "limits.max_connections",
                raw.limits.max_connections,
                defaults.max_connections,
            )?,
            max_connections_per_user: positive(
                &file,
                "limits.max_connections_per_user",
                raw.limits.max_connections_per_user,
                defaults.max_connections_per_user,
            )?,
            idle_timeout: Duration::from_secs(positive(
                &file,
                "limits.idle_timeout_secs",
                raw.limits.idle_timeout_secs,
                defaults.idle_timeout.as_secs(),
            )?),
            upstream_timeout: Duration::from_secs(positive(
                &file,
                "limits.upstream_timeout_secs",
                raw.limits.upstream_timeout_secs,
                defaults.upstream_timeout.as_secs(),
            )?),
            lookup_cache: Duration::from_secs(at_most(
                &file,
                "limits.lookup_cache_secs",
                raw.limits.lookup_cache_secs,
                defaults.lookup_cache.as_secs(),
            )?),
            lookup_timeout: Duration::from_secs(at_most(
                &file,
                "limits.lookup_timeout_secs",
                positive(
                    &file,
                    "limits.lookup_timeout_secs",
                    raw.limits.lookup_timeout_secs,
                    defaults.lookup_timeout.as_secs(),
                )
                .map(Some)?,
                defaults.lookup_timeout.as_secs(),
            )?),
        };

        let mut keys = Vec::with_capacity(raw.keys.len());
        let mut objects = BTreeMap::new();
        for (name, mut key) in raw.keys {
            if let Some(object) =
                pkcs11::key_object(&file, &name, key.pkcs11_label.take(), key.pkcs11_id.take())?
            {
                objects.insert(name.clone(), object);
            }
            keys.push(load_key(path, &key_dir, name, key)?);
        }
        let certificates = match raw.certificates {
            Some(c) => Some(Box::new(load_certificates(path, &key_dir, c, &keys)?)),
            None => None,
        };
        if certificates.is_none() {
            if let Some(k) = keys.iter().find(|k| k.cert.mode != CertMode::Off) {
                return Err(Error::msg(format!(
                    "{file}: keys.{}.certificate = \"{}\" needs a [certificates] section \
                     naming the CA (ca = \"NAME\")",
                    k.name,
                    k.cert.mode.name()
                )));
            }
        }
        for (i, a) in keys.iter().enumerate() {
            if let Some(b) = keys
                .iter()
                .skip(i + 1)
                .find(|b| b.public_key == a.public_key)
            {
                return Err(Error::msg(format!(
                    "{file}: keys.{} and keys.{} have the same public key ({})",
                    a.name, b.name, a.fingerprint
                )));
            }
        }

        let backend = raw.agent.backend.unwrap_or_default();
        let openbao = match raw.openbao {
            Some(o) => Some(Box::new(openbao::load(path, o)?)),
            None => None,
        };
        if backend == BackendKind::OpenBao && openbao.is_none() {
            return Err(Error::msg(format!(
                "{file}: agent.backend = \"openbao\" needs an [openbao] section \
                 (addresses, auth)"
            )));
        }
        if backend != BackendKind::OpenBao {
            if let Some(k) = keys.iter().find(|k| k.transit_key.is_some()) {
                return Err(Error::msg(format!(
                    "{file}: keys.{}.transit_key: applies only with agent.backend = \"openbao\"",
                    k.name
                )));
            }
        }
        if let Some(role) = certificates.as_ref().and_then(|c| c.openbao_role.as_ref()) {
            match openbao.as_deref() {
                None => {
                    return Err(Error::msg(format!(
                        "{file}: certificates.ca = \"openbao:{role}\" needs an [openbao] section"
                    )))
                }
                Some(o) if backend != BackendKind::OpenBao && o.auth.needs_secret() => {
                    return Err(Error::msg(format!(
                        "{file}: certificates.ca = \"openbao:{role}\" with agent.backend = \"{}\" \
                         needs openbao.auth = \"cert\" or \"agent\" (the daemon logs in by itself; \
                         `keyholder arm` hands a secret only to the openbao backend)",
                        backend.name()
                    )))
                }
                Some(_) => {}
            }
        }
        let pkcs11 = pkcs11::load(&file, raw.pkcs11, backend == BackendKind::Pkcs11, objects)?;
        if backend != BackendKind::Upstream {
            for (field, set) in [
                ("spawn", raw.agent.spawn.is_some()),
                ("program", raw.agent.program.is_some()),
            ] {
                if set {
                    return Err(Error::msg(format!(
                        "{file}: agent.{field}: does not apply with agent.backend = \"{}\" \
                         (keyholder serves agent.socket itself, no ssh-agent is started); \
                         remove it",
                        backend.name()
                    )));
                }
            }
        }

        Ok(Self {
            path: path.to_owned(),
            socket: resolve(raw.socket.unwrap_or_else(|| DEFAULT_SOCKET.into())),
            key_dir,
            log: raw.log.unwrap_or(LogTarget::Syslog),
            require_encrypted: raw.require_encrypted.unwrap_or(true),
            agent: AgentConfig {
                backend,
                socket: resolve(
                    raw.agent
                        .socket
                        .unwrap_or_else(|| DEFAULT_AGENT_SOCKET.into()),
                ),
                spawn: raw.agent.spawn.unwrap_or(backend == BackendKind::Upstream),
                program: raw
                    .agent
                    .program
                    .unwrap_or_else(|| DEFAULT_AGENT_PROGRAM.into()),
            },
            limits,
            keys,
            certificates,
            openbao,
            state_dir: resolve(
                raw.state_dir
                    .unwrap_or_else(|| grants::DEFAULT_STATE_DIR.into()),
            ),
            pkcs11: pkcs11.map(Box::new),
        })
    }

    /// The configured key with this name.
    pub fn key(&self, name: &str) -> Option<&KeyConfig> {
        self.keys.iter().find(|k| k.name == name)
    }

    /// Every key file `arm` and `check-config` handle: the keys, then the
    /// certificate CA (never a key callers may use; listed here only so
    /// that it is armed and checked like the others).
    pub fn key_files(&self) -> Vec<KeyConfig> {
        let mut all = self.keys.clone();
        // A CA in the cluster has no key file here.
        all.extend(
            self.certificates
                .iter()
                .filter(|c| c.openbao_role.is_none())
                .map(|c| c.ca.clone()),
        );
        all
    }
}

fn positive<T: PartialEq + Default + Copy>(
    file: &impl std::fmt::Display,
    field: &str,
    value: Option<T>,
    default: T,
) -> Result<T> {
    match value {
        Some(v) if v == T::default() => Err(Error::msg(format!(
            "{file}: {field}: must be greater than 0"
        ))),
        Some(v) => Ok(v),
        None => Ok(default),
    }
}

fn at_most(
    file: &impl std::fmt::Display,
    field: &str,
    value: Option<u64>,
    default: u64,
) -> Result<u64> {
    match value {
        Some(v) if v > MAX_LOOKUP_SECS => Err(Error::msg(format!(
            "{file}: {field}: must be at most {MAX_LOOKUP_SECS}"
        ))),
        Some(v) => Ok(v),
        None => Ok(default),
    }
}

/// A key name is a file name in `key_dir`: letters, digits, `.`, `_`, `-`,
/// not starting with a dot.
fn valid_key_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && !name.ends_with(".pub")
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn load_key(path: &Path, key_dir: &Path, name: String, raw: RawKey) -> Result<KeyConfig> {
    let file = path.display();
    if !valid_key_name(&name) {
        return Err(Error::msg(format!(
            "{file}: keys.{name}: invalid key name (use letters, digits, '.', '_', '-'; \
             not starting with '.', not ending in '.pub')"
        )));
    }
    if raw.groups.is_empty() {
        return Err(Error::msg(format!(
            "{file}: keys.{name}.groups: empty; list the Unix groups that may use this key"
        )));
    }
    if let Some(bad) = raw
        .groups
        .iter()
        .find(|g| g.is_empty() || g.contains(|c: char| c.is_whitespace() || c == ':'))
    {
        return Err(Error::msg(format!(
            "{file}: keys.{name}.groups: {bad:?} is not a valid group name"
        )));
    }

    let cert = load_key_cert(&file, &name, &raw)?;
    let (text, source, field) = match raw.public_key {
        Some(text) => (
            text,
            PublicKeySource::Inline,
            format!("keys.{name}.public_key"),
        ),
        None => {
            let pub_path = key_dir.join(format!("{name}.pub"));
            let text = crate::trust::read_text(&pub_path).map_err(|e| {
                let hint = match e {
                    TrustError::Io(_) => format!(" (put it there, or set keys.{name}.public_key)"),
                    TrustError::Untrusted(_) => String::new(),
                };
                Error::msg(format!(
                    "{file}: keys.{name}: public key {}: {e}{hint}",
                    pub_path.display()
                ))
            })?;
            let field = format!("keys.{name}: {}", pub_path.display());
            (text, PublicKeySource::File(pub_path), field)
        }
    };
    let public_key = parse_public_key(&text)
        .map_err(|e| Error::msg(format!("{file}: {field}: not an OpenSSH public key: {e}")))?;
    let fingerprint = public_key.fingerprint(HashAlg::Sha256).to_string();
    let destinations = match raw.destinations {
        None => None,
        Some(p) => {
            let p = if p.is_relative() {
                path.parent().unwrap_or(Path::new(".")).join(p)
            } else {
                p
            };
            Some(load_destinations(&file, &name, p)?)
        }
    };
    if let Some(users) = &raw.remote_users {
        if users.is_empty() {
            return Err(Error::msg(format!(
                "{file}: keys.{name}.remote_users: empty; list the remote user names \
                 the key may log in as, or leave it out to allow any"
            )));
        }
        if let Some(bad) = users
            .iter()
            .find(|u| u.is_empty() || u.contains(|c: char| c.is_whitespace() || c.is_control()))
        {
            return Err(Error::msg(format!(
                "{file}: keys.{name}.remote_users: {bad:?} is not a valid user name"
            )));
        }
    }
    if let Some(t) = &raw.transit_key {
        openbao::check_transit_key(&file.to_string(), &name, t)?;
    }
    let transit_key = raw.transit_key;
    let grants = match raw.grants {
        Some(g) => Some(grants::load(path, &name, g)?),
        None => None,
    };
    Ok(KeyConfig {
        private_key_path: key_dir.join(&name),
        name,
        public_key,
        fingerprint,
        source,
        groups: raw.groups,
        allow_any_data: raw.allow_any_data,
        cert,
        destinations,
        remote_users: raw.remote_users,
        allow_forwarding: raw.allow_forwarding,
        transit_key,
        grants,
    })
}

/// Reads a key's destinations file (known_hosts format), which must pass
/// the trust check: whoever can write it chooses where the key may be used.
/// A caller that may not read it (a non-root `status` or `list`) gets the
/// path without its hosts.
fn load_destinations(
    file: &impl std::fmt::Display,
    name: &str,
    path: PathBuf,
) -> Result<Destinations> {
    let what = || format!("{file}: keys.{name}.destinations: {}", path.display());
    let text = match crate::trust::read_text(&path) {
        Ok(text) => text,
        Err(e) if e.is_permission_denied() && !nix::unistd::geteuid().is_root() => {
            return Ok(Destinations { path, hosts: None });
        }
        Err(e) => return Err(Error::msg(format!("{}: {e}", what()))),
    };
    let hosts = KnownHosts::parse(&text).map_err(|e| Error::msg(format!("{}: {e}", what())))?;
    Ok(Destinations {
        path,
        hosts: Some(Arc::new(hosts)),
    })
}

/// A certificate field value: printable ASCII, no spaces or commas (they
/// separate values in sshd's logs and options), not empty.
fn plain_value(v: &str) -> bool {
    !v.is_empty() && v.len() <= 256 && v.bytes().all(|b| b.is_ascii_graphic() && b != b',')
}

fn load_key_cert(file: &impl std::fmt::Display, name: &str, raw: &RawKey) -> Result<KeyCertConfig> {
    let mode = raw.certificate.unwrap_or_default();
    let principals = raw.principals.clone().unwrap_or_default();
    if mode != CertMode::Off && principals.is_empty() {
        return Err(Error::msg(format!(
            "{file}: keys.{name}.principals: required with certificate = \"{}\": \
             list the remote users the certificate is valid for",
            mode.name()
        )));
    }
    if let Some(bad) = principals.iter().find(|p| !plain_value(p)) {
        return Err(Error::msg(format!(
            "{file}: keys.{name}.principals: {bad:?} is not a valid principal \
             (printable, no spaces or commas)"
        )));
    }
    let mut extensions = raw
        .cert_extensions
        .clone()
        .unwrap_or_else(|| vec!["permit-pty".to_owned()]);
    if let Some(bad) = extensions.iter().find(|e| !plain_value(e)) {
        return Err(Error::msg(format!(
            "{file}: keys.{name}.cert_extensions: {bad:?} is not a valid extension name"
        )));
    }
    extensions.sort();
    extensions.dedup();
    if let Some(cmd) = &raw.force_command {
        if cmd.is_empty() || cmd.chars().any(char::is_control) {
            return Err(Error::msg(format!(
                "{file}: keys.{name}.force_command: must be a non-empty command \
                 without control characters"
            )));
        }
    }
    let source_address = raw.source_address.clone().unwrap_or_default();
    if raw.source_address.is_some() && source_address.is_empty() {
        return Err(Error::msg(format!(
            "{file}: keys.{name}.source_address: empty; list addresses or CIDR blocks, \
             or leave it out"
        )));
    }
    if let Some(bad) = source_address.iter().find(|a| !valid_cidr(a)) {
        return Err(Error::msg(format!(
            "{file}: keys.{name}.source_address: {bad:?} is not an address or CIDR block"
        )));
    }
    Ok(KeyCertConfig {
        mode,
        principals,
        extensions,
        force_command: raw.force_command.clone(),
        source_address,
    })
}

/// `192.0.2.1`, `192.0.2.0/24`, `2001:db8::/32`: what sshd's source-address
/// critical option accepts.
fn valid_cidr(text: &str) -> bool {
    let (addr, bits) = match text.split_once('/') {
        Some((a, b)) => (a, Some(b)),
        None => (text, None),
    };
    let max = match addr.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(_)) => 32,
        Ok(std::net::IpAddr::V6(_)) => 128,
        Err(_) => return false,
    };
    bits.is_none_or(|b| {
        !b.is_empty()
            && b.bytes().all(|c| c.is_ascii_digit())
            && b.parse::<u8>().is_ok_and(|n| n <= max)
    })
}

fn load_certificates(
    path: &Path,
    key_dir: &Path,
    raw: RawCertificates,
    keys: &[KeyConfig],
) -> Result<CertificatesConfig> {
    let file = path.display();
    let name = raw.ca;
    // "openbao:ROLE": the cluster's SSH engine signs; its CA public key is
    // pinned in key_dir/openbao-ca.pub.
    let openbao_role = match name.strip_prefix("openbao:") {
        Some(role) => {
            openbao::check_role(&file.to_string(), role)?;
            Some(role.to_owned())
        }
        None => None,
    };
    if openbao_role.is_none() && !valid_key_name(&name) {
        return Err(Error::msg(format!(
            "{file}: certificates.ca: {name:?} is not a valid key name (a file name in key_dir)"
        )));
    }
    if keys.iter().any(|k| k.name == name) {
        return Err(Error::msg(format!(
            "{file}: certificates.ca: {name:?} is also a [keys] entry; the CA signs \
             certificates only and may not be a key callers use"
        )));
    }
    let pub_path = match openbao_role {
        Some(_) => key_dir.join(openbao::ENGINE_CA_PUB),
        None => key_dir.join(format!("{name}.pub")),
    };
    let text = crate::trust::read_text(&pub_path).map_err(|e| {
        Error::msg(format!(
            "{file}: certificates.ca: the CA public key {}: {e}",
            pub_path.display()
        ))
    })?;
    let public_key = parse_public_key(&text).map_err(|e| {
        Error::msg(format!(
            "{file}: certificates.ca: {}: not an OpenSSH public key: {e}",
            pub_path.display()
        ))
    })?;
    if !matches!(
        public_key,
        KeyData::Ed25519(_) | KeyData::Rsa(_) | KeyData::Ecdsa(_)
    ) {
        return Err(Error::msg(format!(
            "{file}: certificates.ca: {}: a CA must be an Ed25519, ECDSA or RSA key",
            pub_path.display()
        )));
    }
    let fingerprint = public_key.fingerprint(HashAlg::Sha256).to_string();
    if let Some(k) = keys.iter().find(|k| k.public_key == public_key) {
        return Err(Error::msg(format!(
            "{file}: certificates.ca: the CA's public key is also keys.{} ({fingerprint}); \
             the CA may not be a key callers use",
            k.name
        )));
    }
    let validity_secs = raw.validity_secs.unwrap_or(DEFAULT_CERT_VALIDITY_SECS);
    if !(10..=86400).contains(&validity_secs) {
        return Err(Error::msg(format!(
            "{file}: certificates.validity_secs: {validity_secs} is outside 10..=86400"
        )));
    }
    let backdate_secs = raw.backdate_secs.unwrap_or(DEFAULT_CERT_BACKDATE_SECS);
    if backdate_secs > 3600 {
        return Err(Error::msg(format!(
            "{file}: certificates.backdate_secs: {backdate_secs} is outside 0..=3600"
        )));
    }
    let key_id = raw.key_id.unwrap_or_else(|| DEFAULT_KEY_ID.to_owned());
    check_key_id_template(&key_id)
        .map_err(|why| Error::msg(format!("{file}: certificates.key_id: {key_id:?}: {why}")))?;
    Ok(CertificatesConfig {
        ca: KeyConfig {
            private_key_path: key_dir.join(&name),
            name,
            public_key,
            fingerprint,
            source: PublicKeySource::File(pub_path),
            groups: Vec::new(),
            allow_any_data: false,
            cert: KeyCertConfig::default(),
            destinations: None,
            remote_users: None,
            allow_forwarding: false,
            transit_key: None,
            grants: None,
        },
        validity_secs,
        backdate_secs,
        key_id,
        openbao_role,
    })
}

/// A key ID template: printable ASCII (spaces allowed), braces only around
/// a known placeholder, not empty.
fn check_key_id_template(template: &str) -> std::result::Result<(), String> {
    if template.is_empty() || template.len() > 256 {
        return Err("must be 1 to 256 characters".to_owned());
    }
    if !template.bytes().all(|b| b == b' ' || b.is_ascii_graphic()) {
        return Err("only printable ASCII characters are allowed".to_owned());
    }
    let mut rest = template;
    while let Some(open) = rest.find(['{', '}']) {
        let after = rest.get(open + 1..).unwrap_or("");
        if rest.get(open..open + 1) == Some("}") {
            return Err("unmatched '}'".to_owned());
        }
        let Some(close) = after.find('}') else {
            return Err("unmatched '{'".to_owned());
        };
        let name = after.get(..close).unwrap_or("");
        if !KEY_ID_PLACEHOLDERS.contains(&name) {
            return Err(format!(
                "unknown placeholder {{{name}}} (known: {{user}}, {{uid}}, {{host}}, {{key}}, {{serial}})"
            ));
        }
        rest = after.get(close + 1..).unwrap_or("");
    }
    Ok(())
}

/// Parses one OpenSSH public key line (`ssh-ed25519 AAAA… comment`). A
/// certificate line is accepted and stands for the key it certifies.
pub fn parse_public_key(text: &str) -> std::result::Result<KeyData, String> {
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .ok_or_else(|| "empty".to_owned())?;
    match PublicKey::from_openssh(line) {
        Ok(key) => Ok(key.key_data().clone()),
        Err(key_err) => match ssh_key::Certificate::from_openssh(line) {
            Ok(cert) => Ok(cert.public_key().clone()),
            Err(_) => Err(key_err.to_string()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ED: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG0dfWR7X83D9xk2DLJjEwGct6dhvTRdMC/OJMR2HDp9 test";

    fn parse(text: &str) -> Result<Config> {
        Config::parse(Path::new("/etc/keyholder/keyholder.toml"), text)
    }

    #[test]
    fn defaults_apply_to_an_empty_file() {
        let c = parse("").unwrap();
        assert_eq!(c.socket, Path::new(DEFAULT_SOCKET));
        assert_eq!(c.agent.socket, Path::new(DEFAULT_AGENT_SOCKET));
        assert!(c.agent.spawn);
        assert!(c.require_encrypted);
        assert_eq!(c.log, LogTarget::Syslog);
        assert_eq!(c.limits, Limits::default());
        assert!(c.keys.is_empty());
    }

    #[test]
    fn inline_key_is_loaded() {
        let c = parse(&format!(
            "[keys.deploy]\npublic_key = \"{ED}\"\ngroups = [\"ops\"]\n"
        ))
        .unwrap();
        let k = c.key("deploy").unwrap();
        assert_eq!(k.groups, vec!["ops".to_owned()]);
        assert!(k.fingerprint.starts_with("SHA256:"));
        assert_eq!(k.private_key_path, Path::new("/etc/keyholder.d/deploy"));
        assert!(!k.allow_any_data);
    }

    #[test]
    fn unknown_field_names_file_and_field() {
        let e = parse("sockett = \"/x\"\n").unwrap_err().to_string();
        assert!(e.contains("/etc/keyholder/keyholder.toml"), "{e}");
        assert!(e.contains("sockett"), "{e}");
        let e = parse(&format!(
            "[keys.deploy]\npublic_key = \"{ED}\"\ngroups = [\"ops\"]\ngroup = 1\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("group"), "{e}");
    }

    #[test]
    fn empty_groups_is_an_error_naming_the_key() {
        let e = parse(&format!(
            "[keys.deploy]\npublic_key = \"{ED}\"\ngroups = []\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("keys.deploy.groups"), "{e}");
    }

    #[test]
    fn missing_public_key_file_is_an_error_naming_the_path() {
        let e = parse("key_dir = \"/nonexistent-kh\"\n[keys.deploy]\ngroups = [\"ops\"]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("keys.deploy"), "{e}");
        assert!(e.contains("/nonexistent-kh/deploy.pub"), "{e}");
    }

    #[test]
    fn garbage_public_key_is_an_error_naming_the_field() {
        let e = parse("[keys.deploy]\npublic_key = \"ssh-ed25519 nope\"\ngroups = [\"ops\"]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("keys.deploy.public_key"), "{e}");
    }

    #[test]
    fn zero_limits_and_bad_names_are_rejected() {
        assert!(parse("[limits]\nmax_connections = 0\n").is_err());
        assert!(parse("[limits]\nidle_timeout_secs = 0\n").is_err());
        assert!(parse("[limits]\nmax_connections = -1\n").is_err());
        assert!(parse("[limits]\nlookup_timeout_secs = 0\n").is_err());
        let e = parse("[limits]\nlookup_cache_secs = 3601\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("limits.lookup_cache_secs: must be at most 3600"),
            "{e}"
        );
        assert!(parse("[limits]\nlookup_timeout_secs = 3601\n").is_err());
        let c = parse("[limits]\nlookup_cache_secs = 0\nlookup_timeout_secs = 2\n").unwrap();
        assert_eq!(c.limits.lookup_cache, Duration::ZERO);
        assert_eq!(c.limits.lookup_timeout, Duration::from_secs(2));
        let e = parse(&format!(
            "[keys.\"../x\"]\npublic_key = \"{ED}\"\ngroups = [\"ops\"]\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("invalid key name"), "{e}");
    }

    #[test]
    fn duplicate_public_keys_are_rejected() {
        let e = parse(&format!(
            "[keys.a]\npublic_key = \"{ED}\"\ngroups = [\"ops\"]\n[keys.b]\npublic_key = \"{ED}\"\ngroups = [\"ops\"]\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("same public key"), "{e}");
    }

    #[test]
    fn backend_defaults_to_upstream_and_builtin_rejects_spawn_and_program() {
        assert_eq!(parse("").unwrap().agent.backend, BackendKind::Upstream);
        let c = parse("[agent]\nbackend = \"builtin\"\nsocket = \"/run/k/agent.sock\"\n").unwrap();
        assert_eq!(c.agent.backend, BackendKind::Builtin);
        assert!(!c.agent.spawn);
        for field in ["spawn = true", "spawn = false", "program = \"/bin/x\""] {
            let e = parse(&format!("[agent]\nbackend = \"builtin\"\n{field}\n"))
                .unwrap_err()
                .to_string();
            let name = field.split(' ').next().unwrap();
            assert!(
                e.contains(&format!("agent.{name}")) && e.contains("builtin"),
                "{e}"
            );
        }
        let e = parse("[agent]\nbackend = \"gpg\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("backend") || e.contains("gpg"), "{e}");
    }

    #[test]
    fn certificate_fields_are_validated() {
        let key = |extra: &str| {
            parse(&format!(
                "[keys.deploy]\npublic_key = \"{ED}\"\ngroups = [\"ops\"]\n{extra}"
            ))
        };
        // Off by default, with the default extension.
        let c = key("").unwrap();
        let k = &c.key("deploy").unwrap().cert;
        assert_eq!(k.mode, CertMode::Off);
        assert_eq!(k.extensions, ["permit-pty"]);
        // A mode needs [certificates] and principals.
        let e = key("certificate = \"also\"\nprincipals = [\"deploy\"]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("[certificates]"), "{e}");
        let e = key("certificate = \"only\"\n").unwrap_err().to_string();
        assert!(e.contains("keys.deploy.principals"), "{e}");
        let e = key("certificate = \"sometimes\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("sometimes") && e.contains("line 4"), "{e}");
        for (bad, field) in [
            ("principals = [\"a b\"]", "principals"),
            ("principals = [\"a,b\"]", "principals"),
            ("cert_extensions = [\"\"]", "cert_extensions"),
            ("force_command = \"\"", "force_command"),
            ("source_address = []", "source_address"),
            ("source_address = [\"10.0.0.0/33\"]", "source_address"),
            ("source_address = [\"example.org\"]", "source_address"),
        ] {
            let e = key(&format!("{bad}\n")).unwrap_err().to_string();
            assert!(e.contains(&format!("keys.deploy.{field}")), "{bad}: {e}");
        }
        let c = key(
            "cert_extensions = [\"permit-pty\", \"permit-agent-forwarding\", \"permit-pty\"]\n\
             source_address = [\"192.0.2.0/24\", \"2001:db8::/32\", \"::1\"]\n",
        )
        .unwrap();
        let k = &c.key("deploy").unwrap().cert;
        assert_eq!(k.extensions, ["permit-agent-forwarding", "permit-pty"]);
        assert_eq!(k.source_address.len(), 3);
    }

    #[test]
    fn key_id_templates() {
        assert!(check_key_id_template(DEFAULT_KEY_ID).is_ok());
        assert!(check_key_id_template("{user} uid {uid} on {host}: {key} #{serial}").is_ok());
        assert!(check_key_id_template("fixed").is_ok());
        for bad in ["", "{name}", "{user", "user}", "{}", "a\tb", "é"] {
            assert!(check_key_id_template(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn relative_paths_are_relative_to_the_config_file() {
        let c = Config::parse(
            Path::new("/srv/kh/keyholder.toml"),
            "key_dir = \"keys\"\nsocket = \"p.sock\"\n",
        )
        .unwrap();
        assert_eq!(c.key_dir, Path::new("/srv/kh/keys"));
        assert_eq!(c.socket, Path::new("/srv/kh/p.sock"));
    }
}

#[cfg(test)]
mod destination_tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const ED: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG0dfWR7X83D9xk2DLJjEwGct6dhvTRdMC/OJMR2HDp9 test";

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("kh-dest-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn key_with(extra: &str) -> String {
        format!("[keys.deploy]\npublic_key = \"{ED}\"\ngroups = [\"ops\"]\n{extra}")
    }

    #[test]
    fn destinations_file_is_read_relative_to_the_config() {
        let d = dir("ok");
        std::fs::write(
            d.join("targets"),
            format!("web1 {ED}\n@cert-authority * {ED}\n"),
        )
        .unwrap();
        let c = Config::parse(
            &d.join("k.toml"),
            &key_with("destinations = \"targets\"\nremote_users = [\"deploy\"]\nallow_forwarding = true\n"),
        );
        let is_root = nix::unistd::geteuid().is_root();
        if !is_root {
            // Not root: the file is not root's, which is refused.
            assert!(c.unwrap_err().to_string().contains("not root"));
            return;
        }
        let c = c.unwrap();
        let k = c.key("deploy").unwrap();
        let dest = k.destinations.as_ref().unwrap();
        assert_eq!(dest.path, d.join("targets"));
        assert_eq!(dest.hosts.as_ref().unwrap().counts(), (1, 1, 0));
        assert_eq!(k.remote_users.as_deref(), Some(&["deploy".to_owned()][..]));
        assert!(k.allow_forwarding);
        // Defaults.
        let c = Config::parse(&d.join("k.toml"), &key_with("")).unwrap();
        let k = c.key("deploy").unwrap();
        assert!(k.destinations.is_none() && k.remote_users.is_none() && !k.allow_forwarding);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn bad_destinations_files_are_errors_naming_key_file_and_line() {
        let d = dir("bad");
        let conf = d.join("k.toml");
        let e = Config::parse(&conf, &key_with("destinations = \"missing\"\n"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("keys.deploy.destinations") && e.contains("missing"),
            "{e}"
        );
        std::fs::write(
            d.join("garbage"),
            format!("web1 {ED}\nweb2 ssh-ed25519 nope\n"),
        )
        .unwrap();
        let e = Config::parse(&conf, &key_with("destinations = \"garbage\"\n"))
            .unwrap_err()
            .to_string();
        if nix::unistd::geteuid().is_root() {
            assert!(e.contains("line 2"), "{e}");
            std::fs::set_permissions(d.join("garbage"), std::fs::Permissions::from_mode(0o666))
                .unwrap();
            let e = Config::parse(&conf, &key_with("destinations = \"garbage\"\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("writable by group or others"), "{e}");
        }
        std::fs::create_dir(d.join("adir")).unwrap();
        let e = Config::parse(&conf, &key_with("destinations = \"adir\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a regular file"), "{e}");
        std::os::unix::fs::symlink(d.join("garbage"), d.join("link")).unwrap();
        assert!(Config::parse(&conf, &key_with("destinations = \"link\"\n")).is_err());
        let e = Config::parse(&conf, &key_with("remote_users = []\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("keys.deploy.remote_users: empty"), "{e}");
        let e = Config::parse(&conf, &key_with("remote_users = [\"a b\"]\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a valid user name"), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }
}

#[cfg(test)]
mod example_tests {
    use super::*;

    /// The shipped example documents the defaults: loading it gives exactly
    /// what an empty file gives (apart from where it was read from).
    #[test]
    fn example_config_loads_and_matches_the_defaults() {
        let path = Path::new("/etc/keyholder/keyholder.toml");
        let example = Config::parse(path, include_str!("../../keyholder.toml.example")).unwrap();
        let empty = Config::parse(path, "").unwrap();
        assert_eq!(example, empty);
    }

    /// Switching backend in the example is one uncommented line.
    #[test]
    fn example_config_switches_backend_with_one_line() {
        let path = Path::new("/etc/keyholder/keyholder.toml");
        let text = include_str!("../../keyholder.toml.example");
        let line = "# backend = \"upstream\"";
        assert_eq!(
            text.matches(line).count(),
            1,
            "the example has one {line:?} line"
        );
        for backend in [BackendKind::Upstream, BackendKind::Builtin] {
            let switched = text.replace(line, &format!("backend = \"{}\"", backend.name()));
            let config = Config::parse(path, &switched).unwrap();
            assert_eq!(config.agent.backend, backend);
        }
    }
}
