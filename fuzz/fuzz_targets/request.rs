//! Fuzzes everything keyholder does with client bytes before anything is
//! forwarded: framing (`split_frame`), classification (`classify`), the
//! user-auth parser for sign data, the `session-bind@openssh.com` parser and
//! its verification, and the policy decision (destination rules included),
//! against a small fixed policy, three callers and four connection states
//! (no binding, bound to the listed host, forwarded, a failed binding).
//! Beyond "no panic" it checks the invariants the request rules rest on
//! (`docs/reference.md`, "What each request gets"; see `check`).
//!
//! Run: `RUSTC_BOOTSTRAP=1 cargo fuzz run request fuzz/corpus/request fuzz/seeds/request`
//! (from the repository root; see docs/hardening.md, "Fuzzing").

#![no_main]

use std::sync::OnceLock;

use std::sync::Arc;

use keyholder::known_hosts::KnownHosts;
use keyholder::policy::destinations::{self, Binding, Bindings, Rules, MAX_BINDINGS};
use keyholder::policy::{self, Caller, Context, Decision, KeyRule, Policy, Reason};
use keyholder::protocol::frame::split_frame;
use keyholder::protocol::session_bind::{self, HostKey, MAX_SESSION_ID_LEN};
use keyholder::protocol::{classify, userauth, AdminOp, Request};
use libfuzzer_sys::fuzz_target;
use ssh_encoding::Encode;
use ssh_key::public::{Ed25519PublicKey, KeyData};

/// The seeds in fuzz/seeds/request use keys 0x11…, 0x22…, 0x33….
fn key(seed: u8) -> KeyData {
    KeyData::Ed25519(Ed25519PublicKey([seed; 32]))
}

fn rule(name: &str, seed: u8, groups: &[&str], allow_any_data: bool, rules: Rules) -> KeyRule {
    let key = key(seed);
    KeyRule {
        name: name.to_owned(),
        fingerprint: key.fingerprint(ssh_key::HashAlg::Sha256).to_string(),
        key,
        groups: groups.iter().map(|g| (*g).to_owned()).collect(),
        allow_any_data,
        rules,
        certificate: Default::default(),
        cert_terms: 0,
        grants: None,
    }
}

/// The listed host (key 0x44…, the seeds' bind_* files) and session 0x07….
fn host_binding(forwarding: bool, sid: u8) -> Binding {
    let key = key(0x44);
    let mut host_key_blob = Vec::new();
    key.encode(&mut host_key_blob).expect("encode a key");
    Binding {
        fingerprint: key.fingerprint(ssh_key::HashAlg::Sha256).to_string(),
        host_key_blob,
        key,
        cert: None,
        session_id: vec![sid; 32],
        forwarding,
    }
}

struct Fixture {
    policy: Policy,
    callers: Vec<Caller>,
    connections: Vec<Bindings>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| Fixture {
        policy: Policy {
            keys: vec![
                rule(
                    "deploy",
                    0x11,
                    &["deployers"],
                    false,
                    Rules {
                        destinations: Some(Arc::new(KnownHosts {
                            host_keys: vec![key(0x44)],
                            cas: vec![key(0x55)],
                            revoked: vec![],
                        })),
                        ..Rules::default()
                    },
                ),
                rule(
                    "gitsign",
                    0x22,
                    &["signers"],
                    true,
                    Rules {
                        allow_forwarding: true,
                        ..Rules::default()
                    },
                ),
                rule(
                    "phab",
                    0x33,
                    &["phab-admins", "deployers"],
                    false,
                    Rules {
                        remote_users: Some(vec!["deploy".into()]),
                        ..Rules::default()
                    },
                ),
            ],
            ca: None,
        },
        connections: {
            let mut bound = Bindings::default();
            bound.record(host_binding(false, 7)).expect("first binding");
            let mut forwarded = Bindings::default();
            forwarded.record(host_binding(true, 6)).expect("first binding");
            forwarded.record(host_binding(false, 7)).expect("second binding");
            let mut failed = bound.clone();
            failed.fail(None);
            vec![Bindings::default(), bound, forwarded, failed]
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
        (Some(27), Request::Extension(e)) => {
            assert!(!e.name.is_empty() && e.name != policy::SESSION_BIND);
            assert!(![policy::QUERY, "status@keyholder"].contains(&e.name.as_str()));
            assert!(!keyholder::protocol::grants::is_grant(&e.name));
        }
        (Some(27), Request::Query | Request::Status(_) | Request::Grant { .. }) => {}
        (Some(27), Request::SessionBind(_) | Request::BadSessionBind(_)) => {}
        (Some(27), Request::Malformed { kind: 27, .. }) => {}
        (Some(t), Request::Unknown(u)) => assert_eq!(t, *u),
        (k, r) => panic!("type {k:?} classified as {r:?}"),
    }

    // A well-formed sign request is forwarded by re-encoding it: that must
    // give back exactly the bytes the client sent ("forwarded unchanged").
    if let Request::Sign(sign) = &request {
        let mut again = vec![13u8];
        sign.request.encode(&mut again)
            .expect("encode a decoded sign request");
        assert_eq!(again, body, "sign request does not re-encode to its bytes");
    }

    // A binding that parses is strict (see `check_bind`); recording it as if
    // it verified keeps the connection's invariants.
    if let Request::SessionBind(bind) = &request {
        check_bind(body, bind);
    }

    for (caller, bindings) in f
        .callers
        .iter()
        .flat_map(|c| f.connections.iter().map(move |b| (c, b)))
    {
        let ctx = Context {
            bindings,
            now: 1000,
            minted: &keyholder::policy::certificates::NoneMinted,
            grants: &keyholder::policy::grants::NO_GRANTS,
        };
        let decision = policy::decide(&f.policy, caller, ctx, &request);
        match (&request, &decision) {
            (Request::RequestIdentities, Decision::List) => {
                assert!(f.policy.any_key_for(caller, &keyholder::policy::grants::NO_GRANTS, 1000))
            }
            (Request::RequestIdentities, Decision::EmptyList) => {
                assert!(!f.policy.any_key_for(caller, &keyholder::policy::grants::NO_GRANTS, 1000))
            }
            (Request::Sign(sign), Decision::Sign { key, remote_user, .. }) => {
                let wanted = sign.request.credential.key_data();
                assert_eq!(f.policy.key(wanted), Some(*key));
                assert!(caller.may_use(key), "{caller:?} may not use {}", key.name);
                let auth = userauth::parse(&sign.request.data, wanted);
                assert_eq!(auth, sign.auth, "classification parsed the data otherwise");
                assert!(key.allow_any_data || auth.is_ok(), "{auth:?}");
                assert_eq!(
                    destinations::check_sign(&key.rules, bindings, auth.as_ref().ok(), 1000),
                    Ok(())
                );
                if key.rules.destinations.is_some() {
                    // Only the listed host, for its own session.
                    let a = auth.as_ref().expect("destinations need user-auth data");
                    let last = bindings.last().expect("destinations need a binding");
                    assert_eq!(a.session_id, last.session_id);
                    assert!(!bindings.failed());
                }
                if !key.rules.allow_forwarding {
                    assert!(!bindings.maybe_forwarded());
                }
                assert_eq!(remote_user, &auth.ok().map(|a| a.user));
            }
            (Request::Sign(sign), Decision::Refuse { reason, key, .. }) => {
                let wanted = sign.request.credential.key_data();
                let configured = f.policy.key(wanted);
                assert_eq!(*key, configured);
                match reason {
                    Reason::UnknownKey => assert!(configured.is_none()),
                    Reason::NotInGroup => {
                        assert!(configured.is_some_and(|k| !caller.may_use(k)))
                    }
                    Reason::NotUserAuth(_) => {
                        assert!(configured.is_some_and(|k| !k.allow_any_data));
                        assert!(userauth::parse(&sign.request.data, wanted).is_err());
                    }
                    Reason::DestinationNotAllowed
                    | Reason::NoSessionBind
                    | Reason::BadSessionBind => {
                        let k = configured.expect("a configured key");
                        assert!(caller.may_use(k));
                        assert!(
                            k.rules.destinations.is_some() || bindings.maybe_forwarded(),
                            "{reason:?}"
                        );
                        if *reason == Reason::NoSessionBind {
                            assert!(bindings.list().is_empty());
                        }
                    }
                    Reason::ForwardedUse => {
                        let k = configured.expect("a configured key");
                        assert!(!k.rules.allow_forwarding && bindings.forwarded());
                    }
                    Reason::RemoteUserNotAllowed => {
                        let k = configured.expect("a configured key");
                        assert!(k.rules.remote_users.is_some());
                    }
                    other => panic!("sign refused for {other:?}"),
                }
            }
            (Request::SessionBind(_), Decision::VerifyBind) => {
                assert!(f.policy.any_key_for(caller, &keyholder::policy::grants::NO_GRANTS, 1000))
            }
            (Request::SessionBind(_), Decision::RefuseBind { .. }) => {}
            (Request::BadSessionBind(m), Decision::RefuseBind { reason, forwarding }) => {
                assert_eq!((m.reason, m.forwarding), (*reason, *forwarding))
            }
            (Request::Query, Decision::Query)
            | (Request::Status(_), Decision::Status)
            | (Request::Grant { .. }, Decision::Grant) => {}
            (
                Request::Extension(_),
                Decision::Refuse {
                    reason: Reason::UnknownExtension,
                    ..
                },
            ) => {}
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
        let binding = keyholder::daemon::audit::Binding::of(bindings);
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

/// A parsed binding is strict, re-parses to itself, verifies or not
/// without panicking, and recording it keeps a connection's bounds.
fn check_bind(body: &[u8], bind: &session_bind::SessionBind) {
    assert!(!bind.session_id.is_empty() && bind.session_id.len() <= MAX_SESSION_ID_LEN);
    assert_eq!(
        session_bind::parse_host_key(&bind.host_key_blob).as_ref(),
        Some(&bind.host_key)
    );
    if let HostKey::Cert(cert) = &bind.host_key {
        assert_eq!(bind.host_key.key(), &cert.key);
    }
    // The body ends with the forwarding flag.
    assert_eq!(body.last().copied(), Some(u8::from(bind.forwarding)));
    let verified = keyholder::verify::binding(bind);
    if let Ok(b) = &verified {
        assert_eq!(b.session_id, bind.session_id);
        assert_eq!(&b.key, bind.host_key.key());
    }
    // As if it verified, on each connection state.
    let fact = verified.unwrap_or_else(|_| Binding {
        host_key_blob: bind.host_key_blob.clone(),
        key: bind.host_key.key().clone(),
        fingerprint: String::new(),
        cert: None,
        session_id: bind.session_id.clone(),
        forwarding: bind.forwarding,
    });
    for conn in &fixture().connections {
        let mut c = conn.clone();
        let pre = c.check(destinations::Proposed {
            host_key_blob: &fact.host_key_blob,
            session_id: &fact.session_id,
        });
        assert_eq!(c.record(fact.clone()), pre);
        assert!(c.list().len() <= MAX_BINDINGS);
        if conn.list().iter().any(|b| !b.forwarding) {
            assert!(pre.is_err());
        }
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
