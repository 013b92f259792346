//! Connection limits (`max_connections`, `max_connections_per_user`) and the
//! once-per-burst logging of events that could otherwise flood the log.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::ratelog::Kind;

/// "connection limit max_connections reached", once per burst per uid.
pub static TOTAL_REACHED: Kind = Kind {
    name: "connection limit max_connections reached",
    burst: 1,
    level: tracing::Level::WARN,
};

/// "connection limit max_connections_per_user reached", once per burst per uid.
pub static PER_USER_REACHED: Kind = Kind {
    name: "connection limit max_connections_per_user reached",
    burst: 1,
    level: tracing::Level::WARN,
};

/// Which limit refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitHit {
    /// `max_connections`
    Total,
    /// `max_connections_per_user`
    PerUser,
}

/// Admits connections within the limits.
#[derive(Debug)]
pub struct Limiter {
    total: Arc<Semaphore>,
    per_user: Mutex<HashMap<u32, u32>>,
    max_per_user: std::sync::atomic::AtomicU32,
}

/// Held for the life of an admitted connection; frees its slots on drop.
#[derive(Debug)]
pub struct Admission {
    limiter: Arc<Limiter>,
    uid: u32,
    _total: OwnedSemaphorePermit,
}

impl Limiter {
    /// A limiter with the given limits.
    pub fn new(max_total: u32, max_per_user: u32) -> Arc<Self> {
        Arc::new(Self {
            total: Arc::new(Semaphore::new(max_total as usize)),
            per_user: Mutex::new(HashMap::new()),
            max_per_user: max_per_user.into(),
        })
    }

    /// Changes the per-user limit (on reload); open connections stay open.
    pub fn set_max_per_user(&self, max: u32) {
        self.max_per_user
            .store(max, std::sync::atomic::Ordering::Relaxed);
    }

    /// Admits a connection from `uid`, or says which limit it hits.
    pub fn admit(self: &Arc<Self>, uid: u32) -> Result<Admission, LimitHit> {
        let total = Arc::clone(&self.total)
            .try_acquire_owned()
            .map_err(|_| LimitHit::Total)?;
        let max = self.max_per_user.load(std::sync::atomic::Ordering::Relaxed);
        let mut map = self.per_user.lock().unwrap_or_else(PoisonError::into_inner);
        let count = map.entry(uid).or_insert(0);
        if *count >= max {
            return Err(LimitHit::PerUser);
        }
        *count += 1;
        Ok(Admission {
            limiter: Arc::clone(self),
            uid,
            _total: total,
        })
    }

    /// Connections open now by `uid`.
    pub fn open_by(&self, uid: u32) -> u32 {
        let map = self.per_user.lock().unwrap_or_else(PoisonError::into_inner);
        map.get(&uid).copied().unwrap_or(0)
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut map = self
            .limiter
            .per_user
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = map.get_mut(&self.uid) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                map.remove(&self.uid);
            }
        }
    }
}

/// Descriptors kept free beyond the two per connection (client and
/// upstream): the listener, the log, the runtime's own, a spawned agent's
/// pipes, and user-database lookups running at once (up to the blocking
/// pool's 64 threads, each may open files or sockets). Those lookups must
/// not run out: glibc reports a database it could not open as "no such
/// user" (see `caller::resolve`).
pub const SPARE_DESCRIPTORS: u64 = 256;

/// How many connections fit in `nofile` descriptors: `max`, or fewer (at
/// least one) when two per connection plus the spare do not fit.
pub fn connections_that_fit(max: u32, nofile: u64) -> u32 {
    let room = nofile.saturating_sub(SPARE_DESCRIPTORS) / 2;
    u32::try_from(room).unwrap_or(u32::MAX).clamp(1, max.max(1))
}

/// Raises the soft RLIMIT_NOFILE to the hard limit (systemd starts services
/// with a soft limit of 1024 unless told otherwise) and returns how many of
/// `max_connections` fit, logging when that is fewer: the connection limit
/// then refuses connections before the daemon runs out of descriptors.
pub fn fit_descriptors(max_connections: u32) -> u32 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return max_connections;
    };
    let soft = if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        hard
    } else {
        soft
    };
    let fit = connections_that_fit(max_connections, soft);
    if fit < max_connections {
        tracing::warn!(
            "max_connections {max_connections} lowered to {fit}: RLIMIT_NOFILE {soft} leaves room \
             for {fit} (two descriptors each, {SPARE_DESCRIPTORS} spare); raise LimitNOFILE"
        );
    }
    fit
}

/// Says when an event of a recurring kind should be logged: the first of a
/// burst at once, then at most once per `window`, with how many were not
/// logged in between.
#[derive(Debug)]
pub struct BurstLog {
    window: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl BurstLog {
    /// A burst log with the given quiet window.
    pub const fn new(window: Duration) -> Self {
        Self {
            window,
            last: None,
            suppressed: 0,
        }
    }

    /// Records an event at `now`. `Some(n)`: log it, mentioning `n` earlier
    /// events that were not logged; `None`: stay quiet.
    pub fn hit(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.duration_since(last) < self.window => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// A [`BurstLog`] shared between tasks.
#[derive(Debug)]
pub struct SharedBurstLog(Mutex<BurstLog>);

impl SharedBurstLog {
    /// A shared burst log with the given window.
    pub const fn new(window: Duration) -> Self {
        Self(Mutex::new(BurstLog::new(window)))
    }

    /// See [`BurstLog::hit`].
    pub fn hit(&self) -> Option<u64> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .hit(Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_user_limit_leaves_room_for_others() {
        let l = Limiter::new(4, 2);
        let a1 = l.admit(1000).unwrap();
        let _a2 = l.admit(1000).unwrap();
        assert_eq!(l.admit(1000).unwrap_err(), LimitHit::PerUser);
        let _b1 = l.admit(1001).unwrap();
        let _b2 = l.admit(1001).unwrap();
        assert_eq!(l.admit(1002).unwrap_err(), LimitHit::Total);
        drop(a1);
        assert_eq!(l.open_by(1000), 1);
        assert!(l.admit(1000).is_ok());
    }

    #[test]
    fn refused_admissions_do_not_leak_slots() {
        let l = Limiter::new(2, 1);
        let a = l.admit(5).unwrap();
        for _ in 0..100 {
            assert!(l.admit(5).is_err());
        }
        assert!(l.admit(6).is_ok());
        drop(a);
        assert_eq!(l.open_by(5), 0);
    }

    #[test]
    fn connections_fit_the_descriptor_limit() {
        assert_eq!(connections_that_fit(4096, 65536), 4096);
        assert_eq!(connections_that_fit(4096, 2 * 4096 + 256), 4096);
        assert_eq!(connections_that_fit(4096, 2 * 4096 + 255), 4095);
        assert_eq!(connections_that_fit(4096, 1024), 384);
        assert_eq!(connections_that_fit(4096, 100), 1);
        assert_eq!(connections_that_fit(10, u64::MAX), 10);
    }

    #[test]
    fn burst_is_logged_once_per_window() {
        let mut b = BurstLog::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(b.hit(t0), Some(0));
        for i in 1..=99 {
            assert_eq!(b.hit(t0 + Duration::from_millis(i)), None);
        }
        assert_eq!(b.hit(t0 + Duration::from_secs(11)), Some(99));
        assert_eq!(b.hit(t0 + Duration::from_secs(12)), None);
    }
}
