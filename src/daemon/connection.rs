//! One client connection: read a message, classify it, resolve the caller
//! (through the lookup cache, for every request, so that a group change
//! applies to open connections too), ask the policy, carry the decision out,
//! answer. Requests on a connection are handled one at a time, in order, as
//! ssh-agent does. The connection's session bindings
//! (`session-bind@openssh.com`) live here, with the connection: verified and
//! kept by keyholder, never forwarded to the backend.

use std::sync::Arc;

use ssh_agent_lib::proto::{Extension, Identity, PublicCredential, Response};
use ssh_encoding::Encode;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::watch;
use tokio::time::Instant;

use super::limits::Admission;
use super::lookups::Who;
use super::metrics::{BackendOp, Closed};
use super::{audit, Shared};
use crate::backend::BackendError;
use crate::certs::MintError;
use crate::policy::certificates::Listing;
use crate::policy::destinations::Bindings;
use crate::policy::{self, Caller, Context, Decision, Reason, SUPPORTED_EXTENSIONS};
use crate::protocol::{self, response, status, FrameError, Request};
use crate::ratelog::{self, Kind};

/// Connections closed on a message that breaks the framing: rate-limited per uid.
pub static BAD_MESSAGE: Kind = Kind {
    name: "connections closed on a bad message",
    burst: 3,
    level: tracing::Level::INFO,
};

/// Listings that got no certificate for a key with certificates on (bad
/// user name, backend failure): rate-limited per uid.
pub static MINT_FAILED: Kind = Kind {
    name: "certificates not minted",
    burst: 3,
    level: tracing::Level::WARN,
};

/// Backend failures (unreachable, timed out, broken): the first of a burst,
/// then a count per window.
pub static UPSTREAM_FAILED: Kind = Kind {
    name: "backend errors",
    burst: 1,
    level: tracing::Level::ERROR,
};

/// User database errors: the first of a burst, then a count per window.
pub static LOOKUP_FAILED: Kind = Kind {
    name: "user database errors",
    burst: 1,
    level: tracing::Level::ERROR,
};

/// The idle timeout passed while a connection waited for its next request.
struct Elapsed;

/// Input buffer per connection; a typical sign request fits in one read.
const READ_BUFFER: usize = 2048;
/// A message buffer larger than this is released after use, so idle
/// connections stay small.
const KEEP_BUFFER: usize = 16 * 1024;

/// Serves one connection until the client leaves, errs, idles out, or the
/// daemon shuts down.
/// `admission` holds the connection's slots until it ends.
pub async fn serve(
    mut stream: UnixStream,
    uid: u32,
    pid: Option<i32>,
    mut admission: Admission,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    // Borrowed halves: closing the connection is one `close`, without the
    // `shutdown` an owned write half sends when dropped.
    let (read_half, mut write_half) = stream.split();
    let mut reader = BufReader::with_capacity(READ_BUFFER, read_half);
    let mut bindings = Bindings::default();
    let mut buf = Vec::new();
    // One shutdown waiter and one idle timer for the connection's life, not
    // one of each per request: the timer is armed for the first deadline
    // and, when it fires early (the connection was active meanwhile),
    // armed again for the current one.
    let stop = super::stopped(&mut shutdown);
    tokio::pin!(stop);
    let idle_timer = tokio::time::sleep(shared.runtime.borrow().limits.idle_timeout);
    tokio::pin!(idle_timer);
    loop {
        let idle = shared.runtime.borrow().limits.idle_timeout;
        // Reading the request and resolving its caller share the idle
        // timeout: waiting for a lookup does not keep a connection alive.
        let deadline = Instant::now() + idle;
        // Armed later than the deadline (a reload shortened the timeout):
        // armed again now.
        if idle_timer.deadline() > deadline {
            idle_timer.as_mut().reset(deadline);
        }
        let read = {
            let read = protocol::read_frame(&mut reader, &mut buf);
            tokio::pin!(read);
            loop {
                tokio::select! {
                    r = &mut read => break Ok(r),
                    () = &mut idle_timer => {
                        if Instant::now() >= deadline {
                            break Err(Elapsed);
                        }
                        idle_timer.as_mut().reset(deadline);
                    }
                    () = &mut stop => return,
                }
            }
        };
        match read {
            Ok(Ok(())) => {}
            Ok(Err(FrameError::Closed)) => break,
            Ok(Err(e)) => {
                if shared.log.allow(&BAD_MESSAGE, log_bucket(&shared, uid)) {
                    tracing::info!(
                        "closing connection of uid={uid} pid={}: {e}",
                        pid.unwrap_or(0)
                    );
                }
                break;
            }
            Err(_) => {
                tracing::debug!("closing idle connection of uid={uid}");
                shared.metrics.closed(Closed::Idle);
                break;
            }
        }
        // The settings in force now, not when the read began: a reload
        // while the connection waited applies to this request.
        let rt = Arc::clone(&shared.runtime.borrow());
        let limits = &rt.limits;
        let lookup = shared.lookups.caller(
            uid,
            pid,
            &rt.groups,
            limits.lookup_cache,
            limits.lookup_timeout,
        );
        let who = tokio::select! {
            w = tokio::time::timeout_at(deadline, lookup) => w,
            () = &mut stop => break,
        };
        let (caller, unresolved) = match who {
            Ok(Who::Known(caller)) => {
                if caller.user.is_some() {
                    admission.move_to(uid);
                }
                (caller, None)
            }
            Ok(Who::TimedOut(caller)) => (caller, Some(Reason::LookupTimeout)),
            // Who the caller is is unknown: refuse what depends on it
            // rather than guess; the next request asks again.
            Ok(Who::Failed(caller, e)) => {
                if shared.log.allow(&LOOKUP_FAILED, ratelog::Who::Unattributed) {
                    tracing::error!(
                        "cannot look up uid={uid} in the user database: {e}; refusing its \
                         requests that need its groups (user-lookup-error)"
                    );
                }
                (caller, Some(Reason::LookupError))
            }
            Err(_) => {
                tracing::debug!("closing idle connection of uid={uid} (waiting for its lookup)");
                shared.metrics.closed(Closed::Idle);
                break;
            }
        };
        let request = protocol::classify(&buf);
        if buf.capacity() > KEEP_BUFFER {
            buf = Vec::new();
        }
        let reply = handle(&rt, &shared, &caller, unresolved, &mut bindings, request).await;
        match tokio::time::timeout(idle, write_half.write_all(&reply)).await {
            Ok(Ok(())) => {}
            _ => break,
        }
    }
}

/// What one request is answered with: a message to encode, or a sign
/// response framed as the backend produced it (never decoded).
enum Reply {
    Message(Response),
    Framed(Vec<u8>),
}

impl From<Response> for Reply {
    fn from(response: Response) -> Self {
        Self::Message(response)
    }
}

/// Decides and carries out one request; returns the framed answer (the one
/// exit of every request). `unresolved`: why the caller's lookup gave no
/// answer, if it did not.
async fn handle(
    rt: &super::Runtime,
    shared: &Shared,
    caller: &Caller,
    unresolved: Option<Reason>,
    bindings: &mut Bindings,
    request: Request,
) -> Vec<u8> {
    // The grants in force: a snapshot, no lock held and no file read; none
    // at all when no key needs a grant (nothing shared is touched then).
    let snapshot = rt.policy.has_grants().then(|| shared.grants.current());
    let grants = snapshot.as_deref().unwrap_or(&policy::grants::NO_GRANTS);
    let now = unix_now();
    let ctx = Context {
        bindings,
        now,
        minted: &shared.authority,
        grants,
    };
    let decision = match &unresolved {
        None => policy::decide(&rt.policy, caller, ctx, &request),
        Some(why) => policy::decide_unresolved(&rt.policy, caller, ctx, &request, why.clone()),
    };
    shared.metrics.decided(&decision, &request);
    audit_refusal(shared, caller, &decision, bindings);
    let reply = match (&decision, request) {
        (Decision::EmptyList, _) => Response::IdentitiesAnswer(Vec::new()).into(),
        (Decision::List, _) => list(rt, shared, caller, (bindings, grants, now)).await,
        (Decision::Sign { key, .. }, Request::Sign(sign)) => {
            sign_with(shared, caller, &decision, key, bindings, sign.request).await
        }
        (Decision::VerifyBind, Request::SessionBind(bind)) => {
            session_bind(shared, caller, bindings, *bind).await
        }
        // A supported extension that failed: EXTENSION_FAILURE, as OpenSSH's
        // agent answers (FAILURE would read "not supported").
        (Decision::RefuseBind { reason, forwarding }, _) => {
            bad_bind(caller, bindings, reason, *forwarding);
            Response::ExtensionFailure.into()
        }
        (Decision::Query, _) => query_response().into(),
        (Decision::Grant, Request::Grant { name, op }) => {
            grant(rt, shared, caller, unresolved.as_ref(), &name, op).await
        }
        (
            Decision::Refuse {
                reason: Reason::NoGrant,
                ..
            },
            _,
        ) if unresolved.is_none() => {
            // A grantee who left its key's groups (or whose key is gone):
            // the grant ends.
            shared.grants.end_orphans(&rt.policy, caller).await;
            Response::Failure.into()
        }
        (Decision::Status, Request::Status(format)) => status(rt, shared, format).await,
        // Refusals, and decisions that do not match their request (which
        // `decide` never produces).
        _ => Response::Failure.into(),
    };
    match reply {
        Reply::Message(response) => response::encode(&response),
        Reply::Framed(bytes) => bytes,
    }
}

/// Writes the audit line of a refusal (its outcome is known now; a sign's
/// only once the backend answered). Refusals are rate-limited per uid, each
/// kind (admin, sign, malformed) with its own allowance; a summary counts
/// what was suppressed per reason and key. Granted and failed signs never
/// are.
fn audit_refusal(shared: &Shared, caller: &Caller, decision: &Decision, bindings: &Bindings) {
    let detail = || audit::refusal_detail(decision);
    if let Some(line) = audit::refusal(caller, decision, &audit::Binding::of(bindings)) {
        let kind = audit::refusal_kind(decision);
        if shared
            .log
            .allow_with(kind, log_bucket(shared, caller.uid), detail)
        {
            tracing::info!(target: audit::TARGET, "{line}");
        }
    } else if let Decision::Refuse { reason, .. } = decision {
        if shared.log.allow_with(
            &audit::REFUSED_UNAUDITED,
            log_bucket(shared, caller.uid),
            detail,
        ) {
            tracing::debug!("refused uid={}: {reason}", caller.uid);
        }
    }
}

/// An allowed sign: the backend signs with the plain key (whether the
/// request named it or a certificate of it), flags unchanged, and the
/// signature goes back as the backend produced it. The audit line is
/// written once that outcome is known; the line of the usual outcome is
/// formatted while the backend signs (`biased`: the request is sent first).
async fn sign_with(
    shared: &Shared,
    caller: &Caller,
    decision: &Decision<'_>,
    key: &policy::KeyRule,
    bindings: &Bindings,
    mut sign: ssh_agent_lib::proto::SignRequest,
) -> Reply {
    sign.credential = PublicCredential::Key(key.key.clone());
    let binding = audit::Binding::of(bindings);
    let started = tokio::time::Instant::now();
    let (result, granted) = tokio::join!(biased; shared.backend.sign(sign), async {
        audit::sign(caller, decision, &binding, audit::Outcome::Signed)
    });
    shared
        .metrics
        .backend_call(BackendOp::Sign, started.elapsed(), &result);
    shared.metrics.signed(&key.name, caller.uid, &result);
    let line = match &result {
        Ok(_) => granted,
        Err(BackendError::Timeout | BackendError::Busy) => {
            audit::sign(caller, decision, &binding, audit::Outcome::UpstreamTimeout)
        }
        Err(_) => audit::sign(caller, decision, &binding, audit::Outcome::UpstreamError),
    };
    if let Some(line) = line {
        tracing::info!(target: audit::TARGET, "{line}");
    }
    match result {
        Ok(signature) => Reply::Framed(response::sign_response(&signature)),
        // The audit line above says which sign failed and why; the error
        // itself is rate-limited, not logged once per sign.
        Err(e) => {
            note_upstream_error(shared, &e);
            Response::Failure.into()
        }
    }
}

/// `session-bind@openssh.com`: verified off the async threads, kept on the
/// connection; a binding that fails verification or order gets
/// EXTENSION_FAILURE.
async fn session_bind(
    shared: &Shared,
    caller: &Caller,
    bindings: &mut Bindings,
    bind: crate::protocol::session_bind::SessionBind,
) -> Reply {
    let forwarding = bind.forwarding;
    let verified = shared.verifier.verify(caller.uid, Box::new(bind)).await;
    match verified.and_then(|b| {
        let fingerprint = b.fingerprint.clone();
        bindings.record(b).map(|()| fingerprint)
    }) {
        Ok(fingerprint) => {
            tracing::debug!(
                "session bound for uid={} pid={}: host key {fingerprint}, forwarding={}",
                caller.uid,
                caller.pid.unwrap_or(0),
                if forwarding { "yes" } else { "no" }
            );
            Response::Success.into()
        }
        Err(why) => {
            bad_bind(caller, bindings, why, Some(forwarding));
            Response::ExtensionFailure.into()
        }
    }
}

/// A `grant-…@keyholder` extension: handled by the grant store (which asks
/// the policy); a malformed one is answered with why.
async fn grant(
    rt: &super::Runtime,
    shared: &Shared,
    caller: &Caller,
    unresolved: Option<&Reason>,
    name: &str,
    op: Result<crate::protocol::grants::GrantOp, &'static str>,
) -> Reply {
    let answer = match op {
        Ok(op) => {
            shared
                .grants
                .handle(&rt.policy, caller, unresolved, op)
                .await
        }
        Err(why) => crate::protocol::grants::Answer {
            ok: false,
            text: format!("malformed {name}: {why}"),
        },
    };
    extension_response(name, &answer).into()
}

/// `status@keyholder`: the configured keys against what the backend holds,
/// and the counters or the backend's notes when asked for.
async fn status(rt: &super::Runtime, shared: &Shared, format: status::Format) -> Reply {
    let backend = &shared.backend;
    let started = tokio::time::Instant::now();
    let status = backend.status().await;
    shared
        .metrics
        .backend_call(BackendOp::Status, started.elapsed(), &status);
    if let Err(e) = &status {
        note_upstream_error(shared, e);
    }
    let ids = status.ok().map(|s| s.identities);
    let report = policy::status_report(&rt.policy, ids.as_deref());
    let metrics = (format == status::Format::Metrics).then(|| metrics_report(rt, shared));
    let notes = (format == status::Format::Notes).then(|| backend.notes());
    extension_response(
        status::NAME,
        &status::Answer {
            report,
            metrics,
            notes,
        },
    )
    .into()
}

/// REQUEST_IDENTITIES from a caller who may use some key: the backend's
/// identities, filtered and with certificates ([`listing`]).
async fn list(
    rt: &super::Runtime,
    shared: &Shared,
    caller: &Caller,
    connection: (&Bindings, &policy::grants::Grants, u64),
) -> Reply {
    let started = tokio::time::Instant::now();
    let identities = shared.backend.identities().await;
    shared
        .metrics
        .backend_call(BackendOp::List, started.elapsed(), &identities);
    match identities {
        Ok(ids) => {
            Response::IdentitiesAnswer(listing(rt, shared, caller, connection, ids).await).into()
        }
        Err(e) => {
            note_upstream_error(shared, &e);
            Response::Failure.into()
        }
    }
}

/// The answer to REQUEST_IDENTITIES: the identities the caller may use, in
/// the backend's order, each key with certificates on preceded by the
/// caller's certificate for it.
async fn listing(
    rt: &super::Runtime,
    shared: &Shared,
    caller: &Caller,
    (bindings, grants, now): (&Bindings, &policy::grants::Grants, u64),
    identities: Vec<Identity>,
) -> Vec<Identity> {
    let ctx = Context {
        bindings,
        now,
        minted: &shared.authority,
        grants,
    };
    let plan = policy::plan_identities(&rt.policy, caller, ctx, identities);
    let ca_armed = plan.ca_armed;
    if let Some(ca) = &rt.policy.ca {
        if rt
            .policy
            .keys
            .iter()
            .any(|k| k.certificate != crate::config::CertMode::Off)
        {
            match shared.authority.note_ca_armed(ca_armed) {
                Some(false) => tracing::warn!(
                    "certificate CA {} is not armed: keys with certificate = \"also\" are listed \
                     without a certificate, keys with certificate = \"only\" not at all \
                     (run `keyholder arm`)",
                    ca.name
                ),
                Some(true) => tracing::info!("certificate CA {} is armed", ca.name),
                None => {}
            }
        }
    }
    let mut out = Vec::with_capacity(plan.items.len() * 2);
    for policy::Planned {
        identity,
        key,
        listing,
        grant_until,
    } in plan.items
    {
        let fallback_plain = match listing {
            Listing::Plain => {
                out.push(identity);
                continue;
            }
            Listing::Nothing => continue,
            Listing::WithCertificate { fallback_plain } => fallback_plain,
        };
        let minted = match &rt.certs {
            Some(settings) => {
                shared
                    .authority
                    .certificate(
                        shared.backend.as_ref(),
                        settings,
                        &key.name,
                        caller.uid,
                        caller.user.as_deref(),
                        grant_until,
                    )
                    .await
            }
            None => Err(MintError::NotConfigured),
        };
        match minted {
            Ok(handed) => {
                if handed.fresh {
                    shared.metrics.certificate_issued(&key.name);
                    let c = &handed.cert;
                    let line = audit::issued(
                        caller,
                        &audit::IssuedLine {
                            key: &key.name,
                            serial: c.serial(),
                            key_id: c.key_id(),
                            principals: c.valid_principals(),
                            valid_after: c.valid_after(),
                            valid_before: c.valid_before(),
                        },
                    );
                    tracing::info!(target: audit::TARGET, "{line}");
                }
                out.push(Identity {
                    comment: handed.cert.key_id().to_owned(),
                    credential: PublicCredential::Cert(Box::new((*handed.cert).clone())),
                });
                out.push(identity);
            }
            Err(e) => {
                if shared
                    .log
                    .allow(&MINT_FAILED, log_bucket(shared, caller.uid))
                {
                    tracing::warn!(
                        "no certificate for key={} uid={}: {e}; listing {}",
                        key.name,
                        caller.uid,
                        if fallback_plain {
                            "the plain key only"
                        } else {
                            "nothing for it (certificate = \"only\")"
                        }
                    );
                }
                if let MintError::Backend(b) = &e {
                    note_upstream_error(shared, b);
                }
                if fallback_plain {
                    out.push(identity);
                }
            }
        }
    }
    out
}

/// Whose rate-limit bucket a caller's lines count in: its uid, or one for
/// every uid not known to have a passwd entry (as for the connection limit).
fn log_bucket(shared: &Shared, uid: u32) -> ratelog::Who {
    if shared.lookups.listed(uid) {
        ratelog::Who::Uid(uid)
    } else {
        ratelog::Who::Unlisted
    }
}

/// Remembers a failed binding (keys with destinations sign nothing more on
/// this connection) and says why, at debug level: anyone may send bindings,
/// so this line must not be a way to flood the log; what a failed binding
/// costs a caller shows in the audit line of its next sign request
/// (`reason=bad-session-bind`).
fn bad_bind(caller: &Caller, bindings: &mut Bindings, why: &str, forwarding: Option<bool>) {
    bindings.fail(forwarding);
    tracing::debug!(
        "session binding refused for uid={} pid={}: {why}",
        caller.uid,
        caller.pid.unwrap_or(0)
    );
}

/// Seconds since the epoch (host certificates' validity).
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn note_upstream_error(shared: &Shared, e: &BackendError) {
    shared.metrics.upstream_error(e);
    if matches!(e, BackendError::Refused) {
        return;
    }
    if shared
        .log
        .allow(&UPSTREAM_FAILED, ratelog::Who::Unattributed)
    {
        tracing::error!("{e} (answering FAILURE)");
    }
}

fn metrics_report(rt: &super::Runtime, shared: &Shared) -> status::Metrics {
    let keys = rt.policy.keys.iter().map(|k| k.name.as_str());
    let mut report = shared.metrics.report(
        keys,
        shared.lookups.stats(),
        &shared.grants.report(&rt.policy),
        shared.backend.name(),
    );
    // The backend's own families (a cluster's failovers, logins…), under
    // names no daemon family uses.
    for family in shared.backend.metrics() {
        if family.name.starts_with("keyholder_")
            && !report.families.iter().any(|f| f.name == family.name)
        {
            report.families.push(family);
        }
    }
    report
}

/// The answer to `query`: `string "query"`, then each supported name as a
/// plain `string`, back to back to the end of the message (RFC 9987; what
/// OpenSSH's `ssh_agent_query_extensions` reads). No count, no outer length.
fn query_response() -> Response {
    let mut details = Vec::new();
    for name in SUPPORTED_EXTENSIONS {
        if name.encode(&mut details).is_err() {
            return Response::Failure;
        }
    }
    Response::ExtensionResponse(Extension {
        name: policy::QUERY.to_owned(),
        details: details.into(),
    })
}

fn extension_response(name: &str, body: &impl Encode) -> Response {
    let mut details = Vec::new();
    match body.encode(&mut details) {
        Ok(()) => Response::ExtensionResponse(Extension {
            name: name.to_owned(),
            details: details.into(),
        }),
        Err(_) => Response::Failure,
    }
}
