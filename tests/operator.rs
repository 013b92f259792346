//! End-to-end tests of what an operator's mistakes and a hostile local
//! user's files can do to a running daemon (nothing), and of the audit line
//! telling how each sign request ended: real `ssh-agent`, real `ssh-add`,
//! real throwaway users, the real `keyholder` binary.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;

raw_client_helper!();

/// The audit lines (`sign …`, `admin …`) of a daemon log.
fn audit_lines(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains(" sign user=") || l.contains(" admin user="))
        .collect()
}

/// A sign request for the key in `pub_path`, as ssh would send it.
fn userauth_sign(pub_path: &Path) -> Vec<u8> {
    let blob = pubkey_blob(pub_path);
    sign_request(&blob, &userauth_data(&blob, "deploy", "ssh-ed25519"), 0)
}

#[test]
fn an_allowed_sign_that_fails_upstream_is_logged_failed_never_granted() {
    require_root!();
    let dir = TempDir::new("au");
    let agent = Agent::start(&dir);
    // Configured and allowed (root may use every key), but not armed.
    keygen(dir.path(), "deploy", "ed25519", "");
    let daemon = Daemon::start(
        &dir,
        &agent,
        "[limits]\nupstream_timeout_secs = 1\n\n[keys.deploy]\ngroups = [\"root\"]\n",
    );
    let sign = userauth_sign(&dir.join("deploy.pub"));
    let mut raw = Raw::connect(&daemon.socket);

    // 1. The agent does not hold the key: it answers FAILURE.
    assert_eq!(raw.call(&sign), Some(vec![FAILURE]));
    assert!(daemon.wait_log("decision=failed reason=upstream-error"));

    // 2. Armed: granted, and the line says so only now.
    agent.add(&dir.join("deploy"));
    let answer = raw.call(&sign).expect("answer");
    assert_eq!(answer.first(), Some(&SIGN_RESPONSE));
    assert!(daemon.wait_log("decision=granted"));

    // 3. The agent hangs: the answer times out.
    let agent_pid = nix::unistd::Pid::from_raw(agent.pid() as i32);
    nix::sys::signal::kill(agent_pid, Signal::SIGSTOP).unwrap();
    assert_eq!(raw.call(&sign), Some(vec![FAILURE]));
    nix::sys::signal::kill(agent_pid, Signal::SIGCONT).unwrap();
    assert!(daemon.wait_log("decision=failed reason=upstream-timeout"));

    // 4. The agent is gone: unreachable.
    drop(agent);
    let mut raw = Raw::connect(&daemon.socket);
    assert_eq!(raw.call(&sign), Some(vec![FAILURE]));
    assert!(wait_for(Duration::from_secs(10), || {
        daemon
            .log_text()
            .matches("decision=failed reason=upstream-error")
            .count()
            == 2
    }));

    // One line per request, in order, each with every field of the contract.
    let log = daemon.log_text();
    let lines = audit_lines(&log);
    assert_eq!(lines.len(), 4, "{log}");
    let ends = [
        "decision=failed reason=upstream-error",
        "decision=granted reason=root",
        "decision=failed reason=upstream-timeout",
        "decision=failed reason=upstream-error",
    ];
    for (line, end) in lines.iter().zip(ends) {
        assert!(line.ends_with(end), "{line}");
        let fields: Vec<&str> = line
            .split(" sign ")
            .nth(1)
            .unwrap_or_default()
            .split(' ')
            .map(|f| f.split('=').next().unwrap_or_default())
            .collect();
        assert_eq!(
            fields,
            [
                "user",
                "uid",
                "pid",
                "key",
                "fingerprint",
                "remote_user",
                "dest",
                "forwarded",
                "serial",
                "decision",
                "reason"
            ],
            "{line}"
        );
        assert!(line.contains(" dest=- forwarded=no serial=- "), "{line}");
    }
}
