//! Who the caller is, for each request: a short per-uid cache in front of
//! the user database ([`caller::lookup`]), and the bounded, deadline-limited
//! way lookups run.
//!
//! - An answer is reused for at most `limits.lookup_cache_secs`, counted
//!   from when its lookup was started, and never across a change of
//!   `/etc/passwd` or `/etc/group` (watched with inotify, asked at each
//!   use; where inotify cannot watch them, device, inode, size, mtime and
//!   ctime compared with two `stat`s at each use: see
//!   [`super::userdb_watch`]) or a SIGHUP ([`Lookups::clear`]).
//!   Requests that arrive while a lookup runs wait for it only when its
//!   answer would be fresh enough for them as a cached one; with no cache,
//!   every request gets a lookup started after it arrived.
//! - Lookups run on blocking threads, at most [`LISTED_LOOKUPS`] at once
//!   for uids known to have a passwd entry and [`UNLISTED_LOOKUPS`] for the
//!   others (so uids without an entry, which anyone with subordinate uids
//!   has plenty of, cannot crowd out real users' lookups). Each waiter gives
//!   up at its own deadline (`limits.lookup_timeout_secs`); a lookup that
//!   hangs is left to finish on its thread, still holding its slot, and a
//!   uid with [`MAX_OVERDUE`] such lookups gets no more until one returns.
//! - [`Lookups::listed`] says, without waiting, whether a uid is known to
//!   have a passwd entry (a line of `/etc/passwd`, or an earlier lookup),
//!   for the connection buckets of the accept loop.
//!
//! Never: blocks an async thread on the user database, decides what a
//! caller may do (that is [`crate::policy`]), or hands out an answer older
//! than the cache allows.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use tokio::sync::{watch, Semaphore};

use super::caller::{self, Entry};
use super::userdb_watch::{Seen, UserDbWatch};
use crate::policy::Caller;
use crate::ratelog::{Kind, RateLog, Who as LogWho};

/// The local user database read by the accept loop (its changes, and
/// /etc/group's, drop the cache: see [`super::userdb_watch`]).
const PASSWD: &str = "/etc/passwd";
/// Lookups at once for uids known to have a passwd entry.
pub const LISTED_LOOKUPS: usize = 16;
/// Lookups at once for the other uids.
pub const UNLISTED_LOOKUPS: usize = 4;
/// Lookups still running past their deadline for one uid, beyond which that
/// uid's requests are refused at once rather than starting another.
pub const MAX_OVERDUE: usize = 2;
/// Background lookups ([`Lookups::prefetch`]) waiting at once, at most.
const MAX_PREFETCHES: usize = 64;
/// uids remembered as having a passwd entry, at most (then forgotten all
/// at once: only the connection bucket of their next connection changes).
const MAX_REMEMBERED: usize = 65_536;
/// The cache is pruned of stale answers when it holds more than this.
const PRUNE_AT: usize = 1024;
/// Answers cached at most (beyond, new answers are not kept: a flood of
/// distinct uids costs lookups, not memory).
const MAX_CACHED: usize = 8192;
/// Lookup timeouts: the first of a burst, then a count per window.
pub static LOOKUP_TIMED_OUT: Kind = Kind {
    name: "user lookup timeouts",
    burst: 1,
    level: tracing::Level::WARN,
};

/// The result of resolving a caller for one request.
#[derive(Debug)]
pub enum Who {
    /// From the user database (fresh, or cached within the allowed age).
    Known(Caller),
    /// The lookup missed its deadline: the caller, with no user name and
    /// no groups (see [`crate::policy::decide_unresolved`]).
    TimedOut(Caller),
    /// The user database failed (rather than finding no such user): the
    /// caller with no user name and no groups, and the error.
    Failed(Caller, Errno),
}

/// Counts since the daemon started.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LookupStats {
    /// Lookups run in the user database.
    pub run: u64,
    /// Requests answered from the cache or from a lookup already running.
    pub reused: u64,
    /// Requests whose lookup missed its deadline.
    pub timed_out: u64,
}

/// How a lookup ended.
#[derive(Debug, Clone)]
enum Done {
    Found(Arc<Entry>),
    Failed(Errno),
    /// No lookup slot came free before the deadline.
    NoSlot,
}

/// One lookup, running or finished; requests that may use its answer wait
/// on `done`.
#[derive(Debug)]
struct Flight {
    id: u64,
    /// When it was asked for: its answer counts as this old.
    created: Instant,
    generation: u64,
    configured: Arc<[String]>,
    done: watch::Receiver<Option<Done>>,
}

impl Flight {
    /// Whether a request that arrived at `now` may use this flight's answer.
    fn usable(
        &self,
        now: Instant,
        cache: Duration,
        generation: u64,
        configured: &[String],
    ) -> bool {
        usable(
            self.created,
            now,
            cache,
            self.generation == generation && *self.configured == *configured,
        ) && !matches!(*self.done.borrow(), Some(Done::Failed(_) | Done::NoSlot))
    }
}

/// The freshness rule: an answer asked for at `created` serves a request
/// that arrived at `now` only within the cache age, and only if nothing
/// invalidated it since (`valid`).
fn usable(created: Instant, now: Instant, cache: Duration, valid: bool) -> bool {
    valid && now.saturating_duration_since(created) < cache
}

#[derive(Debug, Default)]
struct State {
    /// Whether /etc/passwd or /etc/group changed.
    files: UserDbWatch,
    /// The files as last seen; `None` before the first look and after a
    /// SIGHUP.
    seen: Option<Seen>,
    /// Bumped whenever the cache is dropped.
    generation: u64,
    /// The latest lookup per uid, while the cache is on.
    latest: HashMap<u32, Arc<Flight>>,
    /// Lookups not finished yet, per uid: (flight id, created).
    running: HashMap<u32, Vec<(u64, Instant)>>,
    /// uids with a line in /etc/passwd.
    local: HashSet<u32>,
    /// uids a lookup found a passwd entry for.
    remembered: HashSet<u32>,
    next_id: u64,
    prune_at: usize,
}

impl State {
    /// Drops the cache when the files changed since last seen.
    fn refresh(&mut self) {
        let now = self.files.seen();
        if self.seen == Some(now) {
            return;
        }
        self.seen = Some(now);
        self.generation += 1;
        self.latest.clear();
        if let Some(local) = local_uids() {
            self.local = local;
        }
    }

    fn listed(&self, uid: u32) -> bool {
        self.local.contains(&uid) || self.remembered.contains(&uid)
    }

    fn overdue(&self, uid: u32, now: Instant, timeout: Duration) -> usize {
        self.running.get(&uid).map_or(0, |r| {
            r.iter()
                .filter(|(_, created)| now.saturating_duration_since(*created) >= timeout)
                .count()
        })
    }

    fn prune(&mut self, now: Instant, cache: Duration) {
        if self.latest.len() <= self.prune_at.max(PRUNE_AT) {
            return;
        }
        self.latest
            .retain(|_, f| now.saturating_duration_since(f.created) < cache);
        self.prune_at = self.latest.len() * 2;
    }
}

/// The uids of /etc/passwd, read directly (the local file is what the
/// accept loop may consult without waiting); `None` when unreadable.
fn local_uids() -> Option<HashSet<u32>> {
    let text = std::fs::read(PASSWD).ok()?;
    Some(parse_passwd_uids(&text))
}

fn parse_passwd_uids(text: &[u8]) -> HashSet<u32> {
    text.split(|&b| b == b'\n')
        .filter_map(|line| {
            let uid = line.split(|&b| b == b':').nth(2)?;
            std::str::from_utf8(uid).ok()?.parse().ok()
        })
        .collect()
}

/// The lookups of one daemon, shared by the accept loop and every connection.
#[derive(Debug)]
pub struct Lookups {
    state: Mutex<State>,
    listed_slots: Arc<Semaphore>,
    unlisted_slots: Arc<Semaphore>,
    prefetching: AtomicUsize,
    log: Arc<RateLog>,
    run: AtomicU64,
    reused: AtomicU64,
    timed_out: AtomicU64,
}

/// Why no flight was found or started.
struct Overdue;

impl Lookups {
    /// Lookups with an empty cache.
    pub fn new(log: Arc<RateLog>) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State::default()),
            listed_slots: Arc::new(Semaphore::new(LISTED_LOOKUPS)),
            unlisted_slots: Arc::new(Semaphore::new(UNLISTED_LOOKUPS)),
            prefetching: AtomicUsize::new(0),
            log,
            run: AtomicU64::new(0),
            reused: AtomicU64::new(0),
            timed_out: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Drops every cached answer (SIGHUP): the next request of every caller
    /// gets a fresh lookup.
    pub fn clear(&self) {
        let mut st = self.lock();
        st.seen = None;
        st.generation += 1;
        st.latest.clear();
    }

    /// Counts since start.
    pub fn stats(&self) -> LookupStats {
        LookupStats {
            run: self.run.load(Ordering::Relaxed),
            reused: self.reused.load(Ordering::Relaxed),
            timed_out: self.timed_out.load(Ordering::Relaxed),
        }
    }

    /// Whether `uid` is known to have a passwd entry: a line of
    /// /etc/passwd, or an earlier lookup that found one. Never waits for the
    /// user database (/etc/passwd is re-read when it changed).
    pub fn listed(&self, uid: u32) -> bool {
        let mut st = self.lock();
        st.refresh();
        st.listed(uid)
    }

    /// Starts a lookup of `uid` that nobody waits for (unless one that a
    /// request arriving now could use is already there), so that the next
    /// connection of `uid` is put in the right bucket. Skipped when many
    /// are waiting already.
    pub fn prefetch(
        self: &Arc<Self>,
        uid: u32,
        configured: &Arc<[String]>,
        cache: Duration,
        timeout: Duration,
    ) {
        if self.prefetching.load(Ordering::Relaxed) >= MAX_PREFETCHES {
            return;
        }
        // Not kept in the cache: what matters is that the uid is remembered.
        if let Ok((flight, _)) = self.flight(uid, configured, cache, timeout, Instant::now(), false)
        {
            self.prefetching.fetch_add(1, Ordering::Relaxed);
            let this = Arc::clone(self);
            let mut done = flight.done.clone();
            tokio::spawn(async move {
                let _ = done.wait_for(Option::is_some).await;
                this.prefetching.fetch_sub(1, Ordering::Relaxed);
            });
        }
    }

    /// Resolves the caller `uid` (connected from `pid`) for one request:
    /// its user name and which of `configured` it is in, at most `cache`
    /// old, waiting at most `timeout`.
    pub async fn caller(
        self: &Arc<Self>,
        uid: u32,
        pid: Option<i32>,
        configured: &Arc<[String]>,
        cache: Duration,
        timeout: Duration,
    ) -> Who {
        let arrived = Instant::now();
        let unresolved = || Caller {
            uid,
            pid,
            user: None,
            groups: Vec::new(),
        };
        let flight = match self.flight(uid, configured, cache, timeout, arrived, true) {
            Ok((flight, reused)) => {
                if reused {
                    self.reused.fetch_add(1, Ordering::Relaxed);
                }
                flight
            }
            Err(Overdue) => {
                self.note_timeout(uid, timeout, true);
                return Who::TimedOut(unresolved());
            }
        };
        // A cached answer: no timer needed.
        let ready = flight.done.borrow().clone();
        let outcome = match ready {
            Some(done) => Ok(Ok(Some(done))),
            None => {
                let mut done = flight.done.clone();
                let deadline = arrived.checked_add(timeout).unwrap_or(arrived);
                tokio::time::timeout_at(deadline.into(), async {
                    done.wait_for(Option::is_some).await.map(|d| d.clone())
                })
                .await
            }
        };
        match outcome {
            Ok(Ok(Some(Done::Found(entry)))) => Who::Known(entry.caller(uid, pid)),
            Ok(Ok(Some(Done::Failed(e)))) => Who::Failed(unresolved(), e),
            // The lookup task ended without an answer: only at shutdown.
            Ok(Err(_)) => Who::Failed(unresolved(), Errno::ECANCELED),
            Ok(Ok(Some(Done::NoSlot) | None)) | Err(_) => {
                self.note_timeout(uid, timeout, false);
                Who::TimedOut(unresolved())
            }
        }
    }

    fn note_timeout(&self, uid: u32, timeout: Duration, overdue: bool) {
        self.timed_out.fetch_add(1, Ordering::Relaxed);
        if self.log.allow(&LOOKUP_TIMED_OUT, LogWho::Unattributed) {
            let why = if overdue {
                "earlier lookups are still running past"
            } else {
                "the user database did not answer within"
            };
            tracing::warn!(
                "user lookup of uid={uid} timed out ({why} lookup_timeout_secs={}): \
                 refusing its requests that need its groups (user-lookup-timeout); other \
                 callers are served",
                timeout.as_secs()
            );
        }
    }

    /// A lookup whose answer a request arriving at `now` may use: one
    /// already there (`true`), or a new one (`false`), kept in the cache
    /// when `keep`.
    fn flight(
        self: &Arc<Self>,
        uid: u32,
        configured: &Arc<[String]>,
        cache: Duration,
        timeout: Duration,
        now: Instant,
        keep: bool,
    ) -> Result<(Arc<Flight>, bool), Overdue> {
        let mut st = self.lock();
        st.refresh();
        let generation = st.generation;
        if let Some(f) = st.latest.get(&uid) {
            if f.usable(now, cache, generation, configured) {
                return Ok((Arc::clone(f), true));
            }
        }
        if st.overdue(uid, now, timeout) >= MAX_OVERDUE {
            return Err(Overdue);
        }
        let id = st.next_id;
        st.next_id += 1;
        let (tx, rx) = watch::channel(None);
        let flight = Arc::new(Flight {
            id,
            created: now,
            generation,
            configured: Arc::clone(configured),
            done: rx,
        });
        st.running.entry(uid).or_default().push((id, now));
        if keep && !cache.is_zero() {
            st.prune(now, cache);
            if st.latest.len() < MAX_CACHED || st.latest.contains_key(&uid) {
                st.latest.insert(uid, Arc::clone(&flight));
            }
        }
        let slots = if st.listed(uid) {
            &self.listed_slots
        } else {
            &self.unlisted_slots
        };
        let slots = Arc::clone(slots);
        drop(st);
        let deadline = now.checked_add(timeout).unwrap_or(now);
        tokio::spawn(Arc::clone(self).run(uid, id, Arc::clone(configured), slots, deadline, tx));
        Ok((flight, false))
    }

    /// Runs one lookup: waits for a slot until `deadline`, then looks up on
    /// a blocking thread for as long as the user database takes.
    async fn run(
        self: Arc<Self>,
        uid: u32,
        id: u64,
        configured: Arc<[String]>,
        slots: Arc<Semaphore>,
        deadline: Instant,
        tx: watch::Sender<Option<Done>>,
    ) {
        let slot = tokio::time::timeout_at(deadline.into(), slots.acquire_owned()).await;
        let done = match slot {
            Ok(Ok(slot)) => {
                self.run.fetch_add(1, Ordering::Relaxed);
                let lookup = tokio::task::spawn_blocking(move || {
                    let result = caller::lookup(uid, &configured);
                    drop(slot);
                    result
                });
                match lookup.await {
                    Ok(Ok(entry)) => Done::Found(Arc::new(entry)),
                    Ok(Err(e)) => Done::Failed(e),
                    Err(_) => Done::Failed(Errno::EIO),
                }
            }
            Ok(Err(_)) => Done::Failed(Errno::EIO),
            Err(_) => Done::NoSlot,
        };
        let user = match &done {
            Done::Found(entry) => Some(entry.user.is_some()),
            _ => None,
        };
        tx.send_replace(Some(done));
        let mut st = self.lock();
        if let Some(running) = st.running.get_mut(&uid) {
            running.retain(|(i, _)| *i != id);
            if running.is_empty() {
                st.running.remove(&uid);
            }
        }
        match user {
            Some(true) => {
                if st.remembered.len() >= MAX_REMEMBERED {
                    st.remembered.clear();
                }
                st.remembered.insert(uid);
            }
            Some(false) => {
                st.remembered.remove(&uid);
            }
            None => {
                if st.latest.get(&uid).is_some_and(|f| f.id == id) {
                    st.latest.remove(&uid);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_fresh_within_the_cache_age_only() {
        let t0 = Instant::now();
        let five = Duration::from_secs(5);
        assert!(usable(t0, t0, five, true));
        assert!(usable(t0, t0 + Duration::from_millis(4999), five, true));
        assert!(!usable(t0, t0 + five, five, true));
        // Invalidated (files changed, SIGHUP, other groups configured).
        assert!(!usable(t0, t0, five, false));
        // No cache: not even a lookup started a moment before.
        assert!(!usable(t0, t0, Duration::ZERO, true));
        // A flight created after the request arrived (clock order) is fine.
        assert!(usable(t0 + Duration::from_millis(1), t0, five, true));
    }

    #[test]
    fn passwd_uids_are_read_from_the_third_field() {
        let text = b"root:x:0:0:root:/root:/bin/bash\n\
                     kht-a:x:1001:1001::/nonexistent:/bin/sh\n\
                     # comment\n\
                     broken\n\
                     +nis::::\n\
                     neg:x:-1:0::/:/bin/sh\n";
        let uids = parse_passwd_uids(text);
        assert_eq!(uids, HashSet::from([0, 1001]));
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn root_is_listed_and_resolved_then_reused_from_the_cache() {
        rt().block_on(async {
            let (_stop, stopped) = tokio::sync::watch::channel(false);
            let l = Lookups::new(RateLog::start(crate::ratelog::DEFAULT_WINDOW, stopped));
            assert!(l.listed(0));
            assert!(!l.listed(3_999_999_998));
            let groups: Arc<[String]> = vec!["root".to_owned()].into();
            let five = Duration::from_secs(5);
            for _ in 0..3 {
                match l.caller(0, Some(1), &groups, five, five).await {
                    Who::Known(c) => {
                        assert_eq!(c.user.as_deref(), Some("root"));
                        assert_eq!(c.groups, ["root"]);
                    }
                    other => panic!("{other:?}"),
                }
            }
            assert_eq!(l.stats().run, 1);
            assert_eq!(l.stats().reused, 2);
            // Other groups configured: not the same answer.
            let none: Arc<[String]> = Vec::new().into();
            assert!(matches!(l.caller(0, None, &none, five, five).await, Who::Known(c) if c.groups.is_empty()));
            assert_eq!(l.stats().run, 2);
            // SIGHUP drops the cache.
            l.clear();
            let _ = l.caller(0, None, &groups, five, five).await;
            assert_eq!(l.stats().run, 3);
            // No cache: a lookup for every request.
            for _ in 0..3 {
                let _ = l.caller(0, None, &groups, Duration::ZERO, five).await;
            }
            assert_eq!(l.stats().run, 6);
        });
    }

    #[test]
    fn a_uid_without_passwd_entry_is_remembered_as_such() {
        rt().block_on(async {
            let (_stop, stopped) = tokio::sync::watch::channel(false);
            let l = Lookups::new(RateLog::start(crate::ratelog::DEFAULT_WINDOW, stopped));
            let uid = 3_999_999_997;
            let groups: Arc<[String]> = vec!["root".to_owned()].into();
            let five = Duration::from_secs(5);
            match l.caller(uid, None, &groups, five, five).await {
                Who::Known(c) => {
                    assert_eq!(c.user, None);
                    assert!(c.groups.is_empty());
                }
                other => panic!("{other:?}"),
            }
            assert!(!l.listed(uid));
        });
    }
}
