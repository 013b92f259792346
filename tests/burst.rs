//! Bursts: hundreds of clients connecting at once, as a deploy
//! tool does, and a neighbour with no keys, against a real OpenSSH
//! `ssh-agent` run in debug mode (`-d`), whose own log counts what reached
//! it: connections (`new_socket: type = CONNECTION`) and requests
//! (`process_message: … type N`). Counts are asserted, never timings.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use common::*;

/// A real `ssh-agent -d`: its debug log (stderr) says what reached it.
struct DebugAgent {
    socket: PathBuf,
    log: PathBuf,
    child: Child,
}

impl DebugAgent {
    fn start(dir: &TempDir, tag: &str) -> Self {
        let socket = dir.join(&format!("{tag}.sock"));
        let log = dir.join(&format!("{tag}.log"));
        let _ = std::fs::remove_file(&socket);
        let child = spawn(
            Command::new("ssh-agent")
                .arg("-d")
                .arg("-a")
                .arg(&socket)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap()),
        );
        assert!(
            wait_for(Duration::from_secs(10), || UnixStream::connect(&socket)
                .is_ok()),
            "ssh-agent did not start"
        );
        Self { socket, log, child }
    }

    fn add(&self, key: &Path) {
        let o = run(Command::new("ssh-add")
            .arg(key)
            .env("SSH_AUTH_SOCK", &self.socket));
        assert!(o.status.success(), "ssh-add: {}", stderr(&o));
    }

    fn log_count(&self, needle: &str) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Connections the agent accepted so far.
    fn connections(&self) -> usize {
        self.log_count("new_socket: type = CONNECTION")
    }

    /// Requests of `kind` the agent handled so far.
    fn requests(&self, kind: u8) -> usize {
        self.log_count(&format!(") type {kind}"))
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig).unwrap();
    }
}

impl Drop for DebugAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Raises this process's soft descriptor limit to the hard one (children,
/// the daemon and the clients, inherit it): a burst of `clients` needs a
/// descriptor each in the client process.
fn raise_nofile(clients: u64) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    assert!(
        hard >= clients + 256,
        "RLIMIT_NOFILE hard limit {hard} is too low for {clients} clients"
    );
}

/// An upstream agent holding `deploy` (ed25519), a daemon in front of it,
/// a member of the key's group, and a user in no key's group.
struct Burst {
    dir: TempDir,
    agent: DebugAgent,
    daemon: Daemon,
    member: TestUser,
    outsider: TestUser,
    _group: TestGroup,
}

impl Burst {
    fn new(limits: &str) -> Self {
        let dir = TempDir::new("b");
        let agent = DebugAgent::start(&dir, "agent");
        let key = keygen(dir.path(), "deploy", "ed25519", "");
        agent.add(&key);
        let group = TestGroup::create("bdep");
        let member = TestUser::create("bm", &[&group]);
        let outsider = TestUser::create("bo", &[]);
        let config = Daemon::config(
            &dir,
            &agent.socket,
            &format!("{limits}\n[keys.deploy]\ngroups = [\"{}\"]\n", group.name),
        );
        let daemon = Daemon::start_with(&dir, &config);
        Self {
            dir,
            agent,
            daemon,
            member,
            outsider,
            _group: group,
        }
    }

    fn sign(&self) -> Vec<u8> {
        let blob = pubkey_blob(&self.dir.join("deploy.pub"));
        sign_request(&blob, &userauth_data(&blob, "deploy", "ssh-ed25519"), 0)
    }
}

/// What one burst client does on its connection, in order.
#[derive(Clone, Copy)]
enum Ask {
    /// REQUEST_IDENTITIES; the answer must list this many keys.
    List(usize),
    /// The sign request given to the helper; must be signed.
    Sign,
    /// status@keyholder; the answer must say the agent is reachable.
    Status,
    /// session-bind@openssh.com with an RSA host key and a junk signature;
    /// answered SUCCESS or FAILURE.
    Bind,
}

impl Ask {
    fn code(self) -> String {
        match self {
            Ask::List(n) => format!("l{n}"),
            Ask::Sign => "s".into(),
            Ask::Status => "t".into(),
            Ask::Bind => "b".into(),
        }
    }
}

/// The tally of a burst run by [`burst_as`].
struct Tally {
    ok: usize,
    failed: usize,
    first_failures: String,
}

/// Runs `rounds` bursts as `who`: each time `clients` threads connect at
/// once and send `asks` in order. Returns the tally of the child.
fn start_burst(
    who: &As,
    socket: &Path,
    clients: usize,
    rounds: usize,
    asks: &[Ask],
    sign: &[u8],
) -> Child {
    let asks: Vec<String> = asks.iter().map(|a| a.code()).collect();
    spawn_helper_as(
        who,
        "burst_client_helper",
        &[
            ("KHT_BURST_SOCKET", socket.display().to_string()),
            ("KHT_BURST_CLIENTS", clients.to_string()),
            ("KHT_BURST_ROUNDS", rounds.to_string()),
            ("KHT_BURST_ASKS", asks.join(",")),
            ("KHT_BURST_SIGN", hex(sign)),
        ],
    )
}

impl Tally {
    /// Every one of `n` clients got every answer it asked for.
    fn assert_all_served(&self, n: usize, log: &str) {
        assert_eq!(
            (self.ok, self.failed),
            (n, 0),
            "first failures: {}\n{log}",
            self.first_failures
        );
    }
}

fn finish_burst(mut child: Child) -> Tally {
    let line = read_line_with(&mut child, "BURST ");
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success());
    let field = |name: &str| -> usize {
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(name))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} in {line}"))
    };
    Tally {
        ok: field("ok="),
        failed: field("failed="),
        first_failures: line
            .split_once(" first:")
            .map(|(_, r)| r.to_owned())
            .unwrap_or_default(),
    }
}

fn burst_as(
    who: &As,
    socket: &Path,
    clients: usize,
    rounds: usize,
    asks: &[Ask],
    sign: &[u8],
) -> Tally {
    finish_burst(start_burst(who, socket, clients, rounds, asks, sign))
}

/// The client side of a burst: does nothing unless run by [`start_burst`].
#[test]
fn burst_client_helper() {
    let Ok(socket) = std::env::var("KHT_BURST_SOCKET") else {
        return;
    };
    let number = |name: &str| -> usize { std::env::var(name).unwrap().parse().unwrap() };
    let clients = number("KHT_BURST_CLIENTS");
    let rounds = number("KHT_BURST_ROUNDS");
    let sign = Arc::new(unhex(&std::env::var("KHT_BURST_SIGN").unwrap()));
    let asks: Arc<Vec<String>> = Arc::new(
        std::env::var("KHT_BURST_ASKS")
            .unwrap()
            .split(',')
            .map(str::to_owned)
            .collect(),
    );
    let (mut ok, mut failures) = (0usize, Vec::<String>::new());
    for _ in 0..rounds {
        let barrier = Arc::new(Barrier::new(clients));
        let sent = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..clients)
            .map(|_| {
                let (barrier, sent, asks, sign, socket) = (
                    Arc::clone(&barrier),
                    Arc::clone(&sent),
                    Arc::clone(&asks),
                    Arc::clone(&sign),
                    socket.clone(),
                );
                std::thread::Builder::new()
                    .stack_size(128 * 1024)
                    .spawn(move || {
                        barrier.wait();
                        one_client(Path::new(&socket), &asks, &sign, &sent)
                    })
                    .unwrap()
            })
            .collect();
        // Everyone has sent the first request (for tests that hold the
        // agent meanwhile).
        while sent.load(Ordering::SeqCst) < clients && !threads.iter().all(|t| t.is_finished()) {
            std::thread::sleep(Duration::from_millis(5));
        }
        println!("SENT {}", sent.load(Ordering::SeqCst));
        for t in threads {
            match t.join().unwrap() {
                Ok(()) => ok += 1,
                Err(e) => failures.push(e),
            }
        }
    }
    failures.sort();
    failures.dedup();
    println!(
        "BURST ok={ok} failed={} first:{}",
        clients * rounds - ok,
        failures
            .iter()
            .take(5)
            .cloned()
            .collect::<Vec<_>>()
            .join(" | ")
    );
}

fn one_client(
    socket: &Path,
    asks: &[String],
    sign: &[u8],
    sent: &AtomicUsize,
) -> Result<(), String> {
    let mut s = UnixStream::connect(socket).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    for (i, ask) in asks.iter().enumerate() {
        let message = match ask.as_str() {
            "s" => sign.to_vec(),
            "t" => [vec![27u8], string(b"status@keyholder")].concat(),
            "b" => session_bind(),
            _ => vec![11u8],
        };
        let mut framed = (message.len() as u32).to_be_bytes().to_vec();
        framed.extend(&message);
        s.write_all(&framed)
            .map_err(|e| format!("write {ask}: {e}"))?;
        if i == 0 {
            sent.fetch_add(1, Ordering::SeqCst);
        }
        let mut len = [0u8; 4];
        s.read_exact(&mut len)
            .map_err(|e| format!("read {ask}: {e}"))?;
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
        s.read_exact(&mut body)
            .map_err(|e| format!("read {ask}: {e}"))?;
        let good = match ask.as_str() {
            "s" => body.first() == Some(&SIGN_RESPONSE),
            "t" => status_reachable(&body),
            "b" => body == [SUCCESS] || body == [EXTENSION_FAILURE],
            list => {
                let want: u32 = list[1..].parse().unwrap();
                body.first() == Some(&IDENTITIES_ANSWER)
                    && body.get(1..5) == Some(&want.to_be_bytes()[..])
            }
        };
        if !good {
            return Err(format!("{ask}: answer {:?}", body.get(..body.len().min(8))));
        }
    }
    Ok(())
}

/// The daemon logged no upstream failure (FAILURE answered for one).
fn assert_no_upstream_errors(daemon: &Daemon) {
    let log = daemon.log_text();
    assert!(
        !log.contains("answering FAILURE") && !log.contains("failed upstream"),
        "{log}"
    );
}

/// A session-bind@openssh.com request: an RSA host key with a 3 072-bit
/// public exponent (what makes verifying it expensive for the agent), a
/// session id, a junk signature, not forwarded.
fn session_bind() -> Vec<u8> {
    let host_key = [
        string(b"ssh-rsa"),
        string(&[0x7f; 384]),
        string(&[&[0u8][..], &[0xc5; 384]].concat()),
    ]
    .concat();
    [
        vec![27u8],
        string(b"session-bind@openssh.com"),
        string(&host_key),
        string(&[3u8; 32]),
        string(&[string(b"rsa-sha2-512"), string(&[1u8; 384])].concat()),
        vec![0u8],
    ]
    .concat()
}

/// Whether a status@keyholder answer says the upstream agent is reachable.
fn status_reachable(body: &[u8]) -> bool {
    let Some((&EXTENSION_RESPONSE, rest)) = body.split_first() else {
        return false;
    };
    take_string(rest)
        .and_then(|(_, rest)| rest.get(4))
        .is_some_and(|&reachable| reachable == 1)
}

#[test]
fn a_thousand_clients_at_once_each_list_and_sign() {
    require_root!();
    raise_nofile(1000);
    let b = Burst::new("[limits]\nmax_connections_per_user = 2000\n");
    let connections = b.agent.connections();
    let t = burst_as(
        &b.member.as_user(),
        &b.daemon.socket,
        1000,
        1,
        &[Ask::List(1), Ask::Sign],
        &b.sign(),
    );
    t.assert_all_served(1000, &b.daemon.log_text());
    // Every sign reached the agent, over at most the pool's connections.
    assert_eq!(b.agent.requests(13), 1000);
    let opened = b.agent.connections() - connections;
    assert!((1..=64).contains(&opened), "{opened} upstream connections");
    assert_no_upstream_errors(&b.daemon);
}

#[test]
fn three_hundred_clients_at_once_within_the_default_limits() {
    require_root!();
    raise_nofile(300);
    let b = Burst::new("");
    let t = burst_as(
        &b.member.as_user(),
        &b.daemon.socket,
        300,
        2,
        &[Ask::List(1), Ask::Sign],
        &b.sign(),
    );
    t.assert_all_served(600, &b.daemon.log_text());
    assert_eq!(b.agent.requests(13), 600);
}

#[test]
fn a_no_key_users_bursts_never_reach_the_agent() {
    require_root!();
    raise_nofile(1000);
    let b = Burst::new("");
    let (connections, lists) = (b.agent.connections(), b.agent.requests(11));
    // Alone: 2 bursts of 500 list-only connections, each answered with no
    // keys, and the agent sees nothing at all.
    let t = burst_as(
        &b.outsider.as_user(),
        &b.daemon.socket,
        500,
        2,
        &[Ask::List(0)],
        &[],
    );
    t.assert_all_served(1000, "");
    assert_eq!(b.agent.connections(), connections);
    assert_eq!(b.agent.requests(11), lists);

    // While a member lists and signs, 20 times one after the other: every
    // one of the member's succeeds, and the agent sees the member's lists
    // (coalesced, so perhaps fewer) and never the outsider's.
    let flood = start_burst(
        &b.outsider.as_user(),
        &b.daemon.socket,
        500,
        4,
        &[Ask::List(0)],
        &[],
    );
    let member = burst_as(
        &b.member.as_user(),
        &b.daemon.socket,
        1,
        20,
        &[Ask::List(1), Ask::Sign],
        &b.sign(),
    );
    let flood = finish_burst(flood);
    member.assert_all_served(20, "");
    flood.assert_all_served(2000, "");
    assert!(b.agent.requests(11) - lists <= 20);
    assert_eq!(b.agent.requests(13), 20);
}

#[test]
fn a_flood_of_status_requests_is_two_agent_requests_at_a_time() {
    require_root!();
    raise_nofile(200);
    let b = Burst::new("");
    let lists = b.agent.requests(11);
    // The agent is held while 200 status requests of one user arrive; when
    // it goes on, the two listings in flight answer the first two, and the
    // next one every request that arrived meanwhile.
    b.agent.signal(nix::sys::signal::Signal::SIGSTOP);
    let mut flood = start_burst(
        &b.outsider.as_user(),
        &b.daemon.socket,
        200,
        1,
        &[Ask::Status],
        &[],
    );
    let sent = read_line_with(&mut flood, "SENT ");
    assert_eq!(sent.trim(), "200");
    // Let the daemon accept them all and read what was sent (it is not
    // held, the agent is).
    let fds = || std::fs::read_dir(format!("/proc/{}/fd", b.daemon.pid())).map_or(0, |d| d.count());
    assert!(wait_for(Duration::from_secs(30), || fds() >= 200));
    std::thread::sleep(Duration::from_secs(1));
    b.agent.signal(nix::sys::signal::Signal::SIGCONT);
    let t = finish_burst(flood);
    t.assert_all_served(200, "");
    // Three when every request was read while the first listings were held
    // (a few more if the daemon was slow to read some); one per request
    // without coalescing.
    let asked = b.agent.requests(11) - lists;
    assert!(
        (1..=10).contains(&asked),
        "{asked} listings for 200 status requests"
    );
}

#[test]
fn pooled_connections_outlive_an_agent_restart() {
    require_root!();
    let mut b = Burst::new("");
    let sign = b.sign();
    let t = burst_as(
        &b.member.as_user(),
        &b.daemon.socket,
        8,
        1,
        &[Ask::List(1), Ask::Sign],
        &sign,
    );
    t.assert_all_served(8, "");
    // The agent dies (its pooled connections with it) and another starts
    // on the same socket, with the key added again.
    let _ = b.agent.child.kill();
    let _ = b.agent.child.wait();
    let _ = std::fs::remove_file(&b.agent.socket);
    b.agent = DebugAgent::start(&b.dir, "agent");
    b.agent.add(&b.dir.join("deploy"));
    let t = burst_as(
        &b.member.as_user(),
        &b.daemon.socket,
        8,
        1,
        &[Ask::List(1), Ask::Sign],
        &sign,
    );
    t.assert_all_served(8, &b.daemon.log_text());
    assert_no_upstream_errors(&b.daemon);
}

#[test]
fn session_binds_never_reach_the_agent() {
    require_root!();
    raise_nofile(400);
    let b = Burst::new("");
    let binds = b.agent.requests(27);
    // A no-key user's flood of expensive binds, while a member binds and
    // signs: every one answered by the daemon, none forwarded.
    let flood = start_burst(
        &b.outsider.as_user(),
        &b.daemon.socket,
        200,
        2,
        &[Ask::Bind, Ask::Bind],
        &[],
    );
    let member = burst_as(
        &b.member.as_user(),
        &b.daemon.socket,
        4,
        5,
        &[Ask::Bind, Ask::List(1), Ask::Sign],
        &b.sign(),
    );
    member.assert_all_served(20, &b.daemon.log_text());
    finish_burst(flood).assert_all_served(400, "");
    assert_eq!(b.agent.requests(27), binds);
    assert_eq!(b.agent.requests(13), 20);
}

#[test]
fn a_key_armed_or_removed_during_a_flood_of_listings_is_seen_by_the_next_listing() {
    require_root!();
    raise_nofile(100);
    // The daemon keeps a listing's answer for 500 µs and answers lists
    // arriving meanwhile from it: a change made upstream while lists pour
    // in is still seen by the next `ssh-add -L` started after it.
    let dir = TempDir::new("bf");
    let agent = DebugAgent::start(&dir, "agent");
    let deploy = keygen(dir.path(), "deploy", "ed25519", "");
    let extra = keygen(dir.path(), "extra", "ed25519", "");
    agent.add(&deploy);
    let (flooders, viewers) = (TestGroup::create("bfa"), TestGroup::create("bfb"));
    let flooder = TestUser::create("bfm", &[&flooders]);
    let viewer = TestUser::create("bfv", &[&viewers]);
    let config = Daemon::config(
        &dir,
        &agent.socket,
        &format!(
            "[keys.deploy]\ngroups = [\"{}\"]\n[keys.extra]\ngroups = [\"{}\"]\n",
            flooders.name, viewers.name
        ),
    );
    let daemon = Daemon::start_with(&dir, &config);
    let mut flood = start_burst(
        &flooder.as_user(),
        &daemon.socket,
        16,
        600,
        &[Ask::List(1), Ask::List(1), Ask::List(1), Ask::List(1)],
        &[],
    );
    read_line_with(&mut flood, "SENT ");
    let extra_pub = std::fs::read_to_string(extra.with_extension("pub")).unwrap();
    let extra_blob = extra_pub.split_whitespace().nth(1).unwrap().to_owned();
    let shows_extra = |keys: &[String]| keys.iter().any(|k| k.contains(&extra_blob));
    for _ in 0..3 {
        assert!(!shows_extra(&daemon.listed(&viewer.as_user())));
        agent.add(&extra);
        assert!(shows_extra(&daemon.listed(&viewer.as_user())));
        let o = run(Command::new("ssh-add")
            .arg("-d")
            .arg(extra.with_extension("pub"))
            .env("SSH_AUTH_SOCK", &agent.socket));
        assert!(o.status.success(), "ssh-add -d: {}", stderr(&o));
    }
    assert!(!shows_extra(&daemon.listed(&viewer.as_user())));
    // The flood was still going on, and every one of its lists was
    // answered with the flooder's one key.
    assert!(
        flood.try_wait().unwrap().is_none(),
        "the flood ended before the checks did"
    );
    let t = finish_burst(flood);
    t.assert_all_served(9600, &daemon.log_text());
}
