//! Property tests of everything the daemon does with client bytes before it
//! forwards anything: framing, classification, the user-auth parser and the
//! policy decision. No root, no processes: this runs in the normal suite.
//! (The same code is fuzzed with libFuzzer by fuzz/fuzz_targets/request.rs.)

use keyholder::policy::{self, Caller, Decision, KeyRule, Policy, Reason};
use keyholder::protocol::frame::{split_frame, FrameError, MAX_MESSAGE_LEN};
use keyholder::protocol::{classify, userauth, AdminOp, Request};
use proptest::prelude::*;
use ssh_encoding::Encode;
use ssh_key::public::{Ed25519PublicKey, KeyData};

const ADMIN_TYPES: [u8; 9] = [17, 18, 19, 20, 21, 22, 23, 25, 26];

fn key(bytes: [u8; 32]) -> KeyData {
    KeyData::Ed25519(Ed25519PublicKey(bytes))
}

fn rule(name: &str, k: &KeyData, groups: &[&str], allow_any_data: bool) -> KeyRule {
    KeyRule {
        name: name.to_owned(),
        key: k.clone(),
        fingerprint: k.fingerprint(ssh_key::HashAlg::Sha256).to_string(),
        groups: groups.iter().map(|g| (*g).to_owned()).collect(),
        allow_any_data,
        certificate: Default::default(),
        rules: Default::default(),
        grants: None,
        cert_terms: 0,
    }
}

/// A connection with no session bindings.
fn ctx() -> policy::Context<'static> {
    static NONE: std::sync::OnceLock<policy::destinations::Bindings> = std::sync::OnceLock::new();
    policy::Context {
        bindings: NONE.get_or_init(Default::default),
        now: 0,
        minted: &policy::certificates::NoneMinted,
        grants: &policy::grants::NO_GRANTS,
    }
}

fn caller(uid: u32, groups: &[&str]) -> Caller {
    Caller {
        uid,
        pid: Some(4242),
        user: Some(format!("user{uid}")),
        groups: groups.iter().map(|g| (*g).to_owned()).collect(),
    }
}

/// deploy (deployers), gitsign (signers, any data).
fn fixed_policy() -> Policy {
    Policy {
        keys: vec![
            rule("deploy", &key([0x11; 32]), &["deployers"], false),
            rule("gitsign", &key([0x22; 32]), &["signers"], true),
        ],
        ca: None,
    }
}

fn callers() -> Vec<Caller> {
    vec![
        caller(0, &["root"]),
        caller(1000, &["deployers"]),
        caller(1001, &["signers", "users"]),
        caller(1002, &[]),
    ]
}

fn string(bytes: &[u8]) -> Vec<u8> {
    let mut v = (bytes.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(bytes);
    v
}

fn blob(k: &KeyData) -> Vec<u8> {
    let mut v = Vec::new();
    k.encode(&mut v).unwrap();
    v
}

fn userauth_data(k: &KeyData, session: &[u8], user: &str, hostbound: Option<&[u8]>) -> Vec<u8> {
    let mut d = string(session);
    d.push(50);
    d.extend(string(user.as_bytes()));
    d.extend(string(b"ssh-connection"));
    d.extend(string(if hostbound.is_some() {
        userauth::PUBLICKEY_HOSTBOUND.as_bytes()
    } else {
        userauth::PUBLICKEY.as_bytes()
    }));
    d.push(1);
    d.extend(string(b"ssh-ed25519"));
    d.extend(string(&blob(k)));
    if let Some(h) = hostbound {
        d.extend(string(h));
    }
    d
}

fn sign_message(k: &KeyData, data: &[u8], flags: u32) -> Vec<u8> {
    let mut m = vec![13u8];
    m.extend(string(&blob(k)));
    m.extend(string(data));
    m.extend(flags.to_be_bytes());
    m
}

fn frame(message: &[u8]) -> Vec<u8> {
    let mut f = (message.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(message);
    f
}

/// Classifies and decides `body` for every caller; the decision must match
/// the request kind.
fn classify_and_decide(body: &[u8]) -> Request {
    let policy = fixed_policy();
    let request = classify(body);
    for c in callers() {
        let d = policy::decide(&policy, &c, ctx(), &request);
        let ok = match (&request, &d) {
            (Request::RequestIdentities, Decision::List) => {
                policy.any_key_for(&c, &policy::grants::NO_GRANTS, 0)
            }
            (Request::RequestIdentities, Decision::EmptyList) => {
                !policy.any_key_for(&c, &policy::grants::NO_GRANTS, 0)
            }
            (Request::Sign(s), Decision::Sign { key, .. }) => {
                c.may_use(key)
                    && policy.key(s.request.credential.key_data()) == Some(*key)
                    && (key.allow_any_data
                        || userauth::parse(&s.request.data, s.request.credential.key_data())
                            .is_ok())
                    // Classification parsed the data once, as the policy reads it.
                    && s.auth == userauth::parse(&s.request.data, s.request.credential.key_data())
            }
            (Request::Sign(_), Decision::Refuse { .. }) => true,
            (
                Request::Extension(_) | Request::Query | Request::Status(_) | Request::Grant { .. },
                _,
            ) => !matches!(d, Decision::List | Decision::Sign { .. }),
            (Request::SessionBind(_), Decision::VerifyBind | Decision::RefuseBind { .. }) => true,
            (Request::BadSessionBind(_), Decision::RefuseBind { .. }) => true,
            (
                Request::Admin(_),
                Decision::Refuse {
                    reason: Reason::AdminRequest(_),
                    ..
                },
            )
            | (
                Request::Unknown(_),
                Decision::Refuse {
                    reason: Reason::UnknownType(_),
                    ..
                },
            )
            | (
                Request::Malformed { .. },
                Decision::Refuse {
                    reason: Reason::Malformed(_),
                    ..
                },
            ) => true,
            _ => false,
        };
        assert!(ok, "{request:?} from uid {} decided as {d:?}", c.uid);
    }
    request
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// Any contents of any grant extension: parsed or refused, never a
    /// panic; what parses encodes back to the same bytes.
    #[test]
    fn grant_extensions_never_panic(
        which in 0usize..5,
        contents in prop::collection::vec(any::<u8>(), 0..300),
    ) {
        use keyholder::protocol::grants;
        let name = [grants::REQUEST, grants::APPROVE, grants::DENY, grants::LIST, grants::REVOKE][which];
        if let Ok(op) = grants::parse(name, &contents) {
            prop_assert_eq!(op.name(), name);
            prop_assert_eq!(grants::parse(name, &op.contents()), Ok(op.clone()));
        }
    }

    /// Any bytes, as one message or as a stream of frames: no panic, and
    /// every decision fits its request.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        classify_and_decide(&bytes);
        let mut rest = &bytes[..];
        while let Ok(Some((body, tail))) = split_frame(rest) {
            prop_assert!(body.len() <= MAX_MESSAGE_LEN);
            classify_and_decide(body);
            rest = tail;
        }
    }

    /// Bytes that look like a sign request (type 13, a plausible key blob,
    /// data, flags) with random mutations: reaches the deeper parsers.
    #[test]
    fn mutated_sign_requests_never_panic(
        seed in any::<[u8; 32]>(),
        data in prop::collection::vec(any::<u8>(), 0..200),
        flags in any::<u32>(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut m = sign_message(&key(seed), &data, flags);
        for (at, byte) in edits {
            let i = at.index(m.len());
            m[i] = byte;
        }
        let keep = 1 + cut.index(m.len());
        classify_and_decide(&m[..keep]);
    }

    /// Admin types are Admin whatever the body: never decoded, always refused.
    #[test]
    fn admin_types_are_admin_regardless_of_body(
        t in prop::sample::select(ADMIN_TYPES.to_vec()),
        body in prop::collection::vec(any::<u8>(), 0..300),
    ) {
        let mut m = vec![t];
        m.extend(body);
        prop_assert_eq!(classify_and_decide(&m), Request::Admin(AdminOp::from_type(t).unwrap()));
    }

    /// REQUEST_IDENTITIES with any body at all is malformed.
    #[test]
    fn list_with_a_body_is_malformed(body in prop::collection::vec(any::<u8>(), 1..300)) {
        let mut m = vec![11u8];
        m.extend(body);
        let is_malformed = matches!(classify_and_decide(&m), Request::Malformed { kind: 11, .. });
        prop_assert!(is_malformed);
    }

    /// Types the proxy does not know are Unknown whatever the body.
    #[test]
    fn unknown_types_are_unknown(t in any::<u8>(), body in prop::collection::vec(any::<u8>(), 0..50)) {
        prop_assume!(![11u8, 13, 27].contains(&t) && !ADMIN_TYPES.contains(&t));
        let mut m = vec![t];
        m.extend(body);
        prop_assert_eq!(classify_and_decide(&m), Request::Unknown(t));
    }

    /// A well-formed sign request round-trips: classified with the same key,
    /// data and flags, and re-encoded to exactly the client's bytes (what
    /// the daemon forwards). Trailing bytes make it malformed.
    #[test]
    fn well_formed_sign_requests_round_trip(
        seed in any::<[u8; 32]>(),
        data in prop::collection::vec(any::<u8>(), 0..500),
        flags in any::<u32>(),
        junk in prop::collection::vec(any::<u8>(), 1..8),
    ) {
        let k = key(seed);
        let m = sign_message(&k, &data, flags);
        let Request::Sign(s) = classify_and_decide(&m) else {
            return Err(TestCaseError::fail("not classified as a sign request"));
        };
        prop_assert_eq!(s.request.credential.key_data(), &k);
        prop_assert_eq!(&s.request.data, &data);
        prop_assert_eq!(s.request.flags, flags);
        let mut again = vec![13u8];
        s.request.encode(&mut again).unwrap();
        prop_assert_eq!(again, m.clone());
        let mut trailing = m;
        trailing.extend(junk);
        let is_malformed = matches!(classify_and_decide(&trailing), Request::Malformed { kind: 13, .. });
        prop_assert!(is_malformed);
    }

    /// User-auth requests for a configured key: granted exactly to the
    /// callers whose groups allow the key, with the remote user logged.
    #[test]
    fn userauth_sign_is_granted_by_group_only(
        session in prop::collection::vec(any::<u8>(), 1..64),
        user in prop::collection::vec(any::<u8>(), 0..32),
        hostkey in prop::option::of(prop::collection::vec(any::<u8>(), 1..64)),
    ) {
        let user = String::from_utf8_lossy(&user).into_owned();
        let policy = fixed_policy();
        let deploy = key([0x11; 32]);
        let data = userauth_data(&deploy, &session, &user, hostkey.as_deref());
        let request = classify(&sign_message(&deploy, &data, 0));
        for c in callers() {
            let d = policy::decide(&policy, &c, ctx(), &request);
            let allowed = c.uid == 0 || c.groups.iter().any(|g| g == "deployers");
            match d {
                Decision::Sign {
                    key, remote_user, ..
                } => {
                    prop_assert!(allowed);
                    prop_assert_eq!(&key.name, "deploy");
                    prop_assert_eq!(remote_user, Some(user.clone()));
                }
                Decision::Refuse { reason: Reason::NotInGroup, .. } => prop_assert!(!allowed),
                other => return Err(TestCaseError::fail(format!("{other:?}"))),
            }
        }
    }

    /// Arbitrary data is refused for a key without allow_any_data (unless it
    /// happens to be a user-auth request, which random bytes are not) and
    /// granted for one with it, to its group only.
    #[test]
    fn non_userauth_data_needs_allow_any_data(data in prop::collection::vec(any::<u8>(), 0..200)) {
        let policy = fixed_policy();
        for (k, name) in [(key([0x11; 32]), "deploy"), (key([0x22; 32]), "gitsign")] {
            prop_assume!(userauth::parse(&data, &k).is_err());
            let request = classify(&sign_message(&k, &data, 0));
            for c in callers() {
                let d = policy::decide(&policy, &c, ctx(), &request);
                let rule = policy.keys.iter().find(|r| r.name == name).unwrap();
                let granted = matches!(d, Decision::Sign { .. });
                prop_assert_eq!(granted, rule.allow_any_data && c.may_use(rule), "{} {:?}", name, d);
            }
        }
    }

    /// Framing: messages framed and concatenated split back into exactly
    /// those messages; a cut stream yields whole frames, then "need more".
    #[test]
    fn frames_split_back(
        messages in prop::collection::vec(prop::collection::vec(any::<u8>(), 1..100), 0..8),
        cut in any::<prop::sample::Index>(),
    ) {
        let stream: Vec<u8> = messages.iter().flat_map(|m| frame(m)).collect();
        let mut rest = &stream[..];
        let mut got = Vec::new();
        while let Ok(Some((body, tail))) = split_frame(rest) {
            got.push(body.to_vec());
            rest = tail;
        }
        prop_assert!(rest.is_empty());
        prop_assert_eq!(&got, &messages);

        let cut_at = cut.index(stream.len() + 1);
        let mut rest = &stream[..cut_at];
        let mut n = 0;
        loop {
            match split_frame(rest) {
                Ok(Some((body, tail))) => {
                    prop_assert_eq!(body, &messages[n][..]);
                    n += 1;
                    rest = tail;
                }
                Ok(None) => break,
                Err(e) => return Err(TestCaseError::fail(format!("{e}"))),
            }
        }
        prop_assert!(n <= messages.len());
    }

    /// A length of 0 or above the cap is an error, before any body byte.
    #[test]
    fn bad_lengths_are_refused(len in prop_oneof![Just(0u32), (MAX_MESSAGE_LEN as u32 + 1)..=u32::MAX]) {
        let header = len.to_be_bytes();
        let r = split_frame(&header);
        let refused = matches!(r, Err(FrameError::Empty) | Err(FrameError::TooLong(_)));
        prop_assert!(refused);
    }
}
