//! Parsing of the data in a sign request as an SSH user-authentication
//! request (RFC 4252 §7, and OpenSSH's `publickey-hostbound-v00@openssh.com`):
//!
//! ```text
//! string  session identifier
//! byte    SSH_MSG_USERAUTH_REQUEST (50)
//! string  user name
//! string  service name ("ssh-connection")
//! string  "publickey" | "publickey-hostbound-v00@openssh.com"
//! boolean TRUE
//! string  public key algorithm name
//! string  public key blob
//! string  server host key               (hostbound only)
//! ```
//!
//! The same checks as OpenSSH's `ssh-agent` (`parse_userauth_request`):
//! non-empty session id, the right service, a signature flag of TRUE, a key
//! blob that is the signing key (or a certificate of it), no trailing bytes.
//! The key blob is returned (what the target sees is what the certificate
//! rules check), and the session id and the host key of a host-bound
//! request for the destination rules.

use ssh_agent_lib::proto::PublicCredential;
use ssh_encoding::{Decode, Reader};
use ssh_key::public::KeyData;

/// SSH_MSG_USERAUTH_REQUEST
const USERAUTH_REQUEST: u8 = 50;
/// The method names accepted.
pub const PUBLICKEY: &str = "publickey";
/// OpenSSH 8.9+'s host-bound public key method.
pub const PUBLICKEY_HOSTBOUND: &str = "publickey-hostbound-v00@openssh.com";

/// The parts of a user-authentication request the proxy logs and checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserAuth {
    /// The user name on the remote host.
    pub user: String,
    /// Whether the host-bound method was used.
    pub hostbound: bool,
    /// The key blob inside the request: the plain signing key, or a
    /// certificate of it. What the target sees, so what the certificate
    /// rules check.
    pub key: PublicCredential,
    /// The session identifier the request is for.
    pub session_id: Vec<u8>,
    /// The server host key blob inside a host-bound request.
    pub host_key: Option<Vec<u8>>,
}

/// Parses `data` as a public-key user-authentication request signed by
/// `signing_key`. Returns why not, when it is not one.
pub fn parse(data: &[u8], signing_key: &KeyData) -> Result<UserAuth, &'static str> {
    let r = &mut &data[..];
    let session_id = Vec::<u8>::decode(r).map_err(|_| "no session identifier")?;
    if session_id.is_empty() {
        return Err("empty session identifier");
    }
    if u8::decode(r).ok() != Some(USERAUTH_REQUEST) {
        return Err("not an SSH_MSG_USERAUTH_REQUEST");
    }
    let user = String::decode(r).map_err(|_| "malformed user name")?;
    let service = String::decode(r).map_err(|_| "malformed service name")?;
    if service != "ssh-connection" {
        return Err("service is not ssh-connection");
    }
    let method = String::decode(r).map_err(|_| "malformed method name")?;
    let hostbound = match method.as_str() {
        PUBLICKEY => false,
        PUBLICKEY_HOSTBOUND => true,
        _ => return Err("method is not publickey"),
    };
    if u8::decode(r).ok() != Some(1) {
        return Err("signature flag is not TRUE");
    }
    String::decode(r).map_err(|_| "malformed algorithm name")?;
    // The blob whole, then the key from it, canonical (see
    // `request::decode_all`: nested lengths are not checked by the decoder).
    let blob = Vec::<u8>::decode(r).map_err(|_| "malformed public key")?;
    let key = PublicCredential::decode(&mut blob.as_slice())
        .ok()
        .filter(|k| super::request::encodes_to(k, &blob))
        .ok_or("malformed public key")?;
    // A certificate counts as the key it certifies.
    if key.key_data() != signing_key {
        return Err("public key in request is not the signing key");
    }
    let host_key = if hostbound {
        let host_key = Vec::<u8>::decode(r).map_err(|_| "malformed host key")?;
        if host_key.is_empty() {
            return Err("empty host key");
        }
        Some(host_key)
    } else {
        None
    };
    if !r.is_finished() {
        return Err("trailing bytes");
    }
    Ok(UserAuth {
        user,
        hostbound,
        key,
        session_id,
        host_key,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use ssh_encoding::Encode;

    /// Builds a user-auth request for tests elsewhere in the crate.
    pub(crate) fn build(
        key: &KeyData,
        user: &str,
        method: &str,
        host_key: Option<&[u8]>,
    ) -> Vec<u8> {
        build_for(&[1u8; 32], key, user, method, host_key)
    }

    /// Like [`build`], for session identifier `sid`.
    pub(crate) fn build_for(
        sid: &[u8],
        key: &KeyData,
        user: &str,
        method: &str,
        host_key: Option<&[u8]>,
    ) -> Vec<u8> {
        let mut d = Vec::new();
        sid.encode(&mut d).unwrap();
        d.push(USERAUTH_REQUEST);
        user.encode(&mut d).unwrap();
        "ssh-connection".encode(&mut d).unwrap();
        method.encode(&mut d).unwrap();
        d.push(1);
        key.algorithm().as_str().encode(&mut d).unwrap();
        key.encode_prefixed(&mut d).unwrap();
        if let Some(h) = host_key {
            h.encode(&mut d).unwrap();
        }
        d
    }

    pub(crate) fn key(seed: u8) -> KeyData {
        KeyData::Ed25519(ssh_key::public::Ed25519PublicKey([seed; 32]))
    }

    #[test]
    fn publickey_request_is_accepted() {
        let k = key(1);
        let got = parse(&build(&k, "deploy", PUBLICKEY, None), &k).unwrap();
        assert_eq!(
            got,
            UserAuth {
                user: "deploy".into(),
                hostbound: false,
                key: PublicCredential::Key(k),
                session_id: vec![1; 32],
                host_key: None,
            }
        );
    }

    #[test]
    fn hostbound_request_is_accepted() {
        let k = key(1);
        let got = parse(&build(&k, "git", PUBLICKEY_HOSTBOUND, Some(b"hostkey")), &k).unwrap();
        assert!(got.hostbound);
        assert_eq!(got.user, "git");
        assert_eq!(got.session_id, vec![1; 32]);
        assert_eq!(got.host_key.as_deref(), Some(&b"hostkey"[..]));
    }

    #[test]
    fn other_data_is_refused() {
        let k = key(1);
        assert!(parse(b"", &k).is_err());
        assert!(parse(b"SSHSIG\0\0\0\x01", &k).is_err());
        // wrong method
        assert_eq!(
            parse(&build(&k, "u", "password", None), &k),
            Err("method is not publickey")
        );
        // a different key than the one signing
        assert_eq!(
            parse(&build(&key(2), "u", PUBLICKEY, None), &k),
            Err("public key in request is not the signing key")
        );
        // hostbound without its host key
        assert!(parse(&build(&k, "u", PUBLICKEY_HOSTBOUND, None), &k).is_err());
        // trailing bytes
        let mut d = build(&k, "u", PUBLICKEY, None);
        d.push(0);
        assert_eq!(parse(&d, &k), Err("trailing bytes"));
        // every truncation
        let d = build(&k, "u", PUBLICKEY, None);
        for cut in 0..d.len() {
            assert!(parse(&d[..cut], &k).is_err(), "{cut}");
        }
    }

    #[test]
    fn key_blob_must_be_canonical() {
        let k = key(1);
        let good = build(&k, "u", PUBLICKEY, None);
        // The blob is the last field: 4 + (4 + 11 + 4 + 32) bytes.
        let at = good.len() - 55;
        // Junk inside the blob after the key.
        let mut d = good[..at].to_vec();
        d.extend(59u32.to_be_bytes());
        d.extend(&good[at + 4..]);
        d.extend([0u8; 4]);
        assert_eq!(parse(&d, &k), Err("malformed public key"));
        // The key's inner length disagreeing with the blob.
        let mut d = good.clone();
        d[at + 19..at + 23].copy_from_slice(&40u32.to_be_bytes());
        assert_eq!(parse(&d, &k), Err("malformed public key"));
    }

    #[test]
    fn empty_session_id_is_refused() {
        let k = key(1);
        let mut d = build(&k, "u", PUBLICKEY, None);
        // replace the 32-byte session id by an empty one
        d.splice(0..36, 0u32.to_be_bytes());
        assert_eq!(parse(&d, &k), Err("empty session identifier"));
    }
}
