//! A key's `destinations` file: OpenSSH known_hosts format, read for its
//! keys only.
//!
//! ```text
//! # comment
//! host1,host2 ssh-ed25519 AAAA… comment        a host key
//! @cert-authority *.example.org ssh-ed25519 AAAA…   a CA that certifies host keys
//! @revoked * ssh-rsa AAAA…                     never admitted (key or CA)
//! ```
//!
//! Host names and patterns (hashed or not) are ignored: keyholder cannot
//! check which name a client connected to, only which key it bound to.
//! This module parses text; it never reads files (the configuration does)
//! and never decides (the policy does).

use ssh_key::public::KeyData;
use ssh_key::{Certificate, PublicKey};

/// The keys of one destinations file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KnownHosts {
    /// Plain host keys (lines without a marker).
    pub host_keys: Vec<KeyData>,
    /// Keys of `@cert-authority` lines.
    pub cas: Vec<KeyData>,
    /// Keys of `@revoked` lines.
    pub revoked: Vec<KeyData>,
}

impl KnownHosts {
    /// Parses known_hosts text. The error names the line (1-based) and what
    /// is wrong with it.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut out = Self::default();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let at = |why: &str| format!("line {}: {why}", n + 1);
            let mut fields = line.split_ascii_whitespace();
            let mut first = fields.next().unwrap_or_default();
            let first_is_revoked = first == "@revoked";
            let list = match first {
                "@cert-authority" => &mut out.cas,
                "@revoked" => &mut out.revoked,
                m if m.starts_with('@') => {
                    return Err(at(&format!(
                        "unknown marker {m:?} (known: @cert-authority, @revoked)"
                    )))
                }
                _ => &mut out.host_keys,
            };
            if first.starts_with('@') {
                first = fields.next().ok_or_else(|| at("no host names"))?;
            }
            let _hosts = first;
            let (Some(kind), Some(base64)) = (fields.next(), fields.next()) else {
                return Err(at(
                    "expected: [marker] host-names key-type base64-key [comment]",
                ));
            };
            let key = parse_key(kind, base64).map_err(|e| at(&e))?;
            // A revoked key is never admitted: whatever its type, nothing
            // about it needs verifying. A host key or CA keyholder cannot
            // verify is refused here, not at the login that would fail.
            if first_is_revoked {
                out.revoked.push(key);
                continue;
            }
            verifiable(&key).map_err(|e| at(&e))?;
            list.push(key);
        }
        Ok(out)
    }

    /// How many keys of each kind: (host keys, CAs, revoked).
    pub fn counts(&self) -> (usize, usize, usize) {
        (self.host_keys.len(), self.cas.len(), self.revoked.len())
    }
}

/// Host key algorithms whose signatures keyholder verifies (see
/// `crate::verify`), for host keys and host certificate CAs alike.
pub const VERIFIABLE: &str = "ssh-ed25519, ecdsa-sha2-nistp256/384/521, ssh-rsa (rsa-sha2-256/512)";

/// Whether keyholder can verify a binding by `key` (or a certificate `key`
/// signed). Anything else, OpenSSH 10.5's ML-DSA-44+Ed25519 hybrid
/// `ssh-mldsa44-ed25519@openssh.com` among them, is an error naming the
/// algorithm.
fn verifiable(key: &KeyData) -> Result<(), String> {
    match key {
        KeyData::Ed25519(_) | KeyData::Ecdsa(_) | KeyData::Rsa(_) => Ok(()),
        other => Err(format!(
            "host key algorithm {} is not supported by keyholder (a binding to such a host \
             cannot be verified; supported: {VERIFIABLE})",
            other.algorithm()
        )),
    }
}

fn parse_key(kind: &str, base64: &str) -> Result<KeyData, String> {
    let text = format!("{kind} {base64}");
    match PublicKey::from_openssh(&text) {
        Ok(key) => Ok(key.key_data().clone()),
        Err(e) if Certificate::from_openssh(&text).is_ok() => Err(format!(
            "a certificate ({kind}); list the CA with @cert-authority instead ({e})"
        )),
        Err(e) => Err(format!("not a public key: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ED: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG0dfWR7X83D9xk2DLJjEwGct6dhvTRdMC/OJMR2HDp9";
    const ED2: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl";

    #[test]
    fn keys_cas_and_revoked_are_read_and_names_ignored() {
        let text = format!(
            "# targets\n\n  web1,web2 {ED} comment here\n|1|c2FsdA==|aGFzaGhhc2hoYXNoaGFzaGhhc2g= {ED2}\n\
             @cert-authority *.example.org {ED2}\n@revoked\t* {ED}\n"
        );
        let k = KnownHosts::parse(&text).unwrap();
        assert_eq!(k.counts(), (2, 1, 1));
        assert_eq!(
            k.host_keys[0],
            PublicKey::from_openssh(ED).unwrap().key_data().clone()
        );
        assert_eq!(
            k.cas[0],
            PublicKey::from_openssh(ED2).unwrap().key_data().clone()
        );
        assert_eq!(KnownHosts::parse("").unwrap(), KnownHosts::default());
    }

    #[test]
    fn errors_name_the_line() {
        let e = KnownHosts::parse(&format!("h {ED}\nh ssh-ed25519 nope\n")).unwrap_err();
        assert!(e.starts_with("line 2: not a public key"), "{e}");
        let e = KnownHosts::parse(&format!("@bogus h {ED}\n")).unwrap_err();
        assert!(e.contains("line 1: unknown marker"), "{e}");
        let e = KnownHosts::parse("justonefield\n").unwrap_err();
        assert!(e.starts_with("line 1: expected"), "{e}");
        let e = KnownHosts::parse("@cert-authority\n").unwrap_err();
        assert!(e.starts_with("line 1: no host names"), "{e}");
        // A key without host names is two fields, not three.
        assert!(KnownHosts::parse(&format!("{ED}\n")).is_err());
    }

    /// An OpenSSH public key line of algorithm `alg` with `key` as its one
    /// key field.
    fn line(alg: &str, key: &[u8]) -> String {
        let mut blob = Vec::new();
        for field in [alg.as_bytes(), key] {
            blob.extend((field.len() as u32).to_be_bytes());
            blob.extend(field);
        }
        format!("{alg} {}", openssl::base64::encode_block(&blob))
    }

    #[test]
    fn host_keys_keyholder_cannot_verify_are_refused_naming_line_and_algorithm() {
        // OpenSSH 10.5's hybrid: a 1312-byte ML-DSA-44 key then an Ed25519 key.
        let mldsa = line("ssh-mldsa44-ed25519@openssh.com", &[7; 1344]);
        for text in [
            format!("web1 {ED}\nweb2 {mldsa}\n"),
            format!("web1 {ED}\n@cert-authority * {mldsa}\n"),
        ] {
            let e = KnownHosts::parse(&text).unwrap_err();
            assert!(
                e.starts_with(
                    "line 2: host key algorithm ssh-mldsa44-ed25519@openssh.com \
                               is not supported"
                ),
                "{e}"
            );
        }
        // Revoked: never admitted, so nothing to verify.
        let k = KnownHosts::parse(&format!("web1 {ED}\n@revoked * {mldsa}\n")).unwrap();
        assert_eq!(k.counts(), (1, 0, 1));
    }
}
