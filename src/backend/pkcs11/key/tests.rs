//! Each key type and RSA flag turns a token's raw answer into the blob
//! OpenSSH's agent would send, checked with ssh-key (RustCrypto), apart
//! from the OpenSSL code that verifies it here; answers of the wrong length
//! or that do not verify are never encoded.

use super::*;
use openssl::ec::PointConversionForm;
use openssl::pkey::Private;
use openssl::sign::Signer;
use signature::Verifier as _;
use ssh_encoding::Decode;
use ssh_key::{Algorithm, Signature};

const DATA: &[u8] = b"an SSH user-auth request";

fn ed25519() -> (PKey<Private>, KeyData) {
    let pkey = PKey::generate_ed25519().unwrap();
    let raw = pkey.raw_public_key().unwrap();
    let public = KeyData::Ed25519(Ed25519PublicKey(raw.try_into().unwrap()));
    (pkey, public)
}

fn ecdsa(nid: Nid) -> (EcKey<Private>, KeyData) {
    let group = EcGroup::from_curve_name(nid).unwrap();
    let ec = EcKey::generate(&group).unwrap();
    let mut ctx = openssl::bn::BigNumContext::new().unwrap();
    let point = ec
        .public_key()
        .to_bytes(&group, PointConversionForm::UNCOMPRESSED, &mut ctx)
        .unwrap();
    let public = KeyData::Ecdsa(EcdsaPublicKey::from_sec1_bytes(&point).unwrap());
    (ec, public)
}

fn rsa() -> (PKey<Private>, KeyData) {
    let rsa = Rsa::generate(2048).unwrap();
    let public = rsa_public(&rsa.n().to_vec(), &rsa.e().to_vec()).unwrap();
    (PKey::from_rsa(rsa).unwrap(), public)
}

fn decode(blob: &[u8]) -> Signature {
    Signature::decode(&mut &blob[..]).unwrap()
}

#[test]
fn ed25519_answers_become_verified_blobs() {
    let (pkey, public) = ed25519();
    let key = SigningKey::new(&public).unwrap();
    let prepared = key.prepare(DATA, 4).unwrap();
    assert_eq!(prepared.mechanism, Mechanism::Eddsa);
    assert_eq!(prepared.input, DATA);
    let raw = Signer::new_without_digest(&pkey)
        .unwrap()
        .sign_oneshot_to_vec(DATA)
        .unwrap();
    let blob = key.finish(&prepared, DATA, &raw).unwrap();
    let sig = decode(&blob);
    assert_eq!(sig.algorithm(), Algorithm::Ed25519);
    public.verify(DATA, &sig).unwrap();
    // Exactly string "ssh-ed25519", string sig.
    let mut want = Vec::new();
    put_string(&mut want, b"ssh-ed25519");
    put_string(&mut want, &raw);
    assert_eq!(blob, want);

    assert_eq!(
        key.finish(&prepared, DATA, &raw[..63]),
        Err(BadSignature::Length { got: 63, want: 64 })
    );
    let mut bad = raw.clone();
    bad[10] ^= 1;
    assert_eq!(
        key.finish(&prepared, DATA, &bad),
        Err(BadSignature::Invalid)
    );
    assert_eq!(
        key.finish(&prepared, b"other data", &raw),
        Err(BadSignature::Invalid)
    );
}

#[test]
fn ecdsa_answers_become_mpint_pairs_over_the_right_digest() {
    for (nid, alg, md, scalar) in [
        (
            Nid::X9_62_PRIME256V1,
            "ecdsa-sha2-nistp256",
            MessageDigest::sha256(),
            32,
        ),
        (
            Nid::SECP384R1,
            "ecdsa-sha2-nistp384",
            MessageDigest::sha384(),
            48,
        ),
        (
            Nid::SECP521R1,
            "ecdsa-sha2-nistp521",
            MessageDigest::sha512(),
            66,
        ),
    ] {
        let (ec, public) = ecdsa(nid);
        let key = SigningKey::new(&public).unwrap();
        let prepared = key.prepare(DATA, 2).unwrap();
        assert_eq!(prepared.mechanism, Mechanism::Ecdsa);
        assert_eq!(prepared.input, hash(md, DATA).unwrap().to_vec());
        // Several signatures, so that some r or s has its high bit set or
        // a leading zero byte.
        for _ in 0..8 {
            let sig = EcdsaSig::sign(&prepared.input, &ec).unwrap();
            let mut raw = sig.r().to_vec_padded(scalar as i32).unwrap();
            raw.extend(sig.s().to_vec_padded(scalar as i32).unwrap());
            let blob = key.finish(&prepared, DATA, &raw).unwrap();
            let decoded = decode(&blob);
            assert_eq!(decoded.algorithm().as_str(), alg);
            public.verify(DATA, &decoded).unwrap();
            let mut inner = Vec::new();
            put_mpint(&mut inner, &raw[..scalar]);
            put_mpint(&mut inner, &raw[scalar..]);
            assert_eq!(decoded.as_bytes(), inner);
        }
        let zeros = vec![0u8; 2 * scalar];
        assert_eq!(
            key.finish(&prepared, DATA, &zeros),
            Err(BadSignature::Invalid)
        );
        assert_eq!(
            key.finish(&prepared, DATA, &zeros[1..]),
            Err(BadSignature::Length {
                got: 2 * scalar - 1,
                want: 2 * scalar
            })
        );
    }
}

#[test]
fn mpints_are_encoded_as_openssh_does() {
    let mut out = Vec::new();
    put_mpint(&mut out, &[0x00, 0x00, 0x80, 0x01]);
    assert_eq!(out, [0, 0, 0, 3, 0x00, 0x80, 0x01]);
    out.clear();
    put_mpint(&mut out, &[0x00, 0x7f]);
    assert_eq!(out, [0, 0, 0, 1, 0x7f]);
}

#[test]
fn rsa_flags_pick_the_mechanism_and_the_blob_verifies() {
    let (pkey, public) = rsa();
    let key = SigningKey::new(&public).unwrap();
    for (flags, mechanism, alg, md) in [
        (0, Mechanism::Sha1RsaPkcs, "ssh-rsa", MessageDigest::sha1()),
        (
            2,
            Mechanism::Sha256RsaPkcs,
            "rsa-sha2-256",
            MessageDigest::sha256(),
        ),
        (
            4,
            Mechanism::Sha512RsaPkcs,
            "rsa-sha2-512",
            MessageDigest::sha512(),
        ),
        (
            6,
            Mechanism::Sha256RsaPkcs,
            "rsa-sha2-256",
            MessageDigest::sha256(),
        ),
    ] {
        let prepared = key.prepare(DATA, flags).unwrap();
        assert_eq!(prepared.mechanism, mechanism, "flags {flags}");
        let raw = Signer::new(md, &pkey)
            .unwrap()
            .sign_oneshot_to_vec(DATA)
            .unwrap();
        let blob = key.finish(&prepared, DATA, &raw).unwrap();
        let mut want = Vec::new();
        put_string(&mut want, alg.as_bytes());
        put_string(&mut want, &raw);
        assert_eq!(blob, want, "flags {flags}");
        if flags != 0 {
            public.verify(DATA, &decode(&blob)).unwrap();
        }
        assert_eq!(
            key.finish(&prepared, DATA, &raw[1..]),
            Err(BadSignature::Length {
                got: 255,
                want: 256
            })
        );
    }
    // A SHA-256 signature answered to a SHA-1 request does not verify.
    let raw = Signer::new(MessageDigest::sha256(), &pkey)
        .unwrap()
        .sign_oneshot_to_vec(DATA)
        .unwrap();
    let prepared = key.prepare(DATA, 0).unwrap();
    assert_eq!(
        key.finish(&prepared, DATA, &raw),
        Err(BadSignature::Invalid)
    );
}

#[test]
fn ec_params_accept_oids_and_the_printable_string() {
    assert_eq!(
        ec_params(&[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07]),
        Some(Curve::Nist(EcdsaCurve::NistP256))
    );
    assert_eq!(
        ec_params(&[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x23]),
        Some(Curve::Nist(EcdsaCurve::NistP521))
    );
    assert_eq!(
        ec_params(&[0x06, 0x03, 0x2b, 0x65, 0x70]),
        Some(Curve::Ed25519)
    );
    let mut printable = vec![0x13, 12];
    printable.extend(b"edwards25519");
    assert_eq!(ec_params(&printable), Some(Curve::Ed25519));
    assert_eq!(ec_params(&[0x13, 5, b'x', b'y']), None);
    assert_eq!(ec_params(&[0x06, 0x03, 0x2b, 0x65, 0x71]), None);
    assert_eq!(ec_params(&[]), None);
}

#[test]
fn ec_points_are_read_wrapped_or_raw() {
    let point: Vec<u8> = (0..32).collect();
    let mut der = vec![0x04, 32];
    der.extend(&point);
    assert_eq!(ec_point(&der, 32), Some(&point[..]));
    assert_eq!(ec_point(&point, 32), Some(&point[..]));
    // A raw point that happens to start like a shorter DER string.
    let mut tricky = vec![0x04, 30];
    tricky.extend(&point[..30]);
    assert_eq!(ec_point(&tricky, 32), Some(&tricky[..]));
    let long: Vec<u8> = std::iter::once(4).chain(1..=132).collect();
    let mut der = vec![0x04, 0x81, 133];
    der.extend(&long);
    assert_eq!(ec_point(&der, 133), Some(&long[..]));
    assert_eq!(ec_point(&der[..20], 133), None);

    let (_, public) = ed25519();
    let KeyData::Ed25519(k) = &public else {
        unreachable!()
    };
    let mut printable = vec![0x13, 12];
    printable.extend(b"edwards25519");
    let mut wrapped = vec![0x04, 32];
    wrapped.extend(k.as_ref());
    assert_eq!(ec_public(&printable, &wrapped).unwrap(), public);
    assert!(ec_public(&[0x13, 1, b'x'], &wrapped).is_err());
}

#[test]
fn keys_a_token_cannot_hold_are_refused() {
    let dsa = KeyData::Dsa(ssh_key::public::DsaPublicKey {
        p: Mpint::from_positive_bytes(&[7]).unwrap(),
        q: Mpint::from_positive_bytes(&[5]).unwrap(),
        g: Mpint::from_positive_bytes(&[2]).unwrap(),
        y: Mpint::from_positive_bytes(&[3]).unwrap(),
    });
    assert!(SigningKey::new(&dsa)
        .unwrap_err()
        .contains("cannot be used"));
}
