//! `keyholder arm` and `keyholder disarm` for a backend the daemon unlocks
//! with one secret ([`Arming::Secret`](crate::config::arming::Arming):
//! a PKCS#11 token's user PIN, an OpenBao AppRole secret id or token), as
//! the configuration describes it:
//! 1. the secret is read from its option's file (e.g. `--pin-file`), else
//!    `$CREDENTIALS_DIRECTORY/CREDENTIAL` (systemd credentials), else the
//!    terminal (a backend that needs none gets an empty one);
//! 2. it is sent to the daemon on `agent.socket`, whose peer must be root:
//!    SSH_AGENTC_ADD_SMARTCARD_KEY with the configured id (what `ssh-add -s
//!    ID` sends), or the vendor extension `unlock@keyholder`;
//! 3. each configured key is reported armed or not from the daemon's own
//!    listing on that socket, with the reason the daemon gives
//!    (`status@keyholder` notes on the proxy socket).
//!
//! `disarm` undoes it: SSH_AGENTC_REMOVE_SMARTCARD_KEY (the daemon logs out
//! and forgets the PIN), or REMOVE_ALL_IDENTITIES ([`super::disarm`]).
//!
//! The secret is read through the trust check for secrets into zeroizing
//! memory, sent once (a secret the daemon refuses is never sent again by
//! this command: tokens lock after a few tries) and never printed, logged,
//! or passed through argv or the environment.

use std::path::Path;

use ssh_agent_lib::proto::{Extension, Request, Response, SmartcardKey};
use ssh_agent_lib::secrecy::SecretString;
use ssh_encoding::Encode;
use zeroize::Zeroizing;

use super::client::{describe, AgentClient};
use super::passphrase::{read_file, Tty};
use crate::backend::admin::UNLOCK_EXTENSION;
use crate::config::arming::{Secret, Unlock};
use crate::config::Config;
use crate::error::{Error, Result};

/// Reads the secret, unlocks the daemon's backend, reports each key. Exit
/// 0 when every configured key is armed, 1 otherwise.
pub fn arm(config: &Config, secret: &Secret, file: Option<&Path>) -> Result<u8> {
    let value: Zeroizing<Vec<u8>> = match &secret.prompt {
        None => Zeroizing::new(Vec::new()),
        Some(prompt) => read_secret(secret, file, prompt)?,
    };
    let socket = config.agent.socket.display();
    let (mut request, mut client) = match &secret.send {
        Unlock::Smartcard { id } => {
            let text = std::str::from_utf8(&value).map_err(|_| {
                Error::msg(format!(
                    "the {} is not UTF-8 text: nothing sent",
                    secret.what
                ))
            })?;
            let request = Request::AddSmartcardKey(SmartcardKey {
                id: id.clone(),
                pin: SecretString::from(text.to_owned()),
            });
            drop(value);
            (request, super::arm::connect(config)?)
        }
        Unlock::Extension => {
            let client = connect(config, secret.what)?;
            let mut details = Zeroizing::new(Vec::with_capacity(value.len() + 4));
            value
                .as_slice()
                .encode(&mut *details)
                .map_err(|e| Error::msg(format!("encoding the {}: {e}", secret.what)))?;
            drop(value);
            let request = Request::Extension(Extension {
                name: UNLOCK_EXTENSION.to_owned(),
                details: details.to_vec().into(),
            });
            (request, client)
        }
    };
    let answer = client.call(&request);
    if let Request::Extension(ext) = &mut request {
        // Wipe the copy the request held (a PIN wipes itself on drop).
        let bytes = std::mem::replace(&mut ext.details, Vec::new().into()).into_bytes();
        drop(Zeroizing::new(bytes));
    }
    drop(request);
    match (&secret.send, answer) {
        (_, Ok(Response::Success)) => {}
        (Unlock::Smartcard { .. }, Ok(other)) => {
            say!(
                "FAILED: the daemon answered {} to the PIN: it could not log in to the token \
                 (its log says why: wrong PIN with the token's retry state, token not present); \
                 the PIN is not sent again",
                describe(&other)
            );
            for note in daemon_notes(config) {
                say!("  {note}");
            }
            return Ok(1);
        }
        (Unlock::Extension, Ok(Response::Failure)) => {
            let notes = daemon_notes(config);
            say!(
                "FAILED: the daemon could not log in with this {}{}",
                secret.what,
                notes.first().map_or_else(
                    || " (the reason is in its log)".to_owned(),
                    |n| format!(": {n}")
                )
            );
            return Ok(1);
        }
        (Unlock::Extension, Ok(other)) => {
            return Err(Error::msg(format!(
                "{socket} answered {} to {UNLOCK_EXTENSION}",
                describe(&other)
            )))
        }
        (Unlock::Smartcard { .. }, Err(e)) => {
            return Err(Error::msg(format!("agent.socket {socket}: {e}")))
        }
        (Unlock::Extension, Err(e)) => return Err(Error::msg(format!("{socket}: {e}"))),
    }
    let held = match client.call(&Request::RequestIdentities) {
        Ok(Response::IdentitiesAnswer(ids)) => ids
            .into_iter()
            .map(|i| i.credential.key_data().clone())
            .collect::<Vec<_>>(),
        Ok(other) => {
            return Err(Error::msg(format!(
                "agent.socket {socket} answered {} to a request for its identities",
                describe(&other)
            )))
        }
        Err(e) => return Err(Error::msg(format!("agent.socket {socket}: {e}"))),
    };
    report(config, secret, &held)
}

/// One line per configured key (armed, or FAILED with the daemon's reason)
/// and the summary.
fn report(config: &Config, secret: &Secret, held: &[ssh_key::public::KeyData]) -> Result<u8> {
    let (unexplained, summary) = match secret.send {
        Unlock::Smartcard { .. } => (
            "no matching private key on the token (the daemon's log says why)",
            "logged in; ",
        ),
        Unlock::Extension => ("not armed (`keyholder status` says why)", ""),
    };
    let notes = daemon_notes(config);
    let mut failed = Vec::new();
    for key in &config.keys {
        // The daemon names a key at the start of a note: `NAME: why` or
        // `key NAME: why`.
        let prefix = format!("{}: ", key.name);
        let about = |note: &String| -> Option<String> {
            note.strip_prefix(&prefix)
                .or_else(|| {
                    note.strip_prefix("key ")
                        .and_then(|rest| rest.strip_prefix(&prefix))
                })
                .map(str::to_owned)
        };
        if held.contains(&key.public_key) {
            say!("{}: armed ({})", key.name, key.fingerprint);
            for warning in notes.iter().filter_map(about) {
                say!("{}: {warning}", key.name);
            }
        } else {
            let why = notes
                .iter()
                .find_map(about)
                .unwrap_or_else(|| unexplained.to_owned());
            say!("{}: FAILED: {why}", key.name);
            failed.push(key.name.as_str());
        }
    }
    let total = config.keys.len();
    if failed.is_empty() {
        say!("{summary}all {total} key(s) armed");
        Ok(0)
    } else {
        say!(
            "{summary}{}/{total} key(s) armed; not armed: {}",
            total - failed.len(),
            failed.join(", ")
        );
        Ok(1)
    }
}

/// Asks the daemon to log out of the token and forget the PIN
/// (SSH_AGENTC_REMOVE_SMARTCARD_KEY with the reader `id`).
pub fn disarm_smartcard(config: &Config, id: &str) -> Result<u8> {
    let mut client = super::arm::connect(config)?;
    let socket = config.agent.socket.display();
    let request = Request::RemoveSmartcardKey(SmartcardKey {
        id: id.to_owned(),
        pin: SecretString::from(String::new()),
    });
    match client.call(&request) {
        Ok(Response::Success) => {
            say!("disarmed: the daemon logged out of the token and forgot the PIN");
            Ok(0)
        }
        Ok(other) => Err(Error::msg(format!(
            "the daemon at {socket} answered {} to logging out of the token",
            describe(&other)
        ))),
        Err(e) => Err(Error::msg(format!("agent.socket {socket}: {e}"))),
    }
}

/// Connects to `agent.socket`, which must be served by root: the `what`
/// is never sent to a socket someone else listens on.
fn connect(config: &Config, what: &str) -> Result<AgentClient> {
    let socket = config.agent.socket.display();
    let client = AgentClient::connect(&config.agent.socket, config.limits.upstream_timeout)
        .map_err(|e| {
            Error::msg(format!(
                "agent.socket unreachable at {socket}: {e} (is `keyholder daemon` running?)"
            ))
        })?;
    match client.peer() {
        Ok((0, _)) => Ok(client),
        Ok((uid, _)) => Err(Error::msg(format!(
            "{socket} is served by uid {uid}, not root; refusing to send it the {what}"
        ))),
        Err(e) => Err(Error::msg(format!(
            "cannot tell who listens on {socket}: {e}; refusing to send it the {what}"
        ))),
    }
}

/// What the daemon says is wrong (`status@keyholder` format 3 on the proxy
/// socket, asked as root); empty when it cannot be asked.
fn daemon_notes(config: &Config) -> Vec<String> {
    use crate::protocol::status::{self, Answer};
    use ssh_encoding::Decode;
    let Ok(mut client) = AgentClient::connect(&config.socket, config.limits.upstream_timeout)
    else {
        return Vec::new();
    };
    let request = Request::Extension(Extension {
        name: status::NAME.to_owned(),
        details: status::notes_request().into(),
    });
    match client.call(&request) {
        Ok(Response::ExtensionResponse(ext)) if ext.name == status::NAME => {
            let mut reader = ext.details.as_ref();
            Answer::decode(&mut reader)
                .ok()
                .and_then(|a| a.notes)
                .unwrap_or_default()
        }
        _ => Vec::new(),
    }
}

/// The secret: the first line of `file`, else of the systemd credential,
/// else typed on the terminal. Never empty.
fn read_secret(secret: &Secret, file: Option<&Path>, prompt: &str) -> Result<Zeroizing<Vec<u8>>> {
    let from_file = |path: &Path| -> Result<Zeroizing<Vec<u8>>> {
        let line = read_file(path)
            .map_err(|e| Error::msg(e.to_string().replacen("passphrase file", secret.file, 1)))?;
        Ok(Zeroizing::new(line.as_ref().to_vec()))
    };
    let value = if let Some(path) = file {
        from_file(path)?
    } else if let Some(path) = std::env::var_os("CREDENTIALS_DIRECTORY")
        .map(|d| Path::new(&d).join(secret.credential))
        .filter(|p| p.exists())
    {
        from_file(&path)?
    } else {
        let tty = Tty::open().map_err(|e| {
            Error::msg(format!(
                "no {} source: no terminal (/dev/tty: {e}), no {}, and no \
                 $CREDENTIALS_DIRECTORY/{}",
                secret.what, secret.flag, secret.credential
            ))
        })?;
        let typed = tty.prompt(prompt)?;
        Zeroizing::new(typed.as_ref().to_vec())
    };
    if value.is_empty() {
        return Err(Error::msg(match secret.send {
            Unlock::Smartcard { .. } => format!("empty {}: nothing sent", secret.what),
            Unlock::Extension => format!("empty {}: nothing to arm with", secret.what),
        }));
    }
    Ok(value)
}
