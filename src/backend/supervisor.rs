//! Supervision of the upstream OpenSSH `ssh-agent` (`agent.spawn = true`).
//!
//! The agent runs as `ssh-agent -D -a SOCKET` (foreground, socket created
//! 0600 by ssh-agent itself). When it dies its keys are gone: the event is
//! logged as an error, the agent is restarted (with backoff if it keeps
//! dying) and `keyholder status` reports the keys unarmed until someone runs
//! `keyholder arm`. On shutdown the agent gets SIGTERM (SIGKILL after 5 s)
//! and its socket is removed. The child also gets SIGTERM should the daemon
//! itself die (`PR_SET_PDEATHSIG`), so no orphaned agent keeps keys in memory.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::sync::watch;

use crate::config::AgentConfig;
use crate::counter::Counter;
use crate::error::{Error, Result};

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
    restarts: Counter,
}

impl Supervisor {
    /// Starts the agent and waits until its socket accepts connections.
    pub async fn start(config: AgentConfig) -> Result<Self> {
        let child = spawn_agent(&config).await?;
        Ok(Self {
            config,
            child,
            started: Instant::now(),
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
                        remove_socket(&self.config.socket);
                        return;
                    }
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                match spawn_agent(&self.config).await {
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
        remove_socket(&self.config.socket);
        tracing::info!("upstream agent stopped");
    }
}

/// Removes a socket file on the way out, if nothing answers on it any more
/// (never another kind of file, never a socket someone else now listens on).
pub(crate) fn remove_socket(path: &Path) {
    if let Err(e) = crate::sockets::remove_stale(path, "socket") {
        tracing::warn!("left in place: {e}");
    }
}

/// Clears a stale socket (never a live one), starts the agent and waits for its socket.
async fn spawn_agent(config: &AgentConfig) -> Result<Child> {
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
        .stderr(Stdio::inherit())
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
