//! The one test fixture: a deployment host in miniature, declared with
//! [`Site::builder`] and made by [`SiteBuilder::build`].
//!
//! A site is a directory with key files, throwaway `kht-` groups and users,
//! a place holding the keys (an OpenSSH `ssh-agent` the site or the test
//! starts, one the daemon spawns, or the daemon itself: the builtin backend
//! or one given by its `[agent]` table), a `keyholder daemon` in front of
//! it (or several, one after the other, with [`Site::start_daemon`]) and,
//! on demand, an `sshd`:
//!
//! ```ignore
//! let s = Site::builder("h", backend)
//!     .group("dep")
//!     .user("member", &["dep"])
//!     .key(SiteKey::new("deploy", "ed25519").groups(&["dep"]))
//!     .key(SiteKey::new("stray", "ed25519").stray())
//!     .extra("[limits]\nlookup_cache_secs = 0\n")
//!     .build();
//! assert_eq!(s.listed(&s.as_user("member")), s.expect(&["deploy"]));
//! ```
//!
//! Group names in a key's `groups` are the labels of declared groups; a
//! label that was not declared is used as a group name as it is (`root`).
//! In any TOML of the site, `{user:LABEL}` and `{group:LABEL}` become the
//! names of the declared user and group, and `{dir}` the site's directory.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{
    keygen, pubkey_blob, run, sign_request, stderr, userauth_data, wait_for, Agent, As, Backend,
    Daemon, Sshd, TempDir, TestGroup, TestUser,
};

/// One key of a site: generated with `ssh-keygen` (or only a public key
/// line, [`SiteKey::public`]), and (unless stray) configured with a
/// `[keys.NAME]` table.
#[derive(Clone, Debug)]
pub struct SiteKey {
    pub name: String,
    pub kind: String,
    bits: String,
    passphrase: String,
    groups: Vec<String>,
    lines: String,
    configured: bool,
    added: bool,
    /// Only this public key line, written to NAME.pub (no private key).
    public: Option<String>,
}

impl SiteKey {
    /// A key `name` of ssh-keygen type `kind`, no passphrase, default size,
    /// no groups, configured and added to the agent.
    pub fn new(name: &str, kind: &str) -> Self {
        Self {
            name: name.to_owned(),
            kind: kind.to_owned(),
            bits: String::new(),
            passphrase: String::new(),
            groups: Vec::new(),
            lines: String::new(),
            configured: true,
            added: true,
            public: None,
        }
    }

    /// A key whose only file is NAME.pub holding `line` (a key held
    /// elsewhere, e.g. on a token); never added by the site.
    pub fn public(name: &str, line: &str) -> Self {
        Self {
            public: Some(line.trim().to_owned()),
            added: false,
            ..Self::new(name, "")
        }
    }

    /// `ssh-keygen -b BITS`.
    pub fn bits(mut self, bits: &str) -> Self {
        self.bits = bits.to_owned();
        self
    }

    /// Encrypted with `passphrase` (empty: none).
    pub fn passphrase(mut self, passphrase: &str) -> Self {
        self.passphrase = passphrase.to_owned();
        self
    }

    /// The groups (labels) that may use the key.
    pub fn groups(mut self, groups: &[&str]) -> Self {
        self.groups = groups.iter().map(|g| (*g).to_owned()).collect();
        self
    }

    /// More lines of the key's table (`certificate = …`, rules); `{user:LABEL}`
    /// and `{group:LABEL}` there (and in any TOML of the site) become the
    /// name of the user or group declared as LABEL, and `{dir}` the site's
    /// directory.
    pub fn lines(mut self, lines: &str) -> Self {
        self.lines = lines.to_owned();
        self
    }

    /// In the agent, but not in the configuration.
    pub fn stray(mut self) -> Self {
        self.configured = false;
        self
    }

    /// Not added to the agent by the site (the test adds or arms it).
    pub fn unadded(mut self) -> Self {
        self.added = false;
        self
    }
}

/// Where the keys are held.
#[derive(Clone, Debug)]
enum Holder {
    /// [`Agent::new`]: an ssh-agent started by the site (upstream), or the
    /// daemon's own agent.socket (builtin).
    Own,
    /// `spawn = true`: the daemon starts the ssh-agent (upstream only;
    /// builtin is the daemon itself).
    Spawned,
    /// An ssh-agent the test started at this socket.
    External(PathBuf),
    /// A backend inside the daemon with this `[agent]` table (and its
    /// agent.socket at `dir/agent.sock`).
    Table(String),
}

/// The declaration of a [`Site`].
pub struct SiteBuilder {
    tag: String,
    backend: Backend,
    holder: Holder,
    dir: Option<TempDir>,
    key_subdir: Option<String>,
    keys: Vec<SiteKey>,
    groups: Vec<String>,
    users: Vec<(String, Vec<String>)>,
    top: String,
    extra: String,
    wrapper: Vec<String>,
    env: Vec<(String, String)>,
    add_keys: bool,
    daemon: bool,
}

/// A built site. The daemon is `None` only with [`SiteBuilder::no_daemon`]
/// (start one or more with [`Site::start_daemon`]).
pub struct Site {
    pub dir: TempDir,
    /// The configured `key_dir`.
    pub key_dir: PathBuf,
    pub agent: Agent,
    pub daemon: Option<Daemon>,
    pub sshd: Option<Sshd>,
    pub backend: Backend,
    /// Whether the daemon starts what holds the keys (spawned ssh-agent,
    /// or a backend of its own).
    spawned: bool,
    table: Option<String>,
    keys: Vec<SiteKey>,
    groups: Vec<(String, TestGroup)>,
    users: Vec<(String, TestUser)>,
    top: String,
    extra: String,
    wrapper: Vec<String>,
    env: Vec<(String, String)>,
    add_keys: bool,
}

impl SiteBuilder {
    /// The keys are held by an external ssh-agent at `socket` (upstream).
    pub fn external_agent(mut self, socket: &Path) -> Self {
        self.holder = Holder::External(socket.to_owned());
        self
    }

    /// The daemon spawns its ssh-agent (`spawn = true`; upstream only).
    pub fn spawned_agent(mut self) -> Self {
        self.holder = Holder::Spawned;
        self
    }

    /// The daemon holds the keys in a backend of its own configured by
    /// `table` (the whole `[agent]` table; `{dir}` is the site's directory),
    /// serving agent.socket at `dir/agent.sock`. For a backend
    /// [`Backend`] does not name (give `Backend::Builtin` to the builder:
    /// the keys are in the daemon).
    pub fn agent_table(mut self, table: &str) -> Self {
        self.holder = Holder::Table(table.to_owned());
        self
    }

    /// Builds in `dir` instead of a new temporary directory.
    pub fn in_dir(mut self, dir: TempDir) -> Self {
        self.dir = Some(dir);
        self
    }

    /// Key files in `dir/SUB` (the `key_dir`), instead of `dir` itself.
    pub fn key_subdir(mut self, sub: &str) -> Self {
        self.key_subdir = Some(sub.to_owned());
        self
    }

    pub fn key(mut self, key: SiteKey) -> Self {
        self.keys.push(key);
        self
    }

    /// Keys `(name, kind)` usable by `groups`.
    pub fn keys(mut self, keys: &[(&str, &str)], groups: &[&str]) -> Self {
        for (name, kind) in keys {
            self.keys.push(SiteKey::new(name, kind).groups(groups));
        }
        self
    }

    /// A throwaway group, known by `label`.
    pub fn group(mut self, label: &str) -> Self {
        self.groups.push(label.to_owned());
        self
    }

    /// A throwaway user known by `label`, member of the groups `groups` (labels).
    pub fn user(mut self, label: &str, groups: &[&str]) -> Self {
        self.users.push((
            label.to_owned(),
            groups.iter().map(|g| (*g).to_owned()).collect(),
        ));
        self
    }

    /// Top-level TOML lines.
    pub fn top(mut self, top: &str) -> Self {
        self.top.push_str(top);
        self.top.push('\n');
        self
    }

    /// TOML tables after the keys (`[limits]`, `[certificates]`, …).
    pub fn extra(mut self, extra: &str) -> Self {
        self.extra.push_str(extra);
        self.extra.push('\n');
        self
    }

    /// Runs the daemon through `wrapper` (see [`Daemon::start_via`]).
    pub fn wrapper(mut self, wrapper: &[&str]) -> Self {
        self.wrapper = wrapper.iter().map(|w| (*w).to_owned()).collect();
        self
    }

    /// Adds `NAME=VALUE` to the daemon's environment.
    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Adds no key to the agent (the test adds or arms them).
    pub fn unadded(mut self) -> Self {
        self.add_keys = false;
        self
    }

    /// Builds without starting a daemon.
    pub fn no_daemon(mut self) -> Self {
        self.daemon = false;
        self
    }

    /// Generates the keys, creates the groups and users, starts the agent
    /// and the daemon, and adds the keys to the agent (an external or own
    /// ssh-agent: before the daemon starts; the builtin backend or a
    /// spawned agent: once the daemon serves it).
    pub fn build(self) -> Site {
        let dir = self.dir.unwrap_or_else(|| TempDir::new(&self.tag));
        let key_dir = match &self.key_subdir {
            Some(sub) => {
                let p = dir.join(sub);
                std::fs::create_dir_all(&p).unwrap();
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
                p
            }
            None => dir.path().to_owned(),
        };
        for k in &self.keys {
            match &k.public {
                Some(line) => {
                    let path = key_dir.join(format!("{}.pub", k.name));
                    std::fs::write(&path, format!("{line}\n")).unwrap();
                    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))
                        .unwrap();
                }
                None => {
                    keygen_full(&key_dir, &k.name, &k.kind, &k.bits, &k.passphrase);
                }
            }
        }
        let groups: Vec<(String, TestGroup)> = self
            .groups
            .iter()
            .map(|label| (label.clone(), TestGroup::create(&short(label))))
            .collect();
        let users: Vec<(String, TestUser)> = self
            .users
            .iter()
            .map(|(label, member_of)| {
                let of: Vec<&TestGroup> = member_of
                    .iter()
                    .map(|g| {
                        &groups
                            .iter()
                            .find(|(l, _)| l == g)
                            .unwrap_or_else(|| panic!("no group {g} declared"))
                            .1
                    })
                    .collect();
                (label.clone(), TestUser::create(&short(label), &of))
            })
            .collect();
        let (agent, spawned) = match (&self.holder, self.backend) {
            (Holder::External(socket), _) => (
                Agent {
                    socket: socket.clone(),
                    backend: Backend::Upstream,
                    child: None,
                },
                false,
            ),
            (Holder::Spawned, Backend::Upstream) | (Holder::Table(_), _) => (
                Agent {
                    socket: dir.join("agent.sock"),
                    backend: self.backend,
                    child: None,
                },
                true,
            ),
            (_, backend) => (Agent::new(&dir, backend), false),
        };
        let table = match self.holder {
            Holder::Table(table) => Some(table),
            _ => None,
        };
        let mut site = Site {
            table,
            dir,
            key_dir,
            agent,
            daemon: None,
            sshd: None,
            backend: self.backend,
            spawned,
            keys: self.keys,
            groups,
            users,
            top: self.top,
            extra: self.extra,
            wrapper: self.wrapper,
            env: self.env,
            add_keys: self.add_keys,
        };
        if !site.served_by_daemon() {
            site.add_keys();
        }
        if self.daemon {
            site.daemon = Some(site.start_daemon(""));
        }
        site
    }
}

/// A tag for a user or group name from a label (names stay short).
fn short(label: &str) -> String {
    label
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(4)
        .collect()
}

/// `ssh-keygen` of `kind` (with `-b bits` unless empty, `-N passphrase`).
pub fn keygen_full(dir: &Path, name: &str, kind: &str, bits: &str, passphrase: &str) -> PathBuf {
    if bits.is_empty() {
        return keygen(dir, name, kind, passphrase);
    }
    let path = dir.join(name);
    let o = run(std::process::Command::new("ssh-keygen")
        .args([
            "-q", "-t", kind, "-b", bits, "-N", passphrase, "-C", name, "-f",
        ])
        .arg(&path));
    assert!(o.status.success(), "ssh-keygen: {}", stderr(&o));
    std::fs::set_permissions(
        dir.join(format!("{name}.pub")),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    path
}

/// `SHA256:…` of a public key file.
pub fn fingerprint(pub_file: &Path) -> String {
    let text = std::fs::read_to_string(pub_file).unwrap();
    let key = ssh_key::PublicKey::from_openssh(text.trim()).unwrap();
    key.fingerprint(ssh_key::HashAlg::Sha256).to_string()
}

/// `TYPE BASE64` of a public key line (no comment).
pub fn first_two(line: &str) -> String {
    line.split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

impl Site {
    /// A site whose keys `backend` holds, its directory tagged `tag`.
    pub fn builder(tag: &str, backend: Backend) -> SiteBuilder {
        SiteBuilder {
            tag: tag.to_owned(),
            backend,
            holder: Holder::Own,
            dir: None,
            key_subdir: None,
            keys: Vec::new(),
            groups: Vec::new(),
            users: Vec::new(),
            top: String::new(),
            extra: String::new(),
            wrapper: Vec::new(),
            env: Vec::new(),
            add_keys: true,
            daemon: true,
        }
    }

    /// Whether the keys live in something the daemon starts.
    fn served_by_daemon(&self) -> bool {
        self.backend == Backend::Builtin || self.spawned
    }

    /// The `[agent]` table.
    fn agent_toml(&self) -> String {
        if let Some(table) = &self.table {
            table.clone()
        } else if self.spawned {
            format!(
                "[agent]\nsocket = \"{}\"\nspawn = true\n",
                self.agent.socket.display()
            )
        } else {
            self.backend.agent_toml(&self.agent.socket)
        }
    }

    /// The daemon's configuration, with `more` TOML tables at the end.
    pub fn config_text(&self, more: &str) -> String {
        self.config_full(&self.top, &[], more)
    }

    /// [`Site::config_text`] with `top` instead of the builder's top-level lines.
    pub fn config_with(&self, top: &str, more: &str) -> String {
        self.config_full(top, &[], more)
    }

    /// [`Site::config_text`] with `top` instead of the builder's top-level
    /// lines and `(key, lines)` added to those keys' tables.
    pub fn config_full(&self, top: &str, key_lines: &[(&str, &str)], more: &str) -> String {
        let mut body = format!(
            "socket = \"{}\"\nkey_dir = \"{}\"\nlog = \"stderr\"\n{}\n{}\n",
            self.dir.join("proxy.sock").display(),
            self.key_dir.display(),
            top,
            self.agent_toml()
        );
        for k in self.keys.iter().filter(|k| k.configured) {
            let groups = k
                .groups
                .iter()
                .map(|g| format!("\"{}\"", self.group_name(g)))
                .collect::<Vec<_>>()
                .join(", ");
            let added: String = key_lines
                .iter()
                .filter(|(name, _)| *name == k.name)
                .map(|(_, lines)| format!("{lines}\n"))
                .collect();
            body.push_str(&format!(
                "[keys.{}]\ngroups = [{groups}]\n{}\n{added}\n",
                k.name, k.lines
            ));
        }
        body.push_str(&self.extra);
        body.push_str(more);
        body = body.replace("{dir}", &self.dir.path().display().to_string());
        for (label, user) in &self.users {
            body = body.replace(&format!("{{user:{label}}}"), &user.name);
        }
        for (label, group) in &self.groups {
            body = body.replace(&format!("{{group:{label}}}"), &group.name);
        }
        body
    }

    /// Starts a daemon on [`Site::config_text`] with `more` (the builder's
    /// wrapper and environment), waits for the builtin agent.socket or the
    /// spawned agent, and adds the keys if the daemon holds them.
    pub fn start_daemon(&self, more: &str) -> Daemon {
        self.start_daemon_on(&self.config_text(more))
    }

    /// Starts a daemon on the configuration `body` (see [`Site::start_daemon`]).
    pub fn start_daemon_on(&self, body: &str) -> Daemon {
        let wrapper: Vec<&str> = self.wrapper.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        self.start_daemon_via(body, &wrapper, &env)
    }

    /// Starts a daemon on the configuration `body` through `wrapper` (see
    /// [`Daemon::start_via`]) with `env`; otherwise as [`Site::start_daemon`].
    pub fn start_daemon_via(&self, body: &str, wrapper: &[&str], env: &[(&str, &str)]) -> Daemon {
        let d = Daemon::start_via_env(&self.dir, body, wrapper, env);
        if self.served_by_daemon() {
            assert!(
                wait_for(Duration::from_secs(10), || UnixStream::connect(
                    &self.agent.socket
                )
                .is_ok()),
                "no agent socket {}:\n{}",
                self.agent.socket.display(),
                d.log_text()
            );
            self.add_keys();
        }
        d
    }

    /// Adds the keys to be added (see [`SiteKey::unadded`]) to the agent.
    pub fn add_keys(&self) {
        if !self.add_keys {
            return;
        }
        for k in self.keys.iter().filter(|k| k.added) {
            self.agent.add(&self.key(&k.name));
        }
    }

    /// The daemon started by [`SiteBuilder::build`].
    pub fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().expect("a site built with a daemon")
    }

    pub fn daemon_mut(&mut self) -> &mut Daemon {
        self.daemon.as_mut().expect("a site built with a daemon")
    }

    /// The configuration file's path.
    pub fn config(&self) -> &str {
        self.daemon().config.to_str().unwrap()
    }

    /// The proxy socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("proxy.sock")
    }

    /// Where the keys are held (ssh-agent socket or builtin agent.socket).
    pub fn agent_socket(&self) -> PathBuf {
        self.agent.socket.clone()
    }

    /// The group declared as `label`.
    pub fn group(&self, label: &str) -> &TestGroup {
        &self
            .groups
            .iter()
            .find(|(l, _)| l == label)
            .unwrap_or_else(|| panic!("no group {label}"))
            .1
    }

    /// A group's name: a declared group's, or `label` itself.
    pub fn group_name(&self, label: &str) -> String {
        self.groups
            .iter()
            .find(|(l, _)| l == label)
            .map_or_else(|| label.to_owned(), |(_, g)| g.name.clone())
    }

    /// The user declared as `label`.
    pub fn user(&self, label: &str) -> &TestUser {
        &self
            .users
            .iter()
            .find(|(l, _)| l == label)
            .unwrap_or_else(|| panic!("no user {label}"))
            .1
    }

    /// Runs as the user declared as `label`.
    pub fn as_user(&self, label: &str) -> As {
        self.user(label).as_user()
    }

    /// A key's private key file.
    pub fn key(&self, name: &str) -> PathBuf {
        self.key_dir.join(name)
    }

    /// A key's public key file.
    pub fn pub_path(&self, name: &str) -> PathBuf {
        self.key_dir.join(format!("{name}.pub"))
    }

    /// `TYPE BASE64` of a key.
    pub fn pubkey(&self, name: &str) -> String {
        first_two(&std::fs::read_to_string(self.pub_path(name)).unwrap())
    }

    /// The wire blob of a key.
    pub fn blob(&self, name: &str) -> Vec<u8> {
        pubkey_blob(&self.pub_path(name))
    }

    /// The wire blobs of keys, sorted.
    pub fn blobs(&self, names: &[&str]) -> Vec<Vec<u8>> {
        let mut v: Vec<_> = names.iter().map(|n| self.blob(n)).collect();
        v.sort();
        v
    }

    /// `SHA256:…` of a key.
    pub fn fingerprint(&self, name: &str) -> String {
        fingerprint(&self.pub_path(name))
    }

    /// A sign request for an ed25519 key over user-auth data for `deploy`.
    pub fn sign_msg(&self, name: &str) -> Vec<u8> {
        let blob = self.blob(name);
        sign_request(&blob, &userauth_data(&blob, "deploy", "ssh-ed25519"), 0)
    }

    /// What the agent (or builtin agent.socket) holds, `ssh-add -L` as
    /// root, without comments, sorted: what "unchanged" is checked against.
    pub fn held(&self) -> Vec<String> {
        let mut v: Vec<String> = self.agent.keys().iter().map(|l| first_two(l)).collect();
        v.sort();
        v
    }

    /// The keys `names`, as [`Site::held`] and [`Site::listed`] show them.
    pub fn expect(&self, names: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = names.iter().map(|n| self.pubkey(n)).collect();
        v.sort();
        v
    }

    /// Keys listed through the proxy for `who`, without comments, sorted.
    pub fn listed(&self, who: &As) -> Vec<String> {
        let mut v: Vec<String> = self
            .daemon()
            .listed(who)
            .iter()
            .map(|l| first_two(l))
            .collect();
        v.sort();
        v
    }

    /// Starts the site's `sshd` with `extra` sshd_config lines.
    pub fn start_sshd(&mut self, extra: &str) -> &Sshd {
        self.sshd.insert(Sshd::start_with(&self.dir, extra))
    }

    /// The site's `sshd`.
    pub fn sshd(&self) -> &Sshd {
        self.sshd.as_ref().expect("a site with an sshd")
    }
}
