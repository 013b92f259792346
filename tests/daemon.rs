//! End-to-end tests of `keyholder daemon` against a real OpenSSH `ssh-agent`,
//! real `ssh-add`/`ssh`/`ssh-keygen` clients, a real `sshd` on 127.0.0.1, and
//! real throwaway users and groups. Every refusal is asserted twice: the
//! client got FAILURE, and the upstream agent is unchanged.

mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;

raw_client_helper!();

/// A deployment host in miniature: `backend` holding `deploy` (ed25519),
/// `deployrsa` (RSA) and `phab` plus one unconfigured key, and a daemon in
/// front of it; groups `deployers` and `phab_admins`, users `member`,
/// `phab_user` (one in each) and `outsider` (in neither).
fn host(backend: Backend, extra: &str) -> Site {
    Site::builder("h", backend)
        .group("deployers")
        .group("phab_admins")
        .user("member", &["deployers"])
        .user("phab_user", &["phab_admins"])
        .user("outsider", &[])
        .keys(
            &[("deploy", "ed25519"), ("deployrsa", "rsa")],
            &["deployers"],
        )
        .key(SiteKey::new("phab", "ecdsa").groups(&["phab_admins"]))
        .key(SiteKey::new("stray", "ed25519").stray())
        .extra(extra)
        .build()
}

#[test]
fn listing_is_filtered_by_the_callers_groups() {
    require_root!();
    each_backend(|backend| {
        let h = host(backend, "");
        assert_eq!(
            h.listed(&h.as_user("member")),
            h.expect(&["deploy", "deployrsa"])
        );
        assert_eq!(h.listed(&h.as_user("phab_user")), h.expect(&["phab"]));
        assert_eq!(h.listed(&h.as_user("outsider")), Vec::<String>::new());
        // root: every configured key, never the unconfigured one
        assert_eq!(
            h.listed(&As::Root),
            h.expect(&["deploy", "deployrsa", "phab"])
        );
        // `ssh-add -l` exits 1 with "no identities" for the outsider
        let o = h.daemon().ssh_add(&h.as_user("outsider"), &["-l"]);
        assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    });
}

#[test]
fn admin_requests_are_refused_for_everyone_and_the_agent_is_unchanged() {
    require_root!();
    each_backend(|backend| {
        let h = host(backend, "");
        let before = h.agent.keys();
        assert_eq!(before.len(), 4);
        let newkey = keygen(h.dir.path(), "intruder", "ed25519", "");
        let deploy_pub = h.dir.join("deploy.pub");
        for who in [As::Root, h.as_user("member"), h.as_user("outsider")] {
            for args in [
                vec!["-D"],
                vec!["-d", deploy_pub.to_str().unwrap()],
                vec![newkey.to_str().unwrap()],
                vec!["-t", "60", newkey.to_str().unwrap()],
            ] {
                let o = h.daemon().ssh_add(&who, &args);
                assert!(!o.status.success(), "{who:?} ssh-add {args:?} succeeded");
                assert_eq!(
                    h.agent.keys(),
                    before,
                    "agent changed by {who:?} ssh-add {args:?}"
                );
            }
        }
        // lock/unlock and the smartcard requests, raw, as root
        let mut raw = Raw::connect(&h.daemon().socket);
        for msg in [
            [vec![22u8], string(b"pw")].concat(),
            [vec![23u8], string(b"pw")].concat(),
            [
                vec![20u8],
                string(b"/usr/lib/opensc-pkcs11.so"),
                string(b""),
            ]
            .concat(),
            [
                vec![21u8],
                string(b"/usr/lib/opensc-pkcs11.so"),
                string(b""),
            ]
            .concat(),
            vec![26u8, 0, 0],
            vec![25u8, 1, 2, 3],
            vec![19u8],
        ] {
            assert_eq!(raw.call(&msg), Some(vec![FAILURE]), "type {}", msg[0]);
        }
        assert_eq!(h.agent.keys(), before);
        // still a working agent behind the proxy: not locked
        assert_eq!(h.listed(&As::Root).len(), 3);
        assert!(h
            .daemon()
            .wait_log("decision=refused reason=admin-request:remove-all-identities"));
        assert!(h.daemon().log_text().contains("reason=admin-request:lock"));
    });
}

#[test]
fn real_ssh_logins_through_the_proxy() {
    require_root!();
    each_backend(|backend| {
        let h = host(backend, "");
        let sshd = Sshd::start(&h.dir);
        let remote = TestUser::create("r", &[]);
        sshd.authorize(
            &remote.name,
            &[&h.dir.join("deploy.pub"), &h.dir.join("deployrsa.pub")],
        );
        let before = h.agent.keys();

        // The member logs in with each key (ed25519; RSA with rsa-sha2-* flags).
        for key in ["deploy", "deployrsa"] {
            let pubfile = h.dir.join(&format!("{key}.pub"));
            let o = sshd.ssh(
                &h.as_user("member"),
                &h.daemon().socket,
                &remote.name,
                &[
                    "-vvv",
                    "-i",
                    pubfile.to_str().unwrap(),
                    "-o",
                    "IdentitiesOnly=yes",
                ],
                "id -un",
            );
            assert!(
                o.status.success(),
                "{key}: {}\n{}\n{}",
                stderr(&o),
                h.daemon().log_text(),
                sshd.log_text()
            );
            assert_eq!(stdout(&o).trim(), remote.name);
            // OpenSSH 9 uses the host-bound method against an OpenSSH 9 server.
            assert!(
                stderr(&o).contains("publickey-hostbound-v00@openssh.com"),
                "{}",
                stderr(&o)
            );
        }
        // ssh bound each session to the host key through the proxy, and
        // keyholder verified and kept the binding itself (never forwarded).
        assert!(h
            .daemon()
            .wait_log(&format!("session bound for uid={}", h.user("member").uid())));
        assert!(!h.daemon().log_text().contains("session binding refused"));
        // RSA was signed with SHA-2, as ssh asked (OpenSSH 8.8+ clients and
        // servers no longer use ssh-rsa/SHA-1 by default; the agent itself still
        // signs it, see `rsa_signs_with_every_flag_exactly_as_the_agent_does`):
        // flags preserved.
        assert!(
            sshd.log_text().contains("RSA SHA256:") || sshd.log_text().contains("rsa-sha2"),
            "{}",
            sshd.log_text()
        );

        // Others cannot log in: no key offered, and nothing signed.
        for who in [h.as_user("phab_user"), h.as_user("outsider")] {
            let o = sshd.ssh(&who, &h.daemon().socket, &remote.name, &[], "true");
            assert!(!o.status.success(), "{who:?} logged in");
        }
        let log = h.daemon().log_text();
        assert!(
            log.contains(&format!("sign user={} ", h.user("member").name))
                && log.contains("decision=granted"),
            "{log}"
        );
        assert!(
            log.contains(&format!("remote_user={}", remote.name)),
            "{log}"
        );
        assert_eq!(h.agent.keys(), before);
    });
}

#[test]
fn sign_requests_are_granted_by_group_and_refused_otherwise() {
    require_root!();
    each_backend(|backend| {
        let h = host(backend, "");
        let before = h.agent.keys();
        let blob = pubkey_blob(&h.dir.join("deploy.pub"));
        let sign = sign_request(&blob, &userauth_data(&blob, "deploy", "ssh-ed25519"), 0);
        // The member's own connection: granted.
        let answers = raw_as(
            &h.as_user("member"),
            &h.daemon().socket,
            std::slice::from_ref(&sign),
        );
        assert_eq!(answers[0].as_ref().map(|a| a[0]), Some(SIGN_RESPONSE));
        // Other users, sending the very same request: FAILURE.
        for who in [h.as_user("phab_user"), h.as_user("outsider")] {
            let answers = raw_as(&who, &h.daemon().socket, &[sign.clone(), vec![11]]);
            assert_eq!(answers[0], Some(vec![FAILURE]), "{who:?}");
            // the connection stays usable
            assert_eq!(answers[1].as_ref().map(|a| a[0]), Some(IDENTITIES_ANSWER));
        }
        assert!(h.daemon().wait_log("reason=not-in-allowed-group"));
        assert!(h
            .daemon()
            .log_text()
            .contains(&format!("sign user={} ", h.user("outsider").name)));
        // Root may use every configured key, but never an unconfigured one.
        let mut raw = Raw::connect(&h.daemon().socket);
        assert_eq!(raw.call(&sign).unwrap()[0], SIGN_RESPONSE);
        let stray = pubkey_blob(&h.dir.join("stray.pub"));
        let answer = raw
            .call(&sign_request(
                &stray,
                &userauth_data(&stray, "x", "ssh-ed25519"),
                0,
            ))
            .unwrap();
        assert_eq!(answer, vec![FAILURE]);
        assert!(h.daemon().wait_log("reason=key-not-configured"));
        assert_eq!(h.agent.keys(), before);
    });
}

#[test]
fn non_userauth_data_is_refused_unless_the_key_allows_any_data() {
    require_root!();
    each_backend(|backend| {
        let signers = TestGroup::create("sig");
        let h = host(backend, "");
        // ssh-keygen -Y sign sends SSHSIG data, not a user-auth request.
        let msg = h.dir.join("msg.txt");
        std::fs::write(&msg, "release v1\n").unwrap();
        std::fs::set_permissions(&msg, std::fs::Permissions::from_mode(0o644)).unwrap();
        let before = h.agent.keys();
        let o = run(h
            .as_user("member")
            .command("ssh-keygen")
            .args(["-Y", "sign", "-n", "file", "-f"])
            .arg(h.dir.join("deploy.pub"))
            .arg("-")
            .env("SSH_AUTH_SOCK", &h.daemon().socket)
            .stdin(std::process::Stdio::piped()));
        assert!(!o.status.success(), "SSHSIG signed: {}", stdout(&o));
        assert!(h.daemon().wait_log("reason=\"not-ssh-userauth"));
        assert_eq!(h.agent.keys(), before);
        drop(h);

        // The same with allow_any_data = true on a separate host.
        let dir = TempDir::new("any");
        let agent = Agent::new(&dir, backend);
        let key = keygen(dir.path(), "gitsign", "ed25519", "");
        let user = TestUser::create("s", &[&signers]);
        let daemon = Daemon::start(
            &dir,
            &agent,
            &format!(
                "[keys.gitsign]\ngroups = [\"{}\"]\nallow_any_data = true\n",
                signers.name
            ),
        );
        agent.add(&key);
        let data = dir.join("data");
        std::fs::write(&data, "hello\n").unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let o = run(user
            .as_user()
            .command("ssh-keygen")
            .args(["-Y", "sign", "-n", "file", "-f"])
            .arg(dir.join("gitsign.pub"))
            .arg(&data)
            .env("SSH_AUTH_SOCK", &daemon.socket));
        assert!(o.status.success(), "{}\n{}", stderr(&o), daemon.log_text());
        assert!(dir.join("data.sig").exists());
    });
}

#[test]
fn hostile_bytes_get_failure_or_a_closed_connection_and_change_nothing() {
    require_root!();
    each_backend(|backend| {
        let h = host(backend, "");
        let before = h.agent.keys();
        let blob = pubkey_blob(&h.dir.join("deploy.pub"));
        let good = sign_request(&blob, &userauth_data(&blob, "u", "ssh-ed25519"), 0);

        // On one connection: unknown types, trailing bytes, truncated bodies all
        // get FAILURE and the connection stays usable.
        let mut raw = Raw::connect(&h.daemon().socket);
        for t in [0u8, 1, 2, 9, 12, 14, 24, 28, 30, 200, 255] {
            assert_eq!(raw.call(&[t]), Some(vec![FAILURE]), "type {t}");
        }
        let mut trailing = good.clone();
        trailing.push(0);
        assert_eq!(raw.call(&trailing), Some(vec![FAILURE]));
        assert_eq!(raw.call(&[11, 0]), Some(vec![FAILURE]));
        for cut in [1, 2, 5, 20, good.len() - 1] {
            assert_eq!(raw.call(&good[..cut]), Some(vec![FAILURE]), "cut {cut}");
        }
        assert_eq!(raw.call(&[27, 0, 0, 0, 9]), Some(vec![FAILURE]));
        assert_eq!(
            raw.call(&[27, 0, 0, 0, 3, b'f', b'o', b'o']),
            Some(vec![FAILURE])
        );
        // …and it still works
        assert_eq!(raw.call(&good).unwrap()[0], SIGN_RESPONSE);
        assert_eq!(raw.call(&[11]).unwrap()[0], IDENTITIES_ANSWER);

        // Zero length: closed.
        let mut raw = Raw::connect(&h.daemon().socket);
        raw.send_bytes(&[0, 0, 0, 0]);
        assert!(raw.closed());
        // A 2 GiB length header: closed at once, nothing buffered.
        let mut raw = Raw::connect(&h.daemon().socket);
        raw.send_bytes(&[0x80, 0, 0, 0, 13, 1, 2, 3]);
        assert!(raw.closed());
        // Just over 256 KiB: closed.
        let mut raw = Raw::connect(&h.daemon().socket);
        raw.send_bytes(&(256 * 1024 + 1u32).to_be_bytes());
        assert!(raw.closed());
        // Exactly 256 KiB of a sign request with junk: FAILURE, not closed.
        let mut raw = Raw::connect(&h.daemon().socket);
        let mut big = vec![13u8];
        big.resize(256 * 1024, 0xAA);
        assert_eq!(raw.call(&big), Some(vec![FAILURE]));
        // A truncated frame followed by close: the daemon just drops it.
        let mut raw = Raw::connect(&h.daemon().socket);
        raw.send_bytes(&[0, 0, 0, 50, 13, 0]);
        drop(raw);

        assert_eq!(h.agent.keys(), before);
        // The daemon is still serving everyone.
        assert_eq!(
            h.listed(&h.as_user("member")),
            h.expect(&["deploy", "deployrsa"])
        );
    });
}

#[test]
fn query_and_status_extensions_are_answered_by_the_daemon() {
    require_root!();
    each_backend(|backend| {
        let h = host(backend, "");
        let before = h.agent.keys();
        let mut raw = Raw::connect(&h.daemon().socket);
        let answer = raw.call(&[vec![27u8], string(b"query")].concat()).unwrap();
        assert_eq!(
            query_names(&answer),
            Ok(vec![
                "query".to_owned(),
                "session-bind@openssh.com".to_owned(),
                "status@keyholder".to_owned(),
                "grant-request@keyholder".to_owned(),
                "grant-approve@keyholder".to_owned(),
                "grant-deny@keyholder".to_owned(),
                "grant-list@keyholder".to_owned(),
                "grant-revoke@keyholder".to_owned(),
            ])
        );
        let answer = raw
            .call(&[vec![27u8], string(b"status@keyholder")].concat())
            .unwrap();
        assert_eq!(answer[0], EXTENSION_RESPONSE);
        let text = String::from_utf8_lossy(&answer);
        assert!(text.contains("deploy") && text.contains("phab"), "{text}");
        // An unknown extension is refused, never forwarded.
        assert_eq!(
            raw.call(&[vec![27u8], string(b"restrict-destination-v00@openssh.com")].concat()),
            Some(vec![FAILURE])
        );
        // session-bind with a bad signature: refused by keyholder, not forwarded.
        let bind = [
            vec![27u8],
            string(b"session-bind@openssh.com"),
            string(&pubkey_blob(&h.dir.join("deploy.pub"))),
            string(&[1u8; 32]),
            string(&[string(b"ssh-ed25519"), string(&[0u8; 64])].concat()),
            vec![0u8],
        ]
        .concat();
        // A supported extension that failed: EXTENSION_FAILURE (28), as
        // OpenSSH's agent answers; FAILURE (5) would read "not supported".
        assert_eq!(raw.call(&bind), Some(vec![EXTENSION_FAILURE]));
        // Malformed (truncated): refused the same way.
        assert_eq!(
            raw.call(&bind[..bind.len() - 1]),
            Some(vec![EXTENSION_FAILURE])
        );
        assert_eq!(raw.call(&[11]).unwrap()[0], IDENTITIES_ANSWER);
        assert_eq!(h.agent.keys(), before);
    });
}

/// The extension names of an answer to `query`, read as OpenSSH's
/// `ssh_agent_query_extensions` (authfd.c) reads them: the type byte must be
/// EXTENSION_RESPONSE, then `string` "query", then `string`s back to back
/// until the message ends; anything else is "invalid format".
fn query_names(answer: &[u8]) -> Result<Vec<String>, &'static str> {
    let (&kind, mut rest) = answer.split_first().ok_or("empty")?;
    if kind == FAILURE || kind == EXTENSION_FAILURE {
        return Err("agent failure");
    }
    if kind != EXTENSION_RESPONSE {
        return Err("invalid format");
    }
    let (name, tail) = take_string(rest).ok_or("invalid format")?;
    if name != b"query" {
        return Err("invalid format");
    }
    rest = tail;
    let mut names = Vec::new();
    while !rest.is_empty() {
        let (ext, tail) = take_string(rest).ok_or("invalid format")?;
        names.push(String::from_utf8(ext.to_vec()).map_err(|_| "invalid format")?);
        rest = tail;
    }
    Ok(names)
}

/// The `string signature` of a SIGN_RESPONSE, and the algorithm name in it.
fn signature_algorithm(answer: &[u8]) -> String {
    assert_eq!(answer.first(), Some(&SIGN_RESPONSE), "{answer:?}");
    let (sig, rest) = take_string(&answer[1..]).unwrap();
    assert!(rest.is_empty());
    let (alg, _) = take_string(sig).unwrap();
    String::from_utf8(alg.to_vec()).unwrap()
}

#[test]
fn rsa_signs_with_every_flag_exactly_as_the_agent_does() {
    require_root!();
    each_backend(|backend| {
        let h = host(backend, "");
        let blob = pubkey_blob(&h.dir.join("deployrsa.pub"));
        let mut direct = Raw::connect(&h.agent.socket);
        let mut proxied = Raw::connect(&h.daemon().socket);
        // flags 0 (ssh-rsa, SHA-1), 2 (SHA-256) and 4 (SHA-512), each on the
        // same connection, so a failure would also show as a dropped upstream.
        for (flags, alg) in [
            (0, "ssh-rsa"),
            (2, "rsa-sha2-256"),
            (4, "rsa-sha2-512"),
            (0, "ssh-rsa"),
        ] {
            let data = userauth_data(&blob, "deploy", alg);
            let request = sign_request(&blob, &data, flags);
            let want = direct.call(&request).unwrap();
            assert_eq!(signature_algorithm(&want), alg);
            let got = proxied.call(&request).unwrap();
            assert_eq!(signature_algorithm(&got), alg, "flags {flags}");
            // PKCS#1 v1.5 is deterministic: relayed byte for byte.
            assert_eq!(got, want, "flags {flags}");
        }
        // Every one granted, none taken for an upstream failure.
        let log = h.daemon().log_text();
        assert!(!log.contains("failed upstream"), "{log}");
        assert!(!log.contains("unreachable"), "{log}");
        assert_eq!(log.matches("decision=granted").count(), 4, "{log}");
    });
}

#[test]
fn a_setgid_process_gains_nothing_from_its_own_gid() {
    require_root!();
    each_backend(|backend| {
        let h = host(backend, "");
        let before = h.agent.keys();
        // The outsider's process runs with the deployers gid (as a setgid program
        // would), but the user database says it is not a member.
        let who = As::Ids {
            uid: h.user("outsider").uid(),
            gid: h.group("deployers").gid(),
        };
        let o = run(who.command("id").arg("-g"));
        assert_eq!(stdout(&o).trim(), h.group("deployers").gid().to_string());
        assert_eq!(h.listed(&who), Vec::<String>::new());
        let blob = pubkey_blob(&h.dir.join("deploy.pub"));
        let o = run(who
            .command("ssh-keygen")
            .args(["-Y", "sign", "-n", "file", "-f"])
            .arg(h.dir.join("deploy.pub"))
            .arg("-")
            .env("SSH_AUTH_SOCK", &h.daemon().socket));
        assert!(!o.status.success());
        assert!(!blob.is_empty());
        assert_eq!(h.agent.keys(), before);
    });
}

#[test]
fn a_uid_without_passwd_entry_has_no_groups() {
    require_root!();
    each_backend(|backend| {
        let h = host(backend, "");
        let before = h.agent.keys();
        let who = As::Ids {
            uid: 3_987_654,
            gid: h.group("deployers").gid(),
        };
        assert_eq!(h.listed(&who), Vec::<String>::new());
        let o = h.daemon().ssh_add(&who, &["-D"]);
        assert!(!o.status.success());
        assert_eq!(h.agent.keys(), before);
        assert!(h.daemon().wait_log("uid=3987654"));
    });
}

#[test]
fn group_changes_apply_to_the_next_connection_without_restart() {
    require_root!();
    each_backend(|backend| {
        let h = host(backend, "");
        let user = TestUser::create("g", &[]);
        assert_eq!(h.listed(&user.as_user()), Vec::<String>::new());
        user.join(h.group("deployers"));
        assert_eq!(
            h.listed(&user.as_user()),
            h.expect(&["deploy", "deployrsa"])
        );
        user.leave(h.group("deployers"));
        assert_eq!(h.listed(&user.as_user()), Vec::<String>::new());
        user.join(h.group("phab_admins"));
        assert_eq!(h.listed(&user.as_user()), h.expect(&["phab"]));
    });
}

#[test]
fn gpasswd_applies_to_the_next_request_on_an_open_connection() {
    require_root!();
    each_backend(|backend| gpasswd_on_an_open_connection(backend, ""));
}

#[test]
fn gpasswd_applies_to_the_next_request_without_a_lookup_cache() {
    require_root!();
    each_backend(|backend| {
        gpasswd_on_an_open_connection(backend, "[limits]\nlookup_cache_secs = 0\n")
    });
}

fn gpasswd_on_an_open_connection(backend: Backend, extra: &str) {
    let h = host(backend, extra);
    let before = h.agent.keys();
    let user = TestUser::create("gp", &[h.group("deployers")]);
    let blob = pubkey_blob(&h.dir.join("deploy.pub"));
    let sign = sign_request(&blob, &userauth_data(&blob, "deploy", "ssh-ed25519"), 0);
    let marks: Vec<_> = ["left", "gone", "back", "again"]
        .iter()
        .map(|m| std::env::temp_dir().join(unique(m)))
        .collect();
    // One connection, held open across `gpasswd -d` and `gpasswd -a`, each
    // made while the connection waits and within the lookup cache's age.
    let script = [
        Step::Send(sign.clone()),
        Step::Send(vec![11]),
        Step::Mark(marks[0].clone()),
        Step::Wait(marks[1].clone()),
        Step::Send(sign.clone()),
        Step::Send(vec![11]),
        Step::Mark(marks[2].clone()),
        Step::Wait(marks[3].clone()),
        Step::Send(sign.clone()),
        Step::Send(vec![11]),
    ];
    let (who, socket) = (user.as_user(), h.daemon().socket.clone());
    let client = std::thread::spawn(move || raw_script_as(&who, &socket, &script));
    assert!(wait_for(Duration::from_secs(30), || marks[0].exists()));
    user.leave(h.group("deployers"));
    std::fs::write(&marks[1], "").unwrap();
    assert!(wait_for(Duration::from_secs(30), || marks[2].exists()));
    user.join(h.group("deployers"));
    std::fs::write(&marks[3], "").unwrap();
    let answers = client.join().unwrap();
    for m in &marks {
        let _ = std::fs::remove_file(m);
    }
    let kind = |i: usize| answers[i].as_ref().map(|a| a[0]);
    let listed = |i: usize| listed_blobs(answers[i].as_deref().unwrap()).unwrap();
    let deploy_keys = {
        let mut v = vec![blob.clone(), pubkey_blob(&h.dir.join("deployrsa.pub"))];
        v.sort();
        v
    };
    // A member: signs and lists its keys.
    assert_eq!(kind(0), Some(SIGN_RESPONSE));
    assert_eq!(listed(1), deploy_keys);
    // Removed from the group: the very next request on the same connection
    // is refused, and the agent is unchanged.
    assert_eq!(answers[2], Some(vec![FAILURE]));
    assert_eq!(listed(3), Vec::<Vec<u8>>::new());
    assert!(h
        .daemon()
        .wait_log(&format!("sign user={} uid={} ", user.name, user.uid())));
    assert!(h.daemon().log_text().lines().any(|l| l.contains(&user.name)
        && l.contains("decision=refused")
        && l.contains("reason=not-in-allowed-group")));
    assert_eq!(h.agent.keys(), before);
    // Added back: the next request signs again.
    assert_eq!(kind(4), Some(SIGN_RESPONSE));
    assert_eq!(listed(5), deploy_keys);
}

#[test]
fn sighup_applies_a_good_config_and_keeps_the_last_good_one_on_error() {
    require_root!();
    each_backend(|backend| {
        let h = host(backend, "");
        assert_eq!(h.listed(&h.as_user("phab_user")), h.expect(&["phab"]));
        // Good: give phab-admins the deploy key too.
        let good = Daemon::config_for(
            &h.dir,
            &h.agent,
            &format!(
                "[keys.deploy]\ngroups = [\"{d}\", \"{p}\"]\n\n[keys.phab]\ngroups = [\"{p}\"]\n",
                d = h.group("deployers").name,
                p = h.group("phab_admins").name
            ),
        );
        std::fs::write(&h.daemon().config, good).unwrap();
        h.daemon().signal(Signal::SIGHUP);
        assert!(h.daemon().wait_log("configuration reloaded"));
        assert_eq!(
            h.listed(&h.as_user("phab_user")),
            h.expect(&["deploy", "phab"])
        );
        // deployrsa is no longer configured: the member loses it.
        assert_eq!(h.listed(&h.as_user("member")), h.expect(&["deploy"]));

        // Broken: unknown field. The last good configuration stays in force.
        std::fs::write(&h.daemon().config, "bogus_field = 1\n").unwrap();
        h.daemon().signal(Signal::SIGHUP);
        assert!(h
            .daemon()
            .wait_log("reload failed, keeping the last good configuration"));
        assert!(h.daemon().log_text().contains("bogus_field"));
        assert_eq!(
            h.listed(&h.as_user("phab_user")),
            h.expect(&["deploy", "phab"])
        );
    });
}

#[test]
fn spawned_agent_is_supervised_and_everything_is_cleaned_up_on_sigterm() {
    require_root!();
    let mut site = Site::builder("sp", Backend::Upstream)
        .spawned_agent()
        .key(
            SiteKey::new("deploy", "ed25519")
                .groups(&["root"])
                .unadded(),
        )
        .build();
    let (agent_sock, key) = (site.agent_socket(), site.key("deploy"));
    let d = site.daemon_mut();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&agent_sock), 0o600);
    assert_eq!(mode(&d.socket), 0o666);
    // Arm by hand against the upstream socket.
    let o = run(std::process::Command::new("ssh-add")
        .arg(&key)
        .env("SSH_AUTH_SOCK", &agent_sock));
    assert!(o.status.success());
    assert_eq!(d.listed(&As::Root).len(), 1);

    // Kill the agent: keys are gone, the daemon restarts it, service resumes.
    let log = d.log_text();
    let pid: i32 = log
        .split("started (pid ")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no agent pid in log: {log}"));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    assert!(d.wait_log("upstream agent exited"));
    assert!(d.wait_log("upstream agent restarted"));
    assert!(wait_for(Duration::from_secs(10), || {
        std::os::unix::net::UnixStream::connect(&agent_sock).is_ok()
    }));
    assert_eq!(d.listed(&As::Root), Vec::<String>::new());
    let o = d.ssh_add(&As::Root, &["-l"]);
    assert_eq!(o.status.code(), Some(1), "listing works again (empty)");

    let status = d.stop();
    assert!(status.success(), "{status:?}");
    assert!(!d.socket.exists(), "proxy socket left behind");
    assert!(!agent_sock.exists(), "agent socket left behind");
    assert!(d.log_text().contains("upstream agent stopped"));
}

#[test]
fn a_stale_socket_is_replaced_and_a_regular_file_is_refused() {
    require_root!();
    each_backend(|backend| {
        let dir = TempDir::new("st");
        let agent = Agent::new(&dir, backend);
        // A stale socket from a crashed daemon: bound, then its listener gone.
        let stale = std::os::unix::net::UnixListener::bind(dir.join("proxy.sock")).unwrap();
        drop(stale);
        assert!(std::fs::symlink_metadata(dir.join("proxy.sock"))
            .unwrap()
            .file_type()
            .is_socket());
        let d = Daemon::start(&dir, &agent, "");
        assert!(d.wait_log("replaced stale socket"));
        drop(d);

        // A regular file at the socket path: an error, and the file stays.
        std::fs::write(dir.join("proxy.sock"), "not a socket").unwrap();
        let o = run(std::process::Command::new(KEYHOLDER)
            .args(["daemon", "--log", "stderr", "--config"])
            .arg(dir.join("keyholder.toml")));
        assert_eq!(o.status.code(), Some(1));
        assert!(stderr(&o).contains("is not a socket"), "{}", stderr(&o));
        assert_eq!(
            std::fs::read_to_string(dir.join("proxy.sock")).unwrap(),
            "not a socket"
        );
    });
}

#[test]
fn non_root_cannot_run_the_daemon() {
    require_root!();
    let user = TestUser::create("n", &[]);
    let o = keyholder(
        &user.as_user(),
        &["daemon", "--config", "/nonexistent.toml"],
    );
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(err.contains("must be run as root"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn a_reload_applies_at_once_to_open_connections_with_their_groups_looked_up_again() {
    require_root!();
    each_backend(|backend| {
        let h = host(backend, "");
        let newcomers = TestGroup::create("new");
        let user = TestUser::create("n", &[h.group("deployers"), &newcomers]);
        let reached = std::env::temp_dir().join(unique("reached"));
        let go = std::env::temp_dir().join(unique("go"));
        let script = [
            Step::Send(vec![11]),
            Step::Mark(reached.clone()),
            Step::Wait(go.clone()),
            Step::Send(vec![11]),
        ];
        let (who, socket) = (user.as_user(), h.daemon().socket.clone());
        let client = std::thread::spawn(move || raw_script_as(&who, &socket, &script));
        assert!(wait_for(Duration::from_secs(30), || reached.exists()));

        // deploy moves from deployers to newcomers, a group no key named when
        // the connection was made; phab gains newcomers too.
        let config = Daemon::config_for(
            &h.dir,
            &h.agent,
            &format!(
                "[keys.deploy]\ngroups = [\"{n}\"]\n\n[keys.deployrsa]\ngroups = [\"{d}\"]\n\n\
             [keys.phab]\ngroups = [\"{p}\", \"{n}\"]\n",
                n = newcomers.name,
                d = h.group("deployers").name,
                p = h.group("phab_admins").name
            ),
        );
        std::fs::write(&h.daemon().config, config).unwrap();
        h.daemon().signal(Signal::SIGHUP);
        assert!(h.daemon().wait_log("configuration reloaded"));
        std::fs::write(&go, "").unwrap();
        let answers = client.join().unwrap();
        let _ = std::fs::remove_file(&reached);
        let _ = std::fs::remove_file(&go);

        let blobs = |names: &[&str]| {
            let mut v: Vec<Vec<u8>> = names
                .iter()
                .map(|n| pubkey_blob(&h.dir.join(&format!("{n}.pub"))))
                .collect();
            v.sort();
            Some(v)
        };
        let open: Vec<_> = answers
            .iter()
            .map(|a| listed_blobs(a.as_deref().unwrap()))
            .collect();
        assert_eq!(open[0], blobs(&["deploy", "deployrsa"]));
        // The open connection gets the new rules at its next request, with its
        // groups looked up again (SIGHUP drops the lookup cache): deploy stays
        // (now through newcomers) and phab comes through newcomers too.
        assert_eq!(open[1], blobs(&["deploy", "deployrsa", "phab"]));
        // So does the next connection.
        assert_eq!(
            h.listed(&user.as_user()),
            h.expect(&["deploy", "deployrsa", "phab"])
        );
    });
}
