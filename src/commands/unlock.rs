//! `keyholder arm` for a backend that holds its keys outside the daemon and
//! is unlocked with one secret (`backend = "openbao"`: an AppRole secret id
//! or a token; nothing at all for certificate or agent logins): the secret
//! is read from `--secret-file`, `$CREDENTIALS_DIRECTORY/CREDENTIAL` or the
//! terminal and handed to the daemon on `agent.socket` with the vendor
//! extension `unlock@keyholder`; then each configured key is reported armed
//! or not from the daemon's own listing on that socket.
//!
//! The secret is read into zeroizing memory and sent only to a socket whose
//! peer is root; it is never printed, logged, or passed through argv or the
//! environment.

use std::path::Path;

use ssh_agent_lib::proto::{Extension, Request, Response};
use ssh_encoding::Encode;
use zeroize::Zeroizing;

use super::client::{describe, AgentClient};
use super::passphrase::{read_file, Tty};
use crate::config::Config;
use crate::error::{Error, Result};

/// The extension's name (served by the daemon's `agent.socket`).
pub const UNLOCK_EXTENSION: &str = "unlock@keyholder";

/// What to ask for and where a systemd credential would be.
pub struct Ask<'a> {
    /// The credential name under `$CREDENTIALS_DIRECTORY`.
    pub credential: &'a str,
    /// The terminal prompt (None: the backend needs no secret).
    pub prompt: Option<&'a str>,
    /// The secret's name in messages ("secret id").
    pub what: &'a str,
}

/// Reads the secret, unlocks the daemon's backend, reports each key.
pub fn run(config: &Config, secret_file: Option<&Path>, ask: &Ask<'_>) -> Result<u8> {
    let secret: Zeroizing<Vec<u8>> = match ask.prompt {
        None => Zeroizing::new(Vec::new()),
        Some(prompt) => read_secret(secret_file, ask, prompt)?,
    };
    let socket = config.agent.socket.display();
    let mut client = AgentClient::connect(&config.agent.socket, config.limits.upstream_timeout)
        .map_err(|e| {
            Error::msg(format!(
                "agent.socket unreachable at {socket}: {e} (is `keyholder daemon` running?)"
            ))
        })?;
    match client.peer() {
        Ok((0, _)) => {}
        Ok((uid, _)) => {
            return Err(Error::msg(format!(
                "{socket} is served by uid {uid}, not root; refusing to send it the {}",
                ask.what
            )))
        }
        Err(e) => {
            return Err(Error::msg(format!(
                "cannot tell who listens on {socket}: {e}; refusing to send it the {}",
                ask.what
            )))
        }
    }
    let mut details = Zeroizing::new(Vec::with_capacity(secret.len() + 4));
    secret
        .as_slice()
        .encode(&mut *details)
        .map_err(|e| Error::msg(format!("encoding the {}: {e}", ask.what)))?;
    let mut request = Request::Extension(Extension {
        name: UNLOCK_EXTENSION.to_owned(),
        details: details.to_vec().into(),
    });
    let answer = client.call(&request);
    if let Request::Extension(ext) = &mut request {
        // Wipe the copy the request held.
        let bytes = std::mem::replace(&mut ext.details, Vec::new().into()).into_bytes();
        drop(Zeroizing::new(bytes));
    }
    match answer {
        Ok(Response::Success) => {}
        Ok(Response::Failure) => {
            let notes = super::token::daemon_notes(config);
            say!(
                "FAILED: the daemon could not log in with this {}{}",
                ask.what,
                notes.first().map_or_else(
                    || " (the reason is in its log)".to_owned(),
                    |n| format!(": {n}")
                )
            );
            return Ok(1);
        }
        Ok(other) => {
            return Err(Error::msg(format!(
                "{socket} answered {} to {UNLOCK_EXTENSION}",
                describe(&other)
            )))
        }
        Err(e) => return Err(Error::msg(format!("{socket}: {e}"))),
    }
    let listed = match client.call(&Request::RequestIdentities) {
        Ok(Response::IdentitiesAnswer(ids)) => ids
            .into_iter()
            .map(|id| id.credential.key_data().clone())
            .collect::<Vec<_>>(),
        Ok(other) => {
            return Err(Error::msg(format!(
                "{socket} answered {} to a list request",
                describe(&other)
            )))
        }
        Err(e) => return Err(Error::msg(format!("{socket}: {e}"))),
    };
    let mut failed = Vec::new();
    let mut notes: Option<Vec<String>> = None;
    for key in &config.keys {
        if listed.contains(&key.public_key) {
            say!("{}: armed ({})", key.name, key.fingerprint);
        } else {
            let notes = notes.get_or_insert_with(|| super::token::daemon_notes(config));
            let prefix = format!("key {}: ", key.name);
            let why = notes
                .iter()
                .find_map(|n| n.split_once(&prefix).map(|(_, why)| why.to_owned()))
                .unwrap_or_else(|| "not armed (`keyholder status` says why)".to_owned());
            say!("{}: FAILED: {why}", key.name);
            failed.push(key.name.as_str());
        }
    }
    let total = config.keys.len();
    if failed.is_empty() {
        say!("all {total} key(s) armed");
        Ok(0)
    } else {
        say!(
            "{}/{total} key(s) armed; not armed: {}",
            total - failed.len(),
            failed.join(", ")
        );
        Ok(1)
    }
}

fn read_secret(
    secret_file: Option<&Path>,
    ask: &Ask<'_>,
    prompt: &str,
) -> Result<Zeroizing<Vec<u8>>> {
    let from_file = |path: &Path| -> Result<Zeroizing<Vec<u8>>> {
        let p = read_file(path)
            .map_err(|e| Error::msg(e.to_string().replacen("passphrase file", "secret file", 1)))?;
        Ok(Zeroizing::new(p.as_ref().to_vec()))
    };
    let secret = if let Some(path) = secret_file {
        from_file(path)?
    } else if let Some(path) = std::env::var_os("CREDENTIALS_DIRECTORY")
        .map(|d| Path::new(&d).join(ask.credential))
        .filter(|p| p.exists())
    {
        from_file(&path)?
    } else {
        let tty = Tty::open().map_err(|e| {
            Error::msg(format!(
                "no {} source: no terminal (/dev/tty: {e}), no --secret-file, and no \
                 $CREDENTIALS_DIRECTORY/{}",
                ask.what, ask.credential
            ))
        })?;
        let p = tty.prompt(prompt)?;
        Zeroizing::new(p.as_ref().to_vec())
    };
    if secret.is_empty() {
        return Err(Error::msg(format!(
            "empty {}: nothing to arm with",
            ask.what
        )));
    }
    Ok(secret)
}
