//! keyholder's overhead against the ssh-agent it fronts.
//!
//! ```sh
//! cargo bench --bench proxy          # as root; about 7 minutes on 2 cores
//! ```
//!
//! Builds the daemon in release mode (cargo's bench profile inherits
//! `[profile.release]`) and, as root, sets up:
//! - a throwaway group and two users in it (`kht-bench<PID>{g,a,b}`);
//! - ONE OpenSSH `ssh-agent`, running as bench user `a`, holding a fresh
//!   Ed25519 key. ssh-agent accepts its own uid and root, so the same agent
//!   process serves both sides: the "direct" side (user `a` connects to it)
//!   and the proxy (the root daemon connects to it as its upstream,
//!   `spawn = false`). Same program, same key, same process: the only
//!   difference between the two sides is the proxy;
//! - `keyholder daemon` (the real binary) with the key configured for the
//!   group, default limits, `log = "stderr"` at the default INFO level (one
//!   audit line per signature, written to a file).
//!
//! The load generator is this binary re-executed as user `a` under
//! `setpriv --init-groups` (see `load.rs`). Each scenario runs, in each of
//! `KH_BENCH_ROUNDS` (5) rounds, one window in which direct and proxy
//! alternate every `KH_BENCH_SLICE_MS` (200) ms in ABBA order, for
//! `KH_BENCH_SECS` (3) seconds per side after a 0.5 s warm-up (see
//! `load::RunSpec`); the report gives medians over rounds (for
//! proxy/direct, the median of each round's ratio, and the pooled ratio),
//! total failures, the CPU time per operation of each process, the agent's
//! run-queue wait and how busy the rest of the machine was, as Markdown on
//! stdout (progress goes to stderr). Then the memory phase holds
//! `KH_BENCH_IDLE` (1000) idle connections, half from each user (the default
//! `max_connections_per_user` of 512 is kept), and reads the daemon's VmRSS.
//!
//! Everything is removed on exit, failure or Ctrl-C; every child has a
//! parent-death signal, and users left by a run killed with SIGKILL are
//! removed by the next run.
//!
//! The `burst` workload: `KH_BENCH_BURST` (300) clients of user `a` are
//! started and let go at once; each connects, lists, signs and closes (a
//! deploy tool starting hundreds of ssh at once). One burst per side per
//! round, the order swapped every round; the report gives the failures and
//! the time to serve them all (medians over rounds). The default
//! `max_connections_per_user` (512) is kept, so at most 512 per burst.
//!
//! `KH_BENCH_RELAY=0` leaves out the byte-copying relay (`relay.rs`), measured
//! by default against the agent for each scenario, in windows of its own.
//! `KH_BENCH_CANDIDATE=/path/to/keyholder` also runs that build beside this
//! one and interleaves the two daemons in each scenario (`candidate.rs`).
//! `KH_BENCH_ONLY=sign1,sign16,connect16,list16,burst,certs,grants,pkcs11,openbao,hung,memory`
//! selects parts (for profiling: the daemon's pid is printed at start);
//! `KH_BENCH_EXTRA_GROUPS=N` puts the bench users in N more groups;
//! `KH_BENCH_LOG_LEVEL=warn` runs the daemon without audit lines (to measure
//! their cost; the default is the daemon's default, INFO). The `certs` part
//! (see `certs.rs`) compares `connect` with certificates on and off and
//! times one mint. The `grants` part (see `grants.rs`) compares `sign` and
//! `connect` without grants and under an active grant.
//! times one mint. The `pkcs11` part (see `pkcs11.rs`) measures the PKCS#11
//! backend on a SoftHSM2 token against a direct PKCS#11 client.
//! The `openbao` part (see `openbao.rs`) runs the openbao backend against a
//! three-node OpenBao cluster on this machine.

mod baoshim;
mod candidate;
mod certs;
mod grants;
mod hung;
mod load;
#[path = "../../tests/common/nslcd.rs"]
mod nslcd;
mod openbao;
mod pkcs11;
#[path = "../../tests/common/process.rs"]
mod process;
mod relay;
mod setup;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use load::{
    BurstResult, BurstSpec, HoldSpec, Op, RunResult, RunSpec, SideSpec, SPEC_ENV, WORKER_ENV,
};
use setup::{
    machine_cpu_us, read_kib, run, wait_for, wait_socket, Account, Proc, Result, TempDir, PREFIX,
};

/// The daemon under test, built by cargo for this bench (release settings).
const KEYHOLDER: &str = env!("CARGO_BIN_EXE_keyholder");
/// Host steal, in cores, above which the report says the host was busy.
const STEAL_WARN: f64 = 0.05;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: nix::libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn main() -> ExitCode {
    if let Ok(mode) = std::env::var(WORKER_ENV) {
        return match load::worker_main(&mode) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("bench worker: {e}");
                ExitCode::FAILURE
            }
        };
    }
    // `cargo test --all-targets` runs bench targets without `--bench`.
    if !std::env::args().any(|a| a == "--bench") {
        println!("proxy benchmark: run it with `cargo bench --bench proxy` (as root)");
        return ExitCode::SUCCESS;
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!("the proxy benchmark needs root (it creates users and runs the daemon)");
        return ExitCode::FAILURE;
    }
    install_signal_handlers();
    match bench() {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("\nbench failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn install_signal_handlers() {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only stores to an atomic.
        let _ = unsafe { sigaction(sig, &action) };
    }
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        Err("interrupted".into())
    } else {
        Ok(())
    }
}

/// Settings from the environment.
struct Settings {
    timing: Timing,
    rounds: usize,
    idle: usize,
    /// Clients per burst.
    burst: usize,
    /// Groups each bench user is in besides its own and the key's.
    extra_groups: usize,
    only: Option<Vec<String>>,
}

impl Settings {
    fn from_env() -> Result<Self> {
        fn num(name: &str, default: f64) -> Result<f64> {
            match std::env::var(name) {
                Ok(v) => v
                    .parse::<f64>()
                    .ok()
                    .filter(|n| *n > 0.0)
                    .ok_or_else(|| format!("{name}={v:?}: not a positive number")),
                Err(_) => Ok(default),
            }
        }
        Ok(Self {
            timing: Timing {
                window_ms: (num("KH_BENCH_SECS", 3.0)? * 1000.0) as u64,
                warmup_ms: 500,
                slice_ms: num("KH_BENCH_SLICE_MS", 200.0)? as u64,
                settle_ms: match std::env::var("KH_BENCH_SETTLE_MS") {
                    Ok(v) => v
                        .parse()
                        .map_err(|_| format!("KH_BENCH_SETTLE_MS={v:?}: not a number"))?,
                    Err(_) => 30,
                },
            },
            rounds: num("KH_BENCH_ROUNDS", 5.0)? as usize,
            idle: num("KH_BENCH_IDLE", 1000.0)? as usize,
            burst: num("KH_BENCH_BURST", 300.0)? as usize,
            extra_groups: match std::env::var("KH_BENCH_EXTRA_GROUPS") {
                Ok(v) => v
                    .parse()
                    .map_err(|_| format!("KH_BENCH_EXTRA_GROUPS={v:?}: not a number"))?,
                Err(_) => 0,
            },
            only: std::env::var("KH_BENCH_ONLY")
                .ok()
                .map(|s| s.split(',').map(|p| p.trim().to_owned()).collect()),
        })
    }

    fn wants(&self, part: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|o| o.iter().any(|p| p == part))
    }
}

/// How a window is cut (see [`RunSpec`]).
#[derive(Clone, Copy)]
pub struct Timing {
    /// Per side, settle periods included.
    pub window_ms: u64,
    pub warmup_ms: u64,
    pub slice_ms: u64,
    pub settle_ms: u64,
}

struct Scenario {
    id: &'static str,
    label: &'static str,
    op: Op,
    conns: usize,
    /// Minimum proxy/direct throughput ratio with the upstream backend (see
    /// BENCHMARKS.md, "Targets").
    target: f64,
}

const SCENARIOS: [Scenario; 4] = [
    Scenario {
        id: "sign1",
        label: "`sign`, 1 connection",
        op: Op::Sign,
        conns: 1,
        target: 0.95,
    },
    Scenario {
        id: "sign16",
        label: "`sign`, 16 connections",
        op: Op::Sign,
        conns: 16,
        target: 1.0,
    },
    Scenario {
        id: "connect16",
        label: "`connect` (connect, list, sign, close), 16 concurrent",
        op: Op::Connect,
        conns: 16,
        target: 1.0,
    },
    Scenario {
        id: "list16",
        label: "`list`, 16 connections",
        op: Op::List,
        conns: 16,
        target: 0.80,
    },
];

/// RSS target with 1000 idle connections.
const RSS_TARGET_MIB: f64 = 40.0;

/// Two sides measured in the same rounds: each round's `other`/`base`
/// throughput ratio (their slices were interleaved, so this paired figure is
/// less exposed to load that comes and goes on the host than a ratio of
/// medians), their median, and the ratio of all rounds' operations pooled.
pub struct Paired {
    pub ratios: Vec<f64>,
    pub median: f64,
    pub pooled: f64,
}

impl Paired {
    pub fn of(base: &[&RunResult], other: &[&RunResult]) -> Self {
        let ratios: Vec<f64> = base
            .iter()
            .zip(other)
            .map(|(b, o)| o.ops_per_sec() / b.ops_per_sec())
            .collect();
        let total = |v: &[&RunResult]| {
            let ops: u64 = v.iter().map(|r| r.ops).sum();
            let secs: f64 = v.iter().map(|r| r.secs).sum();
            ops as f64 / secs.max(f64::MIN_POSITIVE)
        };
        Self {
            median: median_of(ratios.clone()),
            pooled: total(other) / total(base).max(f64::MIN_POSITIVE),
            ratios,
        }
    }

    /// `0.98 1.01 … (pooled 0.995)`.
    pub fn per_round(&self) -> String {
        let mut words: Vec<String> = self.ratios.iter().map(|r| format!("{r:.2}")).collect();
        words.push(format!("(pooled {:.3})", self.pooled));
        words.join(" ")
    }
}

/// This bench binary as a worker (see `load.rs`) in `mode` with `spec`, run
/// as `user`.
fn worker_command(user: &Account, mode: &str, spec: &impl serde::Serialize) -> Result<Command> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut c = user.command(&exe);
    c.env(WORKER_ENV, mode).env(
        SPEC_ENV,
        serde_json::to_string(spec).map_err(|e| e.to_string())?,
    );
    Ok(c)
}

/// `binary daemon --config config` under `setpriv --pdeathsig=TERM`, its
/// log to `log`, the log level from `KH_BENCH_LOG_LEVEL` if set: every
/// daemon the bench starts outside a namespace of its own.
fn daemon_command(binary: &Path, config: &Path, log: &Path) -> Result<Command> {
    let logfile = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let mut c = Command::new("setpriv");
    c.args(["--pdeathsig=TERM", "--"])
        .arg(binary)
        .args(["daemon", "--config"])
        .arg(config)
        .env_remove("KEYHOLDER_LOG_LEVEL")
        .env_remove("KEYHOLDER_CONFIG")
        .envs(
            std::env::var("KH_BENCH_LOG_LEVEL")
                .ok()
                .map(|level| ("KEYHOLDER_LOG_LEVEL", level)),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(logfile);
    Ok(c)
}

/// The sides of the scenario windows.
const SIDES: [Side; 2] = [Side::Direct, Side::Proxy];

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Side {
    Direct,
    Proxy,
    /// A relay that only copies messages (`relay.rs`): the floor of any
    /// proxy on this machine.
    Relay,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Direct => "direct",
            Side::Proxy => "proxy",
            Side::Relay => "relay",
        }
    }
}

/// The running setup. Fields drop in order: daemon, relay, agent, users,
/// group, directory.
struct Bench {
    daemon: Proc,
    /// The byte-copying relay (`relay.rs`), unless `KH_BENCH_RELAY=0`.
    relay: Option<Proc>,
    agent: Proc,
    user_a: Account,
    user_b: Account,
    _group: Account,
    _extra_groups: Vec<Account>,
    dir: TempDir,
    direct: PathBuf,
    proxy: PathBuf,
    relay_socket: PathBuf,
    log: PathBuf,
    /// The framed SIGN_REQUEST (a valid user-auth request for the key).
    sign: Vec<u8>,
}

impl Bench {
    fn start(extra_groups: usize) -> Result<Self> {
        let pid = std::process::id();
        let dir = TempDir::create(std::env::temp_dir().join(format!("{PREFIX}{pid}")))?;
        let group = Account::group(&format!("{PREFIX}{pid}g"))?;
        let extra = (0..extra_groups)
            .map(|i| Account::group(&format!("{PREFIX}{pid}x{i}")))
            .collect::<Result<Vec<_>>>()?;
        let groups: Vec<&Account> = std::iter::once(&group).chain(&extra).collect();
        let user_a = Account::user(&format!("{PREFIX}{pid}a"), &groups)?;
        let user_b = Account::user(&format!("{PREFIX}{pid}b"), &groups)?;

        let key = dir.join("bench");
        let choice = Choice::from_env()?;
        run(Command::new("ssh-keygen")
            .args(["-q", "-N", "", "-C", "bench"])
            .args(choice.keygen_args())
            .arg("-f")
            .arg(&key))?;
        let pub_path = dir.join("bench.pub");
        std::fs::set_permissions(&pub_path, std::fs::Permissions::from_mode(0o644))
            .map_err(|e| e.to_string())?;

        // The one ssh-agent, as user a, in a directory only a (and root) can enter.
        let agent_dir = dir.join("agent");
        std::fs::create_dir(&agent_dir).map_err(|e| e.to_string())?;
        nix::unistd::chown(
            &agent_dir,
            Some(nix::unistd::Uid::from_raw(user_a.id()?)),
            None,
        )
        .map_err(|e| format!("chown {}: {e}", agent_dir.display()))?;
        std::fs::set_permissions(&agent_dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| e.to_string())?;
        let direct = agent_dir.join("agent.sock");
        let agent = Proc {
            name: "ssh-agent",
            child: user_a
                .command(Path::new("ssh-agent"))
                .arg("-D")
                .arg("-a")
                .arg(&direct)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .map_err(|e| format!("cannot start ssh-agent: {e}"))?,
        };
        if !wait_socket(&direct) {
            return Err("ssh-agent did not start".into());
        }
        run(Command::new("ssh-add")
            .arg("-q")
            .arg(&key)
            .env("SSH_AUTH_SOCK", &direct))?;
        // The relay, as user a beside the agent (see relay.rs).
        let relay_socket = agent_dir.join("relay.sock");
        let relay = if std::env::var("KH_BENCH_RELAY").as_deref() == Ok("0") {
            None
        } else {
            let spec = relay::RelaySpec {
                listen: relay_socket.clone(),
                upstream: direct.clone(),
            };
            let proc = Proc {
                name: "relay",
                child: worker_command(&user_a, "relay", &spec)?
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .spawn()
                    .map_err(|e| format!("cannot start the relay: {e}"))?,
            };
            if !wait_socket(&relay_socket) {
                return Err("the relay did not start".into());
            }
            Some(proc)
        };

        let proxy = dir.join("proxy.sock");
        let config = dir.join("keyholder.toml");
        // builtin: the daemon holds the same key itself, on its own
        // root-only agent.socket; the ssh-agent then serves the direct side only.
        let builtin_socket = dir.join("builtin-agent.sock");
        let agent_table = if choice.builtin {
            format!(
                "[agent]\nbackend = \"builtin\"\nsocket = \"{}\"\n",
                builtin_socket.display()
            )
        } else {
            format!(
                "[agent]\nsocket = \"{}\"\nspawn = false\n",
                direct.display()
            )
        };
        std::fs::write(
            &config,
            format!(
                "# keyholder proxy benchmark; [limits] are the defaults\n\
                 socket = \"{}\"\nkey_dir = \"{}\"\nlog = \"stderr\"\n\n\
                 {agent_table}\n\
                 [keys.bench]\ngroups = [\"{}\"]\n",
                proxy.display(),
                dir.0.display(),
                group.name
            ),
        )
        .map_err(|e| e.to_string())?;
        let log = dir.join("daemon.log");
        let daemon = Proc {
            name: "keyholder daemon",
            child: daemon_command(Path::new(KEYHOLDER), &config, &log)?
                .spawn()
                .map_err(|e| format!("cannot start {KEYHOLDER}: {e}"))?,
        };
        if !wait_socket(&proxy) {
            return Err(format!(
                "the daemon did not start:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            ));
        }
        if choice.builtin {
            if !wait_socket(&builtin_socket) {
                return Err("the builtin backend's agent.socket did not appear".into());
            }
            run(Command::new("ssh-add")
                .arg("-q")
                .arg(&key)
                .env("SSH_AUTH_SOCK", &builtin_socket))?;
        }
        eprintln!("backend {}, key {}", choice.backend_name(), choice.key);
        let sign = sign_request(&pub_path, choice.rsa())?;
        Ok(Self {
            daemon,
            relay,
            agent,
            user_a,
            user_b,
            _group: group,
            _extra_groups: extra,
            dir,
            direct,
            proxy,
            relay_socket,
            log,
            sign,
        })
    }

    /// The bench users' group (the keys' `groups`).
    fn group_name(&self) -> &str {
        &self._group.name
    }

    fn socket(&self, side: Side) -> &Path {
        match side {
            Side::Direct => &self.direct,
            Side::Proxy => &self.proxy,
            Side::Relay => &self.relay_socket,
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Two sides of a window on `first` and `second`, both sending this
    /// run's sign request.
    fn pair(&self, first: &Path, second: &Path) -> Vec<SideSpec> {
        [first, second]
            .into_iter()
            .map(|socket| SideSpec {
                socket: socket.to_owned(),
                sign: self.sign.clone(),
            })
            .collect()
    }

    /// Writes the configuration of another daemon beside the main one:
    /// the main one's, listening on `proxy-{tag}.sock`, then `edit`ed, in
    /// `keyholder-{tag}.toml`. Returns that socket, the file, and its text.
    fn config_beside(
        &self,
        tag: &str,
        edit: impl FnOnce(String) -> String,
    ) -> Result<(PathBuf, PathBuf, String)> {
        let dir = &self.dir.0;
        let socket = dir.join(format!("proxy-{tag}.sock"));
        let config = dir.join(format!("keyholder-{tag}.toml"));
        let plain =
            std::fs::read_to_string(dir.join("keyholder.toml")).map_err(|e| e.to_string())?;
        let text = edit(plain.replace(
            &format!("socket = \"{}\"", self.proxy.display()),
            &format!("socket = \"{}\"", socket.display()),
        ));
        std::fs::write(&config, &text).map_err(|e| e.to_string())?;
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644))
            .map_err(|e| e.to_string())?;
        Ok((socket, config, text))
    }

    /// Errs when the daemon or the agent died.
    fn check_alive(&mut self) -> Result<()> {
        if !self.agent.alive() {
            return Err("ssh-agent died".into());
        }
        if !self.daemon.alive() {
            let log = self.log_text();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            return Err(format!(
                "the daemon died; its log ends with:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            ));
        }
        Ok(())
    }

    /// Runs one interleaved window of `op` as user a on `sides`, the ABBA
    /// order starting with the `round`-th of them; one [`Window`] per side,
    /// in their order.
    fn window(
        &mut self,
        sides: &[Side],
        op: Op,
        conns: usize,
        round: usize,
        timing: Timing,
    ) -> Result<Vec<Window>> {
        let specs = sides
            .iter()
            .map(|&side| SideSpec {
                socket: self.socket(side).to_owned(),
                sign: self.sign.clone(),
            })
            .collect();
        let daemon = self.daemon.pid();
        self.window_on(specs, op, conns, round % sides.len(), timing, &[daemon])
    }

    /// Runs one interleaved window as user a over `sides`; one [`Window`]
    /// per side, in their order. `daemons`: the pids whose CPU time is a
    /// daemon's (the first is [`Window::cpu_us`]`[1]`, all are in
    /// [`Window::daemons_us`]).
    fn window_on(
        &mut self,
        sides: Vec<SideSpec>,
        op: Op,
        conns: usize,
        first: usize,
        timing: Timing,
        daemons: &[u32],
    ) -> Result<Vec<Window>> {
        check_interrupted()?;
        let spec = RunSpec {
            sides,
            op,
            conns,
            warmup_ms: timing.warmup_ms,
            window_ms: timing.window_ms,
            slice_ms: timing.slice_ms,
            settle_ms: timing.settle_ms,
            first,
            pids: std::iter::once(self.agent.pid())
                .chain(daemons.iter().copied())
                .collect(),
        };
        let started = Instant::now();
        let before = machine_cpu_us();
        let results: Vec<RunResult> = self.worker("run", &spec)?;
        let after = machine_cpu_us();
        let elapsed_us = started.elapsed().as_secs_f64() * 1e6;
        // Everything else the machine ran meanwhile, in cores: the
        // processes measured per side are subtracted; the load generator's
        // process start and the warm-up count as "others" (small).
        let measured: f64 = results
            .iter()
            .map(|r| r.cpu_us.iter().sum::<f64>() + r.client_cpu_us)
            .sum();
        let others = ((after.0 - before.0) - measured).max(0.0) / elapsed_us;
        let steal = (after.1 - before.1) / elapsed_us;
        Ok(results
            .into_iter()
            .map(|r| {
                let per_op = |us: f64| us / r.all_ops.max(1) as f64;
                Window {
                    agent_wait_us: per_op(r.wait_us.first().copied().unwrap_or(0.0)),
                    cpu_us: [
                        per_op(r.cpu_us.first().copied().unwrap_or(0.0)),
                        per_op(r.cpu_us.get(1).copied().unwrap_or(0.0)),
                        per_op(r.client_cpu_us),
                    ],
                    daemons_us: r.cpu_us.iter().skip(1).map(|&us| per_op(us)).collect(),
                    others,
                    steal,
                    r,
                }
            })
            .collect())
    }
}

impl Bench {
    /// Runs one burst of `clients` as user a.
    fn burst(&mut self, side: Side, clients: usize) -> Result<BurstResult> {
        check_interrupted()?;
        let spec = BurstSpec {
            socket: self.socket(side).to_owned(),
            clients,
            sign: self.sign.clone(),
        };
        self.worker("burst", &spec)
    }

    /// Runs the load generator as user a in `mode` with `spec`, and reads
    /// its answer (the last line of its output).
    fn worker<T: serde::de::DeserializeOwned>(
        &mut self,
        mode: &str,
        spec: &impl serde::Serialize,
    ) -> Result<T> {
        let out = worker_command(&self.user_a, mode, spec)?
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .map_err(|e| format!("cannot start the load generator: {e}"))?;
        check_interrupted()?;
        self.check_alive()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().last().unwrap_or_default();
        serde_json::from_str(line)
            .map_err(|e| format!("load generator {mode} ({}): {e}: {text:?}", out.status))
    }
}

/// Bursts, one per side per round, and their report.
fn burst_phase(b: &mut Bench, settings: &Settings) -> Result<String> {
    let clients = settings.burst;
    let mut results: BTreeMap<Side, Vec<BurstResult>> = BTreeMap::new();
    for round in 0..settings.rounds {
        let order = if round % 2 == 0 {
            [Side::Direct, Side::Proxy]
        } else {
            [Side::Proxy, Side::Direct]
        };
        for side in order {
            // Let the previous burst's connections close on both ends.
            std::thread::sleep(Duration::from_millis(300));
            let r = b.burst(side, clients)?;
            eprintln!(
                "round {}/{} burst{clients:<5} {:<6} all served in {:>8.1} ms  per client p50 {:>7.1} ms p99 {:>7.1} ms  failures {}{}",
                round + 1,
                settings.rounds,
                side.name(),
                r.total_ms,
                r.p50_ms,
                r.p99_ms,
                r.failures,
                r.first_error
                    .as_ref()
                    .map(|e| format!(" (first: {e})"))
                    .unwrap_or_default()
            );
            results.entry(side).or_default().push(r);
        }
    }
    let d = &results[&Side::Direct];
    let p = &results[&Side::Proxy];
    let med = |v: &[BurstResult], f: fn(&BurstResult) -> f64| median_of(v.iter().map(f).collect());
    let ratios: Vec<f64> = d
        .iter()
        .zip(p)
        .map(|(d, p)| d.total_ms / p.total_ms)
        .collect();
    let per_round: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
    let mut out = String::new();
    out += "| burst | direct: all served (ms) | proxy: all served (ms) | speed proxy/direct | \
            direct per client p50 / p99 (ms) | proxy per client p50 / p99 (ms) | failures (direct / proxy) | ratio per round |\n\
            |---|---:|---:|---:|---:|---:|---:|---|\n";
    out += &format!(
        "| {clients} clients at once: connect, list, sign, close | {:.1} | {:.1} | **{:.2}** | {:.1} / {:.1} | {:.1} / {:.1} | {} / {} | {} |\n\n",
        med(d, |r| r.total_ms),
        med(p, |r| r.total_ms),
        median_of(ratios.clone()),
        med(d, |r| r.p50_ms),
        med(d, |r| r.p99_ms),
        med(p, |r| r.p50_ms),
        med(p, |r| r.p99_ms),
        d.iter().map(|r| r.failures).sum::<u64>(),
        p.iter().map(|r| r.failures).sum::<u64>(),
        per_round.join(" "),
    );
    Ok(out)
}

/// One window's result, with the CPU time each process spent per
/// operation (agent, daemon, load generator), in µs.
struct Window {
    r: RunResult,
    /// CPU µs per operation: the agent, the (first) daemon, the load
    /// generator.
    cpu_us: [f64; 3],
    /// CPU µs per operation of each daemon measured, in the order given.
    daemons_us: Vec<f64>,
    /// The agent's run-queue wait per operation, µs.
    agent_wait_us: f64,
    /// CPU the rest of the machine used during the window, in cores.
    others: f64,
    /// CPU time the hypervisor took from this VM during the window, in
    /// cores: the host's other tenants. Windows with much of it are not
    /// comparable with each other.
    steal: f64,
}

/// A framed SIGN_REQUEST whose data is an SSH user-authentication request
/// (method `publickey`) for the key in `pub_path`, as `ssh` sends it.
/// The backend and key a run measures (`KH_BENCH_BACKEND`, `KH_BENCH_KEY`).
///
/// - `KH_BENCH_BACKEND=upstream` (default): the daemon fronts the same
///   ssh-agent the direct side uses. `builtin`: the daemon holds the same
///   key itself (`[agent] backend = "builtin"`), the ssh-agent serves only
///   the direct side: keyholder's own signing against OpenSSH's agent.
/// - `KH_BENCH_KEY=ed25519` (default) or `rsa3072` (signed with
///   `rsa-sha2-512`, flags 4, as OpenSSH clients ask).
struct Choice {
    builtin: bool,
    key: String,
}

impl Choice {
    fn from_env() -> Result<Self> {
        let builtin = match std::env::var("KH_BENCH_BACKEND").as_deref() {
            Err(_) | Ok("upstream") => false,
            Ok("builtin") => true,
            Ok(other) => return Err(format!("KH_BENCH_BACKEND={other:?}: upstream or builtin")),
        };
        let key = std::env::var("KH_BENCH_KEY").unwrap_or_else(|_| "ed25519".to_owned());
        if key != "ed25519" && key != "rsa3072" {
            return Err(format!("KH_BENCH_KEY={key:?}: ed25519 or rsa3072"));
        }
        Ok(Self { builtin, key })
    }

    fn rsa(&self) -> bool {
        self.key == "rsa3072"
    }

    fn keygen_args(&self) -> &'static [&'static str] {
        if self.rsa() {
            &["-t", "rsa", "-b", "3072"]
        } else {
            &["-t", "ed25519"]
        }
    }

    /// The builtin backend's targets (against the OpenSSH agent used
    /// directly, same key; see BENCHMARKS.md, "Targets"); None: the
    /// proxy-overhead target applies.
    fn target(&self, scenario: &str) -> Option<f64> {
        if !self.builtin {
            return None;
        }
        match (scenario, self.rsa()) {
            ("sign16", false) => Some(8.0),
            ("sign16", true) => Some(1.8),
            ("connect16", false) => Some(1.5),
            ("list16" | "sign1", _) => Some(1.0),
            _ => None,
        }
    }

    fn backend_name(&self) -> &'static str {
        if self.builtin {
            "builtin"
        } else {
            "upstream"
        }
    }
}

/// For an RSA key (`rsa`), the data names `rsa-sha2-512` and the flags ask
/// for it (4), as OpenSSH clients do; otherwise flags 0.
fn sign_request(pub_path: &Path, rsa: bool) -> Result<Vec<u8>> {
    if rsa {
        sign_request_flags(pub_path, &[], "rsa-sha2-512", 4)
    } else {
        sign_request_with(pub_path, &[], "")
    }
}

/// Like [`sign_request`], with `in_data` (a certificate of the key, of
/// algorithm `alg`) as the key blob in the data, unless empty.
fn sign_request_with(pub_path: &Path, in_data: &[u8], alg: &str) -> Result<Vec<u8>> {
    sign_request_flags(pub_path, in_data, alg, 0)
}

/// Like [`sign_request_with`], with SIGN_REQUEST `flags`; a non-empty `alg`
/// with an empty `in_data` names the algorithm for the key itself.
fn sign_request_flags(pub_path: &Path, in_data: &[u8], alg: &str, flags: u32) -> Result<Vec<u8>> {
    fn string(out: &mut Vec<u8>, bytes: &[u8]) {
        out.extend((bytes.len() as u32).to_be_bytes());
        out.extend(bytes);
    }
    let text = std::fs::read_to_string(pub_path).map_err(|e| e.to_string())?;
    let key = ssh_key::PublicKey::from_openssh(text.trim()).map_err(|e| e.to_string())?;
    let blob = key.to_bytes().map_err(|e| e.to_string())?;
    let (data_blob, data_alg) = if in_data.is_empty() && alg.is_empty() {
        (blob.as_slice(), key.algorithm().as_str().to_owned())
    } else if in_data.is_empty() {
        (blob.as_slice(), alg.to_owned())
    } else {
        (in_data, alg.to_owned())
    };
    let mut data = Vec::new();
    string(&mut data, &[0x5a; 32]); // session id: a SHA-256 exchange hash
    data.push(50); // SSH_MSG_USERAUTH_REQUEST
    string(&mut data, b"deploy");
    string(&mut data, b"ssh-connection");
    string(&mut data, b"publickey");
    data.push(1);
    string(&mut data, data_alg.as_bytes());
    string(&mut data, data_blob);
    let mut body = vec![13u8]; // SSH_AGENTC_SIGN_REQUEST
    string(&mut body, &blob);
    string(&mut body, &data);
    body.extend(flags.to_be_bytes());
    let mut msg = (body.len() as u32).to_be_bytes().to_vec();
    msg.extend(body);
    Ok(msg)
}

fn bench() -> Result<String> {
    let settings = Settings::from_env()?;
    setup::sweep_stale();
    let load_before = loadavg();
    let mut b = Bench::start(settings.extra_groups)?;
    let rss_start = wait_rss(&b);
    eprintln!(
        "keyholder daemon pid {} ({KEYHOLDER}), ssh-agent pid {} (user {}), dir {}",
        b.daemon.pid(),
        b.agent.pid(),
        b.user_a.name,
        b.dir.0.display()
    );

    // Fail fast, before minutes of measuring, if either side cannot serve.
    let quick = Timing {
        window_ms: 200,
        warmup_ms: 0,
        slice_ms: 100,
        settle_ms: 0,
    };
    let mut quick_sides = vec![Side::Direct, Side::Proxy];
    if b.relay.is_some() {
        quick_sides.push(Side::Relay);
    }
    for (side, w) in
        quick_sides
            .iter()
            .copied()
            .zip(b.window(&quick_sides, Op::Connect, 1, 0, quick)?)
    {
        if w.r.failures > 0 || w.r.ops == 0 {
            return Err(format!(
                "{} side does not work: {:?}\n{}",
                side.name(),
                w.r.first_error,
                b.log_text()
            ));
        }
    }

    let scenarios: Vec<&Scenario> = SCENARIOS.iter().filter(|s| settings.wants(s.id)).collect();
    let mut results: BTreeMap<(usize, Side), Vec<Window>> = BTreeMap::new();
    for round in 0..settings.rounds {
        for (i, s) in scenarios.iter().enumerate() {
            let windows = b.window(&SIDES, s.op, s.conns, round, settings.timing)?;
            for (side, w) in SIDES.into_iter().zip(windows) {
                let r = &w.r;
                eprintln!(
                    "round {}/{} {:<10} {:<6} {:>9.0} ops/s  p50 {:>8.1} µs  p99 {:>8.1} µs  \
                     CPU µs/op agent {:.1} (waited {:.1}) daemon {:.1} client {:.1}  others {:.2} steal {:.2} cores  failures {}{}",
                    round + 1,
                    settings.rounds,
                    s.id,
                    side.name(),
                    r.ops_per_sec(),
                    us(r.p50_ns),
                    us(r.p99_ns),
                    w.cpu_us[0],
                    w.agent_wait_us,
                    w.cpu_us[1],
                    w.cpu_us[2],
                    w.others,
                    w.steal,
                    r.failures,
                    r.first_error
                        .as_ref()
                        .map(|e| format!(" (first: {e})"))
                        .unwrap_or_default()
                );
                results.entry((i, side)).or_default().push(w);
            }
        }
    }
    // The relay's windows: direct against the relay, on their own (its
    // idle agent connections would cost the agent a little more per poll
    // in the other sides' slices).
    let mut relayed: BTreeMap<usize, Vec<(Window, Window)>> = BTreeMap::new();
    if b.relay.is_some() {
        for round in 0..settings.rounds {
            for (i, s) in scenarios.iter().enumerate() {
                let sides = [Side::Direct, Side::Relay];
                let mut windows = b.window(&sides, s.op, s.conns, round, settings.timing)?;
                let (Some(r), Some(d)) = (windows.pop(), windows.pop()) else {
                    return Err("the relay window returned no result".into());
                };
                eprintln!(
                    "round {}/{} {:<10} relay/direct {:>6.3}  relay {:>9.0} ops/s  failures {}",
                    round + 1,
                    settings.rounds,
                    s.id,
                    r.r.ops_per_sec() / d.r.ops_per_sec(),
                    r.r.ops_per_sec(),
                    r.r.failures,
                );
                relayed.entry(i).or_default().push((d, r));
            }
        }
    }
    // A candidate build against this one, when asked for (candidate.rs).
    let candidate = match std::env::var_os("KH_BENCH_CANDIDATE") {
        Some(binary) if !scenarios.is_empty() => Some(candidate::phase(
            &mut b,
            Path::new(&binary),
            &scenarios,
            settings.rounds,
            settings.timing,
        )?),
        _ => None,
    };
    let bursts = if settings.wants("burst") {
        Some(burst_phase(&mut b, &settings)?)
    } else {
        None
    };
    let rss_after_load = read_kib(b.daemon.pid(), "VmRSS");

    let certificates = if settings.wants("certs") {
        Some(certs::phase(&mut b, settings.rounds, settings.timing)?)
    } else {
        None
    };

    let granted = if settings.wants("grants") {
        Some(grants::phase(&mut b, settings.rounds, settings.timing)?)
    } else {
        None
    };
    let token = if settings.wants("pkcs11") {
        Some(pkcs11::phase(&mut b, settings.rounds, settings.timing)?)
    } else {
        None
    };

    let hanging = if settings.wants("hung") {
        Some(hung::phase(&mut b, settings.rounds, settings.timing)?)
    } else {
        None
    };

    let openbao = if settings.wants("openbao") {
        Some(openbao::phase(settings.rounds.min(3))?)
    } else {
        None
    };

    let memory = if settings.wants("memory") {
        Some(memory_phase(&mut b, settings.idle)?)
    } else {
        None
    };
    let hwm = read_kib(b.daemon.pid(), "VmHWM");
    b.check_alive()?;
    let log = b.log_text();
    let load_after = loadavg();

    let mut out = String::new();
    out += &machine_line();
    let choice = Choice::from_env()?;
    out += &format!(
        "Backend: `{}`, key: {} (KH_BENCH_BACKEND, KH_BENCH_KEY).\n\n",
        choice.backend_name(),
        choice.key
    );
    out += &format!(
        "Run: {} round(s); in each, one window per scenario in which direct and proxy \
         alternate every {} ms (ABBA order, the first side swapped every round), {} s per side, \
         the first {} ms of each slice not counted, after a {} s warm-up; medians over rounds \
         (proxy/direct: the median of the rounds' ratios; pooled: all rounds' operations), \
         failures summed. \
         Load average (1 min) before/after: {load_before} / {load_after}. \
         The bench users are in {} groups (their own, the key's, {} more).\n\n",
        settings.rounds,
        settings.timing.slice_ms,
        settings.timing.window_ms as f64 / 1000.0,
        settings.timing.settle_ms,
        settings.timing.warmup_ms as f64 / 1000.0,
        2 + settings.extra_groups,
        settings.extra_groups,
    );
    if !scenarios.is_empty() {
        let with_relay = !relayed.is_empty();
        if with_relay {
            out += "The last column is the same measurement for a relay that only copies \
                    messages between the client and the agent (`benches/proxy/relay.rs`: no \
                    lookup, policy, audit line or pooling; one blocking thread and one agent \
                    connection per client), against the agent direct in windows of their own, \
                    interleaved the same way: the floor of any proxy on this machine.\n\n";
        }
        out += "| benchmark | direct ops/s | proxy ops/s | proxy/direct | target | \
                direct p50 / p99 (µs) | proxy p50 / p99 (µs) | failures (direct / proxy) | ratio per round |";
        out += if with_relay {
            " relay/direct (rounds' median, pooled) |\n|---|---:|---:|---:|---|---:|---:|---:|---|---|\n"
        } else {
            "\n|---|---:|---:|---:|---|---:|---:|---:|---|\n"
        };
        for (i, s) in scenarios.iter().enumerate() {
            let d: Vec<&RunResult> = results[&(i, Side::Direct)].iter().map(|w| &w.r).collect();
            let p: Vec<&RunResult> = results[&(i, Side::Proxy)].iter().map(|w| &w.r).collect();
            let (dops, pops) = (
                median(&d, |r| r.ops_per_sec()),
                median(&p, |r| r.ops_per_sec()),
            );
            let paired = Paired::of(&d, &p);
            let ratio = paired.median;
            let target = choice.target(s.id).unwrap_or(s.target);
            let relay_cell = match relayed.get(&i) {
                Some(pairs) => {
                    let rd: Vec<&RunResult> = pairs.iter().map(|(d, _)| &d.r).collect();
                    let r: Vec<&RunResult> = pairs.iter().map(|(_, r)| &r.r).collect();
                    let relay = Paired::of(&rd, &r);
                    let failed: u64 = r.iter().map(|r| r.failures).sum();
                    format!(
                        " {:.2}, {:.3}{} |",
                        relay.median,
                        relay.pooled,
                        if failed > 0 {
                            format!(" ({failed} failures)")
                        } else {
                            String::new()
                        }
                    )
                }
                None => String::new(),
            };
            out += &format!(
                "| {} | {:.0} | {:.0} | **{:.3}** | ≥ {:.2} {} | {:.1} / {:.1} | {:.1} / {:.1} | {} / {} | {} |{relay_cell}\n",
                s.label,
                dops,
                pops,
                ratio,
                target,
                if ratio >= target { "met" } else { "**MISSED**" },
                median(&d, |r| us(r.p50_ns)),
                median(&d, |r| us(r.p99_ns)),
                median(&p, |r| us(r.p50_ns)),
                median(&p, |r| us(r.p99_ns)),
                d.iter().map(|r| r.failures).sum::<u64>(),
                p.iter().map(|r| r.failures).sum::<u64>(),
                paired.per_round(),
            );
        }
        let steals: Vec<f64> = results.values().flatten().map(|w| w.steal).collect();
        let worst = steals.iter().copied().fold(0.0, f64::max);
        out += &format!(
            "\nHost steal (CPU time the hypervisor gave to other tenants), over all windows: \
             median {:.2} cores, worst {:.2}.{}\n",
            median_of(steals),
            worst,
            if worst > STEAL_WARN {
                " **The host was busy: the agent's own CPU per operation rises with steal, \
                 and ratios from such windows are noisy. Rerun on a quiet host.**"
            } else {
                ""
            }
        );
        out += "\nCPU time per operation (µs, medians over rounds; from /proc/PID/task/*/schedstat \
                and the load generator's rusage, warm-up excluded), and the agent's run-queue wait \
                per operation (time it was runnable but another task had its CPU):\n\n\
                | benchmark | side | ssh-agent | ssh-agent runnable, not running | keyholder daemon | load generator | rest of the machine (cores busy) | host steal (cores) |\n\
                |---|---|---:|---:|---:|---:|---:|---:|\n";
        for (i, s) in scenarios.iter().enumerate() {
            for side in [Side::Direct, Side::Proxy] {
                let w = &results[&(i, side)];
                let cpu = |k: usize| {
                    let mut v: Vec<f64> = w.iter().map(|w| w.cpu_us[k]).collect();
                    v.sort_by(f64::total_cmp);
                    v[v.len() / 2]
                };
                out += &format!(
                    "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} | {:.2} |\n",
                    s.id,
                    side.name(),
                    cpu(0),
                    median_of(w.iter().map(|w| w.agent_wait_us).collect()),
                    cpu(1),
                    cpu(2),
                    median_of(w.iter().map(|w| w.others).collect()),
                    median_of(w.iter().map(|w| w.steal).collect()),
                );
            }
        }
        out += "\n";
    }
    if let Some(c) = &candidate {
        out += c;
    }
    if let Some(bursts) = &bursts {
        out += bursts;
    }
    if let Some(c) = &certificates {
        out += c;
    }
    if let Some(g) = &granted {
        out += g;
    }
    if let Some(t) = &token {
        out += t;
    }
    if let Some(h) = &hanging {
        out += h;
    }
    if let Some(o) = &openbao {
        out += o;
    }
    out += "| daemon memory | VmRSS | open fds |\n|---|---:|---:|\n";
    out += &format!("| started, no client yet | {} | |\n", mib(rss_start));
    out += &format!(
        "| after the throughput runs, no connection open | {} | |\n",
        mib(rss_after_load)
    );
    if let Some(m) = &memory {
        out += &m.rows;
    }
    out += &format!("| peak over the whole run (VmHWM) | {} | |\n\n", mib(hwm));

    let granted = log.matches("decision=granted").count();
    let problems: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect();
    out += &format!(
        "Daemon log: {granted} audit lines `decision=granted`, {} warning/error lines{}\n",
        problems.len(),
        if problems.is_empty() {
            String::new()
        } else {
            format!(
                ", first: `{}`",
                problems.first().copied().unwrap_or_default()
            )
        }
    );
    Ok(out)
}

struct Memory {
    rows: String,
}

/// Holds `idle` connections (half per user), reads RSS before and after one
/// REQUEST_IDENTITIES on each, and after they close.
fn memory_phase(b: &mut Bench, idle: usize) -> Result<Memory> {
    check_interrupted()?;
    let pid = b.daemon.pid();
    let fds = || std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    let base_fds = fds();
    let per_user = [idle / 2, idle - idle / 2];
    let mut holders: Vec<Holder> = Vec::new();
    for (user, n) in [&b.user_a, &b.user_b].into_iter().zip(per_user) {
        let spec = HoldSpec {
            socket: b.proxy.clone(),
            conns: n,
        };
        let mut child = worker_command(user, "hold", &spec)?
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start the holder: {e}"))?;
        let stdout = BufReader::new(child.stdout.take().expect("piped"));
        let stdin = child.stdin.take().expect("piped");
        holders.push((
            Proc {
                name: "holder",
                child,
            },
            stdin,
            stdout,
        ));
    }
    let (opened, open_failed) = read_counts(&mut holders, "open")?;
    // Connected is not yet accepted: wait for the daemon to hold them all.
    wait_for(Duration::from_secs(10), || {
        fds() >= base_fds + opened as usize
    });
    std::thread::sleep(Duration::from_secs(1));
    let rss_idle = read_kib(pid, "VmRSS");
    let fds_idle = fds();
    for (_, stdin, _) in &mut holders {
        stdin
            .write_all(b"list\n")
            .and_then(|()| stdin.flush())
            .map_err(|e| e.to_string())?;
    }
    let (listed, list_failed) = read_counts(&mut holders, "listed")?;
    std::thread::sleep(Duration::from_secs(1));
    let rss_used = read_kib(pid, "VmRSS");
    let fds_used = fds();
    for (mut proc, stdin, _) in holders {
        drop(stdin);
        wait_for(Duration::from_secs(10), || !proc.alive());
    }
    wait_for(Duration::from_secs(10), || fds() <= base_fds);
    std::thread::sleep(Duration::from_secs(1));
    let rss_closed = read_kib(pid, "VmRSS");
    b.check_alive()?;

    let verdict = |kib: Option<u64>| match kib {
        Some(k) if (k as f64 / 1024.0) < RSS_TARGET_MIB => {
            format!("target < {RSS_TARGET_MIB} MiB met")
        }
        _ => format!("target < {RSS_TARGET_MIB} MiB **MISSED**"),
    };
    let mut rows = String::new();
    rows += &format!(
        "| {opened} idle connections ({} + {} from 2 users), no request yet ({open_failed} failed to open); {} | **{}** | {fds_idle} |\n",
        per_user[0],
        per_user[1],
        verdict(rss_idle),
        mib(rss_idle)
    );
    rows += &format!(
        "| the same after one `list` each ({listed} answered, {list_failed} failed): upstream connections open too; {} | **{}** | {fds_used} |\n",
        verdict(rss_used),
        mib(rss_used)
    );
    rows += &format!("| all closed again | {} | {} |\n", mib(rss_closed), fds());
    if open_failed > 0 || list_failed > 0 || opened as usize != idle {
        eprintln!(
            "memory phase: {open_failed} connections failed to open, {list_failed} lists failed"
        );
    }
    Ok(Memory { rows })
}

type Holder = (
    Proc,
    std::process::ChildStdin,
    BufReader<std::process::ChildStdout>,
);

/// Reads one `WHAT OK FAILED` line from each holder; returns the sums.
fn read_counts(holders: &mut [Holder], what: &str) -> Result<(u64, u64)> {
    let (mut ok, mut bad) = (0, 0);
    for (_, _, out) in holders.iter_mut() {
        let mut line = String::new();
        out.read_line(&mut line).map_err(|e| e.to_string())?;
        let mut parts = line.split_whitespace();
        if parts.next() != Some(what) {
            return Err(format!("holder said {line:?}, expected {what}"));
        }
        let mut n = || {
            parts
                .next()
                .and_then(|p| p.parse::<u64>().ok())
                .unwrap_or(0)
        };
        ok += n();
        bad += n();
    }
    Ok((ok, bad))
}

/// Waits for the daemon's RSS to settle after start.
fn wait_rss(b: &Bench) -> Option<u64> {
    std::thread::sleep(Duration::from_millis(300));
    read_kib(b.daemon.pid(), "VmRSS")
}

fn median(runs: &[&RunResult], f: impl Fn(&RunResult) -> f64) -> f64 {
    median_of(runs.iter().map(|r| f(r)).collect())
}

fn median_of(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or_else(|| "?".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0))
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

/// One line about the machine and the software measured.
fn machine_line() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let openssh = Command::new("ssh")
        .arg("-V")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_owned())
        .unwrap_or_default();
    let commit = Command::new("git")
        .args([
            "-C",
            env!("CARGO_MANIFEST_DIR"),
            "describe",
            "--always",
            "--dirty",
        ])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "?".into());
    format!(
        "Machine: {cores} cores (`nproc`), {cpu}, Linux {kernel}. {openssh}. \
         keyholder {commit}, release build.\n\n"
    )
}
