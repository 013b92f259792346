//! The `[pkcs11]` section and the keys' `pkcs11_label` / `pkcs11_id`
//! (`[agent] backend = "pkcs11"`): which module, which token, how many
//! signing sessions, and which private object each key is.
//!
//! Parsing and validation only: nothing here loads the module or touches a
//! token. Every error names the file and the field.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use crate::error::{Error, Result};

/// The systemd credential (under `$CREDENTIALS_DIRECTORY`) holding the
/// token's user PIN.
pub const PIN_CREDENTIAL: &str = "keyholder-pin";

/// Most signing sessions `sessions` may ask for.
pub const MAX_SESSIONS: usize = 256;

/// `[pkcs11]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPkcs11 {
    module: PathBuf,
    token_label: Option<String>,
    slot: Option<u64>,
    sessions: Option<usize>,
}

/// Which token of the module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSelector {
    /// `token_label`: the token's label (`CKA_LABEL` of the token info).
    Label(String),
    /// `slot`: the slot id (as `pkcs11-tool --slot` takes it).
    Slot(u64),
}

/// Which private key object a key is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ObjectSelector {
    /// `pkcs11_label` (default: the key's name).
    Label(String),
    /// `pkcs11_id`, hex in the file.
    Id(Vec<u8>),
}

/// `[pkcs11]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pkcs11Config {
    /// The PKCS#11 module (a shared library), absolute.
    pub module: PathBuf,
    /// The token.
    pub token: TokenSelector,
    /// Signing sessions (default: one per core).
    pub sessions: Option<usize>,
    /// Keys whose object is not found by their name.
    pub objects: BTreeMap<String, ObjectSelector>,
}

impl Pkcs11Config {
    /// The private object of key `name`.
    pub fn object(&self, name: &str) -> ObjectSelector {
        self.objects
            .get(name)
            .cloned()
            .unwrap_or_else(|| ObjectSelector::Label(name.to_owned()))
    }
}

/// A key's `pkcs11_label` / `pkcs11_id`, when either is set.
pub(super) fn key_object(
    file: &impl std::fmt::Display,
    name: &str,
    label: Option<String>,
    id: Option<String>,
) -> Result<Option<ObjectSelector>> {
    match (label, id) {
        (None, None) => Ok(None),
        (Some(_), Some(_)) => Err(Error::msg(format!(
            "{file}: keys.{name}: set pkcs11_label or pkcs11_id, not both"
        ))),
        (Some(label), None) => {
            if label.is_empty() {
                return Err(Error::msg(format!(
                    "{file}: keys.{name}.pkcs11_label: empty"
                )));
            }
            Ok(Some(ObjectSelector::Label(label)))
        }
        (None, Some(id)) => parse_hex(&id)
            .map(|b| Some(ObjectSelector::Id(b)))
            .ok_or_else(|| {
                Error::msg(format!(
                "{file}: keys.{name}.pkcs11_id: {id:?} is not a non-empty even-length hex string \
                 (the CKA_ID, as pkcs11-tool prints it, e.g. \"01\" or \"a1b2\")"
            ))
            }),
    }
}

fn parse_hex(text: &str) -> Option<Vec<u8>> {
    let text = text.trim_start_matches("0x");
    if text.is_empty() || text.len() % 2 != 0 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| {
            text.get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect()
}

/// Validates `[pkcs11]` against the backend: required (and only allowed)
/// with `backend = "pkcs11"`, as are the keys' object settings.
pub(super) fn load(
    file: &impl std::fmt::Display,
    raw: Option<RawPkcs11>,
    is_pkcs11: bool,
    objects: BTreeMap<String, ObjectSelector>,
) -> Result<Option<Pkcs11Config>> {
    let Some(raw) = raw else {
        if is_pkcs11 {
            return Err(Error::msg(format!(
                "{file}: agent.backend = \"pkcs11\" needs a [pkcs11] section (module = \"…\" and \
                 token_label = \"…\" or slot = N)"
            )));
        }
        if let Some(name) = objects.keys().next() {
            return Err(Error::msg(format!(
                "{file}: keys.{name}: pkcs11_label/pkcs11_id apply only with agent.backend = \
                 \"pkcs11\""
            )));
        }
        return Ok(None);
    };
    if !is_pkcs11 {
        return Err(Error::msg(format!(
            "{file}: [pkcs11] applies only with agent.backend = \"pkcs11\""
        )));
    }
    if !raw.module.is_absolute() {
        return Err(Error::msg(format!(
            "{file}: pkcs11.module: {} is not an absolute path (the same path `ssh-add -s` \
             names)",
            raw.module.display()
        )));
    }
    let token = match (raw.token_label, raw.slot) {
        (Some(_), Some(_)) => {
            return Err(Error::msg(format!(
                "{file}: pkcs11: set token_label or slot, not both"
            )))
        }
        (None, None) => {
            return Err(Error::msg(format!(
                "{file}: pkcs11: which token? set token_label = \"…\" (or slot = N)"
            )))
        }
        (Some(label), None) => {
            if label.is_empty() || label.len() > 32 {
                return Err(Error::msg(format!(
                    "{file}: pkcs11.token_label: {label:?} is not a token label (1 to 32 bytes)"
                )));
            }
            TokenSelector::Label(label)
        }
        (None, Some(slot)) => TokenSelector::Slot(slot),
    };
    if let Some(n) = raw.sessions {
        if n == 0 || n > MAX_SESSIONS {
            return Err(Error::msg(format!(
                "{file}: pkcs11.sessions: {n} is not between 1 and {MAX_SESSIONS}"
            )));
        }
    }
    Ok(Some(Pkcs11Config {
        module: raw.module,
        token,
        sessions: raw.sessions,
        objects,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_ids_are_parsed_strictly() {
        assert_eq!(parse_hex("01"), Some(vec![1]));
        assert_eq!(parse_hex("a1B2"), Some(vec![0xa1, 0xb2]));
        assert_eq!(parse_hex("0x0102"), Some(vec![1, 2]));
        for bad in ["", "1", "0g", "01 02", "+1", "é1"] {
            assert_eq!(parse_hex(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_key_names_a_label_or_an_id_not_both() {
        let f = "k.toml";
        assert_eq!(key_object(&f, "k", None, None).unwrap(), None);
        assert_eq!(
            key_object(&f, "k", Some("x".into()), None).unwrap(),
            Some(ObjectSelector::Label("x".into()))
        );
        assert_eq!(
            key_object(&f, "k", None, Some("0a".into())).unwrap(),
            Some(ObjectSelector::Id(vec![10]))
        );
        let e = key_object(&f, "k", Some("x".into()), Some("01".into())).unwrap_err();
        assert!(e.to_string().contains("not both"));
        let e = key_object(&f, "k", None, Some("xyz".into())).unwrap_err();
        assert!(e.to_string().contains("keys.k.pkcs11_id"));
        let e = key_object(&f, "k", Some(String::new()), None).unwrap_err();
        assert!(e.to_string().contains("keys.k.pkcs11_label"));
    }

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl k";

    fn parse(text: &str) -> Result<crate::config::Config> {
        crate::config::Config::parse(std::path::Path::new("/etc/k.toml"), text)
    }

    fn with(agent: &str, section: &str, key: &str) -> String {
        format!(
            "[agent]\n{agent}\n{section}\n[keys.deploy]\ngroups = [\"g\"]\npublic_key = \"{KEY}\"\n{key}\n"
        )
    }

    #[test]
    fn the_section_goes_with_the_backend_and_names_its_fields() {
        let module = "[pkcs11]\nmodule = \"/usr/lib/m.so\"\ntoken_label = \"kh\"\nsessions = 3";
        let c = parse(&with(
            "backend = \"pkcs11\"",
            module,
            "pkcs11_id = \"0a01\"",
        ))
        .unwrap();
        let p = c.pkcs11.as_deref().unwrap();
        assert_eq!(p.token, TokenSelector::Label("kh".into()));
        assert_eq!(p.sessions, Some(3));
        assert_eq!(p.object("deploy"), ObjectSelector::Id(vec![0x0a, 0x01]));
        assert_eq!(p.object("other"), ObjectSelector::Label("other".into()));
        assert!(!c.agent.spawn);

        for (agent, section, key, want) in [
            ("backend = \"pkcs11\"", "", "", "needs a [pkcs11] section"),
            ("", module, "", "[pkcs11] applies only with"),
            (
                "",
                "",
                "pkcs11_label = \"x\"",
                "keys.deploy: pkcs11_label/pkcs11_id apply only",
            ),
            (
                "backend = \"pkcs11\"\nspawn = true",
                module,
                "",
                "agent.spawn: does not apply",
            ),
            (
                "backend = \"pkcs11\"\nprogram = \"/x\"",
                module,
                "",
                "agent.program: does not apply",
            ),
            (
                "backend = \"pkcs11\"",
                "[pkcs11]\nmodule = \"m.so\"\nslot = 1",
                "",
                "pkcs11.module",
            ),
            (
                "backend = \"pkcs11\"",
                "[pkcs11]\nmodule = \"/m.so\"",
                "",
                "which token?",
            ),
            (
                "backend = \"pkcs11\"",
                "[pkcs11]\nmodule = \"/m.so\"\nslot = 1\ntoken_label = \"a\"",
                "",
                "not both",
            ),
            (
                "backend = \"pkcs11\"",
                "[pkcs11]\nmodule = \"/m.so\"\nslot = 1\nsessions = 0",
                "",
                "pkcs11.sessions",
            ),
            (
                "backend = \"pkcs11\"",
                "[pkcs11]\nmodule = \"/m.so\"\nslot = 1\npin = \"1\"",
                "",
                "unknown field",
            ),
        ] {
            let e = parse(&with(agent, section, key)).unwrap_err().to_string();
            assert!(e.contains(want), "{agent} / {section} / {key}: {e}");
            assert!(e.starts_with("/etc/k.toml"), "{e}");
        }
        let c = parse(&with(
            "backend = \"pkcs11\"",
            "[pkcs11]\nmodule = \"/m.so\"\nslot = 7",
            "",
        ))
        .unwrap();
        assert_eq!(c.pkcs11.unwrap().token, TokenSelector::Slot(7));
    }
}
