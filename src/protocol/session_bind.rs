//! Parsing of the `session-bind@openssh.com` extension's contents
//! (OpenSSH's PROTOCOL.agent):
//!
//! ```text
//! string  hostkey        (a plain host key, or a host certificate)
//! string  session identifier
//! string  signature      (by the host key, over the session identifier)
//! bool    is_forwarding
//! ```
//!
//! Strict: every field in canonical form (each blob encodes back to exactly
//! its bytes), no trailing bytes, a session identifier of 1 to
//! [`MAX_SESSION_ID_LEN`] bytes, a host key of at most [`MAX_HOST_KEY_LEN`],
//! a forwarding flag of 0 or 1. ssh-agent-lib's
//! `SessionBind` decodes a host certificate as a plain key, so the host key
//! is parsed here. A host certificate is read field by field (OpenSSH's
//! PROTOCOL.certkeys), keeping only what a check needs: ssh-key 0.6's
//! `Certificate` refuses a `valid_before` above `i64::MAX`, and
//! `ssh-keygen -h` without `-V` writes `u64::MAX` ("forever"), the usual
//! host certificate. This module only parses: it never verifies a signature
//! (that is `crate::verify`) and never decides (that is `crate::policy`).

use ssh_encoding::{Decode, Encode, Reader};
use ssh_key::public::{EcdsaPublicKey, Ed25519PublicKey, KeyData, RsaPublicKey};
use ssh_key::{Algorithm, Signature};

use super::request::encodes_to;

/// OpenSSH's `AGENT_MAX_SID_LEN`.
pub const MAX_SESSION_ID_LEN: usize = 128;
/// The largest host key blob accepted. Real ones are far smaller (an
/// RSA-16384 host certificate signed by an RSA-16384 CA is under 5 KiB); a
/// connection keeps up to 16 of them, so this bounds what bindings cost per
/// connection at what one pending message may already cost (256 KiB).
pub const MAX_HOST_KEY_LEN: usize = 16 * 1024;

/// The host key a client bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostKey {
    /// A plain public key.
    Plain(KeyData),
    /// A host certificate (its key signed by a CA).
    Cert(Box<HostCertificate>),
}

impl HostKey {
    /// The key that signs for the host: the plain key, or the certified one.
    pub fn key(&self) -> &KeyData {
        match self {
            Self::Plain(k) => k,
            Self::Cert(c) => &c.key,
        }
    }
}

/// What keyholder needs of an OpenSSH certificate (the certified key, its
/// type, its validity, and the CA's signature with what it covers); nonce,
/// serial, key ID, principals, options and extensions are read past.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostCertificate {
    /// The certified key.
    pub key: KeyData,
    /// Certificate type: 1 user, 2 host.
    pub cert_type: u32,
    /// Valid from (Unix seconds, inclusive).
    pub valid_after: u64,
    /// Valid until (Unix seconds, exclusive); `u64::MAX` is "forever".
    pub valid_before: u64,
    /// The CA key that signed it.
    pub signature_key: KeyData,
    /// The CA's signature.
    pub signature: Signature,
    /// What the CA signed: the certificate's bytes up to its signature.
    pub signed: Vec<u8>,
}

/// OpenSSH's SSH2_CERT_TYPE_HOST.
pub const CERT_TYPE_HOST: u32 = 2;

/// A well-formed binding (not yet verified).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionBind {
    /// The host key, decoded.
    pub host_key: HostKey,
    /// The host key's wire blob, as sent (what user-auth data carries).
    pub host_key_blob: Vec<u8>,
    /// The session identifier (exchange hash of the first key exchange).
    pub session_id: Vec<u8>,
    /// The host's signature over the session identifier.
    pub signature: Signature,
    /// Whether the client bound this connection for agent forwarding.
    pub forwarding: bool,
}

/// Why a binding is malformed, and the forwarding flag when it could be read
/// (a flag that could not be read is unknown, not "no").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Malformed {
    /// What was wrong.
    pub reason: &'static str,
    /// The forwarding flag, if the outer fields parsed.
    pub forwarding: Option<bool>,
}

/// Parses the contents of a `session-bind@openssh.com` extension (the bytes
/// after its name). Never panics.
pub fn parse(contents: &[u8]) -> Result<SessionBind, Malformed> {
    let r = &mut &contents[..];
    let outer = |reason| Malformed {
        reason,
        forwarding: None,
    };
    let host_key_blob = Vec::<u8>::decode(r).map_err(|_| outer("malformed host key"))?;
    let session_id = Vec::<u8>::decode(r).map_err(|_| outer("malformed session identifier"))?;
    let signature_blob = Vec::<u8>::decode(r).map_err(|_| outer("malformed signature"))?;
    let forwarding = match u8::decode(r) {
        Ok(0) => false,
        Ok(1) => true,
        Ok(_) => return Err(outer("forwarding flag is not 0 or 1")),
        Err(_) => return Err(outer("missing forwarding flag")),
    };
    if !r.is_finished() {
        return Err(outer("trailing bytes"));
    }
    let inner = |reason| Malformed {
        reason,
        forwarding: Some(forwarding),
    };
    if session_id.is_empty() {
        return Err(inner("empty session identifier"));
    }
    if session_id.len() > MAX_SESSION_ID_LEN {
        return Err(inner("session identifier longer than 128 bytes"));
    }
    if host_key_blob.len() > MAX_HOST_KEY_LEN {
        return Err(inner("host key larger than 16 KiB"));
    }
    let host_key = parse_host_key(&host_key_blob).ok_or(inner("malformed host key"))?;
    let signature = Signature::decode(&mut signature_blob.as_slice())
        .ok()
        .filter(|s| encodes_to(s, &signature_blob))
        .ok_or(inner("malformed signature"))?;
    Ok(SessionBind {
        host_key,
        host_key_blob,
        session_id,
        signature,
        forwarding,
    })
}

/// A host key blob: a certificate when its algorithm name says so, else a
/// plain key; canonical either way.
pub fn parse_host_key(blob: &[u8]) -> Option<HostKey> {
    let name = String::decode(&mut &blob[..]).ok()?;
    if name.ends_with("-cert-v01@openssh.com") {
        parse_certificate(blob).map(|c| HostKey::Cert(Box::new(c)))
    } else {
        let key = KeyData::decode(&mut &blob[..]).ok()?;
        encodes_to(&key, blob).then_some(HostKey::Plain(key))
    }
}

/// Decodes one `T` from `r`, which must be in canonical form (the bytes it
/// took encode back from it exactly).
fn take<T: Decode + Encode>(r: &mut &[u8]) -> Option<T> {
    let before = *r;
    let value = T::decode(r).ok()?;
    let used = before.get(..before.len() - r.len())?;
    encodes_to(&value, used).then_some(value)
}

/// An OpenSSH certificate of an Ed25519, ECDSA or RSA key (PROTOCOL.certkeys):
///
/// ```text
/// string  "<key type>-cert-v01@openssh.com"
/// string  nonce
/// ...     the key's public fields, as in its plain blob after the name
/// uint64  serial
/// uint32  type
/// string  key id
/// string  valid principals
/// uint64  valid after
/// uint64  valid before
/// string  critical options
/// string  extensions
/// string  reserved
/// string  signature key
/// string  signature
/// ```
///
/// Every field canonical, nothing after the signature.
fn parse_certificate(blob: &[u8]) -> Option<HostCertificate> {
    let r = &mut &blob[..];
    let name: String = take(r)?;
    let algorithm = Algorithm::new_certificate(&name).ok()?;
    let _nonce: Vec<u8> = take(r)?;
    let key = match algorithm {
        Algorithm::Ed25519 => KeyData::Ed25519(take::<Ed25519PublicKey>(r)?),
        Algorithm::Ecdsa { .. } => KeyData::Ecdsa(take::<EcdsaPublicKey>(r)?),
        Algorithm::Rsa { .. } => KeyData::Rsa(take::<RsaPublicKey>(r)?),
        _ => return None,
    };
    // An ECDSA certificate's curve must be the one its name says.
    if key.algorithm() != algorithm {
        return None;
    }
    let _serial: u64 = take(r)?;
    let cert_type: u32 = take(r)?;
    let _key_id: Vec<u8> = take(r)?;
    let _principals: Vec<u8> = take(r)?;
    let valid_after: u64 = take(r)?;
    let valid_before: u64 = take(r)?;
    let _critical_options: Vec<u8> = take(r)?;
    let _extensions: Vec<u8> = take(r)?;
    let _reserved: Vec<u8> = take(r)?;
    let ca_blob: Vec<u8> = take(r)?;
    let signed = blob.get(..blob.len() - r.len())?.to_vec();
    let signature_blob: Vec<u8> = take(r)?;
    if !r.is_empty() {
        return None;
    }
    let signature_key: KeyData = take(&mut &ca_blob[..]).filter(|k| encodes_to(k, &ca_blob))?;
    let signature: Signature =
        take(&mut &signature_blob[..]).filter(|s| encodes_to(s, &signature_blob))?;
    Some(HostCertificate {
        key,
        cert_type,
        valid_after,
        valid_before,
        signature_key,
        signature,
        signed,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use ssh_encoding::Encode;
    use ssh_key::{Algorithm, PrivateKey};

    /// The wire encoding of `v`.
    pub(crate) fn enc(v: &(impl Encode + ?Sized)) -> Vec<u8> {
        let mut out = Vec::new();
        v.encode(&mut out).unwrap();
        out
    }

    /// The contents of a session-bind extension from raw parts.
    pub(crate) fn contents(host_key: &[u8], sid: &[u8], sig: &[u8], fwd: u8) -> Vec<u8> {
        let mut c = Vec::new();
        host_key.encode(&mut c).unwrap();
        sid.encode(&mut c).unwrap();
        sig.encode(&mut c).unwrap();
        c.push(fwd);
        c
    }

    /// A host key (deterministic ed25519), and a binding it signed.
    pub(crate) fn signed(seed: u8, sid: &[u8], fwd: u8) -> (PrivateKey, Vec<u8>) {
        let host = PrivateKey::from(ssh_key::private::Ed25519Keypair::from_seed(&[seed; 32]));
        let blob = enc(host.public_key().key_data());
        let sig: Signature = signature::Signer::sign(&host, sid);
        let c = contents(&blob, sid, &enc(&sig), fwd);
        (host, c)
    }

    #[test]
    fn well_formed_binding_is_parsed() {
        let (host, c) = signed(1, &[9; 32], 0);
        let b = parse(&c).unwrap();
        assert_eq!(
            b.host_key,
            HostKey::Plain(host.public_key().key_data().clone())
        );
        assert_eq!(b.session_id, vec![9; 32]);
        assert!(!b.forwarding);
        assert_eq!(b.signature.algorithm(), Algorithm::Ed25519);
        let (_, c) = signed(1, &[9; 32], 1);
        assert!(parse(&c).unwrap().forwarding);
    }

    #[test]
    fn every_truncation_and_any_trailing_byte_is_malformed() {
        let (_, c) = signed(1, &[9; 32], 1);
        for cut in 0..c.len() {
            let e = parse(&c[..cut]).unwrap_err();
            assert_eq!(e.forwarding, None, "{cut}");
        }
        let mut long = c.clone();
        long.push(0);
        assert_eq!(parse(&long).unwrap_err().reason, "trailing bytes");
    }

    #[test]
    fn flag_and_session_id_are_strict() {
        let (host, _) = signed(1, &[9; 32], 0);
        let blob = enc(host.public_key().key_data());
        let sig: Signature = signature::Signer::sign(&host, &[9; 32]);
        let sig = enc(&sig);
        let e = parse(&contents(&blob, &[9; 32], &sig, 2)).unwrap_err();
        assert_eq!(e.reason, "forwarding flag is not 0 or 1");
        let e = parse(&contents(&blob, &[], &sig, 1)).unwrap_err();
        assert_eq!(
            e,
            Malformed {
                reason: "empty session identifier",
                forwarding: Some(true)
            }
        );
        assert!(parse(&contents(&blob, &[1; 128], &sig, 0)).is_ok());
        let e = parse(&contents(&blob, &[1; 129], &sig, 0)).unwrap_err();
        assert_eq!(e.reason, "session identifier longer than 128 bytes");
        assert_eq!(e.forwarding, Some(false));
        let e = parse(&contents(&[0; MAX_HOST_KEY_LEN + 1], &[1; 32], &sig, 0)).unwrap_err();
        assert_eq!(e.reason, "host key larger than 16 KiB");
    }

    #[test]
    fn host_key_and_signature_must_be_canonical() {
        let (host, _) = signed(1, &[9; 32], 0);
        let blob = enc(host.public_key().key_data());
        let sig: Signature = signature::Signer::sign(&host, &[9; 32]);
        let sig = enc(&sig);
        // Junk after the key inside its blob.
        let mut bad = blob.clone();
        bad.extend([0, 0, 0, 0]);
        let e = parse(&contents(&bad, &[9; 32], &sig, 0)).unwrap_err();
        assert_eq!(e.reason, "malformed host key");
        // The key's inner length disagreeing with the blob.
        let mut bad = blob.clone();
        bad[15..19].copy_from_slice(&40u32.to_be_bytes());
        assert!(parse(&contents(&bad, &[9; 32], &sig, 0)).is_err());
        let mut bad = sig.clone();
        bad.push(0);
        let e = parse(&contents(&blob, &[9; 32], &bad, 0)).unwrap_err();
        assert_eq!(e.reason, "malformed signature");
        assert!(parse(&contents(b"", &[9; 32], &sig, 0)).is_err());
        assert!(parse(&contents(&blob, &[9; 32], b"", 0)).is_err());
    }

    /// A host certificate signed by `ca` for `host`.
    pub(crate) fn host_cert(
        host: &PrivateKey,
        ca: &PrivateKey,
        cert_type: ssh_key::certificate::CertType,
        valid: (u64, u64),
    ) -> ssh_key::Certificate {
        let mut b = ssh_key::certificate::Builder::new(
            [7u8; 16],
            host.public_key().key_data().clone(),
            valid.0,
            valid.1,
        )
        .unwrap();
        b.cert_type(cert_type).unwrap();
        b.key_id("host").unwrap();
        b.all_principals_valid().unwrap();
        b.sign(ca).unwrap()
    }

    #[test]
    fn host_certificate_is_parsed_as_one() {
        let host = PrivateKey::from(ssh_key::private::Ed25519Keypair::from_seed(&[3; 32]));
        let ca = PrivateKey::from(ssh_key::private::Ed25519Keypair::from_seed(&[4; 32]));
        let cert = host_cert(
            &host,
            &ca,
            ssh_key::certificate::CertType::Host,
            (0, 1 << 40),
        );
        let blob = enc(&cert);
        let sig: Signature = signature::Signer::sign(&host, &[9; 32]);
        let b = parse(&contents(&blob, &[9; 32], &enc(&sig), 0)).unwrap();
        let HostKey::Cert(got) = &b.host_key else {
            panic!("{:?}", b.host_key)
        };
        assert_eq!(&got.key, host.public_key().key_data());
        assert_eq!(got.cert_type, CERT_TYPE_HOST);
        assert_eq!((got.valid_after, got.valid_before), (0, 1 << 40));
        assert_eq!(&got.signature_key, ca.public_key().key_data());
        assert_eq!(&got.signature, cert.signature());
        assert_eq!(
            got.signed,
            blob[..blob.len() - enc(cert.signature()).len() - 4]
        );
        assert_eq!(b.host_key.key(), host.public_key().key_data());
        assert_eq!(b.host_key_blob, blob);
        // A truncated certificate is malformed.
        for cut in [10, blob.len() / 2, blob.len() - 1] {
            let c = contents(&blob[..cut], &[9; 32], &enc(&sig), 0);
            assert!(parse(&c).is_err(), "{cut}");
        }
    }

    /// `cert` with its `valid_before` replaced by `u64::MAX` ("forever", what
    /// `ssh-keygen -h` without `-V` writes) and signed again by `ca`: ssh-key
    /// cannot build one, so the bytes are edited and re-signed here.
    pub(crate) fn forever(cert: &ssh_key::Certificate, ca: &PrivateKey) -> Vec<u8> {
        let blob = enc(cert);
        let sig_len = enc(cert.signature()).len() + 4;
        let mut signed = blob[..blob.len() - sig_len].to_vec();
        // valid_before sits right after valid_after, before the three
        // trailing strings (options, extensions, reserved) and the CA key.
        let tail = enc(cert.critical_options()).len()
            + enc(cert.extensions()).len()
            + 4 // reserved, empty
            + 4 + enc(cert.signature_key()).len();
        let at = signed.len() - tail - 8;
        assert_eq!(signed[at..at + 8], cert.valid_before().to_be_bytes());
        signed[at..at + 8].copy_from_slice(&u64::MAX.to_be_bytes());
        let sig: Signature = signature::Signer::sign(ca, &signed);
        signed.extend(enc(&enc(&sig)));
        signed
    }

    #[test]
    fn a_host_certificate_valid_forever_is_parsed() {
        let host = PrivateKey::from(ssh_key::private::Ed25519Keypair::from_seed(&[3; 32]));
        let ca = PrivateKey::from(ssh_key::private::Ed25519Keypair::from_seed(&[4; 32]));
        let cert = host_cert(
            &host,
            &ca,
            ssh_key::certificate::CertType::Host,
            (0, 1 << 40),
        );
        let blob = forever(&cert, &ca);
        // ssh-key itself refuses it.
        assert!(ssh_key::Certificate::decode(&mut &blob[..]).is_err());
        let sig: Signature = signature::Signer::sign(&host, &[9; 32]);
        let b = parse(&contents(&blob, &[9; 32], &enc(&sig), 0)).unwrap();
        let HostKey::Cert(got) = &b.host_key else {
            panic!("{:?}", b.host_key)
        };
        assert_eq!((got.valid_after, got.valid_before), (0, u64::MAX));
        assert_eq!(&got.key, host.public_key().key_data());
        // Trailing bytes, and a name that is no certificate algorithm.
        let mut bad = blob.clone();
        bad.push(0);
        assert!(parse_host_key(&bad).is_none());
        let mut renamed = blob.clone();
        renamed.splice(4..4 + 32, *b"ecdsa-sha2-nistp256-cert-v01@ope");
        assert!(parse_host_key(&renamed).is_none());
    }
}
