//! Each key type and RSA flag signs exactly as OpenSSH's agent would; the
//! signatures are verified with ssh-key (RustCrypto), independently of the
//! OpenSSL code that made them (SHA-1 `ssh-rsa`, which ssh-key cannot
//! verify, is checked with OpenSSL's verifier and by a real sshd in
//! tests/builtin.rs).

use super::*;
use openssl::ec::EcKey;
use openssl::rsa::Rsa;
use signature::Verifier;
use ssh_encoding::Decode;
use ssh_key::private::{
    DsaKeypair, Ed25519Keypair, RsaKeypair, RsaPrivateKey, SkEd25519 as SkEd25519Private,
};
use ssh_key::public::RsaPublicKey;
use ssh_key::{Algorithm, EcdsaCurve, HashAlg, Mpint, Signature};

const DATA: &[u8] = b"some user-auth request";

fn mpint(bn: &openssl::bn::BigNumRef) -> Mpint {
    Mpint::from_positive_bytes(&bn.to_vec()).unwrap()
}

fn rsa_keypair(bits: u32) -> KeypairData {
    let rsa = Rsa::generate(bits).unwrap();
    KeypairData::Rsa(RsaKeypair {
        public: RsaPublicKey {
            e: mpint(rsa.e()),
            n: mpint(rsa.n()),
        },
        private: RsaPrivateKey {
            d: mpint(rsa.d()),
            iqmp: mpint(rsa.iqmp().unwrap()),
            p: mpint(rsa.p().unwrap()),
            q: mpint(rsa.q().unwrap()),
        },
    })
}

fn ed25519_keypair() -> KeypairData {
    KeypairData::Ed25519(Ed25519Keypair::from_seed(&[7u8; 32]))
}

fn ecdsa_keypair(nid: Nid) -> KeypairData {
    let group = EcGroup::from_curve_name(nid).unwrap();
    let ec = EcKey::generate(&group).unwrap();
    let mut ctx = BigNumContext::new().unwrap();
    let public = ec
        .public_key()
        .to_bytes(
            &group,
            openssl::ec::PointConversionForm::UNCOMPRESSED,
            &mut ctx,
        )
        .unwrap();
    let size = match nid {
        Nid::X9_62_PRIME256V1 => 32,
        Nid::SECP384R1 => 48,
        _ => 66,
    };
    let private = ec.private_key().to_vec_padded(size).unwrap();
    let name = match size {
        32 => "ecdsa-sha2-nistp256",
        48 => "ecdsa-sha2-nistp384",
        _ => "ecdsa-sha2-nistp521",
    };
    // The private-key wire form: curve name, point, scalar at full width
    // (ssh-key 0.6 reads only that; the admin socket pads OpenSSH's
    // shorter mpints first, see admin.rs).
    let mut wire = Vec::new();
    put_string(&mut wire, name.as_bytes()[11..].as_ref());
    put_string(&mut wire, &public);
    put_string(&mut wire, &private);
    let alg = Algorithm::new(name).unwrap();
    KeypairData::decode_as(&mut wire.as_slice(), alg).unwrap()
}

fn verify(key: &HeldKey, blob: &[u8], data: &[u8]) -> Signature {
    let sig = Signature::decode(&mut &blob[..]).unwrap();
    key.public().verify(data, &sig).unwrap();
    sig
}

#[test]
fn ed25519_signs_and_ignores_flags() {
    let key = HeldKey::new(&ed25519_keypair()).unwrap();
    for flags in [0, 1, 2, 4, 6, 0xffff_ffff] {
        let blob = key.sign(DATA, flags).unwrap();
        let sig = verify(&key, &blob, DATA);
        assert_eq!(sig.algorithm(), Algorithm::Ed25519);
        // Ed25519 is deterministic: flags change nothing.
        assert_eq!(blob, key.sign(DATA, 0).unwrap());
    }
    assert!(key
        .public()
        .verify(
            b"other data",
            &Signature::decode(&mut &key.sign(DATA, 0).unwrap()[..]).unwrap()
        )
        .is_err());
}

#[test]
fn rsa_flags_pick_the_hash_as_openssh_does() {
    let key = HeldKey::new(&rsa_keypair(2048)).unwrap();
    assert_eq!(key.bits(), 2048);
    for (flags, want) in [
        (RSA_SHA2_256, Some(HashAlg::Sha256)),
        (RSA_SHA2_512, Some(HashAlg::Sha512)),
        // Both: SHA-256 wins (agent_decode_alg checks it first).
        (RSA_SHA2_256 | RSA_SHA2_512, Some(HashAlg::Sha256)),
        (RSA_SHA2_512 | 1 | 8, Some(HashAlg::Sha512)),
    ] {
        let blob = key.sign(DATA, flags).unwrap();
        let sig = verify(&key, &blob, DATA);
        assert_eq!(
            sig.algorithm(),
            Algorithm::Rsa { hash: want },
            "flags {flags}"
        );
        assert_eq!(sig.as_bytes().len(), 256, "padded to the modulus");
    }
    // No SHA-2 flag: ssh-rsa, SHA-1 (ssh-key cannot verify SHA-1; OpenSSL can).
    for flags in [0, 1, 8] {
        let blob = key.sign(DATA, flags).unwrap();
        let mut r = blob.as_slice();
        assert_eq!(String::decode(&mut r).unwrap(), "ssh-rsa");
        let raw = Vec::<u8>::decode(&mut r).unwrap();
        assert!(r.is_empty());
        assert_eq!(raw.len(), 256);
        let mut v = openssl::sign::Verifier::new(MessageDigest::sha1(), &key.pkey).unwrap();
        assert!(v.verify_oneshot(&raw, DATA).unwrap());
    }
}

#[test]
fn rsa_sizes_outside_2048_to_16384_are_refused() {
    let e = HeldKey::new(&rsa_keypair(1024)).unwrap_err();
    assert!(e.0.contains("1024 bits"), "{e}");
    let key = HeldKey::new(&rsa_keypair(3072)).unwrap();
    assert_eq!(key.bits(), 3072);
    verify(&key, &key.sign(DATA, RSA_SHA2_512).unwrap(), DATA);
}

#[test]
fn ecdsa_curves_sign_with_their_hash() {
    for (nid, curve) in [
        (Nid::X9_62_PRIME256V1, EcdsaCurve::NistP256),
        (Nid::SECP384R1, EcdsaCurve::NistP384),
        (Nid::SECP521R1, EcdsaCurve::NistP521),
    ] {
        let key = HeldKey::new(&ecdsa_keypair(nid)).unwrap();
        for flags in [0, RSA_SHA2_256, RSA_SHA2_512] {
            let sig = verify(&key, &key.sign(DATA, flags).unwrap(), DATA);
            assert_eq!(sig.algorithm(), Algorithm::Ecdsa { curve });
        }
    }
}

#[test]
fn inconsistent_keys_are_refused() {
    // Ed25519 whose public half is another key's.
    let KeypairData::Ed25519(mut kp) = ed25519_keypair() else {
        unreachable!()
    };
    kp.public = Ed25519Keypair::from_seed(&[8u8; 32]).public;
    let e = HeldKey::new(&KeypairData::Ed25519(kp)).unwrap_err();
    assert!(e.0.contains("does not match"), "{e}");
    // RSA with a wrong d.
    let KeypairData::Rsa(mut kp) = rsa_keypair(2048) else {
        unreachable!()
    };
    kp.private.d = Mpint::from_positive_bytes(&[3u8; 200]).unwrap();
    assert!(HeldKey::new(&KeypairData::Rsa(kp)).is_err());
    // ECDSA whose point is another key's.
    let a = ecdsa_keypair(Nid::X9_62_PRIME256V1);
    let b = ecdsa_keypair(Nid::X9_62_PRIME256V1);
    let (
        KeypairData::Ecdsa(EcdsaKeypair::NistP256 { private, .. }),
        KeypairData::Ecdsa(EcdsaKeypair::NistP256 { public, .. }),
    ) = (a, b)
    else {
        unreachable!()
    };
    let mixed = KeypairData::Ecdsa(EcdsaKeypair::NistP256 { public, private });
    let e = HeldKey::new(&mixed).unwrap_err();
    assert!(e.0.contains("does not match"), "{e}");
}

#[test]
fn unusable_key_types_are_refused_with_a_message_naming_them() {
    let dsa = KeypairData::decode_as(&mut dsa_wire().as_slice(), Algorithm::Dsa)
        .map(|k| matches!(k, KeypairData::Dsa(DsaKeypair { .. })));
    if let Ok(true) = dsa {
        let k = KeypairData::decode_as(&mut dsa_wire().as_slice(), Algorithm::Dsa).unwrap();
        let e = HeldKey::new(&k).unwrap_err();
        assert!(e.0.contains("DSA"), "{e}");
    }
    let sk = KeypairData::SkEd25519(
        SkEd25519Private::new(
            ssh_key::public::SkEd25519::new(
                ssh_key::public::Ed25519PublicKey([1u8; 32]),
                "ssh:".to_owned(),
            ),
            0,
            Vec::<u8>::new(),
        )
        .unwrap(),
    );
    let e = HeldKey::new(&sk).unwrap_err();
    assert!(e.0.contains("security-key"), "{e}");
    let e = HeldKey::new(&KeypairData::Encrypted(vec![1, 2, 3])).unwrap_err();
    assert!(e.0.contains("encrypted"), "{e}");
}

/// A syntactically valid (not mathematically) DSA private key in wire form.
fn dsa_wire() -> Vec<u8> {
    let mut w = Vec::new();
    for _ in 0..5 {
        put_mpint(&mut w, &[0x11; 20]);
    }
    w
}

#[test]
fn mpint_encoding_matches_openssh() {
    let enc = |b: &[u8]| {
        let mut v = Vec::new();
        put_mpint(&mut v, b);
        v
    };
    assert_eq!(enc(&[]), [0, 0, 0, 0]);
    assert_eq!(enc(&[0, 0]), [0, 0, 0, 0]);
    assert_eq!(enc(&[0x7f]), [0, 0, 0, 1, 0x7f]);
    assert_eq!(enc(&[0x80]), [0, 0, 0, 2, 0, 0x80]);
    assert_eq!(enc(&[0, 0x01, 0x02]), [0, 0, 0, 2, 1, 2]);
}
