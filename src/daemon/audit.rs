//! The audit log: one line per sign request, written when its outcome is
//! known, and one per refused admin request, with the fields of
//! `docs/reference.md`, "Audit log", in order:
//! `user= uid= pid= key= fingerprint= remote_user= dest= forwarded= serial= grant= decision= reason=`
//! (`serial` is that of the keyholder certificate in the user-auth data,
//! `grant` the id of the grant a key that needs one was used under),
//! and one line per certificate issued ([`issued`]).
//!
//! A sign the policy allowed is `decision=granted` only once the backend
//! returned a signature; a backend failure after that is `decision=failed`
//! with `reason=upstream-error` or `reason=upstream-timeout`. This module
//! formats lines; it never decides, and never writes a granted line for a
//! request whose outcome it was not told.
//!
//! Values that come from clients (the remote user name) or the user
//! database are quoted and escaped when they contain anything but plain
//! characters, so a client cannot forge fields or lines.

use crate::policy::destinations::Bindings;
use crate::policy::{Caller, Decision, Reason};
use crate::ratelog::Kind;

/// Refused admin requests (add, remove, lock, …): audited, rate-limited per
/// uid with an allowance of their own, so a flood of them never hides a
/// refused sign. Granted and failed signs never go through a rate limit.
pub static REFUSED_ADMIN: Kind = Kind {
    name: "audit: refused admin requests",
    burst: 10,
    level: tracing::Level::INFO,
};

/// Refused sign requests (key not configured or not allowed, data that is
/// not a user-auth request, certificate and destination rules): audited,
/// rate-limited per uid with an allowance of their own.
pub static REFUSED_SIGN: Kind = Kind {
    name: "audit: refused sign requests",
    burst: 10,
    level: tracing::Level::INFO,
};

/// Refusals that are not audited (malformed messages, unknown types,
/// unsupported extensions), logged at debug level with an allowance of
/// their own.
pub static REFUSED_UNAUDITED: Kind = Kind {
    name: "refused malformed or unknown requests (not audited)",
    burst: 10,
    level: tracing::Level::DEBUG,
};

/// The rate-limit kind a refusal's line counts under.
pub fn refusal_kind(decision: &Decision<'_>) -> &'static Kind {
    match decision {
        Decision::Refuse {
            reason: Reason::AdminRequest(_),
            ..
        } => &REFUSED_ADMIN,
        d if d.is_audited() => &REFUSED_SIGN,
        _ => &REFUSED_UNAUDITED,
    }
}

/// What a rate-limit summary counts a refusal under: its reason and key,
/// `reason=R key=K`; `None` when `decision` is no refusal.
pub fn refusal_detail(decision: &Decision<'_>) -> Option<String> {
    let Decision::Refuse { reason, key, .. } = decision else {
        return None;
    };
    Some(format!(
        "reason={} key={}",
        Field(Some(&reason.to_string())),
        Field(key.map(|k| k.name.as_str()))
    ))
}

/// The tracing target of audit lines.
pub const TARGET: &str = "keyholder::audit";

pub use crate::logging::Value as Field;

/// What the connection a request came on is bound to: the fields
/// `dest= forwarded= serial=` ([`Binding::of`] the connection's session
/// bindings gives `forwarded`; `dest` and `serial` come from the decision:
/// the verified binding the user-auth data belongs to, and the certificate
/// in the data, when keyholder minted it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Binding {
    /// Fingerprint of the host key of the verified binding the signed data
    /// belongs to (session id, and host key for a hostbound request).
    pub dest: Option<String>,
    /// Whether the binding is a forwarding one.
    pub forwarded: bool,
    /// Serial of the certificate the request used.
    pub serial: Option<String>,
}

impl Binding {
    /// The fields for a connection with `bindings`: `forwarded` whether it
    /// is (or may be: a failed binding that said so) a forwarded agent.
    /// `dest` is never taken from the connection alone (its last binding may
    /// be to another session): the decision says which binding, if any, the
    /// signed data belongs to.
    pub fn of(bindings: &Bindings) -> Self {
        Self {
            dest: None,
            forwarded: bindings.maybe_forwarded(),
            serial: None,
        }
    }
}

/// How a sign request the policy allowed ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The backend returned a signature (relayed to the client).
    Signed,
    /// The backend answered FAILURE, was unreachable, or broke mid-answer.
    UpstreamError,
    /// The backend did not answer within `upstream_timeout_secs`.
    UpstreamTimeout,
}

/// The audit line of a refusal, or `None` when `decision` is not an
/// audited refusal (a granted sign is logged by [`sign`], once it ended).
pub fn refusal(caller: &Caller, decision: &Decision<'_>, binding: &Binding) -> Option<String> {
    let Decision::Refuse {
        reason,
        key,
        fingerprint,
        remote_user,
        serial,
        dest,
    } = decision
    else {
        return None;
    };
    if !decision.is_audited() {
        return None;
    }
    let binding = &with_decision(binding, *serial, dest.as_deref());
    let kind = if matches!(reason, Reason::AdminRequest(_)) {
        "admin"
    } else {
        "sign"
    };
    Some(format_line(
        kind,
        caller,
        key.map(|k| k.name.as_str()),
        fingerprint.as_deref(),
        remote_user.as_deref(),
        binding,
        None,
        "refused",
        &reason.to_string(),
    ))
}

/// The audit line of a sign the policy allowed, ended with `outcome`, or
/// `None` when `decision` is not a sign.
pub fn sign(
    caller: &Caller,
    decision: &Decision<'_>,
    binding: &Binding,
    outcome: Outcome,
) -> Option<String> {
    let Decision::Sign {
        key,
        remote_user,
        serial,
        grant,
        dest,
    } = decision
    else {
        return None;
    };
    let binding = &with_decision(binding, *serial, dest.as_deref());
    let (verdict, reason) = match outcome {
        Outcome::Signed => {
            let via = if caller.uid == 0 {
                "root".to_owned()
            } else {
                let group = key.groups.iter().find(|g| caller.groups.contains(g));
                format!("group:{}", group.map_or("-", String::as_str))
            };
            ("granted", via)
        }
        Outcome::UpstreamError => ("failed", "upstream-error".to_owned()),
        Outcome::UpstreamTimeout => ("failed", "upstream-timeout".to_owned()),
    };
    Some(format_line(
        "sign",
        caller,
        Some(key.name.as_str()),
        Some(key.fingerprint.as_str()),
        remote_user.as_deref(),
        binding,
        grant.as_deref(),
        verdict,
        &reason,
    ))
}

/// `binding` with the serial of the decision's certificate and the host of
/// the binding the signed data belongs to, if any.
fn with_decision(binding: &Binding, serial: Option<u64>, dest: Option<&str>) -> Binding {
    let mut b = binding.clone();
    if let Some(s) = serial {
        b.serial = Some(s.to_string());
    }
    if let Some(d) = dest {
        b.dest = Some(d.to_owned());
    }
    b
}

#[allow(clippy::too_many_arguments)]
fn format_line(
    kind: &str,
    caller: &Caller,
    key: Option<&str>,
    fingerprint: Option<&str>,
    remote_user: Option<&str>,
    binding: &Binding,
    grant: Option<&str>,
    verdict: &str,
    reason: &str,
) -> String {
    format!(
        "{kind} user={} uid={} pid={} key={} fingerprint={} remote_user={} dest={} \
         forwarded={} serial={} grant={} decision={verdict} reason={}",
        Field(caller.user.as_deref()),
        caller.uid,
        caller.pid.map_or_else(|| "-".to_owned(), |p| p.to_string()),
        Field(key),
        Field(fingerprint),
        Field(remote_user),
        Field(binding.dest.as_deref()),
        if binding.forwarded { "yes" } else { "no" },
        Field(binding.serial.as_deref()),
        Field(grant),
        Field(Some(reason)),
    )
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
    use crate::policy::KeyRule;
    use crate::protocol::AdminOp;

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

    fn key() -> KeyRule {
        let text =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG0dfWR7X83D9xk2DLJjEwGct6dhvTRdMC/OJMR2HDp9 t";
        KeyRule {
            name: "deploy".to_owned(),
            key: crate::config::parse_public_key(text).unwrap(),
            fingerprint: "SHA256:fp".to_owned(),
            groups: vec!["ops".to_owned()],
            allow_any_data: false,
            rules: Default::default(),
            certificate: Default::default(),
            grants: None,
            cert_terms: 0,
        }
    }

    fn caller() -> Caller {
        Caller {
            uid: 1000,
            pid: Some(42),
            user: Some("alice".to_owned()),
            groups: vec!["ops".to_owned()],
        }
    }

    #[test]
    fn sign_lines_have_every_field_in_order() {
        let key = key();
        let decision = Decision::Sign {
            key: &key,
            remote_user: Some("deploy".to_owned()),
            serial: None,
            grant: None,
            dest: None,
        };
        let line = sign(&caller(), &decision, &Binding::default(), Outcome::Signed).unwrap();
        assert_eq!(
            line,
            "sign user=alice uid=1000 pid=42 key=deploy fingerprint=SHA256:fp remote_user=deploy \
             dest=- forwarded=no serial=- grant=- decision=granted reason=group:ops"
        );
        let bound = Binding {
            dest: Some("SHA256:host".to_owned()),
            forwarded: true,
            serial: Some("7".to_owned()),
        };
        let line = sign(&caller(), &decision, &bound, Outcome::UpstreamTimeout).unwrap();
        assert!(
            line.ends_with(
                "dest=SHA256:host forwarded=yes serial=7 grant=- decision=failed reason=upstream-timeout"
            ),
            "{line}"
        );
        let line = sign(&caller(), &decision, &bound, Outcome::UpstreamError).unwrap();
        assert!(
            line.ends_with("decision=failed reason=upstream-error"),
            "{line}"
        );
        assert!(refusal(&caller(), &decision, &bound).is_none());
    }

    #[test]
    fn serial_comes_from_the_certificate_in_the_decision() {
        let key = key();
        let decision = Decision::Sign {
            key: &key,
            remote_user: Some("deploy".to_owned()),
            serial: Some(42),
            grant: Some("0a1b2c".to_owned()),
            dest: Some("SHA256:bound".to_owned()),
        };
        let line = sign(&caller(), &decision, &Binding::default(), Outcome::Signed).unwrap();
        assert!(
            line.contains(
                " dest=SHA256:bound forwarded=no serial=42 grant=0a1b2c decision=granted"
            ),
            "{line}"
        );
        let decision = Decision::Refuse {
            reason: Reason::CertificateNotYours,
            key: Some(&key),
            fingerprint: Some("SHA256:fp".to_owned()),
            remote_user: None,
            serial: Some(43),
            dest: None,
        };
        let line = refusal(&caller(), &decision, &Binding::default()).unwrap();
        assert!(
            line.ends_with(" serial=43 grant=- decision=refused reason=certificate-not-yours"),
            "{line}"
        );
        let issued_line = issued(
            &caller(),
            &IssuedLine {
                key: "deploy",
                serial: 42,
                key_id: "keyholder:alice@h:deploy",
                principals: &["deploy".to_owned(), "ops".to_owned()],
                valid_after: 1,
                valid_before: 2,
            },
        );
        assert_eq!(
            issued_line,
            "cert user=alice uid=1000 key=deploy serial=42 key_id=keyholder:alice@h:deploy \
             principals=deploy,ops valid_after=1 valid_before=2"
        );
    }

    #[test]
    fn refusal_lines_have_every_field_in_order() {
        let decision = Decision::Refuse {
            reason: Reason::UnknownKey,
            key: None,
            fingerprint: Some("SHA256:x".to_owned()),
            remote_user: None,
            serial: None,
            dest: None,
        };
        let line = refusal(&caller(), &decision, &Binding::default()).unwrap();
        assert_eq!(
            line,
            format!(
                "sign user=alice uid=1000 pid=42 key=- fingerprint=SHA256:x remote_user=- \
                 dest=- forwarded=no serial=- grant=- decision=refused reason={}",
                Reason::UnknownKey
            )
        );
        assert!(sign(&caller(), &decision, &Binding::default(), Outcome::Signed).is_none());
        assert!(refusal(&caller(), &Decision::List, &Binding::default()).is_none());
    }

    #[test]
    fn forwarded_comes_from_the_connections_bindings_and_dest_never_does() {
        use crate::policy::destinations::Binding as Bound;
        let key = key();
        let bound = |forwarding, sid: u8| Bound {
            host_key_blob: vec![sid],
            key: key.key.clone(),
            fingerprint: format!("SHA256:host{sid}"),
            cert: None,
            session_id: vec![sid; 32],
            forwarding,
        };
        assert_eq!(Binding::of(&Bindings::default()), Binding::default());
        let mut b = Bindings::default();
        b.record(bound(true, 1)).unwrap();
        b.record(bound(false, 2)).unwrap();
        let f = Binding::of(&b);
        // Never the last binding merely for being last: the decision names
        // the binding the signed data belongs to.
        assert_eq!(f.dest, None);
        assert!(f.forwarded);
        // A failed binding that said "forwarding" counts.
        let mut failed = Bindings::default();
        failed.fail(Some(true));
        assert!(Binding::of(&failed).forwarded);
        assert_eq!(Binding::of(&failed).dest, None);
    }

    #[test]
    fn each_kind_of_refusal_has_its_own_allowance_and_a_detail() {
        let key = key();
        let refuse = |reason, key| Decision::Refuse {
            reason,
            key,
            fingerprint: Some("SHA256:x".to_owned()),
            remote_user: None,
            serial: None,
            dest: None,
        };
        let admin = refuse(Reason::AdminRequest(AdminOp::RemoveAllIdentities), None);
        assert_eq!(refusal_kind(&admin), &REFUSED_ADMIN);
        assert_eq!(
            refusal_detail(&admin).as_deref(),
            Some("reason=admin-request:remove-all-identities key=-")
        );
        let sign = refuse(Reason::CertificateNotYours, Some(&key));
        assert_eq!(refusal_kind(&sign), &REFUSED_SIGN);
        assert_eq!(
            refusal_detail(&sign).as_deref(),
            Some("reason=certificate-not-yours key=deploy")
        );
        let bad = refuse(Reason::Malformed("trailing bytes"), None);
        assert_eq!(refusal_kind(&bad), &REFUSED_UNAUDITED);
        assert_eq!(
            refusal_detail(&bad).as_deref(),
            Some("reason=\"malformed (trailing bytes)\" key=-")
        );
        assert_eq!(refusal_detail(&Decision::List), None);
        let names = [
            REFUSED_ADMIN.name,
            REFUSED_SIGN.name,
            REFUSED_UNAUDITED.name,
        ];
        assert!(names[0] != names[1] && names[1] != names[2] && names[0] != names[2]);
    }
}
