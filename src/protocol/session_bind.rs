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
//! is parsed here. This module only parses: it never verifies a signature
//! (that is `crate::verify`) and never decides (that is `crate::policy`).

use ssh_encoding::{Decode, Reader};
use ssh_key::public::KeyData;
use ssh_key::{Certificate, Signature};

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
    Cert(Box<Certificate>),
}

impl HostKey {
    /// The key that signs for the host: the plain key, or the certified one.
    pub fn key(&self) -> &KeyData {
        match self {
            Self::Plain(k) => k,
            Self::Cert(c) => c.public_key(),
        }
    }
}

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
        let cert = Certificate::decode(&mut &blob[..]).ok()?;
        encodes_to(&cert, blob).then(|| HostKey::Cert(Box::new(cert)))
    } else {
        let key = KeyData::decode(&mut &blob[..]).ok()?;
        encodes_to(&key, blob).then_some(HostKey::Plain(key))
    }
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
    ) -> Certificate {
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
        assert_eq!(got.public_key(), host.public_key().key_data());
        assert_eq!(b.host_key.key(), host.public_key().key_data());
        assert_eq!(b.host_key_blob, blob);
        // A truncated certificate is malformed.
        for cut in [10, blob.len() / 2, blob.len() - 1] {
            let c = contents(&blob[..cut], &[9; 32], &enc(&sig), 0);
            assert!(parse(&c).is_err(), "{cut}");
        }
    }
}
