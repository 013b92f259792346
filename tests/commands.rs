//! End-to-end tests of the admin and monitoring commands (`arm`, `disarm`,
//! `status`, `list`, `check-config`) against a real daemon that spawns a
//! real OpenSSH `ssh-agent` (`agent.spawn = true`), with keys made by
//! `ssh-keygen` with passphrases, throwaway users and groups, and a real
//! `sshd`. Every refusal is checked twice: the command said so, and the
//! upstream agent is unchanged (`ssh-add -L` on its socket, as root).
//!
//! `arm` always runs in a new session without a controlling terminal
//! (`setsid -w`), so that it never prompts on the terminal of whoever runs
//! the tests; the terminal dialogue has its own test on a pseudo-terminal.

mod common;

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;

/// `(name, kind, passphrase)`; an empty passphrase makes an unencrypted key.
type KeySpec<'a> = (&'a str, &'a str, &'a str);

/// A deployment host in miniature: `dir/keys` holds the key files (none
/// added), all usable by `group`; the daemon runs with `top` (top-level
/// TOML) and `extra` (more tables) in its configuration, its keys held by
/// a spawned ssh-agent (upstream) or the daemon itself (builtin), either
/// way at `dir/agent.sock`.
fn site(backend: Backend, keys: &[KeySpec], group: &str, top: &str, extra: &str) -> Site {
    let mut site = Site::builder("c", backend)
        .spawned_agent()
        .key_subdir("keys")
        .unadded()
        .top(top)
        .extra(extra);
    for (name, kind, passphrase) in keys {
        site = site.key(
            SiteKey::new(name, kind)
                .passphrase(passphrase)
                .groups(&[group]),
        );
    }
    site.build()
}

/// The admin commands on a site.
trait Commands {
    /// Writes a 0600 passphrase file and returns its path.
    fn passphrase_file(&self, tag: &str, content: &str) -> PathBuf;

    /// `keyholder --config C ARGS` as `who`.
    fn kh(&self, who: &As, args: &[&str]) -> Output;

    /// `keyholder arm` as root, without a controlling terminal, with `env`
    /// (and without any inherited `CREDENTIALS_DIRECTORY`).
    fn arm_env(&self, args: &[&str], env: &[(&str, &Path)]) -> Output;

    fn arm(&self, args: &[&str]) -> Output;

    fn arm_with(&self, passphrase_file: &Path) -> Output;

    /// `keyholder status` as `who`: (exit code, stdout).
    fn status(&self, who: &As) -> (i32, String);

    fn status_json(&self, who: &As) -> (i32, serde_json::Value);

    /// The pid of the agent the daemon started last (from its log).
    fn agent_pid(&self) -> i32;
}

impl Commands for Site {
    /// Writes a 0600 passphrase file and returns its path.
    fn passphrase_file(&self, tag: &str, content: &str) -> PathBuf {
        let path = self.dir.join(&format!("pass-{tag}"));
        std::fs::write(&path, content).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        path
    }

    /// `keyholder --config C ARGS` as `who`.
    fn kh(&self, who: &As, args: &[&str]) -> Output {
        let mut all = vec!["--config", self.config()];
        all.extend_from_slice(args);
        keyholder(who, &all)
    }

    /// `keyholder arm` as root, without a controlling terminal, with `env`
    /// (and without any inherited `CREDENTIALS_DIRECTORY`).
    fn arm_env(&self, args: &[&str], env: &[(&str, &Path)]) -> Output {
        let mut c = Command::new("setsid");
        c.args(["-w", KEYHOLDER, "--config", self.config(), "arm"])
            .args(args)
            .env_remove("CREDENTIALS_DIRECTORY");
        for (k, v) in env {
            c.env(k, v);
        }
        run(&mut c)
    }

    fn arm(&self, args: &[&str]) -> Output {
        self.arm_env(args, &[])
    }

    fn arm_with(&self, passphrase_file: &Path) -> Output {
        self.arm(&["--passphrase-file", passphrase_file.to_str().unwrap()])
    }

    /// `keyholder status` as `who`: (exit code, stdout).
    fn status(&self, who: &As) -> (i32, String) {
        let o = self.kh(who, &["status"]);
        (o.status.code().unwrap_or(-1), stdout(&o))
    }

    fn status_json(&self, who: &As) -> (i32, serde_json::Value) {
        let o = self.kh(who, &["status", "--json"]);
        let v = serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|e| panic!("status --json: {e}: {}", stdout(&o)));
        (o.status.code().unwrap_or(-1), v)
    }

    /// The pid of the agent the daemon started last (from its log).
    fn agent_pid(&self) -> i32 {
        let log = self.daemon().log_text();
        let line = log
            .lines()
            .rev()
            .find(|l| l.contains("upstream agent") && l.contains("(pid "))
            .unwrap_or_else(|| panic!("no agent pid in log:\n{log}"));
        let rest = line.split("(pid ").nth(1).unwrap();
        rest.split(')').next().unwrap().parse().unwrap()
    }
}

fn both(o: &Output) -> String {
    format!("{}{}", stdout(o), stderr(o))
}

/// A group name no test creates: for sites whose keys no user needs.
const NO_GROUP: &str = "kht-nobody-group";

#[test]
fn wrong_passphrase_loads_nothing_and_says_so() {
    require_root!();
    each_backend(|backend| {
        let s = site(
            backend,
            &[("deploy", "ed25519", "right one")],
            NO_GROUP,
            "",
            "",
        );
        let wrong = s.passphrase_file("wrong", "wrong one\n");
        let o = s.arm_with(&wrong);
        assert_eq!(o.status.code(), Some(1), "{}", both(&o));
        let out = stdout(&o);
        assert!(
            out.contains("deploy: FAILED: wrong passphrase"),
            "{}",
            both(&o)
        );
        assert!(out.contains("not armed: deploy"), "{out}");
        assert!(s.held().is_empty(), "agent changed: {:?}", s.held());
        assert_eq!(s.status(&As::Root).0, 2);

        // the passphrase is the first line, with its line ending stripped
        let right = s.passphrase_file("right", "right one\r\nsecond line\n");
        let o = s.arm_with(&right);
        assert_eq!(o.status.code(), Some(0), "{}", both(&o));
        assert_eq!(s.held(), s.expect(&["deploy"]));
    });
}

#[test]
fn unencrypted_keys_are_refused_when_required_and_accepted_when_not() {
    require_root!();
    each_backend(|backend| {
        let s = site(backend, &[("plain", "ecdsa", "")], NO_GROUP, "", "");
        let path = s.key("plain");
        let o = s.arm(&[]);
        assert_eq!(o.status.code(), Some(1), "{}", both(&o));
        let out = stdout(&o);
        assert!(out.contains("plain: FAILED"), "{out}");
        assert!(out.contains(path.to_str().unwrap()), "{out}");
        assert!(out.contains("not encrypted"), "{out}");
        assert!(out.contains("require_encrypted = true"), "{out}");
        assert!(s.held().is_empty(), "agent changed: {:?}", s.held());
        let o = s.kh(&As::Root, &["check-config"]);
        assert_eq!(o.status.code(), Some(1), "{}", both(&o));
        assert!(stdout(&o).contains("not encrypted"), "{}", both(&o));

        // the same key, with require_encrypted = false: no passphrase needed
        let body = s.config_with("require_encrypted = false", "");
        std::fs::write(&s.daemon().config, body).unwrap();
        let o = s.kh(&As::Root, &["check-config"]);
        assert_eq!(o.status.code(), Some(0), "{}", both(&o));
        let o = s.arm(&[]);
        assert_eq!(o.status.code(), Some(0), "{}", both(&o));
        assert!(stdout(&o).contains("plain: armed (SHA256:"), "{}", both(&o));
        assert_eq!(s.held(), s.expect(&["plain"]));
    });
}

#[test]
fn unsafe_key_files_are_refused_naming_the_file() {
    require_root!();
    each_backend(|backend| {
        let s = site(
            backend,
            &[("deploy", "ed25519", "pw"), ("other", "ed25519", "pw")],
            NO_GROUP,
            "",
            "",
        );
        let pass = s.passphrase_file("pw", "pw\n");
        let deploy = s.key("deploy");
        let file = deploy.to_str().unwrap();

        // mode 0644
        std::fs::set_permissions(&deploy, std::fs::Permissions::from_mode(0o644)).unwrap();
        let o = s.arm_with(&pass);
        assert_eq!(o.status.code(), Some(1), "{}", both(&o));
        let expected = format!("{file}: permissions 0644 are too open");
        assert!(stdout(&o).contains(&expected), "{}", both(&o));
        assert!(stdout(&o).contains("deploy: FAILED"), "{}", both(&o));
        // the other key is not held back by it
        assert_eq!(s.held(), s.expect(&["other"]));
        let o = s.kh(&As::Root, &["check-config"]);
        assert_eq!(o.status.code(), Some(1), "{}", both(&o));
        assert!(stdout(&o).contains(&expected), "{}", both(&o));
        assert!(stdout(&o).contains("keys.deploy"), "{}", both(&o));

        // 0640: group bits are enough to refuse
        std::fs::set_permissions(&deploy, std::fs::Permissions::from_mode(0o640)).unwrap();
        let o = s.arm_with(&pass);
        assert_eq!(o.status.code(), Some(1), "{}", both(&o));
        assert!(
            stdout(&o).contains(&format!("{file}: permissions 0640 are too open")),
            "{}",
            both(&o)
        );

        // 0600 but not owned by root
        std::fs::set_permissions(&deploy, std::fs::Permissions::from_mode(0o600)).unwrap();
        nix::unistd::chown(&deploy, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
        let o = s.arm_with(&pass);
        assert_eq!(o.status.code(), Some(1), "{}", both(&o));
        assert!(
            stdout(&o).contains(&format!("{file}: owned by uid 65534, not root")),
            "{}",
            both(&o)
        );
        assert_eq!(s.held(), s.expect(&["other"]));

        // a private key that is not the configured one
        nix::unistd::chown(&deploy, Some(nix::unistd::Uid::from_raw(0)), None).unwrap();
        let stranger = keygen(s.dir.path(), "stranger", "ed25519", "pw");
        std::fs::copy(&stranger, &deploy).unwrap();
        let o = s.arm_with(&pass);
        assert_eq!(o.status.code(), Some(1), "{}", both(&o));
        let out = stdout(&o);
        assert!(out.contains(file), "{out}");
        assert!(out.contains(&s.fingerprint("deploy")), "{out}");
        assert!(
            out.contains(s.pub_path("deploy").to_str().unwrap()),
            "{out}"
        );
        let o = run(Command::new("ssh-keygen")
            .args(["-l", "-E", "sha256", "-f"])
            .arg(s.dir.join("stranger.pub")));
        let stranger_fp = stdout(&o).split_whitespace().nth(1).unwrap().to_owned();
        assert!(out.contains(&stranger_fp), "{out}");
        assert_eq!(s.held(), s.expect(&["other"]));

        // missing
        std::fs::remove_file(&deploy).unwrap();
        let o = s.arm_with(&pass);
        assert_eq!(o.status.code(), Some(1), "{}", both(&o));
        assert!(
            stdout(&o).contains(&format!("{file} does not exist")),
            "{}",
            both(&o)
        );
        assert_eq!(s.held(), s.expect(&["other"]));
    });
}

#[test]
fn status_goes_critical_warning_ok_critical_and_is_the_same_for_everyone() {
    require_root!();
    each_backend(|backend| {
        let group = TestGroup::create("st");
        let member = TestUser::create("st", &[&group]);
        let outsider = TestUser::create("so", &[]);
        let s = site(
            backend,
            &[("deploy", "ed25519", "alpha"), ("phab", "rsa", "beta")],
            &group.name,
            "",
            "",
        );
        let users = [As::Root, member.as_user(), outsider.as_user()];
        let same_for_everyone = |expected_code: i32| -> String {
            let (code, text) = s.status(&As::Root);
            assert_eq!(code, expected_code, "{text}");
            for who in &users {
                assert_eq!(s.status(who), (code, text.clone()), "{who:?}");
            }
            text
        };

        // nothing armed
        let text = same_for_everyone(2);
        assert!(text.starts_with("CRITICAL: 0/2 keys armed"), "{text}");
        assert!(text.contains(&s.fingerprint("deploy")), "{text}");

        // partial: the passphrase file opens deploy only
        let alpha = s.passphrase_file("alpha", "alpha\n");
        let o = s.arm_with(&alpha);
        assert_eq!(o.status.code(), Some(1), "{}", both(&o));
        let out = stdout(&o);
        assert!(
            out.contains(&format!("deploy: armed ({})", s.fingerprint("deploy"))),
            "{out}"
        );
        assert!(out.contains("phab: FAILED: wrong passphrase"), "{out}");
        assert_eq!(s.held(), s.expect(&["deploy"]));
        let text = same_for_everyone(1);
        assert!(
            text.starts_with("WARNING: 1/2 keys armed (unarmed: phab)"),
            "{text}"
        );
        let (code, json) = s.status_json(&member.as_user());
        assert_eq!(code, 1);
        assert_eq!(json["status"], "WARNING");
        assert_eq!(json["code"], 1);
        assert_eq!(json["armed"], 1);
        assert_eq!(json["total"], 2);
        assert_eq!(json["daemon_reachable"], true);
        assert_eq!(json["upstream_reachable"], true);
        assert_eq!(json["keys"][0]["name"], "deploy");
        assert_eq!(json["keys"][0]["armed"], true);
        assert_eq!(json["keys"][0]["fingerprint"], s.fingerprint("deploy"));
        assert_eq!(json["keys"][1]["name"], "phab");
        assert_eq!(json["keys"][1]["armed"], false);

        // full (RSA too); deploy needs no passphrase any more
        let beta = s.passphrase_file("beta", "beta");
        let o = s.arm_with(&beta);
        assert_eq!(o.status.code(), Some(0), "{}", both(&o));
        assert!(stdout(&o).contains("deploy: already armed"), "{}", both(&o));
        assert!(stdout(&o).contains("phab: armed (SHA256:"), "{}", both(&o));
        assert_eq!(s.held(), s.expect(&["deploy", "phab"]));
        let text = same_for_everyone(0);
        assert!(text.starts_with("OK: 2/2 keys armed\n"), "{text}");
        let (code, json) = s.status_json(&outsider.as_user());
        assert_eq!((code, json["status"].as_str()), (0, Some("OK")));
        assert_eq!(json["message"], "OK: 2/2 keys armed");

        // idempotent: nothing to decrypt, so no passphrase source is needed
        let o = s.arm(&[]);
        assert_eq!(o.status.code(), Some(0), "{}", both(&o));
        assert!(stdout(&o).contains("deploy: already armed"), "{}", both(&o));
        assert!(stdout(&o).contains("phab: already armed"), "{}", both(&o));
        assert_eq!(s.held(), s.expect(&["deploy", "phab"]));

        // non-root arm and disarm: one line, exit 1, agent unchanged
        for who in [member.as_user(), outsider.as_user()] {
            for cmd in [
                vec!["arm", "--passphrase-file", beta.to_str().unwrap()],
                vec!["disarm"],
            ] {
                let o = s.kh(&who, &cmd);
                assert_eq!(o.status.code(), Some(1), "{who:?} {cmd:?}: {}", both(&o));
                let err = stderr(&o);
                assert_eq!(err.lines().count(), 1, "{err}");
                assert!(err.contains("must be run as root"), "{err}");
                assert!(stdout(&o).is_empty(), "{}", stdout(&o));
                assert_eq!(s.held(), s.expect(&["deploy", "phab"]));
            }
        }

        // disarm
        let o = s.kh(&As::Root, &["disarm"]);
        assert_eq!(o.status.code(), Some(0), "{}", both(&o));
        assert!(stdout(&o).contains("removed 2 identities"), "{}", both(&o));
        assert!(s.held().is_empty());
        let text = same_for_everyone(2);
        assert!(text.starts_with("CRITICAL: 0/2 keys armed"), "{text}");
    });
}

#[test]
fn status_is_critical_when_the_upstream_agent_dies_or_the_daemon_is_gone() {
    require_root!();
    let mut s = site(
        Backend::Upstream,
        &[("ec", "ecdsa", "pw")],
        NO_GROUP,
        "",
        "",
    );
    let pass = s.passphrase_file("pw", "pw\n");
    let o = s.arm_with(&pass);
    assert_eq!(o.status.code(), Some(0), "{}", both(&o));
    assert_eq!(s.status(&As::Root).0, 0);

    let pid = s.agent_pid();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    assert!(
        s.daemon().wait_log("upstream agent exited"),
        "{}",
        s.daemon().log_text()
    );
    assert!(
        s.daemon().wait_log("upstream agent restarted"),
        "{}",
        s.daemon().log_text()
    );
    let (code, text) = s.status(&As::Root);
    assert_eq!(code, 2, "{text}");
    assert!(text.starts_with("CRITICAL: 0/1 keys armed"), "{text}");
    assert!(s.held().is_empty());
    // and arming again brings it back
    let o = s.arm_with(&pass);
    assert_eq!(o.status.code(), Some(0), "{}", both(&o));
    assert_eq!(s.status(&As::Root).0, 0);

    // the daemon is gone: CRITICAL, within the deadline, as text and JSON
    s.daemon_mut().stop();
    let started = Instant::now();
    let (code, text) = s.status(&As::Root);
    assert_eq!(code, 2, "{text}");
    let socket = s.dir.join("proxy.sock");
    assert!(
        text.starts_with(&format!(
            "CRITICAL: daemon unreachable at {}",
            socket.display()
        )),
        "{text}"
    );
    let (code, json) = s.status_json(&As::Root);
    assert_eq!(code, 2);
    assert_eq!(json["daemon_reachable"], false);
    assert_eq!(json["upstream_reachable"], serde_json::Value::Null);
    assert_eq!(json["keys"], serde_json::json!([]));
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn status_is_critical_when_an_external_upstream_agent_is_unreachable() {
    require_root!();
    let dir = TempDir::new("x");
    let agent = Agent::start(&dir);
    keygen(dir.path(), "deploy", "ed25519", "pw");
    let daemon = Daemon::start(
        &dir,
        &agent,
        &format!("[keys.deploy]\ngroups = [\"{NO_GROUP}\"]\n"),
    );
    let config = daemon.config.to_str().unwrap();
    let pass = dir.join("pass");
    std::fs::write(&pass, "pw\n").unwrap();
    std::fs::set_permissions(&pass, std::fs::Permissions::from_mode(0o600)).unwrap();
    let o = run(Command::new("setsid").args([
        "-w",
        KEYHOLDER,
        "--config",
        config,
        "arm",
        "--passphrase-file",
        pass.to_str().unwrap(),
    ]));
    assert_eq!(o.status.code(), Some(0), "{}", both(&o));
    assert_eq!(agent.keys().len(), 1);
    let o = keyholder(&As::Root, &["--config", config, "status"]);
    assert_eq!(o.status.code(), Some(0), "{}", both(&o));

    drop(agent);
    let o = keyholder(&As::Root, &["--config", config, "status"]);
    assert_eq!(o.status.code(), Some(2), "{}", both(&o));
    assert!(
        stdout(&o).starts_with("CRITICAL: upstream agent unreachable"),
        "{}",
        both(&o)
    );
    let o = keyholder(&As::Root, &["--config", config, "status", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(json["code"], 2);
    assert_eq!(json["daemon_reachable"], true);
    assert_eq!(json["upstream_reachable"], false);

    // arm and disarm say where the agent should have been, exit 1
    for args in [vec!["arm"], vec!["disarm"]] {
        let mut all = vec!["--config", config];
        all.extend(args.iter());
        let o = keyholder(&As::Root, &all);
        assert_eq!(o.status.code(), Some(1), "{}", both(&o));
        let err = stderr(&o);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("upstream agent unreachable at"), "{err}");
        assert!(
            err.contains(dir.join("agent.sock").to_str().unwrap()),
            "{err}"
        );
    }
}

#[test]
fn passphrase_from_systemd_credentials_and_no_source_at_all() {
    require_root!();
    each_backend(|backend| {
        let s = site(
            backend,
            &[
                ("deploy", "ed25519", "cred pass"),
                ("rsa", "rsa", "cred pass"),
            ],
            NO_GROUP,
            "",
            "",
        );
        // no terminal, no file, no credential: a clear error, nothing loaded
        let o = s.arm(&[]);
        assert_eq!(o.status.code(), Some(1), "{}", both(&o));
        assert!(stderr(&o).contains("no passphrase source"), "{}", both(&o));
        assert!(stdout(&o).contains("deploy: FAILED"), "{}", both(&o));
        assert!(s.held().is_empty());
        // another backend's option is an error, not ignored: nothing loaded
        for flag in ["--pin-file", "--secret-file"] {
            let o = s.arm(&[flag, "/nonexistent"]);
            assert_eq!(o.status.code(), Some(1), "{}", both(&o));
            assert!(
                stderr(&o).contains(&format!("{flag} does not apply with agent.backend")),
                "{}",
                both(&o)
            );
            assert!(s.held().is_empty());
        }
        // a credentials directory without the credential is no source either
        let creds = s.dir.join("creds");
        std::fs::create_dir(&creds).unwrap();
        let o = s.arm_env(&[], &[("CREDENTIALS_DIRECTORY", &creds)]);
        assert_eq!(o.status.code(), Some(1), "{}", both(&o));
        assert!(s.held().is_empty());

        let cred = creds.join("keyholder-passphrase");
        std::fs::write(&cred, "cred pass\n").unwrap();
        std::fs::set_permissions(&cred, std::fs::Permissions::from_mode(0o400)).unwrap();
        let o = s.arm_env(&[], &[("CREDENTIALS_DIRECTORY", &creds)]);
        assert_eq!(o.status.code(), Some(0), "{}", both(&o));
        assert!(stdout(&o).contains("all 2 key(s) armed"), "{}", both(&o));
        assert_eq!(s.held(), s.expect(&["deploy", "rsa"]));

        // --passphrase-file wins over the credential; a missing one is an error
        let o = s.kh(&As::Root, &["disarm"]);
        assert_eq!(o.status.code(), Some(0), "{}", both(&o));
        let wrong = s.passphrase_file("wrong", "nope\n");
        let o = s.arm_env(
            &["--passphrase-file", wrong.to_str().unwrap()],
            &[("CREDENTIALS_DIRECTORY", &creds)],
        );
        assert_eq!(o.status.code(), Some(1), "{}", both(&o));
        assert!(stdout(&o).contains(wrong.to_str().unwrap()), "{}", both(&o));
        let o = s.arm(&["--passphrase-file", "/nonexistent/kht-pass"]);
        assert_eq!(o.status.code(), Some(1), "{}", both(&o));
        assert!(stderr(&o).contains("/nonexistent/kht-pass"), "{}", both(&o));
        assert!(s.held().is_empty());
    });
}

#[test]
fn list_shows_a_member_their_keys_and_an_outsider_nothing() {
    require_root!();
    each_backend(|backend| {
        let group = TestGroup::create("li");
        let member = TestUser::create("li", &[&group]);
        let outsider = TestUser::create("lo", &[]);
        // `inline` has its public key in the configuration
        let dir_for_inline = TempDir::new("inl");
        keygen(dir_for_inline.path(), "inline", "ed25519", "pw");
        let inline_pub = std::fs::read_to_string(dir_for_inline.join("inline.pub")).unwrap();
        let s = site(
            backend,
            &[("deploy", "ed25519", "pw"), ("phab", "ecdsa", "pw")],
            &group.name,
            "",
            &format!(
                "[keys.inline]\npublic_key = \"{}\"\ngroups = [\"{}\"]\n\n",
                inline_pub.trim(),
                group.name
            ),
        );
        std::fs::copy(dir_for_inline.join("inline"), s.key("inline")).unwrap();
        std::fs::set_permissions(s.key("inline"), std::fs::Permissions::from_mode(0o600)).unwrap();

        // nothing armed: nothing to list, even for a member
        let o = s.kh(&member.as_user(), &["list"]);
        assert_eq!(o.status.code(), Some(1), "{}", both(&o));
        assert!(stderr(&o).contains("no keys available"), "{}", both(&o));

        let pass = s.passphrase_file("pw", "pw\n");
        let o = s.arm_with(&pass);
        assert_eq!(o.status.code(), Some(0), "{}", both(&o));

        let o = s.kh(&member.as_user(), &["list"]);
        assert_eq!(o.status.code(), Some(0), "{}", both(&o));
        let out = stdout(&o);
        let lines: Vec<Vec<&str>> = out
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(lines.len(), 3, "{out}");
        let deploy_pub = s.pub_path("deploy");
        let phab_pub = s.pub_path("phab");
        assert_eq!(
            lines[0],
            [
                "deploy",
                s.fingerprint("deploy").as_str(),
                "ED25519",
                deploy_pub.to_str().unwrap()
            ]
        );
        assert_eq!(lines[1][0], "inline");
        assert_eq!(lines[1][3], "(inline)");
        assert_eq!(
            lines[2],
            [
                "phab",
                s.fingerprint("phab").as_str(),
                "ECDSA",
                phab_pub.to_str().unwrap()
            ]
        );

        let o = s.kh(&outsider.as_user(), &["list"]);
        assert_eq!(o.status.code(), Some(1), "{}", both(&o));
        assert!(stdout(&o).is_empty(), "{}", stdout(&o));
        let err = stderr(&o);
        assert!(err.contains("no keys available to you"), "{err}");
        assert!(err.contains(&outsider.name), "{err}");

        // a daemon that is not there
        let mut s = s;
        s.daemon_mut().stop();
        let o = s.kh(&member.as_user(), &["list"]);
        assert_eq!(o.status.code(), Some(1), "{}", both(&o));
        assert!(stderr(&o).contains("daemon unreachable at"), "{}", both(&o));
    });
}

#[test]
fn ssh_i_pub_selects_one_key_through_the_proxy() {
    require_root!();
    each_backend(|backend| {
        let group = TestGroup::create("sc");
        let member = TestUser::create("sc", &[&group]);
        let s = site(
            backend,
            &[("deploy", "ed25519", "pw"), ("other", "rsa", "pw")],
            &group.name,
            "",
            "",
        );
        let pass = s.passphrase_file("pw", "pw\n");
        let o = s.arm_with(&pass);
        assert_eq!(o.status.code(), Some(0), "{}", both(&o));
        assert_eq!(s.held(), s.expect(&["deploy", "other"]));

        let sshd = Sshd::start(&s.dir);
        sshd.authorize(&member.name, &[&s.pub_path("deploy")]);
        let deploy_pub = s.pub_path("deploy");
        let o = sshd.ssh(
            &member.as_user(),
            &s.daemon().socket,
            &member.name,
            &[
                "-i",
                deploy_pub.to_str().unwrap(),
                "-o",
                "IdentitiesOnly=yes",
            ],
            "echo logged-in",
        );
        assert!(
            o.status.success(),
            "{}\n{}\n{}",
            both(&o),
            s.daemon().log_text(),
            sshd.log_text()
        );
        assert_eq!(stdout(&o).trim(), "logged-in");
        assert!(
            s.daemon().wait_log(&format!(
                "key=deploy fingerprint={}",
                s.fingerprint("deploy")
            )),
            "{}",
            s.daemon().log_text()
        );
        // only the selected key was offered: `other` was never used to sign
        assert!(
            !s.daemon().log_text().contains("key=other"),
            "{}",
            s.daemon().log_text()
        );

        // selecting the other (not authorized) key does not fall back to deploy
        let other_pub = s.pub_path("other");
        let o = sshd.ssh(
            &member.as_user(),
            &s.daemon().socket,
            &member.name,
            &[
                "-i",
                other_pub.to_str().unwrap(),
                "-o",
                "IdentitiesOnly=yes",
            ],
            "echo logged-in",
        );
        assert!(!o.status.success(), "{}", both(&o));
    });
}

#[test]
fn check_config_as_root_and_as_an_unprivileged_user() {
    require_root!();
    each_backend(|backend| {
        let group = TestGroup::create("cc");
        let member = TestUser::create("cc", &[&group]);
        let s = site(
            backend,
            &[("deploy", "ed25519", "pw"), ("phab", "rsa", "pw")],
            &group.name,
            "",
            "",
        );
        let o = s.kh(&As::Root, &["check-config"]);
        assert_eq!(o.status.code(), Some(0), "{}", both(&o));
        assert!(
            stdout(&o).contains("check-config: OK (2 key(s), 0 warning(s))"),
            "{}",
            both(&o)
        );
        assert!(stdout(&o).contains("(encrypted)"), "{}", both(&o));

        // a user can check what stat shows, and is told what it cannot check
        let o = s.kh(&member.as_user(), &["check-config"]);
        assert_eq!(o.status.code(), Some(0), "{}", both(&o));
        let out = stdout(&o);
        assert!(out.contains("note: keys.deploy"), "{out}");
        assert!(out.contains("run check-config as root"), "{out}");
        assert!(!out.contains("error:"), "{out}");

        std::fs::set_permissions(s.key("phab"), std::fs::Permissions::from_mode(0o604)).unwrap();
        for who in [As::Root, member.as_user()] {
            let o = s.kh(&who, &["check-config"]);
            assert_eq!(o.status.code(), Some(1), "{who:?}: {}", both(&o));
            let out = stdout(&o);
            assert!(
                out.contains(&format!(
                    "error: keys.phab: {}: permissions 0604 are too open",
                    s.key("phab").display()
                )),
                "{out}"
            );
        }
        // key_dir writable by others: refused (whoever can write there can
        // rename public keys into each other's names), by every command
        std::fs::set_permissions(&s.key_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        for who in [As::Root, member.as_user()] {
            let o = s.kh(&who, &["check-config"]);
            assert_eq!(o.status.code(), Some(1), "{who:?}: {}", both(&o));
            let err = stderr(&o);
            assert!(
                err.contains(&format!(
                    "key_dir {}: is owned by uid 0",
                    s.key_dir.display()
                )) && err.contains("writable by others than root"),
                "{}",
                both(&o)
            );
        }
        std::fs::set_permissions(&s.key_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(s.key("phab"), std::fs::Permissions::from_mode(0o600)).unwrap();

        // a broken configuration: one line naming file and field, exit 1
        std::fs::write(&s.daemon().config, "sockett = 1\n").unwrap();
        let o = s.kh(&As::Root, &["check-config"]);
        assert_eq!(o.status.code(), Some(1), "{}", both(&o));
        let err = stderr(&o);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(s.config()) && err.contains("sockett"), "{err}");
        // ... which status reports as UNKNOWN
        let (code, text) = s.status(&member.as_user());
        assert_eq!(code, 3, "{text}");
        assert!(text.starts_with("UNKNOWN: configuration error"), "{text}");
    });
}

#[test]
fn status_falls_back_to_the_default_socket_when_the_config_is_unreadable() {
    require_root!();
    let user = TestUser::create("ur", &[]);
    let dir = TempDir::new("ur");
    let config = dir.join("keyholder.toml");
    std::fs::write(&config, "").unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).unwrap();
    let o = keyholder(
        &user.as_user(),
        &["--config", config.to_str().unwrap(), "status", "--json"],
    );
    let json: serde_json::Value =
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", both(&o)));
    assert_eq!(json["socket"], "/run/keyholder/proxy.sock");
    assert!(
        json["notes"][0]
            .as_str()
            .is_some_and(|n| n.contains("cannot read")),
        "{json}"
    );
}

/// The terminal dialogue, on a pseudo-terminal: one prompt serves every key
/// it opens, the others are asked for by name, nothing typed is echoed.
#[test]
fn arm_on_a_terminal_prompts_without_echo() {
    require_root!();
    each_backend(|backend| {
        let s = site(
            backend,
            &[
                ("deploy", "ed25519", "first secret"),
                ("ec", "ecdsa", "first secret"),
                ("phab", "rsa", "second secret"),
            ],
            NO_GROUP,
            "",
            "",
        );
        let pty = nix::pty::openpty(None, None).unwrap();
        // openpty does not set close-on-exec; keyholder must not hold the master
        nix::fcntl::fcntl(
            &pty.master,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        )
        .unwrap();
        let slave = std::fs::File::from(pty.slave);
        let mut child = spawn(
            Command::new("setsid")
                .args(["-c", "-w", KEYHOLDER, "--config", s.config(), "arm"])
                .env_remove("CREDENTIALS_DIRECTORY")
                .stdin(slave.try_clone().unwrap())
                .stderr(slave.try_clone().unwrap())
                .stdout(Stdio::piped()),
        );
        drop(slave);
        let master = std::fs::File::from(pty.master);
        let mut writer = master.try_clone().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
        let mut reader = master;
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        let mut screen = String::new();
        let wait_for_text = |needle: &str, screen: &mut String| {
            let deadline = Instant::now() + Duration::from_secs(20);
            while !screen.contains(needle) {
                let left = deadline.saturating_duration_since(Instant::now());
                match rx.recv_timeout(left) {
                    Ok(bytes) => screen.push_str(&String::from_utf8_lossy(&bytes)),
                    Err(_) => panic!("no {needle:?} on the terminal: {screen:?}"),
                }
            }
        };
        use std::io::Write;
        wait_for_text("Passphrase for deploy, ec, phab", &mut screen);
        writer.write_all(b"first secret\n").unwrap();
        wait_for_text("Passphrase for phab (", &mut screen);
        writer.write_all(b"wrong\n").unwrap();
        wait_for_text("Bad passphrase, try again for phab", &mut screen);
        writer.write_all(b"second secret\n").unwrap();
        let mut out = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(0), "{out}\n{screen}");
        assert!(out.contains("all 3 key(s) armed"), "{out}");
        assert!(!screen.contains("secret"), "echoed: {screen:?}");
        assert!(!screen.contains("wrong"), "echoed: {screen:?}");
        assert_eq!(s.held(), s.expect(&["deploy", "ec", "phab"]));
    });
}

#[test]
fn usage_errors_of_status_are_unknown_to_monitoring() {
    let o = keyholder(&As::Root, &["status", "--bogus"]);
    assert_eq!(o.status.code(), Some(3), "{}", both(&o));
    let o = keyholder(&As::Root, &["list", "--bogus"]);
    assert_eq!(o.status.code(), Some(2), "{}", both(&o));
    for args in [["status", "--help"], ["arm", "--help"]] {
        let o = keyholder(&As::Root, &args);
        assert_eq!(o.status.code(), Some(0), "{}", both(&o));
    }
    let o = keyholder(&As::Root, &["--version"]);
    assert_eq!(o.status.code(), Some(0), "{}", both(&o));
    assert!(stdout(&o).starts_with("keyholder "), "{}", both(&o));
}

/// A monitoring pipeline that stops reading (`keyholder status | head -0`)
/// must not turn the status into a panic: the exit code still tells.
#[test]
fn status_survives_a_closed_stdout() {
    let dir = TempDir::new("pipe");
    let config = dir.join("keyholder.toml");
    std::fs::write(
        &config,
        format!("socket = \"{}\"\n", dir.join("absent.sock").display()),
    )
    .unwrap();
    let (read_end, write_end) = nix::unistd::pipe().unwrap();
    drop(read_end);
    let o = std::process::Command::new(KEYHOLDER)
        .args(["status", "--config"])
        .arg(&config)
        .stdout(std::process::Stdio::from(write_end))
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
}
