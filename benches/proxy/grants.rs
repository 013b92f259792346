//! The grants mode (`KH_BENCH_ONLY=…,grants`): a second daemon in front of
//! the same agent whose key `bench` needs a grant (`[keys.bench.grants]`,
//! break-glass so that user a grants itself), with user a holding an active
//! grant; then `sign` on 16 persistent connections and `connect` at 16
//! connections against the main daemon (no grants) and the grant daemon,
//! interleaved in one window per round. The two should be equal: a sign
//! under a grant reads a snapshot of the grants, takes no lock and reads no
//! file.

use std::path::Path;
use std::process::Stdio;

use load::{Op, RunResult};
use setup::{wait_socket, Proc, Result};

use crate::{check_interrupted, load, median, setup, us, Bench, Paired, Timing, KEYHOLDER};

/// Runs the grants phase; returns its Markdown.
pub fn phase(b: &mut Bench, rounds: usize, timing: Timing) -> Result<String> {
    check_interrupted()?;
    let dir = b.dir.0.clone();
    let state = dir.join("state-grants");
    let builtin_socket = dir.join("builtin-agent-grants.sock");
    let (socket, config, text) = b.config_beside("grants", |plain| {
        format!("state_dir = \"{}\"\n", state.display())
            + &plain.replace(
                &format!("socket = \"{}\"", dir.join("builtin-agent.sock").display()),
                &format!("socket = \"{}\"", builtin_socket.display()),
            )
            + "\n[keys.bench.grants]\napprovals = 0\nmax_secs = 86400\n"
    })?;
    let log = dir.join("daemon-grants.log");
    let mut daemon = Proc {
        name: "keyholder daemon (grants)",
        child: crate::daemon_command(Path::new(KEYHOLDER), &config, &log)?
            .spawn()
            .map_err(|e| format!("cannot start {KEYHOLDER}: {e}"))?,
    };
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    if !wait_socket(&socket) {
        return Err(format!("the grant daemon did not start:\n{}", log_text()));
    }
    if text.contains("backend = \"builtin\"") {
        if !wait_socket(&builtin_socket) {
            return Err("the grant daemon's agent.socket did not appear".into());
        }
        setup::run(
            std::process::Command::new("ssh-add")
                .arg("-q")
                .arg(dir.join("bench"))
                .env("SSH_AUTH_SOCK", &builtin_socket),
        )?;
    }
    // User a's grant (break-glass: active at once).
    let out = b
        .user_a
        .command(Path::new(KEYHOLDER))
        .args([
            "request", "bench", "--for", "24h", "--reason", "bench", "--config",
        ])
        .arg(&config)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "keyholder request: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();

    let mut out = String::from(
        "### Signing under a grant\n\n\
         The main daemon (key `bench` without grants) against a second daemon in front of \
         the same agent whose `bench` needs a grant, user a holding one (break-glass, \
         `approvals = 0`): both sides interleaved in one window per round.\n\n\
         | workload | no grants ops/s | under a grant ops/s | grant/none | no grants p50 / p99 (µs) | \
         under a grant p50 / p99 (µs) | failures (none / grant) | ratio per round |\n\
         |---|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for (op, name) in [(Op::Sign, "sign 16"), (Op::Connect, "connect 16")] {
        let mut plain_runs: Vec<RunResult> = Vec::new();
        let mut grant_runs: Vec<RunResult> = Vec::new();
        for round in 0..rounds {
            let sides = b.pair(&b.proxy.clone(), &socket);
            let windows = b.window_on(sides, op, 16, round % 2, timing, &[daemon.pid()])?;
            if !daemon.alive() {
                return Err(format!("the grant daemon died:\n{}", log_text()));
            }
            for (granted, w) in [false, true].into_iter().zip(windows) {
                eprintln!(
                    "round {}/{rounds} {name:<10} {:<13} {:>9.0} ops/s  p50 {:>8.1} µs  p99 {:>8.1} µs  failures {}",
                    round + 1,
                    if granted { "under a grant" } else { "no grants" },
                    w.r.ops_per_sec(),
                    us(w.r.p50_ns),
                    us(w.r.p99_ns),
                    w.r.failures
                );
                if granted {
                    grant_runs.push(w.r);
                } else {
                    plain_runs.push(w.r);
                }
            }
        }
        let p: Vec<&RunResult> = plain_runs.iter().collect();
        let g: Vec<&RunResult> = grant_runs.iter().collect();
        let paired = Paired::of(&p, &g);
        out += &format!(
            "| user a: `{name}` | {:.0} | {:.0} | **{:.2}** | {:.1} / {:.1} | {:.1} / {:.1} | {} / {} | {} |\n",
            median(&p, |r| r.ops_per_sec()),
            median(&g, |r| r.ops_per_sec()),
            paired.median,
            median(&p, |r| us(r.p50_ns)),
            median(&p, |r| us(r.p99_ns)),
            median(&g, |r| us(r.p50_ns)),
            median(&g, |r| us(r.p99_ns)),
            p.iter().map(|r| r.failures).sum::<u64>(),
            g.iter().map(|r| r.failures).sum::<u64>(),
            paired.per_round(),
        );
    }
    let signed_under = log_text()
        .lines()
        .filter(|l| l.contains(&format!(" grant={id} decision=granted")))
        .count();
    out += &format!(
        "\nThe grant daemon logged {signed_under} signature(s) under grant `{id}`{}.\n\n",
        if signed_under == 0 {
            " — **no sign was made under the grant: this measurement does not show what it \
             should**"
        } else {
            ""
        }
    );
    drop(daemon);
    Ok(out)
}
