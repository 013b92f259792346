//! `check-config`'s look at a PKCS#11 token (`[agent] backend = "pkcs11"`):
//! the module, the token, and with the user PIN each key's private object.
//! Arming and disarming the token is [`super::unlock`]'s, as for any backend
//! unlocked with one secret.
//!
//! The PIN comes from `$CREDENTIALS_DIRECTORY/keyholder-pin` (systemd
//! credentials), else the terminal; it is read through the trust check for
//! secrets, held in zeroizing memory, and never printed.

use std::path::Path;

use zeroize::Zeroizing;

use super::passphrase::Tty;
use crate::config::pkcs11::{
    ObjectSelector, Pkcs11Config, TokenSelector, PIN_CREDENTIAL as CREDENTIAL,
};
use crate::config::Config;

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
