//! Grants: time-boxed use of a key, approved by other people (four eyes,
//! six eyes, …), or self-granted with a reason (break-glass).
//!
//! Pure: every function here takes the facts (the key's rules, the caller
//! and its groups, the grants in force, the clock) and answers with a
//! decision or a new grant record. Nothing here reads a file, a clock or the
//! user database, and nothing here stores anything: the grant store
//! (`crate::grants`) keeps, persists and times the records this module
//! produces.
//!
//! The rules:
//! - A key with `[keys.NAME.grants]` may be used by a member of its groups
//!   only while that member holds an active grant for it ([`check_use`]):
//!   `no-grant` without one, `grant-expired` after its end. Root never
//!   needs one.
//! - Members of the key's `groups` request ([`check_request`]); members of
//!   its `approvers` approve or deny ([`check_approve`], [`check_deny`]);
//!   each person counts once and the requester never counts; the grant
//!   starts with the last approval needed and lasts the requested time.
//!   `approvals = 0`: the request is active at once (break-glass).
//! - The requester (withdrawing a pending request or ending a grant early),
//!   an approver or root revokes ([`check_revoke`]); root may approve, deny
//!   and revoke anything.
//! - Time passes ([`sweep`]): a pending request lapses after
//!   `pending_secs`, a grant expires at its end, and a grant whose key no
//!   longer exists or no longer needs grants ends.

use serde::{Deserialize, Serialize};

use super::{Caller, KeyRule, Policy, Reason};

/// The longest reason, in bytes.
pub const MAX_REASON: usize = 256;
/// Pending requests one user may have at once, over all keys.
pub const MAX_PENDING_PER_USER: usize = 16;
/// The longest id accepted (ids keyholder makes are shorter).
pub const MAX_ID: usize = 64;
/// The largest `approvals` a key may ask for.
pub const MAX_APPROVALS: u32 = 16;
/// How long an ended grant is remembered (for `grant-expired` and for
/// `keyholder request --wait`).
pub const KEEP_ENDED_SECS: u64 = 24 * 3600;
/// At most this many ended grants are remembered (the oldest go first).
pub const MAX_ENDED: usize = 1024;

/// A key's grant rules (`[keys.NAME.grants]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantRule {
    /// Groups whose members may approve or deny.
    pub approvers: Vec<String>,
    /// Distinct approvals needed (0: break-glass).
    pub approvals: u32,
    /// The longest grant, in seconds.
    pub max_secs: u64,
    /// An undecided request lapses after this many seconds.
    pub pending_secs: u64,
    /// The program run on every event (the store runs it; the policy
    /// never looks at it).
    pub notify: Option<std::path::PathBuf>,
}

impl GrantRule {
    /// Whether `caller` may approve, deny or revoke under these rules.
    pub fn approver(&self, caller: &Caller) -> bool {
        caller.uid == 0 || self.approvers.iter().any(|g| caller.groups.contains(g))
    }
}

/// A person, as the daemon resolved it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Person {
    /// uid.
    pub uid: u32,
    /// User name, when the uid has one.
    pub user: Option<String>,
}

impl Person {
    /// The caller as a person.
    pub fn of(caller: &Caller) -> Self {
        Self {
            uid: caller.uid,
            user: caller.user.clone(),
        }
    }

    /// The user name, or `uid N`.
    pub fn name(&self) -> String {
        self.user
            .clone()
            .unwrap_or_else(|| format!("uid {}", self.uid))
    }
}

/// One approval.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    /// Who approved.
    pub by: Person,
    /// When (Unix seconds).
    pub at: u64,
}

/// How a grant ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum End {
    /// An approver denied the request.
    Denied,
    /// The grant reached its end.
    Expired,
    /// Someone ended it (or withdrew the request), or keyholder did (the
    /// grantee left the key's groups, the key is gone).
    Revoked,
    /// Nobody decided in time.
    Lapsed,
}

impl End {
    /// The event name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Denied => "denied",
            Self::Expired => "expired",
            Self::Revoked => "revoked",
            Self::Lapsed => "lapsed",
        }
    }
}

/// Where a grant stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum State {
    /// Waiting for approvals until `lapses_at`.
    Pending {
        /// Unix seconds.
        lapses_at: u64,
    },
    /// In force from `from` (inclusive) to `until` (exclusive).
    Active {
        /// Unix seconds.
        from: u64,
        /// Unix seconds.
        until: u64,
    },
    /// Over.
    Ended {
        /// Unix seconds.
        at: u64,
        /// How.
        how: End,
    },
}

/// A grant request and what became of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// Its id (made by the store).
    pub id: String,
    /// The key's name.
    pub key: String,
    /// Who asked (and uses it).
    pub requester: Person,
    /// Why.
    pub reason: String,
    /// The requested length, in seconds.
    pub secs: u64,
    /// When it was asked for (Unix seconds).
    pub requested_at: u64,
    /// Approvals so far.
    #[serde(default)]
    pub approvals: Vec<Approval>,
    /// Approvals needed when it was asked for.
    pub needed: u32,
    /// Self-granted (`approvals = 0`).
    #[serde(default)]
    pub break_glass: bool,
    /// Where it stands.
    #[serde(flatten)]
    pub state: State,
    /// Who ended it (deny, revoke), if a person did.
    #[serde(default)]
    pub ended_by: Option<Person>,
    /// What they said, or why keyholder ended it.
    #[serde(default)]
    pub note: Option<String>,
}

impl Grant {
    /// The end of an active grant.
    pub fn until(&self) -> Option<u64> {
        match self.state {
            State::Active { until, .. } => Some(until),
            _ => None,
        }
    }

    /// Whether it is pending (and not lapsed) at `now`.
    pub fn pending_at(&self, now: u64) -> bool {
        matches!(self.state, State::Pending { lapses_at } if now < lapses_at)
    }

    /// Whether it is in force at `now`.
    pub fn active_at(&self, now: u64) -> bool {
        matches!(self.state, State::Active { from, until } if from <= now && now < until)
    }

    /// Whether it is over at `now` (ended, lapsed or past its end, whether
    /// or not the store has noted it yet).
    pub fn over_at(&self, now: u64) -> bool {
        match self.state {
            State::Pending { lapses_at } => now >= lapses_at,
            State::Active { until, .. } => now >= until,
            State::Ended { .. } => true,
        }
    }

    /// The next time its state changes by itself.
    pub fn deadline(&self) -> Option<u64> {
        match self.state {
            State::Pending { lapses_at } => Some(lapses_at),
            State::Active { until, .. } => Some(until),
            State::Ended { at, .. } => Some(at.saturating_add(KEEP_ENDED_SECS)),
        }
    }

    fn ended(&self, at: u64, how: End, by: Option<Person>, note: Option<String>) -> Self {
        let mut g = self.clone();
        g.state = State::Ended { at, how };
        g.ended_by = by;
        g.note = note;
        g
    }
}

/// The grants keyholder knows: pending, active, and recently ended.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grants {
    /// In the order they were requested.
    pub grants: Vec<Grant>,
}

/// No grants at all.
pub static NO_GRANTS: Grants = Grants { grants: Vec::new() };

impl Grants {
    /// The grant with this id.
    pub fn get(&self, id: &str) -> Option<&Grant> {
        self.grants.iter().find(|g| g.id == id)
    }

    /// The grant of `uid` for `key` in force at `now` (the one ending last).
    pub fn active(&self, key: &str, uid: u32, now: u64) -> Option<&Grant> {
        self.grants
            .iter()
            .filter(|g| g.key == key && g.requester.uid == uid && g.active_at(now))
            .max_by_key(|g| g.until())
    }

    /// `self` with `grant` replacing the one with its id (or added).
    pub fn with(&self, grant: Grant) -> Self {
        let mut next = self.clone();
        match next.grants.iter_mut().find(|g| g.id == grant.id) {
            Some(slot) => *slot = grant,
            None => next.grants.push(grant),
        }
        next
    }

    /// The earliest time a grant's state changes by itself.
    pub fn next_deadline(&self) -> Option<u64> {
        self.grants.iter().filter_map(Grant::deadline).min()
    }
}

/// Whether a caller who may use a key by its groups (or is root) may use
/// it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Use<'g> {
    /// The key needs no grant (or the caller is root).
    Free,
    /// Under this grant.
    Granted(&'g Grant),
    /// Refused: [`Reason::NoGrant`] or [`Reason::GrantExpired`].
    Refused(Reason),
}

/// Whether `caller`, who may use `key` by its groups (or is root), may use
/// it at `now` given `grants`. A grant past its end counts as expired even
/// before the store noted it.
pub fn check_use<'g>(key: &KeyRule, caller: &Caller, grants: &'g Grants, now: u64) -> Use<'g> {
    if caller.uid == 0 || key.grants.is_none() {
        return Use::Free;
    }
    if let Some(g) = grants.active(&key.name, caller.uid, now) {
        return Use::Granted(g);
    }
    let expired = grants.grants.iter().any(|g| {
        g.key == key.name
            && g.requester.uid == caller.uid
            && match g.state {
                State::Active { until, .. } => now >= until,
                State::Ended { how, .. } => how == End::Expired,
                State::Pending { .. } => false,
            }
    });
    Use::Refused(if expired {
        Reason::GrantExpired
    } else {
        Reason::NoGrant
    })
}

/// Whether `caller` holds a grant in force for `key` though it may no
/// longer use the key by its groups (then its sign is refused `no-grant`,
/// not `not-in-allowed-group`, and the grant ends: see [`orphaned`]).
pub fn holds_unusable(key: &KeyRule, caller: &Caller, grants: &Grants, now: u64) -> bool {
    caller.uid != 0
        && key.grants.is_some()
        && !caller.may_use(key)
        && grants.active(&key.name, caller.uid, now).is_some()
}

/// The ids of `caller`'s grants in force that it can no longer use: the
/// key is gone, needs no grant any more, or the caller left its groups.
pub fn orphaned<'g>(
    policy: &Policy,
    caller: &Caller,
    grants: &'g Grants,
    now: u64,
) -> Vec<&'g str> {
    grants
        .grants
        .iter()
        .filter(|g| g.requester.uid == caller.uid && g.active_at(now))
        .filter(|g| {
            policy
                .keys
                .iter()
                .find(|k| k.name == g.key)
                .is_none_or(|k| k.grants.is_none() || !caller.may_use(k))
        })
        .map(|g| g.id.as_str())
        .collect()
}

/// Why a grant request, approval, denial or revocation was refused. Each
/// is one line for the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrantError {
    /// No such configured key.
    UnknownKey(String),
    /// The key needs no grant.
    NoGrantsForKey(String),
    /// Root asked for a grant.
    RootNeedsNone,
    /// The requester is not in the key's groups.
    NotMember {
        /// The key.
        key: String,
        /// Its groups.
        groups: Vec<String>,
    },
    /// The duration could not be read.
    BadDuration(String),
    /// The duration is over `max_secs`.
    TooLong {
        /// Asked for.
        secs: u64,
        /// The key's `max_secs`.
        max: u64,
    },
    /// No reason given.
    ReasonMissing,
    /// A reason over [`MAX_REASON`] bytes.
    ReasonTooLong(usize),
    /// A reason with control characters.
    ReasonControl,
    /// [`MAX_PENDING_PER_USER`] pending already.
    TooManyPending,
    /// No grant with this id.
    UnknownId(String),
    /// The id is of a grant for another key than the one named.
    OtherKey {
        /// The id.
        id: String,
        /// Its key.
        key: String,
        /// The key named.
        wanted: String,
    },
    /// The request is not pending any more.
    NotPending {
        /// The id.
        id: String,
        /// What it is now.
        now: &'static str,
    },
    /// The grant is already over.
    AlreadyOver(String),
    /// The caller is not among the key's approvers.
    NotApprover {
        /// The key.
        key: String,
        /// Its approver groups.
        groups: Vec<String>,
    },
    /// The requester tried to approve or deny their own request.
    OwnRequest,
    /// The approver already approved this request.
    AlreadyApproved(String),
    /// The caller may not revoke it.
    NotYours(String),
}

impl std::fmt::Display for GrantError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::UnknownKey(k) => write!(f, "no key named {k:?} is configured"),
            Self::NoGrantsForKey(k) => {
                write!(f, "key {k} needs no grant: its members may use it")
            }
            Self::RootNeedsNone => f.write_str("root needs no grant: it may use every key"),
            Self::NotMember { key, groups } => write!(
                f,
                "you are not in a group of key {key} ({}): only its members may request it",
                groups.join(", ")
            ),
            Self::BadDuration(d) => write!(
                f,
                "cannot read duration {d:?}: write e.g. 90s, 30m, 2h or a number of seconds"
            ),
            Self::TooLong { secs, max } => write!(
                f,
                "{secs} s is longer than this key allows ({max} s, max_secs); ask for less"
            ),
            Self::ReasonMissing => f.write_str("a reason is required (--reason TEXT)"),
            Self::ReasonTooLong(n) => {
                write!(
                    f,
                    "the reason is {n} bytes; at most {MAX_REASON} are allowed"
                )
            }
            Self::ReasonControl => f.write_str("the reason may not contain control characters"),
            Self::TooManyPending => write!(
                f,
                "you have {MAX_PENDING_PER_USER} pending requests already; withdraw one \
                 (keyholder revoke ID) or wait for a decision"
            ),
            Self::UnknownId(id) => write!(f, "no grant request with id {id:?}"),
            Self::OtherKey { id, key, wanted } => {
                write!(f, "grant {id} is for key {key}, not {wanted}")
            }
            Self::NotPending { id, now } => write!(f, "grant request {id} is not pending ({now})"),
            Self::AlreadyOver(id) => write!(f, "grant {id} is already over"),
            Self::NotApprover { key, groups } => {
                if groups.is_empty() {
                    write!(f, "key {key} has no approver groups: only root may decide")
                } else {
                    write!(
                        f,
                        "you are not an approver of key {key} (approver groups: {})",
                        groups.join(", ")
                    )
                }
            }
            Self::OwnRequest => f.write_str(
                "you cannot decide your own request: someone else must approve it \
                 (withdraw it with keyholder revoke ID)",
            ),
            Self::AlreadyApproved(id) => write!(
                f,
                "you have already approved {id}: each person counts once; another approver \
                 is needed"
            ),
            Self::NotYours(id) => write!(
                f,
                "only the requester, an approver of its key or root may revoke {id}"
            ),
        }
    }
}

/// Reads a duration: `90s`, `30m`, `2h`, `1d`, or plain seconds. Zero and
/// anything else are refused.
pub fn parse_duration(text: &str) -> Result<u64, GrantError> {
    let bad = || GrantError::BadDuration(text.chars().take(32).collect());
    let t = text.trim();
    let (digits, unit) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (t.get(..i).unwrap_or(""), Some(c)),
        _ => (t, None),
    };
    if digits.is_empty() || digits.len() > 12 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let mult = match unit {
        None | Some('s') => 1,
        Some('m') => 60,
        Some('h') => 3600,
        Some('d') => 86400,
        Some(_) => return Err(bad()),
    };
    match n.checked_mul(mult) {
        Some(0) | None => Err(bad()),
        Some(secs) => Ok(secs),
    }
}

/// Checks a reason: present, at most [`MAX_REASON`] bytes, no control
/// characters.
pub fn check_reason(reason: &str) -> Result<(), GrantError> {
    if reason.trim().is_empty() {
        return Err(GrantError::ReasonMissing);
    }
    if reason.len() > MAX_REASON {
        return Err(GrantError::ReasonTooLong(reason.len()));
    }
    if reason.chars().any(char::is_control) {
        return Err(GrantError::ReasonControl);
    }
    Ok(())
}

fn grant_key<'p>(
    policy: &'p Policy,
    name: &str,
) -> Result<(&'p KeyRule, &'p GrantRule), GrantError> {
    let key = policy
        .keys
        .iter()
        .find(|k| k.name == name)
        .ok_or_else(|| GrantError::UnknownKey(name.chars().take(128).collect()))?;
    let rule = key
        .grants
        .as_ref()
        .ok_or_else(|| GrantError::NoGrantsForKey(key.name.clone()))?;
    Ok((key, rule))
}

/// What a grant request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ask<'a> {
    /// The key's name.
    pub key: &'a str,
    /// The duration as written.
    pub duration: &'a str,
    /// Why.
    pub reason: &'a str,
}

/// Checks a grant request by `caller` at `now`; the new record (with `id`):
/// pending, or active at once for a break-glass key.
pub fn check_request(
    policy: &Policy,
    caller: &Caller,
    grants: &Grants,
    ask: Ask<'_>,
    id: String,
    now: u64,
) -> Result<Grant, GrantError> {
    let (key, rule) = grant_key(policy, ask.key)?;
    if caller.uid == 0 {
        return Err(GrantError::RootNeedsNone);
    }
    if !caller.may_use(key) {
        return Err(GrantError::NotMember {
            key: key.name.clone(),
            groups: key.groups.clone(),
        });
    }
    let secs = parse_duration(ask.duration)?;
    if secs > rule.max_secs {
        return Err(GrantError::TooLong {
            secs,
            max: rule.max_secs,
        });
    }
    check_reason(ask.reason)?;
    let pending = grants
        .grants
        .iter()
        .filter(|g| g.requester.uid == caller.uid && g.pending_at(now))
        .count();
    if pending >= MAX_PENDING_PER_USER {
        return Err(GrantError::TooManyPending);
    }
    let break_glass = rule.approvals == 0;
    Ok(Grant {
        id,
        key: key.name.clone(),
        requester: Person::of(caller),
        reason: ask.reason.to_owned(),
        secs,
        requested_at: now,
        approvals: Vec::new(),
        needed: rule.approvals,
        break_glass,
        state: if break_glass {
            State::Active {
                from: now,
                until: now.saturating_add(secs),
            }
        } else {
            State::Pending {
                lapses_at: now.saturating_add(rule.pending_secs),
            }
        },
        ended_by: None,
        note: None,
    })
}

/// The grant `id`, checked against the key named (if any); with its key's
/// rule when the key still needs grants.
fn find<'g, 'p>(
    policy: &'p Policy,
    grants: &'g Grants,
    id: &str,
    key: Option<&str>,
) -> Result<(&'g Grant, Option<&'p GrantRule>), GrantError> {
    let grant = grants
        .get(id)
        .ok_or_else(|| GrantError::UnknownId(id.chars().take(MAX_ID).collect()))?;
    if let Some(wanted) = key {
        if wanted != grant.key {
            return Err(GrantError::OtherKey {
                id: grant.id.clone(),
                key: grant.key.clone(),
                wanted: wanted.chars().take(128).collect(),
            });
        }
    }
    let rule = policy
        .keys
        .iter()
        .find(|k| k.name == grant.key)
        .and_then(|k| k.grants.as_ref());
    Ok((grant, rule))
}

fn state_name(g: &Grant, now: u64) -> &'static str {
    match g.state {
        State::Pending { .. } if g.over_at(now) => "lapsed",
        State::Pending { .. } => "pending",
        State::Active { .. } if g.over_at(now) => "expired",
        State::Active { .. } => "active",
        State::Ended { how, .. } => how.name(),
    }
}

/// A pending request, decidable by `caller` under its key's rule.
fn decidable<'g>(
    policy: &Policy,
    caller: &Caller,
    grants: &'g Grants,
    id: &str,
    key: Option<&str>,
    now: u64,
) -> Result<(&'g Grant, u32), GrantError> {
    let (grant, rule) = find(policy, grants, id, key)?;
    if !grant.pending_at(now) {
        return Err(GrantError::NotPending {
            id: grant.id.clone(),
            now: state_name(grant, now),
        });
    }
    let Some(rule) = rule else {
        // The key is gone or needs no grant any more: the store ends such
        // requests; nobody decides them.
        return Err(GrantError::NotPending {
            id: grant.id.clone(),
            now: "its key no longer needs grants",
        });
    };
    if !rule.approver(caller) {
        return Err(GrantError::NotApprover {
            key: grant.key.clone(),
            groups: rule.approvers.clone(),
        });
    }
    if caller.uid == grant.requester.uid {
        return Err(GrantError::OwnRequest);
    }
    Ok((grant, rule.approvals.max(grant.needed)))
}

/// Checks an approval of `id` by `caller`; the updated record, active when
/// this was the last approval needed.
pub fn check_approve(
    policy: &Policy,
    caller: &Caller,
    grants: &Grants,
    id: &str,
    key: Option<&str>,
    now: u64,
) -> Result<Grant, GrantError> {
    let (grant, needed) = decidable(policy, caller, grants, id, key, now)?;
    if grant.approvals.iter().any(|a| a.by.uid == caller.uid) {
        return Err(GrantError::AlreadyApproved(grant.id.clone()));
    }
    let mut g = grant.clone();
    g.approvals.push(Approval {
        by: Person::of(caller),
        at: now,
    });
    if u32::try_from(g.approvals.len()).unwrap_or(u32::MAX) >= needed {
        g.state = State::Active {
            from: now,
            until: now.saturating_add(g.secs),
        };
    }
    Ok(g)
}

/// Checks a denial of `id` by `caller` (`note`: what they said, checked as
/// a reason when given); the ended record.
pub fn check_deny(
    policy: &Policy,
    caller: &Caller,
    grants: &Grants,
    id: &str,
    key: Option<&str>,
    note: Option<&str>,
    now: u64,
) -> Result<Grant, GrantError> {
    let note = note.filter(|n| !n.is_empty());
    if let Some(n) = note {
        check_reason(n)?;
    }
    let (grant, _) = decidable(policy, caller, grants, id, key, now)?;
    Ok(grant.ended(
        now,
        End::Denied,
        Some(Person::of(caller)),
        note.map(str::to_owned),
    ))
}

/// Checks a revocation of `id` by `caller`: the requester, an approver of
/// the key, or root; of a pending request or a grant in force. The ended
/// record.
pub fn check_revoke(
    policy: &Policy,
    caller: &Caller,
    grants: &Grants,
    id: &str,
    key: Option<&str>,
    now: u64,
) -> Result<Grant, GrantError> {
    let (grant, rule) = find(policy, grants, id, key)?;
    if grant.over_at(now) {
        return Err(GrantError::AlreadyOver(grant.id.clone()));
    }
    let allowed = caller.uid == 0
        || caller.uid == grant.requester.uid
        || rule.is_some_and(|r| r.approver(caller));
    if !allowed {
        return Err(GrantError::NotYours(grant.id.clone()));
    }
    Ok(grant.ended(now, End::Revoked, Some(Person::of(caller)), None))
}

/// What the passing of time (and a new configuration) changes at `now`:
/// requests past `lapses_at` lapse, grants past their end expire, grants
/// and requests whose key is gone or needs no grant any more end
/// (revoked by keyholder). Ended records older than [`KEEP_ENDED_SECS`]
/// are forgotten, and beyond [`MAX_ENDED`] the oldest of them. Returns the
/// new set and the records that changed.
pub fn sweep(policy: &Policy, grants: &Grants, now: u64) -> (Grants, Vec<Grant>) {
    let mut changed = Vec::new();
    let mut kept = Vec::with_capacity(grants.grants.len());
    for g in &grants.grants {
        let rule = policy
            .keys
            .iter()
            .find(|k| k.name == g.key)
            .and_then(|k| k.grants.as_ref());
        let next = match g.state {
            State::Ended { at, .. } => {
                if now < at.saturating_add(KEEP_ENDED_SECS) {
                    kept.push(g.clone());
                }
                continue;
            }
            State::Pending { lapses_at } if now >= lapses_at => {
                g.ended(lapses_at, End::Lapsed, None, None)
            }
            State::Active { until, .. } if now >= until => g.ended(until, End::Expired, None, None),
            _ if rule.is_none() => g.ended(
                now,
                End::Revoked,
                None,
                Some("its key is no longer configured with grants".to_owned()),
            ),
            _ => {
                kept.push(g.clone());
                continue;
            }
        };
        changed.push(next.clone());
        kept.push(next);
    }
    let ended = |g: &Grant| matches!(g.state, State::Ended { .. });
    let mut excess = kept
        .iter()
        .filter(|g| ended(g))
        .count()
        .saturating_sub(MAX_ENDED);
    if excess > 0 {
        let mut by_age: Vec<u64> = kept
            .iter()
            .filter_map(|g| match g.state {
                State::Ended { at, .. } => Some(at),
                _ => None,
            })
            .collect();
        by_age.sort_unstable();
        let cutoff = by_age.get(excess.saturating_sub(1)).copied().unwrap_or(0);
        kept.retain(|g| match g.state {
            State::Ended { at, .. } if at <= cutoff && excess > 0 => {
                excess -= 1;
                false
            }
            _ => true,
        });
    }
    (Grants { grants: kept }, changed)
}

/// Ends the grants `ids` of a grantee who may no longer use their keys
/// (see [`orphaned`]); the ended records.
pub fn end_orphans(grants: &Grants, ids: &[&str], now: u64) -> Vec<Grant> {
    grants
        .grants
        .iter()
        .filter(|g| ids.contains(&g.id.as_str()) && !g.over_at(now))
        .map(|g| {
            g.ended(
                now,
                End::Revoked,
                None,
                Some("the grantee is no longer in the key's groups".to_owned()),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests;
