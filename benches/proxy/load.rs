//! The load generator. It runs as the unprivileged bench user: the
//! orchestrator re-executes this binary under `setpriv` with
//! [`WORKER_ENV`] set. Plain std threads, one blocking `UnixStream` each,
//! reusable buffers, so the client costs as little as possible and exactly
//! the same on both sides.

use std::io::{self, BufRead, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier, OnceLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Selects the worker mode (`run`, `burst`, `hold`, `poke` or `relay`) when set.
pub const WORKER_ENV: &str = "KH_BENCH_WORKER";
/// The worker's [`RunSpec`], [`BurstSpec`], [`HoldSpec`] or [`PokeSpec`], as JSON.
pub const SPEC_ENV: &str = "KH_BENCH_SPEC";

/// SSH_AGENTC_REQUEST_IDENTITIES, framed.
const LIST: [u8; 5] = [0, 0, 0, 1, 11];
const IDENTITIES_ANSWER: u8 = 12;
const SIGN_RESPONSE: u8 = 14;
/// OpenSSH's message size limit.
const MAX_MESSAGE: usize = 256 * 1024;

/// What one operation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// SIGN_REQUEST on a persistent connection.
    Sign,
    /// REQUEST_IDENTITIES on a persistent connection.
    List,
    /// Connect, list, sign, close: what `ssh` does.
    Connect,
}

/// One side of an interleaved window: where to connect, what to sign.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SideSpec {
    pub socket: PathBuf,
    /// The framed SIGN_REQUEST to send.
    pub sign: Vec<u8>,
}

/// One measurement window: both sides, interleaved in short slices.
///
/// The host this runs on speeds up and slows down by 15 % and more within a
/// second (the agent's own CPU time per signature moves with it), so two
/// windows of seconds run one after the other do not see the same machine.
/// Here the sides alternate every `slice_ms` in an ABBA pattern (A B B A A
/// B …), so both sides sample the same moments of the host. In each slice
/// the first `settle_ms` are not counted: operations of the other side
/// still in the agent's queue are done by then.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunSpec {
    pub sides: Vec<SideSpec>,
    pub op: Op,
    pub conns: usize,
    /// Alternating, not counted.
    pub warmup_ms: u64,
    /// Time per side, settle periods included.
    pub window_ms: u64,
    pub slice_ms: u64,
    pub settle_ms: u64,
    /// The side the ABBA pattern starts with.
    pub first: usize,
    /// Processes whose CPU time is read at every slice boundary and
    /// charged to the side whose slice it was (the agent, the daemon).
    pub pids: Vec<u32>,
}

/// What one side of a window measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunResult {
    /// Operations started in counted time.
    pub ops: u64,
    pub failures: u64,
    /// Counted time (slices less their settle periods).
    pub secs: f64,
    pub p50_ns: u64,
    pub p99_ns: u64,
    pub first_error: Option<String>,
    /// Operations started in this side's slices, settle periods included
    /// (for CPU time per operation).
    pub all_ops: u64,
    /// CPU time of each of [`RunSpec::pids`] during this side's slices, µs.
    pub cpu_us: Vec<f64>,
    /// Run-queue wait of each of [`RunSpec::pids`] during this side's
    /// slices, µs: runnable, not running.
    pub wait_us: Vec<f64>,
    /// The load generator's own CPU time during this side's slices, µs.
    pub client_cpu_us: f64,
}

impl RunResult {
    pub fn ops_per_sec(&self) -> f64 {
        self.ops as f64 / self.secs
    }
}

/// Idle connections held open for the memory measurement.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HoldSpec {
    pub socket: PathBuf,
    pub conns: usize,
}

/// Connections of a caller whose lookups hang: each sends
/// REQUEST_IDENTITIES, waits for the answer, pauses `every_ms`, again,
/// until the orchestrator closes the worker's stdin; then it reports a
/// [`PokeResult`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PokeSpec {
    pub socket: PathBuf,
    pub conns: usize,
    pub every_ms: u64,
}

/// What the poking connections got.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PokeResult {
    pub requests: u64,
    /// Answered SSH_AGENT_FAILURE (what a caller with no groups gets).
    pub refused: u64,
    /// Answered anything else (a listing: the hang was not real).
    pub served: u64,
    /// Connections that broke (reconnected).
    pub broken: u64,
}

/// A burst: `clients` connections opened at once, each listing then
/// signing, then closing (a deploy tool starting hundreds of ssh at once).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BurstSpec {
    pub socket: PathBuf,
    pub clients: usize,
    /// The framed SIGN_REQUEST to send.
    pub sign: Vec<u8>,
}

/// What one burst measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BurstResult {
    /// Clients that got their list and their signature.
    pub served: u64,
    pub failures: u64,
    /// From the moment all were let go until the last one was done.
    pub total_ms: f64,
    /// Per client, from its connect to its signature.
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub first_error: Option<String>,
}

/// Worker entry point; `mode` is the value of [`WORKER_ENV`].
pub fn worker_main(mode: &str) -> Result<(), String> {
    let spec = std::env::var(SPEC_ENV).map_err(|_| format!("{SPEC_ENV} not set"))?;
    match mode {
        "run" => answer(&spec, |s: RunSpec| run(&s)),
        "burst" => answer(&spec, |s: BurstSpec| burst(&s)),
        "poke" => answer(&spec, |s: PokeSpec| poke(&s)),
        "relay" => crate::relay::serve(&parse(&spec)?).map_err(|e| e.to_string()),
        "hold" => hold(&parse(&spec)?).map_err(|e| e.to_string()),
        other => Err(format!("unknown worker mode {other:?}")),
    }
}

fn parse<S: serde::de::DeserializeOwned>(spec: &str) -> Result<S, String> {
    serde_json::from_str(spec).map_err(|e| e.to_string())
}

/// Runs `work` on the parsed `spec` and prints its result, one JSON line
/// (what the orchestrator reads).
fn answer<S: serde::de::DeserializeOwned, R: Serialize>(
    spec: &str,
    work: impl FnOnce(S) -> R,
) -> Result<(), String> {
    let result = work(parse(spec)?);
    println!(
        "{}",
        serde_json::to_string(&result).map_err(|e| e.to_string())?
    );
    Ok(())
}

/// Why an operation failed.
enum Failure {
    /// The connection broke: reconnect.
    Io(io::Error),
    /// A well-framed answer of the wrong kind (FAILURE): the connection is fine.
    Answer(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Io(e) => write!(f, "I/O: {e}"),
            Self::Answer(e) => f.write_str(e),
        }
    }
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

/// A client connection with a reusable input buffer.
pub struct Conn {
    stream: UnixStream,
    buf: Vec<u8>,
}

impl Conn {
    pub fn connect(socket: &Path) -> io::Result<Self> {
        let stream = UnixStream::connect(socket)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(Self {
            stream,
            buf: vec![0; 4096],
        })
    }

    /// Sends one framed request, returns the answer's body (type byte first).
    fn call(&mut self, request: &[u8]) -> io::Result<&[u8]> {
        self.stream.write_all(request)?;
        let mut filled = 0;
        loop {
            let n = self.stream.read(&mut self.buf[filled..])?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            filled += n;
            if filled < 4 {
                continue;
            }
            let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]);
            let total = 4 + len as usize;
            if len == 0 || total > 4 + MAX_MESSAGE {
                return Err(io::Error::other(format!("bad answer length {len}")));
            }
            if self.buf.len() < total {
                self.buf.resize(total, 0);
            }
            if filled == total {
                return Ok(&self.buf[4..total]);
            }
            if filled > total {
                return Err(io::Error::other("answer followed by unexpected bytes"));
            }
        }
    }

    /// REQUEST_IDENTITIES; at least one key must be listed.
    fn list(&mut self) -> Result<(), Failure> {
        let answer = self.call(&LIST)?;
        match answer {
            [IDENTITIES_ANSWER, a, b, c, d, ..] if u32::from_be_bytes([*a, *b, *c, *d]) > 0 => {
                Ok(())
            }
            [IDENTITIES_ANSWER, ..] => Err(Failure::Answer("no identity listed".into())),
            [t, ..] => Err(Failure::Answer(format!("list answered type {t}"))),
            [] => Err(Failure::Answer("empty answer".into())),
        }
    }

    /// SIGN_REQUEST; the answer must be a SIGN_RESPONSE.
    fn sign(&mut self, request: &[u8]) -> Result<(), Failure> {
        match self.call(request)? {
            [SIGN_RESPONSE, _, ..] => Ok(()),
            [t, ..] => Err(Failure::Answer(format!("sign answered type {t}"))),
            [] => Err(Failure::Answer("empty answer".into())),
        }
    }
}

/// The slices of a window, on one clock.
struct Schedule {
    /// When the warm-up ends and the first counted slice begins.
    start: Instant,
    slice: Duration,
    settle: Duration,
    /// The side of each counted slice.
    sides: Vec<usize>,
    /// Sides alternate every `warmup_slice` during the warm-up.
    warmup_begin: Instant,
    warmup_slice: Duration,
    /// How many sides alternate.
    nsides: usize,
}

/// Where an instant falls.
enum At {
    Warmup(usize),
    /// Side, counted (past the settle period)?
    Slice(usize, bool),
    Done,
}

impl Schedule {
    fn at(&self, t: Instant) -> At {
        if t < self.start {
            let k = (t.saturating_duration_since(self.warmup_begin).as_nanos()
                / self.warmup_slice.as_nanos().max(1)) as usize;
            return At::Warmup(k % self.nsides.max(1));
        }
        let since = t - self.start;
        let k = (since.as_nanos() / self.slice.as_nanos().max(1)) as usize;
        match self.sides.get(k) {
            Some(&side) => {
                let into = since - self.slice * k as u32;
                At::Slice(side, into >= self.settle)
            }
            None => At::Done,
        }
    }

    fn end(&self) -> Instant {
        self.start + self.slice * self.sides.len() as u32
    }
}

/// The ABBA order of `n` slices per side, starting with `first`: the sides
/// in turn from `first`, then the same backwards, and so on (A B B A A B …
/// for two, A B C C B A A B C … for three; with one, every slice is side 0).
fn abba(sides: usize, n: usize, first: usize) -> Vec<usize> {
    let sides = sides.max(1);
    let order: Vec<usize> = (0..sides).map(|i| (first + i) % sides).collect();
    (0..n)
        .flat_map(|k| {
            let mut block = order.clone();
            if k % 2 == 1 {
                block.reverse();
            }
            block
        })
        .collect()
}

#[derive(Default)]
struct SideTally {
    all_ops: u64,
    latencies: Vec<u64>,
    failures: u64,
    first_error: Option<String>,
}

/// Runs one interleaved window: `conns` threads, each looping `op` on the
/// side whose slice it is, until the last slice ends.
pub fn run(spec: &RunSpec) -> Vec<RunResult> {
    let spec = Arc::new(spec.clone());
    let nsides = spec.sides.len();
    let slice_ms = spec.slice_ms.clamp(1, spec.window_ms.max(1));
    let per_side = (spec.window_ms / slice_ms).max(1) as usize;
    let settle_ms = spec.settle_ms.min(slice_ms / 2);
    let barrier = Arc::new(Barrier::new(spec.conns + 1));
    let schedule: Arc<OnceLock<Schedule>> = Arc::new(OnceLock::new());
    let threads: Vec<_> = (0..spec.conns)
        .map(|_| {
            let (spec, barrier, schedule) = (spec.clone(), barrier.clone(), schedule.clone());
            std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || client_thread(&spec, &barrier, &schedule))
                .expect("spawn load thread")
        })
        .collect();
    // Everyone connected: fix the schedule, then let them go.
    barrier.wait();
    let warmup_begin = Instant::now();
    let sched = Schedule {
        start: warmup_begin + Duration::from_millis(spec.warmup_ms),
        slice: Duration::from_millis(slice_ms),
        settle: Duration::from_millis(settle_ms),
        sides: abba(nsides, per_side, spec.first),
        warmup_begin,
        warmup_slice: Duration::from_millis((spec.warmup_ms / 2).max(1)),
        nsides,
    };
    let boundaries: Vec<(Instant, usize)> = (0..sched.sides.len())
        .map(|k| (sched.start + sched.slice * (k as u32 + 1), sched.sides[k]))
        .collect();
    let start = sched.start;
    let _ = schedule.set(sched);
    barrier.wait();

    // CPU time and run-queue wait at every slice boundary, charged to the
    // slice's side.
    let mut cpu = vec![vec![0.0; spec.pids.len()]; nsides];
    let mut wait = vec![vec![0.0; spec.pids.len()]; nsides];
    let mut client_cpu = vec![0.0; nsides];
    let sample = || -> (Vec<(f64, f64)>, f64) {
        (
            spec.pids
                .iter()
                .map(|&p| crate::setup::sched_us(p).unwrap_or((0.0, 0.0)))
                .collect(),
            crate::setup::self_cpu_us(),
        )
    };
    sleep_until(start);
    let mut last = sample();
    for (end, side) in boundaries {
        sleep_until(end);
        let now = sample();
        for (i, (a, b)) in now.0.iter().zip(&last.0).enumerate() {
            cpu[side][i] += a.0 - b.0;
            wait[side][i] += a.1 - b.1;
        }
        client_cpu[side] += now.1 - last.1;
        last = now;
    }

    let mut tallies: Vec<SideTally> = (0..nsides).map(|_| SideTally::default()).collect();
    for t in threads {
        let r = t.join().expect("load thread panicked");
        for (total, mine) in tallies.iter_mut().zip(r) {
            total.all_ops += mine.all_ops;
            total.latencies.extend(mine.latencies);
            total.failures += mine.failures;
            total.first_error = total.first_error.take().or(mine.first_error);
        }
    }
    let counted = (slice_ms - settle_ms) as f64 / 1000.0 * per_side as f64;
    tallies
        .into_iter()
        .zip(cpu.into_iter().zip(wait).zip(client_cpu))
        .map(|(mut t, ((cpu_us, wait_us), client_cpu_us))| {
            t.latencies.sort_unstable();
            RunResult {
                ops: t.latencies.len() as u64,
                failures: t.failures,
                secs: counted,
                p50_ns: percentile(&t.latencies, 50.0),
                p99_ns: percentile(&t.latencies, 99.0),
                first_error: t.first_error,
                all_ops: t.all_ops,
                cpu_us,
                wait_us,
                client_cpu_us,
            }
        })
        .collect()
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}

/// Nearest-rank percentile of sorted values (0 when empty).
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn client_thread(
    spec: &RunSpec,
    barrier: &Barrier,
    schedule: &OnceLock<Schedule>,
) -> Vec<SideTally> {
    let persistent = spec.op != Op::Connect;
    let mut tallies: Vec<SideTally> = spec
        .sides
        .iter()
        .map(|_| SideTally {
            latencies: Vec::with_capacity(1 << 15),
            ..SideTally::default()
        })
        .collect();
    let mut conns: Vec<Option<Conn>> = spec.sides.iter().map(|_| None).collect();
    let mut early_errors: Vec<Option<String>> = spec.sides.iter().map(|_| None).collect();
    if persistent {
        for (i, side) in spec.sides.iter().enumerate() {
            match Conn::connect(&side.socket) {
                Ok(c) => conns[i] = Some(c),
                Err(e) => early_errors[i] = Some(format!("connect: {e}")),
            }
        }
    }
    barrier.wait();
    barrier.wait();
    let schedule = schedule
        .get()
        .expect("schedule set before the second barrier");
    for (t, e) in tallies.iter_mut().zip(early_errors) {
        if let Some(e) = e {
            t.failures += 1;
            t.first_error = Some(e);
        }
    }
    let end = schedule.end();
    loop {
        let t0 = Instant::now();
        if t0 >= end {
            break;
        }
        let (side, warm, counted) = match schedule.at(t0) {
            At::Warmup(side) => (side, true, false),
            At::Slice(side, counted) => (side, false, counted),
            At::Done => break,
        };
        let s = &spec.sides[side];
        let result = if persistent {
            persistent_op(&mut conns[side], s, spec.op)
        } else {
            Conn::connect(&s.socket)
                .map_err(Failure::Io)
                .and_then(|mut c| {
                    c.list()?;
                    c.sign(&s.sign)
                })
        };
        let t1 = Instant::now();
        let tally = &mut tallies[side];
        match result {
            Ok(()) => {
                if !warm {
                    tally.all_ops += 1;
                }
                if counted {
                    tally.latencies.push((t1 - t0).as_nanos() as u64);
                }
            }
            Err(e) => {
                if !warm {
                    tally.failures += 1;
                    tally.first_error.get_or_insert_with(|| e.to_string());
                }
                if matches!(e, Failure::Io(_)) {
                    conns[side] = None;
                }
                // Do not spin on a broken socket.
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
    tallies
}

/// One operation on a persistent connection, (re)connecting first if needed.
fn persistent_op(conn: &mut Option<Conn>, side: &SideSpec, op: Op) -> Result<(), Failure> {
    if conn.is_none() {
        *conn = Some(Conn::connect(&side.socket)?);
    }
    let c = conn.as_mut().expect("connected above");
    if op == Op::Sign {
        c.sign(&side.sign)
    } else {
        c.list()
    }
}

/// Runs one burst: every client thread is started and waiting first, then
/// all are let go at once; each connects, lists, signs and closes.
pub fn burst(spec: &BurstSpec) -> BurstResult {
    let spec = Arc::new(spec.clone());
    let barrier = Arc::new(Barrier::new(spec.clients + 1));
    let threads: Vec<_> = (0..spec.clients)
        .map(|_| {
            let (spec, barrier) = (spec.clone(), barrier.clone());
            std::thread::Builder::new()
                .stack_size(128 * 1024)
                .spawn(move || {
                    barrier.wait();
                    let t0 = Instant::now();
                    let result =
                        Conn::connect(&spec.socket)
                            .map_err(Failure::Io)
                            .and_then(|mut c| {
                                c.list()?;
                                c.sign(&spec.sign)
                            });
                    (result.map_err(|e| e.to_string()), t0.elapsed())
                })
                .expect("spawn burst thread")
        })
        .collect();
    barrier.wait();
    let started = Instant::now();
    let mut times = Vec::with_capacity(spec.clients);
    let (mut failures, mut first_error) = (0, None);
    for t in threads {
        let (result, took) = t.join().expect("burst thread panicked");
        match result {
            Ok(()) => times.push(took.as_nanos() as u64),
            Err(e) => {
                failures += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    let total_ms = started.elapsed().as_secs_f64() * 1000.0;
    times.sort_unstable();
    BurstResult {
        served: times.len() as u64,
        failures,
        total_ms,
        p50_ms: percentile(&times, 50.0) as f64 / 1e6,
        p99_ms: percentile(&times, 99.0) as f64 / 1e6,
        first_error,
    }
}

/// Opens `conns` connections and reports `open OK FAILED`; on a stdin line
/// `list`, sends one REQUEST_IDENTITIES on each and reports
/// `listed OK FAILED`; exits (closing them all) at end of input.
fn hold(spec: &HoldSpec) -> io::Result<()> {
    let mut conns = Vec::with_capacity(spec.conns);
    let mut failed = 0;
    for _ in 0..spec.conns {
        match Conn::connect(&spec.socket) {
            Ok(c) => conns.push(c),
            Err(_) => failed += 1,
        }
    }
    let mut out = io::stdout().lock();
    writeln!(out, "open {} {failed}", conns.len())?;
    out.flush()?;
    for line in io::stdin().lock().lines() {
        if line?.trim() == "list" {
            let (mut ok, mut bad) = (0, 0);
            for c in &mut conns {
                match c.list() {
                    Ok(()) => ok += 1,
                    Err(_) => bad += 1,
                }
            }
            writeln!(out, "listed {ok} {bad}")?;
            out.flush()?;
        }
    }
    Ok(())
}

/// Runs [`PokeSpec`]'s connections until stdin ends.
fn poke(spec: &PokeSpec) -> PokeResult {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let threads: Vec<_> = (0..spec.conns)
        .map(|_| {
            let (spec, stop) = (spec.clone(), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut tally = PokeResult::default();
                let mut conn = None;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let c = match conn.take() {
                        Some(c) => c,
                        None => match Conn::connect(&spec.socket) {
                            Ok(c) => c,
                            Err(_) => {
                                tally.broken += 1;
                                std::thread::sleep(Duration::from_millis(spec.every_ms));
                                continue;
                            }
                        },
                    };
                    let mut c = c;
                    tally.requests += 1;
                    match c.call(&LIST) {
                        Ok([5]) => tally.refused += 1,
                        Ok(_) => tally.served += 1,
                        Err(_) => {
                            tally.broken += 1;
                            std::thread::sleep(Duration::from_millis(spec.every_ms));
                            continue;
                        }
                    }
                    conn = Some(c);
                    std::thread::sleep(Duration::from_millis(spec.every_ms));
                }
                tally
            })
        })
        .collect();
    let mut sink = String::new();
    let _ = io::stdin().read_to_string(&mut sink);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = PokeResult::default();
    for t in threads {
        if let Ok(t) = t.join() {
            total.requests += t.requests;
            total.refused += t.refused;
            total.served += t.served;
            total.broken += t.broken;
        }
    }
    total
}
