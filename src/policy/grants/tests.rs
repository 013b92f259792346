//! Every rule of grants: use, request, approve, deny, revoke, time.

use super::*;
use crate::config::CertMode;
use crate::policy::certificates::NoneMinted;
use crate::policy::destinations::{Bindings, Rules};
use crate::policy::{decide, Context, Decision};
use crate::protocol::userauth::tests::{build, key};
use crate::protocol::userauth::PUBLICKEY;
use crate::protocol::Request;
use ssh_agent_lib::proto::{Identity, PublicCredential, SignRequest};

const NOW: u64 = 1_000_000;

fn rule(approvals: u32) -> GrantRule {
    GrantRule {
        approvers: vec!["leads".into(), "sre".into()],
        approvals,
        max_secs: 3600,
        pending_secs: 600,
        notify: None,
    }
}

fn key_rule(name: &str, seed: u8, grants: Option<GrantRule>) -> KeyRule {
    let k = key(seed);
    KeyRule {
        name: name.into(),
        fingerprint: k.fingerprint(ssh_key::HashAlg::Sha256).to_string(),
        key: k,
        groups: vec!["deployers".into()],
        allow_any_data: false,
        rules: Rules::default(),
        certificate: CertMode::Off,
        grants,
        cert_terms: 0,
    }
}

/// prod (four eyes), six (six eyes), glass (break-glass), free (no grants).
fn policy() -> Policy {
    Policy {
        keys: vec![
            key_rule("prod", 1, Some(rule(1))),
            key_rule("six", 2, Some(rule(2))),
            key_rule("glass", 3, Some(rule(0))),
            key_rule("free", 4, None),
        ],
        ca: None,
    }
}

fn caller(uid: u32, groups: &[&str]) -> Caller {
    Caller {
        uid,
        pid: Some(1),
        user: Some(format!("u{uid}")),
        groups: groups.iter().map(|g| g.to_string()).collect(),
    }
}

fn alice() -> Caller {
    caller(1000, &["deployers"])
}
fn lead(uid: u32) -> Caller {
    caller(uid, &["leads"])
}
fn root() -> Caller {
    caller(0, &[])
}

fn ask<'a>(key: &'a str, duration: &'a str, reason: &'a str) -> Ask<'a> {
    Ask {
        key,
        duration,
        reason,
    }
}

fn request(p: &Policy, g: &Grants, c: &Caller, key: &str, id: &str) -> Result<Grant, GrantError> {
    check_request(p, c, g, ask(key, "30m", "deploy 1.2"), id.into(), NOW)
}

/// A set with alice's pending request `id` for `key`.
fn pending(key: &str, id: &str) -> Grants {
    let p = policy();
    Grants::default().with(request(&p, &Grants::default(), &alice(), key, id).unwrap())
}

/// A set with alice's active grant `id` for prod.
fn active(id: &str) -> Grants {
    let p = policy();
    let g = pending("prod", id);
    g.with(check_approve(&p, &lead(2000), &g, id, None, NOW).unwrap())
}

fn sign_request(seed: u8) -> Request {
    Request::Sign(Box::new(crate::protocol::request::Sign::new(SignRequest {
        credential: PublicCredential::Key(key(seed)),
        data: build(&key(seed), "deploy", PUBLICKEY, None),
        flags: 0,
    })))
}

fn decide_at<'p>(p: &'p Policy, c: &Caller, g: &Grants, now: u64, r: &Request) -> Decision<'p> {
    let none = Bindings::default();
    decide(
        p,
        c,
        Context {
            bindings: &none,
            now,
            minted: &NoneMinted,
            grants: g,
        },
        r,
    )
}

fn refused_for(d: &Decision<'_>) -> Option<Reason> {
    match d {
        Decision::Refuse { reason, .. } => Some(reason.clone()),
        _ => None,
    }
}

#[test]
fn durations() {
    for (text, secs) in [
        ("90s", 90),
        ("30m", 1800),
        ("2h", 7200),
        ("1d", 86400),
        ("45", 45),
        (" 10m ", 600),
    ] {
        assert_eq!(parse_duration(text), Ok(secs), "{text}");
    }
    for bad in [
        "",
        "0",
        "0s",
        "m",
        "-5",
        "1.5h",
        "2w",
        "1h30m",
        "ten",
        "99999999999999s",
        "2 h",
        "h2",
    ] {
        assert!(
            matches!(parse_duration(bad), Err(GrantError::BadDuration(_))),
            "{bad:?}"
        );
    }
}

#[test]
fn reasons() {
    assert_eq!(check_reason("deploy 1.2 ✓"), Ok(()));
    assert_eq!(check_reason(""), Err(GrantError::ReasonMissing));
    assert_eq!(check_reason("   "), Err(GrantError::ReasonMissing));
    assert_eq!(check_reason(&"x".repeat(256)), Ok(()));
    assert_eq!(
        check_reason(&"x".repeat(257)),
        Err(GrantError::ReasonTooLong(257))
    );
    for bad in ["a\nb", "a\tb", "a\u{1b}[31m", "a\u{7f}", "a\u{85}"] {
        assert_eq!(check_reason(bad), Err(GrantError::ReasonControl), "{bad:?}");
    }
}

#[test]
fn a_member_requests_and_the_request_waits() {
    let p = policy();
    let g = request(&p, &Grants::default(), &alice(), "prod", "a1").unwrap();
    assert_eq!(
        g.state,
        State::Pending {
            lapses_at: NOW + 600
        }
    );
    assert_eq!((g.secs, g.needed, g.break_glass), (1800, 1, false));
    assert_eq!(g.requester, Person::of(&alice()));
    assert_eq!(g.reason, "deploy 1.2");
}

#[test]
fn bad_requests_are_refused() {
    let p = policy();
    let none = Grants::default();
    let r = |c: &Caller, a: Ask<'_>| check_request(&p, c, &none, a, "x".into(), NOW);
    assert_eq!(
        r(&alice(), ask("nope", "1h", "r")),
        Err(GrantError::UnknownKey("nope".into()))
    );
    assert_eq!(
        r(&alice(), ask("free", "1h", "r")),
        Err(GrantError::NoGrantsForKey("free".into()))
    );
    assert_eq!(
        r(&root(), ask("prod", "1h", "r")),
        Err(GrantError::RootNeedsNone)
    );
    // A non-member, an approver who is not a member.
    for c in [caller(1001, &["other"]), lead(2000), caller(1002, &[])] {
        assert!(
            matches!(
                r(&c, ask("prod", "1h", "r")),
                Err(GrantError::NotMember { .. })
            ),
            "{c:?}"
        );
    }
    assert_eq!(
        r(&alice(), ask("prod", "2h", "r")),
        Err(GrantError::TooLong {
            secs: 7200,
            max: 3600
        })
    );
    assert!(matches!(
        r(&alice(), ask("prod", "soon", "r")),
        Err(GrantError::BadDuration(_))
    ));
    assert_eq!(
        r(&alice(), ask("prod", "1h", "")),
        Err(GrantError::ReasonMissing)
    );
    assert_eq!(
        r(&alice(), ask("prod", "1h", &"x".repeat(300))),
        Err(GrantError::ReasonTooLong(300))
    );
    assert_eq!(
        r(&alice(), ask("prod", "1h", "a\nb")),
        Err(GrantError::ReasonControl)
    );
    // Exactly max_secs is fine.
    assert!(r(&alice(), ask("prod", "1h", "r")).is_ok());
}

#[test]
fn at_most_sixteen_pending_per_user() {
    let p = policy();
    let mut g = Grants::default();
    for i in 0..MAX_PENDING_PER_USER {
        g = g.with(request(&p, &g, &alice(), "prod", &format!("p{i}")).unwrap());
    }
    assert_eq!(
        request(&p, &g, &alice(), "six", "more"),
        Err(GrantError::TooManyPending)
    );
    // Someone else may still ask; lapsed ones do not count.
    assert!(request(&p, &g, &caller(1001, &["deployers"]), "prod", "bob").is_ok());
    assert!(check_request(
        &p,
        &alice(),
        &g,
        ask("prod", "1h", "r"),
        "l".into(),
        NOW + 600
    )
    .is_ok());
}

#[test]
fn four_eyes_one_approval_starts_the_grant() {
    let p = policy();
    let g = pending("prod", "a1");
    let approved = check_approve(&p, &lead(2000), &g, "a1", None, NOW + 5).unwrap();
    assert_eq!(
        approved.state,
        State::Active {
            from: NOW + 5,
            until: NOW + 5 + 1800
        }
    );
    assert_eq!(approved.approvals.len(), 1);
    assert_eq!(approved.approvals[0].by.uid, 2000);
    // The key named must be the grant's key.
    assert_eq!(
        check_approve(&p, &lead(2000), &g, "a1", Some("six"), NOW),
        Err(GrantError::OtherKey {
            id: "a1".into(),
            key: "prod".into(),
            wanted: "six".into()
        })
    );
    assert!(check_approve(&p, &lead(2000), &g, "a1", Some("prod"), NOW).is_ok());
}

#[test]
fn six_eyes_needs_two_distinct_approvers() {
    let p = policy();
    let g = pending("six", "s1");
    let one = check_approve(&p, &lead(2000), &g, "s1", None, NOW).unwrap();
    assert!(matches!(one.state, State::Pending { .. }));
    let g = g.with(one);
    assert_eq!(
        check_approve(&p, &lead(2000), &g, "s1", None, NOW + 1),
        Err(GrantError::AlreadyApproved("s1".into()))
    );
    let two = check_approve(&p, &caller(2001, &["sre"]), &g, "s1", None, NOW + 2).unwrap();
    assert_eq!(
        two.state,
        State::Active {
            from: NOW + 2,
            until: NOW + 2 + 1800
        }
    );
    assert_eq!(two.approvals.len(), 2);
}

#[test]
fn the_requester_and_non_approvers_never_count() {
    let p = policy();
    // A requester who is also an approver.
    let both = caller(1000, &["deployers", "leads"]);
    let g = Grants::default().with(request(&p, &Grants::default(), &both, "prod", "b1").unwrap());
    assert_eq!(
        check_approve(&p, &both, &g, "b1", None, NOW),
        Err(GrantError::OwnRequest)
    );
    assert_eq!(
        check_deny(&p, &both, &g, "b1", None, None, NOW),
        Err(GrantError::OwnRequest)
    );
    // Members, strangers, a uid without groups.
    for c in [
        caller(1001, &["deployers"]),
        caller(3000, &["other"]),
        caller(3001, &[]),
    ] {
        assert!(
            matches!(
                check_approve(&p, &c, &g, "b1", None, NOW),
                Err(GrantError::NotApprover { .. })
            ),
            "{c:?}"
        );
        assert!(matches!(
            check_deny(&p, &c, &g, "b1", None, None, NOW),
            Err(GrantError::NotApprover { .. })
        ));
    }
    // Root may.
    assert!(matches!(
        check_approve(&p, &root(), &g, "b1", None, NOW)
            .unwrap()
            .state,
        State::Active { .. }
    ));
}

#[test]
fn unknown_ids_and_decided_requests() {
    let p = policy();
    let g = active("a1");
    assert_eq!(
        check_approve(&p, &lead(2000), &g, "zz", None, NOW),
        Err(GrantError::UnknownId("zz".into()))
    );
    assert_eq!(
        check_deny(&p, &lead(2000), &g, "zz", None, None, NOW),
        Err(GrantError::UnknownId("zz".into()))
    );
    assert_eq!(
        check_revoke(&p, &lead(2000), &g, "zz", None, NOW),
        Err(GrantError::UnknownId("zz".into()))
    );
    assert_eq!(
        check_approve(&p, &caller(2001, &["sre"]), &g, "a1", None, NOW),
        Err(GrantError::NotPending {
            id: "a1".into(),
            now: "active"
        })
    );
    // A lapsed request (not yet swept) is not pending either.
    let g = pending("prod", "p1");
    assert_eq!(
        check_approve(&p, &lead(2000), &g, "p1", None, NOW + 600),
        Err(GrantError::NotPending {
            id: "p1".into(),
            now: "lapsed"
        })
    );
    // A key that no longer needs grants: nobody decides.
    let mut changed = policy();
    changed.keys[0].grants = None;
    assert!(matches!(
        check_approve(&changed, &lead(2000), &g, "p1", None, NOW),
        Err(GrantError::NotPending { .. })
    ));
}

#[test]
fn deny_ends_the_request() {
    let p = policy();
    let g = pending("prod", "d1");
    let denied = check_deny(&p, &lead(2000), &g, "d1", None, Some("not today"), NOW + 3).unwrap();
    assert_eq!(
        denied.state,
        State::Ended {
            at: NOW + 3,
            how: End::Denied
        }
    );
    assert_eq!(denied.ended_by, Some(Person::of(&lead(2000))));
    assert_eq!(denied.note.as_deref(), Some("not today"));
    assert_eq!(
        check_deny(&p, &lead(2000), &g, "d1", None, Some("bad\nnote"), NOW),
        Err(GrantError::ReasonControl)
    );
    let g = g.with(denied);
    assert!(matches!(
        check_approve(&p, &caller(2001, &["sre"]), &g, "d1", None, NOW + 4),
        Err(GrantError::NotPending { now: "denied", .. })
    ));
}

#[test]
fn who_may_revoke() {
    let p = policy();
    let g = active("a1");
    // The grantee, an approver, root.
    for c in [alice(), lead(2000), caller(2001, &["sre"]), root()] {
        let r = check_revoke(&p, &c, &g, "a1", None, NOW + 1).unwrap();
        assert_eq!(
            r.state,
            State::Ended {
                at: NOW + 1,
                how: End::Revoked
            }
        );
    }
    // Another member, a stranger.
    for c in [caller(1001, &["deployers"]), caller(3000, &["x"])] {
        assert_eq!(
            check_revoke(&p, &c, &g, "a1", None, NOW + 1),
            Err(GrantError::NotYours("a1".into()))
        );
    }
    assert!(matches!(
        check_revoke(&p, &alice(), &g, "a1", Some("six"), NOW),
        Err(GrantError::OtherKey { .. })
    ));
    // The requester withdraws a pending request.
    let g = pending("prod", "w1");
    assert!(check_revoke(&p, &alice(), &g, "w1", None, NOW).is_ok());
    // Over: refused.
    let g = active("a1");
    assert_eq!(
        check_revoke(&p, &alice(), &g, "a1", None, NOW + 1800),
        Err(GrantError::AlreadyOver("a1".into()))
    );
}

#[test]
fn break_glass_is_active_at_once() {
    let p = policy();
    let g = request(&p, &Grants::default(), &alice(), "glass", "bg").unwrap();
    assert!(g.break_glass);
    assert_eq!(
        g.state,
        State::Active {
            from: NOW,
            until: NOW + 1800
        }
    );
}

#[test]
fn use_needs_a_grant_in_force() {
    let p = policy();
    let prod = &p.keys[0];
    let none = Grants::default();
    assert_eq!(
        check_use(prod, &alice(), &none, NOW),
        Use::Refused(Reason::NoGrant)
    );
    assert_eq!(check_use(prod, &root(), &none, NOW), Use::Free);
    assert_eq!(check_use(&p.keys[3], &alice(), &none, NOW), Use::Free);
    // Pending is not enough.
    let g = pending("prod", "p1");
    assert_eq!(
        check_use(prod, &alice(), &g, NOW),
        Use::Refused(Reason::NoGrant)
    );
    let g = active("a1");
    assert!(matches!(check_use(prod, &alice(), &g, NOW), Use::Granted(x) if x.id == "a1"));
    assert!(matches!(
        check_use(prod, &alice(), &g, NOW + 1799),
        Use::Granted(_)
    ));
    // At its end: expired, before the store noticed and after.
    assert_eq!(
        check_use(prod, &alice(), &g, NOW + 1800),
        Use::Refused(Reason::GrantExpired)
    );
    let (swept, changed) = sweep(&p, &g, NOW + 1800);
    assert_eq!(changed.len(), 1);
    assert_eq!(
        check_use(prod, &alice(), &swept, NOW + 1801),
        Use::Refused(Reason::GrantExpired)
    );
    // Someone else's grant, or one for another key, is no grant.
    assert_eq!(
        check_use(prod, &caller(1001, &["deployers"]), &g, NOW),
        Use::Refused(Reason::NoGrant)
    );
    assert_eq!(
        check_use(&p.keys[1], &alice(), &g, NOW),
        Use::Refused(Reason::NoGrant)
    );
    // Revoked: no grant.
    let revoked = g.with(check_revoke(&p, &alice(), &g, "a1", None, NOW + 1).unwrap());
    assert_eq!(
        check_use(prod, &alice(), &revoked, NOW + 2),
        Use::Refused(Reason::NoGrant)
    );
}

#[test]
fn signing_and_listing_follow_the_grant() {
    let p = policy();
    let none = Grants::default();
    let g = active("a1");
    let req = sign_request(1);
    assert_eq!(
        refused_for(&decide_at(&p, &alice(), &none, NOW, &req)),
        Some(Reason::NoGrant)
    );
    match decide_at(&p, &alice(), &g, NOW, &req) {
        Decision::Sign { key, grant, .. } => {
            assert_eq!(key.name, "prod");
            assert_eq!(grant.as_deref(), Some("a1"));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        refused_for(&decide_at(&p, &alice(), &g, NOW + 1800, &req)),
        Some(Reason::GrantExpired)
    );
    // Root: no grant needed, none named.
    assert!(matches!(
        decide_at(&p, &root(), &none, NOW, &req),
        Decision::Sign { grant: None, .. }
    ));
    // A key without grants: as ever.
    assert!(matches!(
        decide_at(&p, &alice(), &none, NOW, &sign_request(4)),
        Decision::Sign { grant: None, .. }
    ));
    // A non-member with no grant: not in group, as ever.
    assert_eq!(
        refused_for(&decide_at(&p, &caller(3000, &["x"]), &g, NOW, &req)),
        Some(Reason::NotInGroup)
    );
    // The grantee left the key's groups: no-grant, and the grant is orphaned.
    let gone = caller(1000, &[]);
    assert_eq!(
        refused_for(&decide_at(&p, &gone, &g, NOW, &req)),
        Some(Reason::NoGrant)
    );
    assert_eq!(orphaned(&p, &gone, &g, NOW), ["a1"]);
    assert!(orphaned(&p, &alice(), &g, NOW).is_empty());
    let ended = end_orphans(&g, &["a1"], NOW);
    assert!(matches!(
        ended[0].state,
        State::Ended {
            how: End::Revoked,
            ..
        }
    ));

    // Listing: only with a grant in force; the grant's end comes along.
    let ids: Vec<Identity> = (1..=4)
        .map(|s| Identity {
            credential: PublicCredential::Key(key(s)),
            comment: String::new(),
        })
        .collect();
    let none_bound = Bindings::default();
    fn ctx<'a>(bindings: &'a Bindings, grants: &'a Grants, now: u64) -> Context<'a> {
        Context {
            bindings,
            now,
            minted: &NoneMinted,
            grants,
        }
    }
    let ctx = |grants, now| ctx(&none_bound, grants, now);
    let names = |plan: crate::policy::ListPlan<'_>| -> Vec<(String, Option<u64>)> {
        plan.items
            .iter()
            .map(|i| (i.key.name.clone(), i.grant_until))
            .collect()
    };
    assert_eq!(
        names(crate::policy::plan_identities(
            &p,
            &alice(),
            ctx(&none, NOW),
            ids.clone()
        )),
        [("free".to_owned(), None)]
    );
    assert_eq!(
        names(crate::policy::plan_identities(
            &p,
            &alice(),
            ctx(&g, NOW),
            ids.clone()
        )),
        [
            ("prod".to_owned(), Some(NOW + 1800)),
            ("free".to_owned(), None)
        ]
    );
    assert_eq!(
        names(crate::policy::plan_identities(
            &p,
            &alice(),
            ctx(&g, NOW + 1800),
            ids.clone()
        )),
        [("free".to_owned(), None)]
    );
    assert_eq!(
        crate::policy::plan_identities(&p, &root(), ctx(&none, NOW), ids.clone())
            .items
            .len(),
        4
    );
    assert_eq!(
        crate::policy::filter_identities(&p, &alice(), ctx(&g, NOW), ids.clone()).len(),
        2
    );
    // A member of only a grant key without a grant lists nothing.
    let only = Policy {
        keys: vec![key_rule("prod", 1, Some(rule(1)))],
        ca: None,
    };
    assert_eq!(
        decide_at(&only, &alice(), &none, NOW, &Request::RequestIdentities),
        Decision::EmptyList
    );
    assert_eq!(
        decide_at(&only, &alice(), &g, NOW, &Request::RequestIdentities),
        Decision::List
    );
}

#[test]
fn time_passes() {
    let p = policy();
    let g = pending("prod", "p1").with(active("a1").grants[0].clone());
    // Nothing due yet.
    let (same, changed) = sweep(&p, &g, NOW + 1);
    assert_eq!((same, changed.len()), (g.clone(), 0));
    assert_eq!(g.next_deadline(), Some(NOW + 600));
    // The request lapses at pending_secs.
    let (g2, changed) = sweep(&p, &g, NOW + 600);
    assert_eq!(changed.len(), 1);
    assert_eq!(
        changed[0].state,
        State::Ended {
            at: NOW + 600,
            how: End::Lapsed
        }
    );
    assert_eq!(g2.next_deadline(), Some(NOW + 1800));
    // The grant expires at its end.
    let (g3, changed) = sweep(&p, &g2, NOW + 1800);
    assert_eq!(
        changed[0].state,
        State::Ended {
            at: NOW + 1800,
            how: End::Expired
        }
    );
    // Ended records are forgotten a day later.
    let (g4, changed) = sweep(&p, &g3, NOW + 1800 + KEEP_ENDED_SECS);
    assert!(changed.is_empty());
    assert!(g4.grants.is_empty());
    // A key removed (or no longer needing grants) ends its grants.
    let mut fewer = policy();
    fewer.keys.remove(0);
    let (_, changed) = sweep(&fewer, &g, NOW + 1);
    assert_eq!(changed.len(), 2);
    assert!(changed.iter().all(|c| matches!(
        c.state,
        State::Ended {
            how: End::Revoked,
            ..
        }
    )));
}

#[test]
fn errors_are_one_line() {
    let all = [
        GrantError::UnknownKey("k".into()),
        GrantError::NoGrantsForKey("k".into()),
        GrantError::RootNeedsNone,
        GrantError::NotMember {
            key: "k".into(),
            groups: vec!["a".into()],
        },
        GrantError::BadDuration("x\ny".into()),
        GrantError::TooLong { secs: 2, max: 1 },
        GrantError::ReasonMissing,
        GrantError::ReasonTooLong(300),
        GrantError::ReasonControl,
        GrantError::TooManyPending,
        GrantError::UnknownId("a\nb".into()),
        GrantError::OtherKey {
            id: "i".into(),
            key: "k".into(),
            wanted: "w".into(),
        },
        GrantError::NotPending {
            id: "i".into(),
            now: "active",
        },
        GrantError::AlreadyOver("i".into()),
        GrantError::NotApprover {
            key: "k".into(),
            groups: vec![],
        },
        GrantError::OwnRequest,
        GrantError::AlreadyApproved("i".into()),
        GrantError::NotYours("i".into()),
    ];
    for e in all {
        let text = e.to_string();
        assert!(!text.is_empty() && !text.contains('\n'), "{text:?}");
    }
}

#[test]
fn state_serializes_and_reads_back() {
    let g = active("a1");
    let text = serde_json::to_string(&g).unwrap();
    assert!(text.contains("\"state\":\"active\""), "{text}");
    let back: Grants = serde_json::from_str(&text).unwrap();
    assert_eq!(back, g);
}

#[test]
fn ended_grants_are_bounded() {
    let p = policy();
    let mut g = Grants::default();
    for i in 0..MAX_ENDED + 5 {
        let mut r = request(&p, &Grants::default(), &alice(), "prod", &format!("e{i}")).unwrap();
        r.state = State::Ended {
            at: NOW + i as u64,
            how: End::Denied,
        };
        g.grants.push(r);
    }
    g = g.with(request(&p, &g, &alice(), "prod", "live").unwrap());
    let (kept, _) = sweep(&p, &g, NOW + 10);
    assert_eq!(kept.grants.len(), MAX_ENDED + 1);
    assert!(kept.get("live").is_some());
    assert!(kept.get("e0").is_none() && kept.get("e4").is_none());
    assert!(kept.get("e5").is_some());
}
