//! How the configured backend is armed and disarmed, told as data for
//! `keyholder arm` and `keyholder disarm`: either key files the command
//! decrypts itself, or one secret the daemon's backend is unlocked with
//! (where it comes from, how it is asked for, how it reaches the daemon).
//!
//! The commands follow this description and never name a backend; a new
//! backend describes itself here. Nothing here reads a file or talks to a
//! socket.

use super::{BackendKind, Config};
use crate::error::{Error, Result};

/// How `keyholder arm` and `keyholder disarm` reach the keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Arming {
    /// Encrypted private keys in `key_dir`: `arm` decrypts them with a
    /// passphrase (`--passphrase-file`) and adds them to the agent on
    /// `agent.socket`; `disarm` removes every identity there.
    KeyFiles,
    /// The daemon's backend reaches its keys with one secret the operator
    /// gives to `arm`.
    Secret(Secret),
}

/// One secret that unlocks the daemon's backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Secret {
    /// The `keyholder arm` option naming a file that holds it.
    pub flag: &'static str,
    /// Its systemd credential name, under `$CREDENTIALS_DIRECTORY`.
    pub credential: &'static str,
    /// Its name in messages ("PIN", "token", "secret id").
    pub what: &'static str,
    /// How a file holding it is named in messages ("PIN file").
    pub file: &'static str,
    /// The terminal prompt; none: the backend needs no secret (an empty one
    /// is sent).
    pub prompt: Option<String>,
    /// How it reaches the daemon on `agent.socket`, and how `disarm` undoes it.
    pub send: Unlock,
}

/// The agent-protocol message that carries the secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unlock {
    /// SSH_AGENTC_ADD_SMARTCARD_KEY with this id and the secret as the PIN
    /// (what `ssh-add -s ID` sends); `disarm` sends
    /// SSH_AGENTC_REMOVE_SMARTCARD_KEY with the same id.
    Smartcard {
        /// The reader id (the PKCS#11 module's path).
        id: String,
    },
    /// The vendor extension `unlock@keyholder` (one `string`: the secret);
    /// `disarm` sends REMOVE_ALL_IDENTITIES.
    Extension,
}

impl Arming {
    /// The `keyholder arm` option naming the file that holds what arms it.
    pub fn flag(&self) -> &'static str {
        match self {
            Self::KeyFiles => "--passphrase-file",
            Self::Secret(secret) => secret.flag,
        }
    }
}

impl Config {
    /// How this configuration's backend is armed and disarmed.
    pub fn arming(&self) -> Result<Arming> {
        match self.agent.backend {
            BackendKind::Upstream | BackendKind::Builtin => Ok(Arming::KeyFiles),
            BackendKind::Pkcs11 => {
                let settings = self.pkcs11.as_deref().ok_or_else(|| {
                    Error::msg("agent.backend = \"pkcs11\" needs a [pkcs11] section")
                })?;
                let id = settings
                    .module
                    .to_str()
                    .map(str::to_owned)
                    .ok_or_else(|| Error::msg("pkcs11.module is not UTF-8"))?;
                Ok(Arming::Secret(Secret {
                    flag: "--pin-file",
                    credential: super::pkcs11::PIN_CREDENTIAL,
                    what: "PIN",
                    file: "PIN file",
                    prompt: Some(format!("User PIN of the token ({id}): ")),
                    send: Unlock::Smartcard { id },
                }))
            }
            BackendKind::OpenBao => {
                let settings = self.openbao.as_deref().ok_or_else(|| {
                    Error::msg("agent.backend = \"openbao\" needs an [openbao] section")
                })?;
                let token = settings.auth == super::openbao::AuthKind::Token;
                let prompt = if token {
                    "OpenBao token: "
                } else {
                    "OpenBao AppRole secret id: "
                };
                Ok(Arming::Secret(Secret {
                    flag: "--secret-file",
                    credential: super::openbao::SECRET_CREDENTIAL,
                    what: if token { "token" } else { "secret id" },
                    file: "secret file",
                    prompt: settings.auth.needs_secret().then(|| prompt.to_owned()),
                    send: Unlock::Extension,
                }))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn parse(text: &str) -> Config {
        Config::parse(Path::new("/etc/keyholder/keyholder.toml"), text).unwrap()
    }

    fn with_openbao(auth: &str) -> Config {
        let mut config = parse("");
        let raw = toml::from_str(&format!("addresses = [\"https://a:8200\"]\n{auth}")).unwrap();
        let settings = super::super::openbao::load(Path::new("/etc/k.toml"), raw).unwrap();
        config.agent.backend = BackendKind::OpenBao;
        config.openbao = Some(Box::new(settings));
        config
    }

    #[test]
    fn each_backend_says_how_it_is_armed() {
        assert_eq!(parse("").arming().unwrap(), Arming::KeyFiles);
        let builtin = parse("[agent]\nbackend = \"builtin\"\nspawn = false\n");
        assert_eq!(builtin.arming().unwrap().flag(), "--passphrase-file");

        let pkcs11 =
            parse("[agent]\nbackend = \"pkcs11\"\n[pkcs11]\nmodule = \"/m.so\"\nslot = 1\n");
        let Arming::Secret(pin) = pkcs11.arming().unwrap() else {
            panic!("pkcs11 is armed with a PIN");
        };
        assert_eq!(
            (pin.flag, pin.credential, pin.what, pin.file),
            ("--pin-file", "keyholder-pin", "PIN", "PIN file")
        );
        assert_eq!(
            pin.prompt.as_deref(),
            Some("User PIN of the token (/m.so): ")
        );
        assert_eq!(pin.send, Unlock::Smartcard { id: "/m.so".into() });

        let approle = with_openbao("auth = \"approle\"\nrole_id = \"r\"");
        let Arming::Secret(s) = approle.arming().unwrap() else {
            panic!("openbao is armed with a secret");
        };
        assert_eq!(
            (s.flag, s.credential, s.what, s.file),
            (
                "--secret-file",
                "keyholder-openbao-secret",
                "secret id",
                "secret file"
            )
        );
        assert_eq!(s.prompt.as_deref(), Some("OpenBao AppRole secret id: "));
        assert_eq!(s.send, Unlock::Extension);

        let Arming::Secret(t) = with_openbao("auth = \"token\"").arming().unwrap() else {
            panic!("openbao is armed with a secret");
        };
        assert_eq!(
            (t.what, t.prompt.as_deref()),
            ("token", Some("OpenBao token: "))
        );

        // Certificate and agent logins need no human: an empty secret.
        let Arming::Secret(c) =
            with_openbao("auth = \"cert\"\nclient_cert = \"/c.pem\"\nclient_key = \"/k.pem\"")
                .arming()
                .unwrap()
        else {
            panic!("openbao is armed with a secret");
        };
        assert_eq!(c.prompt, None);
    }
}
