use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ssh_agent_lib::proto::{AddIdentityConstrained, Identity};
use ssh_encoding::Encode;
use ssh_key::private::Ed25519Keypair;
use ssh_key::PrivateKey;

use super::*;
use crate::backend::{BackendFuture, BackendStatus};

/// A backend holding one CA in process, counting signatures.
#[derive(Debug)]
struct TestCa {
    key: PrivateKey,
    signs: AtomicUsize,
    last_flags: Mutex<Option<u32>>,
}

impl TestCa {
    fn new(seed: u8) -> Self {
        Self {
            key: PrivateKey::from(Ed25519Keypair::from_seed(&[seed; 32])),
            signs: AtomicUsize::new(0),
            last_flags: Mutex::new(None),
        }
    }
}

impl Backend for TestCa {
    fn name(&self) -> &'static str {
        "test"
    }
    fn identities(&self) -> BackendFuture<'_, Vec<Identity>> {
        Box::pin(async { Ok(Vec::new()) })
    }
    fn sign(&self, request: SignRequest) -> BackendFuture<'_, Vec<u8>> {
        Box::pin(async move {
            if request.credential.key_data() != self.key.public_key().key_data() {
                return Err(BackendError::Refused);
            }
            // Let other tasks run meanwhile, as a real backend does.
            tokio::task::yield_now().await;
            self.signs.fetch_add(1, Ordering::SeqCst);
            *lock(&self.last_flags) = Some(request.flags);
            let sig: Signature = signature::Signer::try_sign(&self.key, &request.data)
                .map_err(|e| BackendError::Broken(e.to_string()))?;
            let mut out = Vec::new();
            sig.encode(&mut out)
                .map_err(|e| BackendError::Broken(e.to_string()))?;
            Ok(out)
        })
    }
    fn add(&self, _: AddIdentityConstrained, _: String) -> BackendFuture<'_, ()> {
        Box::pin(async { Err(BackendError::Refused) })
    }
    fn remove(&self, _: PublicCredential) -> BackendFuture<'_, ()> {
        Box::pin(async { Err(BackendError::Refused) })
    }
    fn remove_all(&self) -> BackendFuture<'_, ()> {
        Box::pin(async { Err(BackendError::Refused) })
    }
    fn status(&self) -> BackendFuture<'_, BackendStatus> {
        Box::pin(async {
            Ok(BackendStatus {
                identities: Vec::new(),
            })
        })
    }
    fn set_timeout(&self, _: Duration) {}
}

fn deploy_key() -> KeyData {
    KeyData::Ed25519(ssh_key::public::Ed25519PublicKey([1; 32]))
}

fn settings(ca: &TestCa) -> Settings {
    Settings {
        ca: ca.key.public_key().key_data().clone(),
        validity_secs: 300,
        backdate_secs: 60,
        key_id: "keyholder:{user}@{host}:{key}".into(),
        host: Ok("deploy1".into()),
        keys: [(
            "deploy".to_owned(),
            KeySettings {
                key: deploy_key(),
                cert: KeyCertConfig {
                    mode: CertMode::Only,
                    principals: vec!["deploy".into(), "ops".into()],
                    extensions: vec!["permit-pty".into()],
                    force_command: Some("/usr/bin/deploy".into()),
                    source_address: vec!["192.0.2.0/24".into(), "::1".into()],
                },
                terms: 41,
            },
        )]
        .into(),
        openbao_role: None,
    }
}

fn run<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

#[test]
fn a_minted_certificate_says_what_the_settings_say() {
    let ca = TestCa::new(9);
    let s = settings(&ca);
    let before = unix_now();
    let authority = Authority::new();
    let got = run(authority.certificate(&ca, &s, "deploy", 1000, Some("alice"), None)).unwrap();
    assert!(got.fresh);
    let c = &got.cert;
    assert_eq!(c.key_id(), "keyholder:alice@deploy1:deploy");
    assert_eq!(c.cert_type(), CertType::User);
    assert_eq!(c.valid_principals(), ["deploy", "ops"]);
    assert_eq!(c.public_key(), &deploy_key());
    assert_eq!(c.signature_key(), ca.key.public_key().key_data());
    assert!(c.valid_after() + 60 >= before && c.valid_after() + 60 <= unix_now());
    assert_eq!(c.valid_before() - c.valid_after(), 360);
    assert_eq!(
        c.critical_options()
            .get("force-command")
            .map(String::as_str),
        Some("/usr/bin/deploy")
    );
    assert_eq!(
        c.critical_options()
            .get("source-address")
            .map(String::as_str),
        Some("192.0.2.0/24,::1")
    );
    assert_eq!(
        c.extensions().keys().collect::<Vec<_>>(),
        vec!["permit-pty"]
    );
    c.verify_signature().unwrap();
    assert_eq!(*lock(&ca.last_flags), Some(0));
    // Remembered for its owner only.
    assert_eq!(
        authority.issued(c),
        Some(Issued {
            uid: 1000,
            serial: c.serial(),
            terms: 41
        })
    );
}

#[test]
fn certificates_are_reused_per_uid_and_key_until_the_settings_change() {
    let ca = TestCa::new(9);
    let mut s = settings(&ca);
    let authority = Authority::new();
    let a1 = run(authority.certificate(&ca, &s, "deploy", 1000, Some("alice"), None)).unwrap();
    let a2 = run(authority.certificate(&ca, &s, "deploy", 1000, Some("alice"), None)).unwrap();
    assert!(!a2.fresh);
    assert_eq!(a1.cert, a2.cert);
    let b = run(authority.certificate(&ca, &s, "deploy", 1001, Some("bob"), None)).unwrap();
    assert!(b.fresh);
    assert_ne!(b.cert.serial(), a1.cert.serial());
    assert_eq!(b.cert.key_id(), "keyholder:bob@deploy1:deploy");
    assert_eq!(ca.signs.load(Ordering::SeqCst), 2);
    // A reload that changes what goes into it: a new one.
    s.keys.get_mut("deploy").unwrap().cert.principals = vec!["deploy".into()];
    let a3 = run(authority.certificate(&ca, &s, "deploy", 1000, Some("alice"), None)).unwrap();
    assert!(a3.fresh);
    assert_eq!(a3.cert.valid_principals(), ["deploy"]);
    // A renamed user: a new one.
    let a4 = run(authority.certificate(&ca, &s, "deploy", 1000, Some("alice2"), None)).unwrap();
    assert!(a4.fresh);
    // The old ones are still remembered as alice's (a CertificateFile
    // written earlier keeps working until it expires).
    assert_eq!(authority.issued(&a1.cert).map(|i| i.uid), Some(1000));
}

#[test]
fn a_certificate_past_half_its_validity_is_replaced() {
    let ca = TestCa::new(9);
    let mut s = settings(&ca);
    s.validity_secs = 10;
    s.backdate_secs = 0;
    let authority = Authority::new();
    let a1 = run(authority.certificate(&ca, &s, "deploy", 1000, Some("alice"), None)).unwrap();
    // Pretend it was minted long ago: the cached one is expired.
    {
        let slot = authority.slot(1000, "deploy");
        let mut cur = lock(&slot.current);
        let c = cur.as_mut().unwrap();
        let k = deploy_key();
        let old = mint(
            &ca,
            &s,
            "deploy",
            &k,
            &s.keys["deploy"].cert,
            1000,
            Some("alice"),
            1,
            (unix_now() - 6, None),
        );
        *c = Arc::new(Current {
            profile: c.profile.clone(),
            cert: Arc::new(run(old).unwrap()),
        });
    }
    let a2 = run(authority.certificate(&ca, &s, "deploy", 1000, Some("alice"), None)).unwrap();
    assert!(a2.fresh);
    assert_ne!(a2.cert.serial(), a1.cert.serial());
    assert!(a2.cert.valid_before() > unix_now());
}

#[test]
fn forged_or_foreign_certificates_are_not_remembered() {
    let ca = TestCa::new(9);
    let s = settings(&ca);
    let authority = Authority::new();
    let mine = run(authority.certificate(&ca, &s, "deploy", 1000, Some("alice"), None)).unwrap();
    // Same serial and contents, another CA.
    let other = TestCa::new(10);
    let mut s2 = settings(&other);
    s2.ca = other.key.public_key().key_data().clone();
    let forged = run(mint(
        &other,
        &s2,
        "deploy",
        &deploy_key(),
        &s2.keys["deploy"].cert,
        1000,
        Some("alice"),
        mine.cert.serial(),
        (unix_now(), None),
    ))
    .unwrap();
    assert_eq!(forged.serial(), mine.cert.serial());
    assert_eq!(authority.issued(&forged), None);
}

#[test]
fn names_that_would_break_the_key_id_are_refused() {
    let ca = TestCa::new(9);
    let s = settings(&ca);
    let authority = Authority::new();
    for bad in [
        "al ice",
        "alice@evil",
        "a:b",
        "\"x\"",
        "-x",
        "é",
        "a\nb",
        "",
    ] {
        let got = run(authority.certificate(&ca, &s, "deploy", 1000, Some(bad), None));
        assert!(matches!(got, Err(MintError::BadName(_))), "{bad:?}");
    }
    assert!(matches!(
        run(authority.certificate(&ca, &s, "deploy", 1000, None, None)),
        Err(MintError::BadName(_))
    ));
    assert_eq!(ca.signs.load(Ordering::SeqCst), 0);
    let mut bad_host = s.clone();
    bad_host.host = Ok("host name".into());
    assert!(matches!(
        run(authority.certificate(&ca, &bad_host, "deploy", 1000, Some("alice"), None)),
        Err(MintError::BadName(_))
    ));
    // A key without certificate settings.
    assert!(matches!(
        run(authority.certificate(&ca, &s, "other", 1000, Some("alice"), None)),
        Err(MintError::NotConfigured)
    ));
}

#[test]
fn key_id_template_expansion() {
    let host = Ok("h1".to_owned());
    assert_eq!(
        key_id(
            "{user}/{uid}/{host}/{key}/{serial}",
            Some("a.b_c-d"),
            7,
            &host,
            "k",
            42
        )
        .unwrap(),
        "a.b_c-d/7/h1/k/42"
    );
    assert_eq!(key_id("fixed", None, 7, &host, "k", 1).unwrap(), "fixed");
    // {user} is only needed when the template uses it.
    assert_eq!(
        key_id("uid {uid}", None, 7, &host, "k", 1).unwrap(),
        "uid 7"
    );
}

#[test]
fn serials_are_increasing_and_above_the_time_floor() {
    let s = Serials::default();
    let a = s.next_at(1000);
    assert_eq!(a, 1000 << SERIAL_COUNTER_BITS);
    let b = s.next_at(1000);
    assert_eq!(b, a + 1);
    // The clock stepping back does not repeat a serial.
    let c = s.next_at(999);
    assert_eq!(c, b + 1);
    // A later process (a restart) starts above every serial of an earlier
    // millisecond.
    let later = Serials::default();
    assert!(later.next_at(1001) > c);
    // Real time: this century's milliseconds fit.
    let now = Serials::default().next();
    assert!(now > 1_700_000_000_000u64 << SERIAL_COUNTER_BITS);
}

#[test]
fn the_ca_arming_state_is_reported_once_per_change() {
    let a = Authority::new();
    assert_eq!(a.note_ca_armed(false), Some(false));
    assert_eq!(a.note_ca_armed(false), None);
    assert_eq!(a.note_ca_armed(true), Some(true));
    assert_eq!(a.note_ca_armed(true), None);
    assert_eq!(a.note_ca_armed(false), Some(false));
}

#[test]
fn a_certificate_from_the_wire_is_recognised_without_its_comment() {
    let ca = TestCa::new(9);
    let s = settings(&ca);
    let authority = Authority::new();
    let got = run(authority.certificate(&ca, &s, "deploy", 1000, Some("alice"), None)).unwrap();
    let mut blob = Vec::new();
    ssh_encoding::Encode::encode(&*got.cert, &mut blob).unwrap();
    let wire = Certificate::decode(&mut &blob[..]).unwrap();
    assert_eq!(authority.issued(&wire).map(|i| i.uid), Some(1000));
}

#[test]
fn concurrent_listings_by_one_caller_mint_once() {
    let ca = TestCa::new(9);
    let s = settings(&ca);
    let authority = Authority::new();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let got = rt.block_on(async {
        let calls =
            (0..16).map(|_| authority.certificate(&ca, &s, "deploy", 1000, Some("alice"), None));
        futures_join_all(calls).await
    });
    assert_eq!(ca.signs.load(Ordering::SeqCst), 1);
    assert_eq!(got.iter().filter(|h| h.as_ref().unwrap().fresh).count(), 1);
    let serials: std::collections::BTreeSet<u64> = got
        .iter()
        .map(|h| h.as_ref().unwrap().cert.serial())
        .collect();
    assert_eq!(serials.len(), 1);
}

/// Polls every future to completion on the current task.
async fn futures_join_all<F: std::future::Future>(
    futures: impl Iterator<Item = F>,
) -> Vec<F::Output> {
    let mut pinned: Vec<std::pin::Pin<Box<F>>> = futures.map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = pinned.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, o) in pinned.iter_mut().zip(out.iter_mut()) {
            if o.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *o = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().map(|o| o.unwrap()).collect()
}

#[test]
fn a_certificate_under_a_grant_ends_with_the_grant() {
    let ca = TestCa::new(9);
    let s = settings(&ca);
    let authority = Authority::new();
    let end = unix_now() + 100;
    let got =
        run(authority.certificate(&ca, &s, "deploy", 1000, Some("alice"), Some(end))).unwrap();
    assert!(got.fresh);
    assert_eq!(got.cert.valid_before(), end);
    // Reused to its end: a new one could not last longer.
    let again =
        run(authority.certificate(&ca, &s, "deploy", 1000, Some("alice"), Some(end))).unwrap();
    assert!(!again.fresh);
    // A grant ending sooner gets a certificate ending sooner.
    let sooner =
        run(authority.certificate(&ca, &s, "deploy", 1000, Some("alice"), Some(end - 50))).unwrap();
    assert!(sooner.fresh);
    assert_eq!(sooner.cert.valid_before(), end - 50);
    // Without a grant: the full validity.
    let free = run(authority.certificate(&ca, &s, "deploy", 1001, Some("bob"), None)).unwrap();
    assert_eq!(free.cert.valid_before() - free.cert.valid_after(), 360);
}
