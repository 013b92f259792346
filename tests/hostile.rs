//! Hostile local users and faults, end to end: a real OpenSSH `ssh-agent`,
//! the real daemon, real throwaway users. Every local user can connect to
//! the proxy socket and the upstream agent can die or hang; the daemon must
//! keep serving everyone else, lose nothing and grant nothing extra.
//!
//! Clients as other users run in helper processes: the test binary re-runs
//! itself under `setpriv` and executes only [`hostile_worker`], which holds
//! connections open or runs a multi-threaded request mix and reports on
//! stdout (see [`worker_main`]).

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use ssh_encoding::Decode;

raw_client_helper!();

/// The helper test re-run as other users.
const WORKER: &str = "hostile_worker";

#[test]
fn hostile_worker() {
    worker_main();
}

// ---------------------------------------------------------------------------
// Wire helpers that never panic on a closed connection

fn framed(message: &[u8]) -> Vec<u8> {
    let mut m = (message.len() as u32).to_be_bytes().to_vec();
    m.extend_from_slice(message);
    m
}

/// Sends one message and reads one answer; `None` when the daemon closed the
/// connection (EOF, reset, broken pipe) or did not answer within the
/// stream's read timeout.
fn call(stream: &mut UnixStream, message: &[u8]) -> Option<Vec<u8>> {
    stream.write_all(&framed(message)).ok()?;
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).ok()?;
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    stream.read_exact(&mut body).ok()?;
    Some(body)
}

fn connect(socket: &Path) -> UnixStream {
    let s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Waits for EOF (or a reset) on `stream`; returns how long that took, or
/// `None` if data arrived or nothing happened within `limit`.
fn time_to_close(stream: &mut UnixStream, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    stream.set_read_timeout(Some(limit)).unwrap();
    let mut b = [0u8; 1];
    match stream.read(&mut b) {
        Ok(0) => Some(start.elapsed()),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Some(start.elapsed()),
        _ => None,
    }
}

fn query() -> Vec<u8> {
    [vec![27u8], string(b"query")].concat()
}

fn status_ext() -> Vec<u8> {
    [vec![27u8], string(b"status@keyholder")].concat()
}

/// The "upstream reachable" flag of a `status@keyholder` answer:
/// type, string name, uint32 version, boolean.
fn status_reachable(answer: &[u8]) -> Option<bool> {
    let offset = 1 + 4 + "status@keyholder".len() + 4;
    (answer.first() == Some(&EXTENSION_RESPONSE)).then_some(())?;
    answer.get(offset).map(|&b| b != 0)
}

/// Checks a SIGN_RESPONSE: a signature by `blob` over `data`.
fn verify_signature(blob: &[u8], data: &[u8], answer: &[u8]) -> Result<(), String> {
    use signature::Verifier;
    let (&kind, rest) = answer.split_first().ok_or("empty answer")?;
    if kind != SIGN_RESPONSE {
        return Err(format!("expected SIGN_RESPONSE, got type {kind}"));
    }
    let (sig, tail) = take_string(rest).ok_or("no signature string")?;
    if !tail.is_empty() {
        return Err("trailing bytes after the signature".into());
    }
    let sig = ssh_key::Signature::decode(&mut &sig[..]).map_err(|e| format!("signature: {e}"))?;
    let key =
        ssh_key::public::KeyData::decode(&mut &blob[..]).map_err(|e| format!("key blob: {e}"))?;
    key.verify(data, &sig)
        .map_err(|e| format!("signature does not verify: {e}"))
}

// ---------------------------------------------------------------------------
// Holding connections: open `n`, one after the other, each probed with
// `query`. Admitted ones answer; refused ones are closed by the daemon.

struct Held {
    kept: Vec<UnixStream>,
    refused: usize,
    /// Longest time a refused connection took to see its close.
    slowest_refusal: Duration,
}

fn hold(socket: &Path, n: usize) -> Held {
    let mut held = Held {
        kept: Vec::new(),
        refused: 0,
        slowest_refusal: Duration::ZERO,
    };
    for _ in 0..n {
        let start = Instant::now();
        let mut s = connect(socket);
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        match call(&mut s, &query()) {
            Some(a) if a.first() == Some(&EXTENSION_RESPONSE) => held.kept.push(s),
            Some(a) => panic!("unexpected answer to query: {a:?}"),
            None => {
                held.refused += 1;
                held.slowest_refusal = held.slowest_refusal.max(start.elapsed());
            }
        }
    }
    held
}

/// What a `hold` helper process reported.
#[derive(Debug)]
struct HeldReport {
    admitted: usize,
    refused: usize,
    slowest_refusal_ms: u64,
}

fn field(line: &str, name: &str) -> u64 {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name}= in {line:?}"))
}

/// A helper process holding connections as another user.
struct Holder {
    child: Child,
    report: HeldReport,
}

impl Holder {
    fn start(who: &As, socket: &Path, n: usize) -> Self {
        let mut child = spawn_helper_as(
            who,
            WORKER,
            &[
                ("KHT_W_MODE", "hold".into()),
                ("KHT_W_SOCKET", socket.display().to_string()),
                ("KHT_W_N", n.to_string()),
            ],
        );
        let line = read_line_with(&mut child, "HELD ");
        let report = HeldReport {
            admitted: field(&line, "admitted") as usize,
            refused: field(&line, "refused") as usize,
            slowest_refusal_ms: field(&line, "slowest_refusal_ms"),
        };
        Self { child, report }
    }

    /// Lets the helper go: it checks its connections still work, reports
    /// how many did, closes them and exits.
    fn release(mut self) -> usize {
        drop(self.child.stdin.take());
        let line = read_line_with(&mut self.child, "STILL ");
        assert!(self.child.wait().unwrap().success());
        field(&format!("n={line}"), "n") as usize
    }
}

// ---------------------------------------------------------------------------
// The request mix of the stress test, checked answer by answer.

struct StressSpec {
    socket: PathBuf,
    threads: usize,
    duration: Duration,
    /// Every key in the upstream agent, and whether this caller may use it.
    keys: Vec<(Vec<u8>, bool)>,
}

fn admin_messages(blob: &[u8]) -> Vec<Vec<u8>> {
    vec![
        vec![19u8],
        [vec![22u8], string(b"pw")].concat(),
        [vec![23u8], string(b"pw")].concat(),
        [vec![18u8], string(blob)].concat(),
        [
            vec![17u8],
            string(b"ssh-ed25519"),
            string(&[1u8; 32]),
            string(&[2u8; 64]),
            string(b"intruder"),
        ]
        .concat(),
        [vec![25u8], string(b"ssh-ed25519"), vec![1, 2, 3]].concat(),
        [vec![20u8], string(b"/usr/lib/x.so"), string(b"")].concat(),
        [vec![21u8], string(b"/usr/lib/x.so"), string(b"")].concat(),
        vec![26u8, 0, 0],
    ]
}

/// One request of the mix (chosen by `i`) and the check of its answer.
fn stress_op(spec: &StressSpec, c: &mut UnixStream, i: usize) -> Result<(), String> {
    let allowed: Vec<Vec<u8>> = {
        let mut v: Vec<Vec<u8>> = spec
            .keys
            .iter()
            .filter(|(_, ok)| *ok)
            .map(|(b, _)| b.clone())
            .collect();
        v.sort();
        v
    };
    let fixed = 7;
    let k = i % (fixed + spec.keys.len());
    let expect_failure = |msg: &[u8], c: &mut UnixStream| match call(c, msg) {
        Some(a) if a == [FAILURE] => Ok(()),
        other => Err(format!("type {}: expected FAILURE, got {other:?}", msg[0])),
    };
    match k {
        0 => {
            let a = call(c, &[11]).ok_or("list: no answer")?;
            match listed_blobs(&a) {
                Some(blobs) if blobs == allowed => Ok(()),
                got => Err(format!(
                    "list: got {} keys, expected {}",
                    got.map_or(-1, |g| g.len() as i64),
                    allowed.len()
                )),
            }
        }
        1 => match call(c, &query()) {
            Some(a) if a.first() == Some(&EXTENSION_RESPONSE) => Ok(()),
            other => Err(format!("query: {other:?}")),
        },
        2 => match call(c, &status_ext()).as_deref().and_then(status_reachable) {
            Some(true) => Ok(()),
            other => Err(format!("status: reachable={other:?}")),
        },
        3 => {
            let msgs = admin_messages(&spec.keys[0].0);
            let m = &msgs[(i / 7) % msgs.len()];
            expect_failure(m, c)
        }
        4 => expect_failure(&[200, 1, 2, 3], c),
        5 => expect_failure(&[11, 0], c),
        6 => {
            // Not a user-auth request: refused even for a key the caller may use.
            let blob = &spec.keys[(i / 7) % spec.keys.len()].0;
            expect_failure(&sign_request(blob, b"SSHSIG arbitrary data", 0), c)
        }
        _ => {
            let (blob, ok) = &spec.keys[k - fixed];
            let data = userauth_data(blob, "deploy", "ssh-ed25519");
            let a = call(c, &sign_request(blob, &data, 0)).ok_or("sign: no answer")?;
            if *ok {
                verify_signature(blob, &data, &a)
            } else if a == [FAILURE] {
                Ok(())
            } else {
                Err(format!("sign with a key not allowed answered {a:?}"))
            }
        }
    }
}

/// Runs the mix on `spec.threads` threads for `spec.duration`; returns the
/// number of requests checked and the wrong answers.
fn stress(spec: &StressSpec) -> (usize, Vec<String>) {
    std::thread::scope(|s| {
        let threads: Vec<_> = (0..spec.threads)
            .map(|t| {
                s.spawn(move || {
                    let deadline = Instant::now() + spec.duration;
                    let mut conn: Option<UnixStream> = None;
                    let (mut ops, mut bad) = (0usize, Vec::new());
                    let mut i = t * 3;
                    while Instant::now() < deadline {
                        // A fresh connection now and then: accept and
                        // caller resolution are part of the mix.
                        if i % 50 == 0 {
                            conn = None;
                        }
                        let c = conn.get_or_insert_with(|| connect(&spec.socket));
                        if let Err(e) = stress_op(spec, c, i) {
                            bad.push(format!("thread {t} request {i}: {e}"));
                            conn = None;
                        }
                        ops += 1;
                        i += 1;
                    }
                    (ops, bad)
                })
            })
            .collect();
        threads.into_iter().map(|h| h.join().unwrap()).fold(
            (0, Vec::new()),
            |(n, mut b), (o, bad)| {
                b.extend(bad);
                (n + o, b)
            },
        )
    })
}

/// A stress helper process as another user.
fn start_stress_as(who: &As, spec: &StressSpec) -> Child {
    let keys = spec
        .keys
        .iter()
        .map(|(b, ok)| format!("{}:{}", hex(b), u8::from(*ok)))
        .collect::<Vec<_>>()
        .join(",");
    spawn_helper_as(
        who,
        WORKER,
        &[
            ("KHT_W_MODE", "stress".into()),
            ("KHT_W_SOCKET", spec.socket.display().to_string()),
            ("KHT_W_THREADS", spec.threads.to_string()),
            ("KHT_W_MS", spec.duration.as_millis().to_string()),
            ("KHT_W_KEYS", keys),
        ],
    )
}

/// The helper's body: does nothing unless re-run by a test with its
/// environment.
fn worker_main() {
    let (Ok(mode), Ok(socket)) = (std::env::var("KHT_W_MODE"), std::env::var("KHT_W_SOCKET"))
    else {
        return;
    };
    let var = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} not set"));
    let socket = PathBuf::from(socket);
    match mode.as_str() {
        "hold" => {
            let held = hold(&socket, var("KHT_W_N").parse().unwrap());
            println!(
                "HELD admitted={} refused={} slowest_refusal_ms={}",
                held.kept.len(),
                held.refused,
                held.slowest_refusal.as_millis()
            );
            let mut sink = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut sink);
            let mut still = 0;
            for mut s in held.kept {
                if call(&mut s, &query()).is_some_and(|a| a.first() == Some(&EXTENSION_RESPONSE)) {
                    still += 1;
                }
            }
            println!("STILL {still}");
        }
        "stress" => {
            let keys = var("KHT_W_KEYS")
                .split(',')
                .map(|kv| {
                    let (b, ok) = kv.split_once(':').unwrap();
                    (unhex(b), ok == "1")
                })
                .collect();
            let spec = StressSpec {
                socket,
                threads: var("KHT_W_THREADS").parse().unwrap(),
                duration: Duration::from_millis(var("KHT_W_MS").parse().unwrap()),
                keys,
            };
            let (ops, bad) = stress(&spec);
            for b in bad.iter().take(5) {
                println!("BAD {b}");
            }
            println!("STRESS ops={ops} bad={}", bad.len());
        }
        other => panic!("unknown helper mode {other}"),
    }
}

// ---------------------------------------------------------------------------
// A deployment host in miniature

/// `backend` holding `deploy`, `deploy2`, `phab` (configured) and `stray`
/// (not configured), all ed25519; groups `deployers` (deploy, deploy2) and
/// `phabs` (deploy2, phab); no daemon yet (see [`Hostile::start`]).
fn world(backend: Backend) -> Site {
    Site::builder("w", backend)
        .group("deployers")
        .group("phabs")
        .keys(&[("deploy", "ed25519")], &["deployers"])
        .keys(&[("deploy2", "ed25519")], &["deployers", "phabs"])
        .keys(&[("phab", "ed25519")], &["phabs"])
        .key(SiteKey::new("stray", "ed25519").stray())
        .no_daemon()
        .build()
}

const KEY_NAMES: [&str; 4] = ["deploy", "deploy2", "phab", "stray"];

/// What the hostile tests do on a site.
trait Hostile {
    /// A daemon in front of the agent with `limits` (TOML lines of `[limits]`).
    fn start(&self, limits: &str) -> Daemon;
    /// Every agent key with whether a caller allowed `names` may use it.
    fn key_spec(&self, names: &[&str]) -> Vec<(Vec<u8>, bool)>;
    fn signal_agent(&self, sig: Signal);
}

impl Hostile for Site {
    fn start(&self, limits: &str) -> Daemon {
        self.start_daemon(&format!("[limits]\n{limits}\n"))
    }

    fn key_spec(&self, names: &[&str]) -> Vec<(Vec<u8>, bool)> {
        KEY_NAMES
            .iter()
            .map(|k| (self.blob(k), names.contains(k)))
            .collect()
    }

    fn signal_agent(&self, sig: Signal) {
        kill(Pid::from_raw(self.agent.pid() as i32), sig).unwrap();
    }
}

// ---------------------------------------------------------------------------
// Connection limits

#[test]
fn one_user_cannot_lock_others_out_and_excess_connections_are_closed_at_once() {
    require_root!();
    each_backend(|backend| {
        let w = world(backend);
        let d =
            w.start("max_connections = 64\nmax_connections_per_user = 16\nidle_timeout_secs = 120");
        let hog = TestUser::create("hog", &[]);
        let member = TestUser::create("mem", &[w.group("deployers")]);
        let third = TestUser::create("thr", &[]);
        let late = TestUser::create("lat", &[w.group("phabs")]);

        // One user opens 500 connections: 16 are served, every other one is
        // closed at once (not left to idle out).
        let hog_conns = Holder::start(&hog.as_user(), &d.socket, 500);
        let r = &hog_conns.report;
        assert_eq!((r.admitted, r.refused), (16, 484), "{r:?}");
        assert!(r.slowest_refusal_ms < 1000, "{r:?}");
        // Meanwhile another user is served, with exactly its keys.
        let answers = raw_as(
            &member.as_user(),
            &d.socket,
            &[vec![11], w.sign_msg("deploy")],
        );
        assert_eq!(
            listed_blobs(answers[0].as_ref().unwrap()),
            Some(w.blobs(&["deploy", "deploy2"]))
        );
        assert_eq!(answers[1].as_ref().unwrap()[0], SIGN_RESPONSE);
        // Logged once for the whole burst of 484 refusals.
        let per_user = "connection limit max_connections_per_user reached: closing";
        assert!(d.wait_log(per_user));
        assert_eq!(d.log_count(per_user), 1, "{}", d.log_text());

        // Fill the total: root 16 + hog 16 + member 16 + third 16 = 64.
        let root_conns = hold(&d.socket, 16);
        assert_eq!(root_conns.kept.len(), 16);
        let member_conns = Holder::start(&member.as_user(), &d.socket, 16);
        assert_eq!(member_conns.report.admitted, 16);
        let third_conns = Holder::start(&third.as_user(), &d.socket, 16);
        assert_eq!(third_conns.report.admitted, 16);
        // A fifth user is refused by max_connections, at once, logged once.
        let late_conns = Holder::start(&late.as_user(), &d.socket, 30);
        let r = &late_conns.report;
        assert_eq!((r.admitted, r.refused), (0, 30), "{r:?}");
        assert!(r.slowest_refusal_ms < 1000, "{r:?}");
        assert_eq!(late_conns.release(), 0);
        let total = "connection limit max_connections reached: closing";
        assert!(d.wait_log(total));
        assert_eq!(d.log_count(total), 1, "{}", d.log_text());

        // Connections that were admitted kept working throughout.
        assert_eq!(hog_conns.release(), 16);
        assert_eq!(member_conns.release(), 16);
        // Freed slots are reusable (the releases above closed 32).
        let answers = raw_as(&late.as_user(), &d.socket, &[vec![11]]);
        assert_eq!(
            listed_blobs(answers[0].as_ref().unwrap()),
            Some(w.blobs(&["deploy2", "phab"]))
        );
        assert_eq!(third_conns.release(), 16);
        drop(root_conns);
        assert_eq!(d.log_count(per_user), 1);
    });
}

#[test]
fn a_thousand_connections_from_one_user_under_the_default_limits() {
    require_root!();
    let w = world(Backend::Upstream);
    let d = w.start("");
    let hog = TestUser::create("hog", &[]);
    let member = TestUser::create("mem", &[w.group("deployers")]);
    let start = Instant::now();
    let hog_conns = Holder::start(&hog.as_user(), &d.socket, 1500);
    let elapsed = start.elapsed();
    let r = &hog_conns.report;
    eprintln!("1500 connections from one user: {r:?} in {elapsed:?}");
    assert_eq!((r.admitted, r.refused), (512, 988), "{r:?}");
    assert!(r.slowest_refusal_ms < 1000, "{r:?}");
    let answers = raw_as(
        &member.as_user(),
        &d.socket,
        &[vec![11], w.sign_msg("deploy2")],
    );
    assert_eq!(
        listed_blobs(answers[0].as_ref().unwrap()),
        Some(w.blobs(&["deploy", "deploy2"]))
    );
    assert_eq!(answers[1].as_ref().unwrap()[0], SIGN_RESPONSE);
    let per_user = "connection limit max_connections_per_user reached: closing";
    assert!(d.wait_log(per_user));
    assert_eq!(d.log_count(per_user), 1);
    assert_eq!(hog_conns.release(), 512);
    // Once its connections are gone the hog is served again.
    let answers = raw_as(&hog.as_user(), &d.socket, &[vec![11]]);
    assert_eq!(listed_blobs(answers[0].as_ref().unwrap()), Some(vec![]));
}

#[test]
fn uids_without_passwd_entry_share_one_bucket_and_lock_nobody_out() {
    require_root!();
    let w = world(Backend::Upstream);
    let d = w.start("max_connections = 16\nmax_connections_per_user = 4\nidle_timeout_secs = 120");
    // A user who has never connected: known from /etc/passwd at once.
    let member = TestUser::create("sub", &[w.group("deployers")]);
    // Eight uids with no passwd entry (a user's subordinate uids, as a user
    // namespace maps them), each trying for a full per-user share.
    let base = 3_900_000_000 + (std::process::id() % 10_000) * 16;
    let uids: Vec<u32> = (base..base + 8).collect();
    for &uid in &uids {
        assert!(
            nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
                .unwrap()
                .is_none(),
            "uid {uid} has a passwd entry"
        );
    }
    let flood: Vec<Holder> = uids
        .iter()
        .map(|&uid| Holder::start(&As::Ids { uid, gid: 65534 }, &d.socket, 4))
        .collect();
    // Together they get one user's share (4 of 32), not 16 of 16.
    let admitted: usize = flood.iter().map(|h| h.report.admitted).sum();
    let refused: usize = flood.iter().map(|h| h.report.refused).sum();
    assert_eq!(
        (admitted, refused),
        (4, 28),
        "{:?}",
        flood.iter().map(|h| &h.report).collect::<Vec<_>>()
    );
    let shared =
        "connection limit max_connections_per_user (shared by uids without a passwd entry) reached: closing";
    assert!(d.wait_log(shared));
    assert_eq!(d.log_count(shared), 1, "{}", d.log_text());
    // Meanwhile the member is served with its keys, and has its whole share.
    let answers = raw_as(
        &member.as_user(),
        &d.socket,
        &[vec![11], w.sign_msg("deploy")],
    );
    assert_eq!(
        listed_blobs(answers[0].as_ref().expect("member locked out")),
        Some(w.blobs(&["deploy", "deploy2"]))
    );
    assert_eq!(answers[1].as_ref().unwrap()[0], SIGN_RESPONSE);
    let own = Holder::start(&member.as_user(), &d.socket, 5);
    assert_eq!(
        (own.report.admitted, own.report.refused),
        (4, 1),
        "{:?}",
        own.report
    );
    // So is root.
    let root = hold(&d.socket, 4);
    assert_eq!(root.kept.len(), 4);
    assert_eq!(own.release(), 4);
    let still: usize = flood.into_iter().map(Holder::release).sum();
    assert_eq!(still, 4);
}

// ---------------------------------------------------------------------------
// Memory

#[test]
fn daemon_memory_stays_bounded_with_idle_and_half_sent_connections() {
    require_root!();
    const N: usize = 1000;
    let w = world(Backend::Upstream);
    let d =
        w.start("max_connections = 4096\nmax_connections_per_user = 4096\nidle_timeout_secs = 120");
    let pid = d.pid();
    // Warm up: one of each request, so lazily initialised state exists.
    let mut c = connect(&d.socket);
    assert_eq!(call(&mut c, &[11]).unwrap()[0], IDENTITIES_ANSWER);
    assert_eq!(
        call(&mut c, &w.sign_msg("deploy")).unwrap()[0],
        SIGN_RESPONSE
    );
    drop(c);
    let base = settled_rss(pid);

    // N idle connections, each having had one request answered.
    let held = hold(&d.socket, N);
    assert_eq!(held.kept.len(), N);
    let idle = settled_rss(pid);

    // N more, each holding a message that announces the 256 KiB cap but
    // sends only its header and one byte.
    let mut headers = Vec::new();
    for _ in 0..N {
        let mut s = connect(&d.socket);
        s.write_all(&(256 * 1024u32).to_be_bytes()).unwrap();
        s.write_all(&[13]).unwrap();
        headers.push(s);
    }
    let with_headers = settled_rss(pid);

    // And N more, each holding half (128 KiB) of a 256 KiB message.
    let mut halves = Vec::new();
    let mut half = (256 * 1024u32).to_be_bytes().to_vec();
    half.push(13);
    half.resize(4 + 128 * 1024, 0xAA);
    for _ in 0..N {
        let mut s = connect(&d.socket);
        s.write_all(&half).unwrap();
        halves.push(s);
    }
    let with_halves = settled_rss(pid);

    let per = |a: u64, b: u64| (b.saturating_sub(a)) as f64 / N as f64;
    let report = format!(
        "VmRSS: base {base} KiB; +{N} idle {idle} KiB ({:.1} KiB each); \
         +{N} header-only 256 KiB messages {with_headers} KiB ({:.1} KiB each); \
         +{N} half-sent (128 KiB of 256 KiB) {with_halves} KiB ({:.1} KiB each)",
        per(base, idle),
        per(idle, with_headers),
        per(with_headers, with_halves)
    );
    eprintln!("{report}");
    // Idle connections are small; a partial message costs about what was
    // sent (it sits in the daemon's buffer), never the announced length and
    // never more than the cap.
    assert!(per(base, idle) < 32.0, "{report}");
    assert!(per(idle, with_headers) < 32.0, "{report}");
    assert!(per(with_headers, with_halves) < 128.0 + 32.0, "{report}");

    // Everything still answers, and closing them all returns the slots.
    let mut c = connect(&d.socket);
    assert_eq!(call(&mut c, &[11]).unwrap()[0], IDENTITIES_ANSWER);
    drop((held, headers, halves));
}

// ---------------------------------------------------------------------------
// Idle timeout

/// The idle timer is armed once per connection: a reload that shortens the
/// timeout must still reach a connection opened before it.
#[test]
fn a_reload_that_shortens_the_idle_timeout_reaches_open_connections() {
    require_root!();
    let w = world(Backend::Upstream);
    let d = w.start("idle_timeout_secs = 120");
    let mut open = connect(&d.socket);
    assert!(call(&mut open, &query()).is_some());
    let config = std::fs::read_to_string(&d.config)
        .unwrap()
        .replace("idle_timeout_secs = 120", "idle_timeout_secs = 1");
    std::fs::write(&d.config, config).unwrap();
    let before = d.log_count("configuration reloaded");
    d.signal(Signal::SIGHUP);
    assert!(
        wait_for(Duration::from_secs(10), || d
            .log_count("configuration reloaded")
            > before),
        "{}",
        d.log_text()
    );
    // The wait after the next request is under the new timeout.
    assert!(call(&mut open, &query()).is_some());
    let closed = time_to_close(&mut open, Duration::from_secs(10))
        .unwrap_or_else(|| panic!("not closed 10 s after the reload: {}", d.log_text()));
    assert!(
        closed >= Duration::from_millis(900) && closed < Duration::from_secs(3),
        "closed after {closed:?}"
    );
}

#[test]
fn idle_and_half_sent_connections_are_closed_after_the_idle_timeout() {
    require_root!();
    let w = world(Backend::Upstream);
    let d = w.start("idle_timeout_secs = 1\nmax_connections_per_user = 6");
    let idle = connect(&d.socket);
    let mut half = connect(&d.socket);
    half.write_all(&[0, 0, 1, 0, 13, 0, 0]).unwrap();
    let mut header = connect(&d.socket);
    header.write_all(&[0, 0]).unwrap();
    let slow = connect(&d.socket);
    let mut busy = connect(&d.socket);
    let start = Instant::now();

    let watchers: Vec<_> = [("idle", idle), ("half", half), ("header", header)]
        .into_iter()
        .map(|(what, mut s)| {
            std::thread::spawn(move || (what, time_to_close(&mut s, Duration::from_secs(10))))
        })
        .collect();
    // Slowloris: one byte of a frame every 300 ms. The timeout covers the
    // whole message, so trickling does not keep the connection.
    let slowloris = std::thread::spawn(move || {
        let mut s = slow;
        let mut msg = framed(&sign_request(&[1u8; 51], &[2u8; 100], 0));
        msg.truncate(40);
        for b in msg {
            if s.write_all(&[b]).is_err() {
                return Some(start.elapsed());
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        time_to_close(&mut s, Duration::from_secs(10)).map(|_| start.elapsed())
    });
    // A connection that keeps sending requests stays open throughout.
    while start.elapsed() < Duration::from_millis(2500) {
        let a = call(&mut busy, &query());
        assert!(
            a.is_some(),
            "busy closed after {:?}: {}",
            start.elapsed(),
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    for w in watchers {
        let (what, closed) = w.join().unwrap();
        let after = closed.unwrap_or_else(|| panic!("{what} connection not closed"));
        assert!(
            after >= Duration::from_millis(900) && after < Duration::from_millis(2500),
            "{what} closed after {after:?}"
        );
    }
    let after = slowloris.join().unwrap().expect("slowloris not closed");
    assert!(
        after < Duration::from_millis(3000),
        "slowloris closed after {after:?}"
    );
    // Their slots are free again: 4 new connections fit beside `busy` (limit
    // 6, one spare for the harness's start-up probe).
    let more = hold(&d.socket, 4);
    assert_eq!(more.kept.len(), 4);
    assert_eq!(call(&mut busy, &[11]).unwrap()[0], IDENTITIES_ANSWER);
}

// ---------------------------------------------------------------------------
// Accept errors

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

fn prlimit_nofile(pid: u32, n: usize) {
    let o = run(Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={n}:{n}")));
    assert!(o.status.success(), "prlimit: {}", stderr(&o));
}

/// Opens connections (not waiting for answers) until the daemon has
/// stopped accepting; returns them.
fn flood(socket: &Path, n: usize) -> Vec<UnixStream> {
    (0..n).map(|_| connect(socket)).collect()
}

#[test]
fn accept_errors_are_logged_once_per_burst_and_never_stop_the_daemon() {
    require_root!();
    let w = world(Backend::Upstream);
    let mut d = w.start("");
    let pid = d.pid();
    // A client connected (with its upstream connection) before the trouble.
    let mut early = connect(&d.socket);
    assert_eq!(call(&mut early, &[11]).unwrap()[0], IDENTITIES_ANSWER);
    std::thread::sleep(Duration::from_millis(200));
    let limit = open_fds(pid) + 6;
    prlimit_nofile(pid, limit);

    let conns = flood(&d.socket, 60);
    let accept = "accept failed: Too many open files";
    assert!(d.wait_log(accept), "{}", d.log_text());
    // Keep it failing for a while: the retries back off and are not logged.
    std::thread::sleep(Duration::from_millis(2500));
    assert!(d.running());
    assert_eq!(d.log_count(accept), 1, "{}", d.log_text());
    // Connections already open are still served meanwhile.
    assert_eq!(call(&mut early, &[11]).unwrap()[0], IDENTITIES_ANSWER);
    assert_eq!(
        call(&mut early, &w.sign_msg("phab")).unwrap()[0],
        SIGN_RESPONSE
    );

    // Once descriptors are free again, it serves new connections by itself.
    drop(conns);
    assert!(
        wait_for(Duration::from_secs(10), || {
            let mut c = connect(&d.socket);
            c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            call(&mut c, &[11]).is_some_and(|a| a.first() == Some(&IDENTITIES_ANSWER))
        }),
        "{}",
        d.log_text()
    );
    assert!(d.running());

    // SIGTERM while accept keeps failing still stops it promptly.
    let conns = flood(&d.socket, 60);
    std::thread::sleep(Duration::from_millis(1500));
    let start = Instant::now();
    let status = d.stop();
    let took = start.elapsed();
    drop(conns);
    assert!(status.success(), "{status:?}");
    eprintln!("SIGTERM during accept backoff: stopped in {took:?}");
    // The backoff is up to 1 s; a shutdown does not wait for it.
    assert!(
        took < Duration::from_millis(900),
        "SIGTERM took {took:?}\n{}",
        d.log_text()
    );
}

/// `rounds` times, `n` concurrent `ssh-add -L` as `who`; returns
/// (successful listings, "no identities" answers).
fn concurrent_listings(who: &As, socket: &Path, n: usize, rounds: usize) -> (usize, usize) {
    let script = format!(
        "for i in $(seq {n}); do SSH_AUTH_SOCK='{}' timeout 10 ssh-add -L & done; wait",
        socket.display()
    );
    let (mut ok, mut empty) = (0, 0);
    for _ in 0..rounds {
        let o = run(who.command("sh").args(["-c", &script]));
        let out = stdout(&o);
        ok += out.lines().filter(|l| l.starts_with("ssh-ed25519")).count() / 2;
        empty += out.matches("has no identities").count();
    }
    (ok, empty)
}

#[test]
fn a_low_descriptor_limit_lowers_max_connections_instead_of_running_out() {
    require_root!();
    let w = world(Backend::Upstream);
    let member = TestUser::create("mem", &[w.group("deployers")]);
    let d = w.start_daemon_via(
        &w.config_text(""),
        &["prlimit", "--nofile=300:300", "--"],
        &[],
    );
    // (300 - 256 spare) / 2 descriptors per connection.
    assert!(d.wait_log("max_connections 4096 lowered to 22: RLIMIT_NOFILE 300"));
    // The limit, not the descriptors, runs out: excess connections are
    // closed at once, the daemon never fails to accept.
    let held = hold(&d.socket, 30);
    assert_eq!((held.kept.len(), held.refused), (22, 8));
    let (ok, empty) = concurrent_listings(&member.as_user(), &d.socket, 10, 1);
    assert_eq!((ok, empty), (0, 0));
    drop(held);
    // With the slots free, every listing is complete: the user-database
    // lookups always had descriptors (glibc would report a failed one as
    // "no such user", and the caller would get an empty list).
    let (ok, empty) = concurrent_listings(&member.as_user(), &d.socket, 20, 3);
    assert_eq!((ok, empty), (60, 0), "{}", d.log_text());
    assert!(d
        .log_text()
        .contains("connection limit max_connections reached"));
    assert!(!d.log_text().contains("accept failed"), "{}", d.log_text());
}

// ---------------------------------------------------------------------------
// Upstream agent gone or hung

#[test]
fn upstream_agent_gone_gets_failure_promptly_and_service_resumes_by_itself() {
    require_root!();
    let mut w = world(Backend::Upstream);
    let d = w.start("upstream_timeout_secs = 5");
    let member = TestUser::create("mem", &[w.group("deployers")]);
    let mut old = connect(&d.socket);
    assert_eq!(call(&mut old, &[11]).unwrap()[0], IDENTITIES_ANSWER);
    let before = w.agent.keys();

    // Kill the agent (spawn = false: nobody restarts it).
    w.signal_agent(Signal::SIGKILL);
    assert!(wait_for(Duration::from_secs(5), || UnixStream::connect(
        &w.agent.socket
    )
    .is_err()));
    for round in 0..10 {
        for (what, conn) in [("old", &mut old), ("new", &mut connect(&d.socket))] {
            for msg in [vec![11u8], w.sign_msg("deploy")] {
                let start = Instant::now();
                assert_eq!(call(conn, &msg), Some(vec![FAILURE]), "{what} {round}");
                assert!(
                    start.elapsed() < Duration::from_millis(800),
                    "{what} {round}"
                );
            }
            // Requests the daemon answers itself still work.
            assert_eq!(call(conn, &query()).unwrap()[0], EXTENSION_RESPONSE);
            let status = call(conn, &status_ext()).unwrap();
            assert_eq!(status_reachable(&status), Some(false));
        }
    }
    let answers = raw_as(&member.as_user(), &d.socket, &[vec![11], query()]);
    assert_eq!(answers[0], Some(vec![FAILURE]));
    assert_eq!(answers[1].as_ref().unwrap()[0], EXTENSION_RESPONSE);
    // 80+ failures, one error line for the burst.
    assert!(d.log_text().contains("upstream agent unreachable"));
    assert_eq!(d.log_count("(answering FAILURE)"), 1, "{}", d.log_text());

    // An agent comes back at the same socket (someone restarted and re-armed
    // it): service resumes on old and new connections without a restart.
    std::fs::remove_file(&w.agent.socket).unwrap();
    w.agent = Agent::start(&w.dir);
    for name in KEY_NAMES {
        w.agent.add(&w.dir.join(name));
    }
    assert_eq!(w.agent.keys(), before);
    assert_eq!(
        listed_blobs(&call(&mut old, &[11]).unwrap()),
        Some(w.blobs(&["deploy", "deploy2", "phab"]))
    );
    let data = userauth_data(&w.blob("deploy"), "deploy", "ssh-ed25519");
    let a = call(&mut old, &sign_request(&w.blob("deploy"), &data, 0)).unwrap();
    verify_signature(&w.blob("deploy"), &data, &a).unwrap();
    let answers = raw_as(&member.as_user(), &d.socket, &[vec![11]]);
    assert_eq!(
        listed_blobs(answers[0].as_ref().unwrap()),
        Some(w.blobs(&["deploy", "deploy2"]))
    );
}

#[test]
fn a_spawned_agent_that_dies_is_restarted_and_service_resumes_on_open_connections() {
    require_root!();
    let site = Site::builder("sp", Backend::Upstream)
        .spawned_agent()
        .key(
            SiteKey::new("deploy", "ed25519")
                .groups(&["root"])
                .unadded(),
        )
        .build();
    let (d, agent_sock, key) = (site.daemon(), site.agent_socket(), site.key("deploy"));
    let arm = || {
        let o = run(Command::new("ssh-add")
            .arg(&key)
            .env("SSH_AUTH_SOCK", &agent_sock));
        assert!(o.status.success(), "{}", stderr(&o));
    };
    arm();
    let blob = site.blob("deploy");
    let sign = sign_request(&blob, &userauth_data(&blob, "u", "ssh-ed25519"), 0);
    let mut conn = connect(&d.socket);
    assert_eq!(call(&mut conn, &sign).unwrap()[0], SIGN_RESPONSE);

    let log = d.log_text();
    let pid: i32 = log
        .split("started (pid ")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no agent pid in log: {log}"));
    kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    // Until it is back (and re-armed) every sign gets FAILURE, promptly.
    let start = Instant::now();
    assert_eq!(call(&mut conn, &sign), Some(vec![FAILURE]));
    assert!(start.elapsed() < Duration::from_millis(800));
    assert!(d.wait_log("upstream agent restarted"));
    assert!(wait_for(Duration::from_secs(10), || UnixStream::connect(
        &agent_sock
    )
    .is_ok()));
    // Restarted agent: no keys until armed again.
    assert_eq!(listed_blobs(&call(&mut conn, &[11]).unwrap()), Some(vec![]));
    assert_eq!(call(&mut conn, &sign), Some(vec![FAILURE]));
    arm();
    assert_eq!(call(&mut conn, &sign).unwrap()[0], SIGN_RESPONSE);
    assert_eq!(
        listed_blobs(&call(&mut conn, &[11]).unwrap()),
        Some(vec![blob])
    );
}

#[test]
fn a_hung_upstream_times_out_per_request_and_blocks_nobody_else() {
    require_root!();
    let w = world(Backend::Upstream);
    let d = w.start("upstream_timeout_secs = 1");
    let member = TestUser::create("mem", &[w.group("deployers")]);
    let mut warm = connect(&d.socket);
    assert_eq!(call(&mut warm, &[11]).unwrap()[0], IDENTITIES_ANSWER);

    w.signal_agent(Signal::SIGSTOP);
    let start = Instant::now();
    // Five clients ask the stopped agent at once (four root connections and
    // another user): each gets FAILURE after about the timeout, on its own
    // clock (not one after the other: that would take 5 s).
    let mut askers: Vec<_> = (0..4)
        .map(|i| {
            let socket = d.socket.clone();
            let msg = if i % 2 == 0 {
                vec![11]
            } else {
                w.sign_msg("deploy")
            };
            std::thread::spawn(move || {
                let mut c = connect(&socket);
                let t = Instant::now();
                (call(&mut c, &msg), t.elapsed())
            })
        })
        .collect();
    let member_who = member.as_user();
    let socket = d.socket.clone();
    askers.push(std::thread::spawn(move || {
        let t = Instant::now();
        let a = raw_as(&member_who, &socket, &[vec![11]]);
        (a[0].clone(), t.elapsed())
    }));
    // Meanwhile requests the daemon answers itself are not held up.
    std::thread::sleep(Duration::from_millis(200));
    let mut other = connect(&d.socket);
    let t = Instant::now();
    assert_eq!(call(&mut other, &query()).unwrap()[0], EXTENSION_RESPONSE);
    assert_eq!(call(&mut other, &[200]), Some(vec![FAILURE]));
    assert_eq!(call(&mut other, &[19]), Some(vec![FAILURE]));
    assert!(
        t.elapsed() < Duration::from_millis(700),
        "{:?}",
        t.elapsed()
    );
    for a in askers {
        let (answer, took) = a.join().unwrap();
        assert_eq!(answer, Some(vec![FAILURE]));
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_millis(2500),
            "{took:?}"
        );
    }
    assert!(
        start.elapsed() < Duration::from_millis(3000),
        "{:?}",
        start.elapsed()
    );
    // The warm connection's call times out too; status says unreachable.
    assert_eq!(call(&mut warm, &w.sign_msg("deploy2")), Some(vec![FAILURE]));
    assert_eq!(
        status_reachable(&call(&mut other, &status_ext()).unwrap()),
        Some(false)
    );
    assert!(d
        .log_text()
        .contains("upstream agent did not answer in time"));
    assert_eq!(d.log_count("(answering FAILURE)"), 1, "{}", d.log_text());

    // The agent wakes up: service resumes on the same connections.
    w.signal_agent(Signal::SIGCONT);
    assert_eq!(
        listed_blobs(&call(&mut warm, &[11]).unwrap()),
        Some(w.blobs(&["deploy", "deploy2", "phab"]))
    );
    assert_eq!(
        call(&mut other, &w.sign_msg("phab")).unwrap()[0],
        SIGN_RESPONSE
    );
    let answers = raw_as(&member.as_user(), &d.socket, &[vec![11]]);
    assert_eq!(
        listed_blobs(answers[0].as_ref().unwrap()),
        Some(w.blobs(&["deploy", "deploy2"]))
    );
}

// ---------------------------------------------------------------------------
// Concurrency

#[test]
fn concurrent_clients_of_several_users_get_exactly_the_right_answers() {
    require_root!();
    each_backend(|backend| {
        let w = world(backend);
        let d = w.start("");
        let member = TestUser::create("mem", &[w.group("deployers")]);
        let phab = TestUser::create("pha", &[w.group("phabs")]);
        let outsider = TestUser::create("out", &[]);
        let before = w.agent.keys();
        let duration = Duration::from_secs(3);
        let spec = |keys: &[&str]| StressSpec {
            socket: d.socket.clone(),
            threads: 3,
            duration,
            keys: w.key_spec(keys),
        };
        let mut workers: Vec<(&str, Child)> = vec![
            (
                "member",
                start_stress_as(&member.as_user(), &spec(&["deploy", "deploy2"])),
            ),
            (
                "phab",
                start_stress_as(&phab.as_user(), &spec(&["deploy2", "phab"])),
            ),
            ("outsider", start_stress_as(&outsider.as_user(), &spec(&[]))),
        ];
        // Root (every configured key, never `stray`) from this process.
        let (root_ops, root_bad) = stress(&spec(&["deploy", "deploy2", "phab"]));
        assert!(root_bad.is_empty(), "root: {root_bad:#?}");
        let mut total = root_ops;
        let mut each = vec![format!("root {root_ops}")];
        for (who, child) in &mut workers {
            let line = read_line_with(child, "STRESS ");
            let (ops, bad) = (field(&line, "ops"), field(&line, "bad"));
            assert!(child.wait().unwrap().success());
            assert_eq!(bad, 0, "{who}: {line}");
            assert!(ops > 100, "{who}: {line}");
            total += ops as usize;
            each.push(format!("{who} {ops}"));
        }
        eprintln!(
            "stress: {total} requests checked in {duration:?} ({}), all answers right",
            each.join(", ")
        );
        assert_eq!(w.agent.keys(), before, "the upstream agent changed");
        // Not locked either: signing still works.
        let mut c = connect(&d.socket);
        assert_eq!(
            call(&mut c, &w.sign_msg("deploy")).unwrap()[0],
            SIGN_RESPONSE
        );
    });
}

// ---------------------------------------------------------------------------
// Process hardening

/// The gid owning `/proc/PID/environ`. For a process that is not dumpable
/// (`PR_SET_DUMPABLE 0`) the kernel shows its /proc files as root:root,
/// whatever its credentials; a dumpable one shows its euid and egid. Run
/// with a non-zero gid, the daemon thus shows on the file system whether
/// the kernel considers it dumpable. (Reading /proc/PID/environ as uid 0
/// without CAP_SYS_PTRACE is not a portable check: the kernel of the
/// machine these tests were written on allows it either way.)
fn proc_file_gid(pid: u32) -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/proc/{pid}/environ"))
        .unwrap()
        .gid()
}

/// The daemon with egid `gid` (uid 0 and its capabilities unchanged), then
/// `more` wrapper words.
fn daemon_with_gid(w: &Site, gid: u32, more: &[&str]) -> Daemon {
    let regid = format!("--regid={gid}");
    let mut wrapper = vec!["setpriv", regid.as_str(), "--clear-groups"];
    wrapper.extend_from_slice(more);
    wrapper.push("--");
    w.start_daemon_via(&w.config_text(""), &wrapper, &[])
}

fn has_cap_ipc_lock() -> bool {
    proc_status(std::process::id(), "CapEff")
        .and_then(|h| u64::from_str_radix(&h, 16).ok())
        .is_some_and(|bits| bits & (1 << 14) != 0)
}

fn memlock_unlimited() -> bool {
    std::fs::read_to_string("/proc/self/limits")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Max locked memory"))
        .is_some_and(|l| l.contains("unlimited"))
}

#[test]
fn the_running_daemon_is_hardened() {
    require_root!();
    each_backend(|backend| {
        let w = world(backend);
        let group = TestGroup::create("dg");
        let gid = group.gid();
        let d = daemon_with_gid(&w, gid, &[]);
        let pid = d.pid();
        // No core dumps.
        let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
        let core = limits
            .lines()
            .find(|l| l.starts_with("Max core file size"))
            .unwrap();
        assert_eq!(
            core.split_whitespace().collect::<Vec<_>>(),
            ["Max", "core", "file", "size", "0", "0", "bytes"],
            "{core}"
        );
        // umask 077.
        assert_eq!(proc_status(pid, "Umask").as_deref(), Some("0077"));
        // Not dumpable: runs with gid `gid`, yet its /proc files are root's,
        // unlike those of a control process started the same way.
        let gids = proc_status(pid, "Gid").unwrap();
        assert!(gids.starts_with(&format!("{gid}\t")), "{gids}");
        let mut control = spawn(Command::new("setpriv").args([
            &format!("--regid={gid}"),
            "--clear-groups",
            "--",
            "sleep",
            "30",
        ]));
        assert!(wait_for(Duration::from_secs(5), || proc_status(
            control.id(),
            "Name"
        )
        .as_deref()
            == Some("sleep")));
        let control_gid = proc_file_gid(control.id());
        let _ = control.kill();
        let _ = control.wait();
        assert_eq!(control_gid, gid, "a dumpable process shows its own gid");
        assert_eq!(proc_file_gid(pid), 0, "the daemon is dumpable");
        // Another user cannot read its environment or memory map.
        let user = TestUser::create("dmp", &[&group]);
        for file in ["environ", "maps", "mem"] {
            let o = run(user
                .as_user()
                .command("cat")
                .arg(format!("/proc/{pid}/{file}")));
            assert!(!o.status.success(), "{file} readable");
        }
        // Memory locked when it can be, otherwise said so in the log.
        let locked = proc_kib(pid, "VmLck");
        if has_cap_ipc_lock() || memlock_unlimited() {
            assert!(locked > 0, "VmLck 0\n{}", d.log_text());
            assert!(!d.log_text().contains("memory not locked"));
        } else {
            assert!(d.wait_log("memory not locked"));
        }
        // And it serves.
        let mut c = connect(&d.socket);
        assert_eq!(
            call(&mut c, &w.sign_msg("deploy")).unwrap()[0],
            SIGN_RESPONSE
        );
    });
}

#[test]
fn without_cap_ipc_lock_memory_is_not_locked_and_the_daemon_says_so() {
    require_root!();
    each_backend(|backend| {
        let w = world(backend);
        let group = TestGroup::create("dg");
        let d = daemon_with_gid(
            &w,
            group.gid(),
            &[
                "--bounding-set=-ipc_lock",
                "--inh-caps=-ipc_lock",
                "--",
                "prlimit",
                "--memlock=1048576:1048576",
            ],
        );
        assert!(d.wait_log("memory not locked: skipped: RLIMIT_MEMLOCK is finite"));
        if backend == Backend::Builtin {
            // Holding keys in unlocked memory is an error, said at start and
            // with every key added.
            assert!(d.wait_log("ERROR builtin backend: the daemon's memory is not locked"));
            assert!(
                d.log_count("holding keys but the daemon's memory is not locked")
                    >= KEY_NAMES.len()
            );
        }
        assert_eq!(proc_kib(d.pid(), "VmLck"), 0);
        // Everything else still applies, and it serves.
        assert_eq!(proc_status(d.pid(), "Umask").as_deref(), Some("0077"));
        assert_eq!(proc_file_gid(d.pid()), 0);
        let mut c = connect(&d.socket);
        assert_eq!(
            listed_blobs(&call(&mut c, &[11]).unwrap()),
            Some(w.blobs(&["deploy", "deploy2", "phab"]))
        );
    });
}

// ---------------------------------------------------------------------------
// Canonical encodings

/// The key type name at the start of a key blob.
fn blob_type(blob: &[u8]) -> String {
    let (name, _) = take_string(blob).unwrap();
    String::from_utf8(name.to_vec()).unwrap()
}

#[test]
fn openssh_key_blobs_pass_and_non_canonical_ones_are_refused() {
    require_root!();
    let dir = TempDir::new("c");
    let agent = Agent::start(&dir);
    for (name, kind) in [("ed", "ed25519"), ("rsa", "rsa"), ("ec", "ecdsa")] {
        keygen(dir.path(), name, kind, "");
    }
    // A user certificate for `ed`: ssh-add loads ed-cert.pub along with ed.
    let ca = keygen(dir.path(), "ca", "ed25519", "");
    let o = run(Command::new("ssh-keygen")
        .args(["-q", "-s"])
        .arg(&ca)
        .args(["-I", "kht", "-n", "u", "-V", "+1h"])
        .arg(dir.join("ed.pub")));
    assert!(o.status.success(), "{}", stderr(&o));
    for name in ["ed", "rsa", "ec"] {
        agent.add(&dir.join(name));
    }
    let before = agent.keys();
    let d = Daemon::start(
        &dir,
        &agent,
        "[keys.ed]\ngroups = [\"root\"]\n[keys.rsa]\ngroups = [\"root\"]\n[keys.ec]\ngroups = [\"root\"]\n",
    );
    let mut c = connect(&d.socket);
    // Every identity as OpenSSH encodes it (ed25519, RSA, ECDSA, and the
    // certificate, which counts as the key it certifies) signs.
    let blobs = listed_blobs(&call(&mut c, &[11]).unwrap()).unwrap();
    let types: Vec<String> = blobs.iter().map(|b| blob_type(b)).collect();
    assert_eq!(blobs.len(), 4, "{types:?}");
    assert!(types.contains(&"ssh-ed25519-cert-v01@openssh.com".to_owned()));
    for blob in &blobs {
        let (alg, flags) = match blob_type(blob).as_str() {
            "ssh-rsa" => ("rsa-sha2-256".to_owned(), 2),
            t => (t.to_owned(), 0),
        };
        let data = userauth_data(blob, "u", &alg);
        let a = call(&mut c, &sign_request(blob, &data, flags)).unwrap();
        assert_eq!(a[0], SIGN_RESPONSE, "{alg}");
        if alg == "ssh-ed25519" {
            verify_signature(blob, &data, &a).unwrap();
        }
    }
    // The ed25519 key with its inner length disagreeing with the blob, or
    // with bytes left inside the blob: malformed, refused, not normalised
    // and forwarded.
    let ed = blobs
        .iter()
        .find(|b| blob_type(b) == "ssh-ed25519")
        .unwrap();
    let mut bad_len = ed.clone();
    bad_len[15..19].copy_from_slice(&40u32.to_be_bytes());
    let data = userauth_data(ed, "u", "ssh-ed25519");
    assert_eq!(
        call(&mut c, &sign_request(&bad_len, &data, 0)),
        Some(vec![FAILURE])
    );
    let mut stuffed = ed.clone();
    stuffed.extend(string(b"x"));
    assert_eq!(
        call(&mut c, &sign_request(&stuffed, &data, 0)),
        Some(vec![FAILURE])
    );
    // The same in the user-auth data's key blob.
    let stuffed_data = userauth_data(&stuffed, "u", "ssh-ed25519");
    assert_eq!(
        call(&mut c, &sign_request(ed, &stuffed_data, 0)),
        Some(vec![FAILURE])
    );
    assert!(d.wait_log("malformed (non-canonical encoding)"));
    assert!(d
        .log_text()
        .contains("not-ssh-userauth (malformed public key)"));
    assert_eq!(agent.keys(), before);
}
