//! The daemon's counters, since it started: what `keyholder status
//! --prometheus` prints, carried in the `status@keyholder` answer (format 2,
//! see [`crate::protocol::status`]).
//!
//! Counted: sign requests by key and decision (granted; refused, by reason;
//! failed upstream), distinct users who got a signature with each key,
//! other refused requests by reason, connections (accepted, open now,
//! closed by each limit and by the idle timeout), upstream errors and
//! restarts, certificates issued per key, user lookups, configuration
//! reloads.
//!
//! Cost: per connection, a few relaxed atomic additions; per sign request,
//! one short uncontended lock of a small map keyed by the configured key
//! name, nothing allocated once that key and that user have been seen. The
//! lock is never held across an await, a lookup, or I/O.
//!
//! Bounds: keys are the configured ones (those removed by a reload keep
//! their counts until the daemon restarts), at most [`MAX_KEYS`]; reasons
//! are the policy's fixed codes; distinct users are counted exactly, as a
//! set of uids per key, up to [`MAX_USERS_PER_KEY`] (the count then stays
//! there). The answer is kept within [`BUDGET`] bytes; what does not fit is
//! left out and `keyholder_metrics_truncated` says so.
//!
//! Never: reports a uid, a user name, or anything from a request's data;
//! what it reports any local user may read.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::limits::LimitHit;
use super::lookups::LookupStats;
use crate::backend::BackendError;
use crate::counter::Counter;
use crate::policy::{Decision, Reason};
use crate::protocol::status::{seconds, Family, Metrics as Report, Sample};
use crate::protocol::Request;

/// Keys counted at most (configured keys, and keys removed by reloads).
pub const MAX_KEYS: usize = 256;
/// Distinct users counted per key, at most.
pub const MAX_USERS_PER_KEY: usize = 4096;
/// Bytes of counters in one answer, at most (well within the 256 KiB cap of
/// an agent message, with room for the key list).
pub const BUDGET: usize = 160 * 1024;

/// Why a connection was closed by the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// `max_connections`
    Total,
    /// `max_connections_per_user`
    PerUser,
    /// `max_connections_per_user` of the bucket shared by uids without a
    /// passwd entry
    Shared,
    /// `idle_timeout_secs`
    Idle,
}

impl Closed {
    const ALL: [Self; 4] = [Self::Total, Self::PerUser, Self::Shared, Self::Idle];

    /// The `limit` label.
    fn label(self) -> &'static str {
        match self {
            Self::Total => "max_connections",
            Self::PerUser => "max_connections_per_user",
            Self::Shared => "max_connections_per_user_shared",
            Self::Idle => "idle_timeout",
        }
    }
}

impl From<LimitHit> for Closed {
    fn from(hit: LimitHit) -> Self {
        match hit {
            LimitHit::Total => Self::Total,
            LimitHit::PerUser => Self::PerUser,
            LimitHit::Unlisted => Self::Shared,
        }
    }
}

/// The `reason` labels of upstream errors, in [`upstream_index`] order.
const UPSTREAM_ERRORS: [&str; 4] = ["unreachable", "timeout", "refused", "broken"];

/// The requests the daemon sends the backend for its clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendOp {
    /// The identities (a listing).
    List,
    /// A signature.
    Sign,
    /// `status@keyholder`.
    Status,
}

/// The `op` labels, in [`BackendOp`] order.
const BACKEND_OPS: [&str; 3] = ["list", "sign", "status"];
/// The `outcome` labels of backend requests.
const BACKEND_OUTCOMES: [&str; 5] = ["ok", "refused", "timeout", "unreachable", "broken"];
/// Upper bounds of the backend latency histogram's buckets, in
/// microseconds (then `+Inf`).
const LATENCY_BUCKETS_US: [u64; 12] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 1_000_000, 10_000_000,
];

/// Backend requests by operation: outcomes, and a latency histogram.
#[derive(Debug, Default)]
struct BackendCalls {
    outcomes: [[AtomicU64; 5]; 3],
    /// Per bucket (not cumulative); beyond the last, only in the count
    /// (the sum of the outcomes).
    buckets: [[AtomicU64; 12]; 3],
    sum_us: [AtomicU64; 3],
}

fn outcome_index<T>(result: &Result<T, BackendError>) -> usize {
    match result {
        Ok(_) => 0,
        Err(BackendError::Refused | BackendError::Unsupported) => 1,
        Err(BackendError::Timeout | BackendError::Busy) => 2,
        Err(BackendError::Unreachable(_)) => 3,
        Err(BackendError::Broken(_)) => 4,
    }
}

fn upstream_index(e: &BackendError) -> usize {
    match e {
        BackendError::Unreachable(_) => 0,
        BackendError::Timeout | BackendError::Busy => 1,
        BackendError::Refused | BackendError::Unsupported => 2,
        BackendError::Broken(_) => 3,
    }
}

/// Counts of one key.
#[derive(Debug, Default)]
struct KeyCounts {
    granted: u64,
    failed_error: u64,
    failed_timeout: u64,
    /// Refusals by reason code (a handful at most).
    refused: Vec<(String, u64)>,
    /// Who got a signature, up to [`MAX_USERS_PER_KEY`].
    users: HashSet<u32>,
    certificates: u64,
}

/// The daemon's counters.
#[derive(Debug)]
pub struct Metrics {
    started: u64,
    accepted: AtomicU64,
    open: AtomicU64,
    closed: [AtomicU64; 4],
    upstream_errors: [AtomicU64; 4],
    /// Restarts of the supervised agent (counted by the supervisor).
    pub upstream_restarts: Counter,
    reloads_ok: AtomicU64,
    reloads_failed: AtomicU64,
    last_good_load: AtomicU64,
    last_reload_ok: AtomicBool,
    keys: Mutex<HashMap<String, KeyCounts>>,
    /// Refusals of requests other than sign requests, by reason code.
    refused: Mutex<HashMap<String, u64>>,
    backend_calls: BackendCalls,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Holds one open connection in `keyholder_connections_open`.
#[derive(Debug)]
pub struct Open<'a>(&'a Metrics);

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The short, fixed code of a reason: its text up to any detail
/// (`not-ssh-userauth (…)` → `not-ssh-userauth`,
/// `admin-request:lock` → `admin-request`).
fn reason_code(reason: &Reason) -> String {
    let mut text = reason.to_string();
    if let Some(end) = text.find([' ', '(', ':']) {
        text.truncate(end);
    }
    text
}

fn count(map: &mut Vec<(String, u64)>, code: String) {
    match map.iter_mut().find(|(c, _)| *c == code) {
        Some((_, n)) => *n += 1,
        None => map.push((code, 1)),
    }
}

impl Metrics {
    /// Counters at zero; the configuration just loaded counts as the last
    /// good one.
    pub fn new() -> Self {
        let started = now();
        Self {
            started,
            accepted: AtomicU64::new(0),
            open: AtomicU64::new(0),
            closed: Default::default(),
            upstream_errors: Default::default(),
            upstream_restarts: Counter::default(),
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
            last_good_load: AtomicU64::new(started),
            last_reload_ok: AtomicBool::new(true),
            keys: Mutex::new(HashMap::new()),
            refused: Mutex::new(HashMap::new()),
            backend_calls: BackendCalls::default(),
        }
    }

    /// A request the daemon sent the backend for a client: its outcome and
    /// how long the answer took.
    pub fn backend_call<T>(
        &self,
        op: BackendOp,
        elapsed: Duration,
        result: &Result<T, BackendError>,
    ) {
        let calls = &self.backend_calls;
        let i = op as usize;
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        if let Some(row) = calls.outcomes.get(i) {
            if let Some(n) = row.get(outcome_index(result)) {
                n.fetch_add(1, Ordering::Relaxed);
            }
        }
        if let Some(b) = LATENCY_BUCKETS_US.iter().position(|&le| us <= le) {
            if let Some(n) = calls.buckets.get(i).and_then(|row| row.get(b)) {
                n.fetch_add(1, Ordering::Relaxed);
            }
        }
        if let Some(s) = calls.sum_us.get(i) {
            s.fetch_add(us, Ordering::Relaxed);
        }
    }

    /// A connection was accepted (before the limits).
    pub fn accepted(&self) {
        self.accepted.fetch_add(1, Ordering::Relaxed);
    }

    /// A connection is being served, until the guard is dropped.
    pub fn open(&self) -> Open<'_> {
        self.open.fetch_add(1, Ordering::Relaxed);
        Open(self)
    }

    /// The daemon closed a connection (a limit, or idle).
    pub fn closed(&self, why: impl Into<Closed>) {
        let why = why.into();
        let i = Closed::ALL.iter().position(|c| *c == why).unwrap_or(0);
        self.closed[i].fetch_add(1, Ordering::Relaxed);
    }

    /// The backend gave no usable answer.
    pub fn upstream_error(&self, e: &BackendError) {
        self.upstream_errors[upstream_index(e)].fetch_add(1, Ordering::Relaxed);
    }

    /// A reload (SIGHUP) succeeded or failed.
    pub fn reloaded(&self, ok: bool) {
        if ok {
            self.reloads_ok.fetch_add(1, Ordering::Relaxed);
            self.last_good_load.store(now(), Ordering::Relaxed);
        } else {
            self.reloads_failed.fetch_add(1, Ordering::Relaxed);
        }
        self.last_reload_ok.store(ok, Ordering::Relaxed);
    }

    /// Counts a refusal (the outcome of a sign the policy allowed is counted
    /// by [`Metrics::signed`]).
    pub fn decided(&self, decision: &Decision<'_>, request: &Request) {
        let Decision::Refuse { reason, key, .. } = decision else {
            return;
        };
        let code = reason_code(reason);
        if matches!(request, Request::Sign(_)) {
            let name = key.map_or("", |k| k.name.as_str());
            self.with_key(name, |k| count(&mut k.refused, code));
        } else {
            let mut map = self.refused.lock().unwrap_or_else(PoisonError::into_inner);
            *map.entry(code).or_insert(0) += 1;
        }
    }

    /// Counts the outcome of a sign request the policy allowed.
    pub fn signed<T>(&self, key: &str, uid: u32, result: &Result<T, BackendError>) {
        self.with_key(key, |k| match result {
            Ok(_) => {
                k.granted += 1;
                if k.users.len() < MAX_USERS_PER_KEY {
                    k.users.insert(uid);
                }
            }
            Err(BackendError::Timeout | BackendError::Busy) => k.failed_timeout += 1,
            Err(_) => k.failed_error += 1,
        });
    }

    /// A certificate was issued for `key`.
    pub fn certificate_issued(&self, key: &str) {
        self.with_key(key, |k| k.certificates += 1);
    }

    fn with_key(&self, name: &str, f: impl FnOnce(&mut KeyCounts)) {
        let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(k) = keys.get_mut(name) {
            f(k);
        } else if keys.len() < MAX_KEYS {
            f(keys.entry(name.to_owned()).or_default());
        }
    }

    /// The counters as metric families; the `configured` keys first, each
    /// listed even when nothing happened to it yet.
    pub fn report<'a>(
        &self,
        configured: impl IntoIterator<Item = &'a str>,
        lookups: LookupStats,
        grants: &crate::grants::Report,
        backend: &str,
    ) -> Report {
        let mut b = Builder {
            left: BUDGET,
            truncated: false,
            families: Vec::new(),
        };
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        b.family(
            "keyholder_start_time_seconds",
            "gauge",
            "When the daemon started, in seconds since the Unix epoch.",
        );
        b.sample(&[], self.started);

        {
            let keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
            let mut names: Vec<&str> = configured.into_iter().collect();
            let mut others: Vec<&str> = keys
                .keys()
                .map(String::as_str)
                .filter(|n| !names.contains(n))
                .collect();
            others.sort_unstable();
            names.extend(others);
            let empty = KeyCounts::default();
            let of = |name: &str| keys.get(name).unwrap_or(&empty);

            b.family(
                "keyholder_signatures_total",
                "counter",
                "Sign requests by key and decision: granted (a signature returned), refused \
                 (by reason), failed (allowed, but the upstream agent failed: reason \
                 upstream-error or upstream-timeout). key is empty for a key not configured.",
            );
            for name in &names {
                let k = of(name);
                // The key "" (not configured) is only ever refused. Granted
                // and failed are listed at 0 too, so that increase() sees
                // the first one.
                if !name.is_empty() {
                    b.keyed(&[("key", name), ("decision", "granted")], k.granted);
                    for (reason, n) in [
                        ("upstream-error", k.failed_error),
                        ("upstream-timeout", k.failed_timeout),
                    ] {
                        b.keyed(
                            &[("key", name), ("decision", "failed"), ("reason", reason)],
                            n,
                        );
                    }
                }
                for (reason, n) in &k.refused {
                    b.keyed(
                        &[("key", name), ("decision", "refused"), ("reason", reason)],
                        *n,
                    );
                }
            }
            b.family(
                "keyholder_signing_users",
                "gauge",
                "Distinct users who got a signature with this key since the daemon started \
                 (counted up to 4096).",
            );
            for name in names.iter().filter(|n| !n.is_empty()) {
                b.keyed(&[("key", name)], of(name).users.len() as u64);
            }
            b.family(
                "keyholder_certificates_issued_total",
                "counter",
                "User certificates issued for this key.",
            );
            for name in names.iter().filter(|n| !n.is_empty()) {
                b.keyed(&[("key", name)], of(name).certificates);
            }
        }

        b.family(
            "keyholder_requests_refused_total",
            "counter",
            "Refused requests other than sign requests (admin requests, unknown types, \
             malformed messages, listings of unresolved callers, ...), by reason.",
        );
        {
            let refused = self.refused.lock().unwrap_or_else(PoisonError::into_inner);
            let mut codes: Vec<(&String, &u64)> = refused.iter().collect();
            codes.sort_unstable();
            for (reason, n) in codes {
                b.keyed(&[("reason", reason)], *n);
            }
        }

        b.family(
            "keyholder_connections_accepted_total",
            "counter",
            "Connections accepted on the proxy socket (including those then closed by a limit).",
        );
        b.sample(&[], load(&self.accepted));
        b.family(
            "keyholder_connections_open",
            "gauge",
            "Connections being served now.",
        );
        b.sample(&[], load(&self.open));
        b.family(
            "keyholder_connections_closed_total",
            "counter",
            "Connections the daemon closed: at once by a connection limit (max_connections, \
             max_connections_per_user, or the bucket shared by uids without a passwd entry), \
             or after idle_timeout_secs.",
        );
        for (c, n) in Closed::ALL.iter().zip(&self.closed) {
            b.sample(&[("limit", c.label())], load(n));
        }

        b.family(
            "keyholder_upstream_errors_total",
            "counter",
            "Requests the upstream agent gave no usable answer to, by reason.",
        );
        for (reason, n) in UPSTREAM_ERRORS.iter().zip(&self.upstream_errors) {
            b.sample(&[("reason", reason)], load(n));
        }
        let calls = &self.backend_calls;
        b.family(
            "keyholder_backend_requests_total",
            "counter",
            "Requests the daemon sent the backend for its clients, by operation and outcome.",
        );
        for (i, op) in BACKEND_OPS.iter().enumerate() {
            for (j, outcome) in BACKEND_OUTCOMES.iter().enumerate() {
                let n = calls.outcomes.get(i).and_then(|r| r.get(j)).map_or(0, load);
                b.sample(&[("backend", backend), ("op", op), ("outcome", outcome)], n);
            }
        }
        b.family(
            "keyholder_backend_request_duration_seconds",
            "histogram",
            "How long the backend took to answer the daemon's requests, by operation.",
        );
        for (i, op) in BACKEND_OPS.iter().enumerate() {
            let mut cumulative = 0;
            for (k, le) in LATENCY_BUCKETS_US.iter().enumerate() {
                cumulative += calls.buckets.get(i).and_then(|r| r.get(k)).map_or(0, load);
                let le = seconds(*le);
                b.sample(
                    &[("backend", backend), ("op", op), ("le", le.as_str())],
                    cumulative,
                );
            }
            let count: u64 = calls
                .outcomes
                .get(i)
                .map_or(0, |r| r.iter().map(load).sum());
            b.sample(&[("backend", backend), ("op", op), ("le", "+Inf")], count);
            let sum = calls.sum_us.get(i).map_or(0, load);
            b.sample(&[("backend", backend), ("op", op), ("stat", "sum")], sum);
            b.sample(
                &[("backend", backend), ("op", op), ("stat", "count")],
                count,
            );
        }
        b.family(
            "keyholder_upstream_restarts_total",
            "counter",
            "Restarts of the supervised upstream agent after it died (its keys are then gone).",
        );
        b.sample(&[], self.upstream_restarts.get());

        b.family(
            "keyholder_user_lookups_total",
            "counter",
            "Caller lookups run in the user database.",
        );
        b.sample(&[], lookups.run);
        b.family(
            "keyholder_user_lookup_cache_hits_total",
            "counter",
            "Requests whose caller was answered from the lookup cache or a lookup already running.",
        );
        b.sample(&[], lookups.reused);
        b.family(
            "keyholder_user_lookup_timeouts_total",
            "counter",
            "Requests whose caller lookup missed limits.lookup_timeout_secs.",
        );
        b.sample(&[], lookups.timed_out);

        b.family(
            "keyholder_grants_pending",
            "gauge",
            "Grant requests waiting for approval, per key.",
        );
        for (key, (pending, _)) in &grants.per_key {
            b.keyed(&[("key", key)], *pending);
        }
        b.family(
            "keyholder_grants_active",
            "gauge",
            "Grants in force, per key.",
        );
        for (key, (_, active)) in &grants.per_key {
            b.keyed(&[("key", key)], *active);
        }
        b.family(
            "keyholder_grant_events_total",
            "counter",
            "Grant events by kind: requested, approved, denied, active, expired, revoked, lapsed.",
        );
        for (event, n) in &grants.events {
            b.sample(&[("event", event)], *n);
        }

        b.family(
            "keyholder_config_reloads_total",
            "counter",
            "Configuration reloads (SIGHUP), by result.",
        );
        b.sample(&[("result", "ok")], load(&self.reloads_ok));
        b.sample(&[("result", "failed")], load(&self.reloads_failed));
        b.family(
            "keyholder_config_last_reload_successful",
            "gauge",
            "Whether the last reload loaded (1), or failed and left the previous configuration \
             in force (0).",
        );
        b.sample(&[], u64::from(self.last_reload_ok.load(Ordering::Relaxed)));
        b.family(
            "keyholder_config_last_reload_success_timestamp_seconds",
            "gauge",
            "When the configuration in force was loaded (at start or by a reload), in seconds \
             since the Unix epoch.",
        );
        b.sample(&[], load(&self.last_good_load));

        let truncated = b.truncated;
        b.family(
            "keyholder_metrics_truncated",
            "gauge",
            "1 when some samples were left out to keep the answer within its size limit.",
        );
        b.sample(&[], u64::from(truncated));
        Report {
            daemon_version: env!("CARGO_PKG_VERSION").to_owned(),
            families: b.families,
        }
    }
}

/// Builds families; the samples whose number grows with keys and reasons
/// within the byte budget.
struct Builder {
    left: usize,
    truncated: bool,
    families: Vec<Family>,
}

impl Builder {
    /// A sample of a family with one sample per key or reason: left out
    /// (and the answer marked truncated) when the budget is spent.
    fn keyed(&mut self, labels: &[(&str, &str)], value: u64) {
        let size = 12
            + labels
                .iter()
                .map(|(k, v)| 8 + k.len() + v.len())
                .sum::<usize>();
        if size > self.left {
            self.truncated = true;
            return;
        }
        self.left -= size;
        self.sample(labels, value);
    }

    fn family(&mut self, name: &str, kind: &str, help: &str) {
        self.families.push(Family {
            name: name.to_owned(),
            kind: kind.to_owned(),
            help: help.to_owned(),
            samples: Vec::new(),
        });
    }

    /// A sample of a fixed family (a few dozen in all: not budgeted).
    fn sample(&mut self, labels: &[(&str, &str)], value: u64) {
        if let Some(family) = self.families.last_mut() {
            family.samples.push(Sample {
                labels: labels
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
                value,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ssh_encoding::Encode;

    fn value(report: &Report, name: &str, labels: &[(&str, &str)]) -> Option<u64> {
        let family = report.families.iter().find(|f| f.name == name)?;
        family
            .samples
            .iter()
            .find(|s| {
                s.labels.len() == labels.len()
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.iter().any(|(a, b)| a == k && b == v))
            })
            .map(|s| s.value)
    }

    #[test]
    fn backend_requests_count_by_outcome_in_a_latency_histogram() {
        let m = Metrics::new();
        let ms = Duration::from_millis;
        m.backend_call(BackendOp::Sign, ms(2), &Ok::<(), BackendError>(()));
        m.backend_call(
            BackendOp::Sign,
            ms(40),
            &Err::<(), _>(BackendError::Timeout),
        );
        m.backend_call(
            BackendOp::Sign,
            Duration::from_secs(20),
            &Ok::<(), BackendError>(()),
        );
        m.backend_call(BackendOp::List, ms(0), &Err::<(), _>(BackendError::Refused));
        let r = m.report([], LookupStats::default(), &Default::default(), "builtin");
        let n = |op: &str, outcome: &str| {
            value(
                &r,
                "keyholder_backend_requests_total",
                &[("backend", "builtin"), ("op", op), ("outcome", outcome)],
            )
        };
        assert_eq!(n("sign", "ok"), Some(2));
        assert_eq!(n("sign", "timeout"), Some(1));
        assert_eq!(n("list", "refused"), Some(1));
        assert_eq!(n("status", "ok"), Some(0));
        let h = "keyholder_backend_request_duration_seconds";
        let bucket = |le: &str| value(&r, h, &[("backend", "builtin"), ("op", "sign"), ("le", le)]);
        // Cumulative: 2 ms in the 2.5 ms bucket, 40 ms from 50 ms on, 20 s
        // only in +Inf.
        assert_eq!(bucket("0.001000"), Some(0));
        assert_eq!(bucket("0.002500"), Some(1));
        assert_eq!(bucket("0.025000"), Some(1));
        assert_eq!(bucket("0.050000"), Some(2));
        assert_eq!(bucket("10.000000"), Some(2));
        assert_eq!(bucket("+Inf"), Some(3));
        let stat = |s: &str| {
            value(
                &r,
                h,
                &[("backend", "builtin"), ("op", "sign"), ("stat", s)],
            )
        };
        assert_eq!(stat("count"), Some(3));
        assert_eq!(stat("sum"), Some(20_042_000));
    }

    #[test]
    fn signs_count_by_key_decision_and_distinct_user() {
        let m = Metrics::new();
        let p = ["deploy", "idle"];
        for uid in [1000, 1000, 1001] {
            m.signed("deploy", uid, &Ok::<(), BackendError>(()));
        }
        m.signed::<()>("deploy", 1002, &Err(BackendError::Timeout));
        m.signed::<()>("deploy", 1002, &Err(BackendError::Refused));
        let r = m.report(p, LookupStats::default(), &Default::default(), "upstream");
        let sig = "keyholder_signatures_total";
        assert_eq!(
            value(&r, sig, &[("key", "deploy"), ("decision", "granted")]),
            Some(3)
        );
        assert_eq!(
            value(
                &r,
                sig,
                &[
                    ("key", "deploy"),
                    ("decision", "failed"),
                    ("reason", "upstream-timeout")
                ]
            ),
            Some(1)
        );
        assert_eq!(
            value(
                &r,
                sig,
                &[
                    ("key", "deploy"),
                    ("decision", "failed"),
                    ("reason", "upstream-error")
                ]
            ),
            Some(1)
        );
        // Failed signs are not users who signed.
        assert_eq!(
            value(&r, "keyholder_signing_users", &[("key", "deploy")]),
            Some(2)
        );
        // A configured key nothing happened to is listed at zero.
        assert_eq!(
            value(&r, sig, &[("key", "idle"), ("decision", "granted")]),
            Some(0)
        );
        assert_eq!(
            value(&r, "keyholder_signing_users", &[("key", "idle")]),
            Some(0)
        );
        assert_eq!(
            value(
                &r,
                "keyholder_certificates_issued_total",
                &[("key", "idle")]
            ),
            Some(0)
        );
    }

    #[test]
    fn refusals_count_by_reason_code() {
        use crate::policy::certificates::NoneMinted;
        use crate::policy::destinations::Bindings;
        use crate::policy::{decide, Caller, Context, Policy};
        use crate::protocol::classify;
        let m = Metrics::new();
        let p = Policy::default();
        let nobody = Caller {
            uid: 1234,
            pid: None,
            user: Some("x".into()),
            groups: Vec::new(),
        };
        // A sign request for a key the configuration does not know.
        let mut sign = vec![13];
        ssh_agent_lib::proto::SignRequest {
            credential: crate::protocol::userauth::tests::key(1).into(),
            data: b"data".to_vec(),
            flags: 0,
        }
        .encode(&mut sign)
        .unwrap();
        for message in [sign, vec![17], vec![22], vec![200]] {
            let request = classify(&message);
            let ctx = Context {
                bindings: &Bindings::default(),
                now: 0,
                minted: &NoneMinted,
                grants: &crate::policy::grants::NO_GRANTS,
            };
            m.decided(&decide(&p, &nobody, ctx, &request), &request);
        }
        let r = m.report([], LookupStats::default(), &Default::default(), "upstream");
        assert_eq!(
            value(
                &r,
                "keyholder_signatures_total",
                &[
                    ("key", ""),
                    ("decision", "refused"),
                    ("reason", "key-not-configured")
                ]
            ),
            Some(1)
        );
        // No granted (or users, or certificates) line for the unknown key.
        assert_eq!(
            value(
                &r,
                "keyholder_signatures_total",
                &[("key", ""), ("decision", "granted")]
            ),
            None
        );
        assert_eq!(value(&r, "keyholder_signing_users", &[("key", "")]), None);
        let other = "keyholder_requests_refused_total";
        assert_eq!(value(&r, other, &[("reason", "admin-request")]), Some(2));
        assert_eq!(
            value(&r, other, &[("reason", "unknown-message-type")]),
            Some(1)
        );
    }

    #[test]
    fn connections_limits_reloads_and_upstream() {
        let m = Metrics::new();
        m.accepted();
        m.accepted();
        let open = m.open();
        m.closed(LimitHit::Unlisted);
        m.closed(Closed::Idle);
        m.upstream_error(&BackendError::Timeout);
        m.upstream_restarts.add_one();
        m.reloaded(false);
        let r = m.report([], LookupStats::default(), &Default::default(), "upstream");
        assert_eq!(
            value(&r, "keyholder_connections_accepted_total", &[]),
            Some(2)
        );
        assert_eq!(value(&r, "keyholder_connections_open", &[]), Some(1));
        let closed = "keyholder_connections_closed_total";
        assert_eq!(
            value(&r, closed, &[("limit", "max_connections_per_user_shared")]),
            Some(1)
        );
        assert_eq!(value(&r, closed, &[("limit", "idle_timeout")]), Some(1));
        assert_eq!(value(&r, closed, &[("limit", "max_connections")]), Some(0));
        assert_eq!(
            value(
                &r,
                "keyholder_upstream_errors_total",
                &[("reason", "timeout")]
            ),
            Some(1)
        );
        assert_eq!(value(&r, "keyholder_upstream_restarts_total", &[]), Some(1));
        assert_eq!(
            value(
                &r,
                "keyholder_config_reloads_total",
                &[("result", "failed")]
            ),
            Some(1)
        );
        assert_eq!(
            value(&r, "keyholder_config_last_reload_successful", &[]),
            Some(0)
        );
        drop(open);
        let r = m.report([], LookupStats::default(), &Default::default(), "upstream");
        assert_eq!(value(&r, "keyholder_connections_open", &[]), Some(0));
    }

    #[test]
    fn bounded_keys_users_and_answer() {
        let m = Metrics::new();
        for uid in 0..(MAX_USERS_PER_KEY as u32 + 10) {
            m.signed("deploy", uid, &Ok::<(), BackendError>(()));
        }
        for i in 0..MAX_KEYS + 10 {
            for reason in 0..20 {
                m.with_key(&format!("key-{i:04}-{}", "x".repeat(100)), |k| {
                    count(&mut k.refused, format!("reason-{reason}"));
                });
            }
        }
        assert_eq!(m.keys.lock().unwrap().len(), MAX_KEYS);
        let r = m.report(
            ["deploy"],
            LookupStats::default(),
            &Default::default(),
            "upstream",
        );
        assert_eq!(
            value(&r, "keyholder_signing_users", &[("key", "deploy")]),
            Some(MAX_USERS_PER_KEY as u64)
        );
        assert!(r.encoded_len().unwrap() <= BUDGET + 12 * 1024);
        // (the fixed families, histogram included, are not budgeted: well under
        // the 256 KiB frame either way)
        assert_eq!(value(&r, "keyholder_metrics_truncated", &[]), Some(1));
        // The daemon-wide counters come before the per-key ones run out.
        assert!(value(&r, "keyholder_start_time_seconds", &[]).is_some());
    }

    #[test]
    fn reason_codes_drop_details() {
        assert_eq!(
            reason_code(&Reason::NotUserAuth("not a user-auth request")),
            "not-ssh-userauth"
        );
        assert_eq!(
            reason_code(&Reason::AdminRequest(crate::protocol::AdminOp::Lock)),
            "admin-request"
        );
        assert_eq!(
            reason_code(&Reason::UnknownType(99)),
            "unknown-message-type"
        );
        assert_eq!(reason_code(&Reason::LookupTimeout), "user-lookup-timeout");
    }
}
