//! Grants end to end: a real daemon in front of a real OpenSSH ssh-agent,
//! throwaway users and groups (requesters, approvers, strangers), the real
//! `keyholder request/approve/deny/grants/revoke` commands run as those
//! users, and raw sign requests. Every refusal is asserted twice: the
//! client got FAILURE (or exit 1), and the agent is unchanged.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;

raw_client_helper!();

/// A deployment host with key `prod` behind grants.
struct Site {
    dir: TempDir,
    agent: Agent,
    daemon: Daemon,
    blob: Vec<u8>,
    deployers: TestGroup,
    /// Members of `deployers`.
    alice: TestUser,
    bob: TestUser,
    /// Approvers (`leads`, and `sre` for six eyes).
    lead1: TestUser,
    lead2: TestUser,
    /// In no group.
    carol: TestUser,
    _leads: TestGroup,
    _sre: TestGroup,
    /// The agent's keys after arming (what "unchanged" is checked against).
    keys: Vec<String>,
}

/// `grants`: the `[keys.prod.grants]` body (without approvers, which are
/// `leads` and `sre`); `extra`: more configuration (before the keys).
fn site(grants: &str, extra: &str) -> Site {
    let dir = TempDir::new("g");
    let agent = Agent::start(&dir);
    let prod = keygen(dir.path(), "prod", "ed25519", "");
    agent.add(&prod);
    let deployers = TestGroup::create("gd");
    let leads = TestGroup::create("gl");
    let sre = TestGroup::create("gs");
    let alice = TestUser::create("ga", &[&deployers]);
    let bob = TestUser::create("gb", &[&deployers]);
    let lead1 = TestUser::create("l1", &[&leads]);
    let lead2 = TestUser::create("l2", &[&sre]);
    let carol = TestUser::create("gc", &[]);
    let config = Daemon::config(
        &dir,
        &agent.socket,
        &format!(
            "state_dir = \"{}\"\n{extra}\n[keys.prod]\ngroups = [\"{}\"]\n\
             [keys.prod.grants]\napprovers = [\"{}\", \"{}\"]\n{grants}\n",
            dir.join("state").display(),
            deployers.name,
            leads.name,
            sre.name
        ),
    );
    // `Daemon::config` puts its text first; `state_dir` must be top level,
    // so it goes before any table.
    let config = hoist_top_level(&config);
    let daemon = Daemon::start_with(&dir, &config);
    assert!(
        daemon.wait_log("listening on"),
        "daemon did not start:\n{}",
        daemon.log_text()
    );
    let keys = agent.keys();
    assert_eq!(keys.len(), 1);
    let blob = pubkey_blob(&dir.join("prod.pub"));
    Site {
        dir,
        agent,
        daemon,
        blob,
        deployers,
        alice,
        bob,
        lead1,
        lead2,
        carol,
        _leads: leads,
        _sre: sre,
        keys,
    }
}

/// Moves `state_dir = …` and a `[certificates]`-free top of `extra` before
/// the first table of `config`.
fn hoist_top_level(config: &str) -> String {
    let mut top = Vec::new();
    let mut rest = Vec::new();
    for line in config.lines() {
        if line.starts_with("state_dir") || line.starts_with("require_encrypted") {
            top.push(line);
        } else {
            rest.push(line);
        }
    }
    format!("{}\n{}\n", top.join("\n"), rest.join("\n"))
}

impl Site {
    fn config(&self) -> &str {
        self.daemon.config.to_str().unwrap()
    }

    /// `keyholder ARGS --config …` as `who`.
    fn kh(&self, who: &As, args: &[&str]) -> Output {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--config", self.config()]);
        keyholder(who, &all)
    }

    /// `keyholder request prod --for DURATION --reason REASON` as `who`:
    /// the id.
    fn request(&self, who: &TestUser, duration: &str) -> String {
        let o = self.kh(
            &who.as_user(),
            &[
                "request",
                "prod",
                "--for",
                duration,
                "--reason",
                "deploy 1.2 (T123)",
            ],
        );
        assert!(o.status.success(), "request: {}{}", stdout(&o), stderr(&o));
        let id = stdout(&o).lines().next().unwrap_or("").trim().to_owned();
        assert_eq!(id.len(), 12, "{}", stdout(&o));
        id
    }

    /// `keyholder approve ID` as `who`, which must succeed.
    fn approve(&self, who: &TestUser, id: &str) {
        let o = self.kh(&who.as_user(), &["approve", id]);
        assert!(o.status.success(), "approve: {}{}", stdout(&o), stderr(&o));
    }

    /// A refused command: exit 1, one line on stderr containing `why`, and
    /// the agent unchanged.
    fn refused(&self, o: &Output, why: &str) {
        assert_eq!(o.status.code(), Some(1), "{}{}", stdout(o), stderr(o));
        let err = stderr(o);
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(err.contains(why), "wanted {why:?}: {err}");
        self.unchanged();
    }

    fn unchanged(&self) {
        assert_eq!(self.agent.keys(), self.keys, "the agent changed");
    }

    fn sign_message(&self) -> Vec<u8> {
        sign_request(
            &self.blob,
            &userauth_data(&self.blob, "deploy", "ssh-ed25519"),
            0,
        )
    }

    /// A raw sign request as `who`: whether it was signed.
    fn signs(&self, who: &As) -> bool {
        let answers = raw_as(who, &self.daemon.socket, &[self.sign_message()]);
        let signed = answers[0].as_ref().map(|a| a[0]) == Some(SIGN_RESPONSE);
        if !signed {
            assert_eq!(answers[0].as_ref().map(|a| a[0]), Some(FAILURE));
            self.unchanged();
        }
        signed
    }

    /// Whether `prod` is listed to `who`.
    fn lists(&self, who: &As) -> bool {
        !self.daemon.listed(who).is_empty()
    }

    fn log(&self) -> String {
        self.daemon.log_text()
    }

    fn wait_log(&self, needle: &str) {
        assert!(
            wait_for(Duration::from_secs(30), || self.log().contains(needle)),
            "no {needle:?} in the log:\n{}",
            self.log()
        );
    }

    fn state_file(&self) -> PathBuf {
        self.dir.join("state").join("grants.json")
    }
}

#[test]
fn four_eyes_request_approve_use() {
    if !is_root() {
        return;
    }
    let s = site("approvals = 1\nmax_secs = 600\n", "");
    let alice = s.alice.as_user();
    // No grant: not listed, not signed (no-grant).
    assert!(!s.lists(&alice));
    assert!(!s.signs(&alice));
    s.wait_log("reason=no-grant");
    assert!(s.log().contains("grant=- decision=refused reason=no-grant"));
    // Root never needs one.
    assert!(s.signs(&As::Root));
    // `keyholder list` says what to do.
    let o = s.kh(&alice, &["list"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("prod needs a grant: keyholder request prod"),
        "{}",
        stderr(&o)
    );

    let id = s.request(&s.alice, "5m");
    s.wait_log(&format!("grant event=requested id={id} key=prod"));
    // Pending is not enough.
    assert!(!s.signs(&alice));
    // The requester, other members and strangers cannot approve.
    for (who, why) in [
        (&s.alice, "not an approver"),
        (&s.bob, "not an approver"),
        (&s.carol, "not an approver"),
    ] {
        s.refused(&s.kh(&who.as_user(), &["approve", &id]), why);
    }
    // Refused attempts are logged.
    s.wait_log(&format!(
        "grant refused op=approve target={id} user={} uid={}",
        s.alice.name,
        s.alice.uid()
    ));
    // Listing shows who may approve.
    let o = s.kh(&s.carol.as_user(), &["grants"]);
    assert!(o.status.success());
    let out = stdout(&o);
    assert!(out.contains(&id) && out.contains("pending"), "{out}");
    assert!(
        out.contains(&s.lead1.name) && out.contains(&s.lead2.name),
        "{out}"
    );
    assert!(!s.signs(&alice));

    s.approve(&s.lead1, &id);
    s.wait_log(&format!("grant event=approved id={id}"));
    s.wait_log(&format!("grant event=active id={id}"));
    assert!(s.log().contains(&format!("by={}", s.lead1.name)));
    assert!(s.lists(&alice));
    assert!(s.signs(&alice));
    s.wait_log(&format!("grant={id} decision=granted"));
    let o = s.kh(&alice, &["list"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).starts_with("prod "), "{}", stdout(&o));
    assert!(!stderr(&o).contains("needs a grant"), "{}", stderr(&o));
    // Bob, also a member, has no grant of his own.
    assert!(!s.lists(&s.bob.as_user()));
    assert!(!s.signs(&s.bob.as_user()));
    // Approving again: not pending.
    s.refused(&s.kh(&s.lead2.as_user(), &["approve", &id]), "not pending");

    // JSON listing.
    let o = s.kh(&s.carol.as_user(), &["grants", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["grants"][0]["id"], id.as_str());
    assert_eq!(v["grants"][0]["state"], "active");

    // Metrics.
    let o = s.kh(&s.carol.as_user(), &["status", "--prometheus"]);
    let metrics = stdout(&o);
    assert!(
        metrics.contains("keyholder_grants_active{key=\"prod\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("keyholder_grant_events_total{event=\"approved\"} 1"),
        "{metrics}"
    );
}

#[test]
fn bad_requests_are_one_line_and_change_nothing() {
    if !is_root() {
        return;
    }
    let s = site("approvals = 1\nmax_secs = 600\n", "");
    let a = s.alice.as_user();
    let req = |who: &As, dur: &str, reason: &str| {
        s.kh(who, &["request", "prod", "--for", dur, "--reason", reason])
    };
    s.refused(&req(&a, "2h", "r"), "longer than this key allows");
    s.refused(&req(&a, "soon", "r"), "cannot read duration");
    s.refused(&req(&a, "5m", ""), "a reason is required");
    s.refused(&req(&a, "5m", &"x".repeat(300)), "at most 256");
    s.refused(&req(&a, "5m", "a\nb"), "control characters");
    s.refused(
        &req(&s.carol.as_user(), "5m", "r"),
        "not in a group of key prod",
    );
    s.refused(
        &req(&s.lead1.as_user(), "5m", "r"),
        "not in a group of key prod",
    );
    s.refused(
        &s.kh(&a, &["request", "nope", "--for", "5m", "--reason", "r"]),
        "no key named",
    );
    s.refused(
        &s.kh(&s.lead1.as_user(), &["approve", "000000000000"]),
        "no grant request",
    );
    s.refused(
        &s.kh(&s.lead1.as_user(), &["deny", "000000000000"]),
        "no grant request",
    );
    s.refused(&s.kh(&a, &["revoke", "000000000000"]), "no grant request");
    // Missing --reason: a usage error, one line, exit 1.
    let o = keyholder(
        &a,
        &["request", "prod", "--for", "5m", "--config", s.config()],
    );
    s.refused(&o, "--reason");
    // An id of another key.
    let id = s.request(&s.alice, "5m");
    s.refused(
        &s.kh(&s.lead1.as_user(), &["approve", &id, "--key", "other"]),
        "is for key prod, not other",
    );
    // At most 16 pending per user.
    for _ in 1..16 {
        s.request(&s.alice, "1m");
    }
    s.refused(&req(&a, "1m", "r"), "16 pending requests");
    // Malformed and oversized grant extensions: an answer saying so, on a
    // connection that stays usable.
    let ext =
        |name: &str, contents: Vec<u8>| [vec![27u8], string(name.as_bytes()), contents].concat();
    let answers = raw_as(
        &a,
        &s.daemon.socket,
        &[
            ext("grant-approve@keyholder", vec![0, 0, 0]),
            ext(
                "grant-request@keyholder",
                [string(b"prod"), string(b"5m"), string(&[b'x'; 2000])].concat(),
            ),
            ext(
                "grant-revoke@keyholder",
                [string(&[0xff]), string(b"")].concat(),
            ),
            ext("grant-list@keyholder", Vec::new()),
        ],
    );
    for (i, answer) in answers.iter().enumerate() {
        let answer = answer.as_ref().expect("an answer");
        assert_eq!(answer[0], EXTENSION_RESPONSE, "{i}");
        let text = String::from_utf8_lossy(answer);
        if i < 3 {
            assert!(text.contains("malformed"), "{i}: {text}");
        } else {
            assert!(text.contains("\"grants\""), "{text}");
        }
    }
    // Nothing was granted by any of this.
    assert!(!s.signs(&a));
    assert!(!s.log().contains("event=active"));
}

#[test]
fn six_eyes_needs_two_distinct_approvers() {
    if !is_root() {
        return;
    }
    let s = site("approvals = 2\n", "");
    let id = s.request(&s.alice, "5m");
    s.approve(&s.lead1, &id);
    assert!(!s.signs(&s.alice.as_user()));
    s.refused(
        &s.kh(&s.lead1.as_user(), &["approve", &id]),
        "already approved",
    );
    assert!(!s.signs(&s.alice.as_user()));
    s.approve(&s.lead2, &id);
    s.wait_log(&format!("grant event=active id={id}"));
    assert!(s.signs(&s.alice.as_user()));
    // A requester who is also an approver still needs two others.
    let both = TestUser::create("gx", &[&s.deployers, &s._leads]);
    let id2 = s.request(&both, "5m");
    s.refused(
        &s.kh(&both.as_user(), &["approve", &id2]),
        "your own request",
    );
    s.approve(&s.lead1, &id2);
    assert!(!s.signs(&both.as_user()));
}

#[test]
fn a_grant_ends_on_an_open_connection() {
    if !is_root() {
        return;
    }
    let s = site("approvals = 1\n", "");
    // Long enough for the first sign on a loaded machine; short enough to wait for.
    let id = s.request(&s.alice, "8s");
    s.approve(&s.lead1, &id);
    let go = s.dir.join("go");
    let expired = format!("grant event=expired id={id}");
    let log = s.daemon.log.clone();
    let go2 = go.clone();
    let waiter = std::thread::spawn(move || {
        // Written by the timer when the time passes, not at the next request.
        let seen = wait_for(Duration::from_secs(30), || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains(&expired)
        });
        std::fs::write(&go2, "").unwrap();
        seen
    });
    let answers = raw_script_as(
        &s.alice.as_user(),
        &s.daemon.socket,
        &[
            Step::Send(s.sign_message()),
            Step::Wait(go),
            Step::Send(s.sign_message()),
        ],
    );
    assert!(waiter.join().unwrap(), "{}", s.log());
    assert_eq!(answers[0].as_ref().map(|a| a[0]), Some(SIGN_RESPONSE));
    assert_eq!(answers[1].as_ref().map(|a| a[0]), Some(FAILURE));
    s.unchanged();
    s.wait_log("reason=grant-expired");
    assert!(!s.lists(&s.alice.as_user()));
}

#[test]
fn revoke_deny_lapse() {
    if !is_root() {
        return;
    }
    // Requests are approved well within pending_secs; the last one lapses.
    let s = site("approvals = 1\npending_secs = 8\n", "");
    let a = s.alice.as_user();
    // Revoke: another member may not; the grantee may.
    let id = s.request(&s.alice, "5m");
    s.approve(&s.lead1, &id);
    assert!(s.signs(&a));
    s.refused(&s.kh(&s.bob.as_user(), &["revoke", &id]), "may revoke");
    assert!(s.signs(&a));
    let o = s.kh(&a, &["revoke", &id]);
    assert!(o.status.success(), "{}", stderr(&o));
    s.wait_log(&format!("grant event=revoked id={id}"));
    assert!(!s.signs(&a));
    s.refused(&s.kh(&a, &["revoke", &id]), "already over");
    // An approver revokes a grant early.
    let id = s.request(&s.alice, "5m");
    s.approve(&s.lead1, &id);
    assert!(s.signs(&a));
    assert!(s.kh(&s.lead2.as_user(), &["revoke", &id]).status.success());
    assert!(!s.signs(&a));
    // Deny.
    let id = s.request(&s.alice, "5m");
    let o = s.kh(
        &s.lead1.as_user(),
        &["deny", &id, "--reason", "freeze \"week\""],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    s.wait_log(&format!("grant event=denied id={id}"));
    assert!(
        s.log().contains("note=\"freeze \\\"week\\\"\""),
        "{}",
        s.log()
    );
    s.refused(
        &s.kh(&s.lead2.as_user(), &["approve", &id]),
        "not pending (denied)",
    );
    assert!(!s.signs(&a));
    // Lapse: nobody decides within pending_secs.
    let id = s.request(&s.alice, "5m");
    s.wait_log(&format!("grant event=lapsed id={id}"));
    s.refused(&s.kh(&s.lead1.as_user(), &["approve", &id]), "not pending");
    assert!(!s.signs(&a));
}

#[test]
fn wait_both_ways() {
    if !is_root() {
        return;
    }
    let s = site("approvals = 1\n", "");
    let spawn_wait = || {
        s.alice
            .as_user()
            .command(KEYHOLDER)
            .args([
                "request",
                "prod",
                "--for",
                "5m",
                "--reason",
                "wait",
                "--wait",
                "--config",
                s.config(),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let pending_id = |s: &Site, n: usize| -> String {
        let mut id = String::new();
        assert!(wait_for(Duration::from_secs(20), || {
            let o = s.kh(&As::Root, &["grants", "--json"]);
            let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap_or_default();
            let items = v["grants"].as_array().cloned().unwrap_or_default();
            let pending: Vec<_> = items.iter().filter(|g| g["state"] == "pending").collect();
            if pending.len() == n {
                id = pending[n - 1]["id"].as_str().unwrap_or("").to_owned();
                true
            } else {
                false
            }
        }));
        id
    };
    let child = spawn_wait();
    let id = pending_id(&s, 1);
    s.approve(&s.lead1, &id);
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).starts_with(&id));
    assert!(stderr(&o).contains("active until"), "{}", stderr(&o));

    let child = spawn_wait();
    let id = pending_id(&s, 1);
    assert!(s.kh(&s.lead2.as_user(), &["deny", &id]).status.success());
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("denied"), "{}", stderr(&o));
}

#[test]
fn grants_survive_reload_and_restart() {
    if !is_root() {
        return;
    }
    let mut s = site("approvals = 1\n", "");
    let id = s.request(&s.alice, "10m");
    s.approve(&s.lead1, &id);
    let pending = s.request(&s.bob, "10m");
    assert!(s.signs(&s.alice.as_user()));
    let meta = std::fs::metadata(s.state_file()).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (0, 0o600));
    assert_eq!(
        std::fs::metadata(s.dir.join("state")).unwrap().mode() & 0o777,
        0o700
    );
    s.daemon.signal(Signal::SIGHUP);
    s.wait_log("configuration reloaded");
    assert!(s.signs(&s.alice.as_user()));
    s.daemon.stop();
    let config = std::fs::read_to_string(&s.daemon.config).unwrap();
    s.daemon = Daemon::start_with(&s.dir, &config);
    assert!(s.daemon.wait_log("listening on"), "{}", s.log());
    assert!(s.signs(&s.alice.as_user()));
    assert!(!s.signs(&s.bob.as_user()));
    // The pending request survived too, and can be approved.
    s.approve(&s.lead2, &pending);
    assert!(s.signs(&s.bob.as_user()));
    // A reload that takes the grants section away ends the grants (the key
    // is then its members' again, as any key).
    let without: String = config
        .lines()
        .take_while(|l| !l.starts_with("[keys.prod.grants]"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&s.daemon.config, without).unwrap();
    s.daemon.signal(Signal::SIGHUP);
    s.wait_log(&format!("grant event=revoked id={id}"));
    assert!(s
        .log()
        .contains("its key is no longer configured with grants"));
    assert!(s.signs(&s.alice.as_user()));
    assert!(!s.signs(&s.carol.as_user()));
}

#[test]
fn grants_work_the_same_with_the_builtin_backend() {
    if !is_root() {
        return;
    }
    let dir = TempDir::new("gbi");
    let agent = Agent::new(&dir, Backend::Builtin);
    let prod = keygen(dir.path(), "prod", "ed25519", "");
    let deployers = TestGroup::create("bd");
    let leads = TestGroup::create("bl");
    let alice = TestUser::create("ba", &[&deployers]);
    let lead = TestUser::create("bl", &[&leads]);
    let config = format!(
        "state_dir = \"{}\"\n{}",
        dir.join("state").display(),
        Daemon::config_for(
            &dir,
            &agent,
            &format!(
                "[keys.prod]\ngroups = [\"{}\"]\n[keys.prod.grants]\napprovers = [\"{}\"]\n",
                deployers.name, leads.name
            ),
        )
    );
    let daemon = Daemon::start_with(&dir, &config);
    assert!(
        wait_for(Duration::from_secs(10), || {
            std::os::unix::net::UnixStream::connect(&agent.socket).is_ok()
        }),
        "{}",
        daemon.log_text()
    );
    agent.add(&prod);
    let keys = agent.keys();
    let blob = pubkey_blob(&dir.join("prod.pub"));
    let sign = sign_request(&blob, &userauth_data(&blob, "deploy", "ssh-ed25519"), 0);
    let signs = |who: &As| {
        raw_as(who, &daemon.socket, std::slice::from_ref(&sign))[0]
            .as_ref()
            .map(|a| a[0])
    };
    let cfg = daemon.config.to_str().unwrap();
    assert_eq!(signs(&alice.as_user()), Some(FAILURE));
    assert_eq!(agent.keys(), keys);
    let o = keyholder(
        &alice.as_user(),
        &[
            "request", "prod", "--for", "1m", "--reason", "builtin", "--config", cfg,
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let id = stdout(&o).trim().to_owned();
    assert!(
        keyholder(&lead.as_user(), &["approve", &id, "--config", cfg])
            .status
            .success()
    );
    assert_eq!(signs(&alice.as_user()), Some(SIGN_RESPONSE));
    assert!(daemon.wait_log(&format!("grant={id} decision=granted")));
}

#[test]
fn leaving_the_group_ends_the_grant() {
    if !is_root() {
        return;
    }
    let s = site("approvals = 1\n", "");
    let id = s.request(&s.alice, "10m");
    s.approve(&s.lead1, &id);
    assert!(s.signs(&s.alice.as_user()));
    s.alice.leave(&s.deployers);
    // The user database change applies to the very next request.
    assert!(wait_for(Duration::from_secs(10), || !s.signs(&s.alice.as_user())));
    s.wait_log(&format!("grant event=revoked id={id}"));
    s.wait_log("reason=no-grant");
    // Back in the group: the grant is gone for good.
    s.alice.join(&s.deployers);
    std::thread::sleep(Duration::from_millis(100));
    assert!(!s.signs(&s.alice.as_user()));
}

#[test]
fn break_glass_is_self_granted_and_audited() {
    if !is_root() {
        return;
    }
    let s = site("approvals = 0\n", "");
    let o = s.kh(
        &s.alice.as_user(),
        &[
            "request",
            "prod",
            "--for",
            "2m",
            "--reason",
            "prod down, nobody awake",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let id = stdout(&o).trim().to_owned();
    assert!(stderr(&o).contains("break-glass"), "{}", stderr(&o));
    assert!(s.signs(&s.alice.as_user()));
    s.wait_log(&format!(
        "grant event=active id={id} key=prod user={} uid={} by={}",
        s.alice.name,
        s.alice.uid(),
        s.alice.name
    ));
    assert!(s.log().contains("break_glass=yes"));
    // Not for non-members.
    s.refused(
        &s.kh(
            &s.carol.as_user(),
            &["request", "prod", "--for", "2m", "--reason", "me too"],
        ),
        "not in a group",
    );
}

#[test]
fn notify_gets_the_event_and_never_delays_a_sign() {
    if !is_root() {
        return;
    }
    let dir_hint = TempDir::new("gn");
    let out = dir_hint.join("events");
    let hook = dir_hint.join("notify");
    std::fs::write(
        &hook,
        format!(
            "#!/bin/sh\nenv | grep ^KEYHOLDER_GRANT_ | sort >> {out}\necho '--' >> {out}\n\
             echo \"hook saw $KEYHOLDER_GRANT_EVENT\"\n\
             [ \"$KEYHOLDER_GRANT_EVENT\" = active ] && exec sleep 30\nexit 3\n",
            out = out.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    let s = site(
        &format!("approvals = 1\nnotify = \"{}\"\n", hook.display()),
        "",
    );
    let id = s.request(&s.alice, "5m");
    assert!(wait_for(Duration::from_secs(20), || {
        std::fs::read_to_string(&out)
            .unwrap_or_default()
            .contains("KEYHOLDER_GRANT_EVENT=requested")
    }));
    let events = std::fs::read_to_string(&out).unwrap();
    for line in [
        format!("KEYHOLDER_GRANT_ID={id}"),
        "KEYHOLDER_GRANT_KEY=prod".to_owned(),
        format!("KEYHOLDER_GRANT_USER={}", s.alice.name),
        "KEYHOLDER_GRANT_UNTIL=\n".to_owned(),
        "KEYHOLDER_GRANT_REASON=deploy 1.2 (T123)".to_owned(),
        "KEYHOLDER_GRANT_APPROVERS=\n".to_owned(),
    ] {
        assert!(events.contains(&line), "{line:?} in {events}");
    }
    // Exit 3: one log line saying so; its output logged.
    s.wait_log("exited with exit status: 3");
    s.wait_log("hook saw requested");
    // The `active` hook hangs for 30 s; signs go on at once.
    s.approve(&s.lead1, &id);
    assert!(wait_for(Duration::from_secs(20), || {
        std::fs::read_to_string(&out)
            .unwrap_or_default()
            .contains("KEYHOLDER_GRANT_EVENT=active")
    }));
    let events = std::fs::read_to_string(&out).unwrap();
    assert!(events.contains(&format!("KEYHOLDER_GRANT_APPROVERS={}", s.lead1.name)));
    let start = Instant::now();
    for _ in 0..5 {
        assert!(s.signs(&s.alice.as_user()));
    }
    // Five signs, each a process as alice: far below the hook's 30 s.
    assert!(start.elapsed() < Duration::from_secs(20));
    // The hung hook is killed at its deadline.
    s.wait_log("still running after 5 s; killed");
    // A hook gone missing is one line, and grants work regardless (the
    // commands would refuse the configuration now: the raw extension).
    std::fs::remove_file(&hook).unwrap();
    let mut revoke = vec![27u8];
    revoke.extend(string(b"grant-revoke@keyholder"));
    revoke.extend(string(id.as_bytes()));
    revoke.extend(string(b""));
    let answers = raw_as(&s.alice.as_user(), &s.daemon.socket, &[revoke]);
    let answer = answers[0].clone().unwrap();
    assert_eq!(answer[0], EXTENSION_RESPONSE);
    s.wait_log(&format!("grant event=revoked id={id}"));
    s.wait_log("not run");
    assert!(!s.signs(&s.alice.as_user()));
}

#[test]
fn a_certificate_under_a_grant_ends_with_it() {
    if !is_root() {
        return;
    }
    let dir = TempDir::new("gcert");
    let agent = Agent::start(&dir);
    let prod = keygen(dir.path(), "prod", "ed25519", "");
    let ca = keygen(dir.path(), "ca", "ed25519", "");
    agent.add(&prod);
    agent.add(&ca);
    let deployers = TestGroup::create("cd");
    let leads = TestGroup::create("cl");
    let alice = TestUser::create("ca", &[&deployers]);
    let lead = TestUser::create("cl", &[&leads]);
    let config = format!(
        "socket = \"{}\"\nkey_dir = \"{}\"\nlog = \"stderr\"\nstate_dir = \"{}\"\n\n\
         [agent]\nsocket = \"{}\"\nspawn = false\n\n\
         [certificates]\nca = \"ca\"\nvalidity_secs = 3600\n\n\
         [keys.prod]\ngroups = [\"{}\"]\ncertificate = \"also\"\nprincipals = [\"deploy\"]\n\
         [keys.prod.grants]\napprovers = [\"{}\"]\n",
        dir.join("proxy.sock").display(),
        dir.path().display(),
        dir.join("state").display(),
        agent.socket.display(),
        deployers.name,
        leads.name
    );
    let daemon = Daemon::start_with(&dir, &config);
    assert!(daemon.wait_log("listening on"), "{}", daemon.log_text());
    let cfg = daemon.config.to_str().unwrap();
    // No grant: no certificate either.
    let o = keyholder(&alice.as_user(), &["cert", "prod", "--config", cfg]);
    assert_eq!(o.status.code(), Some(1));
    let o = keyholder(
        &alice.as_user(),
        &[
            "request", "prod", "--for", "2m", "--reason", "cert", "--config", cfg,
        ],
    );
    let id = stdout(&o).trim().to_owned();
    let o = keyholder(&lead.as_user(), &["approve", &id, "--config", cfg]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = keyholder(&As::Root, &["grants", "--json", "--config", cfg]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let until = v["grants"][0]["until"].as_u64().unwrap();
    let o = keyholder(&alice.as_user(), &["cert", "prod", "--config", cfg]);
    assert!(o.status.success(), "{}", stderr(&o));
    let cert = ssh_key::Certificate::from_openssh(stdout(&o).trim()).unwrap();
    // validity_secs is an hour; the grant's 2 minutes win.
    assert!(
        cert.valid_before() <= until,
        "{} > {until}",
        cert.valid_before()
    );
    assert!(cert.valid_before() + 10 >= until);
    let issued = format!("valid_before={}", cert.valid_before());
    assert!(daemon.log_text().contains(&issued), "{}", daemon.log_text());
}

#[test]
fn an_untrusted_state_file_means_no_grants() {
    if !is_root() {
        return;
    }
    let mut s = site("approvals = 1\n", "");
    let id = s.request(&s.alice, "10m");
    s.approve(&s.lead1, &id);
    assert!(s.signs(&s.alice.as_user()));
    s.daemon.stop();
    let config = std::fs::read_to_string(&s.daemon.config).unwrap();
    let good = std::fs::read_to_string(s.state_file()).unwrap();

    // Corrupt.
    std::fs::write(s.state_file(), "{\"version\": 1, \"grants\": [").unwrap();
    s.daemon = Daemon::start_with(&s.dir, &config);
    assert!(s.daemon.wait_log("listening on"));
    s.wait_log("refusing grant state");
    assert!(!s.signs(&s.alice.as_user()));
    s.daemon.stop();

    // Intact, but someone else's.
    std::fs::write(s.state_file(), &good).unwrap();
    std::fs::set_permissions(s.state_file(), std::fs::Permissions::from_mode(0o600)).unwrap();
    nix::unistd::chown(
        &s.state_file(),
        Some(nix::unistd::Uid::from_raw(s.alice.uid())),
        None,
    )
    .unwrap();
    s.daemon = Daemon::start_with(&s.dir, &config);
    assert!(s.daemon.wait_log("listening on"));
    s.wait_log("refusing grant state");
    assert!(s.log().contains("not root"), "{}", s.log());
    assert!(!s.signs(&s.alice.as_user()));
    s.daemon.stop();

    // Readable by others.
    std::fs::write(s.state_file(), &good).unwrap();
    nix::unistd::chown(&s.state_file(), Some(nix::unistd::Uid::from_raw(0)), None).unwrap();
    std::fs::set_permissions(s.state_file(), std::fs::Permissions::from_mode(0o644)).unwrap();
    s.daemon = Daemon::start_with(&s.dir, &config);
    assert!(s.daemon.wait_log("listening on"));
    s.wait_log("refusing grant state");
    assert!(!s.signs(&s.alice.as_user()));

    // Back to the good one.
    s.daemon.stop();
    std::fs::set_permissions(s.state_file(), std::fs::Permissions::from_mode(0o600)).unwrap();
    s.daemon = Daemon::start_with(&s.dir, &config);
    assert!(s.daemon.wait_log("listening on"));
    assert!(s.signs(&s.alice.as_user()));
    let _ = Command::new("true").status();
}
