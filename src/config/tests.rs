//! The configuration's tests.

use super::*;

const ED: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG0dfWR7X83D9xk2DLJjEwGct6dhvTRdMC/OJMR2HDp9 test";

fn parse(text: &str) -> Result<Config> {
    Config::parse(Path::new("/etc/keyholder/keyholder.toml"), text)
}

#[test]
fn defaults_apply_to_an_empty_file() {
    let c = parse("").unwrap();
    assert_eq!(c.socket, Path::new(DEFAULT_SOCKET));
    assert_eq!(c.agent.socket, Path::new(DEFAULT_AGENT_SOCKET));
    assert!(c.agent.spawn);
    assert!(c.require_encrypted);
    assert_eq!(c.log, LogTarget::Syslog);
    assert_eq!(c.limits, Limits::default());
    assert!(c.keys.is_empty());
}

#[test]
fn inline_key_is_loaded() {
    let c = parse(&format!(
        "[keys.deploy]\npublic_key = \"{ED}\"\ngroups = [\"ops\"]\n"
    ))
    .unwrap();
    let k = c.key("deploy").unwrap();
    assert_eq!(k.groups, vec!["ops".to_owned()]);
    assert!(k.fingerprint.starts_with("SHA256:"));
    assert_eq!(k.private_key_path, Path::new("/etc/keyholder.d/deploy"));
    assert!(!k.allow_any_data);
}

#[test]
fn unknown_field_names_file_and_field() {
    let e = parse("sockett = \"/x\"\n").unwrap_err().to_string();
    assert!(e.contains("/etc/keyholder/keyholder.toml"), "{e}");
    assert!(e.contains("sockett"), "{e}");
    let e = parse(&format!(
        "[keys.deploy]\npublic_key = \"{ED}\"\ngroups = [\"ops\"]\ngroup = 1\n"
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("group"), "{e}");
}

#[test]
fn empty_groups_is_an_error_naming_the_key() {
    let e = parse(&format!(
        "[keys.deploy]\npublic_key = \"{ED}\"\ngroups = []\n"
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("keys.deploy.groups"), "{e}");
}

#[test]
fn missing_public_key_file_is_an_error_naming_the_path() {
    let e = parse("key_dir = \"/nonexistent-kh\"\n[keys.deploy]\ngroups = [\"ops\"]\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("keys.deploy"), "{e}");
    assert!(e.contains("/nonexistent-kh/deploy.pub"), "{e}");
}

#[test]
fn garbage_public_key_is_an_error_naming_the_field() {
    let e = parse("[keys.deploy]\npublic_key = \"ssh-ed25519 nope\"\ngroups = [\"ops\"]\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("keys.deploy.public_key"), "{e}");
}

#[test]
fn zero_limits_and_bad_names_are_rejected() {
    assert!(parse("[limits]\nmax_connections = 0\n").is_err());
    assert!(parse("[limits]\nidle_timeout_secs = 0\n").is_err());
    assert!(parse("[limits]\nmax_connections = -1\n").is_err());
    assert!(parse("[limits]\nlookup_timeout_secs = 0\n").is_err());
    let e = parse("[limits]\nlookup_cache_secs = 3601\n")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("limits.lookup_cache_secs: must be at most 3600"),
        "{e}"
    );
    assert!(parse("[limits]\nlookup_timeout_secs = 3601\n").is_err());
    let c = parse("[limits]\nlookup_cache_secs = 0\nlookup_timeout_secs = 2\n").unwrap();
    assert_eq!(c.limits.lookup_cache, Duration::ZERO);
    assert_eq!(c.limits.lookup_timeout, Duration::from_secs(2));
    let e = parse(&format!(
        "[keys.\"../x\"]\npublic_key = \"{ED}\"\ngroups = [\"ops\"]\n"
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("invalid key name"), "{e}");
}

#[test]
fn duplicate_public_keys_are_rejected() {
    let e = parse(&format!(
        "[keys.a]\npublic_key = \"{ED}\"\ngroups = [\"ops\"]\n[keys.b]\npublic_key = \"{ED}\"\ngroups = [\"ops\"]\n"
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("same public key"), "{e}");
}

#[test]
fn backend_defaults_to_upstream_and_builtin_rejects_spawn_and_program() {
    assert_eq!(parse("").unwrap().agent.backend, BackendKind::Upstream);
    let c = parse("[agent]\nbackend = \"builtin\"\nsocket = \"/run/k/agent.sock\"\n").unwrap();
    assert_eq!(c.agent.backend, BackendKind::Builtin);
    assert!(!c.agent.spawn);
    for backend in ["builtin", "pkcs11", "openbao"] {
        let e = parse(&format!(
            "[agent]\nbackend = \"{backend}\"\nspawn = false\n"
        ))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(!e.contains("agent.spawn"), "{backend}: {e}");
    }
    for field in ["spawn = true", "program = \"/bin/x\""] {
        let e = parse(&format!("[agent]\nbackend = \"builtin\"\n{field}\n"))
            .unwrap_err()
            .to_string();
        let name = field.split(' ').next().unwrap();
        assert!(
            e.contains(&format!("agent.{name}")) && e.contains("builtin"),
            "{e}"
        );
    }
    let e = parse("[agent]\nbackend = \"gpg\"\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("backend") || e.contains("gpg"), "{e}");
}

#[test]
fn certificate_fields_are_validated() {
    let key = |extra: &str| {
        parse(&format!(
            "[keys.deploy]\npublic_key = \"{ED}\"\ngroups = [\"ops\"]\n{extra}"
        ))
    };
    // Off by default, with the default extension.
    let c = key("").unwrap();
    let k = &c.key("deploy").unwrap().cert;
    assert_eq!(k.mode, CertMode::Off);
    assert_eq!(k.extensions, ["permit-pty"]);
    // A mode needs [certificates] and principals.
    let e = key("certificate = \"also\"\nprincipals = [\"deploy\"]\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("[certificates]"), "{e}");
    let e = key("certificate = \"only\"\n").unwrap_err().to_string();
    assert!(e.contains("keys.deploy.principals"), "{e}");
    let e = key("certificate = \"sometimes\"\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("sometimes") && e.contains("line 4"), "{e}");
    for (bad, field) in [
        ("principals = [\"a b\"]", "principals"),
        ("principals = [\"a,b\"]", "principals"),
        ("cert_extensions = [\"\"]", "cert_extensions"),
        ("force_command = \"\"", "force_command"),
        ("source_address = []", "source_address"),
        ("source_address = [\"10.0.0.0/33\"]", "source_address"),
        ("source_address = [\"example.org\"]", "source_address"),
    ] {
        let e = key(&format!("{bad}\n")).unwrap_err().to_string();
        assert!(e.contains(&format!("keys.deploy.{field}")), "{bad}: {e}");
    }
    let c = key(
        "cert_extensions = [\"permit-pty\", \"permit-agent-forwarding\", \"permit-pty\"]\n\
         source_address = [\"192.0.2.0/24\", \"2001:db8::/32\", \"::1\"]\n",
    )
    .unwrap();
    let k = &c.key("deploy").unwrap().cert;
    assert_eq!(k.extensions, ["permit-agent-forwarding", "permit-pty"]);
    assert_eq!(k.source_address.len(), 3);
}

#[test]
fn key_id_templates() {
    assert!(check_key_id_template(DEFAULT_KEY_ID).is_ok());
    assert!(check_key_id_template("{user} uid {uid} on {host}: {key} #{serial}").is_ok());
    assert!(check_key_id_template("fixed").is_ok());
    for bad in ["", "{name}", "{user", "user}", "{}", "a\tb", "é"] {
        assert!(check_key_id_template(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn relative_paths_are_relative_to_the_config_file() {
    let c = Config::parse(
        Path::new("/srv/kh/keyholder.toml"),
        "key_dir = \"keys\"\nsocket = \"p.sock\"\n",
    )
    .unwrap();
    assert_eq!(c.key_dir, Path::new("/srv/kh/keys"));
    assert_eq!(c.socket, Path::new("/srv/kh/p.sock"));
}
mod destination_tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const ED: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG0dfWR7X83D9xk2DLJjEwGct6dhvTRdMC/OJMR2HDp9 test";

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("kh-dest-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn key_with(extra: &str) -> String {
        format!("[keys.deploy]\npublic_key = \"{ED}\"\ngroups = [\"ops\"]\n{extra}")
    }

    #[test]
    fn destinations_file_is_read_relative_to_the_config() {
        let d = dir("ok");
        std::fs::write(
            d.join("targets"),
            format!("web1 {ED}\n@cert-authority * {ED}\n"),
        )
        .unwrap();
        let c = Config::parse(
            &d.join("k.toml"),
            &key_with("destinations = \"targets\"\nremote_users = [\"deploy\"]\nallow_forwarding = true\n"),
        );
        let is_root = nix::unistd::geteuid().is_root();
        if !is_root {
            // Not root: the file is not root's, which is refused.
            assert!(c.unwrap_err().to_string().contains("not root"));
            return;
        }
        let c = c.unwrap();
        let k = c.key("deploy").unwrap();
        let dest = k.destinations.as_ref().unwrap();
        assert_eq!(dest.path, d.join("targets"));
        assert_eq!(dest.hosts.as_ref().unwrap().counts(), (1, 1, 0));
        assert_eq!(k.remote_users.as_deref(), Some(&["deploy".to_owned()][..]));
        assert!(k.allow_forwarding);
        // Defaults.
        let c = Config::parse(&d.join("k.toml"), &key_with("")).unwrap();
        let k = c.key("deploy").unwrap();
        assert!(k.destinations.is_none() && k.remote_users.is_none() && !k.allow_forwarding);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn bad_destinations_files_are_errors_naming_key_file_and_line() {
        let d = dir("bad");
        let conf = d.join("k.toml");
        let e = Config::parse(&conf, &key_with("destinations = \"missing\"\n"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("keys.deploy.destinations") && e.contains("missing"),
            "{e}"
        );
        std::fs::write(
            d.join("garbage"),
            format!("web1 {ED}\nweb2 ssh-ed25519 nope\n"),
        )
        .unwrap();
        let e = Config::parse(&conf, &key_with("destinations = \"garbage\"\n"))
            .unwrap_err()
            .to_string();
        if nix::unistd::geteuid().is_root() {
            assert!(e.contains("line 2"), "{e}");
            std::fs::set_permissions(d.join("garbage"), std::fs::Permissions::from_mode(0o666))
                .unwrap();
            let e = Config::parse(&conf, &key_with("destinations = \"garbage\"\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("writable by group or others"), "{e}");
        }
        std::fs::create_dir(d.join("adir")).unwrap();
        let e = Config::parse(&conf, &key_with("destinations = \"adir\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a regular file"), "{e}");
        std::os::unix::fs::symlink(d.join("garbage"), d.join("link")).unwrap();
        assert!(Config::parse(&conf, &key_with("destinations = \"link\"\n")).is_err());
        let e = Config::parse(&conf, &key_with("remote_users = []\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("keys.deploy.remote_users: empty"), "{e}");
        let e = Config::parse(&conf, &key_with("remote_users = [\"a b\"]\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a valid user name"), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }
}

mod example_tests {
    use super::*;

    /// The shipped example documents the defaults: loading it gives exactly
    /// what an empty file gives (apart from where it was read from).
    #[test]
    fn example_config_loads_and_matches_the_defaults() {
        let path = Path::new("/etc/keyholder/keyholder.toml");
        let example = Config::parse(path, include_str!("../../keyholder.toml.example")).unwrap();
        let empty = Config::parse(path, "").unwrap();
        assert_eq!(example, empty);
    }

    /// Switching backend in the example is one uncommented line.
    #[test]
    fn example_config_switches_backend_with_one_line() {
        let path = Path::new("/etc/keyholder/keyholder.toml");
        let text = include_str!("../../keyholder.toml.example");
        let line = "# backend = \"upstream\"";
        assert_eq!(
            text.matches(line).count(),
            1,
            "the example has one {line:?} line"
        );
        for backend in [BackendKind::Upstream, BackendKind::Builtin] {
            let switched = text.replace(line, &format!("backend = \"{}\"", backend.name()));
            let config = Config::parse(path, &switched).unwrap();
            assert_eq!(config.agent.backend, backend);
        }
    }
}
