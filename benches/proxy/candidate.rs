//! A candidate build against this one (`KH_BENCH_CANDIDATE=/path/to/keyholder`):
//! the way to tell whether a change to the daemon makes it faster.
//!
//! Two bench runs, one per build, differ by more than most changes do (the
//! host moves by several per cent between minutes), so a second daemon, the
//! candidate binary with the same configuration and a socket of its own,
//! runs in front of the same agent, and each scenario's window interleaves
//! the two daemons instead of direct and proxy (ABBA slices, the first side
//! swapped every round, as everywhere in this bench). The report gives
//! candidate/this per scenario, per round, pooled, and each daemon's CPU per
//! operation, the steadier figure. Even so, a side carries a bias of its own
//! of up to about 2 % (swap the two builds between the sides to see it), so
//! a difference smaller than that is not a finding.
//!
//! It only measures: it never changes the shipped daemon's configuration.

use std::path::Path;

use load::RunResult;
use setup::{wait_socket, Proc, Result};

use crate::{check_interrupted, load, median_of, setup, Bench, Paired, Scenario, Timing};

/// Runs the phase for `scenarios`; returns its Markdown.
pub fn phase(
    b: &mut Bench,
    binary: &Path,
    scenarios: &[&Scenario],
    rounds: usize,
    timing: Timing,
) -> Result<String> {
    check_interrupted()?;
    let (socket, config, text) = b.config_beside("candidate", |text| text)?;
    if text.contains("backend = \"builtin\"") {
        return Ok(
            "Candidate: not run with the builtin backend (its key would need adding to a \
             second daemon).\n\n"
                .into(),
        );
    }
    let log = b.dir.0.join("daemon-candidate.log");
    let mut candidate = Proc {
        name: "candidate keyholder daemon",
        child: crate::daemon_command(binary, &config, &log)?
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))?,
    };
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    if !wait_socket(&socket) {
        return Err(format!(
            "the candidate daemon did not start:\n{}",
            log_text()
        ));
    }

    let shipped = b.daemon.pid();
    let mut out = format!(
        "Candidate: `{}` against this build, both daemons in front of the same agent, \
         interleaved in each window (candidate/this above 1: the candidate is faster).\n\n\
         | benchmark | this ops/s | candidate ops/s | candidate/this | ratio per round | \
         daemon CPU µs/op, this / candidate | failures (this / candidate) |\n\
         |---|---:|---:|---:|---|---:|---:|\n",
        binary.display()
    );
    for s in scenarios {
        let mut this: Vec<RunResult> = Vec::new();
        let mut cand: Vec<RunResult> = Vec::new();
        let mut this_cpu = Vec::new();
        let mut cand_cpu = Vec::new();
        for round in 0..rounds {
            let sides = b.pair(&b.proxy, &socket);
            let mut windows = b.window_on(
                sides,
                s.op,
                s.conns,
                round % 2,
                timing,
                &[shipped, candidate.pid()],
            )?;
            if !candidate.alive() {
                return Err(format!("the candidate daemon died:\n{}", log_text()));
            }
            let (Some(c), Some(t)) = (windows.pop(), windows.pop()) else {
                return Err("the candidate window returned no result".into());
            };
            eprintln!(
                "round {}/{rounds} {:<10} candidate/this {:>6.3}  this {:>9.0}  candidate {:>9.0} ops/s  \
                 daemon CPU µs/op {:.1} / {:.1}  failures {} / {}",
                round + 1,
                s.id,
                c.r.ops_per_sec() / t.r.ops_per_sec(),
                t.r.ops_per_sec(),
                c.r.ops_per_sec(),
                t.daemons_us.first().copied().unwrap_or(0.0),
                c.daemons_us.get(1).copied().unwrap_or(0.0),
                t.r.failures,
                c.r.failures,
            );
            this_cpu.push(t.daemons_us.first().copied().unwrap_or(0.0));
            cand_cpu.push(c.daemons_us.get(1).copied().unwrap_or(0.0));
            this.push(t.r);
            cand.push(c.r);
        }
        let t: Vec<&RunResult> = this.iter().collect();
        let c: Vec<&RunResult> = cand.iter().collect();
        let paired = Paired::of(&t, &c);
        out += &format!(
            "| {} | {:.0} | {:.0} | **{:.3}** | {} | {:.1} / {:.1} | {} / {} |\n",
            s.label,
            crate::median(&t, |r| r.ops_per_sec()),
            crate::median(&c, |r| r.ops_per_sec()),
            paired.median,
            paired.per_round(),
            median_of(this_cpu),
            median_of(cand_cpu),
            t.iter().map(|r| r.failures).sum::<u64>(),
            c.iter().map(|r| r.failures).sum::<u64>(),
        );
    }
    drop(candidate);
    Ok(out + "\n")
}
