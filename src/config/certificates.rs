//! `[certificates]` and each key's certificate settings: the CA, validity,
//! key ID template, principals, extensions and critical options.
//!
//! Never: accepts a CA that is also a key callers use, or a certificate
//! field value that could split a line in sshd's log.

use super::*;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCertificates {
    pub(super) ca: String,
    pub(super) validity_secs: Option<u64>,
    pub(super) backdate_secs: Option<u64>,
    pub(super) key_id: Option<String>,
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

/// A certificate field value: printable ASCII, no spaces or commas (they
/// separate values in sshd's logs and options), not empty.
pub(super) fn plain_value(v: &str) -> bool {
    !v.is_empty() && v.len() <= 256 && v.bytes().all(|b| b.is_ascii_graphic() && b != b',')
}

pub(super) fn load_key_cert(
    file: &impl std::fmt::Display,
    name: &str,
    raw: &RawKey,
) -> Result<KeyCertConfig> {
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
pub(super) fn valid_cidr(text: &str) -> bool {
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

pub(super) fn load_certificates(
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
pub(super) fn check_key_id_template(template: &str) -> std::result::Result<(), String> {
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
