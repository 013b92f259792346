//! Connection limits (`max_connections`, `max_connections_per_user`) and the
//! once-per-burst logging of events that could otherwise flood the log.
//!
//! `max_connections_per_user` is a bucket per uid known to have a passwd
//! entry, and one bucket shared by all the other uids (subordinate uids of a
//! user namespace, say): extra uids do not multiply anyone's share. When
//! that shared bucket is full, a connection waits (outside the accept loop,
//! holding one of [`MAX_PENDING_LOOKUPS`] places) for a lookup of its uid: a
//! uid the user database knows beyond `/etc/passwd` (LDAP, sssd, userdb)
//! then gets a bucket of its own instead of being refused.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

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

/// The same for the one bucket of uids without a passwd entry.
pub static UNLISTED_REACHED: Kind = Kind {
    name:
        "connection limit max_connections_per_user (shared by uids without a passwd entry) reached",
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
    /// `max_connections_per_user` of the bucket shared by uids without a
    /// (known) passwd entry
    Unlisted,
}

/// Connections at once held (not yet admitted) while their uid is looked
/// up because the shared bucket was full; beyond, such a connection is
/// refused at once (and its uid looked up in the background).
pub const MAX_PENDING_LOOKUPS: usize = 32;

/// Admits connections within the limits.
#[derive(Debug)]
pub struct Limiter {
    total: Arc<Semaphore>,
    /// Places of connections waiting for their uid's lookup.
    pending: Arc<Semaphore>,
    /// Open connections per bucket: `Some(uid)`, or `None` for the bucket
    /// shared by uids without a known passwd entry.
    per_user: Mutex<HashMap<Option<u32>, u32>>,
    max_per_user: std::sync::atomic::AtomicU32,
}

/// Held for the life of an admitted connection; frees its slots on drop.
#[derive(Debug)]
pub struct Admission {
    limiter: Arc<Limiter>,
    bucket: Option<u32>,
    _total: OwnedSemaphorePermit,
}

impl Limiter {
    /// A limiter with the given limits.
    pub fn new(max_total: u32, max_per_user: u32) -> Arc<Self> {
        Arc::new(Self {
            total: Arc::new(Semaphore::new(max_total as usize)),
            pending: Arc::new(Semaphore::new(MAX_PENDING_LOOKUPS)),
            per_user: Mutex::new(HashMap::new()),
            max_per_user: max_per_user.into(),
        })
    }

    /// Changes the per-user limit (on reload); open connections stay open.
    pub fn set_max_per_user(&self, max: u32) {
        self.max_per_user
            .store(max, std::sync::atomic::Ordering::Relaxed);
    }

    /// Admits a connection from `uid`, counted in its own bucket when it is
    /// `listed` (known to have a passwd entry), else in the shared one; or
    /// says which limit it hits.
    pub fn admit(self: &Arc<Self>, uid: u32, listed: bool) -> Result<Admission, LimitHit> {
        let total = Arc::clone(&self.total)
            .try_acquire_owned()
            .map_err(|_| LimitHit::Total)?;
        let bucket = listed.then_some(uid);
        let max = self.max_per_user.load(std::sync::atomic::Ordering::Relaxed);
        let mut map = self.per_user.lock().unwrap_or_else(PoisonError::into_inner);
        let count = map.entry(bucket).or_insert(0);
        if *count >= max {
            return Err(if listed {
                LimitHit::PerUser
            } else {
                LimitHit::Unlisted
            });
        }
        *count += 1;
        Ok(Admission {
            limiter: Arc::clone(self),
            bucket,
            _total: total,
        })
    }

    /// A place for a connection refused by the shared bucket to wait for
    /// its uid's lookup, while fewer than [`MAX_PENDING_LOOKUPS`] do.
    pub fn pending_lookup(&self) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.pending).try_acquire_owned().ok()
    }

    /// Connections open now in `uid`'s own bucket.
    pub fn open_by(&self, uid: u32) -> u32 {
        self.open_in(Some(uid))
    }

    /// Connections open now in the bucket shared by unlisted uids.
    pub fn open_unlisted(&self) -> u32 {
        self.open_in(None)
    }

    fn open_in(&self, bucket: Option<u32>) -> u32 {
        let map = self.per_user.lock().unwrap_or_else(PoisonError::into_inner);
        map.get(&bucket).copied().unwrap_or(0)
    }
}

impl Admission {
    /// Moves a connection counted in the shared bucket to `uid`'s own, once a
    /// lookup found a passwd entry for it (when that bucket has room; else
    /// it stays where it is).
    pub fn move_to(&mut self, uid: u32) {
        if self.bucket.is_some() {
            return;
        }
        let max = self
            .limiter
            .max_per_user
            .load(std::sync::atomic::Ordering::Relaxed);
        let mut map = self
            .limiter
            .per_user
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if map.get(&Some(uid)).copied().unwrap_or(0) >= max {
            return;
        }
        *map.entry(Some(uid)).or_insert(0) += 1;
        release(&mut map, None);
        self.bucket = Some(uid);
    }
}

fn release(map: &mut HashMap<Option<u32>, u32>, bucket: Option<u32>) {
    if let Some(count) = map.get_mut(&bucket) {
        *count = count.saturating_sub(1);
        if *count == 0 {
            map.remove(&bucket);
        }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut map = self
            .limiter
            .per_user
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        release(&mut map, self.bucket);
    }
}

/// Descriptors kept free beyond the two per connection (client and
/// upstream): the listener, the log, the runtime's own, a spawned agent's
/// pipes, user-database lookups running at once (at most
/// `lookups::LISTED_LOOKUPS + lookups::UNLISTED_LOOKUPS`, each may open
/// files or sockets), and connections waiting for their uid's lookup (at
/// most [`MAX_PENDING_LOOKUPS`]). Those lookups must not run out: glibc reports a
/// database it could not open as "no such user" (see `caller::lookup`).
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_user_limit_leaves_room_for_others() {
        let l = Limiter::new(4, 2);
        let a1 = l.admit(1000, true).unwrap();
        let _a2 = l.admit(1000, true).unwrap();
        assert_eq!(l.admit(1000, true).unwrap_err(), LimitHit::PerUser);
        let _b1 = l.admit(1001, true).unwrap();
        let _b2 = l.admit(1001, true).unwrap();
        assert_eq!(l.admit(1002, true).unwrap_err(), LimitHit::Total);
        drop(a1);
        assert_eq!(l.open_by(1000), 1);
        assert!(l.admit(1000, true).is_ok());
    }

    #[test]
    fn refused_admissions_do_not_leak_slots() {
        let l = Limiter::new(2, 1);
        let a = l.admit(5, true).unwrap();
        for _ in 0..100 {
            assert!(l.admit(5, true).is_err());
        }
        assert!(l.admit(6, true).is_ok());
        drop(a);
        assert_eq!(l.open_by(5), 0);
        assert!(l.per_user.lock().unwrap().is_empty());
    }

    #[test]
    fn pending_lookups_are_bounded() {
        let l = Limiter::new(10, 1);
        let held: Vec<_> = (0..MAX_PENDING_LOOKUPS)
            .map(|_| l.pending_lookup().unwrap())
            .collect();
        assert!(l.pending_lookup().is_none());
        drop(held);
        assert!(l.pending_lookup().is_some());
    }

    #[test]
    fn unlisted_uids_share_one_bucket() {
        let l = Limiter::new(100, 3);
        let held: Vec<Admission> = (0..3)
            .map(|i| l.admit(100_000 + i, false).unwrap())
            .collect();
        for uid in 200_000..200_050 {
            assert_eq!(l.admit(uid, false).unwrap_err(), LimitHit::Unlisted);
        }
        assert_eq!(l.open_unlisted(), 3);
        // A listed user still has its own bucket.
        let _own: Vec<Admission> = (0..3).map(|_| l.admit(1000, true).unwrap()).collect();
        assert_eq!(l.admit(1000, true).unwrap_err(), LimitHit::PerUser);
        drop(held);
        assert_eq!(l.open_unlisted(), 0);
    }

    #[test]
    fn a_connection_moves_to_its_own_bucket_when_room() {
        let l = Limiter::new(100, 2);
        let mut a = l.admit(1000, false).unwrap();
        let mut b = l.admit(1000, false).unwrap();
        assert_eq!(l.open_unlisted(), 2);
        a.move_to(1000);
        a.move_to(1000);
        assert_eq!((l.open_unlisted(), l.open_by(1000)), (1, 1));
        let _c = l.admit(1000, true).unwrap();
        // Own bucket full: b stays counted in the shared one.
        b.move_to(1000);
        assert_eq!((l.open_unlisted(), l.open_by(1000)), (1, 2));
        drop((a, b));
        assert_eq!((l.open_unlisted(), l.open_by(1000)), (0, 1));
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
}
