//! The `notify` hook: a root-owned program run on every grant event, as
//! root, with no shell, a deadline and a bound on how many run at once.
//!
//! Nothing ever waits for it: [`Notifier::fire`] spawns a task and returns.
//! A hook that is missing, fails or misses its deadline is one log line
//! (rate-limited), and what it prints is logged rate-limited too. When
//! [`MAX_QUEUED`] events already wait for a slot, the event is not hooked
//! (one log line, rate-limited): a flood of events never piles up
//! processes.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::sync::Semaphore;

use crate::ratelog::{Kind, RateLog, Who};

/// How long a hook may run.
pub const DEADLINE: Duration = Duration::from_secs(5);
/// Hooks running at once.
pub const MAX_RUNNING: usize = 4;
/// Events waiting for a slot, beyond which an event is not hooked.
pub const MAX_QUEUED: usize = 64;
/// Output kept from one run (the rest is read and dropped).
const MAX_OUTPUT: usize = 2048;

/// A hook that failed, timed out, could not be started or was dropped.
pub static NOTIFY_FAILED: Kind = Kind {
    name: "grant notify hooks failed",
    burst: 5,
    level: tracing::Level::WARN,
};

/// What hooks print.
pub static NOTIFY_OUTPUT: Kind = Kind {
    name: "grant notify hook output lines",
    burst: 10,
    level: tracing::Level::INFO,
};

/// The environment of one run: `KEYHOLDER_GRANT_*` names and values.
pub type Env = Vec<(&'static str, String)>;

/// Runs hooks.
#[derive(Debug)]
pub struct Notifier {
    slots: Arc<Semaphore>,
    waiting: Arc<AtomicUsize>,
    log: Arc<RateLog>,
}

impl Notifier {
    /// A notifier logging through `log`.
    pub fn new(log: Arc<RateLog>) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(MAX_RUNNING)),
            waiting: Arc::new(AtomicUsize::new(0)),
            log,
        }
    }

    /// Runs `program` with `env` in the background (never waited on).
    pub fn fire(&self, program: PathBuf, env: Env) {
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= MAX_QUEUED {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            if self.log.allow(&NOTIFY_FAILED, Who::Unattributed) {
                tracing::warn!(
                    "grant notify {}: {MAX_QUEUED} events already wait for a slot; not run for \
                     this one",
                    program.display()
                );
            }
            return;
        }
        let slots = Arc::clone(&self.slots);
        let waiting = Arc::clone(&self.waiting);
        let log = Arc::clone(&self.log);
        tokio::spawn(async move {
            let permit = slots.acquire_owned().await;
            waiting.fetch_sub(1, Ordering::AcqRel);
            let Ok(_permit) = permit else {
                return;
            };
            let outcome = run(&program, &env, &log).await;
            if let Err(why) = outcome {
                if log.allow(&NOTIFY_FAILED, Who::Unattributed) {
                    tracing::warn!("grant notify {}: {why}", program.display());
                }
            }
        });
    }
}

async fn run(program: &std::path::Path, env: &Env, log: &RateLog) -> Result<(), String> {
    // Checked again at each run: the file may have changed since the
    // configuration was loaded.
    super::check_program(program).map_err(|e| format!("not run: {e}"))?;
    let mut cmd = tokio::process::Command::new(program);
    cmd.env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|e| format!("cannot run it: {e}"))?;
    let mut out = child.stdout.take();
    let mut err = child.stderr.take();
    let work = async {
        let (o, e) = tokio::join!(capture(out.as_mut()), capture(err.as_mut()));
        let status = child.wait().await;
        (o, e, status)
    };
    match tokio::time::timeout(DEADLINE, work).await {
        Ok((o, e, status)) => {
            for line in o.lines().chain(e.lines()).filter(|l| !l.trim().is_empty()) {
                if log.allow(&NOTIFY_OUTPUT, Who::Unattributed) {
                    tracing::info!(
                        "grant notify {}: {}",
                        program.display(),
                        line.escape_debug()
                    );
                }
            }
            match status {
                Ok(s) if s.success() => Ok(()),
                Ok(s) => Err(format!("exited with {s}")),
                Err(e) => Err(format!("cannot wait for it: {e}")),
            }
        }
        // Dropping the child kills it (kill_on_drop).
        Err(_) => Err(format!(
            "still running after {} s; killed",
            DEADLINE.as_secs()
        )),
    }
}

/// Reads a pipe to its end, keeping the first [`MAX_OUTPUT`] bytes.
async fn capture<R: tokio::io::AsyncRead + Unpin>(pipe: Option<&mut R>) -> String {
    let Some(pipe) = pipe else {
        return String::new();
    };
    let mut kept = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = MAX_OUTPUT.saturating_sub(kept.len());
                kept.extend_from_slice(buf.get(..n.min(room)).unwrap_or(&[]));
            }
        }
    }
    String::from_utf8_lossy(&kept).into_owned()
}
