//! Unix socket files the daemon owns (the proxy socket, a spawned agent's
//! socket): whether something answers at a path and who it is
//! (`SO_PEERCRED`), replacing a socket file only once nothing answers on it,
//! binding with the final mode already set, and the trust check of the
//! directories they live in.
//!
//! This module must never remove or replace a socket something answers on,
//! nor anything that is not a socket: a second daemon started by mistake
//! must leave the running one untouched.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType, UnixAddr};

use crate::error::{Error, Result};

/// What is at a socket path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// Nothing: the path does not exist.
    Absent,
    /// A socket file nothing listens on (left by a crash).
    Stale,
    /// A socket something answers on; its pid and uid when known (a
    /// listener whose backlog is full answers, but its credentials are not
    /// read).
    Live {
        /// The listening process (`SO_PEERCRED`).
        pid: Option<i32>,
        /// Its uid.
        uid: Option<u32>,
    },
    /// A file that is not a socket.
    NotSocket,
}

impl Probe {
    /// `(pid N)`, or `(pid unknown)`, for messages.
    pub fn pid_text(&self) -> String {
        match self {
            Self::Live { pid: Some(pid), .. } => format!("pid {pid}"),
            _ => "pid unknown".to_owned(),
        }
    }
}

/// Finds out what is at `path`, without blocking: a non-blocking connect
/// either connects (a listener: its credentials are read), finds the
/// backlog full (a listener too), or is refused (a stale socket file).
pub fn probe(path: &Path) -> io::Result<Probe> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Probe::Absent),
        Err(e) => return Err(e),
        Ok(m) if !m.file_type().is_socket() => return Ok(Probe::NotSocket),
        Ok(_) => {}
    }
    let addr = UnixAddr::new(path).map_err(io::Error::from)?;
    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(io::Error::from)?;
    match socket::connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr) {
        Ok(()) => {
            let cred = socket::getsockopt(&fd, sockopt::PeerCredentials).ok();
            Ok(Probe::Live {
                pid: cred.map(|c| c.pid()),
                uid: cred.map(|c| c.uid()),
            })
        }
        Err(Errno::EAGAIN) => Ok(Probe::Live {
            pid: None,
            uid: None,
        }),
        Err(Errno::ECONNREFUSED) => Ok(Probe::Stale),
        Err(Errno::ENOENT) => Ok(Probe::Absent),
        Err(e) => Err(io::Error::from(e)),
    }
}

/// Removes the socket file at `path` if nothing answers on it; `what`
/// names it in errors ("agent.socket"). Absent is fine; a live socket or a
/// file of another kind is an error and stays.
pub fn remove_stale(path: &Path, what: &str) -> Result<()> {
    match probe(path) {
        Ok(Probe::Absent) => Ok(()),
        Ok(Probe::Stale) => std::fs::remove_file(path).map_err(|e| {
            Error::msg(format!(
                "cannot remove stale {what} {}: {e}",
                path.display()
            ))
        }),
        Ok(live @ Probe::Live { .. }) => Err(Error::msg(format!(
            "{what} {} is in use ({}); refusing to replace it",
            path.display(),
            live.pid_text()
        ))),
        Ok(Probe::NotSocket) => Err(Error::msg(format!(
            "{what} {} exists and is not a socket; refusing to replace it",
            path.display()
        ))),
        Err(e) => Err(Error::msg(format!(
            "cannot tell whether {what} {} is in use: {e}; refusing to replace it",
            path.display()
        ))),
    }
}

/// Removes a socket file on the way out, if nothing answers on it any more
/// (never another kind of file, never a socket someone else now listens
/// on); what is left in place is logged.
pub fn remove(path: &Path) {
    if let Err(e) = remove_stale(path, "socket") {
        tracing::warn!("left in place: {e}");
    }
}

/// Creates the directory of a socket keyholder owns (root-owned, 0755)
/// when it is missing, and refuses one that anyone but root could write
/// (where someone could replace the socket, or put their own in its place).
pub fn ensure_dir(socket: &Path, what: &str) -> Result<()> {
    let dir = socket
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.is_dir() {
        std::fs::create_dir_all(dir)
            .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)))
            .map_err(|e| Error::msg(format!("cannot create {}: {e}", dir.display())))?;
    }
    check_dir(dir, what)
}

/// Binds a socket keyholder serves (the proxy socket, `agent.socket` of an
/// in-process backend): its directory is made or checked
/// ([`ensure_dir`]), a stale socket left by a crash is replaced, anything
/// else at the path (a live socket, another kind of file) is an error, and
/// the socket has `mode` from the moment its name exists.
pub fn bind(path: &Path, mode: u32, what: &str) -> Result<tokio::net::UnixListener> {
    ensure_dir(path, what)?;
    let stale = matches!(probe(path), Ok(Probe::Stale));
    remove_stale(path, what)?;
    if stale {
        tracing::info!("replaced stale {what} {}", path.display());
    }
    bind_with_mode(path, mode)
        .and_then(|l| {
            l.set_nonblocking(true)?;
            tokio::net::UnixListener::from_std(l)
        })
        .map_err(|e| Error::msg(format!("cannot listen on {what} {}: {e}", path.display())))
}

/// Fails when the directory `dir` could be written by anyone but root: its
/// owner is not root, or it has the group or other write bit (a sticky
/// `/tmp` counts: others can create names in it).
pub fn check_dir(dir: &Path, what: &str) -> Result<()> {
    crate::trust::check_dir(dir).map_err(|e| {
        Error::msg(format!(
            "{what} directory {}: {e}; refusing to start (e.g. install -d -m 0755 -o root {0})",
            dir.display()
        ))
    })
}

/// Binds a listening socket at `path` that has `mode` from the moment the
/// path exists: bound under a temporary name in the same directory, given
/// its mode there, then renamed into place (replacing a stale socket file
/// atomically). The caller has checked that nothing answers at `path` and
/// that the directory is root's alone.
pub fn bind_with_mode(path: &Path, mode: u32) -> io::Result<UnixListener> {
    let temp = temp_name(path);
    if std::fs::symlink_metadata(&temp).is_ok_and(|m| m.file_type().is_socket()) {
        std::fs::remove_file(&temp)?;
    }
    let listener = UnixListener::bind(&temp)?;
    let placed = std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(mode))
        .and_then(|()| std::fs::rename(&temp, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&temp);
        return Err(e);
    }
    Ok(listener)
}

/// `DIR/.kh-PID.sock`: unique to this process, in the same directory (so a
/// rename is atomic), and short (socket paths are limited to 107 bytes).
fn temp_name(path: &Path) -> PathBuf {
    let name = format!(".kh-{}.sock", std::process::id());
    match path.parent() {
        Some(dir) => dir.join(name),
        None => PathBuf::from(name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_tells_absent_stale_live_and_other_files_apart() {
        let dir = std::env::temp_dir().join(format!("kh-probe-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("s.sock");
        assert_eq!(probe(&sock).unwrap(), Probe::Absent);
        let listener = UnixListener::bind(&sock).unwrap();
        match probe(&sock).unwrap() {
            Probe::Live { pid, uid } => {
                assert_eq!(pid, Some(std::process::id() as i32));
                assert_eq!(uid, Some(nix::unistd::getuid().as_raw()));
            }
            other => panic!("{other:?}"),
        }
        assert!(remove_stale(&sock, "socket").is_err());
        assert!(sock.exists());
        drop(listener);
        assert_eq!(probe(&sock).unwrap(), Probe::Stale);
        remove_stale(&sock, "socket").unwrap();
        assert!(!sock.exists());
        std::fs::write(&sock, "x").unwrap();
        assert_eq!(probe(&sock).unwrap(), Probe::NotSocket);
        assert!(remove_stale(&sock, "socket").is_err());
        std::fs::remove_file(&sock).unwrap();

        let bound = bind_with_mode(&sock, 0o640).unwrap();
        let m = std::fs::symlink_metadata(&sock).unwrap();
        assert!(m.file_type().is_socket());
        assert_eq!(m.permissions().mode() & 0o777, 0o640);
        assert!(!temp_name(&sock).exists());
        assert!(matches!(probe(&sock).unwrap(), Probe::Live { .. }));
        drop(bound);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
