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

/// Selects the worker mode (`run` or `hold`) when set.
pub const WORKER_ENV: &str = "KH_BENCH_WORKER";
/// The worker's [`RunSpec`] or [`HoldSpec`], as JSON.
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

/// One measurement window.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunSpec {
    pub socket: PathBuf,
    pub op: Op,
    pub conns: usize,
    pub warmup_ms: u64,
    pub window_ms: u64,
    /// The framed SIGN_REQUEST to send.
    pub sign: Vec<u8>,
}

/// What one window measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunResult {
    /// Operations completed (started inside the window).
    pub ops: u64,
    pub failures: u64,
    /// The window's length.
    pub secs: f64,
    pub p50_ns: u64,
    pub p99_ns: u64,
    pub first_error: Option<String>,
    /// Operations completed, warm-up included (for CPU time per operation).
    pub all_ops: u64,
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
        "run" => {
            let spec: RunSpec = serde_json::from_str(&spec).map_err(|e| e.to_string())?;
            let result = run(&spec);
            println!(
                "{}",
                serde_json::to_string(&result).map_err(|e| e.to_string())?
            );
            Ok(())
        }
        "burst" => {
            let spec: BurstSpec = serde_json::from_str(&spec).map_err(|e| e.to_string())?;
            let result = burst(&spec);
            println!(
                "{}",
                serde_json::to_string(&result).map_err(|e| e.to_string())?
            );
            Ok(())
        }
        "hold" => {
            let spec: HoldSpec = serde_json::from_str(&spec).map_err(|e| e.to_string())?;
            hold(&spec).map_err(|e| e.to_string())
        }
        other => Err(format!("unknown worker mode {other:?}")),
    }
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

struct ThreadResult {
    all_ops: u64,
    latencies: Vec<u64>,
    failures: u64,
    first_error: Option<String>,
}

/// Runs one window: `conns` threads, each looping `op` until the window
/// ends. Operations started during the warm-up are not counted.
pub fn run(spec: &RunSpec) -> RunResult {
    let spec = Arc::new(spec.clone());
    let barrier = Arc::new(Barrier::new(spec.conns + 1));
    let window: Arc<OnceLock<(Instant, Instant)>> = Arc::new(OnceLock::new());
    let threads: Vec<_> = (0..spec.conns)
        .map(|_| {
            let (spec, barrier, window) = (spec.clone(), barrier.clone(), window.clone());
            std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || client_thread(&spec, &barrier, &window))
                .expect("spawn load thread")
        })
        .collect();
    // Everyone connected: fix the window, then let them go.
    barrier.wait();
    let start = Instant::now() + Duration::from_millis(spec.warmup_ms);
    let end = start + Duration::from_millis(spec.window_ms);
    let _ = window.set((start, end));
    barrier.wait();

    let mut latencies = Vec::new();
    let mut failures = 0;
    let mut first_error = None;
    let mut all_ops = 0;
    for t in threads {
        let r = t.join().expect("load thread panicked");
        all_ops += r.all_ops;
        latencies.extend(r.latencies);
        failures += r.failures;
        first_error = first_error.or(r.first_error);
    }
    latencies.sort_unstable();
    RunResult {
        ops: latencies.len() as u64,
        failures,
        secs: spec.window_ms as f64 / 1000.0,
        p50_ns: percentile(&latencies, 50.0),
        p99_ns: percentile(&latencies, 99.0),
        first_error,
        all_ops,
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
    window: &OnceLock<(Instant, Instant)>,
) -> ThreadResult {
    let persistent = spec.op != Op::Connect;
    let mut conn = None;
    let mut early_error = None;
    if persistent {
        match Conn::connect(&spec.socket) {
            Ok(c) => conn = Some(c),
            Err(e) => early_error = Some(format!("connect: {e}")),
        }
    }
    let mut latencies = Vec::with_capacity(1 << 16);
    let mut all_ops = 0;
    let mut failures = 0;
    let mut first_error = None;
    barrier.wait();
    barrier.wait();
    let (start, end) = *window.get().expect("window set before the second barrier");
    if let Some(e) = early_error {
        failures += 1;
        first_error = Some(e);
    }
    loop {
        let t0 = Instant::now();
        if t0 >= end {
            break;
        }
        let result = if persistent {
            persistent_op(&mut conn, spec)
        } else {
            Conn::connect(&spec.socket)
                .map_err(Failure::Io)
                .and_then(|mut c| {
                    c.list()?;
                    c.sign(&spec.sign)
                })
        };
        let t1 = Instant::now();
        match result {
            Ok(()) => {
                all_ops += 1;
                if t0 >= start {
                    latencies.push((t1 - t0).as_nanos() as u64);
                }
            }
            Err(e) => {
                if t0 >= start {
                    failures += 1;
                    first_error.get_or_insert_with(|| e.to_string());
                }
                if matches!(e, Failure::Io(_)) {
                    conn = None;
                }
                // Do not spin on a broken socket.
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
    ThreadResult {
        all_ops,
        latencies,
        failures,
        first_error,
    }
}

/// One operation on a persistent connection, (re)connecting first if needed.
fn persistent_op(conn: &mut Option<Conn>, spec: &RunSpec) -> Result<(), Failure> {
    if conn.is_none() {
        *conn = Some(Conn::connect(&spec.socket)?);
    }
    let c = conn.as_mut().expect("connected above");
    if spec.op == Op::Sign {
        c.sign(&spec.sign)
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
