//! Floods from one local user, end to end (real `ssh-agent`, real daemon,
//! real throwaway users): what they leave in the log and in memory once
//! they are over.

mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::*;

fn connect(socket: &std::path::Path) -> UnixStream {
    let s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// VmRSS once it has stopped moving.
fn settled_rss(pid: u32) -> u64 {
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

#[test]
fn memory_returns_near_the_idle_baseline_after_a_half_frame_flood() {
    require_root!();
    const N: usize = 512;
    let dir = TempDir::new("mem");
    let agent = Agent::start(&dir);
    let d = Daemon::start(
        &dir,
        &agent,
        "[limits]\nmax_connections = 4096\nmax_connections_per_user = 4096\n",
    );
    let pid = d.pid();
    // Warm up: a few requests so lazily initialised state exists.
    for _ in 0..4 {
        let mut c = Raw::connect(&d.socket);
        assert_eq!(c.call(&[11]).unwrap()[0], IDENTITIES_ANSWER);
    }
    let base = settled_rss(pid);
    let mut half = (256 * 1024u32).to_be_bytes().to_vec();
    half.push(13);
    half.resize(4 + 128 * 1024, 0xAA);
    let mut rounds = Vec::new();
    for round in 0..3 {
        let mut conns = Vec::new();
        for _ in 0..N {
            let mut s = connect(&d.socket);
            s.write_all(&half).unwrap();
            conns.push(s);
        }
        let flooded = settled_rss(pid);
        drop(conns);
        // The daemon sees the closes and frees the buffers.
        let after = settled_rss(pid);
        eprintln!("round {round}: base {base} KiB, flooded {flooded} KiB, after {after} KiB");
        rounds.push((flooded, after));
    }
    let mut c = Raw::connect(&d.socket);
    assert_eq!(c.call(&[11]).unwrap()[0], IDENTITIES_ANSWER);
    for (round, (flooded, after)) in rounds.iter().enumerate() {
        assert!(
            *flooded > base + (N as u64 * 64),
            "round {round}: the flood did not show ({base} -> {flooded} KiB)"
        );
        assert!(
            *after <= (2 * base).max(base + 16 * 1024),
            "round {round}: VmRSS {after} KiB after the flood, baseline {base} KiB (flood {flooded} KiB)"
        );
    }
}
