//! The configuration file (`/etc/keyholder/keyholder.toml`): parsing, defaults
//! and validation.
//!
//! Loading resolves every key's public key (inline `public_key`, or
//! `key_dir/NAME.pub`), so a loaded [`Config`] is complete: nothing later has to
//! touch the file system to know which key is which. Every error names the
//! file, and where it applies the key and the field. Every file it reads
//! goes through [`crate::trust`].
//!
//! This file holds the top level (sockets, `[agent]`, the backend) and the
//! whole-file checks; each further concern has a file of its own: [`keys`],
//! [`certificates`], [`limits`], [`grants`], [`pkcs11`], [`openbao`], and
//! [`arming`] (how `keyholder arm` and `disarm` reach each backend's keys).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use ssh_key::public::KeyData;
use ssh_key::{HashAlg, PublicKey};

use crate::error::{Error, Result};
use crate::known_hosts::KnownHosts;
use crate::trust::TrustError;

pub mod arming;
pub mod certificates;
pub mod grants;
pub mod keys;
pub mod limits;
pub mod openbao;
pub mod pkcs11;
#[cfg(test)]
mod tests;

pub use certificates::*;
pub use grants::GrantsConfig;
pub use keys::*;
pub use limits::*;
pub use openbao::OpenBaoConfig;

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
    /// Whether the backend looks the configured keys up when it starts (a
    /// token's objects, a cluster's transit keys): a reload that changes
    /// them takes effect at the next restart.
    pub fn looks_keys_up_at_start(self) -> bool {
        matches!(self, Self::Pkcs11 | Self::OpenBao)
    }

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
        let limits = limits::load(&file, &raw.limits)?;

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
            // `spawn = false` says what is true anyway and is accepted.
            for (field, set) in [
                ("spawn", raw.agent.spawn == Some(true)),
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
