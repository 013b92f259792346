//! Certificates end to end: a real sshd on 127.0.0.1 trusting the output of
//! `keyholder ca` (and no authorized_keys entry for the deploy key), a real
//! OpenSSH ssh-agent holding the deploy key and the CA, real `ssh`,
//! `ssh-add`, `ssh-keygen -L`, and throwaway users in and out of the allowed
//! group. Every refusal is asserted twice: FAILURE, and the agent unchanged.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;

raw_client_helper!();

/// A deployment host with a CA, and a target that trusts it.
struct Site {
    dir: TempDir,
    agent: Agent,
    daemon: Daemon,
    /// Members of the allowed group.
    alice: TestUser,
    bob: TestUser,
    /// Not in the group.
    carol: TestUser,
    /// The account on the target the certificates are for.
    target: TestUser,
    /// Another account on the target, not a principal.
    elsewhere: TestUser,
    _group: TestGroup,
    sshd: Sshd,
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_owned()
}

/// The configuration: deploy key `deploy` in `mode`, CA `ca`, `[certificates]`
/// with `cert_extra` lines.
fn config_text(
    dir: &TempDir,
    agent: &Agent,
    group: &str,
    target: &str,
    mode: &str,
    cert_extra: &str,
) -> String {
    format!(
        "socket = \"{}\"\nkey_dir = \"{}\"\nlog = \"stderr\"\nrequire_encrypted = false\n\n\
         {}\n\
         [certificates]\nca = \"ca\"\n{cert_extra}\n\n\
         [keys.deploy]\ngroups = [\"{group}\"]\ncertificate = \"{mode}\"\nprincipals = [\"{target}\"]\n",
        dir.join("proxy.sock").display(),
        dir.path().display(),
        agent.backend.agent_toml(&agent.socket)
    )
}

impl Site {
    /// `arm`: arm both keys with `keyholder arm` (else only the deploy key
    /// is added to the agent; the CA is left unarmed).
    /// With `backend` holding the keys (`Backend::Builtin`: the daemon).
    fn new(
        backend: Backend,
        key_kind: &str,
        ca_kind: &str,
        mode: &str,
        cert_extra: &str,
        arm: bool,
    ) -> Self {
        let dir = TempDir::new("c");
        let agent = Agent::new(&dir, backend);
        let deploy = keygen(dir.path(), "deploy", key_kind, "");
        keygen(dir.path(), "ca", ca_kind, "");
        let group = TestGroup::create("cg");
        let alice = TestUser::create("a", &[&group]);
        let bob = TestUser::create("b", &[&group]);
        let carol = TestUser::create("o", &[]);
        let target = TestUser::create("t", &[]);
        let elsewhere = TestUser::create("e", &[]);
        let config = config_text(&dir, &agent, &group.name, &target.name, mode, cert_extra);
        let daemon = Daemon::start_with(&dir, &config);
        if backend == Backend::Builtin {
            assert!(
                wait_for(Duration::from_secs(10), || {
                    std::os::unix::net::UnixStream::connect(&agent.socket).is_ok()
                }),
                "{}",
                daemon.log_text()
            );
        }
        if arm {
            let o = keyholder(
                &As::Root,
                &["arm", "--config", daemon.config.to_str().unwrap()],
            );
            assert!(o.status.success(), "arm: {}{}", stdout(&o), stderr(&o));
            assert!(stdout(&o).contains("ca: armed"), "{}", stdout(&o));
        } else {
            agent.add(&deploy);
        }
        // The target trusts what `keyholder ca` prints, run as a plain user.
        let o = keyholder(
            &carol.as_user(),
            &["ca", "--config", daemon.config.to_str().unwrap()],
        );
        assert!(o.status.success(), "ca: {}", stderr(&o));
        let trusted = dir.join("trusted_ca");
        std::fs::write(&trusted, stdout(&o)).unwrap();
        std::fs::set_permissions(&trusted, std::fs::Permissions::from_mode(0o644)).unwrap();
        let sshd = Sshd::start_with(
            &dir,
            &format!(
                "TrustedUserCAKeys {}\nPubkeyAcceptedAlgorithms +ssh-rsa,ssh-rsa-cert-v01@openssh.com\n",
                trusted.display()
            ),
        );
        Self {
            dir,
            agent,
            daemon,
            alice,
            bob,
            carol,
            target,
            elsewhere,
            _group: group,
            sshd,
        }
    }

    fn config(&self) -> &str {
        self.daemon.config.to_str().unwrap()
    }

    fn login(&self, who: &TestUser, account: &str, extra: &[&str]) -> std::process::Output {
        self.sshd.ssh(
            &who.as_user(),
            &self.daemon.socket,
            account,
            extra,
            "id -un",
        )
    }

    /// `keyholder cert deploy` as `who`.
    fn cert(&self, who: &TestUser) -> std::process::Output {
        keyholder(
            &who.as_user(),
            &["cert", "deploy", "--config", self.config()],
        )
    }

    /// `who`'s current certificate line, written to a file `who` can read.
    fn cert_file(&self, who: &TestUser) -> PathBuf {
        let o = self.cert(who);
        assert!(o.status.success(), "cert: {}", stderr(&o));
        let path = self.dir.join(&format!("{}-cert.pub", who.name));
        std::fs::write(&path, stdout(&o)).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        path
    }

    fn deploy_pub(&self) -> PathBuf {
        self.dir.join("deploy.pub")
    }
}

/// The certificate blob of a `…-cert-v01@openssh.com AAAA… comment` line.
fn cert_blob(line: &str) -> Vec<u8> {
    let cert = ssh_key::Certificate::from_openssh(line.trim()).unwrap();
    let mut out = Vec::new();
    ssh_encoding::Encode::encode(&cert, &mut out).unwrap();
    out
}

fn cert_of(line: &str) -> ssh_key::Certificate {
    ssh_key::Certificate::from_openssh(line.trim()).unwrap()
}

/// The serial sshd logged for a login with key ID `key_id`.
fn logged_serial(log: &str, key_id: &str) -> Option<u64> {
    let needle = format!("ID {key_id} (serial ");
    let at = log.find(&needle)? + needle.len();
    log[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

fn ssh_keygen_l(path: &Path) -> String {
    let o = run(std::process::Command::new("ssh-keygen")
        .arg("-L")
        .arg("-f")
        .arg(path));
    assert!(o.status.success(), "ssh-keygen -L: {}", stderr(&o));
    stdout(&o)
}

fn is_failure(answer: &Option<Vec<u8>>) -> bool {
    answer.as_deref() == Some(&[FAILURE][..])
}

fn is_signature(answer: &Option<Vec<u8>>) -> bool {
    answer
        .as_ref()
        .is_some_and(|a| a.first() == Some(&SIGN_RESPONSE))
}

#[test]
fn each_user_is_named_by_key_id_in_the_target_log_and_only_mode_holds() {
    require_root!();
    each_backend(|backend| {
        let s = Site::new(
            backend,
            "ed25519",
            "ed25519",
            "only",
            "validity_secs = 600\nbackdate_secs = 90",
            true,
        );
        let host = hostname();
        let before = s.agent.keys();

        // Two members log in with no options; the target's log names each.
        for who in [&s.alice, &s.bob] {
            let o = s.login(who, &s.target.name, &[]);
            assert!(
                o.status.success(),
                "{} did not log in: {}\n{}\n{}",
                who.name,
                stderr(&o),
                s.sshd.log_text(),
                s.daemon.log_text()
            );
            assert_eq!(stdout(&o).trim(), s.target.name);
        }
        let log = s.sshd.log_text();
        let a = logged_serial(&log, &format!("keyholder:{}@{host}:deploy", s.alice.name))
            .unwrap_or_else(|| panic!("alice not in the sshd log:\n{log}"));
        let b = logged_serial(&log, &format!("keyholder:{}@{host}:deploy", s.bob.name))
            .unwrap_or_else(|| panic!("bob not in the sshd log:\n{log}"));
        assert_ne!(a, b);
        assert!(log.contains("ED25519-CERT"), "{log}");

        // keyholder's audit log: one line per certificate issued, and sign
        // lines with its serial.
        let klog = s.daemon.log_text();
        assert!(
        klog.contains(&format!(
            "cert user={} uid={} key=deploy serial={a} key_id=keyholder:{}@{host}:deploy principals={}",
            s.alice.name,
            s.alice.uid(),
            s.alice.name,
            s.target.name
        )),
        "{klog}"
    );
        assert!(
            klog.contains(&format!("sign user={} ", s.alice.name))
                && klog.contains(&format!("serial={a} grant=- decision=granted")),
            "{klog}"
        );

        // The listing: alice's certificate first, then the plain key; the CA never.
        let listed = s.daemon.ssh_add(&s.alice.as_user(), &["-L"]);
        let listed = stdout(&listed);
        let lines: Vec<&str> = listed.lines().collect();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(
            lines[0].starts_with("ssh-ed25519-cert-v01@openssh.com "),
            "{lines:?}"
        );
        assert_eq!(cert_of(lines[0]).serial(), a, "reused while valid");
        let deploy_line = std::fs::read_to_string(s.deploy_pub()).unwrap();
        assert!(deploy_line.starts_with(
            lines[1]
                .split(' ')
                .take(2)
                .collect::<Vec<_>>()
                .join(" ")
                .as_str()
        ));

        // `keyholder list` shows the key and her certificate, nothing unknown.
        let o = keyholder(&s.alice.as_user(), &["list", "--config", s.config()]);
        assert!(o.status.success(), "{}", stderr(&o));
        let text = stdout(&o);
        assert!(
            text.contains("ED25519-CERT") && text.contains(&format!("serial {a}")),
            "{text}"
        );
        assert!(!text.contains('?'), "{text}");

        // Validity and backdating as configured.
        let file = s.cert_file(&s.alice);
        let text = ssh_keygen_l(&file);
        assert!(
            text.contains(&format!(
                "Key ID: \"keyholder:{}@{host}:deploy\"",
                s.alice.name
            )),
            "{text}"
        );
        assert!(text.contains(&format!("Serial: {a}")), "{text}");
        assert!(text.contains(&s.target.name), "{text}");
        assert!(text.contains("permit-pty"), "{text}");
        let c = cert_of(&std::fs::read_to_string(&file).unwrap());
        assert_eq!(c.valid_before() - c.valid_after(), 690);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(
            c.valid_after() + 90 <= now && now < c.valid_after() + 90 + 60,
            "{text}"
        );

        // Tools that pin one identity: -i NAME.pub -o IdentitiesOnly=yes fails
        // in mode only (OpenSSH pairs no agent certificate with it), and works
        // with -o CertificateFile= holding `keyholder cert`'s output.
        let pinned = [
            "-i",
            s.deploy_pub().to_str().unwrap(),
            "-o",
            "IdentitiesOnly=yes",
        ]
        .map(str::to_owned);
        let o = s.login(
            &s.alice,
            &s.target.name,
            &pinned.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        assert!(!o.status.success(), "plain key login in mode only");
        let with_file = format!("CertificateFile={}", file.display());
        let mut args: Vec<&str> = pinned.iter().map(String::as_str).collect();
        args.extend(["-o", &with_file]);
        let o = s.login(&s.alice, &s.target.name, &args);
        assert!(o.status.success(), "CertificateFile login: {}", stderr(&o));

        // Principals outside the list: refused by sshd.
        let o = s.login(&s.alice, &s.elsewhere.name, &[]);
        assert!(!o.status.success(), "logged in as a non-principal");
        assert!(
            s.sshd.log_text().contains("not a listed principal")
                || s.sshd.log_text().contains("principal"),
            "{}",
            s.sshd.log_text()
        );

        // Outside the group: nothing listed, no certificate, no login.
        assert!(s.daemon.listed(&s.carol.as_user()).is_empty());
        let o = s.cert(&s.carol);
        assert_eq!(o.status.code(), Some(1));
        assert!(
            stderr(&o).contains("no certificate for deploy"),
            "{}",
            stderr(&o)
        );
        let o = s.login(&s.carol, &s.target.name, &[]);
        assert!(!o.status.success());

        // Raw requests: plain key in the user-auth data is refused in mode only.
        let plain = pubkey_blob(&s.deploy_pub());
        let alice_line = std::fs::read_to_string(&file).unwrap();
        let alice_cert = cert_blob(&alice_line);
        let cert_alg = "ssh-ed25519-cert-v01@openssh.com";
        let acct = s.target.name.as_str();
        let answers = raw_as(
            &s.alice.as_user(),
            &s.daemon.socket,
            &[
                sign_request(&plain, &userauth_data(&plain, acct, "ssh-ed25519"), 0),
                sign_request(&alice_cert, &userauth_data(&plain, acct, "ssh-ed25519"), 0),
                // Her own certificate in the data, the request naming the plain
                // key (ssh <= 10.2) or the certificate (10.3+): signed.
                sign_request(&plain, &userauth_data(&alice_cert, acct, cert_alg), 0),
                sign_request(&alice_cert, &userauth_data(&alice_cert, acct, cert_alg), 0),
            ],
        );
        assert!(is_failure(&answers[0]), "{answers:?}");
        assert!(is_failure(&answers[1]), "{answers:?}");
        assert!(is_signature(&answers[2]), "{answers:?}");
        assert!(is_signature(&answers[3]), "{answers:?}");

        // Bob replaying alice's certificate: refused, whichever the request names.
        let answers = raw_as(
            &s.bob.as_user(),
            &s.daemon.socket,
            &[
                sign_request(&plain, &userauth_data(&alice_cert, acct, cert_alg), 0),
                sign_request(&alice_cert, &userauth_data(&alice_cert, acct, cert_alg), 0),
            ],
        );
        assert!(answers.iter().all(is_failure), "{answers:?}");
        let klog = s.daemon.log_text();
        assert!(
            klog.contains(&format!("sign user={} ", s.bob.name))
                && klog.contains("reason=certificate-not-yours"),
            "{klog}"
        );
        assert!(klog.contains("reason=certificate-required"), "{klog}");

        // A look-alike: same key, serial, key ID and principals, signed by
        // another CA (`ssh-keygen -s`). Not one keyholder minted: refused.
        let other_ca = keygen(s.dir.path(), "otherca", "ed25519", "");
        let forged_src = s.dir.join("forged.pub");
        std::fs::copy(s.deploy_pub(), &forged_src).unwrap();
        let o = run(std::process::Command::new("ssh-keygen")
            .arg("-q")
            .arg("-s")
            .arg(&other_ca)
            .args(["-I", &format!("keyholder:{}@{host}:deploy", s.alice.name)])
            .args(["-n", acct, "-z", &a.to_string(), "-V", "-1m:+5m"])
            .arg(&forged_src));
        assert!(o.status.success(), "ssh-keygen -s: {}", stderr(&o));
        let forged_line = std::fs::read_to_string(s.dir.join("forged-cert.pub")).unwrap();
        assert_eq!(cert_of(&forged_line).serial(), a);
        let forged = cert_blob(&forged_line);
        let answers = raw_as(
            &s.alice.as_user(),
            &s.daemon.socket,
            &[
                sign_request(&plain, &userauth_data(&forged, acct, cert_alg), 0),
                sign_request(&forged, &userauth_data(&forged, acct, cert_alg), 0),
            ],
        );
        assert!(answers.iter().all(is_failure), "{answers:?}");

        // The CA: never listed (root included), never signs through the proxy.
        let ca = pubkey_blob(&s.dir.join("ca.pub"));
        for who in [As::Root, s.alice.as_user()] {
            let answers = raw_as(
                &who,
                &s.daemon.socket,
                &[
                    vec![11],
                    sign_request(&ca, &userauth_data(&ca, acct, "ssh-ed25519"), 0),
                    sign_request(&ca, b"anything", 0),
                ],
            );
            let blobs = listed_blobs(answers[0].as_ref().unwrap()).unwrap();
            assert!(!blobs.contains(&ca), "CA listed to {who:?}");
            assert!(
                is_failure(&answers[1]) && is_failure(&answers[2]),
                "{answers:?}"
            );
        }
        // status counts the CA as a key.
        let o = keyholder(&s.carol.as_user(), &["status", "--config", s.config()]);
        assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
        assert!(stdout(&o).contains("2/2 keys armed"), "{}", stdout(&o));
        assert_eq!(s.agent.keys(), before);
    });
}

#[test]
fn rsa_keys_and_rsa_ca_in_mode_also() {
    require_root!();
    each_backend(|backend| {
        let s = Site::new(backend, "rsa", "rsa", "also", "", true);
        let host = hostname();
        let before = s.agent.keys();
        let o = s.login(&s.alice, &s.target.name, &[]);
        assert!(o.status.success(), "{}\n{}", stderr(&o), s.sshd.log_text());
        let log = s.sshd.log_text();
        assert!(
            logged_serial(&log, &format!("keyholder:{}@{host}:deploy", s.alice.name)).is_some(),
            "{log}"
        );
        assert!(log.contains("RSA-CERT"), "{log}");
        let file = s.cert_file(&s.alice);
        let text = ssh_keygen_l(&file);
        assert!(text.contains("rsa-sha2-512"), "CA signature: {text}");
        // Mode also: the plain key still signs; the certificate with either
        // rsa-sha2 flag, the signature relayed with the algorithm asked for.
        let plain = pubkey_blob(&s.deploy_pub());
        let cert = cert_blob(&std::fs::read_to_string(&file).unwrap());
        let acct = s.target.name.as_str();
        let calg = "rsa-sha2-512-cert-v01@openssh.com";
        let answers = raw_as(
            &s.alice.as_user(),
            &s.daemon.socket,
            &[
                sign_request(&plain, &userauth_data(&plain, acct, "rsa-sha2-256"), 2),
                sign_request(&plain, &userauth_data(&cert, acct, calg), 2),
                sign_request(&cert, &userauth_data(&cert, acct, calg), 4),
            ],
        );
        assert!(answers.iter().all(is_signature), "{answers:?}");
        let alg = |a: &Option<Vec<u8>>| {
            let a = a.as_ref().unwrap();
            let (sig, _) = take_string(&a[1..]).unwrap();
            let (name, _) = take_string(sig).unwrap();
            String::from_utf8(name.to_vec()).unwrap()
        };
        assert_eq!(alg(&answers[0]), "rsa-sha2-256");
        assert_eq!(alg(&answers[1]), "rsa-sha2-256");
        assert_eq!(alg(&answers[2]), "rsa-sha2-512");
        // Bob replaying it: refused.
        let answers = raw_as(
            &s.bob.as_user(),
            &s.daemon.socket,
            &[sign_request(&plain, &userauth_data(&cert, acct, calg), 4)],
        );
        assert!(is_failure(&answers[0]));
        assert_eq!(s.agent.keys(), before);
    });
}

#[test]
fn unarmed_ca_degrades_also_and_hides_only() {
    require_root!();
    each_backend(|backend| {
        let s = Site::new(backend, "ed25519", "ed25519", "also", "", false);
        // A second key in mode only, same group.
        let only = keygen(s.dir.path(), "strict", "ed25519", "");
        s.agent.add(&only);
        let group = &s._group.name;
        let config = std::fs::read_to_string(&s.daemon.config).unwrap()
        + &format!(
            "\n[keys.strict]\ngroups = [\"{group}\"]\ncertificate = \"only\"\nprincipals = [\"{}\"]\n",
            s.target.name
        );
        std::fs::write(&s.daemon.config, config).unwrap();
        s.daemon.signal(Signal::SIGHUP);
        assert!(s.daemon.wait_log("configuration reloaded"));

        // CA not armed: the "also" key plain only, the "only" key not at all.
        let listed = s.daemon.listed(&s.alice.as_user());
        let deploy = std::fs::read_to_string(s.deploy_pub()).unwrap();
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert!(deploy.starts_with(&listed[0][..80]), "{listed:?}");
        assert!(s.daemon.wait_log("certificate CA ca is not armed"));
        // Once per change of state, not per listing.
        s.daemon.listed(&s.alice.as_user());
        assert_eq!(s.daemon.log_count("is not armed"), 1);
        let o = s.cert(&s.alice);
        assert_eq!(o.status.code(), Some(1));
        assert!(
            stderr(&o).contains("without a certificate"),
            "{}",
            stderr(&o)
        );
        // status counts the CA: some keys unarmed is a WARNING naming it.
        let o = keyholder(&s.alice.as_user(), &["status", "--config", s.config()]);
        assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
        assert!(stdout(&o).contains("ca"), "{}", stdout(&o));
        // Mode also still logs in (plain key, via authorized_keys).
        s.sshd.authorize(&s.target.name, &[&s.deploy_pub()]);
        let o = s.login(&s.alice, &s.target.name, &[]);
        assert!(o.status.success(), "{}", stderr(&o));

        // Armed: both keys get certificates.
        s.agent.add(&s.dir.join("ca"));
        let listed = s.daemon.ssh_add(&s.alice.as_user(), &["-L"]);
        let listed = stdout(&listed);
        let lines: Vec<&str> = listed.lines().collect();
        assert_eq!(lines.len(), 4, "{lines:?}");
        assert_eq!(
            lines
                .iter()
                .filter(|l| l.contains("-cert-v01@openssh.com"))
                .count(),
            2
        );
        assert!(s.daemon.wait_log("certificate CA ca is armed"));
    });
}

#[test]
fn expiry_reload_and_restart_give_fresh_certificates() {
    require_root!();
    // Upstream only: the restart below keeps the keys in the external agent.
    let mut s = Site::new(
        Backend::Upstream,
        "ed25519",
        "ed25519",
        "only",
        "validity_secs = 10\nbackdate_secs = 0",
        false,
    );
    s.agent.add(&s.dir.join("ca"));
    let first = cert_of(&stdout(&s.cert(&s.alice)));
    assert_eq!(first.valid_before() - first.valid_after(), 10);
    // Reused while more than half its validity remains.
    assert_eq!(cert_of(&stdout(&s.cert(&s.alice))).serial(), first.serial());
    // Past half of it: a fresh one, never an expired one.
    std::thread::sleep(Duration::from_secs(6));
    let second = cert_of(&stdout(&s.cert(&s.alice)));
    assert_ne!(second.serial(), first.serial());
    assert!(second.valid_before() > first.valid_before());
    std::thread::sleep(Duration::from_secs(5));
    // first is expired now; the login uses a fresh certificate.
    let o = s.login(&s.alice, &s.target.name, &[]);
    assert!(o.status.success(), "{}\n{}", stderr(&o), s.sshd.log_text());

    // A reload applies to the next certificate minted.
    let config = std::fs::read_to_string(&s.daemon.config).unwrap().replace(
        &format!("principals = [\"{}\"]", s.target.name),
        &format!(
            "principals = [\"{}\", \"{}\"]",
            s.target.name, s.elsewhere.name
        ),
    );
    std::fs::write(&s.daemon.config, config).unwrap();
    s.daemon.signal(Signal::SIGHUP);
    assert!(s.daemon.wait_log("configuration reloaded"));
    let third = cert_of(&stdout(&s.cert(&s.alice)));
    assert_eq!(
        third.valid_principals(),
        [s.target.name.clone(), s.elsewhere.name.clone()]
    );
    let o = s.login(&s.alice, &s.elsewhere.name, &[]);
    assert!(o.status.success(), "{}", stderr(&o));

    // A restart: new serials, above every earlier one.
    s.daemon.stop();
    let config = std::fs::read_to_string(&s.daemon.config).unwrap();
    let d2 = Daemon::start_with(&s.dir, &config);
    let fourth = cert_of(&stdout(&keyholder(
        &s.alice.as_user(),
        &["cert", "deploy", "--config", d2.config.to_str().unwrap()],
    )));
    assert!(
        fourth.serial() > third.serial(),
        "{} <= {}",
        fourth.serial(),
        third.serial()
    );
    let serials = [
        first.serial(),
        second.serial(),
        third.serial(),
        fourth.serial(),
    ];
    let mut unique = serials.to_vec();
    unique.dedup();
    assert_eq!(unique.len(), 4, "{serials:?}");
}

#[test]
fn a_reload_that_tightens_the_terms_retires_certificates_minted_before() {
    require_root!();
    let s = Site::new(Backend::Upstream, "ed25519", "ed25519", "only", "", false);
    s.agent.add(&s.dir.join("ca"));
    let before = s.agent.keys();
    let plain = pubkey_blob(&s.deploy_pub());
    let cert_alg = "ssh-ed25519-cert-v01@openssh.com";
    let acct = s.target.name.clone();
    let sign_with = |cert: &[u8]| sign_request(&plain, &userauth_data(cert, &acct, cert_alg), 0);
    // Minted by a listing, and usable.
    let old_line = stdout(&s.cert(&s.alice));
    let old = cert_of(&old_line);
    let old_blob = cert_blob(&old_line);
    assert!(old.critical_options().is_empty());
    let a = raw_as(
        &s.alice.as_user(),
        &s.daemon.socket,
        &[sign_with(&old_blob)],
    );
    assert!(is_signature(&a[0]), "{a:?}");

    // Tighter terms: a forced command and a source address. Reloaded.
    let config = std::fs::read_to_string(&s.daemon.config).unwrap().replace(
        &format!("principals = [\"{acct}\"]"),
        &format!(
            "principals = [\"{acct}\"]\nforce_command = \"/bin/echo forced\"\n\
             source_address = [\"127.0.0.1/32\"]"
        ),
    );
    std::fs::write(&s.daemon.config, config).unwrap();
    s.daemon.signal(Signal::SIGHUP);
    assert!(
        s.daemon.wait_log("configuration reloaded"),
        "{}",
        s.daemon.log_text()
    );

    // The old certificate (still within its validity at the target): refused.
    let a = raw_as(
        &s.alice.as_user(),
        &s.daemon.socket,
        &[sign_with(&old_blob)],
    );
    assert!(is_failure(&a[0]), "{a:?}");
    assert!(
        s.daemon.wait_log(&format!(
            "serial={} grant=- decision=refused reason=certificate-stale",
            old.serial()
        )),
        "{}",
        s.daemon.log_text()
    );
    assert_eq!(s.agent.keys(), before);

    // The next listing mints one under the new terms; it signs, and a real
    // login with it runs the forced command.
    let new_line = stdout(&s.cert(&s.alice));
    let new = cert_of(&new_line);
    assert_ne!(new.serial(), old.serial());
    let options: Vec<(String, String)> = new
        .critical_options()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    assert_eq!(
        options,
        [
            ("force-command".to_owned(), "/bin/echo forced".to_owned()),
            ("source-address".to_owned(), "127.0.0.1/32".to_owned())
        ]
    );
    let a = raw_as(
        &s.alice.as_user(),
        &s.daemon.socket,
        &[sign_with(&cert_blob(&new_line))],
    );
    assert!(is_signature(&a[0]), "{a:?}");
    let o = s.login(&s.alice, &acct, &[]);
    assert!(o.status.success(), "{}\n{}", stderr(&o), s.sshd.log_text());
    assert_eq!(stdout(&o).trim(), "forced");
    assert_eq!(s.agent.keys(), before);
}

#[test]
fn ca_command_and_configuration_errors() {
    require_root!();
    let dir = TempDir::new("cc");
    keygen(dir.path(), "deploy", "ed25519", "");
    keygen(dir.path(), "ca", "ed25519", "");
    let base = format!("key_dir = \"{}\"\n", dir.path().display());
    let path = dir.join("k.toml");
    let check = |text: &str| {
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        (
            keyholder(&As::Root, &["ca", "--config", path.to_str().unwrap()]),
            keyholder(
                &As::Root,
                &["check-config", "--config", path.to_str().unwrap()],
            ),
        )
    };
    // No CA configured: exit 1 with a clear message.
    let (ca, _) = check(&format!("{base}[keys.deploy]\ngroups = [\"root\"]\n"));
    assert_eq!(ca.status.code(), Some(1));
    assert!(
        stderr(&ca).contains("no certificate CA configured"),
        "{}",
        stderr(&ca)
    );
    // A CA: its public key line.
    let (ca, cc) = check(&format!(
        "{base}[certificates]\nca = \"ca\"\n[keys.deploy]\ngroups = [\"root\"]\ncertificate = \"also\"\nprincipals = [\"deploy\"]\n"
    ));
    assert!(ca.status.success());
    let want = std::fs::read_to_string(dir.join("ca.pub")).unwrap();
    assert_eq!(
        stdout(&ca).split(' ').take(2).collect::<Vec<_>>(),
        want.split(' ').take(2).collect::<Vec<_>>()
    );
    assert!(
        stdout(&cc).contains("certificates: CA ca"),
        "{}",
        stdout(&cc)
    );
    assert!(
        stdout(&cc).contains("certificate=also principals=deploy"),
        "{}",
        stdout(&cc)
    );
    for (bad, needle) in [
        (
            "[certificates]\nca = \"ca\"\nvalidity_secs = 5\n",
            "validity_secs",
        ),
        (
            "[certificates]\nca = \"ca\"\nbackdate_secs = 4000\n",
            "backdate_secs",
        ),
        (
            "[certificates]\nca = \"ca\"\nkey_id = \"{name}\"\n",
            "unknown placeholder",
        ),
        ("[certificates]\nca = \"deploy\"\n", "also a [keys] entry"),
        ("[certificates]\nca = \"nope\"\n", "nope.pub"),
    ] {
        let (_, cc) = check(&format!("{base}{bad}[keys.deploy]\ngroups = [\"root\"]\n"));
        assert_eq!(cc.status.code(), Some(1), "{bad}");
        assert!(stderr(&cc).contains(needle), "{bad}: {}", stderr(&cc));
    }
    let (_, cc) = check(&format!("{base}[certificates]\nca = \"ca\"\n[keys.deploy]\ngroups = [\"root\"]\ncertificate = \"only\"\n"));
    assert!(
        stderr(&cc).contains("keys.deploy.principals"),
        "{}",
        stderr(&cc)
    );
    let (_, cc) = check(&format!(
        "{base}[keys.deploy]\ngroups = [\"root\"]\ncertificate = \"only\"\nprincipals = [\"d\"]\n"
    ));
    assert!(stderr(&cc).contains("[certificates]"), "{}", stderr(&cc));
}
