//! End-to-end tests of the destination rules (`docs/destinations.md`): real `sshd`
//! instances on 127.0.0.1 with their own host keys (and host certificates),
//! real `ssh` (with `-A` for forwarding), a real upstream `ssh-agent`, real
//! users and groups; raw clients for what `ssh` never sends (no binding,
//! forged bindings, floods). Every refusal is checked twice: the client got
//! FAILURE (or could not log in), and the agent is unchanged; and the
//! audit line says why, so the refusal was keyholder's, not sshd's.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use nix::sys::signal::Signal;
use ssh_encoding::Encode;

raw_client_helper!();

/// An agent holding `deploy` (and `open`), a group whose member may use
/// both, an outsider, and an account to log in as.
struct Env {
    dir: TempDir,
    agent: Agent,
    group: TestGroup,
    member: TestUser,
    outsider: TestUser,
    account: TestUser,
}

impl Env {
    fn new() -> Self {
        let dir = TempDir::new("dst");
        let agent = Agent::start(&dir);
        for name in ["deploy", "open"] {
            agent.add(&keygen(dir.path(), name, "ed25519", ""));
        }
        let group = TestGroup::create("dg");
        let member = TestUser::create("dm", &[&group]);
        let outsider = TestUser::create("do", &[]);
        let account = TestUser::create("da", &[]);
        Self {
            dir,
            agent,
            group,
            member,
            outsider,
            account,
        }
    }

    /// Starts the daemon: key `deploy` with `rules` (TOML lines), key
    /// `open` without any.
    fn daemon(&self, rules: &str) -> Daemon {
        let extra = format!(
            "[keys.deploy]\ngroups = [\"{g}\"]\n{rules}\n\n[keys.open]\ngroups = [\"{g}\"]\n",
            g = self.group.name
        );
        Daemon::start(&self.dir, &self.agent, &extra)
    }

    /// Writes the destinations file `targets` (root's, 0644) from the
    /// public key files in `hosts` and CA public key files in `cas`.
    fn targets(&self, hosts: &[&Path], cas: &[&Path]) {
        let mut text = String::from("# written by the test\n");
        for h in hosts {
            text.push_str(&format!("somehost,10.0.0.1 {}", read(h)));
        }
        for c in cas {
            text.push_str(&format!("@cert-authority *.example.org {}", read(c)));
        }
        std::fs::write(self.dir.join("targets"), text).unwrap();
    }

    fn sshd(&self, name: &str, kind: &str, ca: Option<&Path>) -> Sshd {
        let s = Sshd::start_opts(&self.dir, name, kind, ca);
        s.authorize(&self.account.name, &[&self.pub_file("deploy")]);
        s
    }

    fn pub_file(&self, key: &str) -> PathBuf {
        self.dir.join(&format!("{key}.pub"))
    }

    /// `ssh account@sshd COMMAND` as the member through the proxy, with the
    /// `deploy` identity only.
    fn ssh(
        &self,
        d: &Daemon,
        sshd: &Sshd,
        account: &str,
        extra: &[&str],
        command: &str,
    ) -> std::process::Output {
        let pubfile = self.pub_file("deploy");
        let mut args = vec!["-i", pubfile.to_str().unwrap(), "-o", "IdentitiesOnly=yes"];
        args.extend_from_slice(extra);
        sshd.ssh(&self.member.as_user(), &d.socket, account, &args, command)
    }
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap()
}

/// `SHA256:…` of a public key file.
fn fingerprint(pub_file: &Path) -> String {
    let key = ssh_key::PublicKey::from_openssh(read(pub_file).trim()).unwrap();
    key.fingerprint(ssh_key::HashAlg::Sha256).to_string()
}

/// Reloads the daemon's configuration and waits until it has.
fn reload(d: &Daemon) {
    let before = d.log_count("configuration reloaded");
    d.signal(Signal::SIGHUP);
    assert!(
        wait_for(std::time::Duration::from_secs(10), || d
            .log_count("configuration reloaded")
            > before),
        "{}",
        d.log_text()
    );
}

/// The audit lines (sign decisions) of the daemon's log.
fn sign_lines(d: &Daemon) -> Vec<String> {
    d.log_text()
        .lines()
        .filter(|l| l.contains(" sign user="))
        .map(str::to_owned)
        .collect()
}

// --- raw protocol pieces ------------------------------------------------------

fn enc(v: &(impl Encode + ?Sized)) -> Vec<u8> {
    let mut out = Vec::new();
    v.encode(&mut out).unwrap();
    out
}

/// A session-bind message for `host_blob`, session `sid`, with `sig` (a
/// signature blob) and forwarding flag `fwd`.
fn bind_raw(host_blob: &[u8], sid: &[u8], sig: &[u8], fwd: u8) -> Vec<u8> {
    let mut m = vec![27u8];
    m.extend(string(b"session-bind@openssh.com"));
    m.extend(string(host_blob));
    m.extend(string(sid));
    m.extend(string(sig));
    m.push(fwd);
    m
}

/// A real host's private key.
fn host_private(sshd: &Sshd) -> ssh_key::PrivateKey {
    ssh_key::PrivateKey::read_openssh_file(&sshd.host_key).unwrap()
}

/// A binding of `sid` by `host`, signed over `signed_sid`.
fn bind_signed(host: &ssh_key::PrivateKey, sid: &[u8], signed_sid: &[u8], fwd: u8) -> Vec<u8> {
    let sig: ssh_key::Signature = signature::Signer::sign(host, signed_sid);
    bind_raw(&enc(host.public_key().key_data()), sid, &enc(&sig), fwd)
}

/// User-auth data for key `blob`, session `sid`, remote `user`; host-bound
/// to `host_blob` when given.
fn userauth(blob: &[u8], sid: &[u8], user: &str, host_blob: Option<&[u8]>) -> Vec<u8> {
    let mut d = string(sid);
    d.push(50);
    d.extend(string(user.as_bytes()));
    d.extend(string(b"ssh-connection"));
    let method: &[u8] = if host_blob.is_some() {
        b"publickey-hostbound-v00@openssh.com"
    } else {
        b"publickey"
    };
    d.extend(string(method));
    d.push(1);
    d.extend(string(b"ssh-ed25519"));
    d.extend(string(blob));
    if let Some(h) = host_blob {
        d.extend(string(h));
    }
    d
}

fn answer_types(answers: &[Option<Vec<u8>>]) -> Vec<Option<u8>> {
    answers
        .iter()
        .map(|a| a.as_ref().and_then(|a| a.first().copied()))
        .collect()
}

// --- tests --------------------------------------------------------------------

#[test]
fn ssh_logs_into_a_listed_host_and_keyholder_refuses_another() {
    require_root!();
    let env = Env::new();
    let allowed = env.sshd("sshd-a", "ed25519", None);
    let other = env.sshd("sshd-b", "ecdsa", None);
    env.targets(&[&allowed.host_pub()], &[]);
    let d = env.daemon("destinations = \"targets\"");
    let before = env.agent.keys();
    let account = env.account.name.clone();

    let o = env.ssh(&d, &allowed, &account, &[], "id -un");
    assert!(o.status.success(), "{}\n{}", stderr(&o), d.log_text());
    assert_eq!(stdout(&o).trim(), account);
    let granted = sign_lines(&d);
    assert_eq!(granted.len(), 1, "{granted:?}");
    assert!(granted[0].contains("decision=granted"), "{}", granted[0]);
    assert!(
        granted[0].contains(&format!("dest={}", fingerprint(&allowed.host_pub()))),
        "{}",
        granted[0]
    );
    assert!(granted[0].contains("forwarded=no"), "{}", granted[0]);

    // The other host trusts the key too (sshd would accept it), but it is
    // not in the destinations file: keyholder refuses to sign.
    let o = env.ssh(&d, &other, &account, &[], "id -un");
    assert!(!o.status.success(), "logged into a host not listed");
    assert!(
        d.wait_log("reason=destination-not-allowed"),
        "{}",
        d.log_text()
    );
    let refused = sign_lines(&d).pop().unwrap();
    assert!(
        refused.contains(&format!("dest={}", fingerprint(&other.host_pub())))
            && refused.contains("decision=refused")
            && refused.contains(&format!("remote_user={account}")),
        "{refused}"
    );
    assert!(
        !other.log_text().contains("Accepted publickey"),
        "{}",
        other.log_text()
    );
    assert_eq!(env.agent.keys(), before);

    // SIGHUP re-reads the file: now only the ECDSA host is listed.
    env.targets(&[&other.host_pub()], &[]);
    reload(&d);
    let o = env.ssh(&d, &other, &account, &[], "id -un");
    assert!(o.status.success(), "{}\n{}", stderr(&o), d.log_text());
    let o = env.ssh(&d, &allowed, &account, &[], "id -un");
    assert!(!o.status.success(), "logged into a host no longer listed");
    assert_eq!(
        d.log_count("reason=destination-not-allowed"),
        2,
        "{}",
        d.log_text()
    );
    assert_eq!(env.agent.keys(), before);
}

#[test]
fn a_cert_authority_line_admits_a_host_that_ca_certified() {
    require_root!();
    let env = Env::new();
    let ca = keygen(env.dir.path(), "host-ca", "ed25519", "");
    let other_ca = keygen(env.dir.path(), "other-ca", "ed25519", "");
    // An RSA host key (rsa-sha2-512 in the key exchange) with a certificate.
    let host = env.sshd("sshd-cert", "rsa", Some(&ca));
    // The client knows the CA, so it uses the certificate.
    let known = env.dir.join("client_known_hosts");
    std::fs::write(
        &known,
        format!("@cert-authority * {}", read(&ca.with_extension("pub"))),
    )
    .unwrap();
    let known_opt = format!("GlobalKnownHostsFile={}", known.display());
    let opts = [
        "-o",
        known_opt.as_str(),
        "-o",
        "HostKeyAlgorithms=rsa-sha2-512-cert-v01@openssh.com",
    ];
    let ca_pub = env.dir.join("host-ca.pub");
    let other_pub = env.dir.join("other-ca.pub");
    // First only another CA is listed (and the host's plain key is not).
    env.targets(&[], &[&other_pub]);
    let d = env.daemon("destinations = \"targets\"");
    let before = env.agent.keys();
    let account = env.account.name.clone();
    let o = env.ssh(&d, &host, &account, &opts, "id -un");
    assert!(
        !o.status.success(),
        "admitted by a CA that did not sign the host"
    );
    assert!(
        d.wait_log("reason=destination-not-allowed"),
        "{}",
        d.log_text()
    );
    assert_eq!(env.agent.keys(), before);

    env.targets(&[], &[&ca_pub]);
    reload(&d);
    let o = env.ssh(&d, &host, &account, &opts, "id -un");
    assert!(
        o.status.success(),
        "{}\n{}\n{}",
        stderr(&o),
        d.log_text(),
        host.log_text()
    );
    assert_eq!(stdout(&o).trim(), account);
    let line = sign_lines(&d).pop().unwrap();
    assert!(line.contains("decision=granted"), "{line}");
    // dest= names the certified host key.
    assert!(
        line.contains(&format!("dest={}", fingerprint(&host.host_pub()))),
        "{line}"
    );
    let _ = other_ca;
}

#[test]
fn a_host_certificate_valid_forever_admits_the_host() {
    require_root!();
    let env = Env::new();
    let ca = keygen(env.dir.path(), "host-ca", "ed25519", "");
    // `ssh-keygen -s CA -h` without `-V`: valid_before = 2^64 - 1.
    let host = Sshd::start_validity(&env.dir, "sshd-forever", "ed25519", Some(&ca), None, "");
    host.authorize(&env.account.name, &[&env.pub_file("deploy")]);
    let cert_file = host.host_pub().with_file_name("host_ed25519-cert.pub");
    let o = run(Command::new("ssh-keygen").arg("-Lf").arg(&cert_file));
    assert!(stdout(&o).contains("Valid: forever"), "{}", stdout(&o));
    let known = env.dir.join("client_known_hosts");
    std::fs::write(
        &known,
        format!("@cert-authority * {}", read(&ca.with_extension("pub"))),
    )
    .unwrap();
    let known_opt = format!("GlobalKnownHostsFile={}", known.display());
    let opts = [
        "-o",
        known_opt.as_str(),
        "-o",
        "HostKeyAlgorithms=ssh-ed25519-cert-v01@openssh.com",
    ];
    env.targets(&[], &[&ca.with_extension("pub")]);
    let d = env.daemon("destinations = \"targets\"");
    let before = env.agent.keys();
    let o = env.ssh(&d, &host, &env.account.name, &opts, "id -un");
    assert!(
        o.status.success(),
        "{}\n{}\n{}",
        stderr(&o),
        d.log_text(),
        host.log_text()
    );
    assert_eq!(stdout(&o).trim(), env.account.name);
    let line = sign_lines(&d).pop().unwrap();
    assert!(
        line.contains("decision=granted")
            && line.contains(&format!("dest={}", fingerprint(&host.host_pub()))),
        "{line}"
    );
    assert!(
        !d.log_text().contains("malformed host key"),
        "{}",
        d.log_text()
    );
    assert_eq!(env.agent.keys(), before);
}

#[test]
fn forwarded_use_is_refused_by_default_and_works_with_allow_forwarding() {
    require_root!();
    let env = Env::new();
    let jump = env.sshd("sshd-jump", "ed25519", None);
    let target = env.sshd("sshd-target", "ed25519", None);
    let account = env.account.name.clone();
    let onward = format!(
        "echo outer-ok; ssh-add -l; ssh -F /dev/null -o BatchMode=yes -o StrictHostKeyChecking=no \
         -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -p {} {account}@127.0.0.1 echo inner-ok",
        target.port
    );
    let before = env.agent.keys();
    {
        let d = env.daemon("");
        let o = env.ssh(&d, &jump, &account, &["-A"], &onward);
        let out = stdout(&o);
        // The direct login worked; through the forwarded agent the key is
        // neither listed nor used.
        assert!(
            out.contains("outer-ok"),
            "{out}\n{}\n{}",
            stderr(&o),
            d.log_text()
        );
        assert!(!out.contains("inner-ok"), "{out}");
        assert!(out.contains("no identities"), "{out}");
        let lines = sign_lines(&d);
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(
            lines[0].contains("forwarded=no serial=- grant=- decision=granted"),
            "{}",
            lines[0]
        );
        assert!(!target.log_text().contains("Accepted publickey"));

        // What the remote root could try with the forwarded socket: sign
        // anyway. Refused, with the reason.
        let jump_key = host_private(&jump);
        let target_key = host_private(&target);
        let deploy = pubkey_blob(&env.pub_file("deploy"));
        let target_blob = enc(target_key.public_key().key_data());
        let answers = raw_as(
            &env.member.as_user(),
            &d.socket,
            &[
                bind_signed(&jump_key, &[1; 32], &[1; 32], 1),
                bind_signed(&target_key, &[2; 32], &[2; 32], 0),
                sign_request(
                    &deploy,
                    &userauth(&deploy, &[2; 32], &account, Some(&target_blob)),
                    0,
                ),
                vec![11],
            ],
        );
        let types = answer_types(&answers);
        assert_eq!(
            types[..3],
            [Some(SUCCESS), Some(SUCCESS), Some(FAILURE)],
            "{types:?}"
        );
        // Not listed there either (`open` does not allow forwarding either).
        assert_eq!(listed_blobs(answers[3].as_ref().unwrap()), Some(vec![]));
        assert!(d.wait_log("reason=forwarded-use"), "{}", d.log_text());
        assert!(d
            .log_text()
            .contains("forwarded=yes serial=- grant=- decision=refused reason=forwarded-use"));
        assert_eq!(env.agent.keys(), before);
    }
    // Same with allow_forwarding = true: the onward login works.
    let d = env.daemon("allow_forwarding = true");
    let o = env.ssh(&d, &jump, &account, &["-A"], &onward);
    let out = stdout(&o);
    assert!(
        out.contains("inner-ok"),
        "{out}\n{}\n{}",
        stderr(&o),
        d.log_text()
    );
    let lines = sign_lines(&d);
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(
        lines[0].contains("forwarded=no serial=- grant=- decision=granted"),
        "{}",
        lines[0]
    );
    assert!(
        lines[1].contains(&format!(
            "dest={} forwarded=yes serial=- grant=- decision=granted",
            fingerprint(&target.host_pub())
        )),
        "{}",
        lines[1]
    );
}

#[test]
fn a_client_that_sends_no_binding_is_refused_for_a_restricted_key_only() {
    require_root!();
    let env = Env::new();
    let host = env.sshd("sshd-a", "ed25519", None);
    env.targets(&[&host.host_pub()], &[]);
    let d = env.daemon("destinations = \"targets\"");
    let before = env.agent.keys();
    let deploy = pubkey_blob(&env.pub_file("deploy"));
    let open = pubkey_blob(&env.pub_file("open"));
    // Like paramiko, asyncssh, libssh2: a sign request, no binding first.
    let answers = raw_as(
        &env.member.as_user(),
        &d.socket,
        &[
            vec![11],
            sign_request(&deploy, &userauth(&deploy, &[7; 32], "x", None), 0),
            sign_request(&open, &userauth(&open, &[7; 32], "x", None), 0),
        ],
    );
    // Both keys are listed: a client without bindings may still use `open`
    // (and `deploy` once it binds).
    let mut both = vec![deploy.clone(), open.clone()];
    both.sort();
    assert_eq!(listed_blobs(answers[0].as_ref().unwrap()), Some(both));
    assert_eq!(
        answer_types(&answers)[1..],
        [Some(FAILURE), Some(SIGN_RESPONSE)]
    );
    assert!(d.wait_log("key=deploy"), "{}", d.log_text());
    assert!(
        d.log_text()
            .contains("forwarded=no serial=- grant=- decision=refused reason=no-session-bind"),
        "{}",
        d.log_text()
    );
    assert!(d.log_text().contains("key=open"));
    assert_eq!(env.agent.keys(), before);
}

#[test]
fn forged_bindings_get_extension_failure_and_nothing_signs_after_them() {
    require_root!();
    let env = Env::new();
    let host = env.sshd("sshd-a", "ed25519", None);
    env.targets(&[&host.host_pub()], &[]);
    let d = env.daemon("destinations = \"targets\"");
    let before = env.agent.keys();
    let key = host_private(&host);
    let blob = enc(key.public_key().key_data());
    let deploy = pubkey_blob(&env.pub_file("deploy"));
    let sign = |sid: &[u8]| sign_request(&deploy, &userauth(&deploy, sid, "x", Some(&blob)), 0);
    let member = env.member.as_user();
    let (x, y) = ([1u8; 32], [2u8; 32]);

    // Control: a good binding, then a sign for that session, works.
    let a = raw_as(
        &member,
        &d.socket,
        &[bind_signed(&key, &x, &x, 0), sign(&x)],
    );
    assert_eq!(answer_types(&a), [Some(SUCCESS), Some(SIGN_RESPONSE)]);

    // A bad signature (over another session id): FAILURE, and then not even
    // the session it claimed signs.
    let a = raw_as(
        &member,
        &d.socket,
        &[bind_signed(&key, &x, &y, 0), sign(&x), sign(&y)],
    );
    assert_eq!(
        answer_types(&a),
        [Some(EXTENSION_FAILURE), Some(FAILURE), Some(FAILURE)]
    );
    // Signed by another key than the one it names.
    let other = ssh_key::PrivateKey::from(ssh_key::private::Ed25519Keypair::from_seed(&[9; 32]));
    let sig: ssh_key::Signature = signature::Signer::sign(&other, &x);
    let a = raw_as(
        &member,
        &d.socket,
        &[bind_raw(&blob, &x, &enc(&sig), 0), sign(&x)],
    );
    assert_eq!(answer_types(&a), [Some(EXTENSION_FAILURE), Some(FAILURE)]);

    // A good binding, then a sign request for another session: refused.
    let a = raw_as(
        &member,
        &d.socket,
        &[bind_signed(&key, &x, &x, 0), sign(&y)],
    );
    assert_eq!(answer_types(&a), [Some(SUCCESS), Some(FAILURE)]);

    // A binding after a non-forwarding one: FAILURE, and the connection
    // signs nothing more, not even for the first, good, binding.
    let a = raw_as(
        &member,
        &d.socket,
        &[
            bind_signed(&key, &x, &x, 0),
            bind_signed(&key, &y, &y, 0),
            sign(&y),
            sign(&x),
        ],
    );
    assert_eq!(
        answer_types(&a),
        [
            Some(SUCCESS),
            Some(EXTENSION_FAILURE),
            Some(FAILURE),
            Some(FAILURE)
        ]
    );

    // Malformed: truncated, trailing bytes, a flag of 2.
    let good = bind_signed(&key, &x, &x, 0);
    let mut trailing = good.clone();
    trailing.push(0);
    let mut flag = good.clone();
    *flag.last_mut().unwrap() = 2;
    for bad in [good[..good.len() - 1].to_vec(), trailing, flag] {
        let a = raw_as(&member, &d.socket, &[bad, sign(&x)]);
        assert_eq!(answer_types(&a), [Some(EXTENSION_FAILURE), Some(FAILURE)]);
    }

    // At most 16 bindings (forwarding ones chain).
    let mut steps: Vec<Vec<u8>> = (0..17u8)
        .map(|i| bind_signed(&key, &[i + 10; 32], &[i + 10; 32], 1))
        .collect();
    steps.push(vec![11]);
    let a = raw_as(&member, &d.socket, &steps);
    let types = answer_types(&a);
    assert!(types[..16].iter().all(|t| *t == Some(SUCCESS)), "{types:?}");
    assert_eq!(types[16], Some(EXTENSION_FAILURE));

    assert!(
        d.log_text().contains("reason=bad-session-bind"),
        "{}",
        d.log_text()
    );
    assert!(
        d.log_text().contains("session binding refused"),
        "{}",
        d.log_text()
    );
    assert_eq!(d.log_count("decision=granted"), 1, "{}", d.log_text());
    assert_eq!(env.agent.keys(), before);
}

#[test]
fn remote_users_admit_the_listed_account_and_refuse_others() {
    require_root!();
    let env = Env::new();
    let host = env.sshd("sshd-a", "ed25519", None);
    let stranger = TestUser::create("dr", &[]);
    host.authorize(&stranger.name, &[&env.pub_file("deploy")]);
    let d = env.daemon(&format!(
        "remote_users = [\"{}\", \"deploy\"]",
        env.account.name
    ));
    let before = env.agent.keys();

    let o = env.ssh(&d, &host, &env.account.name, &[], "id -un");
    assert!(o.status.success(), "{}\n{}", stderr(&o), d.log_text());
    let o = env.ssh(&d, &host, &stranger.name, &[], "id -un");
    assert!(!o.status.success(), "logged in as a remote user not listed");
    assert!(
        d.wait_log(&format!("remote_user={} dest=", stranger.name)),
        "{}",
        d.log_text()
    );
    assert!(d.log_text().contains("reason=remote-user-not-allowed"));

    // `deploy@` is admitted, `root@` refused, for clients that never bind too.
    let deploy = pubkey_blob(&env.pub_file("deploy"));
    let a = raw_as(
        &env.member.as_user(),
        &d.socket,
        &[
            sign_request(&deploy, &userauth(&deploy, &[3; 32], "deploy", None), 0),
            sign_request(&deploy, &userauth(&deploy, &[3; 32], "root", None), 0),
        ],
    );
    assert_eq!(answer_types(&a), [Some(SIGN_RESPONSE), Some(FAILURE)]);
    assert!(d.log_text().contains(
        "remote_user=root dest=- forwarded=no serial=- grant=- decision=refused reason=remote-user-not-allowed"
    ));
    assert_eq!(env.agent.keys(), before);
}

#[test]
fn a_huge_rsa_bind_flood_from_a_user_with_no_key_is_never_verified() {
    require_root!();
    let env = Env::new();
    let host = env.sshd("sshd-a", "ed25519", None);
    env.targets(&[&host.host_pub()], &[]);
    let d = env.daemon("destinations = \"targets\"");
    let before = env.agent.keys();
    // A 16384-bit RSA "host key" (not a real one: any modulus costs the
    // same to check) and a signature of the right length.
    let rsa_blob = |bytes: usize| {
        let mut n = vec![0xc5u8; bytes];
        n[0] = 0x7f;
        let mut b = string(b"ssh-rsa");
        b.extend(string(&[1, 0, 1]));
        b.extend(string(&n));
        b
    };
    let sig = [string(b"rsa-sha2-512"), string(&[0x11u8; 2048])].concat();
    // (Ten per connection: the raw client gets its script through the
    // environment, which caps one variable at 128 KiB.)
    for round in 0..4u8 {
        let flood: Vec<Vec<u8>> = (0..10u8)
            .map(|i| bind_raw(&rsa_blob(2048), &[round * 10 + i + 1; 32], &sig, 0))
            .collect();
        let a = raw_as(&env.outsider.as_user(), &d.socket, &flood);
        assert!(answer_types(&a)
            .iter()
            .all(|t| *t == Some(EXTENSION_FAILURE)));
    }
    assert_eq!(
        d.log_count(&format!(
            "session binding refused for uid={} pid=",
            env.outsider.uid()
        )),
        40
    );
    assert_eq!(
        d.log_count("the caller may use no key"),
        40,
        "{}",
        d.log_text()
    );

    // A member's oversized keys are refused without verifying; a 16384-bit
    // one is verified (and wrong), bounded per uid; the member still signs.
    let big = vec![
        bind_raw(&rsa_blob(2049), &[1; 32], &sig, 0),
        bind_raw(&rsa_blob(2048), &[2; 32], &sig, 0),
    ];
    let a = raw_as(&env.member.as_user(), &d.socket, &big);
    assert_eq!(
        answer_types(&a),
        [Some(EXTENSION_FAILURE), Some(EXTENSION_FAILURE)]
    );
    assert!(
        d.log_text().contains("RSA modulus larger than 16384 bits"),
        "{}",
        d.log_text()
    );
    assert!(d
        .log_text()
        .contains("bad signature over the session identifier"));
    let o = env.ssh(&d, &host, &env.account.name, &[], "id -un");
    assert!(o.status.success(), "{}\n{}", stderr(&o), d.log_text());
    assert_eq!(env.agent.keys(), before);
}

#[test]
fn check_config_reports_host_keys_and_cas_and_names_a_bad_line() {
    require_root!();
    let env = Env::new();
    let host = keygen(env.dir.path(), "h1", "ed25519", "");
    let host2 = keygen(env.dir.path(), "h2", "ecdsa", "");
    let ca = keygen(env.dir.path(), "ca", "ed25519", "");
    let _ = (host, host2, ca);
    env.targets(
        &[&env.dir.join("h1.pub"), &env.dir.join("h2.pub")],
        &[&env.dir.join("ca.pub")],
    );
    let config = env.dir.join("check.toml");
    let write = |rules: &str| {
        std::fs::write(
            &config,
            format!(
                "key_dir = \"{}\"\nrequire_encrypted = false\n\n[keys.deploy]\ngroups = [\"{}\"]\n{rules}\n",
                env.dir.path().display(),
                env.group.name
            ),
        )
        .unwrap()
    };
    write("destinations = \"targets\"\nremote_users = [\"deploy\"]");
    let check = || {
        keyholder(
            &As::Root,
            &["check-config", "--config", config.to_str().unwrap()],
        )
    };
    let o = check();
    let out = stdout(&o);
    assert!(o.status.success(), "{out}{}", stderr(&o));
    assert!(
        out.contains(&format!(
            "destinations: {}: 2 host key(s), 1 CA(s)",
            env.dir.join("targets").display()
        )),
        "{out}"
    );
    assert!(
        out.contains("remote_users: deploy") && out.contains("allow_forwarding: false"),
        "{out}"
    );

    // A user who may not read the file still loads the configuration (the
    // commands for everyone need it) and is told the file was not checked.
    std::fs::set_permissions(
        env.dir.join("targets"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let o = keyholder(
        &env.outsider.as_user(),
        &["check-config", "--config", config.to_str().unwrap()],
    );
    let out = stdout(&o);
    assert!(o.status.success(), "{out}{}", stderr(&o));
    assert!(
        out.contains("this user may not read it; run as root"),
        "{out}"
    );
    std::fs::set_permissions(
        env.dir.join("targets"),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();

    // A bad line: exit 1, naming the key, the file and the line.
    let mut text = read(&env.dir.join("targets"));
    text.push_str("web9 ssh-ed25519 AAAAnotakey\n");
    std::fs::write(env.dir.join("targets"), &text).unwrap();
    let o = check();
    assert_eq!(o.status.code(), Some(1));
    let all = format!("{}{}", stdout(&o), stderr(&o));
    let lines = text.lines().count();
    assert!(
        all.contains("keys.deploy.destinations") && all.contains(&format!("line {lines}")),
        "{all}"
    );
    // Writable by others: refused, saying so.
    std::fs::write(
        env.dir.join("targets"),
        format!("h {}", read(&env.dir.join("h1.pub"))),
    )
    .unwrap();
    std::fs::set_permissions(
        env.dir.join("targets"),
        std::os::unix::fs::PermissionsExt::from_mode(0o646),
    )
    .unwrap();
    let o = check();
    assert_eq!(o.status.code(), Some(1));
    let all = format!("{}{}", stdout(&o), stderr(&o));
    assert!(all.contains("writable by group or others"), "{all}");
}

/// A public key line of OpenSSH 10.5's `ssh-mldsa44-ed25519@openssh.com`
/// (a 1312-byte ML-DSA-44 key then a 32-byte Ed25519 key), as its
/// `ssh-keygen -t mldsa44-ed25519` writes it.
fn mldsa44_ed25519_line() -> String {
    let alg = b"ssh-mldsa44-ed25519@openssh.com";
    let blob = [string(alg), string(&[0x5a; 1312 + 32])].concat();
    format!(
        "ssh-mldsa44-ed25519@openssh.com {} host",
        openssl::base64::encode_block(&blob)
    )
}

#[test]
fn an_mldsa44_ed25519_host_key_is_refused_at_load_naming_file_line_and_algorithm() {
    require_root!();
    let env = Env::new();
    let host = env.sshd("sshd-a", "ed25519", None);
    env.targets(&[&host.host_pub()], &[]);
    let d = env.daemon("destinations = \"targets\"");
    let before = env.agent.keys();
    let targets = env.dir.join("targets");
    let good = read(&targets);
    let mut text = good.clone();
    text.push_str(&format!("pq1 {}\n", mldsa44_ed25519_line()));
    std::fs::write(&targets, &text).unwrap();
    let line = format!("line {}", text.lines().count());

    // check-config: exit 1, naming the key, the file, the line and the
    // algorithm.
    let o = keyholder(
        &As::Root,
        &["check-config", "--config", d.config.to_str().unwrap()],
    );
    assert_eq!(o.status.code(), Some(1));
    let all = format!("{}{}", stdout(&o), stderr(&o));
    for part in [
        "keys.deploy.destinations",
        targets.to_str().unwrap(),
        &line,
        "ssh-mldsa44-ed25519@openssh.com is not supported",
    ] {
        assert!(all.contains(part), "{part}: {all}");
    }

    // The daemon: the reload is refused with the same words; the last good
    // configuration stays in force (the listed host still works).
    d.signal(Signal::SIGHUP);
    assert!(d.wait_log("reload failed"), "{}", d.log_text());
    assert!(
        d.log_text()
            .contains("ssh-mldsa44-ed25519@openssh.com is not supported"),
        "{}",
        d.log_text()
    );
    let o = env.ssh(&d, &host, &env.account.name, &[], "id -un");
    assert!(o.status.success(), "{}\n{}", stderr(&o), d.log_text());

    // A `@cert-authority` of that algorithm: the same.
    let text = format!("{good}@cert-authority * {}\n", mldsa44_ed25519_line());
    std::fs::write(&targets, &text).unwrap();
    let o = keyholder(
        &As::Root,
        &["check-config", "--config", d.config.to_str().unwrap()],
    );
    assert_eq!(o.status.code(), Some(1));
    let all = format!("{}{}", stdout(&o), stderr(&o));
    assert!(
        all.contains(&format!("line {}", text.lines().count()))
            && all.contains("ssh-mldsa44-ed25519@openssh.com is not supported"),
        "{all}"
    );
    assert_eq!(env.agent.keys(), before);
}

/// An agent socket in front of the proxy that, on every connection, first
/// replays `bind` (a binding captured elsewhere) and then relays both ways:
/// what a hostile forwarding hop could do. Serves until the test ends.
fn replaying_socket(path: &Path, proxy: &Path, bind: Vec<u8>) {
    use std::io::{Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};
    let listener = UnixListener::bind(path).unwrap();
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let proxy = proxy.to_owned();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(mut client) = client else { return };
            let mut upstream = UnixStream::connect(&proxy).unwrap();
            let mut framed = (bind.len() as u32).to_be_bytes().to_vec();
            framed.extend(&bind);
            upstream.write_all(&framed).unwrap();
            let mut answer = [0u8; 5];
            upstream.read_exact(&mut answer).unwrap();
            assert_eq!(answer, [0, 0, 0, 1, SUCCESS]);
            let (mut c2, mut u2) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut u2, &mut c2);
                let _ = c2.shutdown(std::net::Shutdown::Both);
            });
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut client, &mut upstream);
                let _ = upstream.shutdown(std::net::Shutdown::Both);
            });
        }
    });
}

#[test]
fn dest_names_only_the_binding_the_signed_data_belongs_to() {
    require_root!();
    let env = Env::new();
    let host_a = env.sshd("sshd-a", "ed25519", None);
    let host_b = env.sshd("sshd-b", "ecdsa", None);
    host_b.authorize(&env.account.name, &[&env.pub_file("open")]);
    env.targets(&[&host_a.host_pub()], &[]);
    let d = env.daemon("destinations = \"targets\"");
    let before = env.agent.keys();
    let key_a = host_private(&host_a);
    let blob_a = enc(key_a.public_key().key_data());
    let blob_b = pubkey_blob(&host_b.host_pub());
    let open = pubkey_blob(&env.pub_file("open"));
    let (x, y) = ([1u8; 32], [2u8; 32]);
    let member = env.member.as_user();

    // A binding captured from host A (a real signature by A's host key over
    // A's session), replayed before a real login to host B with `open` (a
    // key without destinations): B accepts; the audit line names no host.
    let replay = env.dir.join("replay.sock");
    replaying_socket(&replay, &d.socket, bind_signed(&key_a, &x, &x, 0));
    let open_pub = env.pub_file("open");
    let o = host_b.ssh(
        &member,
        &replay,
        &env.account.name,
        &["-i", open_pub.to_str().unwrap(), "-o", "IdentitiesOnly=yes"],
        "id -un",
    );
    assert!(o.status.success(), "{}\n{}", stderr(&o), d.log_text());
    let line = sign_lines(&d).pop().unwrap();
    assert!(
        line.contains("key=open") && line.contains(" dest=- ") && line.contains("decision=granted"),
        "{line}"
    );
    assert!(!line.contains(&fingerprint(&host_a.host_pub())), "{line}");

    // Raw: bound to A for session x; a hostbound request for session x that
    // names B's host key: `open` signs, dest=-; `deploy` refuses.
    let a = raw_as(
        &member,
        &d.socket,
        &[
            bind_signed(&key_a, &x, &x, 0),
            sign_request(&open, &userauth(&open, &x, "x", Some(&blob_b)), 0),
            sign_request(&open, &userauth(&open, &y, "x", None), 0),
            sign_request(&open, &userauth(&open, &x, "x", Some(&blob_a)), 0),
        ],
    );
    assert_eq!(
        answer_types(&a),
        [
            Some(SUCCESS),
            Some(SIGN_RESPONSE),
            Some(SIGN_RESPONSE),
            Some(SIGN_RESPONSE)
        ]
    );
    let lines = sign_lines(&d);
    let last3: Vec<&String> = lines.iter().rev().take(3).rev().collect();
    let fp_a = fingerprint(&host_a.host_pub());
    // Hostbound mismatch, and another session: dest=-.
    assert!(last3[0].contains(" dest=- "), "{}", last3[0]);
    assert!(last3[1].contains(" dest=- "), "{}", last3[1]);
    // The data's session and host key are the binding's: dest names A.
    assert!(last3[2].contains(&format!(" dest={fp_a} ")), "{}", last3[2]);

    let deploy = pubkey_blob(&env.pub_file("deploy"));
    let a = raw_as(
        &member,
        &d.socket,
        &[
            bind_signed(&key_a, &x, &x, 0),
            sign_request(&deploy, &userauth(&deploy, &x, "x", Some(&blob_b)), 0),
        ],
    );
    assert_eq!(answer_types(&a), [Some(SUCCESS), Some(FAILURE)]);
    let line = sign_lines(&d).pop().unwrap();
    assert!(
        line.contains(" dest=- ") && line.contains("reason=destination-not-allowed"),
        "{line}"
    );
    assert_eq!(env.agent.keys(), before);
}
