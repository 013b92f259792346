//! One key on the token, as the backend signs with it: which PKCS#11
//! mechanism over which bytes, how the token's raw signature becomes the
//! SSH signature blob OpenSSH's agent would send, and the check of that
//! signature against the configured public key before it is relayed.
//!
//! Also the decoding of the token's public-key attributes (`CKA_EC_PARAMS`,
//! `CKA_EC_POINT`, `CKA_MODULUS`, `CKA_PUBLIC_EXPONENT`) into an OpenSSH
//! public key, so that a key whose token half differs from `NAME.pub` is
//! named with both fingerprints. Everything here is pure: no token call, no
//! log line. Nothing here ever sees private key material: the token keeps it.

use openssl::bn::BigNum;
use openssl::ec::{EcGroup, EcKey, EcPoint};
use openssl::ecdsa::EcdsaSig;
use openssl::hash::{hash, MessageDigest};
use openssl::nid::Nid;
use openssl::pkey::{Id, PKey, Public};
use openssl::rsa::Rsa;
use openssl::sign::Verifier;
use ssh_key::public::{EcdsaPublicKey, Ed25519PublicKey, KeyData, RsaPublicKey};
use ssh_key::{EcdsaCurve, HashAlg, Mpint};

use crate::backend::builtin::key::rsa_alg;
use crate::protocol::wire::{put_mpint, put_string};

/// What the token is asked to do for one signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    /// `CKM_EDDSA` over the data.
    Eddsa,
    /// `CKM_ECDSA` over the digest.
    Ecdsa,
    /// `CKM_SHA1_RSA_PKCS` over the data.
    Sha1RsaPkcs,
    /// `CKM_SHA256_RSA_PKCS` over the data.
    Sha256RsaPkcs,
    /// `CKM_SHA512_RSA_PKCS` over the data.
    Sha512RsaPkcs,
}

/// A request turned into a token operation, with what is needed to encode
/// and check its answer.
pub struct Prepared {
    /// The mechanism.
    pub mechanism: Mechanism,
    /// The bytes handed to `C_Sign` (the data, or its digest for ECDSA).
    pub input: Vec<u8>,
    /// The SSH signature algorithm name.
    alg: &'static str,
    /// The digest RSA is verified with.
    digest: Option<MessageDigest>,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("mechanism", &self.mechanism)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Ed25519,
    Ecdsa {
        name: &'static str,
        digest: fn() -> MessageDigest,
        /// Bytes of r and of s in the token's answer.
        scalar: usize,
    },
    Rsa {
        /// Bytes of the modulus: the length of every signature.
        size: usize,
    },
}

/// A configured public key the backend can sign for, with its verifier.
pub struct SigningKey {
    public: KeyData,
    kind: Kind,
    verifier: PKey<Public>,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

/// Why a signature from the token is not relayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BadSignature {
    /// Not the length this key's signatures have.
    Length { got: usize, want: usize },
    /// Does not verify against the configured public key.
    Invalid,
    /// OpenSSL failed while checking.
    Check(String),
}

impl std::fmt::Display for BadSignature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Length { got, want } => write!(
                f,
                "the token returned a signature of {got} bytes where {want} were expected; \
                 not relayed"
            ),
            Self::Invalid => f.write_str(
                "the token's signature does not verify against the configured public key; \
                 not relayed",
            ),
            Self::Check(e) => write!(f, "checking the token's signature failed: {e}"),
        }
    }
}

fn ossl(e: openssl::error::ErrorStack) -> String {
    e.errors()
        .first()
        .and_then(|e| e.reason().map(str::to_owned))
        .unwrap_or_else(|| e.to_string())
}

/// The OpenSSL curve of an SSH curve.
fn curve(c: EcdsaCurve) -> (Nid, &'static str, fn() -> MessageDigest, usize) {
    match c {
        EcdsaCurve::NistP256 => (
            Nid::X9_62_PRIME256V1,
            "ecdsa-sha2-nistp256",
            MessageDigest::sha256,
            32,
        ),
        EcdsaCurve::NistP384 => (
            Nid::SECP384R1,
            "ecdsa-sha2-nistp384",
            MessageDigest::sha384,
            48,
        ),
        EcdsaCurve::NistP521 => (
            Nid::SECP521R1,
            "ecdsa-sha2-nistp521",
            MessageDigest::sha512,
            66,
        ),
    }
}

impl SigningKey {
    /// The signer for a configured public key; `Err` names why the key
    /// type cannot be used with a token.
    pub fn new(public: &KeyData) -> Result<Self, String> {
        let (kind, verifier) = match public {
            KeyData::Ed25519(k) => (
                Kind::Ed25519,
                PKey::public_key_from_raw_bytes(k.as_ref(), Id::ED25519).map_err(ossl)?,
            ),
            KeyData::Ecdsa(k) => {
                let (nid, name, digest, scalar) = curve(k.curve());
                let group = EcGroup::from_curve_name(nid).map_err(ossl)?;
                let mut ctx = openssl::bn::BigNumContext::new().map_err(ossl)?;
                let point =
                    EcPoint::from_bytes(&group, k.as_sec1_bytes(), &mut ctx).map_err(ossl)?;
                let ec = EcKey::from_public_key(&group, &point).map_err(ossl)?;
                (
                    Kind::Ecdsa {
                        name,
                        digest,
                        scalar,
                    },
                    PKey::from_ec_key(ec).map_err(ossl)?,
                )
            }
            KeyData::Rsa(k) => {
                let n =
                    k.n.as_positive_bytes()
                        .ok_or("RSA modulus is not positive")?;
                let e =
                    k.e.as_positive_bytes()
                        .ok_or("RSA exponent is not positive")?;
                let rsa = Rsa::from_public_components(
                    BigNum::from_slice(n).map_err(ossl)?,
                    BigNum::from_slice(e).map_err(ossl)?,
                )
                .map_err(ossl)?;
                let size = usize::try_from(rsa.size()).map_err(|e| e.to_string())?;
                (Kind::Rsa { size }, PKey::from_rsa(rsa).map_err(ossl)?)
            }
            other => {
                return Err(format!(
                    "{} keys cannot be used with a PKCS#11 token (Ed25519, ECDSA and RSA can)",
                    other.algorithm()
                ))
            }
        };
        Ok(Self {
            public: public.clone(),
            kind,
            verifier,
        })
    }

    /// The configured public key.
    pub fn public(&self) -> &KeyData {
        &self.public
    }

    /// The mechanism and input for signing `data` with SIGN_REQUEST
    /// `flags` (which matter for RSA only, as in OpenSSH's agent).
    pub fn prepare(&self, data: &[u8], flags: u32) -> Result<Prepared, String> {
        Ok(match self.kind {
            Kind::Ed25519 => Prepared {
                mechanism: Mechanism::Eddsa,
                input: data.to_vec(),
                alg: "ssh-ed25519",
                digest: None,
            },
            Kind::Ecdsa { name, digest, .. } => Prepared {
                mechanism: Mechanism::Ecdsa,
                input: hash(digest(), data).map_err(ossl)?.to_vec(),
                alg: name,
                digest: None,
            },
            Kind::Rsa { .. } => {
                let (alg, md) = rsa_alg(flags);
                let mechanism = match alg {
                    "rsa-sha2-256" => Mechanism::Sha256RsaPkcs,
                    "rsa-sha2-512" => Mechanism::Sha512RsaPkcs,
                    _ => Mechanism::Sha1RsaPkcs,
                };
                Prepared {
                    mechanism,
                    input: data.to_vec(),
                    alg,
                    digest: Some(md),
                }
            }
        })
    }

    /// The SSH signature blob (`string algorithm, string signature`) of the
    /// token's raw answer, after checking its length and that it verifies
    /// over `data` against the configured public key.
    pub fn finish(
        &self,
        prepared: &Prepared,
        data: &[u8],
        raw: &[u8],
    ) -> Result<Vec<u8>, BadSignature> {
        let check = |e: openssl::error::ErrorStack| BadSignature::Check(ossl(e));
        let sig = match self.kind {
            Kind::Ed25519 => {
                if raw.len() != 64 {
                    return Err(BadSignature::Length {
                        got: raw.len(),
                        want: 64,
                    });
                }
                // curve25519-dalek (through ssh-key) verifies in about a
                // third of OpenSSL 3.0's time here; the check is on every
                // signature's path.
                let sig = ssh_key::Signature::new(ssh_key::Algorithm::Ed25519, raw.to_vec())
                    .map_err(|e| BadSignature::Check(e.to_string()))?;
                if signature::Verifier::verify(&self.public, data, &sig).is_err() {
                    return Err(BadSignature::Invalid);
                }
                raw.to_vec()
            }
            Kind::Ecdsa { scalar, .. } => {
                if raw.len() != 2 * scalar {
                    return Err(BadSignature::Length {
                        got: raw.len(),
                        want: 2 * scalar,
                    });
                }
                let (r, s) = raw.split_at(scalar);
                let sig = EcdsaSig::from_private_components(
                    BigNum::from_slice(r).map_err(check)?,
                    BigNum::from_slice(s).map_err(check)?,
                )
                .map_err(check)?;
                let ec = self.verifier.ec_key().map_err(check)?;
                // A verification error (r or s out of range) is a bad
                // signature too.
                if !sig.verify(&prepared.input, &ec).unwrap_or(false) {
                    return Err(BadSignature::Invalid);
                }
                let mut inner = Vec::with_capacity(2 * scalar + 10);
                put_mpint(&mut inner, r);
                put_mpint(&mut inner, s);
                inner
            }
            Kind::Rsa { size } => {
                if raw.len() != size {
                    return Err(BadSignature::Length {
                        got: raw.len(),
                        want: size,
                    });
                }
                let md = prepared.digest.unwrap_or_else(MessageDigest::sha256);
                let mut v = Verifier::new(md, &self.verifier).map_err(check)?;
                if !v.verify_oneshot(raw, data).unwrap_or(false) {
                    return Err(BadSignature::Invalid);
                }
                raw.to_vec()
            }
        };
        let mut blob = Vec::with_capacity(8 + prepared.alg.len() + sig.len());
        put_string(&mut blob, prepared.alg.as_bytes());
        put_string(&mut blob, &sig);
        Ok(blob)
    }
}

/// The curve named by a `CKA_EC_PARAMS` value: a DER OID, or the DER
/// PrintableString "edwards25519" some modules (SoftHSM2) write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Curve {
    /// Ed25519.
    Ed25519,
    /// A NIST curve.
    Nist(EcdsaCurve),
}

/// Decodes `CKA_EC_PARAMS`; `None` for a curve SSH has no use for.
pub fn ec_params(der: &[u8]) -> Option<Curve> {
    const P256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
    const P384: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];
    const P521: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x23];
    const ED25519_OID: &[u8] = &[0x06, 0x03, 0x2b, 0x65, 0x70];
    match der {
        P256 => Some(Curve::Nist(EcdsaCurve::NistP256)),
        P384 => Some(Curve::Nist(EcdsaCurve::NistP384)),
        P521 => Some(Curve::Nist(EcdsaCurve::NistP521)),
        ED25519_OID => Some(Curve::Ed25519),
        [0x13, len, name @ ..] if usize::from(*len) == name.len() => {
            (name == b"edwards25519").then_some(Curve::Ed25519)
        }
        _ => None,
    }
}

/// The point of a `CKA_EC_POINT` value of `want` bytes: DER OCTET STRING
/// (as the standard says) or raw (as some modules write it).
pub fn ec_point(value: &[u8], want: usize) -> Option<&[u8]> {
    let der = match value {
        [0x04, len, rest @ ..] if *len < 0x80 => {
            Some(rest).filter(|r| r.len() == usize::from(*len))
        }
        [0x04, 0x81, len, rest @ ..] => Some(rest).filter(|r| r.len() == usize::from(*len)),
        _ => None,
    };
    match der {
        Some(point) if point.len() == want => Some(point),
        _ => Some(value).filter(|v| v.len() == want),
    }
}

/// The bytes of a public point on `curve` (uncompressed for NIST curves).
fn point_len(curve: Curve) -> usize {
    match curve {
        Curve::Ed25519 => 32,
        Curve::Nist(EcdsaCurve::NistP256) => 65,
        Curve::Nist(EcdsaCurve::NistP384) => 97,
        Curve::Nist(EcdsaCurve::NistP521) => 133,
    }
}

/// The OpenSSH public key of an EC or EdDSA object's attributes.
pub fn ec_public(params: &[u8], point: &[u8]) -> Result<KeyData, String> {
    let curve = ec_params(params).ok_or("its CKA_EC_PARAMS name no curve SSH supports")?;
    let point = ec_point(point, point_len(curve)).ok_or("its CKA_EC_POINT cannot be decoded")?;
    Ok(match curve {
        Curve::Ed25519 => KeyData::Ed25519(Ed25519PublicKey(
            point.try_into().map_err(|_| "bad Ed25519 point")?,
        )),
        Curve::Nist(_) => KeyData::Ecdsa(
            EcdsaPublicKey::from_sec1_bytes(point).map_err(|e| format!("bad EC point: {e}"))?,
        ),
    })
}

/// The OpenSSH public key of an RSA object's modulus and exponent.
pub fn rsa_public(modulus: &[u8], exponent: &[u8]) -> Result<KeyData, String> {
    let n = Mpint::from_positive_bytes(modulus).map_err(|e| format!("bad modulus: {e}"))?;
    let e = Mpint::from_positive_bytes(exponent).map_err(|e| format!("bad exponent: {e}"))?;
    Ok(KeyData::Rsa(RsaPublicKey { e, n }))
}

/// `SHA256:…` of a public key.
pub fn fingerprint(key: &KeyData) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

#[cfg(test)]
mod tests;
