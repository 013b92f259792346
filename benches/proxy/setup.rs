//! The bench's environment: a temporary directory, throwaway users and a
//! group, and child processes, each removed by its guard's `Drop` (also when
//! the bench fails or is interrupted). Every child is started with a
//! parent-death signal, so a bench killed with SIGKILL leaves no daemon or
//! load generator behind; ssh-agent drops that signal (it resets its
//! credentials), so the next run ends it, and removes the users and
//! directories such a run left ([`sweep_stale`]).

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

pub use crate::process::{read_kib, run_ok as run, wait_for, Proc, TempDir};

/// Prefix of everything the bench creates: users, groups, directories.
/// (`kht-` is the test suite's prefix for throwaway users.)
pub const PREFIX: &str = "kht-bench";

pub type Result<T> = std::result::Result<T, String>;

/// Waits until something listens on `socket`.
pub fn wait_socket(socket: &Path) -> bool {
    wait_for(Duration::from_secs(15), || {
        UnixStream::connect(socket).is_ok()
    })
}

/// A throwaway user (with its own primary group) or group, deleted on drop.
pub struct Account {
    pub name: String,
    group: bool,
}

impl Account {
    /// A group named `name`.
    pub fn group(name: &str) -> Result<Self> {
        run(Command::new("groupadd").arg(name))?;
        Ok(Self {
            name: name.to_owned(),
            group: true,
        })
    }

    /// A user named `name` (primary group of the same name, no home, no
    /// password), member of `groups`.
    pub fn user(name: &str, groups: &[&Account]) -> Result<Self> {
        let list = groups
            .iter()
            .map(|g| g.name.as_str())
            .collect::<Vec<_>>()
            .join(",");
        let mut cmd = Command::new("useradd");
        cmd.args(["-M", "-U", "-d", "/nonexistent", "-s", "/usr/sbin/nologin"]);
        if !list.is_empty() {
            cmd.args(["-G", &list]);
        }
        run(cmd.arg(name))?;
        Ok(Self {
            name: name.to_owned(),
            group: false,
        })
    }

    /// uid (users) or gid (groups).
    pub fn id(&self) -> Result<u32> {
        let id = if self.group {
            nix::unistd::Group::from_name(&self.name)
                .ok()
                .flatten()
                .map(|g| g.gid.as_raw())
        } else {
            nix::unistd::User::from_name(&self.name)
                .ok()
                .flatten()
                .map(|u| u.uid.as_raw())
        };
        id.ok_or_else(|| format!("{} not in the user database", self.name))
    }

    /// A command that runs `program` as this user, with the user database's
    /// groups, killed when the bench dies.
    pub fn command(&self, program: &Path) -> Command {
        let mut c = Command::new("setpriv");
        c.arg(format!("--reuid={}", self.name))
            .arg(format!("--regid={}", self.name))
            .args(["--init-groups", "--pdeathsig=TERM", "--"])
            .arg(program)
            .env("HOME", "/nonexistent");
        c
    }
}

impl Drop for Account {
    fn drop(&mut self) {
        if self.group {
            let _ = run(Command::new("groupdel").arg(&self.name));
        } else {
            let _ = run(Command::new("userdel").arg(&self.name));
            // userdel removes the user's own group; make sure.
            let _ = Command::new("groupdel")
                .arg(&self.name)
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// The pid embedded in a name this bench made (`kht-bench1234a`), if any.
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX)?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Removes what bench runs that are gone (killed with SIGKILL, machine
/// rebooted mid-run) left behind: processes of their users (ssh-agent
/// drops the parent-death signal the others die of), users, groups,
/// directories.
pub fn sweep_stale() {
    let dead = |name: &str| {
        owner_pid(name).is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
    };
    let names = |file: &str| -> Vec<String> {
        std::fs::read_to_string(file)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(':').next())
            .filter(|n| dead(n))
            .map(str::to_owned)
            .collect()
    };
    for user in names("/etc/passwd") {
        eprintln!("removing user {user}, left by an earlier run");
        if let Some(uid) = nix::unistd::User::from_name(&user).ok().flatten() {
            end_processes_of(uid.uid.as_raw());
        }
        if let Err(e) = run(Command::new("userdel").arg(&user)) {
            eprintln!("{e}");
        }
    }
    for group in names("/etc/group") {
        eprintln!("removing group {group}, left by an earlier run");
        let _ = run(Command::new("groupdel").arg(&group));
    }
    if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
        for e in entries.flatten() {
            if e.file_name().to_str().is_some_and(dead) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// Ends the processes whose real uid is `uid` (a stale bench user's: only
/// processes an earlier bench run started), SIGTERM then SIGKILL.
fn end_processes_of(uid: u32) {
    let pids = || -> Vec<i32> {
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/status"))
                    .ok()
                    .and_then(|s| {
                        s.lines()
                            .find_map(|l| l.strip_prefix("Uid:"))
                            .and_then(|ids| ids.split_whitespace().next()?.parse::<u32>().ok())
                    })
                    == Some(uid)
            })
            .collect()
    };
    for signal in [
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGKILL,
    ] {
        let left = pids();
        if left.is_empty() {
            return;
        }
        for pid in left {
            eprintln!("ending process {pid} of uid {uid} ({signal}), left by an earlier run");
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
        }
        wait_for(Duration::from_secs(2), || pids().is_empty());
    }
}

/// CPU time and run-queue wait of a process, all its threads summed, in
/// microseconds, from `/proc/PID/task/*/schedstat` (nanoseconds, exact,
/// where `stat` counts clock ticks). The wait is time runnable but not
/// running: preempted, or queued behind another task on its CPU.
pub fn sched_us(pid: u32) -> Option<(f64, f64)> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let (mut cpu, mut wait) = (0u64, 0u64);
    for task in tasks.flatten() {
        let Ok(text) = std::fs::read_to_string(task.path().join("schedstat")) else {
            continue;
        };
        let mut fields = text
            .split_whitespace()
            .map(|f| f.parse::<u64>().unwrap_or(0));
        cpu += fields.next().unwrap_or(0);
        wait += fields.next().unwrap_or(0);
    }
    Some((cpu as f64 / 1e3, wait as f64 / 1e3))
}

/// CPU time of this process (all its threads), in microseconds.
pub fn self_cpu_us() -> f64 {
    use nix::sys::resource::{getrusage, UsageWho};
    getrusage(UsageWho::RUSAGE_SELF).map_or(0.0, |u| {
        let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 * 1e6 + tv.tv_usec() as f64;
        t(u.user_time()) + t(u.system_time())
    })
}

/// CPU time the whole machine has spent busy (not idle, not waiting for
/// I/O), and the time the hypervisor gave this VM's CPUs to someone else
/// (steal), in microseconds, from /proc/stat.
pub fn machine_cpu_us() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    // user nice system idle iowait irq softirq steal …
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("cpu "))
        .map(|l| {
            l.split_whitespace()
                .filter_map(|f| f.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    let field = |i: usize| fields.get(i).copied().unwrap_or(0);
    let busy: u64 = [0, 1, 2, 5, 6].into_iter().map(field).sum();
    let tick = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100);
    let us = |ticks: u64| ticks as f64 * 1e6 / tick as f64;
    (us(busy), us(field(7)))
}
