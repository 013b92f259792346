//! The certificate rules of a sign request, and which keys are listed with
//! a certificate.
//!
//! Pure: it is given the facts (the key blob inside the user-auth data,
//! which caller keyholder minted a certificate there for, the key's mode)
//! and answers with a decision and its reason. It never mints, never looks
//! anything up itself and never reads a clock.
//!
//! The rules (`docs/reference.md`, "Certificates"):
//! - what counts is the key blob inside the user-auth data, because that is
//!   what the target sees;
//! - a certificate there must be one keyholder minted for this caller's uid
//!   (else `certificate-not-yours`): nobody can make a target log another
//!   user's name. That holds in every mode for anything signed by
//!   keyholder's CA; a certificate of some other CA (one the admin armed in
//!   the upstream agent with the key) counts as its key in mode `off`, as
//!   for a key without certificates, and is refused in modes `also` and
//!   `only`;
//! - mode `only`: user-auth data carrying the plain key is refused
//!   (`certificate-required`), so the key cannot be used anonymously;
//! - a certificate minted under terms a reload changed (CA, principals,
//!   extensions, `force_command`, `source_address`, validity, key ID
//!   template: [`terms`]) is refused (`certificate-stale`); the next listing
//!   mints one under the terms in force.

use std::hash::{Hash, Hasher};

use ssh_key::Certificate;

use super::Reason;
use crate::config::{CertMode, CertificatesConfig, KeyCertConfig};

/// A certificate keyholder minted: for whom, its serial, and the terms it
/// was minted under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Issued {
    /// The caller it was minted for.
    pub uid: u32,
    /// Its serial.
    pub serial: u64,
    /// [`terms`] of the configuration it was minted under.
    pub terms: u64,
}

/// A digest of everything a configuration makes a key's certificates say:
/// the CA (by fingerprint), validity and backdating, the key ID template,
/// principals, extensions, `force_command` and `source_address`. The mode
/// (`also`/`only`) is not part of it: it changes which identities are
/// listed, not what a certificate says. Compared only within one run of the
/// daemon (certificates are not remembered across restarts).
pub fn terms(certificates: Option<&CertificatesConfig>, key: &KeyCertConfig) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    certificates
        .map(|c| {
            (
                &c.ca.fingerprint,
                c.validity_secs,
                c.backdate_secs,
                &c.key_id,
            )
        })
        .hash(&mut h);
    (
        &key.principals,
        &key.extensions,
        &key.force_command,
        &key.source_address,
    )
        .hash(&mut h);
    h.finish()
}

/// What keyholder remembers of the certificates it minted (the daemon's
/// certificate cache).
pub trait Minted: std::fmt::Debug {
    /// The owner and serial of `cert`, when keyholder minted exactly this
    /// certificate (same CA signature, same contents) and still remembers it.
    fn issued(&self, cert: &Certificate) -> Option<Issued>;
}

/// Remembers nothing: every certificate is someone else's.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoneMinted;

impl Minted for NoneMinted {
    fn issued(&self, _: &Certificate) -> Option<Issued> {
        None
    }
}

/// The key blob inside the user-auth data, as a fact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataKey {
    /// The plain key.
    Plain,
    /// A certificate of the key: `issued` says who keyholder minted it for,
    /// if it did.
    Certificate {
        /// From the cache; `None` when keyholder did not mint it.
        issued: Option<Issued>,
        /// Signed by the configured CA (minted by keyholder, or forged
        /// with a signature that does not verify: either way not the
        /// caller's).
        keyholder_ca: bool,
    },
}

/// Whether a sign request whose user-auth data carries `data_key` may go
/// ahead for caller `uid` with a key in `mode` whose certificates' terms
/// are now `terms_now`; the certificate's serial when one was used.
/// `data_key` is `None` when the data is not user-auth data (a key with
/// `allow_any_data`): no certificate rule applies.
pub fn check(
    mode: CertMode,
    data_key: Option<DataKey>,
    uid: u32,
    terms_now: u64,
) -> Result<Option<u64>, Reason> {
    match data_key {
        None => Ok(None),
        Some(DataKey::Plain) if mode == CertMode::Only => Err(Reason::CertificateRequired),
        Some(DataKey::Plain) => Ok(None),
        Some(DataKey::Certificate {
            issued: Some(issued),
            ..
        }) if issued.uid == uid && issued.terms != terms_now => Err(Reason::CertificateStale),
        Some(DataKey::Certificate {
            issued: Some(issued),
            ..
        }) if issued.uid == uid => Ok(Some(issued.serial)),
        Some(DataKey::Certificate {
            issued: Some(_), ..
        }) => Err(Reason::CertificateNotYours),
        Some(DataKey::Certificate {
            issued: None,
            keyholder_ca,
        }) if keyholder_ca || mode != CertMode::Off => Err(Reason::CertificateNotYours),
        // Another CA's certificate of a key without certificates.
        Some(DataKey::Certificate { issued: None, .. }) => Ok(None),
    }
}

/// How a key the caller may use is listed, given whether the CA is armed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listing {
    /// The plain key only.
    Plain,
    /// The caller's certificate first, then the plain key; if no
    /// certificate can be had, the plain key only (`fallback_plain`) or
    /// nothing.
    WithCertificate {
        /// Mode `also`: the plain key alone when minting fails.
        fallback_plain: bool,
    },
    /// Nothing (mode `only` with the CA not armed).
    Nothing,
}

/// How a key in `mode` is listed.
pub fn listing(mode: CertMode, ca_armed: bool) -> Listing {
    match (mode, ca_armed) {
        (CertMode::Off, _) | (CertMode::Also, false) => Listing::Plain,
        (CertMode::Only, false) => Listing::Nothing,
        (CertMode::Also, true) => Listing::WithCertificate {
            fallback_plain: true,
        },
        (CertMode::Only, true) => Listing::WithCertificate {
            fallback_plain: false,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The terms in force.
    const NOW: u64 = 0x5eed;
    const MINE: Issued = Issued {
        uid: 1000,
        serial: 7,
        terms: NOW,
    };
    const THEIRS: Issued = Issued {
        uid: 1001,
        serial: 8,
        terms: NOW,
    };

    #[test]
    fn every_mode_and_data_key() {
        let cert = |i| {
            Some(DataKey::Certificate {
                issued: i,
                keyholder_ca: true,
            })
        };
        let foreign = Some(DataKey::Certificate {
            issued: None,
            keyholder_ca: false,
        });
        // Another CA's certificate: its key in mode off, refused otherwise.
        assert_eq!(check(CertMode::Off, foreign, 1000, NOW), Ok(None));
        assert_eq!(check(CertMode::Off, foreign, 0, NOW), Ok(None));
        for mode in [CertMode::Also, CertMode::Only] {
            assert_eq!(
                check(mode, foreign, 1000, NOW),
                Err(Reason::CertificateNotYours)
            );
        }
        for mode in [CertMode::Off, CertMode::Also, CertMode::Only] {
            // Not user-auth data (allow_any_data): no certificate rule.
            assert_eq!(check(mode, None, 1000, NOW), Ok(None));
            // Our certificate for this caller: granted with its serial.
            assert_eq!(check(mode, cert(Some(MINE)), 1000, NOW), Ok(Some(7)));
            // Another caller's, or one keyholder did not mint: refused.
            assert_eq!(
                check(mode, cert(Some(THEIRS)), 1000, NOW),
                Err(Reason::CertificateNotYours)
            );
            assert_eq!(
                check(mode, cert(None), 1000, NOW),
                Err(Reason::CertificateNotYours)
            );
            // root is no exception: the target would log someone else.
            assert_eq!(
                check(mode, cert(Some(MINE)), 0, NOW),
                Err(Reason::CertificateNotYours)
            );
        }
        assert_eq!(
            check(CertMode::Off, Some(DataKey::Plain), 1000, NOW),
            Ok(None)
        );
        assert_eq!(
            check(CertMode::Also, Some(DataKey::Plain), 1000, NOW),
            Ok(None)
        );
        assert_eq!(
            check(CertMode::Only, Some(DataKey::Plain), 1000, NOW),
            Err(Reason::CertificateRequired)
        );
        assert_eq!(
            check(CertMode::Only, Some(DataKey::Plain), 0, NOW),
            Err(Reason::CertificateRequired)
        );
    }

    #[test]
    fn a_certificate_minted_under_other_terms_is_stale() {
        let old = Issued { terms: 1, ..MINE };
        let cert = |i| {
            Some(DataKey::Certificate {
                issued: Some(i),
                keyholder_ca: true,
            })
        };
        for mode in [CertMode::Off, CertMode::Also, CertMode::Only] {
            assert_eq!(
                check(mode, cert(old), 1000, NOW),
                Err(Reason::CertificateStale)
            );
            // Someone else's stale certificate: not theirs comes first.
            assert_eq!(
                check(mode, cert(Issued { uid: 1001, ..old }), 1000, NOW),
                Err(Reason::CertificateNotYours)
            );
        }
    }

    #[test]
    fn terms_change_with_what_certificates_say_and_not_with_the_mode() {
        let key = KeyCertConfig {
            mode: CertMode::Also,
            principals: vec!["deploy".into()],
            extensions: vec!["permit-pty".into()],
            force_command: None,
            source_address: vec![],
        };
        let base = terms(None, &key);
        assert_eq!(base, terms(None, &key.clone()));
        let only = KeyCertConfig {
            mode: CertMode::Only,
            ..key.clone()
        };
        assert_eq!(terms(None, &only), base);
        let changed = [
            KeyCertConfig {
                principals: vec!["deploy".into(), "root".into()],
                ..key.clone()
            },
            KeyCertConfig {
                extensions: vec![],
                ..key.clone()
            },
            KeyCertConfig {
                force_command: Some("/bin/true".into()),
                ..key.clone()
            },
            KeyCertConfig {
                source_address: vec!["192.0.2.0/24".into()],
                ..key.clone()
            },
        ];
        for c in &changed {
            assert_ne!(terms(None, c), base, "{c:?}");
        }
    }

    #[test]
    fn listing_follows_mode_and_arming() {
        assert_eq!(listing(CertMode::Off, true), Listing::Plain);
        assert_eq!(listing(CertMode::Off, false), Listing::Plain);
        assert_eq!(listing(CertMode::Also, false), Listing::Plain);
        assert_eq!(listing(CertMode::Only, false), Listing::Nothing);
        assert_eq!(
            listing(CertMode::Also, true),
            Listing::WithCertificate {
                fallback_plain: true
            }
        );
        assert_eq!(
            listing(CertMode::Only, true),
            Listing::WithCertificate {
                fallback_plain: false
            }
        );
    }
}
