//! The `[openbao]` section: where the OpenBao / Vault cluster is, how the
//! host logs in, and which mounts hold the keys and the SSH CA.
//!
//! Parsing and validation only: the files it names (`ca_file`,
//! `client_cert`, `client_key`, `token_file`) are read through the trust
//! check by the backend when the daemon starts, never here (commands for
//! everyone load the configuration too). This module never holds a secret.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};

/// The systemd credential (under `$CREDENTIALS_DIRECTORY`) holding the
/// AppRole secret id or the token `keyholder arm` hands the daemon.
pub const SECRET_CREDENTIAL: &str = "keyholder-openbao-secret";

/// The `[openbao]` table as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOpenBao {
    addresses: Vec<String>,
    ca_file: Option<PathBuf>,
    auth: AuthKind,
    role_id: Option<String>,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
    token_file: Option<PathBuf>,
    namespace: Option<String>,
    auth_mount: Option<String>,
    transit_mount: Option<String>,
    ssh_mount: Option<String>,
}

/// How the host logs in (`auth`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthKind {
    /// AppRole: `role_id` here, the secret id from `keyholder arm`.
    AppRole,
    /// TLS client certificate: no human needed.
    Cert,
    /// A token given by `keyholder arm`.
    Token,
    /// A token file kept fresh by an OpenBao/Vault Agent.
    Agent,
}

impl AuthKind {
    /// The configuration's spelling.
    pub fn name(self) -> &'static str {
        match self {
            Self::AppRole => "approle",
            Self::Cert => "cert",
            Self::Token => "token",
            Self::Agent => "agent",
        }
    }

    /// Whether `keyholder arm` hands the daemon a secret for this method.
    pub fn needs_secret(self) -> bool {
        matches!(self, Self::AppRole | Self::Token)
    }
}

/// A loaded, validated `[openbao]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenBaoConfig {
    /// Base URLs (`https://host:port`), in the order tried first.
    pub addresses: Vec<String>,
    /// The cluster's TLS CA (PEM); none: the system store.
    pub ca_file: Option<PathBuf>,
    /// How the host logs in.
    pub auth: AuthKind,
    /// AppRole's role id (approle only).
    pub role_id: Option<String>,
    /// TLS client certificate (PEM).
    pub client_cert: Option<PathBuf>,
    /// Its private key (PEM, 0600 root).
    pub client_key: Option<PathBuf>,
    /// The agent's token sink (auth = "agent").
    pub token_file: Option<PathBuf>,
    /// `X-Vault-Namespace`.
    pub namespace: Option<String>,
    /// The auth method's mount (default: `approle` or `cert`).
    pub auth_mount: String,
    /// The transit mount (default `transit`).
    pub transit_mount: String,
    /// The SSH secrets engine's mount (default `ssh`).
    pub ssh_mount: String,
}

/// Checks one address: `https://HOST[:PORT]`, or `http://` on loopback
/// only; no path, query or credentials. Returns it without a trailing `/`.
pub fn check_address(address: &str) -> std::result::Result<String, String> {
    let rest = if let Some(rest) = address.strip_prefix("https://") {
        (rest, true)
    } else if let Some(rest) = address.strip_prefix("http://") {
        (rest, false)
    } else {
        return Err(format!("address {address:?} must start with https://"));
    };
    let (authority, tls) = rest;
    let authority = authority.strip_suffix('/').unwrap_or(authority);
    if authority.is_empty() {
        return Err(format!("address {address:?} has no host"));
    }
    if authority.contains('@') {
        return Err(format!("address {address:?} must not carry credentials"));
    }
    if authority.contains(['/', '?', '#']) || authority.contains(char::is_whitespace) {
        return Err(format!(
            "address {address:?} must be scheme://host:port only (the API path /v1 is added)"
        ));
    }
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split(']').next().unwrap_or("")
    } else {
        authority.rsplit_once(':').map_or(authority, |(h, _)| h)
    };
    if host.is_empty() {
        return Err(format!("address {address:?} has no host"));
    }
    if !tls && !is_loopback(host) {
        return Err(format!(
            "address {address:?}: http:// is refused unless the host is loopback (use https://)"
        ));
    }
    Ok(address.trim_end_matches('/').to_string())
}

fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn mount(file: &str, field: &str, value: Option<String>, default: &str) -> Result<String> {
    let value = value.unwrap_or_else(|| default.to_string());
    let trimmed = value.trim_matches('/');
    if trimmed.is_empty()
        || !trimmed
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'))
        || trimmed
            .split('/')
            .any(|p| p.is_empty() || p == "." || p == "..")
    {
        return Err(Error::msg(format!(
            "{file}: openbao.{field}: {value:?} is not a mount path"
        )));
    }
    Ok(trimmed.to_string())
}

/// Validates `[openbao]`; relative paths are taken from the configuration
/// file's directory.
pub(super) fn load(path: &Path, raw: RawOpenBao) -> Result<OpenBaoConfig> {
    let file = path.display().to_string();
    let base = path.parent().unwrap_or(Path::new("."));
    let resolve = |p: PathBuf| if p.is_relative() { base.join(p) } else { p };
    if raw.addresses.is_empty() {
        return Err(Error::msg(format!(
            "{file}: openbao.addresses: empty; list the cluster's addresses"
        )));
    }
    let addresses = raw
        .addresses
        .iter()
        .map(|a| {
            check_address(a).map_err(|e| Error::msg(format!("{file}: openbao.addresses: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let need = |field: &str, set: bool| -> Result<()> {
        if set {
            Ok(())
        } else {
            Err(Error::msg(format!(
                "{file}: openbao.{field}: required with auth = \"{}\"",
                raw.auth.name()
            )))
        }
    };
    let forbid = |field: &str, set: bool| -> Result<()> {
        if set {
            Err(Error::msg(format!(
                "{file}: openbao.{field}: does not apply with auth = \"{}\"; remove it",
                raw.auth.name()
            )))
        } else {
            Ok(())
        }
    };
    match raw.auth {
        AuthKind::AppRole => {
            need(
                "role_id",
                raw.role_id.as_ref().is_some_and(|r| !r.trim().is_empty()),
            )?;
            forbid("token_file", raw.token_file.is_some())?;
        }
        AuthKind::Cert => {
            need("client_cert", raw.client_cert.is_some())?;
            forbid("role_id", raw.role_id.is_some())?;
            forbid("token_file", raw.token_file.is_some())?;
        }
        AuthKind::Token => {
            forbid("role_id", raw.role_id.is_some())?;
            forbid("token_file", raw.token_file.is_some())?;
            forbid("auth_mount", raw.auth_mount.is_some())?;
        }
        AuthKind::Agent => {
            need("token_file", raw.token_file.is_some())?;
            forbid("role_id", raw.role_id.is_some())?;
            forbid("auth_mount", raw.auth_mount.is_some())?;
        }
    }
    if raw.client_cert.is_some() != raw.client_key.is_some() {
        return Err(Error::msg(format!(
            "{file}: openbao.client_cert and openbao.client_key go together"
        )));
    }
    if let Some(ns) = &raw.namespace {
        if ns.is_empty() || ns.contains(|c: char| c.is_control() || c.is_whitespace()) {
            return Err(Error::msg(format!(
                "{file}: openbao.namespace: {ns:?} is not a namespace"
            )));
        }
    }
    let default_auth_mount = match raw.auth {
        AuthKind::Cert => "cert",
        _ => "approle",
    };
    Ok(OpenBaoConfig {
        addresses,
        ca_file: raw.ca_file.map(resolve),
        auth: raw.auth,
        role_id: raw.role_id.map(|r| r.trim().to_string()),
        client_cert: raw.client_cert.map(resolve),
        client_key: raw.client_key.map(resolve),
        token_file: raw.token_file.map(resolve),
        namespace: raw.namespace,
        auth_mount: mount(&file, "auth_mount", raw.auth_mount, default_auth_mount)?,
        transit_mount: mount(&file, "transit_mount", raw.transit_mount, "transit")?,
        ssh_mount: mount(&file, "ssh_mount", raw.ssh_mount, "ssh")?,
    })
}

/// The file in `key_dir` that pins the SSH engine's CA public key
/// (`[certificates] ca = "openbao:ROLE"`).
pub const ENGINE_CA_PUB: &str = "openbao-ca.pub";

/// Checks the ROLE of `ca = "openbao:ROLE"`.
pub(super) fn check_role(file: &str, role: &str) -> Result<()> {
    if role.is_empty()
        || role.len() > 128
        || !role
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(Error::msg(format!(
            "{file}: certificates.ca: \"openbao:{role}\": {role:?} is not an SSH role name"
        )));
    }
    Ok(())
}

/// Checks a key's `transit_key` (a transit key name).
pub(super) fn check_transit_key(file: &str, key: &str, name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 128
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(Error::msg(format!(
            "{file}: keys.{key}.transit_key: {name:?} is not a transit key name"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<OpenBaoConfig> {
        let raw: RawOpenBao = toml::from_str(text).map_err(|e| Error::msg(e.to_string()))?;
        load(Path::new("/etc/keyholder/keyholder.toml"), raw)
    }

    #[test]
    fn addresses_are_https_or_loopback_http() {
        assert!(check_address("https://bao.example:8200").is_ok());
        assert!(check_address("http://127.0.0.1:8200").is_ok());
        assert!(check_address("http://[::1]:8200").is_ok());
        assert_eq!(
            check_address("http://localhost:8200/").unwrap(),
            "http://localhost:8200"
        );
        assert!(check_address("http://bao.example:8200").is_err());
        assert!(check_address("http://10.0.0.1:8200").is_err());
        assert!(check_address("http://127.0.0.1.evil.example:8200").is_err());
        assert!(check_address("ftp://127.0.0.1").is_err());
        assert!(check_address("https://u:p@bao.example").is_err());
        assert!(check_address("https://bao.example/v1").is_err());
        assert!(check_address("not a url").is_err());
    }

    #[test]
    fn each_auth_method_needs_its_fields() {
        let ok = parse(
            "addresses = [\"https://a:8200\"]\nauth = \"approle\"\nrole_id = \"r\"\nca_file = \"ca.pem\"",
        )
        .unwrap();
        assert_eq!(ok.auth_mount, "approle");
        assert_eq!(ok.transit_mount, "transit");
        assert_eq!(ok.ca_file.unwrap(), Path::new("/etc/keyholder/ca.pem"));
        let e = parse("addresses = [\"https://a:8200\"]\nauth = \"approle\"").unwrap_err();
        assert!(e.to_string().contains("openbao.role_id: required"), "{e}");
        let e = parse("addresses = [\"https://a:8200\"]\nauth = \"cert\"").unwrap_err();
        assert!(
            e.to_string().contains("openbao.client_cert: required"),
            "{e}"
        );
        let e = parse("addresses = [\"https://a:8200\"]\nauth = \"agent\"").unwrap_err();
        assert!(
            e.to_string().contains("openbao.token_file: required"),
            "{e}"
        );
        let e = parse("addresses = []\nauth = \"token\"").unwrap_err();
        assert!(e.to_string().contains("openbao.addresses: empty"), "{e}");
        let e = parse("addresses = [\"http://bao:8200\"]\nauth = \"token\"").unwrap_err();
        assert!(e.to_string().contains("http:// is refused"), "{e}");
        let e = parse("addresses = [\"https://a\"]\nauth = \"token\"\nclient_cert = \"/c\"")
            .unwrap_err();
        assert!(e.to_string().contains("go together"), "{e}");
        let e = parse("addresses = [\"https://a\"]\nauth = \"token\"\ntransit_mount = \"../x\"")
            .unwrap_err();
        assert!(e.to_string().contains("not a mount path"), "{e}");
        assert!(parse("addresses = [\"https://a\"]\nauth = \"token\"\nbogus = 1").is_err());
    }
}
