//! `keyholder list`: the keys the caller may use, like `ssh-add -l` with
//! key names. Asks the proxy for its identities (the daemon already filters
//! them by the caller's groups and drops unarmed keys) and names each by the
//! configured key with the same public key:
//!
//! ```text
//! deploy  SHA256:…  ED25519  /etc/keyholder.d/deploy.pub
//! phab    SHA256:…  ECDSA    (inline)
//! ```
//!
//! The last column is the public key file to select the key with
//! (`ssh -i FILE -o IdentitiesOnly=yes`), or `(inline)` when the public key
//! is written in the configuration. An identity that matches no configured
//! key (the daemon runs another configuration, or this one is unreadable)
//! is shown as `?` with the agent's comment. A key listed with the caller's
//! certificate gets a second row for it (key ID, serial, principals). Exit 1, with a message on
//! stderr, when there is none. A key with grants that the caller's groups
//! name but that is not listed gets a line on stderr saying it needs a
//! grant, and how to ask for one.

use std::path::Path;

use ssh_agent_lib::proto::{Identity, PublicCredential};
use ssh_key::public::KeyData;
use ssh_key::{Algorithm, HashAlg};

use super::client::daemon_identities;
use super::ClientConfig;
use crate::config::PublicKeySource;
use crate::error::Result;

/// Added to the daemon's upstream timeout for this command's deadline.
const LIST_MARGIN: std::time::Duration = std::time::Duration::from_secs(5);

/// Lists the keys the caller may use.
pub fn run(config_path: &Path) -> Result<u8> {
    let config = ClientConfig::load(config_path)?;
    if let Some(note) = config.note() {
        eprintln!("keyholder: note: {note}");
    }
    let socket_path = config.socket();
    // Longer than the daemon's own upstream deadline, so that its FAILURE
    // (upstream too slow) arrives before this gives up.
    let timeout = config.config().map_or(super::status::TIMEOUT, |c| {
        c.limits.upstream_timeout + LIST_MARGIN
    });
    let ids = daemon_identities(&socket_path, timeout)?;

    let rows = rows(config.config(), &ids);
    for name in needs_grant(config.config(), &ids) {
        eprintln!(
            "keyholder: {name} needs a grant: keyholder request {name} --for DURATION --reason \
             TEXT (see keyholder grants)"
        );
    }
    if rows.is_empty() {
        let who = nix::unistd::User::from_uid(nix::unistd::getuid())
            .ok()
            .flatten()
            .map_or_else(String::new, |u| format!("{} ", u.name));
        eprintln!(
            "keyholder: no keys available to you ({who}uid {}): your groups grant none of the \
             configured keys, or none of yours is armed (see `keyholder status`)",
            nix::unistd::getuid()
        );
        return Ok(1);
    }
    let widths = [0, 1, 2].map(|i| {
        rows.iter()
            .map(|r| r.get(i).map_or(0, String::len))
            .max()
            .unwrap_or(0)
    });
    for row in &rows {
        let [name, fingerprint, algorithm, path] = row;
        let [w0, w1, w2] = widths;
        say!("{name:<w0$}  {fingerprint:<w1$}  {algorithm:<w2$}  {path}");
    }
    Ok(0)
}

/// The keys with grants that the caller's groups name but the daemon did
/// not list: they need a grant (a hint only; the daemon decides). The
/// groups are this process's (as a login gets them from the user
/// database).
fn needs_grant(config: Option<&crate::config::Config>, ids: &[Identity]) -> Vec<String> {
    let Some(config) = config else {
        return Vec::new();
    };
    let mine: Vec<String> = nix::unistd::getgroups()
        .unwrap_or_default()
        .into_iter()
        .chain(std::iter::once(nix::unistd::getgid()))
        .filter_map(|g| nix::unistd::Group::from_gid(g).ok().flatten())
        .map(|g| g.name)
        .collect();
    config
        .keys
        .iter()
        .filter(|k| k.grants.is_some())
        .filter(|k| k.groups.iter().any(|g| mine.contains(g)))
        .filter(|k| {
            !ids.iter()
                .any(|id| id.credential.key_data() == &k.public_key)
        })
        .map(|k| k.name.clone())
        .collect()
}

/// One row per identity: name, fingerprint, algorithm, public key path;
/// configured keys first, in configuration order.
fn rows(config: Option<&crate::config::Config>, ids: &[Identity]) -> Vec<[String; 4]> {
    let mut rows = Vec::new();
    let mut matched = vec![false; ids.len()];
    if let Some(config) = config {
        for key in &config.keys {
            // The key, and the caller's certificate for it when one is
            // listed (a certificate counts as its key).
            let mut plain = false;
            let mut cert = None;
            for (id, m) in ids.iter().zip(matched.iter_mut()) {
                if id.credential.key_data() != &key.public_key {
                    continue;
                }
                *m = true;
                match &id.credential {
                    PublicCredential::Cert(c) => cert = cert.or(Some(c)),
                    PublicCredential::Key(_) => plain = true,
                }
            }
            if !plain && cert.is_none() {
                continue;
            }
            let path = match &key.source {
                PublicKeySource::File(p) => p.display().to_string(),
                PublicKeySource::Inline => "(inline)".to_owned(),
            };
            rows.push([
                key.name.clone(),
                key.fingerprint.clone(),
                algorithm(&key.public_key),
                path,
            ]);
            if let Some(c) = cert {
                rows.push([
                    key.name.clone(),
                    key.fingerprint.clone(),
                    format!("{}-CERT", algorithm(&key.public_key)),
                    format!(
                        "certificate {:?}, serial {}, for {} (`keyholder cert {}`)",
                        c.key_id(),
                        c.serial(),
                        c.valid_principals().join(","),
                        key.name
                    ),
                ]);
            }
        }
    }
    for (id, seen) in ids.iter().zip(matched) {
        if !seen {
            let key = id.credential.key_data();
            rows.push([
                "?".to_owned(),
                key.fingerprint(HashAlg::Sha256).to_string(),
                algorithm(key),
                format!("(not in this configuration; comment {:?})", id.comment),
            ]);
        }
    }
    rows
}

/// The algorithm as `ssh-add -l` shows it.
fn algorithm(key: &KeyData) -> String {
    match key.algorithm() {
        Algorithm::Ed25519 => "ED25519".to_owned(),
        Algorithm::Rsa { .. } => "RSA".to_owned(),
        Algorithm::Ecdsa { .. } => "ECDSA".to_owned(),
        Algorithm::Dsa => "DSA".to_owned(),
        Algorithm::SkEcdsaSha2NistP256 => "ECDSA-SK".to_owned(),
        Algorithm::SkEd25519 => "ED25519-SK".to_owned(),
        other => other.as_str().to_uppercase(),
    }
}
