//! One user's lookups hanging (`KH_BENCH_ONLY=…,hung`): measures that while
//! one user's lookups hang, a second user's logins through the proxy still
//! succeed at full speed.
//!
//! A third daemon, in front of the same agent, runs in a mount namespace of
//! its own (`unshare -m`) whose user database is `files` then LDAP through
//! `nslcd` (Debian's libnss-ldapd), the LDAP server being a listener on
//! 127.0.0.1 that accepts and never answers (`tests/common/nslcd.rs`,
//! shared with `tests/lookups.rs`). nslcd answers user a's group lookups at
//! once without asking the server
//! (`nss_initgroups_ignoreusers`); user b's go to the server and hang.
//! Meanwhile user b keeps [`POKERS`] connections asking for a listing
//! every [`POKE_EVERY_MS`] ms, so its lookups are hung the whole time, and
//! user a runs `connect` at 16 against the agent directly and against this
//! daemon, interleaved as in the other scenarios. The machine's own lookups
//! never see LDAP. Without nslcd installed the phase says it was skipped.

use std::io::Write;
use std::process::{Command, Stdio};

use load::{Op, PokeResult, PokeSpec, RunResult};
use setup::{wait_socket, Proc, Result};

use crate::nslcd::{self, Nslcd};
use crate::{
    check_interrupted, load, median, median_of, setup, us, Bench, Paired, Timing, KEYHOLDER,
};

/// User b's connections, each asking for a listing again once answered.
const POKERS: usize = 4;
const POKE_EVERY_MS: u64 = 100;

/// Runs the phase; returns its Markdown.
pub fn phase(b: &mut Bench, rounds: usize, timing: Timing) -> Result<String> {
    check_interrupted()?;
    let title = "One user's lookups hanging (user b's group lookups go to an LDAP server \
                 that never answers; user a runs `connect` 16 meanwhile):";
    if !nslcd::installed() {
        return Ok(format!(
            "{title} **SKIPPED**: nslcd / libnss-ldapd not installed (`.ci/run` installs them).\n\n"
        ));
    }
    let dir = b.dir.0.clone();
    let plain = std::fs::read_to_string(dir.join("keyholder.toml")).map_err(|e| e.to_string())?;
    if plain.contains("backend = \"builtin\"") {
        return Ok(format!(
            "{title} not run with the builtin backend (it measures the lookups, not the keys).\n\n"
        ));
    }
    let (socket, config, _) = b.config_beside("hung", |text| text)?;
    let port = nslcd::silent_ldap_server().map_err(|e| e.to_string())?;
    let (nslcd, script) = Nslcd::prepare(&dir, port, &["root", &b.user_a.name])
        .map_err(|e| format!("cannot write the namespace's name service files: {e}"))?;
    let log = dir.join("daemon-hung.log");
    let logfile = std::fs::File::create(&log).map_err(|e| e.to_string())?;
    let mut daemon = Proc {
        name: "keyholder daemon (hanging lookups)",
        child: Command::new("setpriv")
            .args(["--pdeathsig=TERM", "--", "unshare", "-m", "--", "sh", "-c"])
            .arg(&script)
            .args([KEYHOLDER, "daemon", "--config"])
            .arg(&config)
            .env_remove("KEYHOLDER_CONFIG")
            .env_remove("KEYHOLDER_LOG_LEVEL")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logfile)
            .spawn()
            .map_err(|e| format!("cannot start {KEYHOLDER} in a mount namespace: {e}"))?,
    };
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    if !wait_socket(&socket) {
        return Err(format!(
            "the daemon with hanging lookups did not start:\n{}",
            log_text()
        ));
    }

    // User b's pokers, for the whole phase; stopped by closing their stdin.
    let spec = PokeSpec {
        socket: socket.clone(),
        conns: POKERS,
        every_ms: POKE_EVERY_MS,
    };
    let mut poker = Proc {
        name: "user b's connections",
        child: crate::worker_command(&b.user_b, "poke", &spec)?
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start user b's connections: {e}"))?,
    };
    // Let b's first lookups start (and hang) before a is measured.
    std::thread::sleep(std::time::Duration::from_millis(500));

    let mut direct_runs: Vec<RunResult> = Vec::new();
    let mut hung_runs: Vec<RunResult> = Vec::new();
    let mut daemon_cpu: Vec<f64> = Vec::new();
    for round in 0..rounds {
        let sides = b.pair(&b.direct, &socket);
        let windows = b.window_on(sides, Op::Connect, 16, round % 2, timing, &[daemon.pid()])?;
        if !daemon.alive() {
            return Err(format!(
                "the daemon with hanging lookups died:\n{}",
                log_text()
            ));
        }
        for (hung, w) in [false, true].into_iter().zip(windows) {
            eprintln!(
                "round {}/{rounds} connect16 {:<22} {:>9.0} ops/s  p50 {:>8.1} µs  p99 {:>8.1} µs  failures {}",
                round + 1,
                if hung { "proxy, b's lookups hung" } else { "direct" },
                w.r.ops_per_sec(),
                us(w.r.p50_ns),
                us(w.r.p99_ns),
                w.r.failures,
            );
            if hung {
                daemon_cpu.push(w.cpu_us[1]);
                hung_runs.push(w.r);
            } else {
                direct_runs.push(w.r);
            }
        }
    }
    // Stop b's connections (each ends after its request in flight).
    drop(poker.child.stdin.take());
    let mut out_b = String::new();
    if let Some(mut stdout) = poker.child.stdout.take() {
        use std::io::Read;
        let _ = stdout.read_to_string(&mut out_b);
    }
    let _ = poker.child.wait();
    let pokes: PokeResult = serde_json::from_str(out_b.trim())
        .map_err(|e| format!("user b's connections reported {out_b:?}: {e}"))?;
    let log_now = log_text();
    let uid_b = b.user_b.id()?;
    let timed_out = log_now
        .lines()
        .filter(|l| l.contains(&format!(" uid={uid_b} ")) && l.contains("user-lookup-timeout"))
        .count();
    let asked = nslcd.log_text().contains(&b.user_b.name);
    drop(daemon);

    let d: Vec<&RunResult> = direct_runs.iter().collect();
    let h: Vec<&RunResult> = hung_runs.iter().collect();
    let paired = Paired::of(&d, &h);
    let ratio = paired.median;
    let mut out = format!("{title}\n\n");
    out += "| hanging lookups | direct ops/s | proxy ops/s | proxy/direct | \
            direct p50 / p99 (µs) | proxy p50 / p99 (µs) | failures (direct / proxy) | daemon CPU µs/op | ratio per round |\n\
            |---|---:|---:|---:|---:|---:|---:|---:|---|\n";
    out += &format!(
        "| user a: `connect` 16 concurrent | {:.0} | {:.0} | **{ratio:.2}** | {:.1} / {:.1} | {:.1} / {:.1} | {} / {} | {:.1} | {} |\n\n",
        median(&d, |r| r.ops_per_sec()),
        median(&h, |r| r.ops_per_sec()),
        median(&d, |r| us(r.p50_ns)),
        median(&d, |r| us(r.p99_ns)),
        median(&h, |r| us(r.p50_ns)),
        median(&h, |r| us(r.p99_ns)),
        d.iter().map(|r| r.failures).sum::<u64>(),
        h.iter().map(|r| r.failures).sum::<u64>(),
        median_of(daemon_cpu),
        paired.per_round(),
    );
    out += &format!(
        "User b meanwhile: {} listing requests on {POKERS} connections, {} refused, {} served, \
         {} connection errors; the daemon logged {timed_out} refusal(s) `reason=user-lookup-timeout` \
         for b (refusal lines are rate-limited per uid); nslcd was asked about b: {}.{}\n\n",
        pokes.requests,
        pokes.refused,
        pokes.served,
        pokes.broken,
        if asked { "yes" } else { "**no**" },
        if pokes.served > 0 || !asked || timed_out == 0 {
            " **The hang was not real: this measurement does not show what it should.**"
        } else {
            ""
        }
    );
    let _ = std::io::stderr().flush();
    Ok(out)
}
