//! The security decision, in one place.
//!
//! Pure functions from (policy, caller, request) to a [`Decision`]: no I/O, no
//! clock, no global state. The daemon carries a decision out; it never decides.
//!
//! The rules (`docs/reference.md`, "What each request gets"):
//! - REQUEST_IDENTITIES: forwarded; the answer is filtered to the keys the
//!   caller may use ([`plan_identities`]). A certificate counts as the key it
//!   certifies. A caller who may use no configured key gets an empty list
//!   without the backend being asked: such a caller cannot load it.
//! - SIGN_REQUEST: forwarded unchanged iff the key is configured, the caller may
//!   use it, and the data is an SSH user-authentication request (unless the key
//!   sets `allow_any_data`).
//! - EXTENSION: `session-bind@openssh.com` verified (by the daemon, with
//!   `crate::verify`) and kept on the connection, never forwarded; `query` and
//!   `status@keyholder` answered by the daemon; anything else refused.
//! - Per key, the destination, remote-user and forwarding rules over the
//!   connection's bindings ([`destinations`]), for signing and listing.
//! - Admin requests: refused for everyone, root included.
//! - Unknown types and malformed bodies: refused.
//! - Certificates ([`certificates`]): the key blob inside the user-auth data
//!   counts; a certificate there must be one keyholder minted for this
//!   caller; mode `only` refuses the plain key there. The CA is never a
//!   key callers may use: it is not in [`Policy::keys`].
//! - A caller whose user lookup gave no answer (timed out or failed): what
//!   depends on its groups is refused ([`decide_unresolved`]).
//!
//! A caller may use a key when its uid is 0, or when one of its groups (from
//! the user database, resolved by the daemon) is listed in the key's `groups`.

use ssh_agent_lib::proto::{Identity, PublicCredential};
use ssh_key::public::KeyData;

pub mod certificates;
pub mod destinations;
pub mod grants;

use certificates::{DataKey, Listing, Minted};
use destinations::{Bindings, Proposed, Rules};

use crate::config::{CertMode, Config};
use crate::protocol::grants as grant_ext;
use crate::protocol::request::Request;
use crate::protocol::request::Sign;
use crate::protocol::session_bind::SessionBind;
use crate::protocol::status::{self, KeyStatus, StatusReport};
use crate::protocol::AdminOp;

pub use crate::protocol::request::{QUERY, SESSION_BIND};
/// Extensions the proxy supports, as answered to `query`.
pub const SUPPORTED_EXTENSIONS: [&str; 8] = [
    QUERY,
    SESSION_BIND,
    status::NAME,
    grant_ext::REQUEST,
    grant_ext::APPROVE,
    grant_ext::DENY,
    grant_ext::LIST,
    grant_ext::REVOKE,
];

/// One key the proxy may let callers use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRule {
    /// Configured name.
    pub name: String,
    /// The public key.
    pub key: KeyData,
    /// `SHA256:…`
    pub fingerprint: String,
    /// Groups whose members may use it.
    pub groups: Vec<String>,
    /// Sign any data, not only user-authentication requests.
    pub allow_any_data: bool,
    /// Destinations, remote users, forwarding.
    pub rules: Rules,
    /// Certificates for this key (`certificate`).
    pub certificate: CertMode,
    /// Members need a grant to use it (`[keys.NAME.grants]`).
    pub grants: Option<grants::GrantRule>,
    /// What its certificates say now ([`certificates::terms`]): one minted
    /// under other terms is stale.
    pub cert_terms: u64,
}

/// The certificate CA: only its name and public key (status, listing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaRule {
    /// Configured name (`certificates.ca`).
    pub name: String,
    /// The public key.
    pub key: KeyData,
    /// `SHA256:…`
    pub fingerprint: String,
}

/// The rules in force: the configured keys.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    /// Keys in configuration order.
    pub keys: Vec<KeyRule>,
    /// The certificate CA, when `[certificates]` is configured.
    pub ca: Option<CaRule>,
}

impl From<&Config> for Policy {
    fn from(config: &Config) -> Self {
        Self {
            keys: config
                .keys
                .iter()
                .map(|k| KeyRule {
                    name: k.name.clone(),
                    key: k.public_key.clone(),
                    fingerprint: k.fingerprint.clone(),
                    groups: k.groups.clone(),
                    allow_any_data: k.allow_any_data,
                    rules: Rules {
                        // Unread (only for a user other than root, never
                        // the daemon): no host is admitted.
                        destinations: k
                            .destinations
                            .as_ref()
                            .map(|d| d.hosts.clone().unwrap_or_default()),
                        remote_users: k.remote_users.clone(),
                        allow_forwarding: k.allow_forwarding,
                    },
                    certificate: k.cert.mode,
                    grants: k.grants.as_ref().map(|g| grants::GrantRule {
                        approvers: g.approvers.clone(),
                        approvals: g.approvals,
                        max_secs: g.max_secs,
                        pending_secs: g.pending_secs,
                        notify: g.notify.clone(),
                    }),
                    cert_terms: certificates::terms(config.certificates.as_deref(), &k.cert),
                })
                .collect(),
            ca: config.certificates.as_ref().map(|c| CaRule {
                name: c.ca.name.clone(),
                key: c.ca.public_key.clone(),
                fingerprint: c.ca.fingerprint.clone(),
            }),
        }
    }
}

impl Policy {
    /// Every group named by some key (its `groups` and its grant
    /// `approvers`), sorted, without duplicates: the only groups a caller's
    /// membership is looked up for.
    pub fn group_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .keys
            .iter()
            .flat_map(|k| {
                k.groups
                    .iter()
                    .chain(k.grants.iter().flat_map(|g| g.approvers.iter()))
                    .cloned()
            })
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// The configured key matching `key`, if any.
    pub fn key(&self, key: &KeyData) -> Option<&KeyRule> {
        self.keys.iter().find(|k| &k.key == key)
    }

    /// Whether `caller` may use some configured key (by its groups; a key
    /// that needs a grant counts only while the caller holds one at `now`).
    pub fn any_key_for(&self, caller: &Caller, grants: &grants::Grants, now: u64) -> bool {
        self.keys.iter().any(|k| usable(k, caller, grants, now))
    }

    /// Whether some key needs a grant.
    pub fn has_grants(&self) -> bool {
        self.keys.iter().any(|k| k.grants.is_some())
    }
}

/// Whether `caller` may use `key` at `now`: by its groups, and under a
/// grant in force when the key needs one.
pub fn usable(key: &KeyRule, caller: &Caller, grants: &grants::Grants, now: u64) -> bool {
    caller.may_use(key)
        && !matches!(
            grants::check_use(key, caller, grants, now),
            grants::Use::Refused(_)
        )
}

/// What a decision needs to know about the connection beyond the caller.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// The connection's session bindings.
    pub bindings: &'a Bindings,
    /// Now, in Unix seconds (host certificates' validity).
    pub now: u64,
    /// The certificates keyholder minted, and for whom.
    pub minted: &'a dyn Minted,
    /// The grants in force (and recently ended).
    pub grants: &'a grants::Grants,
}

/// Who is asking, as resolved by the daemon from `SO_PEERCRED` and the user
/// database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The peer's uid.
    pub uid: u32,
    /// The peer's pid at connect time (for logs only).
    pub pid: Option<i32>,
    /// The user name, when the uid has a passwd entry.
    pub user: Option<String>,
    /// The configured groups (see [`Policy::group_names`]) the user is in,
    /// by its primary and supplementary groups from the user database; empty
    /// when the uid has no passwd entry. Groups the configuration does not
    /// name are not looked up, so they are not listed.
    pub groups: Vec<String>,
}

impl Caller {
    /// Whether this caller may use `key`.
    pub fn may_use(&self, key: &KeyRule) -> bool {
        self.uid == 0 || key.groups.iter().any(|g| self.groups.contains(g))
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// An administrative request (add, remove, lock, …).
    AdminRequest(AdminOp),
    /// The key is not one the configuration knows.
    UnknownKey,
    /// The key is configured but none of the caller's groups may use it.
    NotInGroup,
    /// The data to sign is not an SSH user-authentication request.
    NotUserAuth(&'static str),
    /// An extension the proxy does not support.
    UnknownExtension,
    /// A message type the proxy does not know.
    UnknownType(u8),
    /// A malformed message.
    Malformed(&'static str),
    /// The key has destinations; the bound host is not one of them (or the
    /// request does not match the binding).
    DestinationNotAllowed,
    /// The key has destinations; the connection has no binding.
    NoSessionBind,
    /// The connection has a forwarding binding; the key does not allow it.
    ForwardedUse,
    /// The user-auth request names a remote user the key does not allow.
    RemoteUserNotAllowed,
    /// A binding on this connection failed.
    BadSessionBind,
    /// The caller's user-database lookup missed its deadline, so its groups
    /// are unknown (see [`decide_unresolved`]).
    LookupTimeout,
    /// The user database failed (rather than finding no such user), so the
    /// caller's groups are unknown (see [`decide_unresolved`]).
    LookupError,
    /// The user-auth data carries a certificate keyholder did not mint for
    /// this caller.
    CertificateNotYours,
    /// Mode `only`: the user-auth data carries the plain key.
    CertificateRequired,
    /// The key needs a grant; the caller holds none.
    NoGrant,
    /// The key needs a grant; the caller's ended.
    GrantExpired,
    /// The user-auth data carries a certificate keyholder minted for this
    /// caller under certificate settings a reload has since changed.
    CertificateStale,
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::AdminRequest(op) => write!(f, "admin-request:{}", op.name()),
            Self::UnknownKey => f.write_str("key-not-configured"),
            Self::NotInGroup => f.write_str("not-in-allowed-group"),
            Self::NotUserAuth(why) => write!(f, "not-ssh-userauth ({why})"),
            Self::UnknownExtension => f.write_str("unsupported-extension"),
            Self::UnknownType(t) => write!(f, "unknown-message-type:{t}"),
            Self::Malformed(why) => write!(f, "malformed ({why})"),
            Self::DestinationNotAllowed => f.write_str("destination-not-allowed"),
            Self::NoSessionBind => f.write_str("no-session-bind"),
            Self::ForwardedUse => f.write_str("forwarded-use"),
            Self::RemoteUserNotAllowed => f.write_str("remote-user-not-allowed"),
            Self::BadSessionBind => f.write_str("bad-session-bind"),
            Self::LookupTimeout => f.write_str("user-lookup-timeout"),
            Self::LookupError => f.write_str("user-lookup-error"),
            Self::CertificateNotYours => f.write_str("certificate-not-yours"),
            Self::CertificateRequired => f.write_str("certificate-required"),
            Self::NoGrant => f.write_str("no-grant"),
            Self::GrantExpired => f.write_str("grant-expired"),
            Self::CertificateStale => f.write_str("certificate-stale"),
        }
    }
}

/// What the daemon must do with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision<'p> {
    /// Forward REQUEST_IDENTITIES; answer with what [`plan_identities`] makes
    /// of the reply.
    List,
    /// Answer an empty identity list without asking the backend: the caller
    /// may use no configured key.
    EmptyList,
    /// Forward the sign request unchanged.
    Sign {
        /// The configured key it uses.
        key: &'p KeyRule,
        /// The remote user name in the user-auth request (absent for
        /// `allow_any_data` keys signing other data).
        remote_user: Option<String>,
        /// The serial of the certificate in the user-auth data, if any.
        serial: Option<u64>,
        /// The id of the grant it is used under, when the key needs one.
        grant: Option<String>,
        /// The fingerprint of the host key of the verified binding the
        /// user-auth data belongs to ([`destinations::binding_for`]), if any.
        dest: Option<String>,
    },
    /// Verify the session binding (off the async threads) and, if it
    /// verifies, record it with [`Bindings::record`]; SUCCESS or
    /// EXTENSION_FAILURE.
    VerifyBind,
    /// Answer EXTENSION_FAILURE to a session binding and remember it failed
    /// ([`Bindings::fail`] with `forwarding`).
    RefuseBind {
        /// Why.
        reason: &'static str,
        /// The binding's forwarding flag, if it could be read.
        forwarding: Option<bool>,
    },
    /// Answer `query` with [`SUPPORTED_EXTENSIONS`].
    Query,
    /// Answer `status@keyholder` with [`status_report`].
    Status,
    /// A `grant-…@keyholder` extension: the grant store checks it (with
    /// [`grants`]) and answers.
    Grant,
    /// Answer FAILURE.
    Refuse {
        /// Why.
        reason: Reason,
        /// For sign requests: the configured key asked for, if any.
        key: Option<&'p KeyRule>,
        /// For sign requests: the requested key's fingerprint.
        fingerprint: Option<String>,
        /// For sign requests: the remote user, when the data says.
        remote_user: Option<String>,
        /// For sign requests: the serial of a keyholder certificate in the
        /// user-auth data, whoever it was minted for.
        serial: Option<u64>,
        /// For sign requests: as for [`Decision::Sign`].
        dest: Option<String>,
    },
}

impl Decision<'_> {
    /// Whether this decision belongs in the audit log (every sign decision and
    /// every refused admin request).
    pub fn is_audited(&self) -> bool {
        match self {
            Self::Sign { .. } => true,
            Self::Refuse {
                reason,
                fingerprint,
                ..
            } => match reason {
                Reason::AdminRequest(_)
                | Reason::UnknownKey
                | Reason::NotInGroup
                | Reason::NotUserAuth(_)
                | Reason::DestinationNotAllowed
                | Reason::NoSessionBind
                | Reason::ForwardedUse
                | Reason::RemoteUserNotAllowed
                | Reason::BadSessionBind
                | Reason::CertificateNotYours
                | Reason::CertificateRequired
                | Reason::NoGrant
                | Reason::GrantExpired
                | Reason::CertificateStale => true,
                // A sign request (which names a key); a refused listing is not.
                Reason::LookupTimeout | Reason::LookupError => fingerprint.is_some(),
                _ => false,
            },
            _ => false,
        }
    }
}

fn refuse<'p>(reason: Reason) -> Decision<'p> {
    Decision::Refuse {
        reason,
        key: None,
        fingerprint: None,
        remote_user: None,
        serial: None,
        dest: None,
    }
}

/// Decides what to do with `request` from `caller` under `policy`, on a
/// connection described by `ctx`.
pub fn decide<'p>(
    policy: &'p Policy,
    caller: &Caller,
    ctx: Context<'_>,
    request: &Request,
) -> Decision<'p> {
    match request {
        Request::RequestIdentities if policy.any_key_for(caller, ctx.grants, ctx.now) => {
            Decision::List
        }
        Request::RequestIdentities => Decision::EmptyList,
        Request::Sign(sign) => decide_sign(policy, caller, ctx, sign),
        Request::Query => Decision::Query,
        Request::Status(_) => Decision::Status,
        Request::Grant { .. } => Decision::Grant,
        Request::SessionBind(bind) => decide_bind(policy, caller, ctx, bind),
        Request::BadSessionBind(m) => Decision::RefuseBind {
            reason: m.reason,
            forwarding: m.forwarding,
        },
        Request::Extension(_) => refuse(Reason::UnknownExtension),
        Request::Admin(op) => refuse(Reason::AdminRequest(*op)),
        Request::Unknown(t) => refuse(Reason::UnknownType(*t)),
        Request::Malformed { reason, .. } => refuse(Reason::Malformed(reason)),
    }
}

/// Decides for a caller whose user-database lookup gave no answer, `why`
/// being [`Reason::LookupTimeout`] or [`Reason::LookupError`]: `caller` has
/// no user name and no groups. What depends on the caller's groups
/// (listing keys, signing with a configured key) is refused for `why`, not
/// answered as if the caller had no groups; root's requests never depend on
/// them, and everything else is decided as usual.
pub fn decide_unresolved<'p>(
    policy: &'p Policy,
    caller: &Caller,
    ctx: Context<'_>,
    request: &Request,
    why: Reason,
) -> Decision<'p> {
    let decision = decide(policy, caller, ctx, request);
    if caller.uid == 0 {
        return decision;
    }
    match (decision, request) {
        // Not "may use no key": its groups are unknown. Verified as for
        // anyone, so that the lookup's failure does not spoil the
        // connection's bindings.
        (Decision::RefuseBind { .. }, Request::SessionBind(bind)) => {
            check_order(ctx.bindings, bind)
        }
        (Decision::List | Decision::EmptyList, _) => refuse(why),
        (
            Decision::Refuse {
                reason: Reason::NotInGroup | Reason::NoGrant,
                key,
                fingerprint,
                remote_user,
                serial,
                dest,
            },
            _,
        ) => Decision::Refuse {
            reason: why,
            key,
            fingerprint,
            serial,
            remote_user,
            dest,
        },
        (other, _) => other,
    }
}

fn decide_sign<'p>(
    policy: &'p Policy,
    caller: &Caller,
    ctx: Context<'_>,
    sign: &Sign,
) -> Decision<'p> {
    let wanted = sign.request.credential.key_data();
    let auth = &sign.auth;
    let remote_user = auth.as_ref().ok().map(|a| a.user.clone());
    // The key blob inside the data is what the target sees.
    let data_key = auth.as_ref().ok().map(|a| match &a.key {
        PublicCredential::Key(_) => DataKey::Plain,
        PublicCredential::Cert(cert) => DataKey::Certificate {
            issued: ctx.minted.issued(cert),
            keyholder_ca: policy
                .ca
                .as_ref()
                .is_some_and(|ca| cert.signature_key() == &ca.key),
        },
    });
    let seen_serial = match data_key {
        Some(DataKey::Certificate {
            issued: Some(i), ..
        }) => Some(i.serial),
        _ => None,
    };
    // The host this signature is for, for the audit line: only a verified
    // binding of the session named in the data, never merely the last one.
    let dest = auth
        .as_ref()
        .ok()
        .and_then(|a| destinations::binding_for(ctx.bindings, a))
        .map(|b| b.fingerprint.clone());
    let refusal = |reason, key| Decision::Refuse {
        reason,
        key,
        fingerprint: Some(wanted.fingerprint(ssh_key::HashAlg::Sha256).to_string()),
        remote_user: remote_user.clone(),
        serial: seen_serial,
        dest: dest.clone(),
    };
    let Some(key) = policy.key(wanted) else {
        return refusal(Reason::UnknownKey, None);
    };
    if !caller.may_use(key) {
        // A grantee who left the key's groups: its grant is of no use
        // (and the daemon ends it, see `grants::orphaned`).
        if grants::holds_unusable(key, caller, ctx.grants, ctx.now) {
            return refusal(Reason::NoGrant, Some(key));
        }
        return refusal(Reason::NotInGroup, Some(key));
    }
    let grant = match grants::check_use(key, caller, ctx.grants, ctx.now) {
        grants::Use::Free => None,
        grants::Use::Granted(g) => Some(g.id.clone()),
        grants::Use::Refused(reason) => return refusal(reason, Some(key)),
    };
    match &auth {
        Err(why) if !key.allow_any_data => refusal(Reason::NotUserAuth(why), Some(key)),
        _ => {
            let serial =
                match certificates::check(key.certificate, data_key, caller.uid, key.cert_terms) {
                    Ok(serial) => serial,
                    Err(reason) => return refusal(reason, Some(key)),
                };
            match destinations::check_sign(&key.rules, ctx.bindings, auth.as_ref().ok(), ctx.now) {
                Ok(()) => Decision::Sign {
                    key,
                    remote_user: remote_user.clone(),
                    serial,
                    grant,
                    dest,
                },
                Err(reason) => refusal(reason, Some(key)),
            }
        }
    }
}

/// A binding is checked for order before it is verified, and not verified
/// at all for a caller who may use no key (it fails: nothing it could bind
/// would let it sign).
fn decide_bind<'p>(
    policy: &Policy,
    caller: &Caller,
    ctx: Context<'_>,
    bind: &SessionBind,
) -> Decision<'p> {
    let bindings = ctx.bindings;
    if !policy.any_key_for(caller, ctx.grants, ctx.now) {
        return Decision::RefuseBind {
            reason: "the caller may use no key",
            forwarding: Some(bind.forwarding),
        };
    }
    check_order(bindings, bind)
}

/// Verify `bind` unless it is out of order on a connection with `bindings`.
fn check_order<'p>(bindings: &Bindings, bind: &SessionBind) -> Decision<'p> {
    match bindings.check(Proposed {
        host_key_blob: &bind.host_key_blob,
        session_id: &bind.session_id,
    }) {
        Ok(()) => Decision::VerifyBind,
        Err(reason) => Decision::RefuseBind {
            reason,
            forwarding: Some(bind.forwarding),
        },
    }
}

/// One identity to list, and how (see [`certificates::listing`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Planned<'p> {
    /// The backend's identity.
    pub identity: Identity,
    /// The configured key it is.
    pub key: &'p KeyRule,
    /// With a certificate before it, or not at all.
    pub listing: Listing,
    /// The end of the grant it is used under, when it needs one: a
    /// certificate minted for it is valid no longer.
    pub grant_until: Option<u64>,
}

/// What REQUEST_IDENTITIES answers, before certificates are minted.
#[derive(Debug, Clone, PartialEq)]
pub struct ListPlan<'p> {
    /// The identities `caller` may use, in the backend's order.
    pub items: Vec<Planned<'p>>,
    /// Whether the backend holds the CA.
    pub ca_armed: bool,
}

/// The backend's identities that `caller` may use on a connection
/// described by `ctx` (its bindings, the grants in force, the clock), in
/// the backend's order, each with how it is listed given whether the CA is
/// among them. The CA itself is never planned (it is not a configured
/// key), for root neither.
pub fn plan_identities<'p>(
    policy: &'p Policy,
    caller: &Caller,
    ctx: Context<'_>,
    identities: Vec<Identity>,
) -> ListPlan<'p> {
    let bindings = ctx.bindings;
    let ca_armed = policy.ca.as_ref().is_some_and(|ca| {
        identities
            .iter()
            .any(|id| id.credential.key_data() == &ca.key)
    });
    let items = identities
        .into_iter()
        .filter_map(|identity| {
            let key = policy.key(identity.credential.key_data())?;
            if !caller.may_use(key) || !destinations::listed(&key.rules, bindings) {
                return None;
            }
            let grant_until = match grants::check_use(key, caller, ctx.grants, ctx.now) {
                grants::Use::Free => None,
                grants::Use::Granted(g) => g.until(),
                grants::Use::Refused(_) => return None,
            };
            // Only a plain key identity gets a certificate put before it.
            let listing = match &identity.credential {
                PublicCredential::Key(_) => certificates::listing(key.certificate, ca_armed),
                PublicCredential::Cert(_) => Listing::Plain,
            };
            Some(Planned {
                identity,
                key,
                listing,
                grant_until,
            })
        })
        .collect();
    ListPlan { items, ca_armed }
}

/// The identities `caller` may use on a connection described by `ctx`, in
/// the backend's order: the same filter as [`plan_identities`], without the
/// listing plan. The daemon uses [`plan_identities`]; the tests use this to
/// check the filter alone.
pub fn filter_identities(
    policy: &Policy,
    caller: &Caller,
    ctx: Context<'_>,
    identities: Vec<Identity>,
) -> Vec<Identity> {
    identities
        .into_iter()
        .filter(|id| {
            policy.key(id.credential.key_data()).is_some_and(|k| {
                usable(k, caller, ctx.grants, ctx.now)
                    && destinations::listed(&k.rules, ctx.bindings)
            })
        })
        .collect()
}

/// Which configured keys are armed, given the upstream agent's identities
/// (`None` when the upstream agent could not be asked).
/// The CA counts as a key that must be armed, listed after the keys.
pub fn status_report(policy: &Policy, upstream: Option<&[Identity]>) -> StatusReport {
    let armed = |key: &KeyData| {
        upstream.is_some_and(|ids| ids.iter().any(|id| id.credential.key_data() == key))
    };
    StatusReport {
        upstream_reachable: upstream.is_some(),
        keys: policy
            .keys
            .iter()
            .map(|k| KeyStatus {
                name: k.name.clone(),
                fingerprint: k.fingerprint.clone(),
                armed: armed(&k.key),
            })
            .chain(policy.ca.iter().map(|ca| KeyStatus {
                name: ca.name.clone(),
                fingerprint: ca.fingerprint.clone(),
                armed: armed(&ca.key),
            }))
            .collect(),
    }
}

#[cfg(test)]
mod tests;
