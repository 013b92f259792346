//! Supervision of the upstream OpenSSH `ssh-agent` (`agent.spawn = true`).
//!
//! The agent runs as `ssh-agent -D -a SOCKET` (foreground, socket created
//! 0600 by ssh-agent itself). When it dies its keys are gone: the event is
//! logged as an error, the agent is restarted (with backoff if it keeps
//! dying) and `keyholder status` reports the keys unarmed until someone runs
//! `keyholder arm`. On shutdown the agent gets SIGTERM (SIGKILL after 5 s)
//! and its socket is removed. The child also gets SIGTERM should the daemon
//! itself die (`PR_SET_PDEATHSIG`), so no orphaned agent keeps keys in memory.
//! The agent's stderr is read line by line into the daemon's log, through
//! the rate limit ([`crate::ratelog`]): a client that makes the agent
//! complain on every request cannot flood the log through it.

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;

use crate::config::AgentConfig;
use crate::counter::Counter;
use crate::error::{Error, Result};
use crate::ratelog::{Kind, RateLog, Who};

/// Lines of the agent's stderr.
pub static AGENT_STDERR: Kind = Kind {
    name: "upstream agent stderr",
    burst: 10,
    level: tracing::Level::WARN,
};
/// Longer stderr lines are cut here.
const MAX_STDERR_LINE: usize = 1024;

/// How long a freshly started agent has to create its socket.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the agent has to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Restart backoff bounds.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// An agent that ran at least this long resets the backoff.
const STABLE_AFTER: Duration = Duration::from_secs(30);

/// A running, supervised upstream agent.
#[derive(Debug)]
pub struct Supervisor {
    config: AgentConfig,
    child: Child,
    started: Instant,
    log: Arc<RateLog>,
    restarts: Counter,
}

impl Supervisor {
    /// Starts the agent and waits until its socket accepts connections;
    /// its stderr goes to the log through `log`.
    pub async fn start(config: AgentConfig, log: Arc<RateLog>) -> Result<Self> {
        let child = spawn_agent(&config, &log).await?;
        Ok(Self {
            config,
            child,
            started: Instant::now(),
            log,
            restarts: Counter::default(),
        })
    }

    /// Counts each restart of the agent in `restarts`.
    pub fn count_restarts(mut self, restarts: Counter) -> Self {
        self.restarts = restarts;
        self
    }

    /// The agent's pid.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Watches the agent until `shutdown` turns true, restarting it whenever
    /// it exits; then stops it and removes its socket.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = MIN_BACKOFF;
        loop {
            tokio::select! {
                status = self.child.wait() => {
                    let status = status.map_or_else(|e| e.to_string(), |s| s.to_string());
                    tracing::error!(
                        "upstream agent exited ({status}); its keys are gone until `keyholder arm` \
                         is run again; restarting it"
                    );
                }
                () = crate::shutdown::stopped(&mut shutdown) => {
                    self.stop().await;
                    return;
                }
            }
            if self.started.elapsed() >= STABLE_AFTER {
                backoff = MIN_BACKOFF;
            }
            loop {
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = crate::shutdown::stopped(&mut shutdown) => {
                        crate::sockets::remove(&self.config.socket);
                        return;
                    }
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                match spawn_agent(&self.config, &self.log).await {
                    Ok(child) => {
                        self.child = child;
                        self.started = Instant::now();
                        self.restarts.add_one();
                        tracing::warn!(
                            "upstream agent restarted (pid {}) on {}; it holds no keys: run `keyholder arm`",
                            self.child.id().unwrap_or(0),
                            self.config.socket.display()
                        );
                        break;
                    }
                    Err(e) => tracing::error!("{e}; retrying in {} ms", backoff.as_millis()),
                }
            }
        }
    }

    async fn stop(&mut self) {
        if let Some(pid) = self.child.id().and_then(|p| i32::try_from(p).ok()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            if tokio::time::timeout(STOP_TIMEOUT, self.child.wait())
                .await
                .is_err()
            {
                let _ = self.child.kill().await;
            }
        }
        crate::sockets::remove(&self.config.socket);
        tracing::info!("upstream agent stopped");
    }
}

/// Clears a stale socket (never a live one), starts the agent and waits for its socket.
async fn spawn_agent(config: &AgentConfig, log: &Arc<RateLog>) -> Result<Child> {
    let socket = &config.socket;
    // Only a socket nothing answers on is removed: a live agent there (a
    // running daemon's) is never replaced.
    crate::sockets::remove_stale(socket, "agent.socket")?;
    let mut command = Command::new(&config.program);
    command
        .arg("-D")
        .arg("-a")
        .arg(socket)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // SAFETY: the closure runs in the forked child before exec and only makes
    // the prctl(2) system call, which is async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).map_err(std::io::Error::from)
        });
    }
    let mut child = command.spawn().map_err(|e| {
        Error::msg(format!(
            "cannot start upstream agent {}: {e} (set agent.program, or agent.spawn = false)",
            config.program.display()
        ))
    })?;
    // Read from the start: an agent blocked on a full pipe would never
    // create its socket.
    if let Some(stderr) = child.stderr.take() {
        tokio::spawn(relay_stderr(stderr, Arc::clone(log)));
    }
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if tokio::net::UnixStream::connect(socket).await.is_ok() {
            return Ok(child);
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(Error::msg(format!(
                "upstream agent {} exited at start ({status})",
                config.program.display()
            )));
        }
        if Instant::now() >= deadline {
            let _ = child.kill().await;
            return Err(Error::msg(format!(
                "upstream agent {} did not create {} within {} s",
                config.program.display(),
                socket.display(),
                READY_TIMEOUT.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Writes the agent's stderr lines to the log (rate-limited, escaped so
/// that a line can never pose as two, cut at [`MAX_STDERR_LINE`]) until the
/// agent closes it. Keeps reading when lines are suppressed, so the agent
/// never blocks on its stderr.
async fn relay_stderr(stderr: impl AsyncRead + Unpin, log: Arc<RateLog>) {
    let mut reader = BufReader::new(stderr);
    let mut line = Vec::new();
    loop {
        line.clear();
        match read_line_capped(&mut reader, &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        while line.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            line.pop();
        }
        if line.is_empty() || !log.allow(&AGENT_STDERR, Who::Unattributed) {
            continue;
        }
        let mut text = String::with_capacity(line.len());
        for c in String::from_utf8_lossy(&line).chars() {
            if c.is_control() {
                text.extend(c.escape_default());
            } else {
                text.push(c);
            }
        }
        tracing::warn!("upstream agent: {text}");
    }
}

/// Reads up to a newline into `line`, keeping at most [`MAX_STDERR_LINE`]
/// bytes of it (the rest of a longer line is read and dropped). Returns the
/// bytes consumed, 0 at end of input.
async fn read_line_capped<R: AsyncBufReadExt + Unpin>(
    reader: &mut R,
    line: &mut Vec<u8>,
) -> std::io::Result<usize> {
    let mut consumed = 0;
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(consumed);
        }
        let (chunk, done) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (available.get(..=i).unwrap_or(available), true),
            None => (available, false),
        };
        let room = MAX_STDERR_LINE.saturating_sub(line.len());
        line.extend_from_slice(chunk.get(..room.min(chunk.len())).unwrap_or_default());
        let n = chunk.len();
        reader.consume(n);
        consumed += n;
        if done {
            return Ok(consumed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stderr_lines_are_split_and_capped() {
        let long = vec![b'x'; 5000];
        let input = [b"one\n".as_slice(), &long, b"\ntwo"].concat();
        let mut r = BufReader::with_capacity(64, input.as_slice());
        let mut lines = Vec::new();
        loop {
            let mut line = Vec::new();
            if read_line_capped(&mut r, &mut line).await.unwrap() == 0 {
                break;
            }
            lines.push(line);
        }
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0], b"one\n");
        assert_eq!(lines[1].len(), MAX_STDERR_LINE);
        assert_eq!(lines[2], b"two");
    }
}
