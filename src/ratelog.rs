//! Rate-limited logging of lines a flood could repeat: refused requests,
//! connections refused by a limit or closed on a bad message, the spawned
//! agent's stderr, and errors that recur while a fault lasts (backend
//! errors, user database errors and timeouts, accept errors, a full
//! signing queue). The one mechanism for every such line.
//!
//! For each kind of line and each uid (a [`Who`]), the first
//! [`Kind::burst`] lines of a burst are written in full; later ones in the
//! same window are only counted. When the window ends a timer (a task, not
//! the next line) writes one summary line with the count, naming the kind
//! and the uid; while the flood goes on that is one line per window per uid.
//! A window in which nothing was suppressed ends the burst, and the next
//! line is written in full again. A line counted with a detail (for refused
//! requests: the reason and the key) is counted per detail too, and the
//! summary says how many of each (at most [`MAX_DETAILS`] distinct ones per
//! bucket; the rest are counted together as "other").
//!
//! Memory is bounded: at most [`MAX_TRACKED`] (kind, uid) pairs are tracked;
//! lines of further uids share one bucket per kind ([`Who::Others`]), and
//! uids without a passwd entry share one ([`Who::Unlisted`]).
//!
//! It sits below `daemon/` and `backend/` so both can use it. It must never
//! be used for lines that must always be written (granted or failed signs,
//! startup, reload, upstream loss), and it never blocks on the log.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};
use tracing::Level;

/// The window when `$KEYHOLDER_LOG_WINDOW_MS` does not set one.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(10);
/// (kind, uid) pairs tracked at once; beyond, uids share a bucket per kind.
pub const MAX_TRACKED: usize = 128;
/// Distinct details counted per bucket and window; further ones are
/// counted together.
pub const MAX_DETAILS: usize = 8;
/// Test-only override of the window, in milliseconds (not a contract
/// setting: the tests shorten the window to see summaries quickly).
pub const WINDOW_ENV: &str = "KEYHOLDER_LOG_WINDOW_MS";

/// A kind of line that is rate-limited.
#[derive(Debug, PartialEq, Eq)]
pub struct Kind {
    /// What the lines report, as the summary names it (unique per kind).
    pub name: &'static str,
    /// Lines written in full at the start of a burst.
    pub burst: u32,
    /// The level of the summary line.
    pub level: Level,
}

/// Whose lines a bucket counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Who {
    /// One uid.
    Uid(u32),
    /// Every uid beyond [`MAX_TRACKED`].
    Others,
    /// uids with no passwd entry, together (a user's subordinate uids must
    /// not take a bucket each, or push others' uids out).
    Unlisted,
    /// Lines that belong to no uid (the agent's stderr).
    Unattributed,
}

impl std::fmt::Display for Who {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Uid(uid) => write!(f, " for uid={uid}"),
            Self::Others => f.write_str(" for other uids"),
            Self::Unlisted => f.write_str(" for uids without a passwd entry"),
            Self::Unattributed => Ok(()),
        }
    }
}

#[derive(Debug)]
struct Bucket {
    kind: &'static Kind,
    /// When the current window ends.
    ends: Instant,
    /// Lines that may still be written in full in this burst.
    allowance: u32,
    /// Lines counted but not written in the current window.
    suppressed: u64,
    /// Of those, how many per detail, in order of first appearance.
    details: Vec<(String, u64)>,
}

impl Bucket {
    /// Counts one more suppressed line, with its detail if any.
    fn suppress(&mut self, detail: Option<String>) {
        self.suppressed += 1;
        let Some(detail) = detail else { return };
        if let Some(d) = self.details.iter_mut().find(|(d, _)| *d == detail) {
            d.1 += 1;
        } else if self.details.len() < MAX_DETAILS {
            self.details.push((detail, 1));
        } else if let Some(d) = self.details.iter_mut().find(|(d, _)| d == OTHER) {
            d.1 += 1;
        } else if let Some(last) = self.details.last_mut() {
            // The last slot becomes "other", keeping its count.
            last.0 = OTHER.to_owned();
            last.1 += 1;
        }
    }
}

/// The detail under which details beyond [`MAX_DETAILS`] are counted.
const OTHER: &str = "other";

/// A summary due at the end of a window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// The kind of line.
    pub kind: &'static Kind,
    /// Whose lines.
    pub who: Who,
    /// How many were not written.
    pub suppressed: u64,
    /// Of those, how many per detail (empty when counted without one).
    pub details: Vec<(String, u64)>,
}

/// The bookkeeping, without clock or log (unit-tested on its own).
#[derive(Debug)]
struct Tracker {
    window: Duration,
    cap: usize,
    buckets: HashMap<(&'static str, Who), Bucket>,
}

impl Tracker {
    fn new(window: Duration, cap: usize) -> Self {
        Self {
            window,
            cap,
            buckets: HashMap::new(),
        }
    }

    /// Records a line at `now`: `(write it?, a new window started?)`.
    #[cfg(test)]
    fn hit(&mut self, kind: &'static Kind, who: Who, now: Instant) -> (bool, bool) {
        self.hit_with(kind, who, now, || None)
    }

    /// [`Tracker::hit`], counting a suppressed line under `detail()`.
    fn hit_with(
        &mut self,
        kind: &'static Kind,
        who: Who,
        now: Instant,
        detail: impl FnOnce() -> Option<String>,
    ) -> (bool, bool) {
        let tracked = self.buckets.len();
        let who = if tracked >= self.cap && !self.buckets.contains_key(&(kind.name, who)) {
            Who::Others
        } else {
            who
        };
        match self.buckets.get_mut(&(kind.name, who)) {
            Some(b) if b.allowance > 0 => {
                b.allowance -= 1;
                (true, false)
            }
            Some(b) => {
                b.suppress(detail());
                (false, false)
            }
            None => {
                let write = kind.burst > 0;
                let mut bucket = Bucket {
                    kind,
                    ends: now + self.window,
                    allowance: kind.burst.saturating_sub(1),
                    suppressed: 0,
                    details: Vec::new(),
                };
                if !write {
                    bucket.suppress(detail());
                }
                self.buckets.insert((kind.name, who), bucket);
                (write, true)
            }
        }
    }

    /// Ends every window that is over at `now`: returns their summaries. A
    /// bucket with suppressed lines starts a new window with no allowance
    /// (the flood goes on: one summary per window); one without is dropped.
    fn expire(&mut self, now: Instant) -> Vec<Summary> {
        let mut due = Vec::new();
        let window = self.window;
        self.buckets.retain(|&(_, who), b| {
            if b.ends > now {
                return true;
            }
            if b.suppressed == 0 {
                return false;
            }
            due.push(Summary {
                kind: b.kind,
                who,
                suppressed: std::mem::take(&mut b.suppressed),
                details: std::mem::take(&mut b.details),
            });
            b.allowance = 0;
            b.ends = now + window;
            true
        });
        due.sort_by_key(|s| (s.kind.name, summary_uid(s.who)));
        due
    }

    /// Every pending count, as at shutdown.
    fn drain(&mut self) -> Vec<Summary> {
        let mut due: Vec<Summary> = self
            .buckets
            .drain()
            .filter(|(_, b)| b.suppressed > 0)
            .map(|((_, who), b)| Summary {
                kind: b.kind,
                who,
                suppressed: b.suppressed,
                details: b.details,
            })
            .collect();
        due.sort_by_key(|s| (s.kind.name, summary_uid(s.who)));
        due
    }

    fn next_end(&self) -> Option<Instant> {
        self.buckets.values().map(|b| b.ends).min()
    }
}

fn summary_uid(who: Who) -> u32 {
    match who {
        Who::Uid(uid) => uid,
        Who::Others | Who::Unlisted | Who::Unattributed => u32::MAX,
    }
}

/// The rate limiter shared by every task; its timer runs in its own task.
#[derive(Debug)]
pub struct RateLog {
    window: Duration,
    tracker: Mutex<Tracker>,
    wake: Notify,
}

impl RateLog {
    /// A rate log with `window`, whose timer task runs until `shutdown`
    /// (then writes what is still pending). Call within a tokio runtime.
    pub fn start(window: Duration, shutdown: watch::Receiver<bool>) -> Arc<Self> {
        let log = Arc::new(Self {
            window,
            tracker: Mutex::new(Tracker::new(window, MAX_TRACKED)),
            wake: Notify::new(),
        });
        tokio::spawn(Arc::clone(&log).run(shutdown));
        log
    }

    /// The window: `$KEYHOLDER_LOG_WINDOW_MS` (tests only, 10 ms to 1 h) or
    /// [`DEFAULT_WINDOW`].
    pub fn window_from_env() -> Duration {
        std::env::var(WINDOW_ENV)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(DEFAULT_WINDOW, |ms| {
                Duration::from_millis(ms.clamp(10, 3_600_000))
            })
    }

    /// Counts a line of `kind` for `who`; `true`: write it now.
    pub fn allow(&self, kind: &'static Kind, who: Who) -> bool {
        self.allow_with(kind, who, || None)
    }

    /// [`RateLog::allow`]; a line not written is counted under `detail()`
    /// (called only then), which the summary breaks its count down by.
    pub fn allow_with(
        &self,
        kind: &'static Kind,
        who: Who,
        detail: impl FnOnce() -> Option<String>,
    ) -> bool {
        let (write, new_window) = self.lock().hit_with(kind, who, Instant::now(), detail);
        if new_window {
            self.wake.notify_one();
        }
        write
    }

    async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        loop {
            let next = self.lock().next_end();
            let sleep = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = sleep => {}
                () = self.wake.notified() => continue,
                () = crate::shutdown::stopped(&mut shutdown) => {
                    let due = self.lock().drain();
                    self.write(&due);
                    return;
                }
            }
            let due = self.lock().expire(Instant::now());
            self.write(&due);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tracker> {
        self.tracker.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self, due: &[Summary]) {
        for s in due {
            emit(s.kind.level, &summary_line(s, self.window));
        }
    }
}

/// The text of a summary line; with details,
/// `… COUNT more in the last 10 s (DETAIL: N; DETAIL: N), not logged one by one`.
pub fn summary_line(s: &Summary, window: Duration) -> String {
    let details = if s.details.is_empty() {
        String::new()
    } else {
        let each: Vec<String> = s.details.iter().map(|(d, n)| format!("{d}: {n}")).collect();
        format!(" ({})", each.join("; "))
    };
    format!(
        "{}{}: {} more in the last {}{details}, not logged one by one",
        s.kind.name,
        s.who,
        s.suppressed,
        show(window)
    )
}

fn show(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{} ms", d.as_millis())
    }
}

/// Writes `line` at `level` (tracing's macros need the level as a constant).
pub fn emit(level: Level, line: &str) {
    if level == Level::ERROR {
        tracing::error!("{line}");
    } else if level == Level::WARN {
        tracing::warn!("{line}");
    } else if level == Level::INFO {
        tracing::info!("{line}");
    } else if level == Level::DEBUG {
        tracing::debug!("{line}");
    } else {
        tracing::trace!("{line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static A: Kind = Kind {
        name: "a",
        burst: 3,
        level: Level::INFO,
    };
    static B: Kind = Kind {
        name: "b",
        burst: 1,
        level: Level::WARN,
    };

    const W: Duration = Duration::from_secs(10);

    fn writes(t: &mut Tracker, kind: &'static Kind, who: Who, n: usize, now: Instant) -> usize {
        (0..n).filter(|_| t.hit(kind, who, now).0).count()
    }

    #[test]
    fn a_burst_is_written_in_full_then_counted_then_summarised_per_window() {
        let mut t = Tracker::new(W, 16);
        let t0 = Instant::now();
        assert_eq!(writes(&mut t, &A, Who::Uid(7), 1000, t0), 3);
        assert_eq!(t.next_end(), Some(t0 + W));
        assert!(t.expire(t0 + W / 2).is_empty());
        let s = t.expire(t0 + W);
        assert_eq!(
            s,
            [Summary {
                kind: &A,
                who: Who::Uid(7),
                suppressed: 997,
                details: vec![]
            }]
        );
        // The flood goes on: nothing in full, one summary per window.
        let t1 = t0 + W;
        assert_eq!(writes(&mut t, &A, Who::Uid(7), 50, t1), 0);
        assert_eq!(t.expire(t1 + W)[0].suppressed, 50);
        // A quiet window ends the burst; the next line is written in full.
        assert!(t.expire(t1 + 2 * W).is_empty());
        assert_eq!(t.next_end(), None);
        assert_eq!(writes(&mut t, &A, Who::Uid(7), 5, t1 + 3 * W), 3);
    }

    #[test]
    fn uids_and_kinds_are_counted_apart() {
        let mut t = Tracker::new(W, 16);
        let t0 = Instant::now();
        assert_eq!(writes(&mut t, &B, Who::Uid(1), 100, t0), 1);
        assert_eq!(writes(&mut t, &B, Who::Uid(2), 5, t0), 1);
        assert_eq!(writes(&mut t, &A, Who::Uid(1), 5, t0), 3);
        let s = t.expire(t0 + W);
        let counts: Vec<_> = s
            .iter()
            .map(|s| (s.kind.name, s.who, s.suppressed))
            .collect();
        assert_eq!(
            counts,
            [
                ("a", Who::Uid(1), 2),
                ("b", Who::Uid(1), 99),
                ("b", Who::Uid(2), 4)
            ]
        );
    }

    #[test]
    fn few_lines_leave_no_summary() {
        let mut t = Tracker::new(W, 16);
        let t0 = Instant::now();
        assert_eq!(writes(&mut t, &A, Who::Uid(1), 3, t0), 3);
        assert!(t.expire(t0 + W).is_empty());
        assert!(t.buckets.is_empty());
    }

    #[test]
    fn memory_is_bounded_and_the_rest_share_a_bucket() {
        let mut t = Tracker::new(W, 4);
        let t0 = Instant::now();
        for uid in 0..10_000 {
            t.hit(&B, Who::Uid(uid), t0);
        }
        assert_eq!(t.buckets.len(), 5);
        // A tracked uid keeps its own bucket.
        assert_eq!(writes(&mut t, &B, Who::Uid(0), 1, t0), 0);
        let s = t.expire(t0 + W);
        let counts: Vec<_> = s.iter().map(|s| (s.who, s.suppressed)).collect();
        assert_eq!(counts, [(Who::Uid(0), 1), (Who::Others, 10_000 - 4 - 1)]);
    }

    #[test]
    fn shutdown_drains_every_pending_count() {
        let mut t = Tracker::new(W, 16);
        let t0 = Instant::now();
        writes(&mut t, &B, Who::Unattributed, 10, t0);
        writes(&mut t, &B, Who::Uid(3), 1, t0);
        assert_eq!(
            t.drain(),
            [Summary {
                kind: &B,
                who: Who::Unattributed,
                suppressed: 9,
                details: vec![]
            }]
        );
        assert!(t.buckets.is_empty());
    }

    #[tokio::test]
    async fn the_timer_writes_the_summary_without_a_further_line() {
        let out = crate::logging::Captured::default();
        let writer = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        let (stop, stopped) = watch::channel(false);
        let log = RateLog::start(Duration::from_millis(50), stopped);
        let written = (0..5).filter(|_| log.allow(&B, Who::Uid(1))).count();
        assert_eq!(written, 1);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert!(
            text.contains("WARN") && text.contains("b for uid=1: 4 more in the last 50 ms"),
            "{text}"
        );
        // Pending counts are written at shutdown.
        log.allow(&B, Who::Uid(2));
        log.allow(&B, Who::Uid(2));
        stop.send_replace(true);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert!(text.contains("b for uid=2: 1 more"), "{text}");
    }

    #[test]
    fn summary_lines_name_kind_uid_count_and_window() {
        static L: Kind = Kind {
            name: "connection limit max_connections_per_user reached",
            burst: 1,
            level: Level::WARN,
        };
        let s = Summary {
            kind: &L,
            who: Who::Uid(1001),
            suppressed: 483,
            details: vec![],
        };
        assert_eq!(
            summary_line(&s, W),
            "connection limit max_connections_per_user reached for uid=1001: 483 more in the \
             last 10 s, not logged one by one"
        );
        let s = Summary {
            who: Who::Unattributed,
            ..s
        };
        assert!(summary_line(&s, Duration::from_millis(1500))
            .contains("reached: 483 more in the last 1500 ms"));
        let s = Summary {
            details: vec![("reason=a key=k".to_owned(), 480), ("other".to_owned(), 3)],
            ..s
        };
        assert!(
            summary_line(&s, W).ends_with(
                ": 483 more in the last 10 s (reason=a key=k: 480; other: 3), not logged one by one"
            ),
            "{}",
            summary_line(&s, W)
        );
    }

    #[test]
    fn suppressed_lines_are_counted_per_detail_within_a_bound() {
        let mut t = Tracker::new(W, 16);
        let t0 = Instant::now();
        let hit = |t: &mut Tracker, d: &str| t.hit_with(&A, Who::Uid(1), t0, || Some(d.into())).0;
        // Written in full: the detail is not even asked for.
        for _ in 0..3 {
            assert!(t.hit_with(&A, Who::Uid(1), t0, || panic!("asked")).0);
        }
        for _ in 0..5 {
            assert!(!hit(&mut t, "x"));
        }
        assert!(!hit(&mut t, "y"));
        for i in 0..20 {
            assert!(!hit(&mut t, &format!("z{i}")));
        }
        let s = t.expire(t0 + W);
        assert_eq!(s[0].suppressed, 26);
        assert_eq!(s[0].details.len(), MAX_DETAILS);
        assert_eq!(s[0].details[0], ("x".to_owned(), 5));
        assert_eq!(s[0].details[1], ("y".to_owned(), 1));
        let other = s[0].details.last().unwrap();
        assert_eq!(other.0, "other");
        assert_eq!(s[0].details.iter().map(|d| d.1).sum::<u64>(), 26);
        // The next window starts with no details.
        assert!(!hit(&mut t, "y"));
        assert_eq!(t.expire(t0 + 2 * W)[0].details, [("y".to_owned(), 1)]);
    }
}
