//! The binding and destination rules, case by case (OpenSSH's
//! `process_ext_session_bind` / `identity_permitted` semantics).

use super::*;
use crate::protocol::userauth::UserAuth;
use ssh_key::public::Ed25519PublicKey;

fn key(seed: u8) -> KeyData {
    KeyData::Ed25519(Ed25519PublicKey([seed; 32]))
}

/// The wire blob of `key(seed)`, or of a "certificate" (any distinct blob
/// stands for one here: the policy compares blobs, not their contents).
fn blob(seed: u8, cert: bool) -> Vec<u8> {
    let mut b = vec![seed; 8];
    b.push(u8::from(cert));
    b
}

/// A verified binding to host `seed` for session `sid`.
fn bound(seed: u8, sid: u8, forwarding: bool) -> Binding {
    Binding {
        host_key_blob: blob(seed, false),
        key: key(seed),
        fingerprint: format!("SHA256:host{seed}"),
        cert: None,
        session_id: vec![sid; 32],
        forwarding,
    }
}

/// A verified binding to host `seed` presenting a certificate by CA `ca`.
fn bound_cert(seed: u8, ca: u8, sid: u8, host: bool, valid: (u64, u64)) -> Binding {
    Binding {
        host_key_blob: blob(seed, true),
        cert: Some(HostCert {
            ca: key(ca),
            host,
            valid_after: valid.0,
            valid_before: valid.1,
        }),
        ..bound(seed, sid, false)
    }
}

fn bindings(list: &[Binding]) -> Bindings {
    let mut b = Bindings::default();
    for x in list {
        b.record(x.clone()).unwrap();
    }
    b
}

fn auth(user: &str, sid: u8, host_key: Option<Vec<u8>>) -> UserAuth {
    UserAuth {
        user: user.into(),
        hostbound: host_key.is_some(),
        session_id: vec![sid; 32],
        host_key,
        key: ssh_agent_lib::proto::PublicCredential::Key(key(1)),
    }
}

fn hosts(keys: &[u8], cas: &[u8], revoked: &[u8]) -> Arc<KnownHosts> {
    Arc::new(KnownHosts {
        host_keys: keys.iter().map(|s| key(*s)).collect(),
        cas: cas.iter().map(|s| key(*s)).collect(),
        revoked: revoked.iter().map(|s| key(*s)).collect(),
    })
}

fn dest_rules(keys: &[u8], cas: &[u8]) -> Rules {
    Rules {
        destinations: Some(hosts(keys, cas, &[])),
        ..Rules::default()
    }
}

const NOW: u64 = 1_000;

// --- recording bindings ----------------------------------------------------

#[test]
fn forwarding_bindings_chain_up_to_sixteen() {
    let mut b = Bindings::default();
    for i in 0..MAX_BINDINGS as u8 {
        assert_eq!(b.record(bound(i, i, true)), Ok(()), "{i}");
    }
    assert_eq!(b.list().len(), MAX_BINDINGS);
    assert_eq!(
        b.check(Proposed {
            host_key_blob: &blob(99, false),
            session_id: &[99; 32]
        }),
        Err("too many bindings")
    );
    // The same session and key again is fine even when full.
    assert_eq!(b.record(bound(3, 3, true)), Ok(()));
    assert_eq!(b.list().len(), MAX_BINDINGS);
}

#[test]
fn same_session_same_key_is_recorded_once_another_key_is_refused() {
    let mut b = bindings(&[bound(1, 1, true)]);
    assert_eq!(b.record(bound(1, 1, true)), Ok(()));
    assert_eq!(b.list().len(), 1);
    assert_eq!(
        b.record(bound(2, 1, true)),
        Err("session identifier already bound to another host key")
    );
    // A new session with a key seen before: several connections to one host.
    assert_eq!(b.record(bound(1, 2, true)), Ok(()));
    assert_eq!(b.list().len(), 2);
}

#[test]
fn nothing_is_bound_after_a_non_forwarding_binding() {
    let b = bindings(&[bound(1, 1, false)]);
    for (seed, sid) in [(2, 2), (1, 1), (1, 2), (2, 1)] {
        assert_eq!(
            b.check(Proposed {
                host_key_blob: &blob(seed, false),
                session_id: &[sid; 32]
            }),
            Err("binding after a non-forwarding binding"),
            "{seed} {sid}"
        );
    }
    // After forwarding ones, one non-forwarding binding closes the chain.
    let mut b = bindings(&[bound(1, 1, true), bound(2, 2, false)]);
    assert!(b.record(bound(3, 3, false)).is_err());
    assert!(b.record(bound(3, 3, true)).is_err());
}

#[test]
fn failures_are_remembered_with_what_they_said_about_forwarding() {
    let mut b = Bindings::default();
    b.fail(Some(false));
    assert!(b.failed() && !b.maybe_forwarded());
    let mut b = Bindings::default();
    b.fail(Some(true));
    assert!(b.failed() && b.maybe_forwarded() && !b.forwarded());
    // A flag that could not be read may have said "forwarding".
    let mut b = Bindings::default();
    b.fail(None);
    assert!(b.maybe_forwarded());
}

// --- signing ---------------------------------------------------------------

#[test]
fn unrestricted_keys_sign_for_every_client() {
    let r = Rules {
        allow_forwarding: true,
        ..Rules::default()
    };
    let a = auth("root", 1, None);
    for b in [
        Bindings::default(),
        bindings(&[bound(1, 1, false)]),
        bindings(&[bound(1, 1, true), bound(2, 2, false)]),
    ] {
        assert_eq!(check_sign(&r, &b, Some(&a), NOW), Ok(()));
        assert_eq!(check_sign(&r, &b, None, NOW), Ok(()));
    }
    let mut b = Bindings::default();
    b.fail(None);
    assert_eq!(check_sign(&r, &b, Some(&a), NOW), Ok(()));
}

#[test]
fn no_binding_is_no_session_bind() {
    let r = dest_rules(&[1], &[]);
    assert_eq!(
        check_sign(&r, &Bindings::default(), Some(&auth("u", 1, None)), NOW),
        Err(Reason::NoSessionBind)
    );
    // Without destinations, a client that never binds is served.
    assert_eq!(
        check_sign(
            &Rules::default(),
            &Bindings::default(),
            Some(&auth("u", 1, None)),
            NOW
        ),
        Ok(())
    );
}

#[test]
fn a_listed_host_key_admits_and_others_do_not() {
    let r = dest_rules(&[1, 2], &[]);
    let a = auth("u", 7, None);
    assert_eq!(
        check_sign(&r, &bindings(&[bound(1, 7, false)]), Some(&a), NOW),
        Ok(())
    );
    assert_eq!(
        check_sign(&r, &bindings(&[bound(2, 7, false)]), Some(&a), NOW),
        Ok(())
    );
    assert_eq!(
        check_sign(&r, &bindings(&[bound(3, 7, false)]), Some(&a), NOW),
        Err(Reason::DestinationNotAllowed)
    );
    // A CA line is not a host key line.
    assert_eq!(
        check_sign(
            &dest_rules(&[], &[1]),
            &bindings(&[bound(1, 7, false)]),
            Some(&a),
            NOW
        ),
        Err(Reason::DestinationNotAllowed)
    );
}

#[test]
fn the_session_id_must_be_the_last_bindings() {
    let r = dest_rules(&[1], &[]);
    let b = bindings(&[bound(1, 7, false)]);
    assert_eq!(
        check_sign(&r, &b, Some(&auth("u", 8, None)), NOW),
        Err(Reason::DestinationNotAllowed)
    );
}

#[test]
fn hostbound_requests_must_name_the_bound_host_key() {
    let r = dest_rules(&[1, 2], &[]);
    let b = bindings(&[bound(1, 7, false)]);
    assert_eq!(
        check_sign(&r, &b, Some(&auth("u", 7, Some(blob(1, false)))), NOW),
        Ok(())
    );
    // Another (even allowed) host key in the data than the bound one.
    assert_eq!(
        check_sign(&r, &b, Some(&auth("u", 7, Some(blob(2, false)))), NOW),
        Err(Reason::DestinationNotAllowed)
    );
}

#[test]
fn with_several_bindings_the_request_must_be_hostbound() {
    let r = Rules {
        allow_forwarding: true,
        ..dest_rules(&[1, 2], &[])
    };
    let b = bindings(&[bound(1, 1, true), bound(2, 2, false)]);
    assert_eq!(
        check_sign(&r, &b, Some(&auth("u", 2, None)), NOW),
        Err(Reason::DestinationNotAllowed)
    );
    assert_eq!(
        check_sign(&r, &b, Some(&auth("u", 2, Some(blob(2, false)))), NOW),
        Ok(())
    );
    // The destination is the last hop: only it must be listed.
    let only_last = Rules {
        allow_forwarding: true,
        ..dest_rules(&[2], &[])
    };
    assert_eq!(
        check_sign(
            &only_last,
            &b,
            Some(&auth("u", 2, Some(blob(2, false)))),
            NOW
        ),
        Ok(())
    );
    let only_first = Rules {
        allow_forwarding: true,
        ..dest_rules(&[1], &[])
    };
    assert_eq!(
        check_sign(
            &only_first,
            &b,
            Some(&auth("u", 2, Some(blob(2, false)))),
            NOW
        ),
        Err(Reason::DestinationNotAllowed)
    );
}

#[test]
fn signing_on_a_forwarding_hop_is_refused() {
    // `ssh -A host`, then the agent used on `host` without binding onward.
    let b = bindings(&[bound(1, 1, true)]);
    let a = auth("u", 1, Some(blob(1, false)));
    assert_eq!(
        check_sign(&dest_rules(&[1], &[]), &b, Some(&a), NOW),
        Err(Reason::ForwardedUse)
    );
    let r = Rules {
        allow_forwarding: true,
        ..dest_rules(&[1], &[])
    };
    assert_eq!(
        check_sign(&r, &b, Some(&a), NOW),
        Err(Reason::DestinationNotAllowed)
    );
}

#[test]
fn forwarded_connections_sign_only_for_keys_that_allow_it() {
    let b = bindings(&[bound(1, 1, true), bound(2, 2, false)]);
    let a = auth("u", 2, Some(blob(2, false)));
    assert_eq!(
        check_sign(&Rules::default(), &b, Some(&a), NOW),
        Err(Reason::ForwardedUse)
    );
    assert_eq!(
        check_sign(&dest_rules(&[2], &[]), &b, Some(&a), NOW),
        Err(Reason::ForwardedUse)
    );
    let ok = Rules {
        allow_forwarding: true,
        ..Rules::default()
    };
    assert_eq!(check_sign(&ok, &b, Some(&a), NOW), Ok(()));
    // Not forwarded: allow_forwarding = false changes nothing.
    let direct = bindings(&[bound(2, 2, false)]);
    assert_eq!(
        check_sign(&Rules::default(), &direct, Some(&a), NOW),
        Ok(())
    );
}

#[test]
fn a_failed_binding_stops_keys_with_destinations() {
    for forwarding in [Some(false), Some(true), None] {
        let mut b = bindings(&[bound(1, 7, false)]);
        b.fail(forwarding);
        let r = Rules {
            allow_forwarding: true,
            ..dest_rules(&[1], &[])
        };
        assert_eq!(
            check_sign(&r, &b, Some(&auth("u", 7, None)), NOW),
            Err(Reason::BadSessionBind),
            "{forwarding:?}"
        );
    }
    // Before any good binding, too (the bypass fixed in OpenSSH 9.6).
    let mut b = Bindings::default();
    b.fail(Some(false));
    assert_eq!(
        check_sign(&dest_rules(&[1], &[]), &b, Some(&auth("u", 7, None)), NOW),
        Err(Reason::BadSessionBind)
    );
}

#[test]
fn a_failed_binding_that_may_have_been_forwarding_stops_keys_without_allow_forwarding() {
    let a = auth("u", 7, None);
    let mut b = Bindings::default();
    b.fail(Some(false));
    assert_eq!(check_sign(&Rules::default(), &b, Some(&a), NOW), Ok(()));
    for forwarding in [Some(true), None] {
        let mut b = Bindings::default();
        b.fail(forwarding);
        assert_eq!(
            check_sign(&Rules::default(), &b, Some(&a), NOW),
            Err(Reason::BadSessionBind)
        );
    }
}

#[test]
fn certificates_are_admitted_by_a_listed_ca_when_valid_and_for_hosts() {
    let r = dest_rules(&[], &[9]);
    let a = auth("u", 7, None);
    let ok = bindings(&[bound_cert(1, 9, 7, true, (NOW - 10, NOW + 10))]);
    assert_eq!(check_sign(&r, &ok, Some(&a), NOW), Ok(()));
    let cases = [
        ("another CA", bound_cert(1, 8, 7, true, (0, u64::MAX))),
        (
            "a user certificate",
            bound_cert(1, 9, 7, false, (0, u64::MAX)),
        ),
        (
            "not yet valid",
            bound_cert(1, 9, 7, true, (NOW + 1, NOW + 10)),
        ),
        ("expired", bound_cert(1, 9, 7, true, (0, NOW))),
    ];
    for (what, binding) in cases {
        assert_eq!(
            check_sign(&r, &bindings(&[binding]), Some(&a), NOW),
            Err(Reason::DestinationNotAllowed),
            "{what}"
        );
    }
    // valid_after is inclusive.
    let edge = bindings(&[bound_cert(1, 9, 7, true, (NOW, NOW + 1))]);
    assert_eq!(check_sign(&r, &edge, Some(&a), NOW), Ok(()));
    // A certified host is not admitted by its plain key being listed.
    let plain_only = dest_rules(&[1], &[]);
    assert_eq!(
        check_sign(&plain_only, &ok, Some(&a), NOW),
        Err(Reason::DestinationNotAllowed)
    );
    // Hostbound: the certificate blob is what the data must carry.
    assert_eq!(
        check_sign(&r, &ok, Some(&auth("u", 7, Some(blob(1, true)))), NOW),
        Ok(())
    );
    assert_eq!(
        check_sign(&r, &ok, Some(&auth("u", 7, Some(blob(1, false)))), NOW),
        Err(Reason::DestinationNotAllowed)
    );
}

#[test]
fn revoked_keys_and_cas_are_never_admitted() {
    let a = auth("u", 7, None);
    let r = Rules {
        destinations: Some(hosts(&[1], &[9], &[1])),
        ..Rules::default()
    };
    assert_eq!(
        check_sign(&r, &bindings(&[bound(1, 7, false)]), Some(&a), NOW),
        Err(Reason::DestinationNotAllowed)
    );
    let r = Rules {
        destinations: Some(hosts(&[], &[9], &[9])),
        ..Rules::default()
    };
    let b = bindings(&[bound_cert(2, 9, 7, true, (0, u64::MAX))]);
    assert_eq!(
        check_sign(&r, &b, Some(&a), NOW),
        Err(Reason::DestinationNotAllowed)
    );
    // A revoked host key behind a good CA.
    let r = Rules {
        destinations: Some(hosts(&[], &[9], &[2])),
        ..Rules::default()
    };
    assert_eq!(
        check_sign(&r, &b, Some(&a), NOW),
        Err(Reason::DestinationNotAllowed)
    );
}

#[test]
fn data_that_is_not_userauth_cannot_go_to_a_destination() {
    let b = bindings(&[bound(1, 7, false)]);
    assert_eq!(
        check_sign(&dest_rules(&[1], &[]), &b, None, NOW),
        Err(Reason::DestinationNotAllowed)
    );
}

#[test]
fn remote_users_apply_to_every_client() {
    let r = Rules {
        remote_users: Some(vec!["deploy".into(), "git".into()]),
        ..Rules::default()
    };
    for b in [Bindings::default(), bindings(&[bound(1, 7, false)])] {
        assert_eq!(
            check_sign(&r, &b, Some(&auth("deploy", 7, None)), NOW),
            Ok(())
        );
        assert_eq!(check_sign(&r, &b, Some(&auth("git", 7, None)), NOW), Ok(()));
        for user in ["root", "Deploy", "deploy ", ""] {
            assert_eq!(
                check_sign(&r, &b, Some(&auth(user, 7, None)), NOW),
                Err(Reason::RemoteUserNotAllowed),
                "{user:?}"
            );
        }
        // No user-auth request, no user name: refused.
        assert_eq!(
            check_sign(&r, &b, None, NOW),
            Err(Reason::RemoteUserNotAllowed)
        );
    }
    // With destinations, both must hold; the destination is judged first.
    let both = Rules {
        remote_users: Some(vec!["deploy".into()]),
        ..dest_rules(&[1], &[])
    };
    let b = bindings(&[bound(1, 7, false)]);
    assert_eq!(
        check_sign(&both, &b, Some(&auth("deploy", 7, None)), NOW),
        Ok(())
    );
    assert_eq!(
        check_sign(&both, &b, Some(&auth("root", 7, None)), NOW),
        Err(Reason::RemoteUserNotAllowed)
    );
    let elsewhere = bindings(&[bound(2, 7, false)]);
    assert_eq!(
        check_sign(&both, &elsewhere, Some(&auth("root", 7, None)), NOW),
        Err(Reason::DestinationNotAllowed)
    );
}

// --- listing ---------------------------------------------------------------

#[test]
fn forwarded_connections_list_only_keys_that_allow_forwarding() {
    let fwd = bindings(&[bound(1, 1, true)]);
    let direct = bindings(&[bound(1, 1, false)]);
    let none = Bindings::default();
    let plain = Rules::default();
    let allowed = Rules {
        allow_forwarding: true,
        ..Rules::default()
    };
    let dest = dest_rules(&[1], &[]);
    let dest_fwd = Rules {
        allow_forwarding: true,
        ..dest_rules(&[1], &[])
    };
    assert!(!listed(&plain, &fwd));
    assert!(!listed(&dest, &fwd));
    assert!(listed(&allowed, &fwd));
    assert!(listed(&dest_fwd, &fwd));
    for r in [&plain, &allowed, &dest, &dest_fwd] {
        assert!(listed(r, &direct));
        assert!(listed(r, &none));
    }
    // A failed binding: keys with destinations could not sign, so are not
    // listed; one that may have been forwarding hides what forwarding hides.
    let mut failed = Bindings::default();
    failed.fail(Some(false));
    assert!(listed(&plain, &failed));
    assert!(!listed(&dest_fwd, &failed));
    let mut failed_fwd = Bindings::default();
    failed_fwd.fail(Some(true));
    assert!(!listed(&plain, &failed_fwd));
    assert!(listed(&allowed, &failed_fwd));
}

#[test]
fn the_binding_a_request_belongs_to_is_the_one_of_its_session_and_host_key() {
    let b = bindings(&[bound(1, 1, true), bound(2, 2, false)]);
    let fp = |a: &UserAuth| binding_for(&b, a).map(|x| x.fingerprint.clone());
    // Session 1, bound to host 1 (not the last binding).
    assert_eq!(fp(&auth("u", 1, None)).as_deref(), Some("SHA256:host1"));
    assert_eq!(
        fp(&auth("u", 1, Some(blob(1, false)))).as_deref(),
        Some("SHA256:host1")
    );
    // Hostbound to another host key than the session's binding: none.
    assert_eq!(fp(&auth("u", 1, Some(blob(2, false)))), None);
    // A session no binding names (a replayed binding of another): none.
    assert_eq!(fp(&auth("u", 3, None)), None);
    assert_eq!(binding_for(&Bindings::default(), &auth("u", 1, None)), None);
}
