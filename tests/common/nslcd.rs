//! A name service that hangs, for the tests (`tests/lookups.rs`) and the
//! bench (`benches/proxy/hung.rs`, which includes this file by path):
//! `nslcd` (Debian's nslcd + libnss-ldapd, the NSS module most LDAP sites
//! run) pointed at an LDAP server on 127.0.0.1 that accepts connections and
//! never answers, started inside the mount namespace of the program under
//! test (`unshare -m`), where a private `nsswitch.conf` (`passwd: files
//! ldap`, `group: files ldap`), `nslcd.conf` and `/run` are mounted.
//!
//! It must never touch the machine's own name service: every mount is made
//! by the script [`Nslcd::prepare`] returns, inside the caller's namespace.

use std::io;
use std::net::TcpListener;
use std::path::{Path, PathBuf};

/// nslcd's path on Debian.
pub const NSLCD: &str = "/usr/sbin/nslcd";

/// Whether nslcd and its NSS module are installed.
pub fn installed() -> bool {
    let module = ["/lib", "/usr/lib"]
        .iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flatten()
        .flatten()
        .any(|e| e.path().join("libnss_ldap.so.2").exists());
    Path::new(NSLCD).exists() && module
}

/// An LDAP server that accepts connections and never answers; what it
/// accepted is held until the process ends.
pub fn silent_ldap_server() -> io::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            held.push(stream);
        }
    });
    Ok(port)
}

/// nslcd, started by the script inside the namespace; killed on drop (it
/// outlives the program that started it otherwise).
pub struct Nslcd {
    pub pid_file: PathBuf,
    pub log: PathBuf,
}

impl Nslcd {
    /// Writes the namespace's `nsswitch.conf` and `nslcd.conf` into `dir`
    /// (the LDAP server at `ldap_port`; `local_users`: users whose group
    /// lookups nslcd answers at once without asking the server,
    /// `nss_initgroups_ignoreusers`), and returns the guard and the script
    /// to run as `unshare -m -- sh -c SCRIPT PROGRAM ARGS…`: it mounts them,
    /// starts nslcd, waits for its socket, then execs PROGRAM (so the pid
    /// the caller holds is PROGRAM's).
    pub fn prepare(dir: &Path, ldap_port: u16, local_users: &[&str]) -> io::Result<(Self, String)> {
        std::fs::write(
            dir.join("nsswitch.conf"),
            "passwd: files ldap\ngroup: files ldap\nshadow: files\nhosts: files\n",
        )?;
        std::fs::write(
            dir.join("nslcd.conf"),
            format!(
                "uri ldap://127.0.0.1:{ldap_port}/\nbase dc=kht,dc=invalid\n\
                 bind_timelimit 120\ntimelimit 120\nidle_timelimit 120\n\
                 nss_initgroups_ignoreusers {}\n",
                local_users.join(",")
            ),
        )?;
        let nslcd = Self {
            pid_file: dir.join("nslcd.pid"),
            log: dir.join("nslcd.log"),
        };
        let d = dir.display();
        let script = format!(
            "set -e\n\
             mount --bind {d}/nsswitch.conf /etc/nsswitch.conf\n\
             mount --bind {d}/nslcd.conf /etc/nslcd.conf\n\
             mount -t tmpfs -o mode=0755 kht-run /run\n\
             mkdir -p /run/nslcd\n\
             {NSLCD} -d >{log} 2>&1 &\n\
             echo $! >{pid}\n\
             i=0\n\
             while [ ! -S /run/nslcd/socket ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done\n\
             [ -S /run/nslcd/socket ] || {{ echo 'nslcd did not start' >&2; exit 1; }}\n\
             exec \"$0\" \"$@\"\n",
            log = nslcd.log.display(),
            pid = nslcd.pid_file.display(),
        );
        Ok((nslcd, script))
    }

    pub fn pid(&self) -> Option<i32> {
        std::fs::read_to_string(&self.pid_file)
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Nslcd {
    fn drop(&mut self) {
        if let Some(pid) = self.pid() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}
