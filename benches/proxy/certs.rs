//! The certificate mode (`KH_BENCH_ONLY=…,certs`): a second daemon in front
//! of the same agent with `[certificates]` on (CA `benchca`, key `bench` in
//! mode `also`), and
//! - `connect` at 16 connections against both daemons, interleaved in one
//!   window per round (see `load::RunSpec`): the certified side lists user
//!   a's cached certificate and signs user-auth data carrying it (as `ssh`
//!   does), the plain side the plain key;
//! - the cost of one mint: [`keyholder::certs::mint`] called in this process
//!   through the same upstream backend the daemon uses (build, one CA
//!   signature by the agent, verification), sequentially, p50/p99.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use keyholder::backend::Backend;
use load::{Op, RunResult, SideSpec};
use setup::{run, wait_socket, Proc, Result};

use crate::{check_interrupted, load, median, setup, us, Bench, Paired, Timing, KEYHOLDER};

/// Mints timed in-process.
const MINTS: usize = 200;

/// Runs the certificate phase; returns its Markdown.
pub fn phase(b: &mut Bench, rounds: usize, timing: Timing) -> Result<String> {
    check_interrupted()?;
    let dir = b.dir.0.clone();
    let ca = dir.join("benchca");
    run(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "benchca", "-f"])
        .arg(&ca))?;
    run(Command::new("ssh-add")
        .arg("-q")
        .arg(&ca)
        .env("SSH_AUTH_SOCK", &b.direct))?;
    // With the builtin backend the certificate daemon serves an agent.socket
    // of its own, and holds the key and the CA itself.
    let builtin_socket = dir.join("builtin-agent-certs.sock");
    let (socket, config, text) = b.config_beside("certs", |plain| {
        plain.replace(
            &format!("socket = \"{}\"", dir.join("builtin-agent.sock").display()),
            &format!("socket = \"{}\"", builtin_socket.display()),
        ) + "certificate = \"also\"\nprincipals = [\"deploy\"]\n\n[certificates]\nca = \"benchca\"\n"
    })?;
    let log = dir.join("daemon-certs.log");
    let mut daemon = Proc {
        name: "keyholder daemon (certificates)",
        child: crate::daemon_command(Path::new(KEYHOLDER), &config, &log)?
            .spawn()
            .map_err(|e| format!("cannot start {KEYHOLDER}: {e}"))?,
    };
    if !wait_socket(&socket) {
        return Err(format!(
            "the certificate daemon did not start:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        ));
    }
    if text.contains("backend = \"builtin\"") {
        if !wait_socket(&builtin_socket) {
            return Err("the certificate daemon's agent.socket did not appear".into());
        }
        for key in [dir.join("bench"), ca.clone()] {
            run(Command::new("ssh-add")
                .arg("-q")
                .arg(&key)
                .env("SSH_AUTH_SOCK", &builtin_socket))?;
        }
    }

    // User a's certificate, as `keyholder cert` prints it; the sign request
    // names the plain key and carries the certificate in the data (ssh 9.2).
    let out = b
        .user_a
        .command(Path::new(KEYHOLDER))
        .args(["cert", "bench", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "keyholder cert: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let line = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let cert = ssh_key::Certificate::from_openssh(&line).map_err(|e| e.to_string())?;
    let mut cert_blob = Vec::new();
    ssh_encoding::Encode::encode(&cert, &mut cert_blob).map_err(|e| e.to_string())?;
    let sign_cert = crate::sign_request_with(
        &dir.join("bench.pub"),
        &cert_blob,
        "ssh-ed25519-cert-v01@openssh.com",
    )?;

    let mut plain_runs: Vec<RunResult> = Vec::new();
    let mut cert_runs: Vec<RunResult> = Vec::new();
    let sign_plain = b.sign.clone();
    let plain_socket = b.proxy.clone();
    for round in 0..rounds {
        // Side 0 plain, side 1 certificates, interleaved in one window.
        let sides = vec![
            SideSpec {
                socket: plain_socket.clone(),
                sign: sign_plain.clone(),
            },
            SideSpec {
                socket: socket.clone(),
                sign: sign_cert.clone(),
            },
        ];
        let windows = b.window_on(sides, Op::Connect, 16, round % 2, timing, &[daemon.pid()])?;
        if !daemon.alive() {
            return Err("the certificate daemon died".into());
        }
        for (certified, w) in [false, true].into_iter().zip(windows) {
            let r = w.r;
            eprintln!(
                "round {}/{rounds} connect16 {:<13} {:>9.0} ops/s  p50 {:>8.1} µs  p99 {:>8.1} µs  failures {}",
                round + 1,
                if certified { "certificates" } else { "plain" },
                r.ops_per_sec(),
                us(r.p50_ns),
                us(r.p99_ns),
                r.failures
            );
            if certified {
                cert_runs.push(r);
            } else {
                plain_runs.push(r);
            }
        }
    }
    let issued = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .matches(" cert user=")
        .count();

    // One mint, in-process, through the daemon's own upstream backend.
    let loaded = keyholder::config::Config::load(&config).map_err(|e| e.to_string())?;
    let settings =
        keyholder::certs::Settings::from_config(&loaded).ok_or("no [certificates] loaded")?;
    let key = settings.keys.get("bench").ok_or("no key bench")?.clone();
    let backend =
        keyholder::backend::UpstreamBackend::new(b.direct.clone(), Duration::from_secs(30), 16);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let mut times: Vec<u64> = Vec::with_capacity(MINTS);
    for i in 0..MINTS {
        let started = Instant::now();
        rt.block_on(keyholder::certs::mint(
            &backend as &dyn Backend,
            &settings,
            "bench",
            &key.key,
            &key.cert,
            b.user_a.id()?,
            Some(&b.user_a.name),
            i as u64 + 1,
            (keyholder::certs::unix_now(), None),
        ))
        .map_err(|e| format!("mint: {e}"))?;
        times.push(started.elapsed().as_nanos() as u64);
    }
    times.sort_unstable();
    let p50 = load::percentile(&times, 50.0);
    let p99 = load::percentile(&times, 99.0);

    let p: Vec<&RunResult> = plain_runs.iter().collect();
    let c: Vec<&RunResult> = cert_runs.iter().collect();
    let paired = Paired::of(&p, &c);
    let ratio = paired.median;
    let mut out = String::from(
        "| certificates | plain ops/s | certificates ops/s | certificates/plain | target | \
         plain p50 / p99 (µs) | certificates p50 / p99 (µs) | failures (plain / certificates) | ratio per round |\n\
         |---|---:|---:|---:|---|---:|---:|---:|---|\n",
    );
    out += &format!(
        "| `connect` 16 concurrent, certificate cached | {:.0} | {:.0} | **{ratio:.2}** | ≥ 0.90 {} | {:.1} / {:.1} | {:.1} / {:.1} | {} / {} | {} |\n",
        median(&p, |r| r.ops_per_sec()),
        median(&c, |r| r.ops_per_sec()),
        if ratio >= 0.90 { "met" } else { "**MISSED**" },
        median(&p, |r| us(r.p50_ns)),
        median(&p, |r| us(r.p99_ns)),
        median(&c, |r| us(r.p50_ns)),
        median(&c, |r| us(r.p99_ns)),
        p.iter().map(|r| r.failures).sum::<u64>(),
        c.iter().map(|r| r.failures).sum::<u64>(),
        paired.per_round(),
    );
    out += &format!(
        "\nOne mint (Ed25519 CA and key; build, CA signature by the ssh-agent, verify), \
         {MINTS} in a row in-process: p50 **{:.0} µs**, p99 **{:.0} µs**. \
         The certificate daemon issued {issued} certificate(s) during the connect runs \
         (cached: user a's, reused).\n\n",
        us(p50),
        us(p99),
    );
    Ok(out)
}
