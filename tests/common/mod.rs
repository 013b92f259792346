//! Shared test harness: real OpenSSH `ssh-agent`, `ssh-add`, `ssh`, `sshd`,
//! real throwaway Unix users and groups (prefix `kht-`), and the real
//! `keyholder` binary.
//!
//! Everything is unique per test (directories, sockets, ports, user names),
//! so tests run in parallel. Tests that need root call [`require_root!`],
//! which prints a loud SKIPPED line and returns when not root.

#![allow(dead_code)]

pub mod bao;
pub mod nslcd;
pub mod process;
pub mod site;

#[allow(unused_imports)]
pub use process::{proc_status, read_kib, run_ok, wait_for, Proc, TempDir};

#[allow(unused_imports)]
pub use site::{fingerprint, first_two, keygen_full, Site, SiteBuilder, SiteKey};

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The binary under test.
pub const KEYHOLDER: &str = env!("CARGO_BIN_EXE_keyholder");

/// Returns from the test, loudly, unless running as root.
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::common::is_root() {
            eprintln!(
                "\n*** SKIPPED {}:{}: needs root (real users, groups, sockets owned by root) ***\n",
                file!(),
                line!()
            );
            return;
        }
    };
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A short name unique across parallel tests and test binaries.
pub fn unique(tag: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    format!("{tag}{}x{n}", std::process::id() % 100_000)
}

impl TempDir {
    /// A temporary directory tagged `tag`, unique to this test.
    pub fn new(tag: &str) -> Self {
        let path = std::env::temp_dir().join(format!("kht-{}", unique(tag)));
        Self::create(path).unwrap()
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

// ---------------------------------------------------------------------------
// Missing tools: one loud line naming the Debian package, never a backtrace

/// The Debian package that provides `program` (a name or a path).
pub fn debian_package(program: &str) -> &'static str {
    let name = Path::new(program)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or(program);
    match name {
        "ssh-agent" | "ssh-add" | "ssh" | "ssh-keygen" | "scp" => "openssh-client",
        "sshd" => "openssh-server",
        "setpriv" | "prlimit" | "setsid" => "util-linux",
        "script" => "bsdutils",
        "useradd" | "userdel" | "usermod" | "groupadd" | "groupdel" | "gpasswd" => "passwd",
        _ => "the package that provides it (apt-file search)",
    }
}

/// The panic payload of a missing tool: printed as one line by the hook
/// [`missing_tool`] installs, without the location or a backtrace.
pub struct MissingTool(pub String);

/// Fails the current test with one line naming `program` and its Debian
/// package; no backtrace, whatever `RUST_BACKTRACE` says.
pub fn missing_tool(program: &str) -> ! {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            match info.payload().downcast_ref::<MissingTool>() {
                Some(MissingTool(line)) => eprintln!("{line}"),
                None => default(info),
            }
        }));
    });
    let package = debian_package(program);
    std::panic::panic_any(MissingTool(format!(
        "\n*** FAILED: {program} not found: the end-to-end tests need it; install it with \
         `apt-get install {package}` ***\n"
    )))
}

/// Starts `cmd`; a program that is not installed is [`missing_tool`].
pub fn spawn(cmd: &mut Command) -> Child {
    match cmd.spawn() {
        Ok(child) => child,
        Err(e) => fail_to_start(cmd, e),
    }
}

fn fail_to_start(cmd: &Command, e: std::io::Error) -> ! {
    let program = cmd.get_program().to_string_lossy().into_owned();
    if e.kind() == std::io::ErrorKind::NotFound {
        missing_tool(&program);
    }
    panic!("cannot run {cmd:?}: {e}")
}

/// Runs a command, returns its output; a program that is not installed is
/// [`missing_tool`], any other failure to start it panics.
pub fn run(cmd: &mut Command) -> Output {
    match cmd.stdin(Stdio::null()).output() {
        Ok(o) => o,
        Err(e) => fail_to_start(cmd, e),
    }
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Generates a key pair `dir/name`, `dir/name.pub`. `kind` is `ed25519`,
/// `rsa`, or `ecdsa`; `passphrase` empty for none.
pub fn keygen(dir: &Path, name: &str, kind: &str, passphrase: &str) -> PathBuf {
    let path = dir.join(name);
    let mut cmd = Command::new("ssh-keygen");
    cmd.args(["-q", "-t", kind, "-N", passphrase, "-C", name, "-f"])
        .arg(&path);
    if kind == "rsa" {
        cmd.args(["-b", "2048"]);
    }
    let o = run(&mut cmd);
    assert!(o.status.success(), "ssh-keygen: {}", stderr(&o));
    std::fs::set_permissions(
        path.with_extension("pub")
            .with_file_name(format!("{name}.pub")),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    path
}

// ---------------------------------------------------------------------------
// Backends: every test that starts a daemon runs against both.

/// Which backend a daemon under test holds its keys in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A real OpenSSH `ssh-agent` started by the test (`spawn = false`).
    Upstream,
    /// `backend = "builtin"`: the daemon holds the keys and serves
    /// `agent.socket` itself; keys are added with `ssh-add` to it.
    Builtin,
}

/// Set to `upstream` or `builtin` to run only that backend's half of the
/// parametrized tests.
pub const BACKEND_ENV: &str = "KHT_BACKEND";

impl Backend {
    /// Both backends, or only the one `$KHT_BACKEND` names.
    pub fn all() -> Vec<Self> {
        match std::env::var(BACKEND_ENV).as_deref() {
            Ok("upstream") => vec![Self::Upstream],
            Ok("builtin") => vec![Self::Builtin],
            _ => vec![Self::Upstream, Self::Builtin],
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Upstream => "upstream",
            Self::Builtin => "builtin",
        }
    }

    /// The `[agent]` table for a daemon using this backend with `socket`.
    /// Upstream: an external agent there (`spawn = false`); builtin: the
    /// daemon's own admin socket.
    pub fn agent_toml(self, socket: &Path) -> String {
        match self {
            Self::Upstream => format!(
                "[agent]\nsocket = \"{}\"\nspawn = false\n",
                socket.display()
            ),
            Self::Builtin => format!(
                "[agent]\nbackend = \"builtin\"\nsocket = \"{}\"\n",
                socket.display()
            ),
        }
    }
}

/// Runs `body` once per backend ([`Backend::all`]), saying which on stderr
/// (a failure's output then names the backend). With the [`Site`] builder:
///
/// ```ignore
/// #[test]
/// fn something() {
///     require_root!();
///     each_backend(|backend| {
///         let s = Site::builder("x", backend)
///             .group("dep")
///             .user("member", &["dep"])
///             .keys(&[("deploy", "ed25519")], &["dep"])
///             .build();                      // keys added once the agent is up
///         …
///     });
/// }
/// ```
pub fn each_backend(mut body: impl FnMut(Backend)) {
    for backend in Backend::all() {
        eprintln!("=== backend {} ===", backend.name());
        body(backend);
    }
}

/// Where the keys live: a real OpenSSH `ssh-agent` started by the test, or
/// (builtin backend) the daemon's own `agent.socket`, which exists once the
/// daemon runs. Either way root reaches it with `ssh-add` on [`Agent::socket`],
/// and "the agent is unchanged" is checked with [`Agent::keys`].
pub struct Agent {
    pub socket: PathBuf,
    pub backend: Backend,
    child: Option<Child>,
}

impl Agent {
    /// A real OpenSSH `ssh-agent` (upstream backend).
    pub fn start(dir: &TempDir) -> Self {
        let socket = dir.join("agent.sock");
        let child = spawn(
            Command::new("ssh-agent")
                .arg("-D")
                .arg("-a")
                .arg(&socket)
                .stdin(Stdio::null())
                .stdout(Stdio::null()),
        );
        assert!(
            wait_for(Duration::from_secs(10), || UnixStream::connect(&socket)
                .is_ok()),
            "ssh-agent did not start"
        );
        Self {
            socket,
            backend: Backend::Upstream,
            child: Some(child),
        }
    }

    /// The key holder for `backend`: a started ssh-agent, or the path the
    /// builtin daemon will serve (add keys only after [`Daemon::start`]).
    pub fn new(dir: &TempDir, backend: Backend) -> Self {
        match backend {
            Backend::Upstream => Self::start(dir),
            Backend::Builtin => Self {
                socket: dir.join("agent.sock"),
                backend,
                child: None,
            },
        }
    }

    /// `ssh-add` run as root directly against the agent.
    pub fn ssh_add(&self, args: &[&str]) -> Output {
        run(Command::new("ssh-add")
            .args(args)
            .env("SSH_AUTH_SOCK", &self.socket))
    }

    pub fn add(&self, key: &Path) {
        let o = self.ssh_add(&[key.to_str().unwrap()]);
        assert!(o.status.success(), "ssh-add: {}", stderr(&o));
    }

    /// The agent's public keys (`ssh-add -L`), sorted: what "unchanged" is checked against.
    pub fn keys(&self) -> Vec<String> {
        let o = self.ssh_add(&["-L"]);
        key_lines(&o)
    }

    /// Stops the ssh-agent the test started (kill and reap), as dropping it
    /// does; the socket file stays.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The ssh-agent's pid (upstream only; 0 for builtin).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A `keyholder daemon` under test, with its stderr log captured.
pub struct Daemon {
    pub socket: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Daemon {
    /// Writes `config_body` (which must set `socket` to `dir/proxy.sock`…
    /// see [`Daemon::config`]) and starts the daemon on it.
    pub fn start_with(dir: &TempDir, config_body: &str) -> Self {
        Self::start_via(dir, config_body, &[])
    }

    /// A configuration for `dir` with an external agent at `agent`, plus `extra` TOML.
    pub fn config(dir: &TempDir, agent: &Path, extra: &str) -> String {
        format!(
            "socket = \"{}\"\nkey_dir = \"{}\"\nlog = \"stderr\"\n\n[agent]\nsocket = \"{}\"\nspawn = false\n\n{extra}",
            dir.join("proxy.sock").display(),
            dir.path().display(),
            agent.display()
        )
    }

    /// A configuration for `dir` using `agent`'s backend, plus `extra` TOML.
    pub fn config_for(dir: &TempDir, agent: &Agent, extra: &str) -> String {
        format!(
            "socket = \"{}\"\nkey_dir = \"{}\"\nlog = \"stderr\"\n\n{}\n{extra}",
            dir.join("proxy.sock").display(),
            dir.path().display(),
            agent.backend.agent_toml(&agent.socket)
        )
    }

    /// A daemon in front of `agent` (or, builtin, holding the keys itself),
    /// keys in `dir`, with `extra` TOML. With the builtin backend the daemon
    /// is started with `KEYHOLDER_BUILTIN_*` knobs from the environment.
    pub fn start(dir: &TempDir, agent: &Agent, extra: &str) -> Self {
        let d = Self::start_with(dir, &Self::config_for(dir, agent, extra));
        if agent.backend == Backend::Builtin {
            assert!(
                wait_for(Duration::from_secs(10), || UnixStream::connect(
                    &agent.socket
                )
                .is_ok()),
                "builtin agent.socket did not appear:\n{}",
                d.log_text()
            );
        }
        d
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle`.
    pub fn wait_log(&self, needle: &str) -> bool {
        wait_for(Duration::from_secs(10), || self.log_text().contains(needle))
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid() as i32), sig).unwrap();
    }

    /// Sends SIGTERM and waits; returns the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        child.wait().unwrap()
    }

    /// `SSH_AUTH_SOCK=proxy ssh-add ARGS` as `who`.
    pub fn ssh_add(&self, who: &As, args: &[&str]) -> Output {
        run(who
            .command("ssh-add")
            .args(args)
            .env("SSH_AUTH_SOCK", &self.socket))
    }

    /// Public keys listed through the proxy for `who` (`ssh-add -L`).
    pub fn listed(&self, who: &As) -> Vec<String> {
        let o = self.ssh_add(who, &["-L"]);
        key_lines(&o)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// ---------------------------------------------------------------------------
// Users and groups

/// useradd/groupadd lock /etc/passwd and /etc/group; serialise them within a
/// test binary and retry across binaries.
static USERDB: Mutex<()> = Mutex::new(());

fn userdb(args: &[&str]) {
    let _guard = USERDB.lock().unwrap_or_else(|e| e.into_inner());
    for attempt in 0..50 {
        let o = run(Command::new(args[0]).args(&args[1..]));
        if o.status.success() {
            return;
        }
        let err = stderr(&o);
        if attempt < 49 && (err.contains("lock") || err.contains("try again")) {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        panic!("{args:?}: {err}");
    }
}

/// The public key lines of `ssh-add -L` output, sorted.
pub fn key_lines(o: &Output) -> Vec<String> {
    let mut v: Vec<String> = stdout(o)
        .lines()
        .filter(|l| l.starts_with("ssh-") || l.starts_with("ecdsa-"))
        .map(str::to_owned)
        .collect();
    v.sort();
    v
}

/// A throwaway Unix group, deleted on drop.
pub struct TestGroup {
    pub name: String,
}

impl TestGroup {
    pub fn create(tag: &str) -> Self {
        let name = format!("kht-{}", unique(tag));
        userdb(&["groupadd", &name]);
        Self { name }
    }
    pub fn gid(&self) -> u32 {
        nix::unistd::Group::from_name(&self.name)
            .unwrap()
            .unwrap()
            .gid
            .as_raw()
    }
}

impl Drop for TestGroup {
    fn drop(&mut self) {
        let _guard = USERDB.lock().unwrap_or_else(|e| e.into_inner());
        let _ = run(Command::new("groupdel").arg(&self.name));
    }
}

/// A throwaway Unix user (own primary group, shell /bin/sh, no home), deleted on drop.
pub struct TestUser {
    pub name: String,
}

impl TestUser {
    /// Creates a user that is a member of `groups` (supplementary).
    pub fn create(tag: &str, groups: &[&TestGroup]) -> Self {
        let name = format!("kht-{}", unique(tag));
        // `-p *`: no password, but not "locked" (sshd without PAM refuses locked accounts).
        let mut args = vec![
            "useradd",
            "-M",
            "-U",
            "-p",
            "*",
            "-d",
            "/nonexistent",
            "-s",
            "/bin/sh",
        ];
        let list = groups
            .iter()
            .map(|g| g.name.as_str())
            .collect::<Vec<_>>()
            .join(",");
        if !list.is_empty() {
            args.push("-G");
            args.push(&list);
        }
        args.push(&name);
        userdb(&args);
        Self { name }
    }

    pub fn uid(&self) -> u32 {
        nix::unistd::User::from_name(&self.name)
            .unwrap()
            .unwrap()
            .uid
            .as_raw()
    }

    pub fn gid(&self) -> u32 {
        nix::unistd::User::from_name(&self.name)
            .unwrap()
            .unwrap()
            .gid
            .as_raw()
    }

    /// Adds the user to `group` in the user database.
    pub fn join(&self, group: &TestGroup) {
        userdb(&["gpasswd", "-a", &self.name, &group.name]);
    }

    /// Removes the user from `group` in the user database.
    pub fn leave(&self, group: &TestGroup) {
        userdb(&["gpasswd", "-d", &self.name, &group.name]);
    }

    /// Runs as this user with the groups of the user database.
    pub fn as_user(&self) -> As {
        As::User(self.name.clone())
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let _guard = USERDB.lock().unwrap_or_else(|e| e.into_inner());
        let _ = run(Command::new("userdel").arg(&self.name));
        let _ = run(Command::new("groupdel").arg(&self.name));
    }
}

/// Who a client command runs as.
#[derive(Debug, Clone)]
pub enum As {
    /// The test process itself (root).
    Root,
    /// A user, with its user-database groups (`setpriv --init-groups`).
    User(String),
    /// Raw ids: uid, gid and no supplementary groups, whatever the user
    /// database says (a setgid-style process, or a uid with no passwd entry).
    Ids { uid: u32, gid: u32 },
}

impl As {
    /// A command that runs `program` as this identity.
    pub fn command(&self, program: &str) -> Command {
        match self {
            As::Root => Command::new(program),
            As::User(name) => {
                let mut c = Command::new("setpriv");
                c.args([
                    &format!("--reuid={name}"),
                    &format!("--regid={name}"),
                    "--init-groups",
                    "--",
                    program,
                ])
                .env("HOME", "/nonexistent");
                c
            }
            As::Ids { uid, gid } => {
                let mut c = Command::new("setpriv");
                c.args([
                    &format!("--reuid={uid}"),
                    &format!("--regid={gid}"),
                    "--clear-groups",
                    "--",
                    program,
                ])
                .env("HOME", "/nonexistent");
                c
            }
        }
    }
}

// ---------------------------------------------------------------------------
// sshd

/// A real `sshd` on 127.0.0.1, with its own host key and config. Accounts
/// log in with the keys in `authorized_keys/<user>`.
pub struct Sshd {
    pub port: u16,
    /// The host's private key file.
    pub host_key: PathBuf,
    dir: PathBuf,
    child: Child,
}

impl Sshd {
    pub fn start(dir: &TempDir) -> Self {
        Self::start_opts(dir, "sshd", "ed25519", None)
    }

    /// Like [`Sshd::start`], with `extra` sshd_config lines (e.g.
    /// `PubkeyAcceptedAlgorithms +ssh-rsa`, `TrustedUserCAKeys FILE`).
    pub fn start_with(dir: &TempDir, extra: &str) -> Self {
        Self::start_full(dir, "sshd", "ed25519", None, extra)
    }

    /// An sshd in `dir/name` with a host key of `kind` (as for `keygen`),
    /// and, with `ca`, a host certificate for it signed by that CA private
    /// key (`ssh-keygen -s CA -h`), served with `HostCertificate`.
    pub fn start_opts(dir: &TempDir, name: &str, kind: &str, ca: Option<&Path>) -> Self {
        Self::start_full(dir, name, kind, ca, "")
    }

    /// [`Sshd::start_opts`] with `extra` sshd_config lines.
    pub fn start_full(
        dir: &TempDir,
        name: &str,
        kind: &str,
        ca: Option<&Path>,
        extra: &str,
    ) -> Self {
        Self::start_validity(dir, name, kind, ca, Some("-5m:+1h"), extra)
    }

    /// [`Sshd::start_full`] with the host certificate's `-V` validity, or
    /// none (valid forever, `ssh-keygen`'s default).
    pub fn start_validity(
        dir: &TempDir,
        name: &str,
        kind: &str,
        ca: Option<&Path>,
        validity: Option<&str>,
        extra: &str,
    ) -> Self {
        let root = dir.join(name);
        std::fs::create_dir_all(root.join("authorized_keys")).unwrap();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(
            root.join("authorized_keys"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        let _ = std::fs::create_dir_all("/run/sshd");
        let host_key = format!("host_{kind}");
        keygen(&root, &host_key, kind, "");
        let mut cert_line = String::new();
        if let Some(ca) = ca {
            let o = run(Command::new("ssh-keygen")
                .args(["-q", "-s"])
                .arg(ca)
                .args(["-h", "-I", "test-host", "-n", "127.0.0.1"])
                .args(validity.map(|v| ["-V", v]).into_iter().flatten())
                .arg(root.join(format!("{host_key}.pub"))));
            assert!(o.status.success(), "ssh-keygen -s: {}", stderr(&o));
            cert_line = format!(
                "HostCertificate {}\n",
                root.join(format!("{host_key}-cert.pub")).display()
            );
        }
        let port = free_port();
        let config = root.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {root}/{host_key}\n{cert_line}PidFile none\n\
                 AuthorizedKeysFile {root}/authorized_keys/%u\nStrictModes no\nUsePAM no\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n\
                 PermitRootLogin no\nLogLevel VERBOSE\nPrintMotd no\nAcceptEnv none\n{extra}\n",
                root = root.display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(root.join("sshd.log")).unwrap();
        let child = spawn(
            Command::new("/usr/sbin/sshd")
                .args(["-D", "-e", "-f"])
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log),
        );
        let addr = format!("127.0.0.1:{port}");
        assert!(
            wait_for(Duration::from_secs(10), || std::net::TcpStream::connect(
                &addr
            )
            .is_ok()),
            "sshd did not start: {}",
            std::fs::read_to_string(root.join("sshd.log")).unwrap_or_default()
        );
        Self {
            port,
            host_key: root.join(host_key),
            dir: root,
            child,
        }
    }

    /// The host's public key file.
    pub fn host_pub(&self) -> PathBuf {
        self.host_key.with_file_name(format!(
            "{}.pub",
            self.host_key.file_name().unwrap().to_str().unwrap()
        ))
    }

    /// Lets `account` log in with the public keys in `pubkeys`.
    pub fn authorize(&self, account: &str, pubkeys: &[&Path]) {
        let mut text = String::new();
        for p in pubkeys {
            text.push_str(&std::fs::read_to_string(p).unwrap());
        }
        let path = self.dir.join("authorized_keys").join(account);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.join("sshd.log")).unwrap_or_default()
    }

    /// `ssh account@127.0.0.1 COMMAND` as `who` through `auth_sock`, with
    /// `extra` ssh options; agent only, no files from a home directory.
    pub fn ssh(
        &self,
        who: &As,
        auth_sock: &Path,
        account: &str,
        extra: &[&str],
        command: &str,
    ) -> Output {
        let mut c = who.command("ssh");
        c.args([
            "-F",
            "/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "ConnectTimeout=10",
            "-p",
            &self.port.to_string(),
        ])
        .args(extra)
        .arg(format!("{account}@127.0.0.1"))
        .arg(command)
        .env("SSH_AUTH_SOCK", auth_sock);
        run(&mut c)
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

// ---------------------------------------------------------------------------
// Raw protocol client (for hostile input and precise assertions)

pub const FAILURE: u8 = 5;
pub const SUCCESS: u8 = 6;
pub const IDENTITIES_ANSWER: u8 = 12;
pub const SIGN_RESPONSE: u8 = 14;
pub const EXTENSION_FAILURE: u8 = 28;
pub const EXTENSION_RESPONSE: u8 = 29;

pub struct Raw(pub UnixStream);

impl Raw {
    pub fn connect(socket: &Path) -> Self {
        let s = UnixStream::connect(socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        Self(s)
    }

    /// Sends raw bytes.
    pub fn send_bytes(&mut self, bytes: &[u8]) {
        self.0.write_all(bytes).unwrap();
    }

    /// Sends one framed message (type byte + body).
    pub fn send(&mut self, message: &[u8]) {
        let mut m = (message.len() as u32).to_be_bytes().to_vec();
        m.extend_from_slice(message);
        self.send_bytes(&m);
    }

    /// Reads one framed answer; `None` when the connection was closed.
    pub fn recv(&mut self) -> Option<Vec<u8>> {
        let mut len = [0u8; 4];
        self.0.read_exact(&mut len).ok()?;
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
        self.0.read_exact(&mut body).ok()?;
        Some(body)
    }

    /// Sends and returns the answer.
    pub fn call(&mut self, message: &[u8]) -> Option<Vec<u8>> {
        self.send(message);
        self.recv()
    }

    /// Whether the daemon closed the connection (EOF within the timeout).
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.0.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }
}

/// An SSH string.
pub fn string(bytes: &[u8]) -> Vec<u8> {
    let mut v = (bytes.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(bytes);
    v
}

/// The wire blob of an OpenSSH public key file.
pub fn pubkey_blob(pub_path: &Path) -> Vec<u8> {
    let text = std::fs::read_to_string(pub_path).unwrap();
    let key = ssh_key::PublicKey::from_openssh(text.trim()).unwrap();
    key.to_bytes().unwrap()
}

/// An SSH string at the start of `bytes`, and the rest.
pub fn take_string(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let (len, rest) = bytes.split_first_chunk::<4>()?;
    rest.split_at_checked(u32::from_be_bytes(*len) as usize)
}

/// The key blobs of an IDENTITIES_ANSWER, sorted.
pub fn listed_blobs(answer: &[u8]) -> Option<Vec<Vec<u8>>> {
    let (&kind, rest) = answer.split_first()?;
    if kind != IDENTITIES_ANSWER {
        return None;
    }
    let (n, mut rest) = rest.split_first_chunk::<4>()?;
    let mut blobs = Vec::new();
    for _ in 0..u32::from_be_bytes(*n) {
        let (blob, r) = take_string(rest)?;
        let (_comment, r) = take_string(r)?;
        blobs.push(blob.to_vec());
        rest = r;
    }
    blobs.sort();
    rest.is_empty().then_some(blobs)
}

/// A SIGN_REQUEST message for `blob` over `data`.
pub fn sign_request(blob: &[u8], data: &[u8], flags: u32) -> Vec<u8> {
    let mut m = vec![13u8];
    m.extend(string(blob));
    m.extend(string(data));
    m.extend(flags.to_be_bytes());
    m
}

/// A well-formed SSH user-auth request for `blob` (method `publickey`).
pub fn userauth_data(blob: &[u8], user: &str, alg: &str) -> Vec<u8> {
    let mut d = string(&[7u8; 32]);
    d.push(50);
    d.extend(string(user.as_bytes()));
    d.extend(string(b"ssh-connection"));
    d.extend(string(b"publickey"));
    d.push(1);
    d.extend(string(alg.as_bytes()));
    d.extend(string(blob));
    d
}

/// The `keyholder` binary as `who`, with `args`.
pub fn keyholder(who: &As, args: &[&str]) -> Output {
    run(who.command(KEYHOLDER).args(args))
}

// ---------------------------------------------------------------------------
// Raw protocol client as another user: the test binary re-runs itself under
// `setpriv` and executes only the helper test defined by `raw_client_helper!`.

const RAW_SOCKET_ENV: &str = "KHT_RAW_CLIENT_SOCKET";
const RAW_MESSAGES_ENV: &str = "KHT_RAW_CLIENT_MESSAGES";

/// Bytes as lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Lowercase hex back to bytes.
pub fn unhex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap())
        .collect()
}

/// One step of a raw client's script.
pub enum Step {
    /// Send a message and read its answer.
    Send(Vec<u8>),
    /// Create this file (to tell the test how far the client got).
    Mark(PathBuf),
    /// Wait until this file exists (for the test to go on).
    Wait(PathBuf),
}

/// Sends each message on one connection as `who`; returns each answer
/// (`None` once the daemon closed the connection).
pub fn raw_as(who: &As, socket: &Path, messages: &[Vec<u8>]) -> Vec<Option<Vec<u8>>> {
    let steps: Vec<Step> = messages.iter().cloned().map(Step::Send).collect();
    raw_script_as(who, socket, &steps)
}

/// Runs `steps` on one connection as `who`; returns the answer of each
/// [`Step::Send`] (`None` once the daemon closed the connection).
pub fn raw_script_as(who: &As, socket: &Path, steps: &[Step]) -> Vec<Option<Vec<u8>>> {
    let exe = std::env::current_exe().unwrap();
    let joined = steps
        .iter()
        .map(|step| match step {
            Step::Send(m) => hex(m),
            Step::Mark(p) => format!("mark:{}", p.display()),
            Step::Wait(p) => format!("wait:{}", p.display()),
        })
        .collect::<Vec<_>>()
        .join(",");
    let sends = steps.iter().filter(|s| matches!(s, Step::Send(_))).count();
    let o = run(who
        .command(exe.to_str().unwrap())
        .args([
            "--exact",
            "raw_client_helper",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(RAW_SOCKET_ENV, socket)
        .env(RAW_MESSAGES_ENV, joined));
    assert!(
        o.status.success(),
        "raw client failed: {}{}",
        stdout(&o),
        stderr(&o)
    );
    let answers: Vec<Option<Vec<u8>>> = stdout(&o)
        .lines()
        .filter_map(|l| l.split_once("ANSWER ").map(|(_, a)| a))
        .map(|a| (a != "closed").then(|| unhex(a)))
        .collect();
    assert_eq!(answers.len(), sends, "{}", stdout(&o));
    answers
}

/// The body of the helper test: does nothing unless re-run by [`raw_as`].
pub fn raw_client_main() {
    let (Ok(socket), Ok(messages)) = (
        std::env::var(RAW_SOCKET_ENV),
        std::env::var(RAW_MESSAGES_ENV),
    ) else {
        return;
    };
    let mut raw = Raw::connect(Path::new(&socket));
    for m in messages.split(',').filter(|m| !m.is_empty()) {
        if let Some(path) = m.strip_prefix("mark:") {
            std::fs::write(path, "").unwrap();
            continue;
        }
        if let Some(path) = m.strip_prefix("wait:") {
            assert!(wait_for(Duration::from_secs(30), || Path::new(path).exists()));
            continue;
        }
        match raw.call(&unhex(m)) {
            Some(a) => println!("ANSWER {}", hex(&a)),
            None => println!("ANSWER closed"),
        }
    }
}

/// Defines the helper test that [`raw_as`] runs; put it in each test file that uses it.
#[macro_export]
macro_rules! raw_client_helper {
    () => {
        #[test]
        fn raw_client_helper() {
            $crate::common::raw_client_main();
        }
    };
}

// ---------------------------------------------------------------------------
// Hostile-user and fault tests (tests/hostile.rs): a daemon started through a
// wrapper, /proc readings, long-running helper processes as other users.

impl Daemon {
    /// Like [`Daemon::start_with`], but runs the daemon through `wrapper`
    /// (e.g. `["prlimit", "--nofile=64:64", "--"]` or a `setpriv` line),
    /// which must exec it so that [`Daemon::pid`] is the daemon's pid. An
    /// empty wrapper runs it directly.
    pub fn start_via(dir: &TempDir, config_body: &str, wrapper: &[&str]) -> Self {
        Self::start_via_env(dir, config_body, wrapper, &[])
    }

    /// Like [`Daemon::start_via`], with `env` added to the daemon's
    /// environment (e.g. a short log window, `KEYHOLDER_LOG_WINDOW_MS`).
    pub fn start_via_env(
        dir: &TempDir,
        config_body: &str,
        wrapper: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let config = dir.join("keyholder.toml");
        std::fs::write(&config, config_body).unwrap();
        let socket = dir.join("proxy.sock");
        let log = dir.join("daemon.log");
        let logfile = std::fs::File::create(&log).unwrap();
        let (program, args) = wrapper.split_first().unwrap_or((&KEYHOLDER, &[]));
        let mut command = Command::new(program);
        if !wrapper.is_empty() {
            command.args(args).arg(KEYHOLDER);
        }
        let child = spawn(
            command
                .args(["daemon", "--log", "stderr", "--config"])
                .arg(&config)
                .env("KEYHOLDER_LOG_LEVEL", "debug")
                .envs(env.iter().copied())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(logfile),
        );
        let mut d = Self {
            socket,
            config,
            log,
            child: Some(child),
        };
        let up = wait_for(Duration::from_secs(15), || {
            UnixStream::connect(&d.socket).is_ok()
        });
        if !up {
            let status = d.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            panic!("daemon did not start ({status:?}):\n{}", d.log_text());
        }
        d
    }

    /// Whether the daemon process is still running.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// How many log lines contain `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        self.log_text()
            .lines()
            .filter(|l| l.contains(needle))
            .count()
    }
}

/// A `/proc/PID/status` memory field (`VmRSS`, `VmLck`, …) in KiB.
pub fn proc_kib(pid: u32, field: &str) -> u64 {
    read_kib(pid, field).unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Starts the test binary again as `who`, running only the test `helper`
/// (which does nothing unless it finds its environment), with `env` set and
/// stdin/stdout piped: the helper reports on stdout and may wait for its
/// stdin to close before exiting.
pub fn spawn_helper_as(who: &As, helper: &str, env: &[(&str, String)]) -> Child {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = who.command(exe.to_str().unwrap());
    cmd.args(["--exact", helper, "--nocapture", "--test-threads=1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (k, v) in env {
        cmd.env(k, v);
    }
    spawn(&mut cmd)
}

/// Reads `child`'s stdout until a line containing `prefix`; returns the
/// rest of that line. Panics if the child ends first.
pub fn read_line_with(child: &mut Child, prefix: &str) -> String {
    let out = child.stdout.as_mut().expect("piped stdout");
    let mut seen = String::new();
    loop {
        // Byte by byte, so nothing after the line is consumed.
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        loop {
            match out.read(&mut byte) {
                Ok(1) if byte[0] == b'\n' => break,
                Ok(1) => line.push(byte[0]),
                _ => panic!("helper ended before printing {prefix}:\n{seen}"),
            }
        }
        let line = String::from_utf8_lossy(&line).into_owned();
        // libtest may print "test NAME ... " on the same line first.
        if let Some((_, rest)) = line.split_once(prefix) {
            return rest.to_owned();
        }
        seen.push_str(&line);
        seen.push('\n');
    }
}

/// The daemon's VmRSS (KiB) once it has stopped moving (two readings 200 ms
/// apart within 256 KiB of each other, or after 10 s).
pub fn settled_rss(pid: u32) -> u64 {
    let mut last = proc_kib(pid, "VmRSS");
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(200));
        let now = proc_kib(pid, "VmRSS");
        if now.abs_diff(last) < 256 {
            return now;
        }
        last = now;
    }
    last
}
