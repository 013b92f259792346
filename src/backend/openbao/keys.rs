//! Transit keys as SSH keys: a transit version's public key as an SSH
//! public key (to find the version that equals `NAME.pub`), the transit
//! signing parameters for an SSH signature, and a transit signature turned
//! into SSH's signature blob — verified against the public key before it is
//! handed back.
//!
//! Pure functions over bytes the cluster sent: every malformed value is an
//! error naming what is wrong, never a panic; a signature that does not
//! verify is never returned.

use base64ct::{Base64, Base64Unpadded, Base64Url, Base64UrlUnpadded, Encoding};
use openssl::bn::BigNum;
use openssl::ec::{EcGroup, EcKey, EcPoint, PointConversionForm};
use openssl::ecdsa::EcdsaSig;
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{Id, PKey, Public};
use openssl::rsa::Rsa;
use openssl::sign::Verifier;
use ssh_key::public::{EcdsaPublicKey, Ed25519PublicKey, KeyData, RsaPublicKey};
use ssh_key::Mpint;

use crate::protocol::wire::{put_mpint, put_string};

/// SIGN_REQUEST flag: RSA with SHA-256.
pub const RSA_SHA2_256: u32 = 2;
/// SIGN_REQUEST flag: RSA with SHA-512.
pub const RSA_SHA2_512: u32 = 4;

/// The SSH key types transit can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `ssh-ed25519`
    Ed25519,
    /// `ssh-rsa` (signing as `ssh-rsa`, `rsa-sha2-256` or `rsa-sha2-512`).
    Rsa,
    /// `ecdsa-sha2-nistp256`
    P256,
    /// `ecdsa-sha2-nistp384`
    P384,
    /// `ecdsa-sha2-nistp521`
    P521,
}

/// What transit is asked for one SSH signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Params {
    /// The SSH signature algorithm name.
    pub ssh_alg: &'static str,
    /// transit's `hash_algorithm` (none for Ed25519).
    pub hash: Option<&'static str>,
    /// transit's `signature_algorithm` (RSA only).
    pub signature_algorithm: Option<&'static str>,
    /// transit's `marshaling_algorithm` (ECDSA only: raw `r || s`).
    pub marshaling: Option<&'static str>,
}

impl Kind {
    /// The kind of an SSH public key, or why transit cannot hold it.
    pub fn of(key: &KeyData) -> Result<Self, String> {
        match key {
            KeyData::Ed25519(_) => Ok(Self::Ed25519),
            KeyData::Rsa(_) => Ok(Self::Rsa),
            KeyData::Ecdsa(EcdsaPublicKey::NistP256(_)) => Ok(Self::P256),
            KeyData::Ecdsa(EcdsaPublicKey::NistP384(_)) => Ok(Self::P384),
            KeyData::Ecdsa(EcdsaPublicKey::NistP521(_)) => Ok(Self::P521),
            other => Err(format!(
                "{} keys cannot be held in transit",
                other.algorithm().as_str()
            )),
        }
    }

    /// The transit parameters for SIGN_REQUEST `flags` (RSA only looks at
    /// them, as OpenSSH's agent: SHA2_256 wins over SHA2_512; neither is
    /// SHA-1 `ssh-rsa`).
    pub fn params(self, flags: u32) -> Params {
        let plain = |ssh_alg, hash| Params {
            ssh_alg,
            hash,
            signature_algorithm: None,
            marshaling: None,
        };
        let ecdsa = |ssh_alg, hash| Params {
            marshaling: Some("jws"),
            ..plain(ssh_alg, Some(hash))
        };
        let rsa = |ssh_alg, hash| Params {
            signature_algorithm: Some("pkcs1v15"),
            ..plain(ssh_alg, Some(hash))
        };
        match self {
            Self::Ed25519 => plain("ssh-ed25519", None),
            Self::Rsa if flags & RSA_SHA2_256 != 0 => rsa("rsa-sha2-256", "sha2-256"),
            Self::Rsa if flags & RSA_SHA2_512 != 0 => rsa("rsa-sha2-512", "sha2-512"),
            Self::Rsa => rsa("ssh-rsa", "sha1"),
            Self::P256 => ecdsa("ecdsa-sha2-nistp256", "sha2-256"),
            Self::P384 => ecdsa("ecdsa-sha2-nistp384", "sha2-384"),
            Self::P521 => ecdsa("ecdsa-sha2-nistp521", "sha2-512"),
        }
    }

    /// The transit key types that hold this kind.
    pub fn transit_types(self) -> &'static [&'static str] {
        match self {
            Self::Ed25519 => &["ed25519"],
            Self::Rsa => &["rsa-2048", "rsa-3072", "rsa-4096"],
            Self::P256 => &["ecdsa-p256"],
            Self::P384 => &["ecdsa-p384"],
            Self::P521 => &["ecdsa-p521"],
        }
    }

    fn field_len(self) -> usize {
        match self {
            Self::P256 => 32,
            Self::P384 => 48,
            Self::P521 => 66,
            Self::Ed25519 | Self::Rsa => 0,
        }
    }
}

/// One transit version's `public_key` as an SSH public key (`key_type` is
/// transit's `type`: base64 raw bytes for Ed25519, PEM for RSA and ECDSA).
pub fn transit_public(key_type: &str, public_key: &str) -> Result<KeyData, String> {
    match key_type {
        "ed25519" => {
            let raw = decode_b64(public_key.trim())?;
            let bytes: [u8; 32] = raw
                .as_slice()
                .try_into()
                .map_err(|_| format!("Ed25519 public key of {} bytes", raw.len()))?;
            Ok(KeyData::Ed25519(Ed25519PublicKey(bytes)))
        }
        t if t.starts_with("rsa-") => {
            let rsa = Rsa::public_key_from_pem(public_key.as_bytes())
                .map_err(|e| format!("RSA public key: {e}"))?;
            let mp = |b: &openssl::bn::BigNumRef| {
                Mpint::from_positive_bytes(&b.to_vec()).map_err(|e| format!("RSA public key: {e}"))
            };
            Ok(KeyData::Rsa(RsaPublicKey {
                e: mp(rsa.e())?,
                n: mp(rsa.n())?,
            }))
        }
        t if t.starts_with("ecdsa-") => {
            let pkey = PKey::public_key_from_pem(public_key.as_bytes())
                .map_err(|e| format!("ECDSA public key: {e}"))?;
            let ec = pkey
                .ec_key()
                .map_err(|e| format!("ECDSA public key: {e}"))?;
            let mut ctx = openssl::bn::BigNumContext::new().map_err(|e| e.to_string())?;
            let sec1 = ec
                .public_key()
                .to_bytes(ec.group(), PointConversionForm::UNCOMPRESSED, &mut ctx)
                .map_err(|e| format!("ECDSA public key: {e}"))?;
            EcdsaPublicKey::from_sec1_bytes(&sec1)
                .map(KeyData::Ecdsa)
                .map_err(|e| format!("ECDSA public key: {e}"))
        }
        other => Err(format!(
            "transit key type {other:?} cannot sign SSH requests"
        )),
    }
}

/// A configured key's public half, ready to verify signatures.
pub struct VerifyKey {
    kind: Kind,
    pkey: PKey<Public>,
}

impl std::fmt::Debug for VerifyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyKey")
            .field("kind", &self.kind)
            .finish()
    }
}

impl VerifyKey {
    /// The verifying key of an SSH public key.
    pub fn new(key: &KeyData) -> Result<Self, String> {
        let kind = Kind::of(key)?;
        let bad = |e: openssl::error::ErrorStack| format!("public key: {e}");
        let pkey = match key {
            KeyData::Ed25519(k) => {
                PKey::public_key_from_raw_bytes(&k.0, Id::ED25519).map_err(bad)?
            }
            KeyData::Rsa(k) => {
                let n = positive(&k.n)?;
                let e = positive(&k.e)?;
                PKey::from_rsa(Rsa::from_public_components(n, e).map_err(bad)?).map_err(bad)?
            }
            KeyData::Ecdsa(k) => {
                let nid = match kind {
                    Kind::P256 => Nid::X9_62_PRIME256V1,
                    Kind::P384 => Nid::SECP384R1,
                    _ => Nid::SECP521R1,
                };
                let group = EcGroup::from_curve_name(nid).map_err(bad)?;
                let mut ctx = openssl::bn::BigNumContext::new().map_err(bad)?;
                let point =
                    EcPoint::from_bytes(&group, k.as_sec1_bytes(), &mut ctx).map_err(bad)?;
                PKey::from_ec_key(EcKey::from_public_key(&group, &point).map_err(bad)?)
                    .map_err(bad)?
            }
            _ => return Err("unsupported key type".into()),
        };
        Ok(Self { kind, pkey })
    }

    /// The key's kind.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// SSH's signature blob (`string algorithm, string signature`) of a
    /// transit signature over `data` made with `params`, verified. An error
    /// says what is wrong with what the cluster sent.
    pub fn ssh_signature(
        &self,
        params: &Params,
        raw: &[u8],
        data: &[u8],
    ) -> Result<Vec<u8>, String> {
        let bad = |e: openssl::error::ErrorStack| format!("verifying the signature: {e}");
        let (inner, ok) = match self.kind {
            Kind::Ed25519 => {
                if raw.len() != 64 {
                    return Err(format!("Ed25519 signature of {} bytes (not 64)", raw.len()));
                }
                let mut v = Verifier::new_without_digest(&self.pkey).map_err(bad)?;
                let ok = v.verify_oneshot(raw, data).map_err(bad)?;
                (raw.to_vec(), ok)
            }
            Kind::Rsa => {
                let size = self.pkey.size();
                if raw.len() != size {
                    return Err(format!(
                        "RSA signature of {} bytes (the modulus has {size})",
                        raw.len()
                    ));
                }
                let md = match params.hash {
                    Some("sha2-256") => MessageDigest::sha256(),
                    Some("sha2-512") => MessageDigest::sha512(),
                    _ => MessageDigest::sha1(),
                };
                let mut v = Verifier::new(md, &self.pkey).map_err(bad)?;
                let ok = v.verify_oneshot(raw, data).map_err(bad)?;
                (raw.to_vec(), ok)
            }
            Kind::P256 | Kind::P384 | Kind::P521 => {
                let half = self.kind.field_len();
                if raw.len() != 2 * half {
                    return Err(format!(
                        "ECDSA signature of {} bytes (not {} = r || s)",
                        raw.len(),
                        2 * half
                    ));
                }
                let (r, s) = raw.split_at(half);
                let r = BigNum::from_slice(r).map_err(bad)?;
                let s = BigNum::from_slice(s).map_err(bad)?;
                let mut inner = Vec::with_capacity(2 * half + 10);
                put_mpint(&mut inner, &r.to_vec());
                put_mpint(&mut inner, &s.to_vec());
                let der = EcdsaSig::from_private_components(r, s)
                    .and_then(|sig| sig.to_der())
                    .map_err(bad)?;
                let md = match self.kind {
                    Kind::P256 => MessageDigest::sha256(),
                    Kind::P384 => MessageDigest::sha384(),
                    _ => MessageDigest::sha512(),
                };
                let mut v = Verifier::new(md, &self.pkey).map_err(bad)?;
                let ok = v.verify_oneshot(&der, data).unwrap_or(false);
                (inner, ok)
            }
        };
        if !ok {
            return Err("the cluster's signature does not verify with the key's public key".into());
        }
        let mut blob = Vec::with_capacity(8 + params.ssh_alg.len() + inner.len());
        put_string(&mut blob, params.ssh_alg.as_bytes());
        put_string(&mut blob, &inner);
        Ok(blob)
    }
}

fn positive(m: &Mpint) -> Result<BigNum, String> {
    let bytes = m
        .as_positive_bytes()
        .ok_or("RSA public key component is not positive")?;
    BigNum::from_slice(bytes).map_err(|e| format!("public key: {e}"))
}

/// A transit signature `vault:vN:BASE64` as (N, bytes).
pub fn transit_signature(text: &str) -> Result<(u64, Vec<u8>), String> {
    let mut parts = text.splitn(3, ':');
    let (Some("vault"), Some(version), Some(b64)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err("signature is not of the form vault:vN:…".into());
    };
    let version = version
        .strip_prefix('v')
        .and_then(|v| v.parse::<u64>().ok())
        .ok_or("signature has no key version")?;
    Ok((version, decode_b64(b64)?))
}

/// Base64 in any of the forms transit writes (standard, or URL-safe for
/// JWS-marshalled signatures; padded or not).
pub fn decode_b64(text: &str) -> Result<Vec<u8>, String> {
    Base64::decode_vec(text)
        .or_else(|_| Base64Unpadded::decode_vec(text))
        .or_else(|_| Base64UrlUnpadded::decode_vec(text))
        .or_else(|_| Base64Url::decode_vec(text))
        .map_err(|_| "invalid base64".to_string())
}

/// Standard base64 (transit's `input`).
pub fn encode_b64(bytes: &[u8]) -> String {
    Base64::encode_string(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use openssl::sign::Signer;

    fn ed_pair() -> (PKey<openssl::pkey::Private>, KeyData) {
        let k = PKey::generate_ed25519().unwrap();
        let raw = k.raw_public_key().unwrap();
        let b64 = encode_b64(&raw);
        (k, transit_public("ed25519", &b64).unwrap())
    }

    #[test]
    fn ed25519_signature_is_checked_and_encoded() {
        let (k, public) = ed_pair();
        let v = VerifyKey::new(&public).unwrap();
        let p = v.kind().params(0);
        let mut s = Signer::new_without_digest(&k).unwrap();
        let sig = s.sign_oneshot_to_vec(b"data").unwrap();
        let blob = v.ssh_signature(&p, &sig, b"data").unwrap();
        assert_eq!(&blob[4..15], b"ssh-ed25519");
        assert_eq!(blob.len(), 4 + 11 + 4 + 64);
        assert!(v.ssh_signature(&p, &sig, b"other").is_err());
        assert!(v.ssh_signature(&p, &sig[..63], b"data").is_err());
    }

    #[test]
    fn rsa_flags_pick_the_hash_and_wrong_lengths_fail() {
        let rsa = Rsa::generate(2048).unwrap();
        let pem = String::from_utf8(rsa.public_key_to_pem().unwrap()).unwrap();
        let public = transit_public("rsa-2048", &pem).unwrap();
        let v = VerifyKey::new(&public).unwrap();
        let k = PKey::from_rsa(rsa).unwrap();
        for (flags, md, alg) in [
            (0, MessageDigest::sha1(), "ssh-rsa"),
            (2, MessageDigest::sha256(), "rsa-sha2-256"),
            (4, MessageDigest::sha512(), "rsa-sha2-512"),
            (6, MessageDigest::sha256(), "rsa-sha2-256"),
        ] {
            let p = v.kind().params(flags);
            assert_eq!(p.ssh_alg, alg);
            let sig = Signer::new(md, &k)
                .unwrap()
                .sign_oneshot_to_vec(b"d")
                .unwrap();
            let blob = v.ssh_signature(&p, &sig, b"d").unwrap();
            assert_eq!(&blob[4..4 + alg.len()], alg.as_bytes());
            assert!(v.ssh_signature(&p, &sig[1..], b"d").is_err());
        }
        // A SHA-256 signature offered as rsa-sha2-512 does not verify.
        let sig = Signer::new(MessageDigest::sha256(), &k)
            .unwrap()
            .sign_oneshot_to_vec(b"d")
            .unwrap();
        assert!(v.ssh_signature(&v.kind().params(4), &sig, b"d").is_err());
    }

    #[test]
    fn ecdsa_raw_r_s_becomes_mpints() {
        for (nid, md, len) in [
            (Nid::X9_62_PRIME256V1, MessageDigest::sha256(), 32),
            (Nid::SECP384R1, MessageDigest::sha384(), 48),
            (Nid::SECP521R1, MessageDigest::sha512(), 66),
        ] {
            let group = EcGroup::from_curve_name(nid).unwrap();
            let ec = EcKey::generate(&group).unwrap();
            let pem = String::from_utf8(ec.public_key_to_pem().unwrap()).unwrap();
            let public = transit_public("ecdsa-p256", &pem).unwrap();
            let v = VerifyKey::new(&public).unwrap();
            let k = PKey::from_ec_key(ec).unwrap();
            let der = Signer::new(md, &k)
                .unwrap()
                .sign_oneshot_to_vec(b"x")
                .unwrap();
            let sig = EcdsaSig::from_der(&der).unwrap();
            let mut raw = sig.r().to_vec_padded(len).unwrap();
            raw.extend(sig.s().to_vec_padded(len).unwrap());
            let p = v.kind().params(0);
            let blob = v.ssh_signature(&p, &raw, b"x").unwrap();
            let name = p.ssh_alg.as_bytes();
            assert_eq!(&blob[4..4 + name.len()], name);
            assert!(v.ssh_signature(&p, &raw[..raw.len() - 1], b"x").is_err());
            assert!(v.ssh_signature(&p, &raw, b"y").is_err());
        }
    }

    #[test]
    fn transit_signatures_parse_or_fail_cleanly() {
        assert_eq!(
            transit_signature("vault:v3:AAEC").unwrap(),
            (3, vec![0, 1, 2])
        );
        assert_eq!(
            transit_signature("vault:v1:_-8").unwrap().1,
            vec![0xff, 0xef]
        );
        for bad in [
            "",
            "vault",
            "vault:v1",
            "vault:x:AA",
            "vault:v1:!!",
            "bao:v1:AA",
        ] {
            assert!(transit_signature(bad).is_err(), "{bad}");
        }
        assert!(transit_public("ed25519", "AAAA").is_err());
        assert!(transit_public("rsa-2048", "not pem").is_err());
        assert!(transit_public("aes256-gcm96", "").is_err());
    }
}
