//! `keyholder arm` and `keyholder disarm` for a backend whose keys stay on
//! a PKCS#11 token (`[agent] backend = "pkcs11"`): arming hands the daemon
//! the token's user PIN (SSH_AGENTC_ADD_SMARTCARD_KEY on `agent.socket`,
//! with the configured module's path as its id, exactly what `ssh-add -s
//! MODULE` sends); disarming asks it to log out and forget the PIN
//! (SSH_AGENTC_REMOVE_SMARTCARD_KEY, as `ssh-add -e MODULE`). Root only.
//!
//! The PIN comes from `--pin-file`, else `$CREDENTIALS_DIRECTORY/keyholder-pin`
//! (systemd credentials), else the terminal; it is read through the trust
//! check for secrets, held in zeroizing memory, sent once (a PIN the token
//! refuses is never sent again by this command: tokens lock after a few
//! tries) and never printed.

use std::path::Path;

use ssh_agent_lib::proto::{Request, Response, SmartcardKey};
use ssh_agent_lib::secrecy::SecretString;
use zeroize::Zeroizing;

use super::client::describe;
use super::passphrase::Tty;
use crate::config::pkcs11::{ObjectSelector, Pkcs11Config, TokenSelector};
use crate::config::Config;
use crate::error::{Error, Result};

/// The credential name under `$CREDENTIALS_DIRECTORY`.
pub const CREDENTIAL: &str = "keyholder-pin";

/// Reads the PIN: the first line of a secret file, or the terminal.
fn read_pin(config: &Config, pin_file: Option<&Path>) -> Result<Zeroizing<Vec<u8>>> {
    let file = match pin_file {
        Some(path) => Some(path.to_owned()),
        None => std::env::var_os("CREDENTIALS_DIRECTORY")
            .map(|dir| Path::new(&dir).join(CREDENTIAL))
            .filter(|p| p.exists()),
    };
    if let Some(path) = file {
        let content = crate::trust::read_secret(&path)
            .map_err(|e| Error::msg(format!("PIN file {}: {e}", path.display())))?;
        let len = content
            .iter()
            .position(|&b| b == b'\n')
            .unwrap_or(content.len());
        let mut line = content.get(..len).unwrap_or_default();
        if let Some(stripped) = line.strip_suffix(b"\r") {
            line = stripped;
        }
        return Ok(Zeroizing::new(line.to_vec()));
    }
    let tty = Tty::open().map_err(|e| {
        Error::msg(format!(
            "no PIN source: no terminal (/dev/tty: {e}), no --pin-file, and no \
             $CREDENTIALS_DIRECTORY/{CREDENTIAL}"
        ))
    })?;
    let module = config
        .pkcs11
        .as_deref()
        .map(|p| p.module.display().to_string())
        .unwrap_or_default();
    let pin = tty.prompt(&format!("User PIN of the token ({module}): "))?;
    Ok(Zeroizing::new(pin.as_ref().to_vec()))
}

fn module_id(config: &Config) -> Result<String> {
    let p = config
        .pkcs11
        .as_deref()
        .ok_or_else(|| Error::msg("agent.backend = \"pkcs11\" needs a [pkcs11] section"))?;
    p.module
        .to_str()
        .map(str::to_owned)
        .ok_or_else(|| Error::msg("pkcs11.module is not UTF-8"))
}

/// What the daemon says is wrong (`status@keyholder` format 3 on the proxy
/// socket, asked as root); empty when it cannot be asked.
pub(super) fn daemon_notes(config: &Config) -> Vec<String> {
    use crate::protocol::status::{self, Answer};
    use ssh_agent_lib::proto::Extension;
    use ssh_encoding::Decode;
    let Ok(mut client) =
        super::client::AgentClient::connect(&config.socket, config.limits.upstream_timeout)
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

/// Gives the daemon the PIN; prints one line per key. Exit 0 when every
/// configured key is armed, 1 otherwise.
pub fn arm(config: &Config, pin_file: Option<&Path>) -> Result<u8> {
    let id = module_id(config)?;
    let pin = read_pin(config, pin_file)?;
    if pin.is_empty() {
        return Err(Error::msg("empty PIN: nothing sent"));
    }
    let text = std::str::from_utf8(&pin)
        .map_err(|_| Error::msg("the PIN is not UTF-8 text: nothing sent"))?;
    let request = Request::AddSmartcardKey(SmartcardKey {
        id,
        pin: SecretString::from(text.to_owned()),
    });
    drop(pin);
    let mut client = super::arm::connect(config)?;
    let socket = config.agent.socket.display();
    match client.call(&request) {
        Ok(Response::Success) => {}
        Ok(other) => {
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
        Err(e) => return Err(Error::msg(format!("agent.socket {socket}: {e}"))),
    }
    drop(request);
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
    let mut failed = Vec::new();
    let notes = daemon_notes(config);
    for key in &config.keys {
        let prefix = format!("{}: ", key.name);
        if held.contains(&key.public_key) {
            say!("{}: armed ({})", key.name, key.fingerprint);
            for warning in notes.iter().filter_map(|n| n.strip_prefix(&prefix)) {
                say!("{}: {warning}", key.name);
            }
        } else {
            let why = notes
                .iter()
                .find_map(|n| n.strip_prefix(&prefix))
                .unwrap_or("no matching private key on the token (the daemon's log says why)");
            say!("{}: FAILED: {why}", key.name);
            failed.push(key.name.as_str());
        }
    }
    let total = config.keys.len();
    if failed.is_empty() {
        say!("logged in; all {total} key(s) armed");
        Ok(0)
    } else {
        say!(
            "logged in; {}/{total} key(s) armed; not armed: {}",
            total - failed.len(),
            failed.join(", ")
        );
        Ok(1)
    }
}

/// Asks the daemon to log out of the token and forget the PIN.
pub fn disarm(config: &Config) -> Result<u8> {
    let id = module_id(config)?;
    let mut client = super::arm::connect(config)?;
    let socket = config.agent.socket.display();
    let request = Request::RemoveSmartcardKey(SmartcardKey {
        id,
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

/// How `check-config` names a key's private object.
pub fn describe_object(object: &ObjectSelector) -> String {
    match object {
        ObjectSelector::Label(l) => format!("private key with CKA_LABEL {l:?}"),
        ObjectSelector::Id(id) => format!(
            "private key with CKA_ID {}",
            id.iter().map(|b| format!("{b:02x}")).collect::<String>()
        ),
    }
}

/// What `check-config` found about the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finding {
    /// Exit 1.
    Error,
    /// Exit 0, printed.
    Warning,
    /// Printed.
    Note,
}

/// `check-config`'s look at the token: as root, loads the module, finds the
/// token and, with the PIN (`$CREDENTIALS_DIRECTORY/keyholder-pin`, or the
/// terminal; an empty answer skips), logs in on a session of its own to
/// find each key's private object, compare it with `NAME.pub`, and warn
/// about one that is extractable or not sensitive. Logs out after.
pub fn check(
    config: &Config,
    settings: &Pkcs11Config,
    root: bool,
    report: &mut dyn FnMut(Finding, String),
) {
    let token = match &settings.token {
        TokenSelector::Label(l) => format!("token {l:?}"),
        TokenSelector::Slot(s) => format!("slot {s}"),
    };
    say!(
        "pkcs11: module {}, {token}, {} signing session(s)",
        settings.module.display(),
        settings
            .sessions
            .map_or_else(|| "one per core".to_owned(), |n| n.to_string())
    );
    if !root {
        report(
            Finding::Note,
            "run check-config as root to check the PKCS#11 module and the keys on the token"
                .to_owned(),
        );
        return;
    }
    let pin = check_pin(&token);
    let pin_bytes = pin.as_ref().map(|p| p.as_slice());
    match crate::backend::pkcs11::inspect(config, settings, pin_bytes) {
        Err(e) => report(Finding::Error, e),
        Ok(found) => {
            if let Some(problem) = found.problem {
                report(
                    Finding::Warning,
                    format!("pkcs11: {problem}: its keys cannot be checked now"),
                );
                return;
            }
            if pin.is_none() {
                report(
                    Finding::Note,
                    format!(
                        "pkcs11: {token} is present; its private keys are checked only after a \
                         login: give the PIN on the terminal or in \
                         $CREDENTIALS_DIRECTORY/{CREDENTIAL}"
                    ),
                );
                return;
            }
            for (name, why) in found.keys {
                match why {
                    None => say!("pkcs11: keys.{name}: found on the token, matches its public key"),
                    Some(why) => report(Finding::Error, format!("pkcs11: keys.{name}: {why}")),
                }
            }
            for (name, warning) in found.warnings {
                report(Finding::Warning, format!("pkcs11: keys.{name}: {warning}"));
            }
        }
    }
}

/// The PIN for `check-config`: the credential, else the terminal (empty:
/// none), else none.
fn check_pin(token: &str) -> Option<Zeroizing<Vec<u8>>> {
    if let Some(path) = std::env::var_os("CREDENTIALS_DIRECTORY")
        .map(|dir| Path::new(&dir).join(CREDENTIAL))
        .filter(|p| p.exists())
    {
        return match crate::trust::read_secret(&path) {
            Ok(content) => {
                let len = content
                    .iter()
                    .position(|&b| b == b'\n')
                    .unwrap_or(content.len());
                Some(Zeroizing::new(
                    content.get(..len).unwrap_or_default().to_vec(),
                ))
            }
            Err(e) => {
                say!("note: PIN file {}: {e}; not logging in", path.display());
                None
            }
        };
    }
    let tty = Tty::open().ok()?;
    let pin = tty
        .prompt(&format!(
            "User PIN of {token}, to check its keys (empty: skip): "
        ))
        .ok()?;
    (!pin.is_empty()).then(|| Zeroizing::new(pin.as_ref().to_vec()))
}
