//! Classification of a request by its type byte, and parsing of the bodies
//! the proxy acts on.
//!
//! Only three bodies are ever decoded: REQUEST_IDENTITIES (must be empty),
//! SIGN_REQUEST (and the user-authentication data inside it, once, here)
//! and EXTENSION (and, of extensions, the contents of the ones keyholder
//! answers: `session-bind@openssh.com`, `status@keyholder`, the
//! `grant-…@keyholder` ones). Everything else is decided on the type byte
//! alone, so a private key sent in an add request is never parsed. What
//! comes out is typed facts: the policy, the audit and the counters read
//! them and never parse again.

use ssh_agent_lib::proto::{Extension, SignRequest};
use ssh_encoding::{Decode, Encode, Reader};

use super::grants::{self, GrantOp};
use super::session_bind::{self, Malformed, SessionBind};
use super::status::{self, Format};
use super::userauth::{self, UserAuth};

/// The extension OpenSSH's `ssh` sends to bind a connection to a host key.
pub const SESSION_BIND: &str = "session-bind@openssh.com";
/// The extension that asks which extensions an agent supports.
pub const QUERY: &str = "query";

/// SSH_AGENTC_REQUEST_IDENTITIES
pub const REQUEST_IDENTITIES: u8 = 11;
/// SSH_AGENTC_SIGN_REQUEST
pub const SIGN_REQUEST: u8 = 13;
/// SSH_AGENTC_EXTENSION
pub const EXTENSION: u8 = 27;

/// An administrative request: refused for everyone, never forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminOp {
    /// SSH_AGENTC_ADD_IDENTITY (17)
    AddIdentity,
    /// SSH_AGENTC_REMOVE_IDENTITY (18)
    RemoveIdentity,
    /// SSH_AGENTC_REMOVE_ALL_IDENTITIES (19)
    RemoveAllIdentities,
    /// SSH_AGENTC_ADD_SMARTCARD_KEY (20)
    AddSmartcardKey,
    /// SSH_AGENTC_REMOVE_SMARTCARD_KEY (21)
    RemoveSmartcardKey,
    /// SSH_AGENTC_LOCK (22)
    Lock,
    /// SSH_AGENTC_UNLOCK (23)
    Unlock,
    /// SSH_AGENTC_ADD_ID_CONSTRAINED (25)
    AddIdConstrained,
    /// SSH_AGENTC_ADD_SMARTCARD_KEY_CONSTRAINED (26)
    AddSmartcardKeyConstrained,
}

impl AdminOp {
    /// The admin operation for a type byte, if it is one.
    pub fn from_type(byte: u8) -> Option<Self> {
        Some(match byte {
            17 => Self::AddIdentity,
            18 => Self::RemoveIdentity,
            19 => Self::RemoveAllIdentities,
            20 => Self::AddSmartcardKey,
            21 => Self::RemoveSmartcardKey,
            22 => Self::Lock,
            23 => Self::Unlock,
            25 => Self::AddIdConstrained,
            26 => Self::AddSmartcardKeyConstrained,
            _ => return None,
        })
    }

    /// A short name for logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::AddIdentity => "add-identity",
            Self::RemoveIdentity => "remove-identity",
            Self::RemoveAllIdentities => "remove-all-identities",
            Self::AddSmartcardKey => "add-smartcard-key",
            Self::RemoveSmartcardKey => "remove-smartcard-key",
            Self::Lock => "lock",
            Self::Unlock => "unlock",
            Self::AddIdConstrained => "add-identity-constrained",
            Self::AddSmartcardKeyConstrained => "add-smartcard-key-constrained",
        }
    }
}

/// A classified request.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// REQUEST_IDENTITIES with an empty body.
    RequestIdentities,
    /// A well-formed SIGN_REQUEST, with its data parsed.
    Sign(Box<Sign>),
    /// A well-formed `session-bind@openssh.com` EXTENSION.
    SessionBind(Box<SessionBind>),
    /// A `session-bind@openssh.com` EXTENSION whose contents are malformed.
    BadSessionBind(Malformed),
    /// The `query` EXTENSION.
    Query,
    /// A `status@keyholder` EXTENSION, and the answer format it asks for.
    Status(Format),
    /// A `grant-…@keyholder` EXTENSION: its name, and the operation or why
    /// its contents are malformed.
    Grant {
        /// The extension's name (the answer carries it back).
        name: String,
        /// What it asks.
        op: Result<GrantOp, &'static str>,
    },
    /// A well-formed EXTENSION (name and opaque contents) keyholder does
    /// not answer.
    Extension(Extension),
    /// An administrative request (body not decoded).
    Admin(AdminOp),
    /// A type the proxy does not know (or a legacy SSH1 one).
    Unknown(u8),
    /// A known type whose body is malformed or has trailing bytes.
    Malformed {
        /// The type byte.
        kind: u8,
        /// What was wrong.
        reason: &'static str,
    },
}

/// Classifies one message body (type byte first, as returned by
/// [`read_frame`](super::read_frame)). Never panics.
pub fn classify(message: &[u8]) -> Request {
    let Some((&kind, mut body)) = message.split_first() else {
        return Request::Malformed {
            kind: 0,
            reason: "empty message",
        };
    };
    match kind {
        REQUEST_IDENTITIES if body.is_empty() => Request::RequestIdentities,
        REQUEST_IDENTITIES => Request::Malformed {
            kind,
            reason: "trailing bytes",
        },
        SIGN_REQUEST => match decode_all::<SignRequest>(&mut body) {
            Ok(request) => Request::Sign(Box::new(Sign::new(request))),
            Err(reason) => Request::Malformed { kind, reason },
        },
        EXTENSION => match decode_extension(body) {
            Ok(ext) => classify_extension(ext),
            Err(reason) => Request::Malformed { kind, reason },
        },
        _ => match AdminOp::from_type(kind) {
            Some(op) => Request::Admin(op),
            None => Request::Unknown(kind),
        },
    }
}

/// A sign request and what its data is: an SSH user-authentication request
/// signed by the requested key (parsed once, at classification), or why
/// not.
#[derive(Debug, Clone, PartialEq)]
pub struct Sign {
    /// The request as decoded (key, data, flags).
    pub request: SignRequest,
    /// The data, parsed as user-authentication data for the requested key.
    pub auth: Result<UserAuth, &'static str>,
}

impl Sign {
    /// Parses the data of `request`.
    pub fn new(request: SignRequest) -> Self {
        let auth = userauth::parse(&request.data, request.credential.key_data());
        Self { request, auth }
    }
}

/// The extensions keyholder answers, parsed; any other stays opaque.
fn classify_extension(ext: Extension) -> Request {
    match ext.name.as_str() {
        SESSION_BIND => match session_bind::parse(ext.details.as_ref()) {
            Ok(bind) => Request::SessionBind(Box::new(bind)),
            Err(m) => Request::BadSessionBind(m),
        },
        QUERY => Request::Query,
        status::NAME => Request::Status(Format::of(ext.details.as_ref())),
        name if grants::is_grant(name) => Request::Grant {
            op: grants::parse(name, ext.details.as_ref()),
            name: ext.name,
        },
        _ => Request::Extension(ext),
    }
}

/// Decodes a `T` that must take up the whole of `body`, in canonical form:
/// it must encode back to exactly `body`. ssh-encoding does not check that a
/// length-prefixed field is consumed whole, so a key blob whose inner lengths
/// disagree with its own decodes "successfully" (and the bytes left in it
/// are then read as the next field). The daemon forwards what it decoded;
/// only a canonical request is thus forwarded unchanged (`docs/reference.md`,
/// "What each request gets"), and the upstream agent sees exactly what the
/// policy judged.
fn decode_all<T: Decode + Encode>(body: &mut &[u8]) -> Result<T, &'static str> {
    let whole = *body;
    let value = T::decode(body).map_err(|_| "malformed body")?;
    if !body.is_finished() {
        return Err("trailing bytes");
    }
    if !encodes_to(&value, whole) {
        return Err("non-canonical encoding");
    }
    Ok(value)
}

/// Whether `value` encodes to exactly `bytes`.
pub(crate) fn encodes_to(value: &impl Encode, bytes: &[u8]) -> bool {
    let mut out = Vec::with_capacity(bytes.len());
    value.encode(&mut out).is_ok() && out == bytes
}

/// An extension is `string name` then contents that belong to the extension;
/// ssh-agent-lib keeps the contents opaque. The name must be valid UTF-8 and
/// non-empty.
fn decode_extension(mut body: &[u8]) -> Result<Extension, &'static str> {
    let ext = Extension::decode(&mut body).map_err(|_| "malformed body")?;
    if ext.name.is_empty() {
        return Err("empty extension name");
    }
    Ok(ext)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sign_body(key_blob: &[u8], data: &[u8], flags: u32) -> Vec<u8> {
        let mut m = vec![SIGN_REQUEST];
        m.extend((key_blob.len() as u32).to_be_bytes());
        m.extend(key_blob);
        m.extend((data.len() as u32).to_be_bytes());
        m.extend(data);
        m.extend(flags.to_be_bytes());
        m
    }

    fn ed25519_blob() -> Vec<u8> {
        let mut b = Vec::new();
        b.extend(11u32.to_be_bytes());
        b.extend(b"ssh-ed25519");
        b.extend(32u32.to_be_bytes());
        b.extend([7u8; 32]);
        b
    }

    #[test]
    fn list_request() {
        assert_eq!(classify(&[11]), Request::RequestIdentities);
        assert!(matches!(classify(&[11, 0]), Request::Malformed { .. }));
    }

    #[test]
    fn sign_request_is_parsed_with_flags() {
        let m = sign_body(&ed25519_blob(), b"data", 4);
        let Request::Sign(s) = classify(&m) else {
            panic!()
        };
        assert_eq!(s.request.data, b"data");
        assert_eq!(s.request.flags, 4);
        // Not user-authentication data: said once, here.
        assert!(s.auth.is_err());
    }

    #[test]
    fn sign_request_with_trailing_or_missing_bytes_is_malformed() {
        let mut m = sign_body(&ed25519_blob(), b"data", 0);
        m.push(0);
        assert_eq!(
            classify(&m),
            Request::Malformed {
                kind: 13,
                reason: "trailing bytes"
            }
        );
        let m = sign_body(&ed25519_blob(), b"data", 0);
        for cut in 1..m.len() {
            let got = classify(&m[..cut]);
            assert!(
                matches!(got, Request::Malformed { kind: 13, .. }),
                "{cut}: {got:?}"
            );
        }
    }

    #[test]
    fn sign_request_must_be_canonical() {
        // The ed25519 key's inner length says 40 where the blob holds 32:
        // ssh-encoding alone would accept it and re-encode it differently.
        let mut blob = ed25519_blob();
        blob[15..19].copy_from_slice(&40u32.to_be_bytes());
        assert_eq!(
            classify(&sign_body(&blob, b"data", 0)),
            Request::Malformed {
                kind: 13,
                reason: "non-canonical encoding"
            }
        );
        // Bytes left inside the key blob would be read as the data field.
        let mut blob = ed25519_blob();
        blob.extend(4u32.to_be_bytes());
        blob.extend(b"evil");
        let mut m = vec![SIGN_REQUEST];
        m.extend((blob.len() as u32).to_be_bytes());
        m.extend(&blob);
        m.extend(0u32.to_be_bytes());
        assert!(matches!(classify(&m), Request::Malformed { kind: 13, .. }));
        // The canonical form is accepted and round-trips.
        let good = sign_body(&ed25519_blob(), b"data", 0);
        let Request::Sign(s) = classify(&good) else {
            panic!()
        };
        assert!(encodes_to(&s.request, &good[1..]));
    }

    #[test]
    fn admin_types_are_not_decoded() {
        // Garbage bodies: still recognised as admin requests, never parsed.
        for t in [17u8, 18, 19, 20, 21, 22, 23, 25, 26] {
            assert!(
                matches!(classify(&[t, 0xff, 0xff]), Request::Admin(_)),
                "{t}"
            );
        }
    }

    #[test]
    fn unknown_and_legacy_types() {
        for t in [
            0u8, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 14, 24, 28, 29, 30, 255,
        ] {
            assert_eq!(classify(&[t]), Request::Unknown(t));
        }
    }

    #[test]
    fn extension_is_parsed() {
        let mut m = vec![EXTENSION];
        m.extend(5u32.to_be_bytes());
        m.extend(b"query");
        assert_eq!(classify(&m), Request::Query);
        let mut m = vec![EXTENSION];
        m.extend(7u32.to_be_bytes());
        m.extend(b"x@y.org");
        m.extend(b"opaque");
        let Request::Extension(e) = classify(&m) else {
            panic!()
        };
        assert_eq!(e.name, "x@y.org");
        let mut m = vec![EXTENSION];
        m.extend(16u32.to_be_bytes());
        m.extend(b"status@keyholder");
        assert_eq!(classify(&m), Request::Status(Format::Plain));
        m.extend(2u32.to_be_bytes());
        assert_eq!(classify(&m), Request::Status(Format::Metrics));
        assert!(matches!(
            classify(&[EXTENSION, 0, 0]),
            Request::Malformed { .. }
        ));
        assert!(matches!(
            classify(&[EXTENSION, 0, 0, 0, 0]),
            Request::Malformed { .. }
        ));
        assert!(matches!(
            classify(&[EXTENSION, 0, 0, 0, 1, 0xff]),
            Request::Malformed { .. }
        ));
    }
}
