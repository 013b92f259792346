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
//!   (`certificate-required`), so the key cannot be used anonymously.

use ssh_key::Certificate;

use super::Reason;
use crate::config::CertMode;

/// A certificate keyholder minted: for whom, and its serial.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Issued {
    /// The caller it was minted for.
    pub uid: u32,
    /// Its serial.
    pub serial: u64,
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
/// ahead for caller `uid` with a key in `mode`; the certificate's serial
/// when one was used. `data_key` is `None` when the data is not user-auth
/// data (a key with `allow_any_data`): no certificate rule applies.
pub fn check(mode: CertMode, data_key: Option<DataKey>, uid: u32) -> Result<Option<u64>, Reason> {
    match data_key {
        None => Ok(None),
        Some(DataKey::Plain) if mode == CertMode::Only => Err(Reason::CertificateRequired),
        Some(DataKey::Plain) => Ok(None),
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

    const MINE: Issued = Issued {
        uid: 1000,
        serial: 7,
    };
    const THEIRS: Issued = Issued {
        uid: 1001,
        serial: 8,
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
        assert_eq!(check(CertMode::Off, foreign, 1000), Ok(None));
        assert_eq!(check(CertMode::Off, foreign, 0), Ok(None));
        for mode in [CertMode::Also, CertMode::Only] {
            assert_eq!(check(mode, foreign, 1000), Err(Reason::CertificateNotYours));
        }
        for mode in [CertMode::Off, CertMode::Also, CertMode::Only] {
            // Not user-auth data (allow_any_data): no certificate rule.
            assert_eq!(check(mode, None, 1000), Ok(None));
            // Our certificate for this caller: granted with its serial.
            assert_eq!(check(mode, cert(Some(MINE)), 1000), Ok(Some(7)));
            // Another caller's, or one keyholder did not mint: refused.
            assert_eq!(
                check(mode, cert(Some(THEIRS)), 1000),
                Err(Reason::CertificateNotYours)
            );
            assert_eq!(
                check(mode, cert(None), 1000),
                Err(Reason::CertificateNotYours)
            );
            // root is no exception: the target would log someone else.
            assert_eq!(
                check(mode, cert(Some(MINE)), 0),
                Err(Reason::CertificateNotYours)
            );
        }
        assert_eq!(check(CertMode::Off, Some(DataKey::Plain), 1000), Ok(None));
        assert_eq!(check(CertMode::Also, Some(DataKey::Plain), 1000), Ok(None));
        assert_eq!(
            check(CertMode::Only, Some(DataKey::Plain), 1000),
            Err(Reason::CertificateRequired)
        );
        assert_eq!(
            check(CertMode::Only, Some(DataKey::Plain), 0),
            Err(Reason::CertificateRequired)
        );
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
