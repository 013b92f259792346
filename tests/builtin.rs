//! End-to-end tests of the builtin backend (`[agent] backend = "builtin"`):
//! the daemon holds the keys and serves `agent.socket` itself. Real
//! `ssh-add`, `ssh-keygen`, `ssh`, `sshd`, a real OpenSSH `ssh-agent` as the
//! reference for exact signatures, and throwaway `kht-` users. Every
//! refusal is asserted twice: FAILURE (or a failed command), and the keys
//! held are unchanged (`ssh-add -L` on agent.socket).
//!
//! Behaviour common to both backends is tested in daemon.rs and
//! commands.rs, which run against both.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use signature::Verifier;
use ssh_encoding::Decode;

raw_client_helper!();

/// A daemon with the builtin backend and `keys` (name, ssh-keygen type,
/// bits or "") generated in `dir`, configured for `group`, not added yet.
struct Builtin {
    dir: TempDir,
    agent: Agent,
    daemon: Daemon,
}

impl Builtin {
    fn new(keys: &[(&str, &str, &str)], group: &str, extra: &str) -> Self {
        Self::with_env(keys, group, extra, &[])
    }

    /// `env`: `NAME=VALUE` for the daemon (the `KEYHOLDER_BUILTIN_*` knobs).
    fn with_env(keys: &[(&str, &str, &str)], group: &str, extra: &str, env: &[&str]) -> Self {
        let dir = TempDir::new("b");
        let mut tables = String::new();
        for (name, kind, bits) in keys {
            keygen_bits(dir.path(), name, kind, bits);
            tables.push_str(&format!("[keys.{name}]\ngroups = [\"{group}\"]\n\n"));
        }
        let agent = Agent::new(&dir, Backend::Builtin);
        let body = Daemon::config_for(&dir, &agent, &format!("{extra}\n{tables}"));
        let mut wrapper = vec!["env"];
        wrapper.extend_from_slice(env);
        let daemon = Daemon::start_via(&dir, &body, &wrapper);
        assert!(
            wait_for(Duration::from_secs(10), || {
                std::os::unix::net::UnixStream::connect(&agent.socket).is_ok()
            }),
            "{}",
            daemon.log_text()
        );
        Self { dir, agent, daemon }
    }

    fn key(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn pub_path(&self, name: &str) -> PathBuf {
        self.dir.join(&format!("{name}.pub"))
    }

    fn blob(&self, name: &str) -> Vec<u8> {
        pubkey_blob(&self.pub_path(name))
    }

    /// `TYPE BASE64` of a key.
    fn pubkey(&self, name: &str) -> String {
        first_two(&std::fs::read_to_string(self.pub_path(name)).unwrap())
    }

    /// What agent.socket holds, without comments, sorted.
    fn held(&self) -> Vec<String> {
        let mut v: Vec<String> = self.agent.keys().iter().map(|l| first_two(l)).collect();
        v.sort();
        v
    }

    fn expect(&self, names: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = names.iter().map(|n| self.pubkey(n)).collect();
        v.sort();
        v
    }
}

fn keygen_bits(dir: &Path, name: &str, kind: &str, bits: &str) -> PathBuf {
    if bits.is_empty() {
        return keygen(dir, name, kind, "");
    }
    let path = dir.join(name);
    let o = run(std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", kind, "-b", bits, "-N", "", "-C", name, "-f"])
        .arg(&path));
    assert!(o.status.success(), "ssh-keygen: {}", stderr(&o));
    std::fs::set_permissions(
        dir.join(format!("{name}.pub")),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    path
}

fn first_two(line: &str) -> String {
    line.split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The `string signature` of a SIGN_RESPONSE.
fn signature_blob(answer: &[u8]) -> Vec<u8> {
    assert_eq!(answer.first(), Some(&SIGN_RESPONSE), "{answer:?}");
    let (sig, rest) = take_string(&answer[1..]).unwrap();
    assert!(rest.is_empty());
    sig.to_vec()
}

fn algorithm_of(sig: &[u8]) -> String {
    String::from_utf8(take_string(sig).unwrap().0.to_vec()).unwrap()
}

#[test]
fn the_admin_socket_refuses_non_root_peers() {
    require_root!();
    let b = Builtin::new(&[("deploy", "ed25519", "")], "root", "");
    b.agent.add(&b.key("deploy"));
    let before = b.held();
    let mode = std::fs::metadata(&b.agent.socket)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let user = TestUser::create("ba", &[]);

    // 0600 root: the kernel keeps the user out.
    let o = run(user
        .as_user()
        .command("ssh-add")
        .arg("-l")
        .env("SSH_AUTH_SOCK", &b.agent.socket));
    assert_eq!(o.status.code(), Some(2), "{}{}", stdout(&o), stderr(&o));

    // Even if the socket is opened up (a mistake), SO_PEERCRED keeps them out:
    // the connection is closed before anything is answered, and logged.
    std::fs::set_permissions(&b.agent.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let o = run(user
        .as_user()
        .command("ssh-add")
        .arg("-l")
        .env("SSH_AUTH_SOCK", &b.agent.socket));
    assert!(!o.status.success(), "{}", stdout(&o));
    assert!(!stdout(&o).contains("SHA256:"), "{}", stdout(&o));
    let o = run(user
        .as_user()
        .command("ssh-add")
        .arg("-D")
        .env("SSH_AUTH_SOCK", &b.agent.socket));
    assert!(!o.status.success());
    assert!(b.daemon.wait_log(&format!(
        "agent.socket: refused connection of uid={}",
        user.uid()
    )));
    assert_eq!(b.held(), before);
    // root still is served.
    assert_eq!(b.held(), b.expect(&["deploy"]));
}

#[test]
fn ssh_add_l_d_capital_d_and_t_work_against_agent_socket() {
    require_root!();
    let b = Builtin::new(
        &[
            ("a", "ed25519", ""),
            ("r", "rsa", "3072"),
            ("e", "ecdsa", ""),
        ],
        "root",
        "",
    );
    let o = b.agent.ssh_add(&["-l"]);
    assert_eq!(o.status.code(), Some(1), "empty: {}", stdout(&o));
    for k in ["a", "r", "e"] {
        b.agent.add(&b.key(k));
    }
    let o = b.agent.ssh_add(&["-l"]);
    assert!(o.status.success());
    let out = stdout(&o);
    assert!(
        out.contains("3072 SHA256:") && out.contains("(RSA)"),
        "{out}"
    );
    assert!(
        out.contains("(ED25519)") && out.contains("(ECDSA)"),
        "{out}"
    );
    assert_eq!(b.held(), b.expect(&["a", "r", "e"]));
    // The proxy lists the same keys (root may use every configured one).
    let mut listed: Vec<String> = b
        .daemon
        .listed(&As::Root)
        .iter()
        .map(|l| first_two(l))
        .collect();
    listed.sort();
    assert_eq!(listed, b.expect(&["a", "r", "e"]));

    // -d: one key.
    let o = b.agent.ssh_add(&["-d", b.pub_path("r").to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(b.held(), b.expect(&["a", "e"]));
    // -d of a key not held: refused, nothing changes.
    let o = b.agent.ssh_add(&["-d", b.pub_path("r").to_str().unwrap()]);
    assert!(!o.status.success());
    assert_eq!(b.held(), b.expect(&["a", "e"]));

    // -t: the key disappears at expiry (from agent.socket and the proxy).
    let o = b.agent.ssh_add(&["-t", "2", b.key("r").to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("Lifetime set to 2 seconds"),
        "{}",
        stderr(&o)
    );
    assert_eq!(b.held(), b.expect(&["a", "e", "r"]));
    assert!(wait_for(Duration::from_secs(10), || b.held()
        == b.expect(&["a", "e"])));
    assert!(b.daemon.wait_log("reached its lifetime; removed"));
    assert_eq!(b.daemon.listed(&As::Root).len(), 2);

    // -D: all.
    let o = b.agent.ssh_add(&["-D"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(b.held().is_empty());
    assert_eq!(b.daemon.ssh_add(&As::Root, &["-l"]).status.code(), Some(1));
    assert!(b.daemon.wait_log("removed all keys (2)"));
}

#[test]
fn confirm_and_destination_constraints_smartcards_and_lock_are_refused_and_logged() {
    require_root!();
    let b = Builtin::new(&[("a", "ed25519", ""), ("c", "ed25519", "")], "root", "");
    b.agent.add(&b.key("a"));
    let before = b.held();
    // ssh-add -c (confirm): refused, not added.
    let o = b.agent.ssh_add(&["-c", b.key("c").to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(b
        .daemon
        .wait_log("the confirm constraint (ssh-add -c) is not supported"));
    // ssh-add -h (destination constraint), to a host in a known_hosts file.
    let known = b.dir.join("known_hosts");
    let host_pub = std::fs::read_to_string(b.pub_path("a")).unwrap();
    std::fs::write(&known, format!("somehost {}\n", first_two(&host_pub))).unwrap();
    let o = b.agent.ssh_add(&[
        "-H",
        known.to_str().unwrap(),
        "-h",
        "somehost",
        b.key("c").to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(
        b.daemon.wait_log("restrict-destination"),
        "{}\n{}",
        stderr(&o),
        b.daemon.log_text()
    );
    // -x / -X: lock and unlock.
    let o = run(std::process::Command::new("setsid")
        .args(["-w", "ssh-add", "-x"])
        .env("SSH_AUTH_SOCK", &b.agent.socket)
        .env("SSH_ASKPASS", "/bin/false")
        .env("SSH_ASKPASS_REQUIRE", "force"));
    assert!(!o.status.success());
    let mut raw = Raw::connect(&b.agent.socket);
    assert_eq!(
        raw.call(&[vec![22u8], string(b"pw")].concat()),
        Some(vec![FAILURE])
    );
    assert_eq!(
        raw.call(&[vec![23u8], string(b"pw")].concat()),
        Some(vec![FAILURE])
    );
    assert!(b.daemon.wait_log("refused a lock request"));
    assert!(b.daemon.log_text().contains("refused a unlock request"));
    // Smartcard add/remove (ssh-add -s/-e).
    let o = run(std::process::Command::new("setsid")
        .args([
            "-w",
            "ssh-add",
            "-e",
            "/usr/lib/x86_64-linux-gnu/opensc-pkcs11.so",
        ])
        .env("SSH_AUTH_SOCK", &b.agent.socket));
    assert!(!o.status.success());
    for msg in [
        [vec![20u8], string(b"/usr/lib/p11.so"), string(b"")].concat(),
        [vec![21u8], string(b"/usr/lib/p11.so"), string(b"")].concat(),
        [
            vec![26u8],
            string(b"/usr/lib/p11.so"),
            string(b""),
            vec![1, 0, 0, 0, 9],
        ]
        .concat(),
    ] {
        assert_eq!(raw.call(&msg), Some(vec![FAILURE]), "type {}", msg[0]);
    }
    assert!(b.daemon.wait_log("refused a smartcard request"));
    // An unknown constraint type and an unknown request type.
    let keypair = ssh_key::private::KeypairData::Ed25519(
        ssh_key::private::Ed25519Keypair::from_seed(&[9u8; 32]),
    );
    let mut add = vec![25u8];
    ssh_encoding::Encode::encode(&keypair, &mut add).unwrap();
    add.extend(string(b"hand-built"));
    for (constraints, logged) in [
        (vec![7u8], "unknown constraint type 7"),
        (vec![3u8, 0, 0, 0, 9], "maximum-signatures constraint"),
        (
            vec![1u8, 0, 0, 0, 5, 1, 0, 0, 0, 6],
            "lifetime constraint given twice",
        ),
    ] {
        let message = [add.clone(), constraints].concat();
        assert_eq!(raw.call(&message), Some(vec![FAILURE]), "{logged}");
        assert!(b.daemon.wait_log(logged), "{}", b.daemon.log_text());
    }
    assert_eq!(raw.call(&[200u8]), Some(vec![FAILURE]));
    // The connection still works, and nothing changed.
    assert_eq!(raw.call(&[11]).unwrap()[0], IDENTITIES_ANSWER);
    assert_eq!(b.held(), before);
}

#[test]
fn keys_it_cannot_sign_with_are_refused_at_add_time() {
    require_root!();
    let b = Builtin::new(&[("good", "ed25519", "")], "root", "");
    b.agent.add(&b.key("good"));
    let before = b.held();

    // DSA (ssh-keygen of OpenSSH 9.2 still makes them).
    let dsa = keygen(b.dir.path(), "dsa", "dsa", "");
    let o = b.agent.ssh_add(&[dsa.to_str().unwrap()]);
    assert!(!o.status.success(), "DSA added");
    assert!(b
        .daemon
        .wait_log("DSA (ssh-dss) keys are not supported by the builtin backend"));
    // RSA below 2048 bits.
    let small = keygen_bits(b.dir.path(), "small", "rsa", "1024");
    let o = b.agent.ssh_add(&[small.to_str().unwrap()]);
    assert!(!o.status.success(), "RSA-1024 added");
    assert!(b
        .daemon
        .wait_log("RSA key of 1024 bits: the builtin backend accepts 2048 to 16384"));
    // A key type nobody knows, hand-built.
    let mut raw = Raw::connect(&b.agent.socket);
    let unknown = [
        vec![17u8],
        string(b"ssh-frobnitz@example.com"),
        string(&[1u8; 32]),
        string(&[2u8; 64]),
        string(b"comment"),
    ]
    .concat();
    assert_eq!(raw.call(&unknown), Some(vec![FAILURE]));
    assert!(b.daemon.wait_log("ssh-frobnitz@example.com"));
    // A security-key (sk-) key, hand-built in its wire form.
    let sk = [
        vec![17u8],
        string(b"sk-ssh-ed25519@openssh.com"),
        string(&[3u8; 32]),
        string(b"ssh:"),
        vec![1u8],
        string(b"handle"),
        string(b""),
        string(b"comment"),
    ]
    .concat();
    assert_eq!(raw.call(&sk), Some(vec![FAILURE]));
    assert!(b.daemon.wait_log("security-key (sk-"));
    // Malformed: truncated Ed25519.
    let cut = [vec![17u8], string(b"ssh-ed25519"), string(&[1u8; 32])].concat();
    assert_eq!(raw.call(&cut), Some(vec![FAILURE]));
    assert_eq!(raw.call(&[11]).unwrap()[0], IDENTITIES_ANSWER);
    assert_eq!(b.held(), before);
}

#[test]
fn every_key_type_and_rsa_flag_signs_as_openssh_does_and_logs_into_sshd() {
    require_root!();
    let keys = [
        ("ed", "ed25519", ""),
        ("rsa2k", "rsa", "2048"),
        ("rsa3k", "rsa", "3072"),
        ("p256", "ecdsa", "256"),
        ("p384", "ecdsa", "384"),
        ("p521", "ecdsa", "521"),
    ];
    let b = Builtin::new(&keys, "root", "");
    // The reference: OpenSSH's own agent holding the same keys.
    let reference_dir = TempDir::new("ref");
    let reference = Agent::start(&reference_dir);
    for (name, _, _) in keys {
        b.agent.add(&b.key(name));
        reference.add(&b.key(name));
    }
    let mut proxy = Raw::connect(&b.daemon.socket);
    let mut direct = Raw::connect(&reference.socket);
    for (name, kind, _) in keys {
        let blob = b.blob(name);
        let key = ssh_key::public::KeyData::decode(&mut &blob[..]).unwrap();
        for flags in [0u32, 2, 4, 6] {
            let data = userauth_data(&blob, "deploy", kind);
            let request = sign_request(&blob, &data, flags);
            let got = signature_blob(&proxy.call(&request).unwrap());
            let want = signature_blob(&direct.call(&request).unwrap());
            // Same algorithm as OpenSSH's agent picks for these flags.
            assert_eq!(
                algorithm_of(&got),
                algorithm_of(&want),
                "{name} flags {flags}"
            );
            if kind == "ecdsa" {
                // Randomized: verify instead.
                let sig = ssh_key::Signature::decode(&mut &got[..]).unwrap();
                key.verify(&data, &sig).unwrap();
            } else {
                // Ed25519 and PKCS#1 v1.5 are deterministic: byte for byte.
                assert_eq!(got, want, "{name} flags {flags}");
                if algorithm_of(&got) != "ssh-rsa" {
                    let sig = ssh_key::Signature::decode(&mut &got[..]).unwrap();
                    key.verify(&data, &sig).unwrap();
                }
            }
        }
    }

    // Real logins through the proxy with each key (RSA: rsa-sha2-512/256).
    let sshd = Sshd::start_with(&b.dir, "PubkeyAcceptedAlgorithms +ssh-rsa");
    let remote = TestUser::create("br", &[]);
    let pubs: Vec<PathBuf> = keys.iter().map(|(n, _, _)| b.pub_path(n)).collect();
    sshd.authorize(
        &remote.name,
        &pubs.iter().map(PathBuf::as_path).collect::<Vec<_>>(),
    );
    for (name, _, _) in keys {
        let o = sshd.ssh(
            &As::Root,
            &b.daemon.socket,
            &remote.name,
            &[
                "-i",
                b.pub_path(name).to_str().unwrap(),
                "-o",
                "IdentitiesOnly=yes",
            ],
            "id -un",
        );
        assert!(
            o.status.success(),
            "{name}: {}\n{}",
            stderr(&o),
            sshd.log_text()
        );
        assert_eq!(stdout(&o).trim(), remote.name);
    }
    // ssh-rsa (SHA-1, flags 0), which sshd accepts here only because it is
    // told to: the signature the builtin backend made verifies.
    let o = sshd.ssh(
        &As::Root,
        &b.daemon.socket,
        &remote.name,
        &[
            "-i",
            b.pub_path("rsa2k").to_str().unwrap(),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "PubkeyAcceptedAlgorithms=ssh-rsa",
        ],
        "id -un",
    );
    assert!(
        o.status.success(),
        "ssh-rsa: {}\n{}",
        stderr(&o),
        sshd.log_text()
    );
    // (sshd checks that the signature's algorithm is the one ssh asked for.)
    let log = sshd.log_text();
    assert_eq!(
        log.matches("Accepted publickey").count(),
        keys.len() + 1,
        "{log}"
    );
    assert!(
        log.contains(": ECDSA SHA256:") && log.contains(": ED25519 SHA256:"),
        "{log}"
    );
}

#[test]
fn a_full_work_queue_yields_failure_and_the_daemon_keeps_serving() {
    require_root!();
    // One signing thread, one slot, a 1 s deadline, and RSA-4096 keys
    // (milliseconds per signature): a burst of concurrent sign requests
    // must overflow it. Bursts grow until one does.
    let b = Builtin::with_env(
        &[("big", "rsa", "4096")],
        "root",
        "[limits]\nupstream_timeout_secs = 1\nmax_connections_per_user = 4096\n",
        &["KEYHOLDER_BUILTIN_WORKERS=1", "KEYHOLDER_BUILTIN_QUEUE=1"],
    );
    b.agent.add(&b.key("big"));
    assert!(b
        .daemon
        .log_text()
        .contains("1 signing thread(s), queue of 1"));
    let blob = b.blob("big");
    let request = sign_request(&blob, &userauth_data(&blob, "deploy", "rsa-sha2-512"), 4);
    let mut failures = 0;
    let mut successes = 0;
    for burst in [100usize, 200, 400, 800] {
        let mut conns: Vec<Raw> = (0..burst).map(|_| Raw::connect(&b.daemon.socket)).collect();
        for c in &mut conns {
            c.send(&request);
        }
        for c in &mut conns {
            match c.recv() {
                Some(a) if a == [FAILURE] => failures += 1,
                Some(a) if a.first() == Some(&SIGN_RESPONSE) => successes += 1,
                other => panic!("unexpected answer {other:?}"),
            }
        }
        if failures > 0 {
            break;
        }
    }
    assert!(failures > 0, "the queue never filled ({successes} signed)");
    assert!(successes > 0);
    assert!(
        // "signing queue full for 1 s" (no slot in time) or "no signature
        // within 1 s" (a slot, but too late), with the pool's size.
        b.daemon
            .wait_log("(upstream_timeout_secs): answering FAILURE (1 workers, queue of 1)"),
        "{}",
        b.daemon.log_text()
    );
    // The audit line says the allowed sign failed for the timeout.
    assert!(b
        .daemon
        .log_text()
        .lines()
        .any(|l| l.contains("decision=failed") && l.contains("reason=upstream-timeout")));
    // Still serving: a sign and a listing succeed, nothing lost.
    let mut raw = Raw::connect(&b.daemon.socket);
    assert_eq!(raw.call(&request).unwrap()[0], SIGN_RESPONSE);
    assert_eq!(raw.call(&[11]).unwrap()[0], IDENTITIES_ANSWER);
    assert_eq!(b.held(), b.expect(&["big"]));
}

#[test]
fn keys_are_dropped_on_exit_and_check_config_rejects_spawn_with_builtin() {
    require_root!();
    let mut b = Builtin::new(&[("k", "ed25519", "")], "root", "");
    b.agent.add(&b.key("k"));
    let status = b.daemon.stop();
    assert!(status.success());
    assert!(b
        .daemon
        .log_text()
        .contains("builtin backend stopped; 1 key(s) dropped from memory"));
    assert!(!b.agent.socket.exists(), "agent.socket left behind");

    // spawn/program do not apply: check-config says so, naming the field.
    let config = b.dir.join("bad.toml");
    std::fs::write(
        &config,
        format!(
            "socket = \"{}\"\n[agent]\nbackend = \"builtin\"\nsocket = \"{}\"\nspawn = true\n",
            b.dir.join("p.sock").display(),
            b.dir.join("a.sock").display()
        ),
    )
    .unwrap();
    let o = keyholder(
        &As::Root,
        &["check-config", "--config", config.to_str().unwrap()],
    );
    assert_eq!(o.status.code(), Some(1));
    let out = format!("{}{}", stdout(&o), stderr(&o));
    assert!(
        out.contains("agent.spawn") && out.contains("does not apply"),
        "{out}"
    );
}
