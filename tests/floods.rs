//! Floods from one local user, end to end (real `ssh-agent`, real daemon,
//! real throwaway users): what they leave in the log and in memory once
//! they are over.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

/// The helper test re-run as other users (see [`worker_main`]).
const WORKER: &str = "floods_worker";
/// The daemon's rate-limit window in these tests.
const WINDOW_MS: u64 = 1000;

#[test]
fn floods_worker() {
    worker_main();
}

raw_client_helper!();

fn framed(message: &[u8]) -> Vec<u8> {
    let mut m = (message.len() as u32).to_be_bytes().to_vec();
    m.extend_from_slice(message);
    m
}

fn read_answer(stream: &mut UnixStream) -> Option<Vec<u8>> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).ok()?;
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    stream.read_exact(&mut body).ok()?;
    Some(body)
}

fn call(stream: &mut UnixStream, message: &[u8]) -> Option<Vec<u8>> {
    stream.write_all(&framed(message)).ok()?;
    read_answer(stream)
}

/// Sends `messages` pipelined on one connection (a writer thread, answers
/// read meanwhile); returns how many answers were FAILURE.
fn pipelined_failures(socket: &Path, messages: &[Vec<u8>]) -> usize {
    let mut s = connect(socket);
    let mut w = s.try_clone().unwrap();
    let bytes: Vec<u8> = messages.iter().flat_map(|m| framed(m)).collect();
    let writer = std::thread::spawn(move || w.write_all(&bytes).is_ok());
    let failures = (0..messages.len())
        .map_while(|_| read_answer(&mut s))
        .filter(|a| a == &[FAILURE])
        .count();
    assert!(writer.join().unwrap());
    failures
}

/// The helper's body: does nothing unless re-run by a test with its
/// environment. Modes: `refuse` (threads × n refused requests, pipelined),
/// `bad` (n connections, each closed by the daemon on a message of length 0),
/// `sign` (n signatures one after the other), `hold` (n connections, each
/// probed with `query`, held until stdin closes).
fn worker_main() {
    let (Ok(mode), Ok(socket)) = (std::env::var("KHT_F_MODE"), std::env::var("KHT_F_SOCKET"))
    else {
        return;
    };
    let var = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} not set"));
    let socket = PathBuf::from(socket);
    let n: usize = var("KHT_F_N").parse().unwrap();
    match mode.as_str() {
        "refuse" => {
            let messages: Vec<Vec<u8>> = var("KHT_F_MESSAGES").split(',').map(unhex).collect();
            let threads: usize = var("KHT_F_THREADS").parse().unwrap();
            let each: Vec<Vec<u8>> = messages.iter().cycle().take(n).cloned().collect();
            let failures: usize = std::thread::scope(|s| {
                let handles: Vec<_> = (0..threads)
                    .map(|_| s.spawn(|| pipelined_failures(&socket, &each)))
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).sum()
            });
            println!("REFUSED sent={} failures={failures}", threads * n);
        }
        "sign" => {
            let message = unhex(&var("KHT_F_MESSAGE"));
            let mut s = connect(&socket);
            let signed = (0..n)
                .filter(|_| call(&mut s, &message).is_some_and(|a| a[0] == SIGN_RESPONSE))
                .count();
            println!("SIGNED n={signed}");
        }
        "bad" => {
            // A length of 0 ends the connection.
            let closed = (0..n)
                .filter(|_| {
                    let mut s = connect(&socket);
                    s.write_all(&[0, 0, 0, 0]).is_ok() && read_answer(&mut s).is_none()
                })
                .count();
            println!("CLOSED n={closed}");
        }
        "hold" => {
            let mut kept = Vec::new();
            let mut refused = 0;
            for _ in 0..n {
                let mut s = connect(&socket);
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                match call(&mut s, &[27, 0, 0, 0, 5, b'q', b'u', b'e', b'r', b'y']) {
                    Some(a) if a[0] == EXTENSION_RESPONSE => kept.push(s),
                    _ => refused += 1,
                }
            }
            println!("HELD admitted={} refused={refused}", kept.len());
            let mut sink = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut sink);
        }
        other => panic!("unknown helper mode {other}"),
    }
}

/// `name=N` in `line`.
fn field(line: &str, name: &str) -> u64 {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name}= in {line:?}"))
}

/// Whether `line` names `uid=UID` (and not a longer uid).
fn names_uid(line: &str, uid: u32) -> bool {
    let needle = format!("uid={uid}");
    line.match_indices(&needle).any(|(i, _)| {
        !line[i + needle.len()..].starts_with(|c: char| c.is_ascii_digit())
            && !line[..i].ends_with(|c: char| c.is_ascii_alphanumeric())
    })
}

/// The counts in the summary lines that contain `subject` for `uid`.
fn summary_counts(log: &str, subject: &str, uid: u32) -> Vec<u64> {
    let head = format!("{subject} for uid={uid}: ");
    log.lines()
        .filter_map(|l| l.split_once(&head).map(|(_, rest)| rest))
        .filter_map(|rest| rest.split_once(" more in the last "))
        .map(|(n, _)| n.parse().unwrap())
        .collect()
}

fn daemon(dir: &TempDir, agent: &Agent, extra: &str) -> Daemon {
    let window = WINDOW_MS.to_string();
    Daemon::start_via_env(
        dir,
        &Daemon::config(dir, &agent.socket, extra),
        &[],
        &[("KEYHOLDER_LOG_WINDOW_MS", &window)],
    )
}

fn hold_as(who: &As, socket: &Path, n: usize) -> (std::process::Child, u64, u64) {
    let mut child = spawn_helper_as(
        who,
        WORKER,
        &[
            ("KHT_F_MODE", "hold".into()),
            ("KHT_F_SOCKET", socket.display().to_string()),
            ("KHT_F_N", n.to_string()),
        ],
    );
    let line = read_line_with(&mut child, "HELD ");
    (child, field(&line, "admitted"), field(&line, "refused"))
}

fn release(mut child: std::process::Child) {
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success());
}

#[test]
fn a_refused_request_flood_leaves_a_bounded_log_and_every_grant_is_logged() {
    require_root!();
    const THREADS: usize = 4;
    const PER_THREAD: usize = 8000;
    const SIGNS: usize = 300;
    let dir = TempDir::new("rf");
    let agent = Agent::start(&dir);
    for name in ["deploy", "stray"] {
        agent.add(&keygen(dir.path(), name, "ed25519", ""));
    }
    let group = TestGroup::create("rfg");
    // `stray` is in the agent, not in the configuration.
    std::fs::remove_file(dir.join("stray.pub")).unwrap();
    let d = daemon(
        &dir,
        &agent,
        &format!("[keys.deploy]\ngroups = [\"{}\"]\n", group.name),
    );
    let before = agent.keys();
    let flooder = TestUser::create("rfl", &[]);
    let member = TestUser::create("rfm", &[&group]);
    let deploy = pubkey_blob(&dir.join("deploy.pub"));
    let stray_blob = {
        let o = agent.ssh_add(&["-L"]);
        let line = stdout(&o)
            .lines()
            .find(|l| l.ends_with(" stray"))
            .unwrap()
            .to_owned();
        let b64 = line.split_whitespace().nth(1).unwrap().to_owned();
        let p = dir.join("stray-line.pub");
        std::fs::write(&p, format!("ssh-ed25519 {b64} stray\n")).unwrap();
        pubkey_blob(&p)
    };
    let sign = |blob: &[u8]| sign_request(blob, &userauth_data(blob, "deploy", "ssh-ed25519"), 0);
    // Every one is an audited refusal: admin requests, a key that is not
    // configured, a key the flooder's groups may not use.
    let refused = [
        vec![19u8],
        [vec![22u8], string(b"pw")].concat(),
        sign(&stray_blob),
        sign(&deploy),
    ];
    let messages = refused.iter().map(|m| hex(m)).collect::<Vec<_>>().join(",");
    let start = Instant::now();
    let mut flood = spawn_helper_as(
        &flooder.as_user(),
        WORKER,
        &[
            ("KHT_F_MODE", "refuse".into()),
            ("KHT_F_SOCKET", d.socket.display().to_string()),
            ("KHT_F_N", PER_THREAD.to_string()),
            ("KHT_F_THREADS", THREADS.to_string()),
            ("KHT_F_MESSAGES", messages),
        ],
    );
    // A member signs meanwhile, one request after the other.
    let mut signer = spawn_helper_as(
        &member.as_user(),
        WORKER,
        &[
            ("KHT_F_MODE", "sign".into()),
            ("KHT_F_SOCKET", d.socket.display().to_string()),
            ("KHT_F_N", SIGNS.to_string()),
            ("KHT_F_MESSAGE", hex(&sign(&deploy))),
        ],
    );
    let flooded = read_line_with(&mut flood, "REFUSED ");
    let elapsed = start.elapsed();
    let signed = read_line_with(&mut signer, "SIGNED ");
    assert!(flood.wait().unwrap().success());
    assert!(signer.wait().unwrap().success());
    let total = (THREADS * PER_THREAD) as u64;
    assert_eq!(field(&flooded, "sent"), total);
    assert_eq!(field(&flooded, "failures"), total, "{flooded}");
    assert_eq!(field(&signed, "n"), SIGNS as u64);
    assert_eq!(agent.keys(), before);

    // After the window, the summaries account for every refusal: admin and
    // sign refusals each have their own allowance and summaries.
    const ADMIN: &str = "audit: refused admin requests";
    const SIGN: &str = "audit: refused sign requests";
    let (fuid, muid) = (flooder.uid(), member.uid());
    let written = |log: &str| {
        log.lines()
            .filter(|l| names_uid(l, fuid) && l.contains("decision=refused"))
            .count() as u64
    };
    let summarised = |log: &str| {
        let mut all = summary_counts(log, ADMIN, fuid);
        all.extend(summary_counts(log, SIGN, fuid));
        all
    };
    let accounted = wait_for(Duration::from_secs(20), || {
        let log = d.log_text();
        written(&log) + summarised(&log).iter().sum::<u64>() == total
    });
    let log = d.log_text();
    let summaries = summarised(&log);
    let flooder_lines = log.lines().filter(|l| names_uid(l, fuid)).count();
    eprintln!(
        "{total} refusals in {elapsed:?}: {} written, summaries {summaries:?}; {} log lines in all",
        written(&log),
        log.lines().count()
    );
    assert!(
        accounted,
        "refusals not accounted for: {summaries:?}\n{log}"
    );
    // The first lines of each kind's burst in full, then one summary per
    // window and kind.
    assert_eq!(written(&log), 20, "{log}");
    let windows = elapsed.as_millis() as usize / WINDOW_MS as usize + 2;
    assert!(
        !summaries.is_empty() && summaries.len() <= 2 * windows,
        "{} summaries for {elapsed:?}",
        summaries.len()
    );
    assert_eq!(flooder_lines, 20 + summaries.len(), "{log}");
    // Summaries count per reason and key.
    assert!(
        log.contains("(reason=admin-request:remove-all-identities key=-: "),
        "{log}"
    );
    assert!(
        log.contains("reason=not-in-allowed-group key=deploy: ")
            && log.contains("reason=key-not-configured key=-: "),
        "{log}"
    );
    // Every grant of the member is in the log, none summarised.
    let granted = log
        .lines()
        .filter(|l| names_uid(l, muid) && l.contains("decision=granted"))
        .count();
    assert_eq!(granted, SIGNS, "{log}");
    assert!(summary_counts(&log, ADMIN, muid).is_empty());
    assert!(summary_counts(&log, SIGN, muid).is_empty());
}

#[test]
fn a_burst_of_admin_refusals_never_hides_a_refused_sign() {
    require_root!();
    let dir = TempDir::new("kinds");
    let agent = Agent::start(&dir);
    agent.add(&keygen(dir.path(), "deploy", "ed25519", ""));
    let group = TestGroup::create("kdg");
    let d = daemon(
        &dir,
        &agent,
        &format!("[keys.deploy]\ngroups = [\"{}\"]\n", group.name),
    );
    let before = agent.keys();
    let user = TestUser::create("kdu", &[]);
    let deploy = pubkey_blob(&dir.join("deploy.pub"));
    // Twelve refused REMOVE_ALL (past the admin allowance of 10), then a
    // sign with a key the user's groups may not use, on one connection.
    let mut messages = vec![vec![19u8]; 12];
    messages.push(sign_request(
        &deploy,
        &userauth_data(&deploy, "deploy", "ssh-ed25519"),
        0,
    ));
    let answers = raw_as(&user.as_user(), &d.socket, &messages);
    assert!(answers.iter().all(|a| a.as_deref() == Some(&[FAILURE][..])));
    let fp = {
        let text = std::fs::read_to_string(dir.join("deploy.pub")).unwrap();
        ssh_key::PublicKey::from_openssh(text.trim())
            .unwrap()
            .fingerprint(ssh_key::HashAlg::Sha256)
            .to_string()
    };
    let full = format!("sign user={} uid={} pid=", user.name, user.uid());
    assert!(d.wait_log(&full), "{}", d.log_text());
    let line = d
        .log_text()
        .lines()
        .find(|l| l.contains(&full))
        .unwrap()
        .to_owned();
    assert!(
        line.contains(&format!(
            " key=deploy fingerprint={fp} remote_user=deploy dest=- forwarded=no serial=- \
             grant=- decision=refused reason=not-in-allowed-group"
        )),
        "{line}"
    );
    // The admin refusals: ten in full, two counted in one summary.
    assert!(
        d.wait_log(&format!(
            "audit: refused admin requests for uid={}: 2 more in the last 1 s \
             (reason=admin-request:remove-all-identities key=-: 2), not logged one by one",
            user.uid()
        )),
        "{}",
        d.log_text()
    );
    let admin_lines = d
        .log_text()
        .lines()
        .filter(|l| names_uid(l, user.uid()) && l.contains("reason=admin-request:"))
        .filter(|l| !l.contains("more in the last"))
        .count();
    assert_eq!(admin_lines, 10, "{}", d.log_text());
    assert_eq!(agent.keys(), before);
}

#[test]
fn uids_without_a_passwd_entry_share_one_log_bucket() {
    require_root!();
    let dir = TempDir::new("unl");
    let agent = Agent::start(&dir);
    let d = daemon(&dir, &agent, "");
    // Two uids no passwd entry names (like a user's subordinate uids).
    let base = 3_000_000_000 + std::process::id() * 4;
    let uids = [base, base + 1];
    for uid in uids {
        assert!(nix::unistd::User::from_uid(uid.into()).unwrap().is_none());
    }
    let refusals = vec![vec![19u8]; 20];
    for uid in uids {
        let answers = raw_as(&As::Ids { uid, gid: uid }, &d.socket, &refusals);
        assert!(answers.iter().all(|a| a.as_deref() == Some(&[FAILURE][..])));
    }
    let subject = "audit: refused admin requests for uids without a passwd entry: ";
    assert!(d.wait_log(subject), "{}", d.log_text());
    let log = d.log_text();
    let written = log
        .lines()
        .filter(|l| l.contains("decision=refused") && uids.iter().any(|&u| names_uid(l, u)))
        .count();
    assert_eq!(written, 10, "{log}");
    assert!(log.contains(&format!("{subject}30 more")), "{log}");
}

#[test]
fn connections_closed_on_bad_messages_are_logged_per_uid_with_a_count() {
    require_root!();
    const N: usize = 1000;
    let dir = TempDir::new("bad");
    let agent = Agent::start(&dir);
    let d = daemon(&dir, &agent, "");
    let user = TestUser::create("bad", &[]);
    let mut child = spawn_helper_as(
        &user.as_user(),
        WORKER,
        &[
            ("KHT_F_MODE", "bad".into()),
            ("KHT_F_SOCKET", d.socket.display().to_string()),
            ("KHT_F_N", N.to_string()),
        ],
    );
    let line = read_line_with(&mut child, "CLOSED ");
    assert!(child.wait().unwrap().success());
    assert_eq!(field(&line, "n"), N as u64);
    let uid = user.uid();
    let subject = "connections closed on a bad message";
    let full = |log: &str| {
        log.lines()
            .filter(|l| l.contains("closing connection of") && names_uid(l, uid))
            .count() as u64
    };
    assert!(wait_for(Duration::from_secs(10), || {
        let log = d.log_text();
        full(&log) + summary_counts(&log, subject, uid).iter().sum::<u64>() == N as u64
    }));
    let log = d.log_text();
    assert_eq!(full(&log), 3, "{log}");
    // Served as before.
    let mut c = Raw::connect(&d.socket);
    assert_eq!(c.call(&[11]).unwrap()[0], IDENTITIES_ANSWER);
}

#[test]
fn limit_reached_is_logged_for_every_uid_with_its_count_when_the_window_ends() {
    require_root!();
    let dir = TempDir::new("lim");
    let agent = Agent::start(&dir);
    let d = daemon(
        &dir,
        &agent,
        "[limits]\nmax_connections = 6\nmax_connections_per_user = 2\nidle_timeout_secs = 120\n",
    );
    let users: Vec<TestUser> = ["la", "lb", "lc", "ld"]
        .iter()
        .map(|t| TestUser::create(t, &[]))
        .collect();
    // Two users over their own limit, then (with root's two) the total is
    // full and two more users are refused by it.
    let mut held = Vec::new();
    for u in &users[..2] {
        let (child, admitted, refused) = hold_as(&u.as_user(), &d.socket, 30);
        assert_eq!((admitted, refused), (2, 28));
        held.push(child);
    }
    let mut root: Vec<UnixStream> = (0..2).map(|_| connect(&d.socket)).collect();
    for s in &mut root {
        assert_eq!(call(s, &[11]).unwrap()[0], IDENTITIES_ANSWER);
    }
    for u in &users[2..] {
        let (child, admitted, refused) = hold_as(&u.as_user(), &d.socket, 10);
        assert_eq!((admitted, refused), (0, 10));
        held.push(child);
    }
    let cases = [
        (
            "connection limit max_connections_per_user reached",
            &users[0],
            27,
        ),
        (
            "connection limit max_connections_per_user reached",
            &users[1],
            27,
        ),
        ("connection limit max_connections reached", &users[2], 9),
        ("connection limit max_connections reached", &users[3], 9),
    ];
    // The counts arrive with nothing else happening: written by the timer.
    let all_counted = wait_for(Duration::from_secs(10), || {
        let log = d.log_text();
        cases
            .iter()
            .all(|(what, u, n)| summary_counts(&log, what, u.uid()) == [*n])
    });
    let log = d.log_text();
    assert!(all_counted, "{log}");
    for (what, u, _) in cases {
        let full = format!("{what}: closing new connection of uid={} ", u.uid());
        assert_eq!(
            log.lines().filter(|l| l.contains(&full)).count(),
            1,
            "{full}\n{log}"
        );
    }
    for child in held {
        release(child);
    }
}

#[test]
fn the_spawned_agents_stderr_is_rate_limited_in_the_log() {
    require_root!();
    const LINES: usize = 5000;
    let dir = TempDir::new("err");
    // A real ssh-agent that first writes LINES lines to stderr (more than
    // a pipe holds: the daemon must keep reading while it suppresses).
    let noisy = dir.join("noisy-agent");
    std::fs::write(
        &noisy,
        format!(
            "#!/bin/sh\ni=0\nwhile [ $i -lt {LINES} ]; do echo \"noisy agent line $i, padded to fill the pipe\" >&2; i=$((i+1)); done\nexec ssh-agent \"$@\"\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&noisy, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    keygen(dir.path(), "deploy", "ed25519", "");
    let config = format!(
        "socket = \"{}\"\nkey_dir = \"{}\"\nlog = \"stderr\"\n\n[agent]\nsocket = \"{}\"\nspawn = true\n         program = \"{}\"\n\n[keys.deploy]\ngroups = [\"root\"]\n",
        dir.join("proxy.sock").display(),
        dir.path().display(),
        dir.join("agent.sock").display(),
        noisy.display()
    );
    let window = WINDOW_MS.to_string();
    let d = Daemon::start_via_env(&dir, &config, &[], &[("KEYHOLDER_LOG_WINDOW_MS", &window)]);
    let summary = format!("upstream agent stderr: {} more in the last ", LINES - 10);
    assert!(d.wait_log(&summary), "{}", d.log_text());
    let log = d.log_text();
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("upstream agent: noisy agent line"))
            .count(),
        10,
        "{log}"
    );
    // The agent it started serves.
    let mut c = Raw::connect(&d.socket);
    assert_eq!(c.call(&[11]).unwrap()[0], IDENTITIES_ANSWER);
}

fn connect(socket: &Path) -> UnixStream {
    let s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

#[test]
fn memory_returns_near_the_idle_baseline_after_a_half_frame_flood() {
    require_root!();
    const N: usize = 512;
    let dir = TempDir::new("mem");
    let agent = Agent::start(&dir);
    let d = Daemon::start(
        &dir,
        &agent,
        "[limits]\nmax_connections = 4096\nmax_connections_per_user = 4096\n",
    );
    let pid = d.pid();
    // Warm up: a few requests so lazily initialised state exists.
    for _ in 0..4 {
        let mut c = Raw::connect(&d.socket);
        assert_eq!(c.call(&[11]).unwrap()[0], IDENTITIES_ANSWER);
    }
    let base = settled_rss(pid);
    let mut half = (256 * 1024u32).to_be_bytes().to_vec();
    half.push(13);
    half.resize(4 + 128 * 1024, 0xAA);
    let mut rounds = Vec::new();
    for round in 0..3 {
        let mut conns = Vec::new();
        for _ in 0..N {
            let mut s = connect(&d.socket);
            s.write_all(&half).unwrap();
            conns.push(s);
        }
        let flooded = settled_rss(pid);
        drop(conns);
        // The daemon sees the closes and frees the buffers.
        let after = settled_rss(pid);
        eprintln!("round {round}: base {base} KiB, flooded {flooded} KiB, after {after} KiB");
        rounds.push((flooded, after));
    }
    let mut c = Raw::connect(&d.socket);
    assert_eq!(c.call(&[11]).unwrap()[0], IDENTITIES_ANSWER);
    for (round, (flooded, after)) in rounds.iter().enumerate() {
        assert!(
            *flooded > base + (N as u64 * 64),
            "round {round}: the flood did not show ({base} -> {flooded} KiB)"
        );
        assert!(
            *after <= (2 * base).max(base + 16 * 1024),
            "round {round}: VmRSS {after} KiB after the flood, baseline {base} KiB (flood {flooded} KiB)"
        );
    }
}
