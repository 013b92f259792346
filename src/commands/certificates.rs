//! `keyholder ca` and `keyholder cert NAME`, for anyone.
//!
//! - `ca` prints the certificate CA's public key line, for targets'
//!   `TrustedUserCAKeys` (from the configuration: `key_dir/CA.pub`).
//! - `cert NAME` prints the caller's current certificate for key NAME, as
//!   the daemon lists it to this user over the proxy socket (minting it if
//!   need be): a `CertificateFile` for tools that pin one identity with
//!   `-i key_dir/NAME.pub -o IdentitiesOnly=yes`.
//!
//! Neither ever touches a private key or the upstream agent.

use std::path::Path;

use ssh_agent_lib::proto::PublicCredential;
use ssh_key::PublicKey;

use super::client::daemon_identities;
use crate::config::{CertMode, Config};
use crate::error::{Error, Result};

/// Added to the daemon's upstream timeout for `cert`'s deadline (a listing
/// may mint, which is one upstream signature).
const MARGIN: std::time::Duration = std::time::Duration::from_secs(5);

/// Prints the CA public key line; exit 1 when no CA is configured.
pub fn run_ca(config_path: &Path) -> Result<u8> {
    let config = Config::load(config_path)?;
    let Some(c) = &config.certificates else {
        return Err(Error::msg(format!(
            "{}: no certificate CA configured (add a [certificates] section with ca = \"NAME\")",
            config.path.display()
        )));
    };
    let line = PublicKey::new(
        c.ca.public_key.clone(),
        format!("keyholder-ca:{}", c.ca.name),
    )
    .to_openssh()
    .map_err(|e| Error::msg(format!("cannot encode the CA public key: {e}")))?;
    say!("{line}");
    Ok(0)
}

/// Prints the caller's current certificate for key `name`; exit 1 with the
/// reason when there is none.
pub fn run_cert(config_path: &Path, name: &str) -> Result<u8> {
    let config = Config::load(config_path)?;
    let file = config.path.display();
    let Some(key) = config.key(name) else {
        return Err(Error::msg(format!("{file}: no key named {name:?}")));
    };
    if key.cert.mode == CertMode::Off {
        return Err(Error::msg(format!(
            "{file}: keys.{name} has no certificates (certificate = \"off\")"
        )));
    }
    let timeout = config.limits.upstream_timeout + MARGIN;
    let ids = daemon_identities(&config.socket, timeout)?;
    let cert = ids.iter().find_map(|id| match &id.credential {
        PublicCredential::Cert(c) if c.public_key() == &key.public_key => Some(c),
        _ => None,
    });
    if let Some(cert) = cert {
        let line = cert
            .to_openssh()
            .map_err(|e| Error::msg(format!("cannot encode the certificate: {e}")))?;
        say!("{line}");
        return Ok(0);
    }
    let listed_plain = ids
        .iter()
        .any(|id| id.credential.key_data() == &key.public_key);
    let why = if listed_plain {
        "the daemon listed the key without a certificate: the CA is not armed, or it could \
         not mint one for you (see `keyholder status` and the daemon's log)"
    } else {
        "the daemon lists no such key to you: your groups do not allow it, or it (or the CA) \
         is not armed (see `keyholder list` and `keyholder status`)"
    };
    eprintln!("keyholder: no certificate for {name}: {why}");
    Ok(1)
}
