//! The `grant-…@keyholder` vendor extensions: requests, approvals, denials,
//! revocations and listings of grants, over the proxy socket.
//!
//! Request: SSH_AGENTC_EXTENSION, `string NAME`, then the contents:
//!
//! ```text
//! grant-request@keyholder   string key, string duration, string reason
//! grant-approve@keyholder   string id, string key ("" = any key)
//! grant-deny@keyholder      string id, string key ("" = any key), string note ("" = none)
//! grant-revoke@keyholder    string id, string key ("" = any key)
//! grant-list@keyholder      nothing (pending and active), or string id (that one, also when ended)
//! ```
//!
//! Answer: SSH_AGENT_EXTENSION_RESPONSE (29), `string NAME`, `boolean ok`,
//! `string text`: when ok, JSON (the grant acted on; for a listing, the
//! array of grants); otherwise one line saying why. Every field is
//! bounded before anything is allocated; trailing bytes are malformed.

use ssh_encoding::{Encode, Writer};

use super::wire::put_string;

/// Ask for a grant.
pub const REQUEST: &str = "grant-request@keyholder";
/// Approve a request.
pub const APPROVE: &str = "grant-approve@keyholder";
/// Deny a request.
pub const DENY: &str = "grant-deny@keyholder";
/// List grants.
pub const LIST: &str = "grant-list@keyholder";
/// Revoke a grant or withdraw a request.
pub const REVOKE: &str = "grant-revoke@keyholder";

/// The longest key name read.
pub const MAX_KEY: usize = 128;
/// The longest duration read.
pub const MAX_DURATION: usize = 32;
/// The longest reason or note read (the policy allows fewer bytes and says
/// so; this only bounds what is read).
pub const MAX_TEXT: usize = 1024;
/// The longest id read.
pub const MAX_ID: usize = 64;

/// Whether `name` is one of the grant extensions.
pub fn is_grant(name: &str) -> bool {
    [REQUEST, APPROVE, DENY, LIST, REVOKE].contains(&name)
}

/// A parsed grant extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrantOp {
    /// `grant-request@keyholder`.
    Request {
        /// The key's name.
        key: String,
        /// As written (`2h`, `90s`, seconds).
        duration: String,
        /// Why.
        reason: String,
    },
    /// `grant-approve@keyholder`.
    Approve {
        /// The grant's id.
        id: String,
        /// Only if it is for this key.
        key: Option<String>,
    },
    /// `grant-deny@keyholder`.
    Deny {
        /// The grant's id.
        id: String,
        /// Only if it is for this key.
        key: Option<String>,
        /// What the approver says.
        note: Option<String>,
    },
    /// `grant-revoke@keyholder`.
    Revoke {
        /// The grant's id.
        id: String,
        /// Only if it is for this key.
        key: Option<String>,
    },
    /// `grant-list@keyholder`.
    List {
        /// Only this grant (ended ones too).
        id: Option<String>,
    },
}

impl GrantOp {
    /// The extension name.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Request { .. } => REQUEST,
            Self::Approve { .. } => APPROVE,
            Self::Deny { .. } => DENY,
            Self::Revoke { .. } => REVOKE,
            Self::List { .. } => LIST,
        }
    }

    /// The extension's contents.
    pub fn contents(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let opt = |s: &Option<String>| s.clone().unwrap_or_default();
        let fields: Vec<String> = match self {
            Self::Request {
                key,
                duration,
                reason,
            } => vec![key.clone(), duration.clone(), reason.clone()],
            Self::Approve { id, key } | Self::Revoke { id, key } => vec![id.clone(), opt(key)],
            Self::Deny { id, key, note } => vec![id.clone(), opt(key), opt(note)],
            Self::List { id } => id.iter().cloned().collect(),
        };
        for f in fields {
            put_string(&mut out, f.as_bytes());
        }
        out
    }
}

/// Reads one `string` of at most `max` bytes, UTF-8.
fn take(body: &mut &[u8], max: usize, what: &'static str) -> Result<String, &'static str> {
    let (len, rest) = body.split_first_chunk::<4>().ok_or(what)?;
    let len = u32::from_be_bytes(*len) as usize;
    if len > max {
        return Err(what);
    }
    let bytes = rest.get(..len).ok_or(what)?;
    *body = rest.get(len..).unwrap_or(&[]);
    String::from_utf8(bytes.to_vec()).map_err(|_| what)
}

fn optional(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

/// Parses the contents of grant extension `name` (see [`is_grant`]);
/// `Err` says what is malformed.
pub fn parse(name: &str, contents: &[u8]) -> Result<GrantOp, &'static str> {
    let mut b = contents;
    let id = |b: &mut &[u8]| take(b, MAX_ID, "bad or too long id");
    let key = |b: &mut &[u8]| take(b, MAX_KEY, "bad or too long key name");
    let op = match name {
        REQUEST => GrantOp::Request {
            key: key(&mut b)?,
            duration: take(&mut b, MAX_DURATION, "bad or too long duration")?,
            reason: take(&mut b, MAX_TEXT, "bad or too long reason")?,
        },
        APPROVE => GrantOp::Approve {
            id: id(&mut b)?,
            key: optional(key(&mut b)?),
        },
        DENY => GrantOp::Deny {
            id: id(&mut b)?,
            key: optional(key(&mut b)?),
            note: optional(take(&mut b, MAX_TEXT, "bad or too long reason")?),
        },
        REVOKE => GrantOp::Revoke {
            id: id(&mut b)?,
            key: optional(key(&mut b)?),
        },
        LIST if b.is_empty() => GrantOp::List { id: None },
        LIST => GrantOp::List {
            id: Some(id(&mut b)?),
        },
        _ => return Err("not a grant extension"),
    };
    if b.is_empty() {
        Ok(op)
    } else {
        Err("trailing bytes")
    }
}

/// The answer to a grant extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// Done (or listed).
    pub ok: bool,
    /// JSON when ok, else one line saying why not.
    pub text: String,
}

impl Encode for Answer {
    fn encoded_len(&self) -> ssh_encoding::Result<usize> {
        Ok(1 + 4 + self.text.len())
    }

    fn encode(&self, w: &mut impl Writer) -> ssh_encoding::Result<()> {
        u8::from(self.ok).encode(w)?;
        self.text.encode(w)
    }
}

impl Answer {
    /// Reads an answer's contents (after the extension name).
    pub fn decode(contents: &[u8]) -> Result<Self, &'static str> {
        let (&ok, mut rest) = contents.split_first().ok_or("empty answer")?;
        let text = take(&mut rest, super::MAX_MESSAGE_LEN, "bad answer text")?;
        if !rest.is_empty() {
            return Err("trailing bytes in the answer");
        }
        Ok(Self { ok: ok != 0, text })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_op_round_trips() {
        let ops = [
            GrantOp::Request {
                key: "prod".into(),
                duration: "2h".into(),
                reason: "deploy ✓".into(),
            },
            GrantOp::Approve {
                id: "abc".into(),
                key: None,
            },
            GrantOp::Approve {
                id: "abc".into(),
                key: Some("prod".into()),
            },
            GrantOp::Deny {
                id: "abc".into(),
                key: None,
                note: Some("not now".into()),
            },
            GrantOp::Revoke {
                id: "abc".into(),
                key: None,
            },
            GrantOp::List { id: None },
            GrantOp::List {
                id: Some("abc".into()),
            },
        ];
        for op in ops {
            assert_eq!(parse(op.name(), &op.contents()), Ok(op.clone()), "{op:?}");
            assert!(is_grant(op.name()));
        }
        assert!(!is_grant("status@keyholder"));
    }

    #[test]
    fn malformed_and_oversized_contents_are_refused() {
        let ok = GrantOp::Approve {
            id: "abc".into(),
            key: None,
        }
        .contents();
        let mut trailing = ok.clone();
        trailing.push(0);
        assert_eq!(parse(APPROVE, &trailing), Err("trailing bytes"));
        assert!(parse(APPROVE, &ok[..ok.len() - 1]).is_err());
        assert!(parse(APPROVE, &[]).is_err());
        assert!(parse(REQUEST, &ok).is_err());
        // A length beyond the cap is refused before anything is read.
        let mut huge = Vec::new();
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse(APPROVE, &huge).is_err());
        let long_id = GrantOp::Revoke {
            id: "x".repeat(MAX_ID + 1),
            key: None,
        };
        assert!(parse(REVOKE, &long_id.contents()).is_err());
        let mut bad_utf8 = Vec::new();
        put_string(&mut bad_utf8, &[0xff, 0xfe]);
        put_string(&mut bad_utf8, b"");
        assert!(parse(APPROVE, &bad_utf8).is_err());
        assert!(parse("other", &[]).is_err());
    }

    #[test]
    fn answers_round_trip() {
        let a = Answer {
            ok: false,
            text: "no grant request with id \"x\"".into(),
        };
        let mut out = Vec::new();
        a.encode(&mut out).unwrap();
        assert_eq!(Answer::decode(&out), Ok(a));
        assert!(Answer::decode(&[]).is_err());
        assert!(Answer::decode(&[1, 0, 0]).is_err());
    }
}
