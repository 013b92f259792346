//! The PKCS#11 backend on SoftHSM2 against a direct PKCS#11 client.
//!
//! A SoftHSM2 token of its own (in the bench directory, `SOFTHSM2_CONF`
//! pointing at it) holds an Ed25519 key generated on it; a second daemon
//! with `backend = "pkcs11"` (default `sessions`: one per core) is armed
//! with `keyholder arm --pin-file`. Then, in each round, for 1 and 16
//! connections:
//! - direct: this process, as root, with one thread per connection, each
//!   with its own session of one logged-in application, calling `C_Sign`
//!   (CKM_EDDSA) over a user-auth request in a loop;
//! - keyholder: the load generator as bench user `a`, SIGN_REQUEST over
//!   the same request on persistent connections to the daemon.
//!
//! The two run one after the other (the direct client cannot be sliced
//! into the load generator's windows), the order swapped every round;
//! medians over rounds. SoftHSM2 signs with about 400 µs of CPU, on the
//! same two cores as the load generator, so the ratio is what keyholder
//! adds per request (socket, policy, audit line, queue hand-off, the
//! verification of each signature) on top of the token. Then one burst of
//! `KH_BENCH_P11_BURST` (1000) clients, each connecting, listing, signing
//! and closing, against the daemon (with `max_connections_per_user` raised
//! to fit them).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::eddsa::{EddsaParams, EddsaSignatureScheme};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectClass};
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;

use crate::load::{BurstResult, BurstSpec, Op, SideSpec};
use crate::setup::{run, wait_socket, Proc, Result};
use crate::{check_interrupted, median_of, us, Bench, Timing, KEYHOLDER};

const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
const PIN: &str = "1234";

/// One side's measurement.
struct Measured {
    ops_per_sec: f64,
    p50_us: f64,
    p99_us: f64,
    failures: u64,
    /// CPU time per signature of the process that called the token (the
    /// direct client, or the daemon), µs.
    cpu_us: f64,
}

/// CPU time of this process so far, µs.
fn self_cpu_us() -> f64 {
    let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF);
    usage.map_or(0.0, |u| {
        let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 * 1e6 + tv.tv_usec() as f64;
        t(u.user_time()) + t(u.system_time())
    })
}

/// The direct client: `threads` logged-in sessions signing for `window`.
fn direct(
    ctx: &Pkcs11,
    slot: cryptoki::slot::Slot,
    data: &[u8],
    threads: usize,
    window: Duration,
) -> std::result::Result<Measured, String> {
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let start = Arc::new(Barrier::new(threads + 1));
    let mut handles = Vec::new();
    for _ in 0..threads {
        let (ctx, data) = (ctx.clone(), data.to_vec());
        let (stop, failures, start) = (stop.clone(), failures.clone(), start.clone());
        handles.push(std::thread::spawn(
            move || -> std::result::Result<Vec<u64>, String> {
                let session = ctx.open_ro_session(slot).map_err(|e| e.to_string())?;
                let key = session
                    .find_objects(&[
                        Attribute::Class(ObjectClass::PRIVATE_KEY),
                        Attribute::Label(b"bench".to_vec()),
                    ])
                    .map_err(|e| e.to_string())?
                    .into_iter()
                    .next()
                    .ok_or("no key on the token")?;
                let mech = Mechanism::Eddsa(EddsaParams::new(EddsaSignatureScheme::Pure));
                let mut lat = Vec::new();
                start.wait();
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    match session.sign(&mech, key, &data) {
                        Ok(sig) if sig.len() == 64 => lat.push(t.elapsed().as_nanos() as u64),
                        _ => {
                            failures.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                Ok(lat)
            },
        ));
    }
    start.wait();
    let cpu0 = self_cpu_us();
    let t0 = Instant::now();
    std::thread::sleep(window);
    stop.store(true, Ordering::Relaxed);
    let mut lat = Vec::new();
    for h in handles {
        lat.extend(h.join().map_err(|_| "a direct client thread panicked")??);
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = self_cpu_us() - cpu0;
    lat.sort_unstable();
    let pct = |p: f64| lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)));
    Ok(Measured {
        ops_per_sec: lat.len() as f64 / secs,
        p50_us: us(pct(0.50).copied().unwrap_or(0)),
        p99_us: us(pct(0.99).copied().unwrap_or(0)),
        failures: failures.load(Ordering::Relaxed),
        cpu_us: cpu / lat.len().max(1) as f64,
    })
}

/// The Ed25519 public key of the token's public object "bench".
fn token_public(conf: &Path) -> Result<String> {
    let out = run(Command::new("pkcs11-tool")
        .args(["--module", MODULE, "--list-objects", "--type", "pubkey"])
        .env("SOFTHSM2_CONF", conf))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let hex = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("EC_POINT:"))
        .ok_or_else(|| format!("no EC_POINT in {text}"))?
        .trim()
        .to_owned();
    let bytes: Vec<u8> = (0..hex.len() / 2)
        .filter_map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok())
        .collect();
    let point: [u8; 32] = bytes
        .get(2..)
        .and_then(|p| p.try_into().ok())
        .ok_or("EC_POINT is not a 32-byte point")?;
    let key = ssh_key::PublicKey::new(
        ssh_key::public::KeyData::Ed25519(ssh_key::public::Ed25519PublicKey(point)),
        "p11bench",
    );
    key.to_openssh().map_err(|e| e.to_string())
}

/// The whole phase; its Markdown section.
pub fn phase(b: &mut Bench, rounds: usize, timing: Timing) -> Result<String> {
    check_interrupted()?;
    if !Path::new(MODULE).exists() {
        return Ok(format!(
            "### PKCS#11 backend\n\nSKIPPED: {MODULE} not installed (apt-get install softhsm2 opensc)\n\n"
        ));
    }
    let dir = b.dir.0.join("p11");
    let tokens = dir.join("tokens");
    std::fs::create_dir_all(&tokens).map_err(|e| e.to_string())?;
    let conf = dir.join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            tokens.display()
        ),
    )
    .map_err(|e| e.to_string())?;
    run(Command::new("softhsm2-util")
        .args([
            "--init-token",
            "--free",
            "--label",
            "bench",
            "--pin",
            PIN,
            "--so-pin",
            "5678",
        ])
        .env("SOFTHSM2_CONF", &conf))?;
    run(Command::new("pkcs11-tool")
        .args([
            "--module",
            MODULE,
            "--login",
            "--pin",
            PIN,
            "--keypairgen",
            "--key-type",
            "EC:edwards25519",
            "--label",
            "bench",
            "--id",
            "01",
        ])
        .env("SOFTHSM2_CONF", &conf))?;
    let pub_path = b.dir.0.join("p11bench.pub");
    std::fs::write(&pub_path, format!("{}\n", token_public(&conf)?)).map_err(|e| e.to_string())?;
    let sign = crate::sign_request(&pub_path, false)?;
    // The signed data inside the request, for the direct client.
    let data = {
        let body = sign.get(5..).ok_or("short sign request")?;
        let blob_len = u32::from_be_bytes(body[..4].try_into().map_err(|_| "bad")?) as usize;
        let rest = &body[4 + blob_len..];
        let len = u32::from_be_bytes(rest[..4].try_into().map_err(|_| "bad")?) as usize;
        rest[4..4 + len].to_vec()
    };

    let group = b.group_name().to_owned();
    let socket = b.dir.0.join("proxy-p11.sock");
    let agent_socket = b.dir.0.join("p11-agent.sock");
    let config = b.dir.0.join("keyholder-p11.toml");
    std::fs::write(
        &config,
        format!(
            "socket = \"{}\"\nkey_dir = \"{}\"\nlog = \"stderr\"\n\n[agent]\nbackend = \"pkcs11\"\n\
             socket = \"{}\"\n\n[pkcs11]\nmodule = \"{MODULE}\"\ntoken_label = \"bench\"\n\n\
             [limits]\nmax_connections_per_user = 2048\n\n[keys.p11bench]\ngroups = [\"{group}\"]\npkcs11_label = \"bench\"\n",
            socket.display(),
            b.dir.0.display(),
            agent_socket.display()
        ),
    )
    .map_err(|e| e.to_string())?;
    let log = b.dir.0.join("daemon-p11.log");
    let mut daemon = Proc {
        name: "keyholder daemon (pkcs11)",
        child: crate::daemon_command(Path::new(KEYHOLDER), &config, &log)?
            .env("SOFTHSM2_CONF", &conf)
            .spawn()
            .map_err(|e| format!("cannot start {KEYHOLDER}: {e}"))?,
    };
    if !wait_socket(&socket) || !wait_socket(&agent_socket) {
        return Err(format!(
            "the pkcs11 daemon did not start:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        ));
    }
    let pin_file = dir.join("pin");
    std::fs::write(&pin_file, format!("{PIN}\n")).map_err(|e| e.to_string())?;
    std::fs::set_permissions(
        &pin_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .map_err(|e| e.to_string())?;
    let armed = Command::new(KEYHOLDER)
        .args(["arm", "--config"])
        .arg(&config)
        .arg("--pin-file")
        .arg(&pin_file)
        .output()
        .map_err(|e| e.to_string())?;
    if !armed.status.success() {
        return Err(format!(
            "keyholder arm (pkcs11): {}{}\n{}",
            String::from_utf8_lossy(&armed.stdout),
            String::from_utf8_lossy(&armed.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        ));
    }

    // The direct client's module instance: one application, logged in once.
    std::env::set_var("SOFTHSM2_CONF", &conf);
    let ctx = Pkcs11::new(MODULE).map_err(|e| e.to_string())?;
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .map_err(|e| e.to_string())?;
    let slot = ctx
        .get_slots_with_token()
        .map_err(|e| e.to_string())?
        .into_iter()
        .next()
        .ok_or("no token")?;
    let login = ctx.open_ro_session(slot).map_err(|e| e.to_string())?;
    login
        .login(UserType::User, Some(&AuthPin::from(PIN.to_owned())))
        .map_err(|e| e.to_string())?;

    let window = Duration::from_millis(timing.window_ms);
    let mut rows = Vec::new();
    for conns in [1usize, 16] {
        let (mut d, mut k) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            check_interrupted()?;
            let proxy_side = |b: &mut Bench| -> Result<Measured> {
                let side = SideSpec {
                    socket: socket.clone(),
                    sign: sign.clone(),
                };
                let pid = daemon.pid();
                let w = b.window_on(vec![side], Op::Sign, conns, 0, timing, &[pid])?;
                let w = w.into_iter().next().ok_or("no window")?;
                Ok(Measured {
                    ops_per_sec: w.r.ops_per_sec(),
                    p50_us: us(w.r.p50_ns),
                    p99_us: us(w.r.p99_ns),
                    failures: w.r.failures,
                    cpu_us: w.cpu_us[1],
                })
            };
            let (dm, km) = if round % 2 == 0 {
                let dm = direct(&ctx, slot, &data, conns, window)?;
                (dm, proxy_side(b)?)
            } else {
                let km = proxy_side(b)?;
                (direct(&ctx, slot, &data, conns, window)?, km)
            };
            eprintln!(
                "round {}/{rounds} pkcs11 sign{conns}: direct {:.0} ops/s (p99 {:.0} µs, {:.0} µs CPU/sig), \
                 keyholder {:.0} ops/s (p99 {:.0} µs, daemon {:.0} µs CPU/sig), ratio {:.3}, failures {} / {}",
                round + 1,
                dm.ops_per_sec,
                dm.p99_us,
                dm.cpu_us,
                km.ops_per_sec,
                km.p99_us,
                km.cpu_us,
                km.ops_per_sec / dm.ops_per_sec,
                dm.failures,
                km.failures
            );
            d.push(dm);
            k.push(km);
        }
        if !daemon.alive() {
            return Err(format!(
                "the pkcs11 daemon died:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            ));
        }
        rows.push((conns, d, k));
    }
    let burst_clients = std::env::var("KH_BENCH_P11_BURST")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000usize);
    let burst: BurstResult = b.worker(
        "burst",
        &BurstSpec {
            socket: socket.clone(),
            clients: burst_clients,
            sign: sign.clone(),
        },
    )?;
    drop(login);
    let _ = ctx.finalize();
    let _ = run(Command::new(KEYHOLDER)
        .args(["disarm", "--config"])
        .arg(&config));

    let mut out = String::from(
        "### PKCS#11 backend (SoftHSM2, Ed25519)\n\n\
         keyholder with `backend = \"pkcs11\"` (default `sessions`: one per core) against a direct \
         PKCS#11 client (one logged-in session per thread, `C_Sign` in a loop, in the bench \
         process), one after the other, the order swapped every round; medians over rounds. \
         The token's CPU per signature is the direct client's; the daemon's includes the \
         token's work (SoftHSM2 runs inside it) and the check of each signature.\n\n\
         | connections | direct ops/s | keyholder ops/s | keyholder/direct | target | direct p50 / p99 (µs) | keyholder p50 / p99 (µs) | CPU µs/sig direct / daemon | failures (direct / keyholder) |\n\
         |---:|---:|---:|---:|---|---:|---:|---:|---:|\n",
    );
    for (conns, d, k) in &rows {
        let med = |v: &[Measured], f: fn(&Measured) -> f64| median_of(v.iter().map(f).collect());
        let ratios: Vec<f64> = d
            .iter()
            .zip(k)
            .map(|(d, k)| k.ops_per_sec / d.ops_per_sec)
            .collect();
        let ratio = median_of(ratios);
        let target = if *conns == 16 { Some(0.85) } else { None };
        out += &format!(
            "| {conns} | {:.0} | {:.0} | **{ratio:.3}** | {} | {:.0} / {:.0} | {:.0} / {:.0} | {:.0} / {:.0} | {} / {} |\n",
            med(d, |m| m.ops_per_sec),
            med(k, |m| m.ops_per_sec),
            target.map_or_else(
                || "-".to_owned(),
                |t| format!("≥ {t:.2} {}", if ratio >= t { "met" } else { "**MISSED**" })
            ),
            med(d, |m| m.p50_us),
            med(d, |m| m.p99_us),
            med(k, |m| m.p50_us),
            med(k, |m| m.p99_us),
            med(d, |m| m.cpu_us),
            med(k, |m| m.cpu_us),
            d.iter().map(|m| m.failures).sum::<u64>(),
            k.iter().map(|m| m.failures).sum::<u64>(),
        );
    }
    out += &format!(
        "\nBurst of {burst_clients} clients (connect, list, sign, close) on the pkcs11 daemon: \
         {} served, **{} failures**, all done in {:.0} ms, per client p50 {:.0} ms / p99 {:.0} ms{}.\n\n",
        burst.served,
        burst.failures,
        burst.total_ms,
        burst.p50_ms,
        burst.p99_ms,
        burst
            .first_error
            .as_ref()
            .map(|e| format!(" (first error: {e})"))
            .unwrap_or_default()
    );
    drop(daemon);
    let _: PathBuf = pub_path;
    Ok(out)
}
