//! `keyholder check-config`: loads the configuration exactly as the daemon
//! would (an error there is the command's one-line error, exit 1), then
//! checks what `arm` will need, key by key:
//! - `key_dir/NAME` exists, is a regular file owned by root, and neither
//!   group nor others have any permission on it;
//! - the public key embedded in it (OpenSSH private key files carry it in
//!   cleartext) is the configured one;
//! - it is encrypted, when `require_encrypted = true`.
//!
//! Findings are errors (exit 1), warnings (exit 0: `key_dir` writable by
//! group or others or not owned by root; `NAME.pub` not world-readable; a
//! missing private key with `agent.spawn = false`, where the agent may get
//! the key another way), or notes. Run by a user who can read the
//! configuration but not the private keys (they are root's), the contents
//! checks cannot be made: that is a note, not an error; type, owner and mode
//! are still checked, since `stat` needs no read permission.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::keyfile::{self, ReadError};
use crate::config::{CertMode, Config, KeyConfig, PublicKeySource};
use crate::error::Result;

/// What was found; messages wait in `pending` until [`Findings::flush`],
/// so that they follow the description of what they are about.
#[derive(Debug, Default)]
struct Findings {
    errors: usize,
    warnings: usize,
    pending: Vec<String>,
}

impl Findings {
    fn error(&mut self, message: String) {
        self.errors += 1;
        self.pending.push(format!("error: {message}"));
    }

    fn warning(&mut self, message: String) {
        self.warnings += 1;
        self.pending.push(format!("warning: {message}"));
    }

    fn note(&mut self, message: String) {
        self.pending.push(format!("note: {message}"));
    }

    fn flush(&mut self) {
        for line in self.pending.drain(..) {
            say!("{line}");
        }
    }
}

/// Validates the configuration and key files. Exit 0, or 1 with the errors.
pub fn run(path: &Path) -> Result<u8> {
    let config = Config::load(path)?;
    let mut found = Findings::default();
    say!(
        "{}: loaded: {} key(s); proxy socket {}; upstream agent {} ({}); require_encrypted = {}",
        path.display(),
        config.keys.len(),
        config.socket.display(),
        config.agent.socket.display(),
        match (config.agent.backend, config.agent.spawn) {
            (crate::config::BackendKind::Builtin, _) =>
                "backend = \"builtin\": served by the daemon, which holds the keys itself",
            (crate::config::BackendKind::OpenBao, _) =>
                "backend = \"openbao\": served by the daemon; the keys are transit keys of the cluster",
            (crate::config::BackendKind::Pkcs11, _) =>
                "backend = \"pkcs11\": served by the daemon; the keys stay on the token",
            (_, true) => "spawned by the daemon",
            (_, false) => "run by someone else",
        },
        config.require_encrypted
    );
    check_key_dir(&config, &mut found);
    if config.keys.is_empty() {
        found.warning(format!(
            "{}: no [keys.NAME] configured: the daemon will serve no keys",
            path.display()
        ));
    }
    found.flush();
    let root = nix::unistd::geteuid().is_root();
    for key in &config.keys {
        let public = match &key.source {
            PublicKeySource::Inline => format!("keys.{}.public_key", key.name),
            PublicKeySource::File(p) => p.display().to_string(),
        };
        say!(
            "{}: {} groups={} allow_any_data={}",
            key.name,
            key.fingerprint,
            key.groups.join(","),
            key.allow_any_data,
        );
        say!("  public key: {public}");
        check_rules(key, &mut found);
        if key.cert.mode != CertMode::Off {
            let c = &key.cert;
            say!(
                "  certificate={} principals={} extensions={}{}{}",
                c.mode.name(),
                c.principals.join(","),
                if c.extensions.is_empty() {
                    "(none)".to_owned()
                } else {
                    c.extensions.join(",")
                },
                c.force_command
                    .as_ref()
                    .map_or_else(String::new, |f| format!(" force_command={f:?}")),
                if c.source_address.is_empty() {
                    String::new()
                } else {
                    format!(" source_address={}", c.source_address.join(","))
                }
            );
        }
        if let Some(g) = &key.grants {
            say!(
                "  grants: approvals={}{} approvers={} max_secs={} pending_secs={}{}",
                g.approvals,
                if g.approvals == 0 {
                    " (break-glass)"
                } else {
                    ""
                },
                if g.approvers.is_empty() {
                    "(root only)".to_owned()
                } else {
                    g.approvers.join(",")
                },
                g.max_secs,
                g.pending_secs,
                g.notify
                    .as_ref()
                    .map_or_else(String::new, |n| format!(" notify={}", n.display()))
            );
            if let (Some(c), true) = (&config.certificates, key.cert.mode != CertMode::Off) {
                if c.validity_secs > 600 {
                    found.warning(format!(
                        "keys.{}: has grants and certificates valid for {} s: a certificate \
                         handed out before a revoke stays valid at targets that long (keep \
                         [certificates] validity_secs short, e.g. 300)",
                        key.name, c.validity_secs
                    ));
                }
            }
        }
        if config.agent.backend == crate::config::BackendKind::OpenBao {
            let mount = config
                .openbao
                .as_deref()
                .map_or("transit", |o| o.transit_mount.as_str());
            say!(
                "  transit key: {mount}/keys/{} (its version equal to the public key is pinned \
                 when the daemon logs in; `keyholder status` names a mismatch)",
                key.transit_key.as_deref().unwrap_or(&key.name)
            );
            found.flush();
            continue;
        }
        if let Some(p) = config.pkcs11.as_deref() {
            say!(
                "  on the token: {}",
                super::token::describe_object(&p.object(&key.name))
            );
            found.flush();
            continue;
        }
        let state = check_key(
            &config,
            key,
            &format!("keys.{}", key.name),
            root,
            &mut found,
        );
        say!(
            "  private key: {} ({state})",
            key.private_key_path.display()
        );
        found.flush();
    }
    if let Some(p) = config.pkcs11.as_deref() {
        super::token::check(&config, p, root, &mut |kind, message| match kind {
            super::token::Finding::Error => found.error(message),
            super::token::Finding::Warning => found.warning(message),
            super::token::Finding::Note => found.note(message),
        });
        found.flush();
    }
    if let Some(o) = config.openbao.as_deref() {
        say!(
            "openbao: {} auth={} transit_mount={} ssh_mount={}{}",
            o.addresses.join(", "),
            o.auth.name(),
            o.transit_mount,
            o.ssh_mount,
            o.namespace
                .as_ref()
                .map_or_else(String::new, |n| format!(" namespace={n}"))
        );
        // The files the daemon reads through the trust check at start.
        let files = [
            ("ca_file", o.ca_file.as_deref(), false),
            ("client_cert", o.client_cert.as_deref(), false),
            ("client_key", o.client_key.as_deref(), true),
            ("token_file", o.token_file.as_deref(), true),
        ];
        for (field, path, secret) in files {
            let Some(path) = path else { continue };
            let checked = if secret {
                crate::trust::read_secret(path).map(|_| ())
            } else {
                crate::trust::read_text(path).map(|_| ())
            };
            match checked {
                Ok(()) => say!("  {field}: {} (ok)", path.display()),
                Err(e) if e.is_permission_denied() && !root => found.note(format!(
                    "openbao.{field} {}: not checked (only root may read it)",
                    path.display()
                )),
                // An agent's sink may not exist before the agent runs.
                Err(e) if field == "token_file" && e.is_not_found() => found.warning(format!(
                    "openbao.token_file {}: {e} (the agent has not written it yet?)",
                    path.display()
                )),
                Err(e) => found.error(format!("openbao.{field} {}: {e}", path.display())),
            }
        }
        found.flush();
    }
    if let Some(c) = &config.certificates {
        say!(
            "certificates: CA {} {} validity_secs={} backdate_secs={} key_id={:?}",
            c.ca.name,
            c.ca.fingerprint,
            c.validity_secs,
            c.backdate_secs,
            c.key_id
        );
        if let PublicKeySource::File(p) = &c.ca.source {
            say!(
                "  public key: {} (targets trust it: `keyholder ca`)",
                p.display()
            );
        }
        if let Some(role) = &c.openbao_role {
            say!(
                "  signed by the cluster's SSH engine, role {role} (its CA key pinned in the file above)"
            );
        } else {
            let state = check_key(&config, &c.ca, "certificates.ca", root, &mut found);
            say!(
                "  private key: {} ({state}; armed by `keyholder arm` with the keys)",
                c.ca.private_key_path.display()
            );
        }
        if !config.keys.iter().any(|k| k.cert.mode != CertMode::Off) {
            found.note(
                "[certificates] is set, but no key has certificate = \"also\" or \"only\""
                    .to_owned(),
            );
        }
        found.flush();
    }
    if found.errors == 0 {
        say!(
            "check-config: OK ({} key(s), {} warning(s))",
            config.keys.len(),
            found.warnings
        );
        Ok(0)
    } else {
        say!(
            "check-config: {} error(s), {} warning(s)",
            found.errors,
            found.warnings
        );
        Ok(1)
    }
}

/// The key's destination rules: the destinations file was read and parsed
/// by `Config::load` (type, owner, mode, every line); say what it holds.
fn check_rules(key: &KeyConfig, found: &mut Findings) {
    match key.destinations.as_ref().map(|d| (d, &d.hosts)) {
        None => {}
        Some((dest, None)) => {
            say!("  destinations: {}", dest.path.display());
            found.note(format!(
                "keys.{}.destinations: {}: this user may not read it; run as root to check it",
                key.name,
                dest.path.display()
            ));
        }
        Some((dest, Some(known))) => {
            let (hosts, cas, revoked) = known.counts();
            say!(
                "  destinations: {}: {hosts} host key(s), {cas} CA(s){}",
                dest.path.display(),
                if revoked > 0 {
                    format!(", {revoked} revoked")
                } else {
                    String::new()
                }
            );
            if hosts == 0 && cas == 0 {
                found.warning(format!(
                    "keys.{}.destinations: {} lists no host key and no CA: the key signs for no \
                     destination",
                    key.name,
                    dest.path.display()
                ));
            }
        }
    }
    if let Some(users) = &key.remote_users {
        say!("  remote_users: {}", users.join(","));
    }
    say!("  allow_forwarding: {}", key.allow_forwarding);
}

fn check_key_dir(config: &Config, found: &mut Findings) {
    let dir = config.key_dir.display();
    match crate::trust::check_dir(&config.key_dir) {
        Ok(()) => {}
        Err(e) if e.is_not_found() && config.keys.is_empty() => {
            found.note(format!("key_dir {dir}: {e}"));
        }
        Err(e) => found.error(format!("key_dir {dir}: {e}")),
    }
}

/// Checks one key's files; returns a word on the private key's state.
fn check_key(
    config: &Config,
    key: &KeyConfig,
    name: &str,
    root: bool,
    found: &mut Findings,
) -> String {
    if let PublicKeySource::File(public) = &key.source {
        if let Ok(meta) = std::fs::metadata(public) {
            if meta.mode() & 0o004 == 0 {
                found.warning(format!(
                    "{name}: {} is not world-readable (mode {:04o}): deployers cannot select \
                     the key with `ssh -i {0} -o IdentitiesOnly=yes`",
                    public.display(),
                    meta.mode() & 0o7777
                ));
            }
        }
    }

    let path = &key.private_key_path;
    let file = path.display();
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !config.agent.spawn => {
            found.warning(format!(
                "{name}: private key {file} does not exist: `keyholder arm` cannot load it \
                 (fine if the upstream agent gets the key another way)"
            ));
            return "missing".to_owned();
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            found.error(format!(
                "{name}: private key {file} does not exist (`keyholder arm` loads it from there)"
            ));
            return "missing".to_owned();
        }
        Err(e) => {
            found.error(format!("{name}: private key {file}: {e}"));
            return "not inspected".to_owned();
        }
    };
    let problems = keyfile::problems(path, &meta);
    let bad_type = !meta.file_type().is_file();
    for p in problems {
        found.error(format!("{name}: {p}"));
    }
    if bad_type {
        return "not a regular file".to_owned();
    }

    let text = match keyfile::read(path) {
        Ok((_, text)) => text,
        Err(ReadError::Denied(e)) if !root => {
            found.note(format!(
                "{name}: {file}: not readable as uid {} ({e}): whether it holds the \
                 configured key and is encrypted was not checked (run check-config as root)",
                nix::unistd::geteuid()
            ));
            return "contents not checked".to_owned();
        }
        Err(e) => {
            found.error(format!("{name}: {e}"));
            return "unreadable".to_owned();
        }
    };
    let private = match keyfile::parse(key, path, &text) {
        Ok(p) => p,
        Err(e) => {
            found.error(format!("{name}: {e}"));
            return "invalid".to_owned();
        }
    };
    if private.is_encrypted() {
        "encrypted".to_owned()
    } else if config.require_encrypted {
        found.error(format!(
            "{name}: {file} is not encrypted, but require_encrypted = true \
             (set a passphrase with: ssh-keygen -p -f {file})"
        ));
        "NOT encrypted".to_owned()
    } else {
        found.note(format!(
            "{name}: {file} is not encrypted (allowed by require_encrypted = false)"
        ));
        "not encrypted".to_owned()
    }
}
