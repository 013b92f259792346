//! Fuzzes everything keyholder does with client bytes before anything is
//! forwarded: framing (`split_frame`), classification (`classify`), the
//! user-auth parser for sign data, and the policy decision, against a small
//! fixed policy and three callers. Beyond "no panic" it checks the
//! invariants the contract rests on (see `check`).
//!
//! Run: `RUSTC_BOOTSTRAP=1 cargo fuzz run request fuzz/corpus/request fuzz/seeds/request`
//! (from the repository root; see notes/README-hardening.md).

#![no_main]

use std::sync::OnceLock;

use keyholder::policy::{self, Caller, Decision, KeyRule, Policy, Reason};
use keyholder::protocol::frame::split_frame;
use keyholder::protocol::{classify, userauth, AdminOp, Request};
use libfuzzer_sys::fuzz_target;
use ssh_encoding::Encode;
use ssh_key::public::{Ed25519PublicKey, KeyData};

/// The seeds in fuzz/seeds/request use keys 0x11…, 0x22…, 0x33….
fn key(seed: u8) -> KeyData {
    KeyData::Ed25519(Ed25519PublicKey([seed; 32]))
}

fn rule(name: &str, seed: u8, groups: &[&str], allow_any_data: bool) -> KeyRule {
    let key = key(seed);
    KeyRule {
        name: name.to_owned(),
        fingerprint: key.fingerprint(ssh_key::HashAlg::Sha256).to_string(),
        key,
        groups: groups.iter().map(|g| (*g).to_owned()).collect(),
        allow_any_data,
    }
}

struct Fixture {
    policy: Policy,
    callers: Vec<Caller>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| Fixture {
        policy: Policy {
            keys: vec![
                rule("deploy", 0x11, &["deployers"], false),
                rule("gitsign", 0x22, &["signers"], true),
                rule("phab", 0x33, &["phab-admins", "deployers"], false),
            ],
        },
        callers: vec![
            Caller {
                uid: 0,
                pid: Some(1),
                user: Some("root".into()),
                groups: vec!["root".into()],
            },
            Caller {
                uid: 1000,
                pid: Some(2),
                user: Some("dep".into()),
                groups: vec!["deployers".into()],
            },
            Caller {
                uid: 1001,
                pid: None,
                user: None,
                groups: vec![],
            },
        ],
    })
}

/// Classifies one message body and decides it for every caller, checking
/// the invariants.
fn check(body: &[u8]) {
    let f = fixture();
    let request = classify(body);
    let kind = body.first().copied();

    // Classification depends on the type byte first.
    match (kind, &request) {
        (None, Request::Malformed { .. }) => {}
        (Some(t), Request::Admin(op)) => assert_eq!(AdminOp::from_type(t), Some(*op)),
        (Some(t), _) if AdminOp::from_type(t).is_some() => {
            panic!("admin type {t} not classified as admin: {request:?}")
        }
        (Some(11), Request::RequestIdentities) => assert_eq!(body.len(), 1),
        (Some(11), Request::Malformed { .. }) => assert!(body.len() > 1),
        (Some(13), Request::Sign(_) | Request::Malformed { kind: 13, .. }) => {}
        (Some(27), Request::Extension(e)) => assert!(!e.name.is_empty()),
        (Some(27), Request::Malformed { kind: 27, .. }) => {}
        (Some(t), Request::Unknown(u)) => assert_eq!(t, *u),
        (k, r) => panic!("type {k:?} classified as {r:?}"),
    }

    // A well-formed sign request is forwarded by re-encoding it: that must
    // give back exactly the bytes the client sent ("forwarded unchanged").
    if let Request::Sign(sign) = &request {
        let mut again = vec![13u8];
        sign.encode(&mut again)
            .expect("encode a decoded sign request");
        assert_eq!(again, body, "sign request does not re-encode to its bytes");
    }

    for caller in &f.callers {
        let decision = policy::decide(&f.policy, caller, &request);
        match (&request, &decision) {
            (Request::RequestIdentities, Decision::List) => {}
            (Request::Sign(sign), Decision::Sign { key, remote_user }) => {
                let wanted = sign.credential.key_data();
                assert_eq!(f.policy.key(wanted), Some(*key));
                assert!(caller.may_use(key), "{caller:?} may not use {}", key.name);
                let auth = userauth::parse(&sign.data, wanted);
                assert!(key.allow_any_data || auth.is_ok(), "{auth:?}");
                assert_eq!(remote_user, &auth.ok().map(|a| a.user));
            }
            (Request::Sign(sign), Decision::Refuse { reason, key, .. }) => {
                let wanted = sign.credential.key_data();
                let configured = f.policy.key(wanted);
                assert_eq!(*key, configured);
                match reason {
                    Reason::UnknownKey => assert!(configured.is_none()),
                    Reason::NotInGroup => {
                        assert!(configured.is_some_and(|k| !caller.may_use(k)))
                    }
                    Reason::NotUserAuth(_) => {
                        assert!(configured.is_some_and(|k| !k.allow_any_data));
                        assert!(userauth::parse(&sign.data, wanted).is_err());
                    }
                    other => panic!("sign refused for {other:?}"),
                }
            }
            (Request::Extension(e), d) => match (e.name.as_str(), d) {
                (policy::SESSION_BIND, Decision::SessionBind)
                | (policy::QUERY, Decision::Query)
                | ("status@keyholder", Decision::Status) => {}
                (
                    name,
                    Decision::Refuse {
                        reason: Reason::UnknownExtension,
                        ..
                    },
                ) => assert!(
                    ![policy::SESSION_BIND, policy::QUERY, "status@keyholder"].contains(&name)
                ),
                (name, d) => panic!("extension {name}: {d:?}"),
            },
            (
                Request::Admin(op),
                Decision::Refuse {
                    reason: Reason::AdminRequest(r),
                    ..
                },
            ) => assert_eq!(op, r),
            (
                Request::Unknown(t),
                Decision::Refuse {
                    reason: Reason::UnknownType(r),
                    ..
                },
            ) => assert_eq!(t, r),
            (
                Request::Malformed { .. },
                Decision::Refuse {
                    reason: Reason::Malformed(_),
                    ..
                },
            ) => {}
            (r, d) => panic!("{r:?} decided as {d:?}"),
        }
        // The audit line (which quotes client data) must not panic either,
        // and exists exactly for audited decisions.
        let binding = keyholder::daemon::audit::Binding::default();
        let line = keyholder::daemon::audit::refusal(caller, &decision, &binding).or_else(|| {
            keyholder::daemon::audit::sign(
                caller,
                &decision,
                &binding,
                keyholder::daemon::audit::Outcome::Signed,
            )
        });
        assert_eq!(line.is_some(), decision.is_audited());
    }
}

fuzz_target!(|data: &[u8]| {
    // The input as one message body (the common case the fuzzer reaches
    // fastest), then as a stream of frames.
    check(data);
    let mut rest = data;
    while let Ok(Some((body, tail))) = split_frame(rest) {
        check(body);
        rest = tail;
    }
});
