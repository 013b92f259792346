//! `keyholder status --prometheus` end to end: a real daemon in front of a
//! real OpenSSH `ssh-agent`, real users signing and being refused, a
//! connection limit hit, reloads; the output checked by value and by
//! `promtool check metrics` (Debian's `prometheus` package; .ci/run installs
//! its promtool). Also: the format-1 answer older clients get, and the
//! commands of packaging/systemd/keyholder-metrics.service run as the unit
//! runs them.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::*;
use nix::sys::signal::Signal;

raw_client_helper!();

/// `promtool check metrics` on `text`; `None` (after a loud line) when
/// promtool is not installed.
fn promtool(text: &str) -> Option<(bool, String)> {
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let Ok(mut child) = child else {
        eprintln!(
            "SKIPPED: promtool not installed (Debian package prometheus; .ci/run installs it): \
             output not checked by promtool"
        );
        return None;
    };
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(text.as_bytes()).unwrap();
    }
    let o = child.wait_with_output().unwrap();
    Some((o.status.success(), format!("{}{}", stdout(&o), stderr(&o))))
}

fn assert_promtool_passes(text: &str) {
    if let Some((ok, out)) = promtool(text) {
        // promtool prints lint problems and fails on them as on parse errors.
        assert!(ok && out.trim().is_empty(), "promtool: {out}\n---\n{text}");
    }
}

/// Samples by `name{labels}` exactly as printed: whole numbers, but for a
/// histogram's sum (seconds, with six decimals), which is checked for its
/// form and left out.
fn samples(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap();
            if series.split('{').next().unwrap().ends_with("_sum") {
                let (whole, micros) = value.split_once('.').unwrap();
                assert!(whole.parse::<u64>().is_ok() && micros.len() == 6, "{l}");
                return None;
            }
            Some((series.to_owned(), value.parse().unwrap()))
        })
        .collect()
}

fn prometheus(who: &As, config: &Path) -> (i32, String) {
    let o = keyholder(
        who,
        &[
            "status",
            "--prometheus",
            "--config",
            config.to_str().unwrap(),
        ],
    );
    (o.status.code().unwrap_or(-1), stdout(&o))
}

fn sign(blob: &[u8], user: &str) -> Vec<u8> {
    sign_request(blob, &userauth_data(blob, user, "ssh-ed25519"), 0)
}

#[test]
fn counters_after_real_signs_refusals_a_limit_and_reloads_pass_promtool() {
    require_root!();
    let mut site = Site::builder("met", Backend::Upstream)
        .group("mdep")
        .user("alice", &["mdep"])
        .user("bob", &["mdep"])
        .user("outsider", &[])
        .keys(&[("deploy", "ed25519"), ("phab", "ed25519")], &["mdep"])
        .key(SiteKey::new("stray", "ed25519").stray())
        .extra("[limits]\nmax_connections_per_user = 2\nidle_timeout_secs = 3\n")
        .build();
    let config_text = site.config_text("");
    let mut daemon = site.daemon.take().unwrap();
    let (alice, bob, outsider) = (
        site.as_user("alice"),
        site.as_user("bob"),
        site.as_user("outsider"),
    );
    let (dir, agent) = (&site.dir, &site.agent);
    let before = agent.keys();
    let deploy = pubkey_blob(&dir.join("deploy.pub"));
    let stray = pubkey_blob(&dir.join("stray.pub"));

    // Granted: alice twice on one connection, bob once.
    let answers = raw_as(
        &alice,
        &daemon.socket,
        &[sign(&deploy, "git"), sign(&deploy, "git")],
    );
    assert!(answers
        .iter()
        .all(|a| a.as_ref().unwrap()[0] == SIGN_RESPONSE));
    let answers = raw_as(&bob, &daemon.socket, &[sign(&deploy, "git")]);
    assert_eq!(answers[0].as_ref().unwrap()[0], SIGN_RESPONSE);
    // Refused: not in the group; not user-auth data; a key not configured;
    // an admin request (ssh-add -D, real client).
    let answers = raw_as(
        &outsider,
        &daemon.socket,
        &[sign(&deploy, "git"), sign(&deploy, "git")],
    );
    assert!(answers.iter().all(|a| a.as_deref() == Some(&[FAILURE][..])));
    let answers = raw_as(
        &alice,
        &daemon.socket,
        &[
            sign_request(&deploy, b"not user-auth", 0),
            sign(&stray, "git"),
        ],
    );
    assert!(answers.iter().all(|a| a.as_deref() == Some(&[FAILURE][..])));
    assert!(!daemon.ssh_add(&alice, &["-D"]).status.success());
    assert_eq!(agent.keys(), before);

    // max_connections_per_user = 2: root's third connection is closed.
    let mut held: Vec<Raw> = (0..2).map(|_| Raw::connect(&daemon.socket)).collect();
    for raw in &mut held {
        assert_eq!(raw.call(&[11]).unwrap()[0], IDENTITIES_ANSWER);
    }
    let mut third = Raw::connect(&daemon.socket);
    assert!(third.closed());
    // The two held ones idle out (idle_timeout_secs = 3).
    for raw in &mut held {
        assert!(raw.closed());
    }

    // One good reload, then one that fails.
    daemon.signal(Signal::SIGHUP);
    assert!(daemon.wait_log("configuration reloaded"));
    std::fs::write(&daemon.config, "this is = not [toml").unwrap();
    daemon.signal(Signal::SIGHUP);
    assert!(daemon.wait_log("reload failed"));

    // Any user may read the counters; all keys armed: OK (0).
    let (code, text) = prometheus(&outsider, &daemon.config);
    // The config is now broken for the command too: use a good copy.
    assert_eq!(code, 3, "{text}");
    let good = dir.join("good.toml");
    std::fs::write(&good, &config_text).unwrap();
    let (code, text) = prometheus(&outsider, &good);
    assert_eq!(code, 0, "{text}");
    let s = samples(&text);
    let get = |series: &str| {
        *s.get(series)
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
    };
    assert_eq!(get("keyholder_up"), 1);
    assert_eq!(get("keyholder_status_code"), 0);
    assert_eq!(
        get(&format!(
            "keyholder_build_info{{version=\"{}\"}}",
            env!("CARGO_PKG_VERSION")
        )),
        1
    );
    assert_eq!(get("keyholder_keys_armed"), 2);
    assert_eq!(get("keyholder_key_armed{key=\"deploy\"}"), 1);
    assert_eq!(
        get("keyholder_signatures_total{key=\"deploy\",decision=\"granted\"}"),
        3
    );
    assert_eq!(
        get("keyholder_signatures_total{key=\"phab\",decision=\"granted\"}"),
        0
    );
    // The backend's side: the three signatures it made, in the histogram.
    assert_eq!(
        get("keyholder_backend_requests_total{backend=\"upstream\",op=\"sign\",outcome=\"ok\"}"),
        3
    );
    assert_eq!(
        get("keyholder_backend_request_duration_seconds_count{backend=\"upstream\",op=\"sign\"}"),
        3
    );
    assert_eq!(
        get("keyholder_backend_request_duration_seconds_bucket{backend=\"upstream\",op=\"sign\",le=\"+Inf\"}"),
        3
    );
    assert_eq!(
        get("keyholder_signatures_total{key=\"deploy\",decision=\"refused\",reason=\"not-in-allowed-group\"}"),
        2
    );
    assert_eq!(
        get("keyholder_signatures_total{key=\"deploy\",decision=\"refused\",reason=\"not-ssh-userauth\"}"),
        1
    );
    assert_eq!(
        get("keyholder_signatures_total{key=\"\",decision=\"refused\",reason=\"key-not-configured\"}"),
        1
    );
    assert_eq!(
        get("keyholder_signatures_total{key=\"deploy\",decision=\"failed\",reason=\"upstream-timeout\"}"),
        0
    );
    assert_eq!(get("keyholder_signing_users{key=\"deploy\"}"), 2);
    assert_eq!(get("keyholder_signing_users{key=\"phab\"}"), 0);
    assert_eq!(
        get("keyholder_requests_refused_total{reason=\"admin-request\"}"),
        1
    );
    assert_eq!(
        get("keyholder_connections_closed_total{limit=\"max_connections_per_user\"}"),
        1
    );
    assert!(get("keyholder_connections_closed_total{limit=\"idle_timeout\"}") >= 2);
    assert_eq!(
        get("keyholder_connections_closed_total{limit=\"max_connections\"}"),
        0
    );
    // Every client above, plus the startup probe and this command.
    assert!(get("keyholder_connections_accepted_total") >= 10);
    assert!(get("keyholder_connections_open") >= 1);
    assert_eq!(get("keyholder_config_reloads_total{result=\"ok\"}"), 1);
    assert_eq!(get("keyholder_config_reloads_total{result=\"failed\"}"), 1);
    assert_eq!(get("keyholder_config_last_reload_successful"), 0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let loaded = get("keyholder_config_last_reload_success_timestamp_seconds");
    let started = get("keyholder_start_time_seconds");
    assert!(
        started <= loaded && loaded <= now,
        "{started} {loaded} {now}"
    );
    assert_eq!(get("keyholder_upstream_restarts_total"), 0);
    assert_eq!(get("keyholder_user_lookup_timeouts_total"), 0);
    assert_eq!(get("keyholder_metrics_truncated"), 0);
    assert_eq!(
        get("keyholder_certificates_issued_total{key=\"deploy\"}"),
        0
    );
    // Counts only: no user name, no uid.
    for user in ["alice", "bob", "outsider"].map(|u| site.user(u)) {
        assert!(!text.contains(&user.name), "{text}");
        assert!(!text.contains(&format!("\"{}\"", user.uid())), "{text}");
    }
    assert!(
        !text
            .lines()
            .any(|l| !l.starts_with('#') && l.contains("uid")),
        "{text}"
    );
    assert_promtool_passes(&text);

    // The upstream agent dies: CRITICAL (2), upstream errors counted, still valid.
    site.agent.stop();
    let (code, text) = prometheus(&outsider, &good);
    assert_eq!(code, 2, "{text}");
    let s = samples(&text);
    assert_eq!(s["keyholder_up"], 1);
    assert_eq!(s["keyholder_upstream_up"], 0);
    assert_eq!(s["keyholder_key_armed{key=\"deploy\"}"], 0);
    assert!(
        s["keyholder_upstream_errors_total{reason=\"unreachable\"}"] >= 1,
        "{text}"
    );
    assert_promtool_passes(&text);

    // The daemon is gone: keyholder_up 0, build_info, exit 2, still valid.
    daemon.stop();
    let (code, text) = prometheus(&outsider, &good);
    assert_eq!(code, 2, "{text}");
    let s = samples(&text);
    assert_eq!(s["keyholder_up"], 0);
    assert_eq!(
        s[&format!(
            "keyholder_build_info{{version=\"{}\"}}",
            env!("CARGO_PKG_VERSION")
        )],
        1
    );
    assert!(!text.contains("keyholder_signatures_total"));
    assert_promtool_passes(&text);
}

#[test]
fn the_upstream_restart_is_counted() {
    require_root!();
    let site = Site::builder("mrs", Backend::Upstream)
        .spawned_agent()
        .key(
            SiteKey::new("deploy", "ed25519")
                .groups(&["root"])
                .unadded(),
        )
        .build();
    let daemon = site.daemon();
    let pid_line = daemon.log_text();
    let pid: i32 = pid_line
        .split("started (pid ")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no agent pid in\n{pid_line}"));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    assert!(daemon.wait_log("upstream agent restarted"));
    let (_, text) = prometheus(&As::Root, &daemon.config);
    assert_eq!(
        samples(&text)["keyholder_upstream_restarts_total"],
        1,
        "{text}"
    );
    assert_promtool_passes(&text);
}

/// Parses a format-1 status answer the way a client that predates format 2
/// does: version 1, then exactly the key list, nothing after it.
fn format_1_keys(answer: &[u8]) -> Option<Vec<String>> {
    let (&kind, rest) = answer.split_first()?;
    assert_eq!(kind, EXTENSION_RESPONSE);
    let (name, rest) = take_string(rest)?;
    assert_eq!(name, b"status@keyholder");
    let (version, rest) = rest.split_first_chunk::<4>()?;
    if u32::from_be_bytes(*version) != 1 {
        return None;
    }
    let (_reachable, rest) = rest.split_first()?;
    let (n, mut rest) = rest.split_first_chunk::<4>()?;
    let mut names = Vec::new();
    for _ in 0..u32::from_be_bytes(*n) {
        let (name, r) = take_string(rest)?;
        let (_fingerprint, r) = take_string(r)?;
        let (_armed, r) = r.split_first()?;
        names.push(String::from_utf8(name.to_vec()).ok()?);
        rest = r;
    }
    rest.is_empty().then_some(names)
}

#[test]
fn older_clients_get_format_1_and_only_an_exact_request_gets_counters() {
    require_root!();
    let site = Site::builder("mv1", Backend::Upstream)
        .keys(&[("deploy", "ed25519")], &["root"])
        .build();
    let (agent, daemon) = (&site.agent, site.daemon());
    let mut raw = Raw::connect(&daemon.socket);
    let ask = |details: &[u8]| [vec![27u8], string(b"status@keyholder"), details.to_vec()].concat();
    for details in [&[][..], &[0, 0, 0, 1], &[0, 0, 0, 2, 0], &[0xff; 4]] {
        let answer = raw.call(&ask(details)).unwrap();
        assert_eq!(
            format_1_keys(&answer),
            Some(vec!["deploy".to_owned()]),
            "contents {details:?}"
        );
    }
    let answer = raw.call(&ask(&[0, 0, 0, 2])).unwrap();
    assert_eq!(format_1_keys(&answer), None);
    let (_, rest) = take_string(&answer[1..]).unwrap();
    assert_eq!(&rest[..4], &[0, 0, 0, 2]);
    // plain `keyholder status` and --json are unchanged.
    let o = keyholder(
        &As::Root,
        &["status", "--config", daemon.config.to_str().unwrap()],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    assert!(stdout(&o).starts_with("OK: 1/1 keys armed"));
    assert_eq!(agent.keys().len(), 1);
}

/// The unit's `ExecStart=`/`ExecStartPost=` shell script: the single-quoted
/// argument of `/bin/sh -c`, with systemd's `$$` turned into `$`.
fn unit_script(unit: &str, directive: &str, prefix: &str) -> String {
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix(directive))
        .unwrap_or_else(|| panic!("no {directive} in the unit"));
    let script = line
        .strip_prefix(prefix)
        .and_then(|l| l.strip_prefix("/bin/sh -c '"))
        .and_then(|l| l.strip_suffix('\''))
        .unwrap_or_else(|| panic!("{directive} is not {prefix}/bin/sh -c '…': {line}"));
    assert!(!script.contains('\''), "{script}");
    script.replace("$$", "$")
}

#[test]
fn the_metrics_unit_replaces_the_textfile_atomically_as_an_unprivileged_user() {
    require_root!();
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/packaging/systemd/keyholder-metrics.service"
    ))
    .unwrap();
    let fetch = unit_script(&unit, "ExecStart=", "").replace("/usr/bin/keyholder", KEYHOLDER);
    let install = unit_script(&unit, "ExecStartPost=", "!");
    assert!(unit
        .contains("Environment=KEYHOLDER_PROM=/var/lib/prometheus/node-exporter/keyholder.prom"));
    assert!(unit.contains("ReadWritePaths=/var/lib/prometheus/node-exporter\n"));

    let mut site = Site::builder("mun", Backend::Upstream)
        .keys(&[("deploy", "ed25519")], &["root"])
        .build();
    let mut daemon = site.daemon.take().unwrap();
    let dir = &site.dir;
    // The runtime directory (the dynamic user's, 0755) and the textfile
    // directory (root's, 0755, as Debian ships it).
    let runtime = dir.join("runtime");
    let textfile = dir.join("textfile");
    for d in [&runtime, &textfile] {
        std::fs::create_dir(d).unwrap();
    }
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    nix::unistd::chown(&runtime, Some(nobody.uid), Some(nobody.gid)).unwrap();
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    let prom = textfile.join("keyholder.prom");
    let config = daemon.config.clone();
    let run_unit = |expect_up: u64| -> String {
        // UMask=0022 as in the unit.
        let sh = |who: &As, script: &str| -> Output {
            run(who
                .command("/bin/sh")
                .args(["-c", &format!("umask 0022; {script}")])
                .env("RUNTIME_DIRECTORY", &runtime)
                .env("KEYHOLDER_PROM", &prom)
                .env("KEYHOLDER_CONFIG", &config)
                .current_dir("/"))
        };
        let unprivileged = As::Ids {
            uid: nobody.uid.as_raw(),
            gid: nobody.gid.as_raw(),
        };
        let o = sh(&unprivileged, &fetch);
        assert!(
            o.status.success(),
            "ExecStart: {}{}",
            stdout(&o),
            stderr(&o)
        );
        // The unprivileged step cannot write the textfile directory itself.
        let o = sh(&unprivileged, &format!("touch {}/x", textfile.display()));
        assert!(!o.status.success());
        // "!": root, but with CapabilityBoundingSet= empty: no capability.
        let o = run(Command::new("setpriv")
            .args([
                "--bounding-set=-all",
                "--inh-caps=-all",
                "--",
                "/bin/sh",
                "-c",
            ])
            .arg(format!(
                "grep CapEff /proc/self/status; umask 0022; {install}"
            ))
            .env("RUNTIME_DIRECTORY", &runtime)
            .env("KEYHOLDER_PROM", &prom)
            .current_dir("/"));
        assert!(
            o.status.success(),
            "ExecStartPost: {}{}",
            stdout(&o),
            stderr(&o)
        );
        assert!(
            stdout(&o).contains("CapEff:\t0000000000000000"),
            "{}",
            stdout(&o)
        );
        let names: Vec<String> = std::fs::read_dir(&textfile)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["keyholder.prom"], "temporary files left behind");
        let meta = std::fs::metadata(&prom).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o644);
        let text = std::fs::read_to_string(&prom).unwrap();
        assert_eq!(samples(&text)["keyholder_up"], expect_up, "{text}");
        assert_promtool_passes(&text);
        text
    };
    let first = run_unit(1);
    assert!(first.contains("keyholder_key_armed{key=\"deploy\"} 1"));
    // An unarmed key (WARNING/CRITICAL) and a stopped daemon still replace
    // the file: the unit reports every state.
    assert!(site.agent.ssh_add(&["-D"]).status.success());
    let second = run_unit(1);
    assert!(
        second.contains("keyholder_key_armed{key=\"deploy\"} 0"),
        "{second}"
    );
    daemon.stop();
    run_unit(0);
}

#[test]
fn the_documented_alert_rules_pass_promtool() {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/metrics.md")).unwrap();
    let rules = doc
        .split("```yaml\n")
        .nth(1)
        .and_then(|r| r.split("```").next())
        .expect("a yaml block in docs/metrics.md");
    for alert in [
        "KeyholderKeyNotArmed",
        "KeyholderRefusalsSpiking",
        "KeyholderConnectionLimitHit",
    ] {
        assert!(rules.contains(&format!("alert: {alert}")), "{alert}");
    }
    let dir = TempDir::new("mal");
    let file = dir.join("rules.yml");
    std::fs::write(&file, rules).unwrap();
    match Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(&file)
        .output()
    {
        Ok(o) => assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o)),
        Err(_) => eprintln!(
            "SKIPPED: promtool not installed (Debian package prometheus; .ci/run installs it): \
             alert rules not checked"
        ),
    }
}

#[test]
fn certificates_issued_are_counted_per_key() {
    require_root!();
    let site = Site::builder("mce", Backend::Upstream)
        .group("mcg")
        .user("alice", &["mcg"])
        .user("bob", &["mcg"])
        .top("require_encrypted = false")
        .key(
            SiteKey::new("deploy", "ed25519")
                .groups(&["mcg"])
                .lines("certificate = \"also\"\nprincipals = [\"deploy\"]")
                .unadded(),
        )
        .key(SiteKey::new("ca", "ed25519").stray().unadded())
        .extra("[certificates]\nca = \"ca\"\n")
        .build();
    let (daemon, alice, bob) = (site.daemon(), site.user("alice"), site.user("bob"));
    let config = daemon.config.to_str().unwrap();
    let o = keyholder(&As::Root, &["arm", "--config", config]);
    assert!(o.status.success(), "arm: {}{}", stdout(&o), stderr(&o));
    // alice twice (the second listing reuses her certificate), bob once.
    for who in [&alice, &alice, &bob] {
        let listed = daemon.listed(&who.as_user());
        assert!(
            listed.iter().any(|l| l.contains("-cert-v01@openssh.com")),
            "{listed:?}"
        );
    }
    assert_eq!(daemon.log_count("cert user="), 2, "{}", daemon.log_text());
    let (code, text) = prometheus(&alice.as_user(), &daemon.config);
    assert_eq!(code, 0, "{text}");
    let s = samples(&text);
    assert_eq!(
        s["keyholder_certificates_issued_total{key=\"deploy\"}"], 2,
        "{text}"
    );
    // The CA counts as a key in status (armed), never as a signing key here.
    assert_eq!(
        s["keyholder_keys_armed"], s["keyholder_keys_configured"],
        "{text}"
    );
    assert_promtool_passes(&text);
}
