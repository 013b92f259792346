//! Process hardening for the privileged commands: no core dumps, not
//! ptrace-able by non-root (`PR_SET_DUMPABLE 0`), memory locked against swap
//! where that cannot backfire, umask 077; and an allocator that gives freed
//! memory back (see [`return_freed_memory`]).

use nix::sys::mman::{mlockall, MlockAllFlags};
use nix::sys::resource::{getrlimit, setrlimit, Resource, RLIM_INFINITY};
use nix::sys::stat::{umask, Mode};

/// CAP_IPC_LOCK's bit in the capability sets.
const CAP_IPC_LOCK: u32 = 14;
/// mlockall(2)'s MCL_ONFAULT (Linux 4.4+): lock pages as they are touched,
/// so reserved but unused memory (thread stacks) stays unallocated.
const MCL_ONFAULT: i32 = 4;

/// What [`apply`] achieved; the daemon logs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// `mlockall` result: `Ok` or why it was skipped or failed.
    pub mlock: Result<(), String>,
}

/// Applies every measure. Failures of the mandatory ones (dumpable, core
/// limit) are returned as errors; memory locking is best effort.
pub fn apply() -> crate::error::Result<Report> {
    umask(Mode::from_bits_truncate(0o077));
    setrlimit(Resource::RLIMIT_CORE, 0, 0)
        .map_err(|e| crate::error::Error::msg(format!("cannot disable core dumps: {e}")))?;
    nix::sys::prctl::set_dumpable(false)
        .map_err(|e| crate::error::Error::msg(format!("cannot set PR_SET_DUMPABLE 0: {e}")))?;
    Ok(Report {
        mlock: lock_memory(),
    })
}

/// Locks memory when it is safe to: with MCL_FUTURE every later allocation
/// must fit under RLIMIT_MEMLOCK, so without CAP_IPC_LOCK and with a finite
/// limit, locking would turn into allocation failures later.
fn lock_memory() -> Result<(), String> {
    let unlimited =
        getrlimit(Resource::RLIMIT_MEMLOCK).is_ok_and(|(soft, _)| soft == RLIM_INFINITY);
    if !unlimited && !has_capability(CAP_IPC_LOCK) {
        return Err(
            "skipped: RLIMIT_MEMLOCK is finite and CAP_IPC_LOCK is missing \
                    (set LimitMEMLOCK=infinity)"
                .to_owned(),
        );
    }
    let flags = MlockAllFlags::MCL_CURRENT
        | MlockAllFlags::MCL_FUTURE
        | MlockAllFlags::from_bits_retain(MCL_ONFAULT);
    mlockall(flags)
        .or_else(|_| mlockall(MlockAllFlags::MCL_CURRENT | MlockAllFlags::MCL_FUTURE))
        .map_err(|e| format!("mlockall failed: {e}"))
}

/// Whether the effective capability set holds `cap` (from /proc/self/status).
fn has_capability(cap: u32) -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .is_some_and(|bits| bits & (1u64 << cap) != 0)
}

/// Allocations at least this large get their own mapping, returned to the
/// kernel when freed. A message buffer grows 16, 32, 64, 128, 256 KiB (see
/// `protocol::frame`), so every large one is above it.
pub const MMAP_THRESHOLD: usize = 64 * 1024;
/// Free memory at the top of a heap beyond this is returned at once.
pub const TRIM_THRESHOLD: usize = 128 * 1024;

/// Makes glibc's allocator give freed memory back to the kernel, so that
/// resident (and, under `mlockall`, locked) memory falls back after a flood
/// of large messages. By default glibc raises its mmap threshold to the size
/// of any mapped chunk that is freed (up to 32 MiB): after the first large
/// message buffers are freed, every later one comes from a heap, and a heap
/// keeps what it once held. Fixed thresholds turn that adjustment off.
/// Must run before the async runtime starts its threads. Best effort: a
/// refused setting is reported, never fatal.
pub fn return_freed_memory() -> Result<(), String> {
    let settings = [
        (
            "M_MMAP_THRESHOLD",
            nix::libc::M_MMAP_THRESHOLD,
            MMAP_THRESHOLD,
        ),
        (
            "M_TRIM_THRESHOLD",
            nix::libc::M_TRIM_THRESHOLD,
            TRIM_THRESHOLD,
        ),
    ];
    for (name, param, value) in settings {
        let value = i32::try_from(value).map_err(|_| format!("{name} {value} out of range"))?;
        // SAFETY: mallopt only changes allocator parameters; it is called
        // before any other thread exists.
        if unsafe { nix::libc::mallopt(param, value) } != 1 {
            return Err(format!("mallopt({name}, {value}) refused"));
        }
    }
    Ok(())
}
