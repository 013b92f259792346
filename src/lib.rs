//! keyholder: a privileged ssh-agent proxy that lets a group of people share
//! a deploy key without ever holding it.
//!
//! Where things are:
//! - [`protocol`]: bytes to typed requests and back (framing, 256 KiB cap,
//!   classification, the few bodies the proxy parses).
//! - [`policy`]: the security decision, pure and exhaustively tested.
//! - [`backend`]: what holds or reaches the keys, one folder per backend
//!   (the upstream agent with its supervisor, the builtin backend, a PKCS#11
//!   token), and
//!   `agent.socket` for backends that live in the daemon.
//! - [`certs`]: short-lived per-caller certificates: minting, cache, serials.
//! - [`grants`]: the grant store: grants kept, persisted, timed, announced.
//! - [`daemon`]: the accept loop and per-connection tasks that wire the above.
//! - [`commands`]: the admin and monitoring commands.
//! - [`config`]: the configuration file.
//! - [`known_hosts`]: the keys of a `destinations` file (known_hosts format).
//! - [`verify`]: signature checks of `session-bind@openssh.com` (CPU work,
//!   run off the async threads).
//! - [`cli`]: the command line definition (binary, man page, completions).
//! - [`error`]: the one error type: a message with its context, shown as
//!   one line.
//! - [`hardening`]: process hardening of the privileged commands (no core
//!   dumps, not ptrace-able, locked memory, umask, allocator thresholds).
//! - [`logging`]: log output to syslog or stderr, and the line format.
//! - [`notify`]: systemd readiness notification (`sd_notify`).
//! - [`shutdown`]: the stop signal `daemon` and `backend` both watch.
//! - [`counter`]: an event count `backend` keeps and `daemon` reports.
//! - [`ratelog`]: rate-limited logging of lines a flood could repeat, for both.
//! - [`sockets`]: probing, binding and removing every socket file keyholder
//!   owns.
//! - [`trust`]: the one trust check of every file and directory keyholder
//!   trusts (owner, mode, file type, size; checked on the open descriptor).

pub mod backend;
pub mod certs;
pub mod cli;
pub mod commands;
pub mod config;
pub mod counter;
pub mod daemon;
pub mod error;
pub mod grants;
pub mod hardening;
pub mod known_hosts;
pub mod logging;
pub mod notify;
pub mod policy;
pub mod protocol;
pub mod ratelog;
pub mod shutdown;
pub mod sockets;
pub mod trust;
pub mod verify;

/// Fails with a one-line error unless the effective uid is 0.
pub fn require_root(what: &str) -> error::Result<()> {
    if nix::unistd::geteuid().is_root() {
        Ok(())
    } else {
        Err(error::Error::msg(format!(
            "{what} must be run as root (uid {} is not)",
            nix::unistd::geteuid()
        )))
    }
}
