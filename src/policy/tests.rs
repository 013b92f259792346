//! Every row of the request table (`docs/reference.md`, "What each request
//! gets"), for root, members, non-members and callers with no passwd entry.

use super::*;
use crate::protocol::classify;
use certificates::NoneMinted;
use ssh_agent_lib::proto::SignRequest;

/// `decide` on a connection with no session bindings.
fn decide<'p>(p: &'p Policy, c: &Caller, r: &Request) -> Decision<'p> {
    super::decide(
        p,
        c,
        Context {
            bindings: &Bindings::default(),
            now: 0,
            minted: &NoneMinted,
            grants: &grants::NO_GRANTS,
        },
        r,
    )
}

/// `decide_unresolved` on a connection with no session bindings.
fn decide_unresolved<'p>(p: &'p Policy, c: &Caller, r: &Request, why: Reason) -> Decision<'p> {
    super::decide_unresolved(
        p,
        c,
        Context {
            bindings: &Bindings::default(),
            now: 0,
            minted: &NoneMinted,
            grants: &grants::NO_GRANTS,
        },
        r,
        why,
    )
}

/// `decide` on a connection with no session bindings, knowing `minted`.
fn decide_with<'p>(p: &'p Policy, c: &Caller, minted: &dyn Minted, r: &Request) -> Decision<'p> {
    super::decide(
        p,
        c,
        Context {
            bindings: &Bindings::default(),
            now: 0,
            minted,
            grants: &grants::NO_GRANTS,
        },
        r,
    )
}

/// `plan_identities` on a connection with no session bindings.
fn plan_identities<'p>(p: &'p Policy, c: &Caller, ids: Vec<Identity>) -> ListPlan<'p> {
    let none = Bindings::default();
    super::plan_identities(
        p,
        c,
        Context {
            bindings: &none,
            now: 0,
            minted: &NoneMinted,
            grants: &grants::NO_GRANTS,
        },
        ids,
    )
}

/// `filter_identities` on a connection with no session bindings.
fn filter_identities(p: &Policy, c: &Caller, ids: Vec<Identity>) -> Vec<Identity> {
    let none = Bindings::default();
    super::filter_identities(
        p,
        c,
        Context {
            bindings: &none,
            now: 0,
            minted: &NoneMinted,
            grants: &grants::NO_GRANTS,
        },
        ids,
    )
}
use crate::protocol::userauth::tests::{build, key};
use crate::protocol::userauth::{PUBLICKEY, PUBLICKEY_HOSTBOUND};
use ssh_agent_lib::proto::PublicCredential;
use ssh_key::certificate::{Builder, CertType};
use ssh_key::private::Ed25519Keypair;
use ssh_key::PrivateKey;

fn rule(name: &str, seed: u8, groups: &[&str], any: bool) -> KeyRule {
    let key = key(seed);
    KeyRule {
        name: name.into(),
        fingerprint: key.fingerprint(ssh_key::HashAlg::Sha256).to_string(),
        key,
        groups: groups.iter().map(|g| g.to_string()).collect(),
        allow_any_data: any,
        certificate: CertMode::Off,
        rules: Rules::default(),
        grants: None,
        cert_terms: 0,
    }
}

fn policy() -> Policy {
    Policy {
        keys: vec![
            rule("deploy", 1, &["deployers", "ops"], false),
            rule("phab", 2, &["phab-admins"], false),
            rule("signer", 3, &["signers"], true),
        ],
        ca: None,
    }
}

fn caller(uid: u32, groups: &[&str]) -> Caller {
    Caller {
        uid,
        pid: Some(4242),
        user: Some(format!("u{uid}")),
        groups: groups.iter().map(|g| g.to_string()).collect(),
    }
}

fn sign(credential: PublicCredential, data: Vec<u8>, flags: u32) -> Request {
    Request::Sign(Box::new(Sign::new(SignRequest {
        credential,
        data,
        flags,
    })))
}

fn userauth_sign(seed: u8, user: &str) -> Request {
    sign(
        PublicCredential::Key(key(seed)),
        build(&key(seed), user, PUBLICKEY, None),
        0,
    )
}

fn identity(credential: PublicCredential) -> Identity {
    Identity {
        credential,
        comment: "c".into(),
    }
}

fn certificate(seed: u8) -> PublicCredential {
    let ca = PrivateKey::from(Ed25519Keypair::from_seed(&[9; 32]));
    let mut b = Builder::new([0u8; 16], key(seed), 0, 4_000_000_000).unwrap();
    b.cert_type(CertType::User).unwrap();
    b.valid_principal("deploy").unwrap();
    PublicCredential::Cert(Box::new(b.sign(&ca).unwrap()))
}

fn refused(d: &Decision<'_>) -> Option<Reason> {
    match d {
        Decision::Refuse { reason, .. } => Some(reason.clone()),
        _ => None,
    }
}

#[test]
fn listing_is_forwarded_for_callers_who_may_use_a_key() {
    let p = policy();
    for c in [
        caller(0, &[]),
        caller(1000, &["deployers"]),
        caller(1000, &["users", "signers"]),
    ] {
        assert_eq!(decide(&p, &c, &Request::RequestIdentities), Decision::List);
    }
}

#[test]
fn callers_who_may_use_no_key_get_an_empty_list_without_the_backend() {
    let p = policy();
    for c in [
        caller(1001, &[]),
        caller(1001, &["users", "deployers-not"]),
        Caller {
            user: None,
            ..caller(70_000, &[])
        },
    ] {
        assert_eq!(
            decide(&p, &c, &Request::RequestIdentities),
            Decision::EmptyList
        );
    }
    // No keys configured: root too.
    assert_eq!(
        decide(
            &Policy::default(),
            &caller(0, &[]),
            &Request::RequestIdentities
        ),
        Decision::EmptyList
    );
}

#[test]
fn member_of_an_allowed_group_may_sign_userauth() {
    let p = policy();
    for g in ["deployers", "ops"] {
        let d = decide(
            &p,
            &caller(1000, &["users", g]),
            &userauth_sign(1, "deploy"),
        );
        match d {
            Decision::Sign {
                key, remote_user, ..
            } => {
                assert_eq!(key.name, "deploy");
                assert_eq!(remote_user.as_deref(), Some("deploy"));
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn hostbound_userauth_is_signed() {
    let p = policy();
    let req = sign(
        PublicCredential::Key(key(1)),
        build(&key(1), "git", PUBLICKEY_HOSTBOUND, Some(b"hk")),
        0,
    );
    assert!(matches!(
        decide(&p, &caller(1000, &["ops"]), &req),
        Decision::Sign { .. }
    ));
}

#[test]
fn rsa_flags_do_not_change_the_decision() {
    let p = policy();
    for flags in [0, 2, 4, 6, 0xffff_ffff] {
        let req = sign(
            PublicCredential::Key(key(1)),
            build(&key(1), "u", PUBLICKEY, None),
            flags,
        );
        assert!(matches!(
            decide(&p, &caller(1000, &["ops"]), &req),
            Decision::Sign { .. }
        ));
    }
}

#[test]
fn non_member_is_refused_with_the_key_named() {
    let p = policy();
    let d = decide(
        &p,
        &caller(1000, &["phab-admins"]),
        &userauth_sign(1, "deploy"),
    );
    assert_eq!(refused(&d), Some(Reason::NotInGroup));
    let Decision::Refuse {
        key,
        fingerprint,
        remote_user,
        ..
    } = d
    else {
        unreachable!()
    };
    assert_eq!(key.map(|k| k.name.as_str()), Some("deploy"));
    assert!(fingerprint.is_some_and(|f| f.starts_with("SHA256:")));
    assert_eq!(remote_user.as_deref(), Some("deploy"));
}

#[test]
fn caller_without_passwd_entry_has_no_groups() {
    let p = policy();
    let c = Caller {
        uid: 54321,
        pid: None,
        user: None,
        groups: vec![],
    };
    assert_eq!(
        refused(&decide(&p, &c, &userauth_sign(1, "x"))),
        Some(Reason::NotInGroup)
    );
    assert!(filter_identities(&p, &c, vec![identity(PublicCredential::Key(key(1)))]).is_empty());
}

#[test]
fn root_may_use_every_configured_key_but_no_other() {
    let p = policy();
    let root = caller(0, &[]);
    for seed in [1, 2, 3] {
        assert!(matches!(
            decide(&p, &root, &userauth_sign(seed, "x")),
            Decision::Sign { .. }
        ));
    }
    assert_eq!(
        refused(&decide(&p, &root, &userauth_sign(77, "x"))),
        Some(Reason::UnknownKey)
    );
}

#[test]
fn unconfigured_key_is_refused() {
    let p = policy();
    assert_eq!(
        refused(&decide(
            &p,
            &caller(1000, &["ops"]),
            &userauth_sign(99, "x")
        )),
        Some(Reason::UnknownKey)
    );
}

#[test]
fn non_userauth_data_is_refused_unless_allow_any_data() {
    let p = policy();
    let c = caller(1000, &["ops", "signers"]);
    for data in [
        b"SSHSIG\0\0\0\x01arbitrary".to_vec(),
        vec![],
        build(&key(1), "u", "password", None),
        build(&key(2), "u", PUBLICKEY, None), // names another key
    ] {
        let d = decide(
            &p,
            &c,
            &sign(PublicCredential::Key(key(1)), data.clone(), 0),
        );
        assert!(matches!(refused(&d), Some(Reason::NotUserAuth(_))), "{d:?}");
        // the allow_any_data key signs the same data
        let d = decide(&p, &c, &sign(PublicCredential::Key(key(3)), data, 0));
        assert!(
            matches!(d, Decision::Sign { key, remote_user: None, .. } if key.name == "signer"),
            "{d:?}"
        );
    }
}

#[test]
fn allow_any_data_does_not_widen_the_groups() {
    let p = policy();
    let d = decide(
        &p,
        &caller(1000, &["ops"]),
        &sign(PublicCredential::Key(key(3)), b"x".to_vec(), 0),
    );
    assert_eq!(refused(&d), Some(Reason::NotInGroup));
}

#[test]
fn a_certificate_counts_as_the_key_it_certifies() {
    let p = policy();
    let cert = certificate(1);
    let member = caller(1000, &["deployers"]);
    let other = caller(1001, &["phab-admins"]);
    let data = build(&key(1), "deploy", PUBLICKEY, None);
    let req = sign(cert.clone(), data, 0);
    assert!(matches!(decide(&p, &member, &req), Decision::Sign { .. }));
    assert_eq!(refused(&decide(&p, &other, &req)), Some(Reason::NotInGroup));

    let ids = vec![
        identity(cert.clone()),
        identity(PublicCredential::Key(key(2))),
        identity(PublicCredential::Key(key(50))),
    ];
    let got = filter_identities(&p, &member, ids.clone());
    assert_eq!(got, vec![identity(cert)]);
    let got = filter_identities(&p, &other, ids.clone());
    assert_eq!(got, vec![identity(PublicCredential::Key(key(2)))]);
    // root sees the configured ones only, in upstream order
    assert_eq!(
        filter_identities(&p, &caller(0, &[]), ids.clone()),
        ids[..2].to_vec()
    );
}

#[test]
fn admin_requests_are_refused_for_everyone_including_root() {
    let p = policy();
    for t in [17u8, 18, 19, 20, 21, 22, 23, 25, 26] {
        let req = classify(&[t, 1, 2, 3]);
        for c in [
            caller(0, &[]),
            caller(1000, &["deployers", "ops", "phab-admins"]),
        ] {
            let d = decide(&p, &c, &req);
            assert!(matches!(refused(&d), Some(Reason::AdminRequest(_))), "{t}");
            assert!(d.is_audited());
        }
    }
}

#[test]
fn unknown_types_and_malformed_bodies_are_refused() {
    let p = policy();
    let c = caller(0, &[]);
    for t in [0u8, 1, 9, 12, 14, 24, 28, 99, 255] {
        assert_eq!(
            refused(&decide(&p, &c, &classify(&[t]))),
            Some(Reason::UnknownType(t))
        );
    }
    assert!(matches!(
        refused(&decide(&p, &c, &classify(&[13, 0, 0]))),
        Some(Reason::Malformed(_))
    ));
    assert!(matches!(
        refused(&decide(&p, &c, &classify(&[11, 0]))),
        Some(Reason::Malformed(_))
    ));
}

#[test]
fn extensions() {
    let p = policy();
    let c = caller(1000, &[]);
    // As classified from the wire: the extensions keyholder answers are
    // requests of their own, any other stays an opaque extension.
    let ext = |name: &str| {
        let mut m = vec![27u8];
        m.extend(u32::try_from(name.len()).unwrap().to_be_bytes());
        m.extend(name.as_bytes());
        classify(&m)
    };
    // session-bind with no contents is a malformed binding, refused as one.
    assert!(matches!(
        decide(&p, &c, &ext(SESSION_BIND)),
        Decision::RefuseBind { .. }
    ));
    assert_eq!(decide(&p, &c, &ext(QUERY)), Decision::Query);
    assert_eq!(decide(&p, &c, &ext(status::NAME)), Decision::Status);
    for other in ["restrict-destination-v00@openssh.com", "x@y", "QUERY"] {
        assert_eq!(
            refused(&decide(&p, &c, &ext(other))),
            Some(Reason::UnknownExtension)
        );
    }
}

#[test]
fn audit_covers_sign_decisions_only_besides_admin() {
    let p = policy();
    let c = caller(1000, &["ops"]);
    assert!(decide(&p, &c, &userauth_sign(1, "x")).is_audited());
    assert!(decide(&p, &c, &userauth_sign(2, "x")).is_audited());
    assert!(!decide(&p, &c, &Request::RequestIdentities).is_audited());
    assert!(!decide(&p, &c, &Request::Unknown(99)).is_audited());
}

#[test]
fn status_report_marks_armed_keys() {
    let p = policy();
    let s = status_report(&p, Some(&[identity(PublicCredential::Key(key(2)))]));
    assert!(s.upstream_reachable);
    let armed: Vec<_> = s.keys.iter().map(|k| (k.name.as_str(), k.armed)).collect();
    assert_eq!(
        armed,
        vec![("deploy", false), ("phab", true), ("signer", false)]
    );
    let s = status_report(&p, None);
    assert!(!s.upstream_reachable);
    assert!(s.keys.iter().all(|k| !k.armed));
}

#[test]
fn group_names_are_every_configured_group_once() {
    let mut p = policy();
    p.keys.push(rule("again", 4, &["ops", "deployers"], false));
    assert_eq!(
        p.group_names(),
        ["deployers", "ops", "phab-admins", "signers"]
    );
    assert!(Policy::default().group_names().is_empty());
}

/// A cache that minted `cert` for uid 1000, serial 77.
#[derive(Debug)]
struct MintedFor(ssh_key::Certificate);

impl certificates::Minted for MintedFor {
    fn issued(&self, cert: &ssh_key::Certificate) -> Option<certificates::Issued> {
        (cert == &self.0).then_some(certificates::Issued {
            uid: 1000,
            serial: 77,
            terms: 0,
        })
    }
}

/// The CA that signs [`certificate`]'s certificates.
fn test_ca() -> KeyData {
    PrivateKey::from(Ed25519Keypair::from_seed(&[9; 32]))
        .public_key()
        .key_data()
        .clone()
}

fn cert_policy(mode: CertMode) -> Policy {
    let mut p = policy();
    for k in &mut p.keys {
        k.certificate = mode;
    }
    p.ca = Some(CaRule {
        name: "ca".into(),
        key: test_ca(),
        fingerprint: "SHA256:ca".into(),
    });
    p
}

#[test]
fn the_key_blob_inside_the_data_is_what_the_certificate_rules_check() {
    let PublicCredential::Cert(cert) = certificate(1) else {
        unreachable!()
    };
    let minted = MintedFor((*cert).clone());
    let alice = caller(1000, &["deployers"]);
    let bob = caller(1001, &["deployers"]);
    let in_data = build_cert_data(&cert);
    for mode in [CertMode::Off, CertMode::Also, CertMode::Only] {
        let p = cert_policy(mode);
        // The request may name the certificate (ssh >= 10.3) or the plain
        // key (ssh <= 10.2, CertificateFile) with the certificate in the data.
        for credential in [
            PublicCredential::Cert(cert.clone()),
            PublicCredential::Key(key(1)),
        ] {
            let req = sign(credential, in_data.clone(), 0);
            let d = decide_with(&p, &alice, &minted, &req);
            assert!(
                matches!(
                    d,
                    Decision::Sign {
                        serial: Some(77),
                        ..
                    }
                ),
                "{mode:?}: {d:?}"
            );
            // Someone else replaying it, root included: refused, with the serial.
            for other in [&bob, &caller(0, &[])] {
                let d = decide_with(&p, other, &minted, &req);
                assert_eq!(refused(&d), Some(Reason::CertificateNotYours), "{mode:?}");
                assert!(matches!(
                    d,
                    Decision::Refuse {
                        serial: Some(77),
                        ..
                    }
                ));
                assert!(d.is_audited());
            }
            // Signed by keyholder's CA but not remembered as minted (a
            // forgery, or a restart since): refused.
            let d = decide_with(&p, &alice, &NoneMinted, &req);
            assert_eq!(refused(&d), Some(Reason::CertificateNotYours));
        }
        // Another CA's certificate of the key (one the admin armed upstream
        // with it): its key in mode off, refused with certificates on.
        let mut other_ca = p.clone();
        other_ca.ca = Some(CaRule {
            name: "ca".into(),
            key: key(61),
            fingerprint: "SHA256:other".into(),
        });
        let req = sign(PublicCredential::Key(key(1)), in_data.clone(), 0);
        let d = decide_with(&other_ca, &alice, &NoneMinted, &req);
        if mode == CertMode::Off {
            assert!(matches!(d, Decision::Sign { serial: None, .. }), "{d:?}");
        } else {
            assert_eq!(refused(&d), Some(Reason::CertificateNotYours));
        }
        // Plain key in the data: refused in mode only, whatever the request names.
        for credential in [
            PublicCredential::Cert(cert.clone()),
            PublicCredential::Key(key(1)),
        ] {
            let req = sign(credential, build(&key(1), "deploy", PUBLICKEY, None), 0);
            let d = decide_with(&p, &alice, &minted, &req);
            if mode == CertMode::Only {
                assert_eq!(refused(&d), Some(Reason::CertificateRequired));
                assert!(d.is_audited());
            } else {
                assert!(matches!(d, Decision::Sign { serial: None, .. }), "{d:?}");
            }
        }
        // Group rules come first: an outsider with alice's certificate.
        let req = sign(PublicCredential::Key(key(1)), in_data.clone(), 0);
        let outsider = caller(1000, &["phab-admins"]);
        assert_eq!(
            refused(&decide_with(&p, &outsider, &minted, &req)),
            Some(Reason::NotInGroup)
        );
    }
    // The CA can never sign, not even for root, not even other data.
    let p = cert_policy(CertMode::Only);
    for data in [build(&test_ca(), "x", PUBLICKEY, None), b"tbs".to_vec()] {
        let req = sign(PublicCredential::Key(test_ca()), data, 0);
        assert_eq!(
            refused(&decide_with(&p, &caller(0, &[]), &minted, &req)),
            Some(Reason::UnknownKey)
        );
    }
}

/// User-auth data carrying `cert` as its key blob.
fn build_cert_data(cert: &ssh_key::Certificate) -> Vec<u8> {
    use ssh_encoding::Encode;
    let mut d = Vec::new();
    vec![1u8; 32].encode(&mut d).unwrap();
    d.push(50);
    "deploy".encode(&mut d).unwrap();
    "ssh-connection".encode(&mut d).unwrap();
    PUBLICKEY.encode(&mut d).unwrap();
    d.push(1);
    "ssh-ed25519-cert-v01@openssh.com".encode(&mut d).unwrap();
    let mut blob = Vec::new();
    cert.encode(&mut blob).unwrap();
    blob.encode(&mut d).unwrap();
    d
}

#[test]
fn listing_plans_certificates_and_never_the_ca() {
    let ids = |with_ca: bool| {
        let mut v = vec![
            identity(PublicCredential::Key(key(1))),
            identity(PublicCredential::Key(key(2))),
        ];
        if with_ca {
            v.push(identity(PublicCredential::Key(test_ca())));
        }
        v
    };
    let mut p = cert_policy(CertMode::Also);
    p.keys[1].certificate = CertMode::Only;
    let root = caller(0, &[]);
    let plan = plan_identities(&p, &root, ids(true));
    assert!(plan.ca_armed);
    let got: Vec<(&str, Listing)> = plan
        .items
        .iter()
        .map(|i| (i.key.name.as_str(), i.listing))
        .collect();
    assert_eq!(
        got,
        vec![
            (
                "deploy",
                Listing::WithCertificate {
                    fallback_plain: true
                }
            ),
            (
                "phab",
                Listing::WithCertificate {
                    fallback_plain: false
                }
            ),
        ]
    );
    let plan = plan_identities(&p, &root, ids(false));
    assert!(!plan.ca_armed);
    let got: Vec<Listing> = plan.items.iter().map(|i| i.listing).collect();
    assert_eq!(got, vec![Listing::Plain, Listing::Nothing]);
    // Group filtering as before.
    let plan = plan_identities(&p, &caller(1000, &["deployers"]), ids(true));
    assert_eq!(plan.items.len(), 1);
    // The CA counts in status.
    let report = status_report(&p, Some(&ids(false)));
    assert_eq!(
        report.keys.last().map(|k| (k.name.as_str(), k.armed)),
        Some(("ca", false))
    );
}

#[test]
fn session_binds_are_checked_before_verifying_and_not_verified_for_callers_with_no_key() {
    use crate::protocol::session_bind::tests::signed;
    let p = policy();
    let (_, contents) = signed(1, &[5; 32], 0);
    let mut m = vec![27u8];
    m.extend(string_bytes(SESSION_BIND.as_bytes()));
    m.extend(&contents);
    let req = classify(&m);
    assert!(matches!(req, Request::SessionBind(_)), "{req:?}");
    let none = Bindings::default();
    let ctx = Context {
        bindings: &none,
        now: 0,
        minted: &NoneMinted,
        grants: &grants::NO_GRANTS,
    };
    assert_eq!(
        super::decide(&p, &caller(1000, &["ops"]), ctx, &req),
        Decision::VerifyBind
    );
    assert_eq!(
        super::decide(&p, &caller(0, &[]), ctx, &req),
        Decision::VerifyBind
    );
    for nobody in [caller(1000, &[]), caller(1000, &["other"])] {
        assert_eq!(
            super::decide(&p, &nobody, ctx, &req),
            Decision::RefuseBind {
                reason: "the caller may use no key",
                forwarding: Some(false)
            }
        );
    }
    // After a non-forwarding binding: refused before verifying.
    let Request::SessionBind(bind) = &req else {
        panic!()
    };
    let mut after = Bindings::default();
    after.record(crate::verify::binding(bind).unwrap()).unwrap();
    let ctx = Context {
        bindings: &after,
        now: 0,
        minted: &NoneMinted,
        grants: &grants::NO_GRANTS,
    };
    assert!(matches!(
        super::decide(&p, &caller(1000, &["ops"]), ctx, &req),
        Decision::RefuseBind { .. }
    ));
    // A malformed binding is refused and says what it could of its flag.
    let cut = &m[..m.len() - 1];
    assert_eq!(
        super::decide(&p, &caller(1000, &["ops"]), ctx, &classify(cut)),
        Decision::RefuseBind {
            reason: "missing forwarding flag",
            forwarding: None
        }
    );
}

#[test]
fn destination_refusals_are_audited_sign_refusals() {
    use destinations::Rules;
    let mut p = policy();
    p.keys[0].rules = Rules {
        destinations: Some(Default::default()),
        ..Rules::default()
    };
    let c = caller(1000, &["ops"]);
    let d = decide(&p, &c, &userauth_sign(1, "deploy"));
    assert_eq!(refused(&d), Some(Reason::NoSessionBind));
    assert!(d.is_audited());
    let Decision::Refuse {
        key, remote_user, ..
    } = &d
    else {
        panic!()
    };
    assert_eq!(key.map(|k| k.name.as_str()), Some("deploy"));
    assert_eq!(remote_user.as_deref(), Some("deploy"));
    for r in [
        Reason::DestinationNotAllowed,
        Reason::NoSessionBind,
        Reason::ForwardedUse,
        Reason::RemoteUserNotAllowed,
        Reason::BadSessionBind,
    ] {
        assert!(!r.to_string().contains(' '), "{r}");
    }
    // The group check comes first: a non-member learns nothing more.
    assert_eq!(
        refused(&decide(&p, &caller(1000, &[]), &userauth_sign(1, "deploy"))),
        Some(Reason::NotInGroup)
    );
    // Keys without rules are untouched.
    assert!(matches!(
        decide(&p, &caller(1000, &["phab-admins"]), &userauth_sign(2, "x")),
        Decision::Sign { .. }
    ));
}

fn string_bytes(b: &[u8]) -> Vec<u8> {
    let mut v = (b.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(b);
    v
}

#[test]
fn a_timed_out_lookup_refuses_what_depends_on_groups_except_for_root() {
    let p = policy();
    let unresolved = |uid| Caller {
        uid,
        pid: Some(7),
        user: None,
        groups: vec![],
    };
    let c = unresolved(1000);
    let d = decide_unresolved(&p, &c, &userauth_sign(1, "deploy"), Reason::LookupTimeout);
    assert_eq!(refused(&d), Some(Reason::LookupTimeout));
    assert!(d.is_audited());
    match &d {
        Decision::Refuse {
            key, fingerprint, ..
        } => {
            assert_eq!(key.map(|k| k.name.as_str()), Some("deploy"));
            assert!(fingerprint.is_some());
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(Reason::LookupTimeout.to_string(), "user-lookup-timeout");
    assert_eq!(Reason::LookupError.to_string(), "user-lookup-error");
    let d = decide_unresolved(&p, &c, &userauth_sign(2, "x"), Reason::LookupError);
    assert_eq!(refused(&d), Some(Reason::LookupError));
    assert!(d.is_audited());
    // allow_any_data keys too: the groups are what is unknown.
    let any = sign(PublicCredential::Key(key(3)), b"anything".to_vec(), 0);
    assert_eq!(
        refused(&decide_unresolved(&p, &c, &any, Reason::LookupTimeout)),
        Some(Reason::LookupTimeout)
    );
    // A listing is refused, not answered as if the caller had no keys, and
    // is not an audit line.
    let d = decide_unresolved(&p, &c, &Request::RequestIdentities, Reason::LookupTimeout);
    assert_eq!(refused(&d), Some(Reason::LookupTimeout));
    assert!(!d.is_audited());
    // What does not depend on groups is decided as usual.
    assert_eq!(
        refused(&decide_unresolved(
            &p,
            &c,
            &userauth_sign(77, "x"),
            Reason::LookupTimeout
        )),
        Some(Reason::UnknownKey)
    );
    assert!(matches!(
        refused(&decide_unresolved(
            &p,
            &c,
            &classify(&[19]),
            Reason::LookupTimeout
        )),
        Some(Reason::AdminRequest(_))
    ));
    let query = Request::Query;
    assert_eq!(
        decide_unresolved(&p, &c, &query, Reason::LookupTimeout),
        Decision::Query
    );
    // root needs no groups.
    let root = unresolved(0);
    assert!(matches!(
        decide_unresolved(&p, &root, &userauth_sign(1, "x"), Reason::LookupTimeout),
        Decision::Sign { .. }
    ));
    assert_eq!(
        decide_unresolved(
            &p,
            &root,
            &Request::RequestIdentities,
            Reason::LookupTimeout
        ),
        Decision::List
    );
}

#[test]
fn a_binding_from_a_caller_whose_lookup_failed_is_verified_not_refused() {
    use crate::protocol::session_bind::tests::signed;
    let p = policy();
    let (_, contents) = signed(1, &[5; 32], 0);
    let mut m = vec![27u8];
    m.extend(string_bytes(SESSION_BIND.as_bytes()));
    m.extend(&contents);
    let c = Caller {
        uid: 1000,
        pid: None,
        user: None,
        groups: vec![],
    };
    // Its groups are unknown, not empty: the binding is checked as usual.
    assert_eq!(
        decide_unresolved(&p, &c, &classify(&m), Reason::LookupTimeout),
        Decision::VerifyBind
    );
    // Malformed ones are still refused.
    assert!(matches!(
        decide_unresolved(&p, &c, &classify(&m[..m.len() - 1]), Reason::LookupTimeout),
        Decision::RefuseBind { .. }
    ));
}
