//! The audit log: one line per sign decision and per refused admin request,
//! with the contract's fields:
//! `user= uid= pid= key= fingerprint= remote_user= serial= decision= reason=`,
//! and one line per certificate issued ([`issued`]).
//!
//! Values that come from clients (the remote user name) are quoted and
//! escaped when they contain anything but plain characters, so a client
//! cannot forge fields or lines.

use std::fmt;

use crate::policy::{Caller, Decision, Reason};

/// The tracing target of audit lines.
pub const TARGET: &str = "keyholder::audit";

/// A log field value, printed bare when plain, quoted and escaped otherwise.
pub struct Field<'a>(pub Option<&'a str>);

impl fmt::Display for Field<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            None => f.write_str("-"),
            Some(v)
                if !v.is_empty()
                    && v.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"._-@:+/=,".contains(&b)) =>
            {
                f.write_str(v)
            }
            Some(v) => write!(f, "{v:?}"),
        }
    }
}

/// The audit line for `decision`, or `None` when it is not audited.
pub fn line(caller: &Caller, decision: &Decision<'_>) -> Option<String> {
    if !decision.is_audited() {
        return None;
    }
    let (kind, key, fingerprint, remote_user, serial, verdict, reason) = match decision {
        Decision::Sign {
            key,
            remote_user,
            serial,
        } => {
            let via = if caller.uid == 0 {
                "root".to_owned()
            } else {
                let group = key.groups.iter().find(|g| caller.groups.contains(g));
                format!("group:{}", group.map_or("-", String::as_str))
            };
            (
                "sign",
                Some(key.name.as_str()),
                Some(key.fingerprint.clone()),
                remote_user.as_deref(),
                *serial,
                "granted",
                via,
            )
        }
        Decision::Refuse {
            reason,
            key,
            fingerprint,
            remote_user,
            serial,
        } => (
            if matches!(reason, Reason::AdminRequest(_)) {
                "admin"
            } else {
                "sign"
            },
            key.map(|k| k.name.as_str()),
            fingerprint.clone(),
            remote_user.as_deref(),
            *serial,
            "refused",
            reason.to_string(),
        ),
        _ => return None,
    };
    Some(format!(
        "{kind} user={} uid={} pid={} key={} fingerprint={} remote_user={} serial={} decision={verdict} reason={}",
        Field(caller.user.as_deref()),
        caller.uid,
        caller.pid.map_or_else(|| "-".to_owned(), |p| p.to_string()),
        Field(key),
        Field(fingerprint.as_deref()),
        Field(remote_user),
        serial.map_or_else(|| "-".to_owned(), |s| s.to_string()),
        Field(Some(&reason)),
    ))
}

/// What the audit line of an issued certificate says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedLine<'a> {
    /// The key it certifies.
    pub key: &'a str,
    /// Its serial.
    pub serial: u64,
    /// Its key ID.
    pub key_id: &'a str,
    /// Its principals.
    pub principals: &'a [String],
    /// Unix seconds.
    pub valid_after: u64,
    /// Unix seconds.
    pub valid_before: u64,
}

/// The audit line of a certificate issued to `caller`:
/// `cert user= uid= key= serial= key_id= principals= valid_after= valid_before=`.
pub fn issued(caller: &Caller, cert: &IssuedLine<'_>) -> String {
    format!(
        "cert user={} uid={} key={} serial={} key_id={} principals={} valid_after={} valid_before={}",
        Field(caller.user.as_deref()),
        caller.uid,
        Field(Some(cert.key)),
        cert.serial,
        Field(Some(cert.key_id)),
        Field(Some(&cert.principals.join(","))),
        cert.valid_after,
        cert.valid_before,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_values_are_quoted() {
        assert_eq!(Field(Some("deploy")).to_string(), "deploy");
        assert_eq!(Field(None).to_string(), "-");
        assert_eq!(Field(Some("")).to_string(), "\"\"");
        assert_eq!(
            Field(Some("x decision=granted\nfake")).to_string(),
            "\"x decision=granted\\nfake\""
        );
    }
}
