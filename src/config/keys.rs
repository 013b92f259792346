//! `[keys.NAME]`: a configured key, its public key (inline, or
//! `key_dir/NAME.pub` read through the trust check), its groups and its
//! destination rules.
//!
//! Never: reads a file other than through [`crate::trust`], or accepts a
//! key whose public key it cannot parse.

use super::*;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKey {
    pub(super) public_key: Option<String>,
    pub(super) groups: Vec<String>,
    #[serde(default)]
    pub(super) allow_any_data: bool,
    pub(super) certificate: Option<CertMode>,
    pub(super) principals: Option<Vec<String>>,
    pub(super) cert_extensions: Option<Vec<String>>,
    pub(super) force_command: Option<String>,
    pub(super) source_address: Option<Vec<String>>,
    pub(super) destinations: Option<PathBuf>,
    pub(super) remote_users: Option<Vec<String>>,
    #[serde(default)]
    pub(super) allow_forwarding: bool,
    pub(super) transit_key: Option<String>,
    pub(super) grants: Option<grants::RawGrants>,
    pub(super) pkcs11_label: Option<String>,
    pub(super) pkcs11_id: Option<String>,
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

/// A key name is a file name in `key_dir`: letters, digits, `.`, `_`, `-`,
/// not starting with a dot.
pub(super) fn valid_key_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && !name.ends_with(".pub")
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

pub(super) fn load_key(
    path: &Path,
    key_dir: &Path,
    name: String,
    raw: RawKey,
) -> Result<KeyConfig> {
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
pub(super) fn load_destinations(
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
