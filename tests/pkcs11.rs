//! End-to-end tests of the PKCS#11 backend (`[agent] backend = "pkcs11"`)
//! on a real SoftHSM2 token: each test makes its own token directory and
//! `SOFTHSM2_CONF`, generates keys on the token with `pkcs11-tool` (opensc),
//! and drives the daemon with real `keyholder arm/disarm/status`, `ssh-add
//! -s/-e` on agent.socket, real users, and `ssh` to a real `sshd`. Every
//! refusal is asserted twice: the client's failure, and the token's objects
//! unchanged (`pkcs11-tool --list-objects`). No mock module.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use signature::Verifier;
use ssh_encoding::Decode;

raw_client_helper!();

const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
const PIN: &str = "1234";
const SO_PIN: &str = "5678";

/// A SoftHSM2 token of its own, in `dir/tokens`, labelled "kh".
struct Hsm {
    dir: TempDir,
    conf: PathBuf,
}

impl Hsm {
    fn new() -> Self {
        if !Path::new(MODULE).exists() {
            missing_tool("softhsm2 (/usr/lib/softhsm/libsofthsm2.so)");
        }
        let dir = TempDir::new("p11");
        let tokens = dir.join("tokens");
        std::fs::create_dir_all(&tokens).unwrap();
        let conf = dir.join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )
        .unwrap();
        let hsm = Self { dir, conf };
        let o = run(Command::new("softhsm2-util")
            .args([
                "--init-token",
                "--free",
                "--label",
                "kh",
                "--pin",
                PIN,
                "--so-pin",
                SO_PIN,
            ])
            .env("SOFTHSM2_CONF", &hsm.conf));
        assert!(o.status.success(), "softhsm2-util: {}", stderr(&o));
        hsm
    }

    fn tool(&self, args: &[&str]) -> Output {
        run(Command::new("pkcs11-tool")
            .args(["--module", MODULE])
            .args(args)
            .env("SOFTHSM2_CONF", &self.conf))
    }

    /// Generates a key pair on the token (`kind` as pkcs11-tool's
    /// --key-type: "EC:edwards25519", "rsa:3072", "EC:prime256v1").
    fn keypair(&self, label: &str, id: &str, kind: &str) {
        let o = self.tool(&[
            "--login",
            "--pin",
            PIN,
            "--keypairgen",
            "--key-type",
            kind,
            "--label",
            label,
            "--id",
            id,
        ]);
        assert!(
            o.status.success(),
            "pkcs11-tool --keypairgen: {}",
            stderr(&o)
        );
    }

    /// Every object on the token, as `pkcs11-tool --list-objects` prints
    /// them after a login (private objects included).
    fn objects(&self) -> String {
        let o = self.tool(&["--login", "--pin", PIN, "--list-objects"]);
        assert!(
            o.status.success(),
            "pkcs11-tool --list-objects: {}",
            stderr(&o)
        );
        let text = stdout(&o);
        assert!(text.contains("Object"), "{text}");
        text
    }

    /// The OpenSSH public key line of the token's key labelled `label`.
    fn public_line(&self, label: &str) -> String {
        // RSA and ECDSA: ssh-keygen reads them from the module.
        let o = run(Command::new("ssh-keygen")
            .args(["-D", MODULE])
            .env("SOFTHSM2_CONF", &self.conf));
        if let Some(line) = stdout(&o)
            .lines()
            .find(|l| l.split_whitespace().nth(2) == Some(label))
        {
            return line.to_owned();
        }
        // Ed25519 (which this ssh-keygen cannot read from a module): the
        // public object's CKA_EC_POINT.
        let o = self.tool(&["--list-objects", "--type", "pubkey"]);
        let text = stdout(&o);
        let mut point = None;
        let mut last_point = None;
        for line in text.lines() {
            let line = line.trim();
            if let Some(hexpt) = line.strip_prefix("EC_POINT:") {
                last_point = Some(hexpt.trim().to_owned());
            }
            if line.strip_prefix("label:").map(str::trim) == Some(label) {
                point = last_point.clone();
            }
            if line.ends_with("Object; EC_EDWARDS  EC_POINT 255 bits") || line.contains("Object;") {
                last_point = None;
            }
        }
        let point = unhex(&point.unwrap_or_else(|| panic!("no public key {label}: {text}")));
        assert_eq!(&point[..2], &[0x04, 0x20]);
        let key = ssh_key::PublicKey::new(
            ssh_key::public::KeyData::Ed25519(ssh_key::public::Ed25519PublicKey(
                point[2..].try_into().unwrap(),
            )),
            label,
        );
        key.to_openssh().unwrap()
    }

    /// Moves the token directory away (as a token pulled out) or back.
    fn remove(&self) {
        std::fs::rename(self.dir.join("tokens"), self.dir.join("tokens.away")).unwrap();
    }

    fn put_back(&self) {
        std::fs::rename(self.dir.join("tokens.away"), self.dir.join("tokens")).unwrap();
    }
}

/// A daemon with the PKCS#11 backend on `hsm`'s token, keys in `dir`, one
/// group and one user in it.
struct Setup {
    hsm: Hsm,
    dir: TempDir,
    daemon: Daemon,
    agent_socket: PathBuf,
    user: TestUser,
    _group: TestGroup,
}

impl Setup {
    /// `keys`: (key name, token label whose public key is NAME.pub — or
    /// `None` for a fresh ssh-keygen key the token does not have, extra TOML).
    fn start(hsm: Hsm, keys: &[(&str, Option<&str>, &str)]) -> Self {
        let group = TestGroup::create("p11g");
        let user = TestUser::create("p11u", &[&group]);
        let dir = TempDir::new("p11d");
        let mut tables = String::new();
        for (name, label, extra) in keys {
            let line = match label {
                Some(label) => hsm.public_line(label),
                None => {
                    keygen(dir.path(), &format!("{name}-other"), "ed25519", "");
                    std::fs::read_to_string(dir.join(&format!("{name}-other.pub"))).unwrap()
                }
            };
            let path = dir.join(&format!("{name}.pub"));
            std::fs::write(&path, format!("{}\n", line.trim())).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            tables.push_str(&format!(
                "[keys.{name}]\ngroups = [\"{}\"]\n{extra}\n\n",
                group.name
            ));
        }
        let agent_socket = dir.join("agent.sock");
        let body = format!(
            "socket = \"{}\"\nkey_dir = \"{}\"\nlog = \"stderr\"\n\n[agent]\nbackend = \"pkcs11\"\n\
             socket = \"{}\"\n\n[pkcs11]\nmodule = \"{MODULE}\"\ntoken_label = \"kh\"\nsessions = 2\n\n{tables}",
            dir.join("proxy.sock").display(),
            dir.path().display(),
            agent_socket.display()
        );
        let conf = hsm.conf.to_str().unwrap().to_owned();
        let daemon = Daemon::start_via_env(&dir, &body, &[], &[("SOFTHSM2_CONF", &conf)]);
        assert!(
            wait_for(Duration::from_secs(10), || {
                std::os::unix::net::UnixStream::connect(&agent_socket).is_ok()
            }),
            "{}",
            daemon.log_text()
        );
        Self {
            hsm,
            dir,
            daemon,
            agent_socket,
            user,
            _group: group,
        }
    }

    fn config(&self) -> String {
        self.daemon.config.display().to_string()
    }

    /// `keyholder arm --pin-file` (root) with `pin`.
    fn arm(&self, pin: &str) -> Output {
        let file = self.dir.join("pin");
        std::fs::write(&file, format!("{pin}\n")).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let file = file.display().to_string();
        run(Command::new(KEYHOLDER).args(["arm", "--config", &self.config(), "--pin-file", &file]))
    }

    fn keyholder(&self, who: &As, args: &[&str]) -> Output {
        let mut all = args.to_vec();
        let config = self.config();
        all.extend(["--config", &config]);
        keyholder(who, &all)
    }

    fn status(&self) -> (i32, String) {
        let o = self.keyholder(&self.user.as_user(), &["status"]);
        (o.status.code().unwrap_or(-1), stdout(&o))
    }

    /// `ssh-add ARGS` on agent.socket as root, the PIN from an askpass.
    fn ssh_add_admin(&self, args: &[&str], pin: &str) -> Output {
        let askpass = self.dir.join("askpass.sh");
        std::fs::write(&askpass, format!("#!/bin/sh\necho '{pin}'\n")).unwrap();
        std::fs::set_permissions(&askpass, std::fs::Permissions::from_mode(0o700)).unwrap();
        run(Command::new("ssh-add")
            .args(args)
            .env("SSH_AUTH_SOCK", &self.agent_socket)
            .env("SSH_ASKPASS", &askpass)
            .env("SSH_ASKPASS_REQUIRE", "force")
            .env("DISPLAY", ":0")
            .stdin(Stdio::null()))
    }

    fn blob(&self, name: &str) -> Vec<u8> {
        pubkey_blob(&self.dir.join(&format!("{name}.pub")))
    }

    fn public(&self, name: &str) -> ssh_key::PublicKey {
        ssh_key::PublicKey::read_openssh_file(&self.dir.join(&format!("{name}.pub"))).unwrap()
    }

    /// One sign request through the proxy as the user; the answer.
    fn sign(&self, name: &str, alg: &str, flags: u32) -> (Vec<u8>, Option<Vec<u8>>) {
        let blob = self.blob(name);
        let data = userauth_data(&blob, &self.user.name, alg);
        let answer = raw_as(
            &self.user.as_user(),
            &self.daemon.socket,
            &[sign_request(&blob, &data, flags)],
        );
        (data, answer.into_iter().next().flatten())
    }

    /// Signs and checks the signature against NAME.pub; returns its
    /// algorithm name.
    fn sign_ok(&self, name: &str, alg: &str, flags: u32) -> String {
        let (data, answer) = self.sign(name, alg, flags);
        let answer = answer.expect("an answer");
        assert_eq!(
            answer.first(),
            Some(&SIGN_RESPONSE),
            "{name} flags {flags}: {answer:?}\n{}",
            self.daemon.log_text()
        );
        let (sig, rest) = take_string(&answer[1..]).unwrap();
        assert!(rest.is_empty());
        let (alg_name, raw) = take_string(sig).unwrap();
        let alg_name = String::from_utf8(alg_name.to_vec()).unwrap();
        let public = self.public(name);
        if alg_name == "ssh-rsa" {
            // ssh-key decodes no SHA-1 signature: OpenSSL checks it.
            let (raw, rest) = take_string(raw).unwrap();
            assert!(rest.is_empty());
            verify_sha1(&public, &data, raw);
        } else {
            let signature = ssh_key::Signature::decode(&mut &sig[..]).unwrap();
            public.key_data().verify(&data, &signature).unwrap();
        }
        alg_name
    }

    fn sign_fails(&self, name: &str) -> bool {
        let (_, answer) = self.sign(name, "ssh-ed25519", 0);
        answer.as_deref() == Some(&[FAILURE][..])
    }
}

/// A SHA-1 `ssh-rsa` signature checked with OpenSSL (ssh-key does not do SHA-1).
fn verify_sha1(public: &ssh_key::PublicKey, data: &[u8], sig: &[u8]) {
    let ssh_key::public::KeyData::Rsa(rsa) = public.key_data() else {
        panic!("not RSA")
    };
    let key = openssl::rsa::Rsa::from_public_components(
        openssl::bn::BigNum::from_slice(rsa.n.as_positive_bytes().unwrap()).unwrap(),
        openssl::bn::BigNum::from_slice(rsa.e.as_positive_bytes().unwrap()).unwrap(),
    )
    .unwrap();
    let key = openssl::pkey::PKey::from_rsa(key).unwrap();
    let mut v = openssl::sign::Verifier::new(openssl::hash::MessageDigest::sha1(), &key).unwrap();
    assert!(
        v.verify_oneshot(sig, data).unwrap(),
        "SHA-1 signature does not verify"
    );
}

fn three_key_token() -> Hsm {
    let hsm = Hsm::new();
    hsm.keypair("ed", "01", "EC:edwards25519");
    hsm.keypair("rsa", "02", "rsa:3072");
    hsm.keypair("ec", "03", "EC:prime256v1");
    hsm
}

#[test]
fn logins_with_ed25519_rsa_and_ecdsa_token_keys_and_rsa_flags_as_asked() {
    require_root!();
    let s = Setup::start(
        three_key_token(),
        &[
            ("ed", Some("ed"), ""),
            ("deploy-rsa", Some("rsa"), "pkcs11_label = \"rsa\""),
            ("ec", Some("ec"), "pkcs11_id = \"03\""),
        ],
    );
    // Not armed yet: status says so, signs fail.
    assert_eq!(s.status().0, 2);
    let o = s.arm(PIN);
    assert!(
        o.status.success(),
        "{}\n{}",
        stdout(&o),
        s.daemon.log_text()
    );
    assert_eq!(stdout(&o).matches(": armed (").count(), 3, "{}", stdout(&o));
    let (code, text) = s.status();
    assert_eq!(code, 0, "{text}");

    let sshd = Sshd::start(&s.dir);
    let pubs: Vec<PathBuf> = ["ed", "deploy-rsa", "ec"]
        .iter()
        .map(|n| s.dir.join(&format!("{n}.pub")))
        .collect();
    sshd.authorize(
        &s.user.name,
        &pubs.iter().map(PathBuf::as_path).collect::<Vec<_>>(),
    );
    for p in &pubs {
        let id = p.display().to_string();
        let o = sshd.ssh(
            &s.user.as_user(),
            &s.daemon.socket,
            &s.user.name,
            &["-i", &id, "-o", "IdentitiesOnly=yes"],
            "echo logged-in",
        );
        assert!(
            stdout(&o).contains("logged-in"),
            "{id}: {}\n{}\n{}",
            stderr(&o),
            sshd.log_text(),
            s.daemon.log_text()
        );
    }

    // RSA flags 0/2/4 pick the hash; each signature checks against the .pub.
    for (flags, want) in [(0, "ssh-rsa"), (2, "rsa-sha2-256"), (4, "rsa-sha2-512")] {
        assert_eq!(s.sign_ok("deploy-rsa", "ssh-rsa", flags), want);
    }
    assert_eq!(s.sign_ok("ed", "ssh-ed25519", 4), "ssh-ed25519");
    assert_eq!(
        s.sign_ok("ec", "ecdsa-sha2-nistp256", 0),
        "ecdsa-sha2-nistp256"
    );
    let log = s.daemon.log_text();
    assert!(log.contains("decision=granted"), "{log}");
}

#[test]
fn ssh_add_s_and_e_on_agent_socket_arm_and_disarm() {
    require_root!();
    let s = Setup::start(three_key_token(), &[("ed", Some("ed"), "")]);
    let before = s.hsm.objects();

    // Another module's path: refused, nothing logged in.
    let o = s.ssh_add_admin(&["-s", "/usr/lib/x86_64-linux-gnu/libc.so.6"], PIN);
    assert!(!o.status.success(), "{}", stderr(&o));
    assert!(s.daemon.wait_log("refused to log in for module"));
    assert!(s.daemon.listed(&s.user.as_user()).is_empty());
    assert_eq!(s.hsm.objects(), before);

    let o = s.ssh_add_admin(&["-s", MODULE], PIN);
    assert!(o.status.success(), "{}{}", stderr(&o), s.daemon.log_text());
    assert_eq!(s.daemon.listed(&s.user.as_user()).len(), 1);
    assert_eq!(s.sign_ok("ed", "ssh-ed25519", 0), "ssh-ed25519");
    // agent.socket lists it for root too.
    let o = run(Command::new("ssh-add")
        .arg("-L")
        .env("SSH_AUTH_SOCK", &s.agent_socket));
    assert_eq!(key_lines(&o).len(), 1);

    let o = s.ssh_add_admin(&["-e", MODULE], "");
    assert!(o.status.success(), "{}{}", stderr(&o), s.daemon.log_text());
    assert!(s.daemon.listed(&s.user.as_user()).is_empty());
    assert!(s.sign_fails("ed"));
    assert_eq!(s.status().0, 2);
    assert_eq!(s.hsm.objects(), before);
}

#[test]
fn a_wrong_pin_is_one_line_tried_once_then_the_right_pin_works() {
    require_root!();
    let s = Setup::start(three_key_token(), &[("ed", Some("ed"), "")]);
    let before = s.hsm.objects();
    let o = s.arm("9999");
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert!(stdout(&o).contains("FAILED"), "{}", stdout(&o));
    assert!(s.daemon.wait_log("the PIN was refused"));
    // Let the monitor run a few rounds: it must never try the PIN again.
    std::thread::sleep(Duration::from_secs(3));
    let log = s.daemon.log_text();
    assert_eq!(s.daemon.log_count("CKR_PIN_INCORRECT"), 1, "{log}");
    let line = log
        .lines()
        .find(|l| l.contains("CKR_PIN_INCORRECT"))
        .unwrap();
    assert!(
        line.contains("token \"kh\"") && line.contains("retry state"),
        "{line}"
    );
    assert!(!log.contains(PIN) && !log.contains("9999"), "{log}");
    assert!(s.sign_fails("ed"));
    let (code, text) = s.status();
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("token \"kh\": the PIN was refused (CKR_PIN_INCORRECT"),
        "{text}"
    );
    assert!(stdout(&o).contains("the PIN was refused"), "{}", stdout(&o));
    assert_eq!(s.hsm.objects(), before);

    let o = s.arm(PIN);
    assert!(o.status.success(), "{}{}", stdout(&o), s.daemon.log_text());
    assert_eq!(s.sign_ok("ed", "ssh-ed25519", 0), "ssh-ed25519");
    assert_eq!(s.status().0, 0);
    // A second arm is idempotent.
    assert!(s.arm(PIN).status.success());
    assert_eq!(s.hsm.objects(), before);
}

#[test]
fn a_label_not_on_the_token_or_a_mismatch_is_named_and_the_others_work() {
    require_root!();
    let s = Setup::start(
        three_key_token(),
        &[
            ("ed", Some("ed"), ""),
            ("ghost", None, "pkcs11_label = \"nope\""),
            ("wrong", None, "pkcs11_label = \"rsa\""),
        ],
    );
    let before = s.hsm.objects();
    let o = s.arm(PIN);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    let out = stdout(&o);
    assert!(out.contains("ed: armed"), "{out}");
    assert!(
        out.contains("ghost: FAILED: no private key with CKA_LABEL \"nope\""),
        "{out}"
    );
    assert!(
        out.contains("wrong: FAILED: the private key with CKA_LABEL"),
        "{out}"
    );
    let log = s.daemon.log_text();
    assert!(
        log.contains("key ghost not armed: no private key with CKA_LABEL \"nope\" on token \"kh\""),
        "{log}"
    );
    // The mismatch names both fingerprints.
    let wrong = s
        .public("wrong")
        .fingerprint(ssh_key::HashAlg::Sha256)
        .to_string();
    let token_rsa = ssh_key::PublicKey::from_openssh(&s.hsm.public_line("rsa"))
        .unwrap()
        .fingerprint(ssh_key::HashAlg::Sha256)
        .to_string();
    let line = log
        .lines()
        .find(|l| l.contains("key wrong not armed"))
        .unwrap();
    assert!(line.contains(&wrong) && line.contains(&token_rsa), "{line}");

    assert_eq!(s.sign_ok("ed", "ssh-ed25519", 0), "ssh-ed25519");
    assert!(s.sign_fails("ghost"));
    assert!(s.sign_fails("wrong"));
    let (code, text) = s.status();
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("note: ghost: no private key with CKA_LABEL \"nope\""),
        "{text}"
    );
    assert!(
        text.contains("note: wrong: the private key with CKA_LABEL \"rsa\""),
        "{text}"
    );
    assert_eq!(s.hsm.objects(), before);
}

#[test]
fn a_token_removed_fails_signs_at_once_and_signs_again_when_back_without_rearming() {
    require_root!();
    let s = Setup::start(three_key_token(), &[("ed", Some("ed"), "")]);
    assert!(s.arm(PIN).status.success());
    assert_eq!(s.sign_ok("ed", "ssh-ed25519", 0), "ssh-ed25519");

    s.hsm.remove();
    let gone = Instant::now();
    assert!(
        wait_for(Duration::from_secs(15), || s.sign_fails("ed")),
        "{}",
        s.daemon.log_text()
    );
    eprintln!(
        "signs failed {:?} after the token was removed",
        gone.elapsed()
    );
    let (code, text) = s.status();
    assert_eq!(code, 2, "{text}");
    assert!(
        text.lines().next().unwrap().starts_with("CRITICAL")
            && text.contains("pkcs11: token \"kh\" is not present"),
        "{text}"
    );
    assert!(s.daemon.wait_log("token \"kh\" is gone"));
    assert!(s.daemon.wait_log("reason=upstream-error"));

    s.hsm.put_back();
    assert!(
        wait_for(Duration::from_secs(20), || !s.sign_fails("ed")),
        "{}",
        s.daemon.log_text()
    );
    assert!(s
        .daemon
        .log_text()
        .contains("is back; logged in again with the kept PIN"));
    assert_eq!(s.sign_ok("ed", "ssh-ed25519", 0), "ssh-ed25519");
    assert_eq!(s.status().0, 0);
}

#[test]
fn disarm_logs_out_and_forgets_the_pin() {
    require_root!();
    let s = Setup::start(three_key_token(), &[("ed", Some("ed"), "")]);
    assert!(s.arm(PIN).status.success());
    let before = s.hsm.objects();
    let o = s.keyholder(&As::Root, &["disarm"]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    assert!(s.daemon.wait_log("logged out; PIN forgotten"));
    assert!(s.daemon.listed(&s.user.as_user()).is_empty());
    assert!(s.sign_fails("ed"));
    assert_eq!(s.status().0, 2);
    // Gone and back: the PIN was forgotten, so no login without a human.
    s.hsm.remove();
    assert!(s.daemon.wait_log("is gone"));
    s.hsm.put_back();
    assert!(s.daemon.wait_log("no PIN kept"));
    assert!(s.sign_fails("ed"));
    assert_eq!(s.hsm.objects(), before);
    // Non-root cannot disarm.
    let o = s.keyholder(&s.user.as_user(), &["disarm"]);
    assert_eq!(o.status.code(), Some(1));
}

#[test]
fn a_module_that_is_not_pkcs11_is_one_clear_line_and_no_panic() {
    require_root!();
    let hsm = three_key_token();
    let before = hsm.objects();
    let dir = TempDir::new("p11m");
    let text = dir.join("not-a-module.so");
    std::fs::write(&text, "not a library\n").unwrap();
    let libz = std::fs::canonicalize("/lib/x86_64-linux-gnu/libz.so.1")
        .unwrap_or_else(|_| PathBuf::from("/usr/lib/x86_64-linux-gnu/libc.so.6"));
    for (module, want) in [
        (text.display().to_string(), "cannot load the PKCS#11 module"),
        (
            libz.display().to_string(),
            "not a PKCS#11 module (no C_GetFunctionList",
        ),
        (
            "/nonexistent/module.so".to_owned(),
            "cannot load the PKCS#11 module",
        ),
    ] {
        let line = hsm.public_line("ed");
        std::fs::write(dir.join("ed.pub"), format!("{line}\n")).unwrap();
        let config = dir.join("keyholder.toml");
        std::fs::write(
            &config,
            format!(
                "socket = \"{}\"\nkey_dir = \"{}\"\nlog = \"stderr\"\n[agent]\nbackend = \"pkcs11\"\n\
                 socket = \"{}\"\n[pkcs11]\nmodule = \"{module}\"\ntoken_label = \"kh\"\n\
                 [keys.ed]\ngroups = [\"root\"]\n",
                dir.join("proxy.sock").display(),
                dir.path().display(),
                dir.join("agent.sock").display()
            ),
        )
        .unwrap();
        let o = run(Command::new("timeout")
            .args(["30", KEYHOLDER, "daemon", "--log", "stderr", "--config"])
            .arg(&config)
            .env("SOFTHSM2_CONF", &hsm.conf)
            .stdin(Stdio::null()));
        assert_eq!(o.status.code(), Some(1), "{module}: {}", stderr(&o));
        let err = stderr(&o);
        assert!(!err.contains("panicked"), "{err}");
        let lines: Vec<&str> = err.lines().filter(|l| l.contains(want)).collect();
        assert_eq!(lines.len(), 1, "{module}: {err}");
        assert!(!dir.join("agent.sock").exists() && !dir.join("proxy.sock").exists());
    }
    assert_eq!(hsm.objects(), before);
}

#[test]
fn check_config_as_root_checks_the_token_and_warns_about_an_extractable_key() {
    require_root!();
    let hsm = three_key_token();
    let o = hsm.tool(&[
        "--login",
        "--pin",
        PIN,
        "--keypairgen",
        "--key-type",
        "EC:prime256v1",
        "--label",
        "loose",
        "--id",
        "09",
        "--extractable",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let s = Setup::start(hsm, &[("ed", Some("ed"), ""), ("loose", Some("loose"), "")]);
    let before = s.hsm.objects();
    let creds = s.dir.join("creds");
    std::fs::create_dir_all(&creds).unwrap();
    std::fs::write(creds.join("keyholder-pin"), format!("{PIN}\n")).unwrap();
    std::fs::set_permissions(
        creds.join("keyholder-pin"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let config = s.config();
    let o = run(Command::new(KEYHOLDER)
        .args(["check-config", "--config", &config])
        .env("SOFTHSM2_CONF", &s.hsm.conf)
        .env("CREDENTIALS_DIRECTORY", &creds)
        .stdin(Stdio::null()));
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{out}{}", stderr(&o));
    assert!(out.contains("pkcs11: keys.ed: found on the token"), "{out}");
    let warning = out
        .lines()
        .find(|l| l.starts_with("warning: pkcs11: keys.loose"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(warning.contains("extractable"), "{warning}");
    assert!(
        !out.lines()
            .any(|l| l.contains("keys.ed") && l.starts_with("warning")),
        "{out}"
    );
    // Anyone else: a note, no token access.
    let o = s.keyholder(&s.user.as_user(), &["check-config"]);
    assert!(
        stdout(&o).contains("run check-config as root"),
        "{}",
        stdout(&o)
    );
    assert_eq!(s.hsm.objects(), before);
    // The daemon warns too once armed, and status carries it.
    assert!(s.arm(PIN).status.success());
    let (code, text) = s.status();
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("note: loose: warning:"), "{text}");
}

/// A process this test started, stopped when dropped: a child (killed and
/// waited for), or a daemon that forked away (signalled by its pid).
enum Killed {
    Child(std::process::Child),
    Pid(u32),
}

impl Drop for Killed {
    fn drop(&mut self) {
        match self {
            Self::Child(child) => {
                let _ = child.kill();
                let _ = child.wait();
            }
            Self::Pid(pid) => {
                let pid = nix::unistd::Pid::from_raw(*pid as i32);
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            }
        }
    }
}

const TPM2_MODULE: &str = "/usr/lib/x86_64-linux-gnu/pkcs11/libtpm2_pkcs11.so";

#[test]
fn a_tpm_key_through_tpm2_pkcs11_on_swtpm_signs_a_login() {
    require_root!();
    let have = |p: &str| {
        Path::new(p).exists()
            || run(Command::new("sh").args(["-c", &format!("command -v {p}")]))
                .status
                .success()
    };
    let missing: Vec<&str> = [
        "swtpm",
        "tpm2-abrmd",
        "dbus-daemon",
        "tpm2_ptool",
        "tpm2_getrandom",
        TPM2_MODULE,
    ]
    .into_iter()
    .filter(|p| !have(p) && !Path::new(&format!("/usr/sbin/{p}")).exists())
    .collect();
    if !missing.is_empty() {
        eprintln!(
            "\n*** SKIPPED {}:{}: the TPM test needs {} (apt-get install swtpm tpm2-abrmd dbus \
             tpm2-tools libtpm2-pkcs11-1 libtpm2-pkcs11-tools libtss2-tcti-swtpm0 \
             libtss2-tcti-tabrmd0) ***\n",
            file!(),
            line!(),
            missing.join(", ")
        );
        return;
    }
    let dir = TempDir::new("tpm");
    let state = dir.join("state");
    let store = dir.join("store");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::create_dir_all(&store).unwrap();
    // The swtpm TCTI finds the control channel at the next port.
    let (port, ctrl) = (0..100)
        .map(|_| free_port())
        .find(|&p| p < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok())
        .map(|p| (p, p + 1))
        .unwrap();
    let swtpm = spawn(
        Command::new("swtpm")
            .args([
                "socket",
                "--tpm2",
                "--flags",
                "not-need-init,startup-clear",
                "--tpmstate",
            ])
            .arg(format!("dir={}", state.display()))
            .arg("--server")
            .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
            .arg("--ctrl")
            .arg(format!("type=tcp,port={ctrl},bindaddr=127.0.0.1"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let _swtpm = Killed::Child(swtpm);
    // A session bus of its own for the TPM resource manager (without one,
    // tpm2-pkcs11's tools run out of TPM object slots).
    let o = run(Command::new("dbus-daemon").args([
        "--session",
        "--fork",
        "--print-address=1",
        "--print-pid=1",
    ]));
    assert!(o.status.success(), "dbus-daemon: {}", stderr(&o));
    let out = stdout(&o);
    let mut lines = out.lines();
    let bus = lines.next().unwrap().to_owned();
    let _dbus = Killed::Pid(lines.next().unwrap().trim().parse().unwrap());
    assert!(wait_for(Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    }));
    let abrmd = spawn(
        Command::new("tpm2-abrmd")
            .args(["--session", "--allow-root"])
            .arg(format!("--tcti=swtpm:host=127.0.0.1,port={port}"))
            .env("DBUS_SESSION_BUS_ADDRESS", &bus)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("abrmd.log")).unwrap()),
    );
    let _abrmd = Killed::Child(abrmd);
    let tcti = "tabrmd:bus_type=session";
    let env = [
        ("DBUS_SESSION_BUS_ADDRESS", bus.as_str()),
        ("TPM2TOOLS_TCTI", tcti),
        ("TPM2_PKCS11_TCTI", tcti),
        ("TPM2_PKCS11_STORE", store.to_str().unwrap()),
    ];
    let tool = |args: &[&str]| {
        let o = run(Command::new(args[0]).args(&args[1..]).envs(env));
        assert!(o.status.success(), "{args:?}: {}{}", stdout(&o), stderr(&o));
        o
    };
    let answers = || {
        run(Command::new("tpm2_getrandom").arg("4").envs(env))
            .status
            .success()
    };
    assert!(
        wait_for(Duration::from_secs(15), answers),
        "the TPM resource manager did not answer: {}",
        std::fs::read_to_string(dir.join("abrmd.log")).unwrap_or_default()
    );
    let path = store.display().to_string();
    tool(&["tpm2_ptool", "init", "--path", &path]);
    tool(&[
        "tpm2_ptool",
        "addtoken",
        "--path",
        &path,
        "--pid",
        "1",
        "--label",
        "tpm",
        "--userpin",
        PIN,
        "--sopin",
        SO_PIN,
    ]);
    tool(&[
        "tpm2_ptool",
        "addkey",
        "--path",
        &path,
        "--label",
        "tpm",
        "--key-label",
        "deploy",
        "--userpin",
        PIN,
        "--algorithm",
        "ecc256",
    ]);
    let o = tool(&["ssh-keygen", "-D", TPM2_MODULE]);
    let line = stdout(&o)
        .lines()
        .find(|l| l.split_whitespace().nth(2) == Some("deploy"))
        .unwrap_or_else(|| panic!("{}", stdout(&o)))
        .to_owned();
    std::fs::write(dir.join("deploy.pub"), format!("{line}\n")).unwrap();

    let group = TestGroup::create("tpmg");
    let user = TestUser::create("tpmu", &[&group]);
    let agent_socket = dir.join("agent.sock");
    let body = format!(
        "socket = \"{}\"\nkey_dir = \"{}\"\nlog = \"stderr\"\n[agent]\nbackend = \"pkcs11\"\n\
         socket = \"{}\"\n[pkcs11]\nmodule = \"{TPM2_MODULE}\"\ntoken_label = \"tpm\"\nsessions = 1\n\
         [keys.deploy]\ngroups = [\"{}\"]\n",
        dir.join("proxy.sock").display(),
        dir.path().display(),
        agent_socket.display(),
        group.name
    );
    let daemon = Daemon::start_via_env(&dir, &body, &[], &env);
    assert!(wait_for(Duration::from_secs(10), || {
        std::os::unix::net::UnixStream::connect(&agent_socket).is_ok()
    }));
    let pin = dir.join("pin");
    std::fs::write(&pin, format!("{PIN}\n")).unwrap();
    std::fs::set_permissions(&pin, std::fs::Permissions::from_mode(0o600)).unwrap();
    let config = daemon.config.display().to_string();
    let o = run(Command::new(KEYHOLDER).args([
        "arm",
        "--config",
        &config,
        "--pin-file",
        pin.to_str().unwrap(),
    ]));
    assert!(o.status.success(), "{}{}", stdout(&o), daemon.log_text());

    let sshd = Sshd::start(&dir);
    sshd.authorize(&user.name, &[&dir.join("deploy.pub")]);
    let id = dir.join("deploy.pub").display().to_string();
    let o = sshd.ssh(
        &user.as_user(),
        &daemon.socket,
        &user.name,
        &["-i", &id, "-o", "IdentitiesOnly=yes"],
        "echo logged-in-with-the-tpm",
    );
    assert!(
        stdout(&o).contains("logged-in-with-the-tpm"),
        "{}\n{}",
        stderr(&o),
        daemon.log_text()
    );
}

#[test]
fn a_token_pulled_in_the_middle_of_a_burst_fails_requests_and_never_relays_a_bad_signature() {
    require_root!();
    let s = Setup::start(three_key_token(), &[("ed", Some("ed"), "")]);
    assert!(s.arm(PIN).status.success());
    let blob = s.blob("ed");
    let data = userauth_data(&blob, &s.user.name, "ssh-ed25519");
    let request = sign_request(&blob, &data, 0);
    let public = s.public("ed");
    // Clients keep signing (30 requests per connection, connection after
    // connection) until a second after the token is pulled.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let answers: Vec<Option<Vec<u8>>> = std::thread::scope(|scope| {
        let clients: Vec<_> = (0..4)
            .map(|_| {
                let messages = vec![request.clone(); 30];
                let who = s.user.as_user();
                let socket = s.daemon.socket.clone();
                let stop = &stop;
                scope.spawn(move || {
                    let mut all = Vec::new();
                    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                        all.extend(raw_as(&who, &socket, &messages));
                    }
                    all
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(500));
        s.hsm.remove();
        std::thread::sleep(Duration::from_secs(1));
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        clients
            .into_iter()
            .flat_map(|c| c.join().unwrap())
            .collect()
    });
    let (mut signed, mut failed) = (0, 0);
    for answer in &answers {
        let answer = answer.as_ref().expect("the connection stays open");
        match answer.first() {
            Some(&SIGN_RESPONSE) => {
                let (sig, _) = take_string(&answer[1..]).unwrap();
                let sig = ssh_key::Signature::decode(&mut &sig[..]).unwrap();
                public.key_data().verify(&data, &sig).unwrap();
                signed += 1;
            }
            Some(&FAILURE) => failed += 1,
            other => panic!("unexpected answer {other:?}"),
        }
    }
    eprintln!("{signed} signed (each verified), {failed} failed");
    assert!(failed > 0, "the token was pulled: some requests must fail");
    assert!(
        signed > 0,
        "the token was there at first: some requests must be signed"
    );
    assert!(!s.daemon.log_text().contains("panicked"));
    s.hsm.put_back();
    assert!(
        wait_for(Duration::from_secs(20), || !s.sign_fails("ed")),
        "{}",
        s.daemon.log_text()
    );
}
