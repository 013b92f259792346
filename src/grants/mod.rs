//! The grant store: the grants keyholder knows, kept, timed and announced.
//!
//! - State: the authoritative set sits behind an async mutex that only
//!   grant extensions and the timer take; every change is written to
//!   `STATE_DIR/grants.json` ([`persist`]) before it is put in force. A
//!   change that cannot be saved is refused (nothing changes), except an
//!   ending (expiry, lapse, a grantee gone), which always applies: less
//!   access is the safe side.
//! - The per-request path never takes that lock and never touches a file:
//!   requests read an immutable snapshot ([`Store::current`], one `Arc`
//!   clone), replaced whole on each change.
//! - Timer ([`Store::run`]): sleeps until the next lapse or expiry and
//!   writes the `lapsed`/`expired` audit lines when the time passes, and
//!   ends grants whose key a reload removed.
//! - Every event is one audit line (target `keyholder::audit`), a counter,
//!   and a run of the key's `notify` hook ([`notify`]), which nothing
//!   waits on.
//!
//! Decisions are never made here: they are [`crate::policy::grants`]'s.

pub mod notify;
pub mod persist;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Mutex, Notify};

use crate::logging::Value as Field;
use crate::policy::grants::{self as rules, Ask, End, Grant, GrantError, Grants, State};
use crate::policy::{Caller, Policy, Reason};
use crate::protocol::grants::{Answer, GrantOp};
use crate::ratelog::{Kind, RateLog, Who};

/// The tracing target of grant audit lines (the audit log's).
pub const TARGET: &str = "keyholder::audit";

/// The largest listing answered (the rest is left out, and the answer
/// says so); well below the protocol's message cap.
pub const MAX_LISTING: usize = 192 * 1024;

/// Grant requests, approvals, denials and revocations refused: logged
/// (rate-limited per uid), so that an approver's attempt on their own
/// request or a stranger's attempt shows in the log.
pub static GRANT_REFUSED: Kind = Kind {
    name: "grant requests refused",
    burst: 10,
    level: tracing::Level::INFO,
};

/// Changes (requests, approvals, denials, revocations) one uid may make per
/// [`CHANGE_WINDOW`]: each is a synced write and an audit line, so a loop
/// of requests and withdrawals must not become a flood. Root is not
/// limited.
pub const MAX_CHANGES_PER_WINDOW: u32 = 30;
/// See [`MAX_CHANGES_PER_WINDOW`].
pub const CHANGE_WINDOW: Duration = Duration::from_secs(60);
/// uids whose changes are counted at once (beyond, the oldest windows go).
const MAX_COUNTED: usize = 4096;

/// A grant event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Asked for.
    Requested,
    /// One approval.
    Approved,
    /// Denied.
    Denied,
    /// In force.
    Active,
    /// Reached its end.
    Expired,
    /// Ended early, or withdrawn.
    Revoked,
    /// Not decided in time.
    Lapsed,
}

impl Event {
    /// Every event, in the order metrics list them.
    pub const ALL: [Self; 7] = [
        Self::Requested,
        Self::Approved,
        Self::Denied,
        Self::Active,
        Self::Expired,
        Self::Revoked,
        Self::Lapsed,
    ];

    /// Its name in logs, metrics and the hook's environment.
    pub fn name(self) -> &'static str {
        match self {
            Self::Requested => "requested",
            Self::Approved => "approved",
            Self::Denied => "denied",
            Self::Active => "active",
            Self::Expired => "expired",
            Self::Revoked => "revoked",
            Self::Lapsed => "lapsed",
        }
    }

    fn of_end(how: End) -> Self {
        match how {
            End::Denied => Self::Denied,
            End::Expired => Self::Expired,
            End::Revoked => Self::Revoked,
            End::Lapsed => Self::Lapsed,
        }
    }
}

/// A grant as listed: the record, and who may decide it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listed {
    /// The record.
    #[serde(flatten)]
    pub grant: Grant,
    /// Its key's approver groups (empty when the key is gone).
    pub approver_groups: Vec<String>,
}

/// A listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listing {
    /// The daemon's clock (Unix seconds) when it answered.
    pub now: u64,
    /// Pending requests and active grants (or the one asked for).
    pub grants: Vec<Listed>,
    /// Some were left out (the answer would have been too large).
    pub truncated: bool,
}

/// Counts for metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Per key: (pending, active).
    pub per_key: BTreeMap<String, (u64, u64)>,
    /// Per event, in [`Event::ALL`] order.
    pub events: Vec<(&'static str, u64)>,
}

/// The store.
#[derive(Debug)]
pub struct Store {
    state: Mutex<Grants>,
    snapshot: watch::Sender<Arc<Grants>>,
    /// `state_dir`: created (0700) when grants are configured or at the
    /// first change, never by a daemon that has no use for it.
    dir: PathBuf,
    wake: Notify,
    events: [AtomicU64; 7],
    notifier: notify::Notifier,
    log: Arc<RateLog>,
    /// Per uid: when its window started, and changes in it.
    changes: std::sync::Mutex<std::collections::HashMap<u32, (std::time::Instant, u32)>>,
}

/// Now, in Unix seconds.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Store {
    /// Opens the store of `state_dir` (blocking: call before serving). A
    /// state file that cannot be trusted or read is refused with an error
    /// line, and the store starts empty; a directory that cannot be used
    /// leaves a store that refuses every change (and says why). Without
    /// keys that need grants, a missing `state_dir` is left missing.
    pub fn open(state_dir: &Path, policy: &Policy, log: Arc<RateLog>) -> Arc<Self> {
        let mut grants = Grants::default();
        let file = if policy.has_grants() || state_dir.exists() {
            persist::prepare(state_dir)
        } else {
            Err(String::new())
        };
        match &file {
            Ok(path) => match persist::load(path) {
                Ok(Some(g)) => grants = g,
                Ok(None) => {}
                Err(why) => tracing::error!(
                    "refusing grant state {}: {why}; starting with no grants (it is replaced \
                     at the next change)",
                    path.display()
                ),
            },
            Err(why) => {
                if policy.has_grants() || !why.is_empty() {
                    tracing::error!(
                        "grant state directory unusable: {why}; no grants are kept and every \
                         grant request is refused"
                    );
                }
            }
        }
        let kept = grants
            .grants
            .iter()
            .filter(|g| !matches!(g.state, State::Ended { .. }))
            .count();
        if kept > 0 {
            tracing::info!("grants: {kept} pending or active kept from the last run");
        }
        let (snapshot, _) = watch::channel(Arc::new(grants.clone()));
        Arc::new(Self {
            state: Mutex::new(grants),
            snapshot,
            dir: state_dir.to_owned(),
            wake: Notify::new(),
            events: Default::default(),
            notifier: notify::Notifier::new(Arc::clone(&log)),
            log,
            changes: Default::default(),
        })
    }

    /// The grants in force now: an immutable snapshot (no lock held, no
    /// I/O).
    pub fn current(&self) -> Arc<Grants> {
        Arc::clone(&self.snapshot.borrow())
    }

    /// Pending and active grants per key (every key of `policy` that
    /// needs grants, and any other that has some), events per kind.
    pub fn report(&self, policy: &Policy) -> Report {
        let now = unix_now();
        let mut per_key: BTreeMap<String, (u64, u64)> = policy
            .keys
            .iter()
            .filter(|k| k.grants.is_some())
            .map(|k| (k.name.clone(), (0, 0)))
            .collect();
        for g in &self.current().grants {
            let e = per_key.entry(g.key.clone()).or_default();
            if g.pending_at(now) {
                e.0 += 1;
            } else if g.active_at(now) {
                e.1 += 1;
            }
        }
        Report {
            per_key,
            events: Event::ALL
                .iter()
                .zip(&self.events)
                .map(|(e, n)| (e.name(), n.load(Ordering::Relaxed)))
                .collect(),
        }
    }

    /// Handles one grant extension from `caller` under `policy`;
    /// `unresolved`: why the caller's user lookup gave no answer, if so.
    pub async fn handle(
        &self,
        policy: &Policy,
        caller: &Caller,
        unresolved: Option<&Reason>,
        op: GrantOp,
    ) -> Answer {
        if let (Some(why), false) = (unresolved, caller.uid == 0) {
            return refused(format!(
                "your user and groups could not be looked up ({why}); try again"
            ));
        }
        let now = unix_now();
        if let GrantOp::List { id } = &op {
            return self.list(policy, id.as_deref(), now);
        }
        let answer = self.change(policy, caller, &op, now).await;
        if !answer.ok && self.log.allow(&GRANT_REFUSED, Who::Uid(caller.uid)) {
            let (verb, what) = match &op {
                GrantOp::Request { key, .. } => ("request", key.as_str()),
                GrantOp::Approve { id, .. } => ("approve", id.as_str()),
                GrantOp::Deny { id, .. } => ("deny", id.as_str()),
                GrantOp::Revoke { id, .. } => ("revoke", id.as_str()),
                GrantOp::List { .. } => ("list", ""),
            };
            tracing::info!(
                target: TARGET,
                "grant refused op={verb} target={} user={} uid={} why={}",
                Field(Some(what)),
                Field(caller.user.as_deref()),
                caller.uid,
                Field(Some(&answer.text))
            );
        }
        answer
    }

    /// Whether `uid` may make one more change now (and counts it).
    fn allow_change(&self, uid: u32) -> bool {
        if uid == 0 {
            return true;
        }
        let now = std::time::Instant::now();
        let mut map = self
            .changes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if map.len() >= MAX_COUNTED && !map.contains_key(&uid) {
            map.retain(|_, (start, _)| now.duration_since(*start) < CHANGE_WINDOW);
            if map.len() >= MAX_COUNTED {
                return false;
            }
        }
        let entry = map.entry(uid).or_insert((now, 0));
        if now.duration_since(entry.0) >= CHANGE_WINDOW {
            *entry = (now, 0);
        }
        if entry.1 >= MAX_CHANGES_PER_WINDOW {
            return false;
        }
        entry.1 += 1;
        true
    }

    /// A request, approval, denial or revocation.
    async fn change(&self, policy: &Policy, caller: &Caller, op: &GrantOp, now: u64) -> Answer {
        if !self.allow_change(caller.uid) {
            return refused(format!(
                "too many grant changes: at most {MAX_CHANGES_PER_WINDOW} a minute; try again \
                 shortly"
            ));
        }
        let mut state = self.state.lock().await;
        let checked = match op {
            GrantOp::Request {
                key,
                duration,
                reason,
            } => rules::check_request(
                policy,
                caller,
                &state,
                Ask {
                    key,
                    duration,
                    reason,
                },
                new_id(&state),
                now,
            ),
            GrantOp::Approve { id, key } => {
                rules::check_approve(policy, caller, &state, id, key.as_deref(), now)
            }
            GrantOp::Deny { id, key, note } => rules::check_deny(
                policy,
                caller,
                &state,
                id,
                key.as_deref(),
                note.as_deref(),
                now,
            ),
            GrantOp::Revoke { id, key } => {
                rules::check_revoke(policy, caller, &state, id, key.as_deref(), now)
            }
            GrantOp::List { .. } => return refused("not reached".to_owned()),
        };
        let grant = match checked {
            Ok(g) => g,
            Err(e) => return refused_grant(&e),
        };
        let next = state.with(grant.clone());
        if let Err(why) = self.save(&next).await {
            tracing::error!("grant {} not changed: {why}", grant.id);
            return refused(format!(
                "keyholder cannot save grants ({why}); nothing was changed"
            ));
        }
        let before = state.get(&grant.id).cloned();
        *state = next;
        self.publish(&state);
        drop(state);
        self.wake.notify_one();
        let by = rules::Person::of(caller);
        for event in events_of(before.as_ref(), &grant) {
            self.announce(policy, event, &grant, Some(&by));
        }
        match serde_json::to_string(&listed(policy, grant)) {
            Ok(text) => Answer { ok: true, text },
            Err(e) => refused(format!("cannot encode the answer: {e}")),
        }
    }

    fn list(&self, policy: &Policy, id: Option<&str>, now: u64) -> Answer {
        let current = self.current();
        let mut listing = Listing {
            now,
            grants: Vec::new(),
            truncated: false,
        };
        let mut size = 0;
        for g in &current.grants {
            let wanted = match id {
                Some(id) => g.id == id,
                None => !g.over_at(now),
            };
            if !wanted {
                continue;
            }
            let item = listed(policy, g.clone());
            size += serde_json::to_string(&item).map_or(0, |s| s.len() + 1);
            if size > MAX_LISTING {
                listing.truncated = true;
                break;
            }
            listing.grants.push(item);
        }
        if let (Some(id), true) = (id, listing.grants.is_empty()) {
            return refused_grant(&GrantError::UnknownId(id.to_owned()));
        }
        match serde_json::to_string(&listing) {
            Ok(text) => Answer { ok: true, text },
            Err(e) => refused(format!("cannot encode the answer: {e}")),
        }
    }

    /// Ends the grants of `caller` that it may no longer use (it left the
    /// key's groups, the key is gone): called when one of its requests was
    /// refused `no-grant`. Cheap when there is nothing to end.
    pub async fn end_orphans(&self, policy: &Policy, caller: &Caller) {
        let now = unix_now();
        let current = self.current();
        if rules::orphaned(policy, caller, &current, now).is_empty() {
            return;
        }
        let mut state = self.state.lock().await;
        let ids = rules::orphaned(policy, caller, &state, now);
        let ended = rules::end_orphans(&state, &ids, now);
        self.apply_endings(policy, &mut state, ended).await;
    }

    /// Puts endings in force (saved if possible, in force regardless) and
    /// announces them.
    async fn apply_endings(&self, policy: &Policy, state: &mut Grants, ended: Vec<Grant>) {
        if ended.is_empty() {
            return;
        }
        let mut next = state.clone();
        for g in &ended {
            next = next.with(g.clone());
        }
        self.commit_anyway(state, next).await;
        for g in &ended {
            if let State::Ended { how, .. } = g.state {
                self.announce(policy, Event::of_end(how), g, None);
            }
        }
    }

    /// Puts `next` in force; a failure to save it is logged (an ending or a
    /// forgetting must apply even then).
    async fn commit_anyway(&self, state: &mut Grants, next: Grants) {
        if let Err(why) = self.save(&next).await {
            tracing::error!("grants changed in memory but not saved: {why}");
        }
        *state = next;
        self.publish(state);
    }

    async fn save(&self, grants: &Grants) -> Result<(), String> {
        let dir = self.dir.clone();
        let grants = grants.clone();
        tokio::task::spawn_blocking(move || persist::save(&persist::prepare(&dir)?, &grants))
            .await
            .map_err(|e| format!("the saving task failed: {e}"))?
    }

    fn publish(&self, grants: &Grants) {
        self.snapshot.send_replace(Arc::new(grants.clone()));
    }

    /// Writes the audit line of `event`, counts it, runs the hook.
    fn announce(&self, policy: &Policy, event: Event, g: &Grant, by: Option<&rules::Person>) {
        if let Some(i) = Event::ALL.iter().position(|e| *e == event) {
            if let Some(n) = self.events.get(i) {
                n.fetch_add(1, Ordering::Relaxed);
            }
        }
        // A break-glass grant is its requester's own doing.
        let by = if event == Event::Active && g.break_glass {
            Some(&g.requester)
        } else {
            by
        };
        tracing::info!(target: TARGET, "{}", audit_line(event, g, by));
        let program = policy
            .keys
            .iter()
            .find(|k| k.name == g.key)
            .and_then(|k| k.grants.as_ref())
            .and_then(|r| r.notify.clone());
        if let Some(program) = program {
            self.notifier.fire(program, hook_env(event, g, by));
        }
    }

    /// Runs the timer until `stop`: lapses and expiries when their time
    /// comes, and after each reload, the ending of grants whose key no
    /// longer needs them.
    /// `settings`: what the daemon runs under (replaced on reload), of which
    /// `policy_of` gives the policy.
    pub async fn run<T: Send + Sync + 'static>(
        self: Arc<Self>,
        mut settings: watch::Receiver<Arc<T>>,
        policy_of: fn(&T) -> &Policy,
        mut stop: watch::Receiver<bool>,
    ) {
        loop {
            let rt = Arc::clone(&settings.borrow_and_update());
            self.sweep(policy_of(&rt)).await;
            let next = self.current().next_deadline();
            let sleep = async {
                match next {
                    Some(at) => tokio::time::sleep(until_ms(at)).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = sleep => {}
                () = self.wake.notified() => {}
                r = settings.changed() => if r.is_err() { return },
                () = crate::shutdown::stopped(&mut stop) => return,
            }
        }
    }

    async fn sweep(&self, policy: &Policy) {
        let now = unix_now();
        let mut state = self.state.lock().await;
        let (next, changed) = rules::sweep(policy, &state, now);
        if next == *state {
            return;
        }
        self.commit_anyway(&mut state, next).await;
        drop(state);
        for g in &changed {
            if let State::Ended { how, .. } = g.state {
                self.announce(policy, Event::of_end(how), g, None);
            }
        }
    }
}

/// How long until Unix second `at` has begun (a little after, so that the
/// clock reads `at` when the timer fires).
fn until_ms(at: u64) -> Duration {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    Duration::from_secs(at)
        .saturating_sub(now)
        .saturating_add(Duration::from_millis(20))
}

/// The events a change from `before` to `after` makes.
fn events_of(before: Option<&Grant>, after: &Grant) -> Vec<Event> {
    match (before, after.state) {
        (None, State::Active { .. }) => vec![Event::Requested, Event::Active],
        (None, _) => vec![Event::Requested],
        (Some(_), State::Active { .. }) => vec![Event::Approved, Event::Active],
        (Some(_), State::Pending { .. }) => vec![Event::Approved],
        (Some(_), State::Ended { how, .. }) => vec![Event::of_end(how)],
    }
}

fn listed(policy: &Policy, grant: Grant) -> Listed {
    let approver_groups = policy
        .keys
        .iter()
        .find(|k| k.name == grant.key)
        .and_then(|k| k.grants.as_ref())
        .map(|r| r.approvers.clone())
        .unwrap_or_default();
    Listed {
        grant,
        approver_groups,
    }
}

fn refused(text: String) -> Answer {
    Answer { ok: false, text }
}

fn refused_grant(e: &GrantError) -> Answer {
    refused(e.to_string())
}

/// A fresh id: 12 hex digits, not in use.
fn new_id(grants: &Grants) -> String {
    loop {
        let mut bytes = [0u8; 6];
        if getrandom::getrandom(&mut bytes).is_err() {
            // No randomness: fall back on the clock (ids stay unique).
            let n = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            bytes.copy_from_slice(&n.to_be_bytes()[10..16]);
        }
        let id: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        if grants.get(&id).is_none() {
            return id;
        }
    }
}

/// The end the audit line and the hook report: an active grant's end, or
/// when an ended one ended; none while pending.
fn until_of(g: &Grant) -> Option<u64> {
    match g.state {
        State::Active { until, .. } => Some(until),
        State::Ended { at, .. } => Some(at),
        State::Pending { .. } => None,
    }
}

/// `grant event= id= key= user= uid= by= until= reason=` (then
/// `break_glass=yes` for a break-glass grant's `active` line, and `note=`
/// when someone said why they denied or keyholder ended it).
pub fn audit_line(event: Event, g: &Grant, by: Option<&rules::Person>) -> String {
    let by_name = by.map(rules::Person::name);
    let until = until_of(g).map(|u| u.to_string());
    let mut line = format!(
        "grant event={} id={} key={} user={} uid={} by={} until={} reason={}",
        event.name(),
        Field(Some(&g.id)),
        Field(Some(&g.key)),
        Field(g.requester.user.as_deref()),
        g.requester.uid,
        Field(by_name.as_deref()),
        Field(until.as_deref()),
        Field(Some(&g.reason)),
    );
    if event == Event::Active && g.break_glass {
        line.push_str(" break_glass=yes");
    }
    if let Some(note) = &g.note {
        line.push_str(&format!(" note={}", Field(Some(note))));
    }
    line
}

/// The hook's environment for `event`.
fn hook_env(event: Event, g: &Grant, by: Option<&rules::Person>) -> notify::Env {
    let approvers: Vec<String> = g.approvals.iter().map(|a| a.by.name()).collect();
    vec![
        ("KEYHOLDER_GRANT_EVENT", event.name().to_owned()),
        ("KEYHOLDER_GRANT_ID", g.id.clone()),
        ("KEYHOLDER_GRANT_KEY", g.key.clone()),
        ("KEYHOLDER_GRANT_USER", g.requester.name()),
        (
            "KEYHOLDER_GRANT_UNTIL",
            until_of(g).map(|u| u.to_string()).unwrap_or_default(),
        ),
        ("KEYHOLDER_GRANT_REASON", g.reason.clone()),
        ("KEYHOLDER_GRANT_APPROVERS", approvers.join(",")),
        (
            "KEYHOLDER_GRANT_BY",
            by.map(rules::Person::name).unwrap_or_default(),
        ),
        ("KEYHOLDER_GRANT_NOTE", g.note.clone().unwrap_or_default()),
        (
            "KEYHOLDER_GRANT_BREAK_GLASS",
            if g.break_glass { "yes" } else { "no" }.to_owned(),
        ),
    ]
}

/// The largest state file read.
pub const MAX_STATE_LEN: u64 = 4 * 1024 * 1024;

/// Checks a program keyholder runs (the `notify` hook): trusted as every
/// file keyholder relies on ([`crate::trust`]).
pub fn check_program(path: &Path) -> Result<(), String> {
    crate::trust::check_file(path, crate::trust::Access::Public).map_err(|e| e.to_string())
}

/// Checks the state directory ([`crate::trust::check_dir`]).
fn check_dir(path: &Path) -> Result<(), String> {
    crate::trust::check_dir(path).map_err(|e| e.to_string())
}

/// Reads the state file: root's alone (a secret as [`crate::trust`] sees
/// it: neither group nor others may read or write it).
fn read_state(path: &Path) -> Result<String, crate::trust::TrustError> {
    let bytes = crate::trust::read_secret_capped(path, MAX_STATE_LEN)?;
    String::from_utf8(bytes.to_vec()).map_err(|_| {
        crate::trust::TrustError::Untrusted("is not UTF-8 text; refusing to read it".to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::grants::Person;

    #[test]
    fn audit_lines_escape_and_mark_break_glass() {
        let g = Grant {
            id: "0a1b2c3d4e5f".into(),
            key: "prod".into(),
            requester: Person {
                uid: 1000,
                user: Some("alice".into()),
            },
            reason: "fix\nfake grant event=active".into(),
            secs: 60,
            requested_at: 5,
            approvals: Vec::new(),
            needed: 0,
            break_glass: true,
            state: State::Active { from: 5, until: 65 },
            ended_by: None,
            note: None,
        };
        let line = audit_line(Event::Active, &g, Some(&g.requester));
        assert_eq!(
            line,
            "grant event=active id=0a1b2c3d4e5f key=prod user=alice uid=1000 by=alice \
             until=65 reason=\"fix\\nfake grant event=active\" break_glass=yes"
        );
        assert!(!line.contains('\n'));
        let line = audit_line(Event::Requested, &g, Some(&g.requester));
        assert!(!line.contains("break_glass"), "{line}");
        let mut pending = g.clone();
        pending.state = State::Pending { lapses_at: 9 };
        assert!(audit_line(Event::Lapsed, &pending, None).contains(" by=- until=- "));
    }

    #[test]
    fn changes_per_uid_are_limited_but_not_roots() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (_stop_tx, stop) = watch::channel(false);
            let log = RateLog::start(Duration::from_secs(10), stop);
            let dir = std::env::temp_dir().join(format!("kh-store-{}", std::process::id()));
            let store = Store::open(&dir, &Policy::default(), log);
            for _ in 0..MAX_CHANGES_PER_WINDOW {
                assert!(store.allow_change(1000));
            }
            assert!(!store.allow_change(1000));
            assert!(store.allow_change(1001));
            for _ in 0..100 {
                assert!(store.allow_change(0));
            }
            let _ = std::fs::remove_dir_all(&dir);
        });
    }

    #[test]
    fn events_follow_the_change() {
        let mut g = Grant {
            id: "x".into(),
            key: "k".into(),
            requester: Person { uid: 1, user: None },
            reason: "r".into(),
            secs: 1,
            requested_at: 0,
            approvals: Vec::new(),
            needed: 1,
            break_glass: false,
            state: State::Pending { lapses_at: 9 },
            ended_by: None,
            note: None,
        };
        assert_eq!(events_of(None, &g), [Event::Requested]);
        assert_eq!(events_of(Some(&g.clone()), &g), [Event::Approved]);
        let before = g.clone();
        g.state = State::Active { from: 1, until: 2 };
        assert_eq!(
            events_of(Some(&before), &g),
            [Event::Approved, Event::Active]
        );
        assert_eq!(events_of(None, &g), [Event::Requested, Event::Active]);
        g.state = State::Ended {
            at: 1,
            how: End::Denied,
        };
        assert_eq!(events_of(Some(&before), &g), [Event::Denied]);
    }
}
