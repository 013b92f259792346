//! End-to-end tests of what an operator's mistakes and a hostile local
//! user's files can do to a running daemon (nothing), and of the audit line
//! telling how each sign request ended: real `ssh-agent`, real `ssh-add`,
//! real throwaway users, the real `keyholder` binary.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;

raw_client_helper!();

/// The audit lines (`sign …`, `admin …`) of a daemon log.
fn audit_lines(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains(" sign user=") || l.contains(" admin user="))
        .collect()
}

/// A sign request for the key in `pub_path`, as ssh would send it.
fn userauth_sign(pub_path: &Path) -> Vec<u8> {
    let blob = pubkey_blob(pub_path);
    sign_request(&blob, &userauth_data(&blob, "deploy", "ssh-ed25519"), 0)
}

#[test]
fn an_allowed_sign_that_fails_upstream_is_logged_failed_never_granted() {
    require_root!();
    // Configured and allowed (root may use every key), but not armed.
    let mut site = Site::builder("au", Backend::Upstream)
        .key(
            SiteKey::new("deploy", "ed25519")
                .groups(&["root"])
                .unadded(),
        )
        .extra("[limits]\nupstream_timeout_secs = 1\n")
        .build();
    let daemon = site.daemon.take().unwrap();
    let (dir, agent) = (&site.dir, &site.agent);
    let sign = userauth_sign(&dir.join("deploy.pub"));
    let mut raw = Raw::connect(&daemon.socket);

    // 1. The agent does not hold the key: it answers FAILURE.
    assert_eq!(raw.call(&sign), Some(vec![FAILURE]));
    assert!(daemon.wait_log("decision=failed reason=upstream-error"));

    // 2. Armed: granted, and the line says so only now.
    agent.add(&dir.join("deploy"));
    let answer = raw.call(&sign).expect("answer");
    assert_eq!(answer.first(), Some(&SIGN_RESPONSE));
    assert!(daemon.wait_log("decision=granted"));

    // 3. The agent hangs: the answer times out.
    let agent_pid = nix::unistd::Pid::from_raw(agent.pid() as i32);
    nix::sys::signal::kill(agent_pid, Signal::SIGSTOP).unwrap();
    assert_eq!(raw.call(&sign), Some(vec![FAILURE]));
    nix::sys::signal::kill(agent_pid, Signal::SIGCONT).unwrap();
    assert!(daemon.wait_log("decision=failed reason=upstream-timeout"));

    // 4. The agent is gone: unreachable.
    site.agent.stop();
    let mut raw = Raw::connect(&daemon.socket);
    assert_eq!(raw.call(&sign), Some(vec![FAILURE]));
    assert!(wait_for(Duration::from_secs(10), || {
        daemon
            .log_text()
            .matches("decision=failed reason=upstream-error")
            .count()
            == 2
    }));

    // One line per request, in order, each with every field of
    // `docs/reference.md`, "Audit log".
    let log = daemon.log_text();
    let lines = audit_lines(&log);
    assert_eq!(lines.len(), 4, "{log}");
    let ends = [
        "decision=failed reason=upstream-error",
        "decision=granted reason=root",
        "decision=failed reason=upstream-timeout",
        "decision=failed reason=upstream-error",
    ];
    for (line, end) in lines.iter().zip(ends) {
        assert!(line.ends_with(end), "{line}");
        let fields: Vec<&str> = line
            .split(" sign ")
            .nth(1)
            .unwrap_or_default()
            .split(' ')
            .map(|f| f.split('=').next().unwrap_or_default())
            .collect();
        assert_eq!(
            fields,
            [
                "user",
                "uid",
                "pid",
                "key",
                "fingerprint",
                "remote_user",
                "dest",
                "forwarded",
                "serial",
                "grant",
                "decision",
                "reason"
            ],
            "{line}"
        );
        assert!(line.contains(" dest=- forwarded=no serial=- "), "{line}");
    }
}

/// Runs `keyholder daemon` on `config` to its end (killed after 20 s, so a
/// second daemon that wrongly keeps running fails the test rather than
/// hanging it); returns its exit code and stderr.
fn daemon_run(config: &Path) -> (Option<i32>, String) {
    // stderr to a file, not a pipe: an agent a broken daemon left behind
    // would hold a pipe open.
    let log = config.with_file_name(format!("{}.log", unique("run")));
    let mut child = std::process::Command::new(KEYHOLDER)
        .args(["daemon", "--log", "stderr", "--config"])
        .arg(config)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let exited = wait_for(Duration::from_secs(20), || {
        matches!(child.try_wait(), Ok(Some(_)))
    });
    if !exited {
        let _ = child.kill();
    }
    let status = child.wait().unwrap();
    (
        status.code(),
        std::fs::read_to_string(&log).unwrap_or_default(),
    )
}

#[test]
fn a_second_daemon_exits_and_the_first_keeps_serving_with_its_agent() {
    require_root!();
    // The daemon spawns its agent; the key is not added yet.
    let site = Site::builder("2nd", Backend::Upstream)
        .spawned_agent()
        .key(
            SiteKey::new("deploy", "ed25519")
                .groups(&["root"])
                .unadded(),
        )
        .build();
    let (first, agent_sock, key) = (site.daemon(), site.agent_socket(), site.key("deploy"));
    // Armed by hand against the spawned agent.
    let o = run(std::process::Command::new("ssh-add")
        .arg(&key)
        .env("SSH_AUTH_SOCK", &agent_sock));
    assert!(o.status.success(), "{}", stderr(&o));
    let agent_inode =
        || std::os::unix::fs::MetadataExt::ino(&std::fs::symlink_metadata(&agent_sock).unwrap());
    let proxy_inode =
        || std::os::unix::fs::MetadataExt::ino(&std::fs::symlink_metadata(&first.socket).unwrap());
    let (agent_before, proxy_before) = (agent_inode(), proxy_inode());

    let (code, err) = daemon_run(&first.config);
    assert_eq!(code, Some(1), "{err}");
    // It spawned no agent, and touched neither socket.
    assert!(!err.contains("upstream agent"), "{err}");
    assert_eq!(agent_inode(), agent_before, "agent socket replaced: {err}");
    assert_eq!(proxy_inode(), proxy_before);
    assert!(
        err.contains(&format!("already running (pid {})", first.pid())),
        "{err}"
    );

    // The first daemon still lists and signs with the armed key.
    assert_eq!(first.listed(&As::Root).len(), 1);
    let mut raw = Raw::connect(&first.socket);
    let answer = raw.call(&userauth_sign(&key.with_file_name("deploy.pub")));
    assert_eq!(answer.and_then(|a| a.first().copied()), Some(SIGN_RESPONSE));
    let o = run(std::process::Command::new("ssh-add")
        .arg("-l")
        .env("SSH_AUTH_SOCK", &agent_sock));
    assert!(o.status.success(), "agent lost its key: {}", stdout(&o));
    assert_eq!(first.log_count("upstream agent exited"), 0);
}

#[test]
fn an_agent_left_answering_on_agent_socket_is_never_replaced() {
    require_root!();
    let site = Site::builder("2ag", Backend::Upstream)
        .spawned_agent()
        .key(
            SiteKey::new("deploy", "ed25519")
                .groups(&["root"])
                .unadded(),
        )
        .no_daemon()
        .build();
    let (dir, agent_sock, key) = (&site.dir, site.agent_socket(), site.key("deploy"));
    let config = site.config_text("");
    // An agent some other process runs on the path a spawning config names
    // (a daemon whose proxy socket was removed by hand, say).
    let other = Agent::start(dir);
    assert_eq!(other.socket, agent_sock);
    other.add(&key);
    let config_path = dir.join("keyholder.toml");
    std::fs::write(&config_path, config).unwrap();
    let (code, err) = daemon_run(&config_path);
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(other.keys().len(), 1, "the agent lost its key: {err}");
    assert!(
        err.contains(&format!("already running (pid {})", other.pid())),
        "{err}"
    );
    assert!(!dir.join("proxy.sock").exists());
}

#[test]
fn a_socket_directory_others_can_write_is_refused() {
    require_root!();
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("sd");
    let agent = Agent::start(&dir);
    let owner = TestUser::create("sd", &[]);
    let cases: [(&str, u32, Option<u32>); 4] = [
        ("open", 0o777, None),
        ("sticky", 0o1777, None),
        ("groupw", 0o775, None),
        ("theirs", 0o755, Some(owner.uid())),
    ];
    for (name, mode, uid) in cases {
        let sub = dir.join(name);
        std::fs::create_dir(&sub).unwrap();
        std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(mode)).unwrap();
        if let Some(uid) = uid {
            nix::unistd::chown(&sub, Some(nix::unistd::Uid::from_raw(uid)), None).unwrap();
        }
        let socket = sub.join("proxy.sock");
        // As the proxy socket's directory, with an external agent.
        let config = dir.join(&format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "socket = \"{}\"\nlog = \"stderr\"\n[agent]\nsocket = \"{}\"\nspawn = false\n",
                socket.display(),
                agent.socket.display()
            ),
        )
        .unwrap();
        let (code, err) = daemon_run(&config);
        assert_eq!(code, Some(1), "{name}: {err}");
        assert!(!socket.exists(), "{name}: socket created");
        assert!(
            err.contains(&format!("socket directory {}", sub.display()))
                && err.contains("writable by others than root"),
            "{name}: {err}"
        );
        // As a spawned agent's directory (the proxy's own is fine).
        let agent_socket = sub.join("agent.sock");
        let config = dir.join(&format!("{name}-spawn.toml"));
        std::fs::write(
            &config,
            format!(
                "socket = \"{}\"\nlog = \"stderr\"\n[agent]\nsocket = \"{}\"\nspawn = true\n",
                dir.join(&format!("{name}.sock")).display(),
                agent_socket.display()
            ),
        )
        .unwrap();
        let (code, err) = daemon_run(&config);
        assert_eq!(code, Some(1), "{name} (spawn): {err}");
        assert!(!agent_socket.exists(), "{name}: agent socket created");
        assert!(
            err.contains(&format!("agent.socket directory {}", sub.display())),
            "{name} (spawn): {err}"
        );
    }
}

/// `keyholder check-config --config CONFIG` as root: exit code and stdout + stderr.
fn check_config(config: &Path) -> (Option<i32>, String) {
    let o = keyholder(
        &As::Root,
        &["check-config", "--config", config.to_str().unwrap()],
    );
    (o.status.code(), format!("{}{}", stdout(&o), stderr(&o)))
}

#[test]
fn a_public_key_file_others_can_write_is_refused_naming_it() {
    require_root!();
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("pw");
    let agent = Agent::start(&dir);
    keygen(dir.path(), "deploy", "ed25519", "");
    let pubfile = dir.join("deploy.pub");
    let config = dir.join("keyholder.toml");
    std::fs::write(
        &config,
        Daemon::config(&dir, &agent.socket, "[keys.deploy]\ngroups = [\"root\"]\n"),
    )
    .unwrap();
    // Loads (the key file itself, unencrypted, is another matter).
    let (_, out) = check_config(&config);
    assert!(out.contains(": loaded: 1 key(s)"), "{out}");
    let owner = TestUser::create("pw", &[]);
    for (mode, uid) in [(0o664, 0), (0o646, 0), (0o644, owner.uid())] {
        std::fs::set_permissions(&pubfile, std::fs::Permissions::from_mode(mode)).unwrap();
        nix::unistd::chown(&pubfile, Some(nix::unistd::Uid::from_raw(uid)), None).unwrap();
        let (code, out) = check_config(&config);
        assert_eq!(code, Some(1), "{mode:o} {uid}: {out}");
        assert!(
            out.contains(&format!("public key {}", pubfile.display())),
            "{out}"
        );
        let (code, err) = daemon_run(&config);
        assert_eq!(code, Some(1), "{mode:o} {uid}: {err}");
        assert!(
            err.contains(&format!("public key {}", pubfile.display())),
            "{err}"
        );
        assert!(!dir.join("proxy.sock").exists());
    }
}

#[test]
fn a_config_file_not_owned_by_root_or_writable_by_others_is_refused() {
    require_root!();
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("cw");
    let agent = Agent::start(&dir);
    let config = dir.join("keyholder.toml");
    std::fs::write(&config, Daemon::config(&dir, &agent.socket, "")).unwrap();
    let owner = TestUser::create("cw", &[]);
    let link = dir.join("link.toml");
    std::os::unix::fs::symlink(&config, &link).unwrap();
    for (mode, uid, path) in [
        (0o644, owner.uid(), &config),
        (0o664, 0, &config),
        (0o602, 0, &config),
        (0o644, 0, &link),
    ] {
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(mode)).unwrap();
        nix::unistd::chown(&config, Some(nix::unistd::Uid::from_raw(uid)), None).unwrap();
        let (code, out) = check_config(path);
        assert_eq!(code, Some(1), "{mode:o} {uid}: {out}");
        assert!(out.contains(&path.display().to_string()), "{out}");
        let (code, err) = daemon_run(path);
        assert_eq!(code, Some(1), "{mode:o} {uid}: {err}");
        assert!(
            err.contains(&format!("keyholder: {}: ", path.display())),
            "{err}"
        );
        assert!(!dir.join("proxy.sock").exists());
    }
}

#[test]
fn a_fifo_as_config_on_sighup_never_blocks_the_daemon() {
    require_root!();
    let site = Site::builder("ff", Backend::Upstream)
        .keys(&[("deploy", "ed25519")], &["root"])
        .build();
    let (dir, d) = (&site.dir, site.daemon());
    let good = std::fs::read_to_string(&d.config).unwrap();
    assert_eq!(d.listed(&As::Root).len(), 1);

    std::fs::remove_file(&d.config).unwrap();
    nix::unistd::mkfifo(&d.config, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
    d.signal(Signal::SIGHUP);
    d.signal(Signal::SIGHUP);
    std::thread::sleep(Duration::from_millis(300));
    // Still serving, with the last good configuration, new connections too.
    let mut raw = Raw::connect(&d.socket);
    let answer = raw.call(&[11]).expect("the daemon answers after SIGHUP");
    assert_eq!(listed_blobs(&answer).map(|b| b.len()), Some(1));
    assert_eq!(d.listed(&As::Root).len(), 1);
    assert!(
        d.wait_log("is a FIFO, not a regular file"),
        "{}",
        d.log_text()
    );
    assert!(d
        .log_text()
        .contains("reload failed, keeping the last good configuration"));

    // A good file again: the next SIGHUP applies it.
    std::fs::remove_file(&d.config).unwrap();
    std::fs::write(&d.config, good.replace("[keys.deploy]", "[keys.other]")).unwrap();
    std::fs::copy(dir.join("deploy.pub"), dir.join("other.pub")).unwrap();
    d.signal(Signal::SIGHUP);
    assert!(d.wait_log("configuration reloaded"), "{}", d.log_text());
    assert!(d.log_text().contains("1 key(s): other"), "{}", d.log_text());
}

#[test]
fn a_fifo_or_a_writable_file_as_the_ca_pub_is_refused_at_once_and_a_later_reload_applies() {
    require_root!();
    let site = Site::builder("cf", Backend::Upstream)
        .keys(&[("deploy", "ed25519")], &["root"])
        .key(SiteKey::new("ca", "ed25519").stray().unadded())
        .extra("[certificates]\nca = \"ca\"\n")
        .build();
    let (dir, agent, d) = (&site.dir, &site.agent, site.daemon());
    assert_eq!(d.listed(&As::Root).len(), 1);
    let before = agent.keys();
    let ca_pub = dir.join("ca.pub");
    let good = std::fs::read_to_string(&ca_pub).unwrap();
    let kh_ca = || {
        run(Command::new(env!("CARGO_BIN_EXE_keyholder")).args([
            "ca",
            "--config",
            d.config.to_str().unwrap(),
        ]))
    };

    // A FIFO: `keyholder ca` and a reload fail at once, naming it.
    std::fs::remove_file(&ca_pub).unwrap();
    nix::unistd::mkfifo(&ca_pub, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
    let o = kh_ca();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("is a FIFO"), "{}", stderr(&o));
    d.signal(Signal::SIGHUP);
    assert!(
        d.wait_log("is a FIFO, not a regular file"),
        "{}",
        d.log_text()
    );
    assert!(d.wait_log("reload failed, keeping the last good configuration"));

    // Writable by others: the same.
    std::fs::remove_file(&ca_pub).unwrap();
    std::fs::write(&ca_pub, &good).unwrap();
    std::fs::set_permissions(&ca_pub, std::fs::Permissions::from_mode(0o666)).unwrap();
    let o = kh_ca();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("writable by group or others"),
        "{}",
        stderr(&o)
    );
    d.signal(Signal::SIGHUP);
    assert!(
        d.wait_log("mode 0666 is writable by group or others"),
        "{}",
        d.log_text()
    );

    // Mended, with a group taken off the key: the next reload applies it.
    std::fs::set_permissions(&ca_pub, std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = kh_ca();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let key = |line: &str| {
        line.split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(key(&stdout(&o)), key(&good));
    let text = std::fs::read_to_string(&d.config).unwrap();
    std::fs::write(&d.config, text.replace("[keys.deploy]", "[keys.other]")).unwrap();
    std::fs::copy(dir.join("deploy.pub"), dir.join("other.pub")).unwrap();
    d.signal(Signal::SIGHUP);
    assert!(d.wait_log("configuration reloaded"), "{}", d.log_text());
    assert!(d.log_text().contains("1 key(s): other"), "{}", d.log_text());
    assert_eq!(agent.keys(), before, "the upstream agent is unchanged");
}

#[test]
fn arm_sends_no_key_to_an_agent_that_is_not_roots() {
    require_root!();
    let dir = TempDir::new("ar");
    let user = TestUser::create("ar", &[]);
    let theirs = dir.join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    nix::unistd::chown(
        &theirs,
        Some(nix::unistd::Uid::from_raw(user.uid())),
        Some(nix::unistd::Gid::from_raw(user.gid())),
    )
    .unwrap();
    keygen(dir.path(), "deploy", "ed25519", "");
    // The user's own agent, on the path the configuration names.
    let socket = theirs.join("agent.sock");
    let mut agent = spawn(
        user.as_user()
            .command("ssh-agent")
            .args(["-D", "-a"])
            .arg(&socket)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null()),
    );
    assert!(wait_for(Duration::from_secs(10), || {
        std::os::unix::net::UnixStream::connect(&socket).is_ok()
    }));
    let config = dir.join("keyholder.toml");
    std::fs::write(
        &config,
        format!(
            "key_dir = \"{}\"\nrequire_encrypted = false\n[agent]\nsocket = \"{}\"\nspawn = false\n\
             [keys.deploy]\ngroups = [\"root\"]\n",
            dir.path().display(),
            socket.display()
        ),
    )
    .unwrap();
    let o = keyholder(&As::Root, &["arm", "--config", config.to_str().unwrap()]);
    let held = run(std::process::Command::new("ssh-add")
        .arg("-L")
        .env("SSH_AUTH_SOCK", &socket));
    let _ = agent.kill();
    let _ = agent.wait();
    assert_eq!(
        key_lines(&held),
        Vec::<String>::new(),
        "the user's agent got the key: {}{}",
        stdout(&o),
        stderr(&o)
    );
    assert_eq!(o.status.code(), Some(1), "{}{}", stdout(&o), stderr(&o));
    assert!(
        stderr(&o).contains(&format!(
            "the agent at {} runs as uid {}",
            socket.display(),
            user.uid()
        )) && stderr(&o).contains("not root"),
        "{}",
        stderr(&o)
    );
}

/// Does nothing unless run by the test below, with `KHT_MISSING_TOOL_DIR`
/// set and a `PATH` where no tool is found.
#[test]
fn missing_tool_helper() {
    let Ok(dir) = std::env::var("KHT_MISSING_TOOL_DIR") else {
        return;
    };
    let dir = TempDir(Path::new(&dir).to_owned());
    let _agent = Agent::start(&dir);
    std::mem::forget(dir);
}

#[test]
fn a_missing_tool_is_one_line_naming_the_debian_package_without_a_backtrace() {
    // No root needed: only the harness runs, with a PATH that has no tools.
    let dir = TempDir::new("mt");
    let empty = dir.join("bin");
    std::fs::create_dir(&empty).unwrap();
    let o = run(std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "missing_tool_helper", "--nocapture"])
        .env("KHT_MISSING_TOOL_DIR", dir.path())
        .env("PATH", &empty)
        .env("RUST_BACKTRACE", "1"));
    let out = format!("{}{}", stdout(&o), stderr(&o));
    assert!(!o.status.success(), "{out}");
    let lines: Vec<&str> = out.lines().filter(|l| l.contains("ssh-agent")).collect();
    assert_eq!(lines.len(), 1, "{out}");
    assert!(
        lines[0].contains("FAILED")
            && lines[0].contains("not found")
            && lines[0].contains("apt-get install openssh-client"),
        "{out}"
    );
    assert!(!out.contains("stack backtrace"), "{out}");
    assert!(!out.contains("panicked at"), "{out}");
}
