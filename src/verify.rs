//! Signature checks for `session-bind@openssh.com`: the host key's signature
//! over the session identifier, and, for a host certificate, its CA's
//! signature over the certificate.
//!
//! Ed25519 and ECDSA P-256/384/521 through ssh-key; RSA (rsa-sha2-256 and
//! rsa-sha2-512 only, never SHA-1 `ssh-rsa`) through the rsa crate, because
//! ssh-key stops at 4096-bit moduli while real hosts use up to 16384. An RSA
//! key with a modulus above [`MAX_RSA_BITS`] or a public exponent above
//! [`MAX_RSA_EXPONENT`] is refused before any arithmetic, so one check costs
//! a bounded amount of work. This is CPU work: callers run it off the async
//! runtime's threads. It never decides whether a host is allowed (that is
//! `crate::policy::destinations`), and never parses wire bytes beyond what
//! it is given.

use rsa::traits::PublicKeyParts;
use signature::Verifier;
use ssh_key::public::KeyData;
use ssh_key::{Algorithm, HashAlg, Signature};

use crate::policy::destinations::{Binding, HostCert};
use crate::protocol::session_bind::{HostKey, SessionBind, CERT_TYPE_HOST};

/// Largest RSA modulus verified, in bits.
pub const MAX_RSA_BITS: usize = 16384;
/// Smallest RSA modulus verified, in bits (OpenSSH's minimum).
pub const MIN_RSA_BITS: usize = 1024;
/// Largest RSA public exponent verified.
pub const MAX_RSA_EXPONENT: u64 = 1 << 32;

/// Verifies a binding; returns it as the facts the policy works on, or why
/// it does not verify.
pub fn binding(bind: &SessionBind) -> Result<Binding, &'static str> {
    let key = bind.host_key.key();
    signed_by(key, &bind.session_id, &bind.signature)
        .map_err(|why| why.unwrap_or("bad signature over the session identifier"))?;
    let cert = match &bind.host_key {
        HostKey::Plain(_) => None,
        HostKey::Cert(cert) => {
            signed_by(&cert.signature_key, &cert.signed, &cert.signature)
                .map_err(|why| why.unwrap_or("bad CA signature on the host certificate"))?;
            Some(HostCert {
                ca: cert.signature_key.clone(),
                host: cert.cert_type == CERT_TYPE_HOST,
                valid_after: cert.valid_after,
                valid_before: cert.valid_before,
            })
        }
    };
    Ok(Binding {
        host_key_blob: bind.host_key_blob.clone(),
        key: key.clone(),
        fingerprint: key.fingerprint(HashAlg::Sha256).to_string(),
        cert,
        session_id: bind.session_id.clone(),
        forwarding: bind.forwarding,
    })
}

/// Whether `signature` by `key` over `message` verifies. `Err(Some(why))`
/// when the key or algorithm is refused without verifying; `Err(None)` when
/// the signature is wrong.
pub fn signed_by(
    key: &KeyData,
    message: &[u8],
    signature: &Signature,
) -> Result<(), Option<&'static str>> {
    match (key, signature.algorithm()) {
        (KeyData::Rsa(rsa_key), Algorithm::Rsa { hash: Some(hash) }) => {
            let public = rsa_public(rsa_key)?;
            let sig = rsa::pkcs1v15::Signature::try_from(signature.as_bytes()).map_err(|_| None)?;
            let ok = match hash {
                HashAlg::Sha256 => rsa::pkcs1v15::VerifyingKey::<sha2::Sha256>::new(public)
                    .verify(message, &sig)
                    .is_ok(),
                HashAlg::Sha512 => rsa::pkcs1v15::VerifyingKey::<sha2::Sha512>::new(public)
                    .verify(message, &sig)
                    .is_ok(),
                _ => return Err(Some("unsupported RSA signature hash")),
            };
            ok.then_some(()).ok_or(None)
        }
        (KeyData::Rsa(_), _) => Err(Some("RSA signature is not rsa-sha2-256 or rsa-sha2-512")),
        (KeyData::Ed25519(_) | KeyData::Ecdsa(_), alg) if alg == key.algorithm() => {
            key.verify(message, signature).map_err(|_| None)
        }
        (KeyData::Ed25519(_) | KeyData::Ecdsa(_), _) => {
            Err(Some("signature algorithm does not match the key"))
        }
        _ => Err(Some("unsupported host key algorithm")),
    }
}

/// The rsa crate's key, within the size limits.
fn rsa_public(
    key: &ssh_key::public::RsaPublicKey,
) -> Result<rsa::RsaPublicKey, Option<&'static str>> {
    let n = key
        .n
        .as_positive_bytes()
        .ok_or(Some("RSA modulus is not positive"))?;
    let e = key
        .e
        .as_positive_bytes()
        .ok_or(Some("RSA exponent is not positive"))?;
    // Leading zeroes are stripped by `as_positive_bytes`: the length is the size.
    if n.len() > MAX_RSA_BITS / 8 {
        return Err(Some("RSA modulus larger than 16384 bits"));
    }
    let n = rsa::BigUint::from_bytes_be(n);
    let e = rsa::BigUint::from_bytes_be(e);
    if n.bits() < MIN_RSA_BITS {
        return Err(Some("RSA modulus smaller than 1024 bits"));
    }
    if e > rsa::BigUint::from(MAX_RSA_EXPONENT) {
        return Err(Some("RSA public exponent larger than 2^32"));
    }
    let public = rsa::RsaPublicKey::new_with_max_size(n, e, MAX_RSA_BITS)
        .map_err(|_| Some("invalid RSA key"))?;
    debug_assert!(public.size() <= MAX_RSA_BITS / 8);
    Ok(public)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::session_bind::parse;
    use crate::protocol::session_bind::tests::{contents, enc, forever, host_cert, signed};
    use ssh_encoding::Encode;
    use ssh_key::certificate::CertType;
    use ssh_key::PrivateKey;

    /// A fresh key from ssh-keygen (`kind` as for `-t`, `bits` for `-b`).
    pub(crate) fn keygen(kind: &str, bits: &str) -> PrivateKey {
        let dir = std::env::temp_dir().join(format!(
            "kh-verify-{}-{kind}-{bits}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("k");
        let o = std::process::Command::new("ssh-keygen")
            .args(["-q", "-N", "", "-t", kind, "-b", bits, "-f"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let key = PrivateKey::read_openssh_file(&path).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        key
    }

    fn ed(seed: u8) -> PrivateKey {
        PrivateKey::from(ssh_key::private::Ed25519Keypair::from_seed(&[seed; 32]))
    }

    fn bind_with(host: &PrivateKey, blob: &[u8], sid: &[u8], fwd: u8) -> SessionBind {
        let sig: Signature = signature::Signer::sign(host, sid);
        parse(&contents(blob, sid, &enc(&sig), fwd)).unwrap()
    }

    #[test]
    fn a_good_ed25519_binding_verifies() {
        let (host, c) = signed(1, &[5; 32], 1);
        let b = binding(&parse(&c).unwrap()).unwrap();
        assert_eq!(&b.key, host.public_key().key_data());
        assert!(b.forwarding);
        assert!(b.cert.is_none());
        assert_eq!(b.session_id, vec![5; 32]);
        assert!(b.fingerprint.starts_with("SHA256:"));
    }

    #[test]
    fn a_signature_over_another_session_or_by_another_key_fails() {
        let host = ed(1);
        let blob = enc(host.public_key().key_data());
        let sig: Signature = signature::Signer::sign(&host, &[6; 32]);
        let b = parse(&contents(&blob, &[5; 32], &enc(&sig), 0)).unwrap();
        assert!(binding(&b).is_err());
        let other = ed(2);
        let sig: Signature = signature::Signer::sign(&other, &[5; 32]);
        let b = parse(&contents(&blob, &[5; 32], &enc(&sig), 0)).unwrap();
        assert!(binding(&b).is_err());
    }

    #[test]
    fn host_certificates_verify_with_their_ca() {
        let (host, ca) = (ed(3), ed(4));
        let cert = host_cert(&host, &ca, CertType::Host, (10, 20));
        let blob = enc(&cert);
        let b = binding(&bind_with(&host, &blob, &[1; 32], 0)).unwrap();
        assert_eq!(
            b.cert,
            Some(HostCert {
                ca: ca.public_key().key_data().clone(),
                host: true,
                valid_after: 10,
                valid_before: 20,
            })
        );
        assert_eq!(&b.key, host.public_key().key_data());
        assert_eq!(b.host_key_blob, blob);
        // A certificate whose CA signature was tampered with.
        let mut bad = blob.clone();
        let at = bad.len() - 10;
        bad[at] ^= 1;
        let b = bind_with(&host, &bad, &[1; 32], 0);
        assert_eq!(binding(&b), Err("bad CA signature on the host certificate"));
        // Signed by the CA but the session signed by another key.
        let b = bind_with(&ed(5), &blob, &[1; 32], 0);
        assert!(binding(&b).is_err());
        // Valid forever (`ssh-keygen -h` without `-V`).
        let blob = forever(&cert, &ca);
        let b = binding(&bind_with(&host, &blob, &[1; 32], 0)).unwrap();
        assert_eq!(
            b.cert.map(|c| (c.valid_after, c.valid_before)),
            Some((10, u64::MAX))
        );
        // A user certificate is read as one (the policy refuses it).
        let user = host_cert(&host, &ca, CertType::User, (10, 20));
        let b = binding(&bind_with(&host, &enc(&user), &[1; 32], 0)).unwrap();
        assert!(!b.cert.unwrap().host);
    }

    /// An RSA public key blob with modulus `n` (big-endian) and exponent `e`.
    fn rsa_blob(n: &[u8], e: &[u8]) -> Vec<u8> {
        let key = KeyData::Rsa(ssh_key::public::RsaPublicKey {
            e: ssh_key::Mpint::from_positive_bytes(e).unwrap(),
            n: ssh_key::Mpint::from_positive_bytes(n).unwrap(),
        });
        enc(&key)
    }

    #[test]
    fn oversized_rsa_keys_are_refused_without_verifying() {
        let sig = Signature::new(
            Algorithm::Rsa {
                hash: Some(HashAlg::Sha512),
            },
            vec![1; 2049],
        )
        .unwrap();
        let big_n = vec![0xff; 16384 / 8 + 1];
        let key = ssh_key::public::KeyData::decode_blob(&rsa_blob(&big_n, &[1, 0, 1]));
        assert_eq!(
            signed_by(&key, b"x", &sig),
            Err(Some("RSA modulus larger than 16384 bits"))
        );
        let n = vec![0xff; 2048 / 8];
        let key = KeyData::decode_blob(&rsa_blob(&n, &[1, 0, 0, 0, 1]));
        assert_eq!(
            signed_by(&key, b"x", &sig),
            Err(Some("RSA public exponent larger than 2^32"))
        );
        let key = KeyData::decode_blob(&rsa_blob(&[0xff; 64], &[1, 0, 1]));
        assert_eq!(
            signed_by(&key, b"x", &sig),
            Err(Some("RSA modulus smaller than 1024 bits"))
        );
        // A 16384-bit modulus is within the limit: verified (and wrong).
        let key = KeyData::decode_blob(&rsa_blob(&vec![0xff; 16384 / 8], &[1, 0, 1]));
        assert_eq!(signed_by(&key, b"x", &sig), Err(None));
    }

    #[test]
    fn rsa_sha2_signatures_verify_and_sha1_is_refused() {
        let host = keygen("rsa", "3072");
        let ssh_key::private::KeypairData::Rsa(pair) = host.key_data() else {
            panic!()
        };
        let int = |m: &ssh_key::Mpint| rsa::BigUint::from_bytes_be(m.as_positive_bytes().unwrap());
        let private = rsa::RsaPrivateKey::from_components(
            int(&pair.public.n),
            int(&pair.public.e),
            int(&pair.private.d),
            vec![int(&pair.private.p), int(&pair.private.q)],
        )
        .unwrap();
        let public = host.public_key().key_data();
        let sid = [2u8; 32];
        let raw256 = signature::SignatureEncoding::to_vec(&signature::Signer::sign(
            &rsa::pkcs1v15::SigningKey::<sha2::Sha256>::new(private.clone()),
            &sid,
        ));
        let raw512 = signature::SignatureEncoding::to_vec(&signature::Signer::sign(
            &rsa::pkcs1v15::SigningKey::<sha2::Sha512>::new(private),
            &sid,
        ));
        let rsa_sig =
            |hash, raw: &[u8]| Signature::new(Algorithm::Rsa { hash }, raw.to_vec()).unwrap();
        assert_eq!(
            signed_by(public, &sid, &rsa_sig(Some(HashAlg::Sha256), &raw256)),
            Ok(())
        );
        assert_eq!(
            signed_by(public, &sid, &rsa_sig(Some(HashAlg::Sha512), &raw512)),
            Ok(())
        );
        // The right signature under the other hash's name, or another session.
        assert_eq!(
            signed_by(public, &sid, &rsa_sig(Some(HashAlg::Sha512), &raw256)),
            Err(None)
        );
        assert_eq!(
            signed_by(public, &[3; 32], &rsa_sig(Some(HashAlg::Sha256), &raw256)),
            Err(None)
        );
        // SHA-1 `ssh-rsa` signatures do not even decode (ssh-key refuses
        // them), so such a binding is malformed.
        assert!(Signature::new(Algorithm::Rsa { hash: None }, raw256.clone()).is_err());
        let mut sha1 = Vec::new();
        "ssh-rsa".encode(&mut sha1).unwrap();
        raw256.encode(&mut sha1).unwrap();
        let c = contents(&enc(public), &sid, &sha1, 0);
        assert_eq!(parse(&c).unwrap_err().reason, "malformed signature");
        // Through a whole binding.
        let blob = enc(public);
        let c = contents(
            &blob,
            &sid,
            &enc(&rsa_sig(Some(HashAlg::Sha512), &raw512)),
            0,
        );
        assert!(binding(&parse(&c).unwrap()).is_ok());
    }

    trait DecodeBlob {
        fn decode_blob(blob: &[u8]) -> KeyData;
    }
    impl DecodeBlob for KeyData {
        fn decode_blob(blob: &[u8]) -> KeyData {
            ssh_encoding::Decode::decode(&mut &blob[..]).unwrap()
        }
    }
}
