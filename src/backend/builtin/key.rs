//! One decrypted key held by the builtin backend, and signing with it in the
//! exact wire encodings OpenSSH's `ssh-agent` produces.
//!
//! Private-key operations are OpenSSL's (the `openssl` crate): constant-time
//! RSA with blinding (never the `rsa` crate: RUSTSEC-2023-0071), Ed25519 and
//! ECDSA P-256/384/521. A key is converted from ssh-key's parsed form once,
//! when it is added, and checked by signing once; a key this backend cannot
//! sign with is refused there, never later.
//!
//! Key material: ssh-key's private types zeroize themselves on drop; the
//! bignums built here either move into OpenSSL's key (whose `RSA_free`,
//! `EC_KEY_free` and Ed25519 key free clear them) or are cleared here before
//! they are dropped (`BN_clear`); no raw byte copy of a secret is made
//! here (OpenSSL reads ssh-key's zeroizing buffers directly). No DER or PEM encoding of a private key is ever made. This
//! module never logs, and never returns key material.

use std::fmt;

use openssl::bn::{BigNum, BigNumContext, BigNumRef};
use openssl::ec::{EcGroup, EcKey, EcPoint};
use openssl::ecdsa::EcdsaSig;
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{Id, PKey, Private};
use openssl::rsa::Rsa;
use openssl::sign::Signer;
use ssh_encoding::Encode;
use ssh_key::private::{EcdsaKeypair, KeypairData};
use ssh_key::public::{EcdsaPublicKey, KeyData};

use crate::protocol::wire::{put_mpint, put_string};

/// SSH_AGENT_RSA_SHA2_256
pub const RSA_SHA2_256: u32 = 2;
/// SSH_AGENT_RSA_SHA2_512
pub const RSA_SHA2_512: u32 = 4;

/// RSA modulus sizes accepted, in bits.
pub const RSA_MIN_BITS: u32 = 2048;
/// See [`RSA_MIN_BITS`].
pub const RSA_MAX_BITS: u32 = 16384;

/// Why a key cannot be held: one line for the log, naming the key type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unusable(pub String);

impl fmt::Display for Unusable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a signature could not be made (an OpenSSL error; never expected for
/// a key that passed [`HeldKey::new`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignFailed(pub String);

impl fmt::Display for SignFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "signing failed: {}", self.0)
    }
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Ed25519,
    Rsa,
    Ecdsa {
        /// "ecdsa-sha2-nistp256" …
        name: &'static str,
        digest: fn() -> MessageDigest,
    },
}

/// A decrypted private key ready to sign, with its public half.
pub struct HeldKey {
    public: KeyData,
    kind: Kind,
    pkey: PKey<Private>,
    bits: u32,
}

impl fmt::Debug for HeldKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeldKey")
            .field("type", &self.type_name())
            .finish_non_exhaustive()
    }
}

fn ossl(what: &str) -> impl Fn(openssl::error::ErrorStack) -> Unusable + '_ {
    move |e| Unusable(format!("{what}: {e}"))
}

impl HeldKey {
    /// Converts a parsed private key; refuses what this backend cannot sign with.
    pub fn new(keypair: &KeypairData) -> Result<Self, Unusable> {
        let key = match keypair {
            KeypairData::Ed25519(kp) => {
                let seed: &[u8; 32] = kp.private.as_ref();
                let pkey = PKey::private_key_from_raw_bytes(seed, Id::ED25519)
                    .map_err(ossl("invalid Ed25519 key"))?;
                let derived = pkey.raw_public_key().map_err(ossl("invalid Ed25519 key"))?;
                if derived.as_slice() != kp.public.as_ref() {
                    return Err(Unusable(
                        "invalid Ed25519 key: the public key does not match the private key"
                            .to_owned(),
                    ));
                }
                Self {
                    public: KeyData::Ed25519(kp.public),
                    kind: Kind::Ed25519,
                    pkey,
                    bits: 256,
                }
            }
            KeypairData::Rsa(kp) => {
                let (pkey, bits) = rsa_key(kp)?;
                Self {
                    public: KeyData::Rsa(kp.public.clone()),
                    kind: Kind::Rsa,
                    pkey,
                    bits,
                }
            }
            KeypairData::Ecdsa(kp) => {
                let (public, nid, private, name, digest): (_, _, &[u8], _, fn() -> MessageDigest) =
                    match kp {
                        EcdsaKeypair::NistP256 { public, private } => (
                            EcdsaPublicKey::NistP256(*public),
                            Nid::X9_62_PRIME256V1,
                            private.as_slice(),
                            "ecdsa-sha2-nistp256",
                            MessageDigest::sha256,
                        ),
                        EcdsaKeypair::NistP384 { public, private } => (
                            EcdsaPublicKey::NistP384(*public),
                            Nid::SECP384R1,
                            private.as_slice(),
                            "ecdsa-sha2-nistp384",
                            MessageDigest::sha384,
                        ),
                        EcdsaKeypair::NistP521 { public, private } => (
                            EcdsaPublicKey::NistP521(*public),
                            Nid::SECP521R1,
                            private.as_slice(),
                            "ecdsa-sha2-nistp521",
                            MessageDigest::sha512,
                        ),
                    };
                let pkey = ec_key(nid, public.as_ref(), private)?;
                let bits = match nid {
                    Nid::X9_62_PRIME256V1 => 256,
                    Nid::SECP384R1 => 384,
                    _ => 521,
                };
                Self {
                    public: KeyData::Ecdsa(public),
                    kind: Kind::Ecdsa { name, digest },
                    pkey,
                    bits,
                }
            }
            KeypairData::Dsa(_) => {
                return Err(Unusable(
                    "DSA (ssh-dss) keys are not supported by the builtin backend".to_owned(),
                ))
            }
            KeypairData::SkEd25519(_) | KeypairData::SkEcdsaSha2NistP256(_) => {
                return Err(Unusable(
                    "security-key (sk-…) keys sign on their hardware token; the builtin \
                     backend cannot use them (use the upstream backend)"
                        .to_owned(),
                ))
            }
            KeypairData::Encrypted(_) => {
                return Err(Unusable(
                    "the key is still encrypted; it must be decrypted before it is added"
                        .to_owned(),
                ))
            }
            other => {
                let name = other
                    .algorithm()
                    .map_or_else(|_| "unknown".to_owned(), |a| a.to_string());
                return Err(Unusable(format!(
                    "key type {name} is not supported by the builtin backend \
                     (Ed25519, RSA {RSA_MIN_BITS}-{RSA_MAX_BITS}, ECDSA P-256/384/521)"
                )));
            }
        };
        // A key that cannot sign is refused now, not at its first use.
        key.sign(b"keyholder: key check", 0)
            .map_err(|e| Unusable(format!("{} key cannot sign: {}", key.type_name(), e.0)))?;
        Ok(key)
    }

    /// The public key.
    pub fn public(&self) -> &KeyData {
        &self.public
    }

    /// The public key as an OpenSSH wire blob.
    pub fn public_blob(&self) -> Vec<u8> {
        let mut blob = Vec::new();
        match self.public.encode(&mut blob) {
            Ok(()) => blob,
            Err(_) => Vec::new(),
        }
    }

    /// e.g. "ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256".
    pub fn type_name(&self) -> &'static str {
        match self.kind {
            Kind::Ed25519 => "ssh-ed25519",
            Kind::Rsa => "ssh-rsa",
            Kind::Ecdsa { name, .. } => name,
        }
    }

    /// Key size in bits.
    pub fn bits(&self) -> u32 {
        self.bits
    }

    /// Signs `data` as OpenSSH's agent does and returns the signature blob
    /// (`string algorithm, string signature`). `flags` matter for RSA only,
    /// as in ssh-agent.c's `agent_decode_alg`: SHA2_256 wins over SHA2_512,
    /// neither means `ssh-rsa` (SHA-1); other bits and other key types
    /// ignore them.
    pub fn sign(&self, data: &[u8], flags: u32) -> Result<Vec<u8>, SignFailed> {
        let fail = |e: openssl::error::ErrorStack| SignFailed(e.to_string());
        let (alg, sig) = match self.kind {
            Kind::Ed25519 => {
                let mut signer = Signer::new_without_digest(&self.pkey).map_err(fail)?;
                (
                    "ssh-ed25519",
                    signer.sign_oneshot_to_vec(data).map_err(fail)?,
                )
            }
            Kind::Rsa => {
                let (alg, md) = rsa_alg(flags);
                let mut signer = Signer::new(md, &self.pkey).map_err(fail)?;
                (alg, signer.sign_oneshot_to_vec(data).map_err(fail)?)
            }
            Kind::Ecdsa { name, digest } => {
                let mut signer = Signer::new(digest(), &self.pkey).map_err(fail)?;
                let der = signer.sign_oneshot_to_vec(data).map_err(fail)?;
                let sig = EcdsaSig::from_der(&der).map_err(fail)?;
                let mut inner = Vec::new();
                put_mpint(&mut inner, &sig.r().to_vec());
                put_mpint(&mut inner, &sig.s().to_vec());
                (name, inner)
            }
        };
        let mut blob = Vec::with_capacity(8 + alg.len() + sig.len());
        put_string(&mut blob, alg.as_bytes());
        put_string(&mut blob, &sig);
        Ok(blob)
    }
}

/// The RSA signature algorithm and digest for SIGN_REQUEST `flags`.
pub fn rsa_alg(flags: u32) -> (&'static str, MessageDigest) {
    if flags & RSA_SHA2_256 != 0 {
        ("rsa-sha2-256", MessageDigest::sha256())
    } else if flags & RSA_SHA2_512 != 0 {
        ("rsa-sha2-512", MessageDigest::sha512())
    } else {
        ("ssh-rsa", MessageDigest::sha1())
    }
}

/// A secret bignum, cleared when dropped (`BigNum`'s own drop is a plain
/// `BN_free`) unless it was handed to an OpenSSL key with [`Secret::into_key`].
struct Secret(BigNum);

impl Secret {
    fn new(what: &str) -> Result<Self, Unusable> {
        Ok(Self(BigNum::new().map_err(ossl(what))?))
    }

    fn from_slice(bytes: &[u8], what: &str) -> Result<Self, Unusable> {
        Ok(Self(BigNum::from_slice(bytes).map_err(ossl(what))?))
    }

    /// For a key that takes ownership (and clears it when freed): an empty
    /// bignum takes its place here.
    fn into_key(mut self, what: &str) -> Result<BigNum, Unusable> {
        let empty = BigNum::new().map_err(ossl(what))?;
        Ok(std::mem::replace(&mut self.0, empty))
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        self.0.clear();
    }
}

impl std::ops::Deref for Secret {
    type Target = BigNumRef;
    fn deref(&self) -> &BigNumRef {
        &self.0
    }
}

impl std::ops::DerefMut for Secret {
    fn deref_mut(&mut self) -> &mut BigNumRef {
        &mut self.0
    }
}

fn rsa_key(kp: &ssh_key::private::RsaKeypair) -> Result<(PKey<Private>, u32), Unusable> {
    let what = "invalid RSA key";
    let n = BigNum::from_slice(kp.public.n.as_positive_bytes().unwrap_or_default())
        .map_err(ossl(what))?;
    let bits = u32::try_from(n.num_bits()).unwrap_or(0);
    if !(RSA_MIN_BITS..=RSA_MAX_BITS).contains(&bits) {
        return Err(Unusable(format!(
            "RSA key of {bits} bits: the builtin backend accepts {RSA_MIN_BITS} to {RSA_MAX_BITS}"
        )));
    }
    let e = BigNum::from_slice(kp.public.e.as_positive_bytes().unwrap_or_default())
        .map_err(ossl(what))?;
    let private = &kp.private;
    fn part(m: &ssh_key::Mpint) -> &[u8] {
        m.as_positive_bytes().unwrap_or_default()
    }
    let d = Secret::from_slice(part(&private.d), what)?;
    let p = Secret::from_slice(part(&private.p), what)?;
    let q = Secret::from_slice(part(&private.q), what)?;
    let iqmp = Secret::from_slice(part(&private.iqmp), what)?;
    // The CRT exponents OpenSSH's format leaves out: d mod (p-1), d mod (q-1).
    // (BN_CTX_free clears the context's temporaries.)
    let mut ctx = BigNumContext::new_secure().map_err(ossl(what))?;
    let one = BigNum::from_u32(1).map_err(ossl(what))?;
    let mut p1 = Secret::new(what)?;
    p1.checked_sub(&p, &one).map_err(ossl(what))?;
    let mut q1 = Secret::new(what)?;
    q1.checked_sub(&q, &one).map_err(ossl(what))?;
    let mut dmp1 = Secret::new(what)?;
    dmp1.nnmod(&d, &p1, &mut ctx).map_err(ossl(what))?;
    let mut dmq1 = Secret::new(what)?;
    dmq1.nnmod(&d, &q1, &mut ctx).map_err(ossl(what))?;
    drop((p1, q1));
    // The secret bignums move into the RSA key, whose free (RSA_free) clears
    // them with BN_clear_free.
    let rsa = Rsa::from_private_components(
        n,
        e,
        d.into_key(what)?,
        p.into_key(what)?,
        q.into_key(what)?,
        dmp1.into_key(what)?,
        dmq1.into_key(what)?,
        iqmp.into_key(what)?,
    )
    .map_err(ossl(what))?;
    match rsa.check_key() {
        Ok(true) => {}
        _ => {
            return Err(Unusable(
                "invalid RSA key: its parameters are inconsistent".to_owned(),
            ))
        }
    }
    let pkey = PKey::from_rsa(rsa).map_err(ossl(what))?;
    Ok((pkey, bits))
}

fn ec_key(nid: Nid, public: &[u8], private: &[u8]) -> Result<PKey<Private>, Unusable> {
    let what = "invalid ECDSA key";
    let group = EcGroup::from_curve_name(nid).map_err(ossl(what))?;
    let mut ctx = BigNumContext::new_secure().map_err(ossl(what))?;
    let point = EcPoint::from_bytes(&group, public, &mut ctx).map_err(ossl(what))?;
    // EC_KEY_set_private_key copies the scalar; this copy is cleared on drop.
    let scalar = Secret::from_slice(private, what)?;
    let ec = EcKey::from_private_components(&group, &scalar, &point).map_err(ossl(what))?;
    drop(scalar);
    ec.check_key().map_err(|_| {
        Unusable("invalid ECDSA key: the public key does not match the private key".to_owned())
    })?;
    PKey::from_ec_key(ec).map_err(ossl(what))
}

#[cfg(test)]
mod tests;
