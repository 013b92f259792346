//! `agent.socket` for the backends that live in the daemon (builtin, and
//! any backend whose keys sit in a token or a cluster): the admin side of
//! the agent protocol, served by the daemon itself, to root only, and
//! dispatched to the [`Backend`] trait.
//!
//! Served: REQUEST_IDENTITIES, SIGN_REQUEST, ADD_IDENTITY, ADD_ID_CONSTRAINED
//! with a lifetime, REMOVE_IDENTITY, REMOVE_ALL_IDENTITIES,
//! ADD_SMARTCARD_KEY (with or without constraints) and REMOVE_SMARTCARD_KEY,
//! and the vendor extension `unlock@keyholder` (one `string`: the secret
//! that unlocks the backend), so that `keyholder arm/disarm` and `ssh-add
//! -l/-L/-d/-D/-t/-s/-e` work unchanged. What the backend does not support
//! it refuses. Refused with FAILURE and a log line saying why: confirm,
//! destination and every other constraint, lock/unlock, other extensions,
//! unknown types. A peer whose SO_PEERCRED uid is not 0 is logged and
//! disconnected before anything is read.
//!
//! This module owns its accept loop (never ssh-agent-lib's server loop). It
//! must never log key material, PINs or secrets, and never keep a copy of a
//! received message: each one is read into a buffer allocated once at its
//! full size (so it never reallocates) and zeroized after use.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::protocol::wire::{put_string, take_string};
use ssh_agent_lib::proto::{
    AddIdentity, AddIdentityConstrained, KeyConstraint, PublicCredential, RemoveIdentity, Request,
    Response,
};
use ssh_encoding::{Decode, Reader};
use ssh_key::HashAlg;
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{watch, Semaphore};
use zeroize::{Zeroize, Zeroizing};

use super::{Backend, BackendError};
use crate::error::Result;
use crate::protocol::{read_frame, response, FrameError, MAX_MESSAGE_LEN};

/// Admin connections served at once (root's `ssh-add`, `keyholder arm`…).
const MAX_ADMIN_CONNECTIONS: usize = 64;
/// An admin connection with no complete request for this long is closed.
const ADMIN_IDLE: Duration = Duration::from_secs(300);
/// Accept-error backoff bounds.
const BACKOFF_MIN: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// SSH_AGENT_CONSTRAIN_LIFETIME, _CONFIRM, _MAXSIGN, _EXTENSION.
const CONSTRAIN_LIFETIME: u8 = 1;
const CONSTRAIN_CONFIRM: u8 = 2;
const CONSTRAIN_MAXSIGN: u8 = 3;
const CONSTRAIN_EXTENSION: u8 = 255;

/// The vendor extension that hands a backend the secret that unlocks it.
pub const UNLOCK_EXTENSION: &str = "unlock@keyholder";

/// Binds `agent.socket` (mode 0600, in a directory only root may write).
pub fn bind(path: &Path) -> Result<UnixListener> {
    crate::sockets::bind(path, 0o600, "agent.socket")
}

/// Accepts admin connections until shutdown; then removes the socket.
pub async fn serve(
    listener: UnixListener,
    path: PathBuf,
    backend: Arc<dyn Backend>,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(MAX_ADMIN_CONNECTIONS));
    let mut backoff = BACKOFF_MIN;
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = crate::shutdown::stopped(&mut shutdown) => break,
        };
        match accepted {
            Ok((stream, _)) => {
                backoff = BACKOFF_MIN;
                let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                    tracing::warn!(
                        "agent.socket: {MAX_ADMIN_CONNECTIONS} admin connections open; \
                         closing a new one"
                    );
                    continue;
                };
                let backend = Arc::clone(&backend);
                let stop = shutdown.clone();
                tokio::spawn(async move {
                    connection(stream, backend, stop).await;
                    drop(slot);
                });
            }
            Err(e) => {
                tracing::error!("agent.socket: accept failed: {e}; retrying");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = crate::shutdown::stopped(&mut shutdown) => break,
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
    drop(listener);
    crate::sockets::remove(&path);
}

async fn connection(
    stream: UnixStream,
    backend: Arc<dyn Backend>,
    mut shutdown: watch::Receiver<bool>,
) {
    let (uid, pid) = match stream.peer_cred() {
        Ok(c) => (c.uid(), c.pid().unwrap_or(0)),
        Err(e) => {
            tracing::warn!("agent.socket: cannot get the peer's credentials ({e}); closing");
            return;
        }
    };
    if uid != 0 {
        tracing::warn!(
            "agent.socket: refused connection of uid={uid} pid={pid}: only root may use \
             the {} backend's admin socket; closed",
            backend.name()
        );
        return;
    }
    let mut stream = stream;
    // Allocated once at the cap: read_frame never reallocates it, so no
    // stale copy of a private key is left behind in freed memory.
    let mut buf = Zeroizing::new(Vec::with_capacity(MAX_MESSAGE_LEN));
    loop {
        let read = tokio::select! {
            r = tokio::time::timeout(ADMIN_IDLE, read_frame(&mut stream, &mut buf)) => r,
            () = crate::shutdown::stopped(&mut shutdown) => break,
        };
        match read {
            Ok(Ok(())) => {}
            Ok(Err(FrameError::Closed)) | Err(_) => break,
            Ok(Err(e)) => {
                tracing::info!("agent.socket: closing connection of pid={pid}: {e}");
                break;
            }
        }
        let reply = handle(&*backend, &buf, pid).await;
        buf.zeroize();
        if stream.write_all(&reply).await.is_err() {
            break;
        }
    }
}

/// The framed SUCCESS or FAILURE for a backend's answer.
fn outcome(result: std::result::Result<(), BackendError>) -> Vec<u8> {
    match result {
        Ok(()) => response::SUCCESS.to_vec(),
        Err(_) => response::FAILURE.to_vec(),
    }
}

/// One request from root; returns the framed answer.
async fn handle(backend: &dyn Backend, message: &[u8], pid: i32) -> Vec<u8> {
    let name = backend.name();
    let Some((&kind, body)) = message.split_first() else {
        return response::FAILURE.to_vec();
    };
    match kind {
        // Decoded by hand: ssh-agent-lib's decoder cannot say which
        // constraint it did not understand.
        17 | 25 => return add(backend, body, kind == 25, pid).await,
        // SSH_AGENTC_REMOVE_ALL_RSA_IDENTITIES: `ssh-add -D` still sends it
        // after the SSH2 one, and OpenSSH's agent treats it as remove-all.
        9 if body.is_empty() => return outcome(backend.remove_all().await),
        20 | 26 => {
            let Some((id, pin)) = parse_smartcard(body, kind == 26) else {
                tracing::warn!(
                    "agent.socket: refused a malformed smartcard request from pid={pid}"
                );
                return response::FAILURE.to_vec();
            };
            let result = backend.add_smartcard(id, pin).await;
            if matches!(result, Err(BackendError::Unsupported)) {
                tracing::warn!(
                    "agent.socket: refused a smartcard request (type {kind}) from pid={pid}: \
                     the {name} backend holds no smartcard keys"
                );
            }
            return outcome(result);
        }
        21 => {
            let Some((id, _pin)) = parse_smartcard(body, false) else {
                tracing::warn!(
                    "agent.socket: refused a malformed smartcard request from pid={pid}"
                );
                return response::FAILURE.to_vec();
            };
            let result = backend.remove_smartcard(id).await;
            if matches!(result, Err(BackendError::Unsupported)) {
                tracing::warn!(
                    "agent.socket: refused a smartcard request (type {kind}) from pid={pid}: \
                     the {name} backend holds no smartcard keys"
                );
            }
            return outcome(result);
        }
        22 | 23 => {
            tracing::warn!(
                "agent.socket: refused a {} request from pid={pid}: the {name} backend \
                 cannot be locked (disarm it with `keyholder disarm`)",
                if kind == 22 { "lock" } else { "unlock" }
            );
            return response::FAILURE.to_vec();
        }
        27 => {
            if let Some(secret) = parse_unlock(body) {
                let result = backend.unlock(secret).await;
                if matches!(result, Err(BackendError::Unsupported)) {
                    tracing::warn!(
                        "agent.socket: refused {UNLOCK_EXTENSION} from pid={pid}: the {name} \
                         backend has nothing to unlock"
                    );
                }
                return outcome(result);
            }
        }
        _ => {}
    }
    let request = match Request::decode(&mut &*message) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(
                "agent.socket: refused a malformed or unknown request (type {kind}) from \
                 pid={pid}: {e}"
            );
            return response::FAILURE.to_vec();
        }
    };
    let answer = match request {
        Request::RequestIdentities => match backend.identities().await {
            Ok(ids) => Response::IdentitiesAnswer(ids),
            Err(e) => {
                tracing::warn!("agent.socket: list for pid={pid} failed: {e}");
                Response::Failure
            }
        },
        Request::SignRequest(sign) => match backend.sign(sign).await {
            Ok(blob) => return response::sign_response(&blob),
            Err(e) => {
                if !matches!(e, BackendError::Refused) {
                    tracing::warn!("agent.socket: sign for pid={pid} failed: {e}");
                }
                Response::Failure
            }
        },
        Request::RemoveIdentity(RemoveIdentity { credential }) => {
            return remove(backend, credential, pid).await
        }
        Request::RemoveAllIdentities => return outcome(backend.remove_all().await),
        Request::Extension(ext) => {
            tracing::debug!(
                "agent.socket: refused extension {:?} from pid={pid}: not supported by the \
                 {name} backend",
                ext.name
            );
            Response::Failure
        }
        other => {
            tracing::warn!(
                "agent.socket: refused request type {} from pid={pid}: not supported by the \
                 {name} backend",
                other.message_id()
            );
            Response::Failure
        }
    };
    response::encode(&answer)
}

async fn remove(backend: &dyn Backend, credential: PublicCredential, pid: i32) -> Vec<u8> {
    let PublicCredential::Key(key) = &credential else {
        return response::FAILURE.to_vec();
    };
    let fingerprint = key.fingerprint(HashAlg::Sha256);
    let result = backend.remove(credential).await;
    if result.is_ok() {
        tracing::info!("agent.socket: removed key {fingerprint} for pid={pid}");
    }
    outcome(result)
}

/// ADD_IDENTITY / ADD_ID_CONSTRAINED.
async fn add(backend: &dyn Backend, body: &[u8], constrained: bool, pid: i32) -> Vec<u8> {
    match parse_add(body, constrained, backend.name()) {
        Ok((identity, lifetime)) => {
            let constraints = lifetime.map(KeyConstraint::Lifetime).into_iter().collect();
            let request = AddIdentityConstrained {
                identity,
                constraints,
            };
            outcome(
                backend
                    .add(request, format!("pid={pid} on agent.socket"))
                    .await,
            )
        }
        Err(why) => {
            tracing::warn!("agent.socket: refused to add a key for pid={pid}: {why}");
            response::FAILURE.to_vec()
        }
    }
}

/// SSH_AGENTC_ADD_SMARTCARD_KEY(_CONSTRAINED) and REMOVE_SMARTCARD_KEY:
/// `string id, string pin` (then constraints, which are ignored: a token's
/// keys stay as long as the token is logged in).
fn parse_smartcard(body: &[u8], constrained: bool) -> Option<(String, Zeroizing<String>)> {
    let mut reader = body;
    let id = take_string(&mut reader)?;
    let pin = take_string(&mut reader)?;
    if !constrained && !reader.is_empty() {
        return None;
    }
    let id = std::str::from_utf8(id).ok()?.to_owned();
    let pin = Zeroizing::new(std::str::from_utf8(pin).ok()?.to_owned());
    Some((id, pin))
}

/// `unlock@keyholder`: `string name, string secret`, nothing after it.
/// None for any other extension.
fn parse_unlock(body: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    let mut reader = body;
    let name = take_string(&mut reader)?;
    if name != UNLOCK_EXTENSION.as_bytes() {
        return None;
    }
    let secret = take_string(&mut reader)?;
    if !reader.is_empty() {
        return None;
    }
    Some(Zeroizing::new(secret.to_vec()))
}

/// The identity of an add request and its lifetime constraint, or why the
/// request is refused (one line, naming the key type or the constraint).
fn parse_add(
    body: &[u8],
    constrained: bool,
    backend: &str,
) -> std::result::Result<(AddIdentity, Option<u32>), String> {
    let normalized = normalize_ecdsa(body);
    let body = normalized.as_deref().map_or(body, Vec::as_slice);
    let mut reader = body;
    let identity = AddIdentity::decode(&mut reader).map_err(|e| {
        let name = key_type_name(body);
        format!("cannot use a key of type {name:?}: {e} (the {backend} backend holds Ed25519, RSA 2048-16384 and ECDSA P-256/384/521 keys)")
    })?;
    let mut lifetime = None;
    while !reader.is_finished() {
        if !constrained {
            return Err("trailing bytes after the key".to_owned());
        }
        let kind = u8::decode(&mut reader).map_err(|e| format!("malformed constraint: {e}"))?;
        match kind {
            CONSTRAIN_LIFETIME => {
                let secs =
                    u32::decode(&mut reader).map_err(|e| format!("malformed lifetime: {e}"))?;
                if lifetime.replace(secs).is_some() {
                    return Err("lifetime constraint given twice".to_owned());
                }
            }
            CONSTRAIN_CONFIRM => {
                return Err(format!(
                    "the confirm constraint (ssh-add -c) is not supported by the {backend} backend"
                ))
            }
            CONSTRAIN_MAXSIGN => {
                return Err(format!(
                    "the maximum-signatures constraint is not supported by the {backend} backend"
                ))
            }
            CONSTRAIN_EXTENSION => {
                let name = String::decode(&mut reader).unwrap_or_else(|_| "(malformed)".to_owned());
                let what = if name.starts_with("restrict-destination") {
                    " (destination constraints, ssh-add -h)"
                } else {
                    ""
                };
                return Err(format!(
                    "constraint {name:?}{what} is not supported by the {backend} backend"
                ));
            }
            other => return Err(format!("unknown constraint type {other}")),
        }
    }
    Ok((identity, lifetime))
}

/// ECDSA private scalars are mpints, which drop leading zero bytes (one P-521
/// key in two, one P-256 key in 256); ssh-key 0.6 decodes only full-width
/// scalars. Returns the request with the scalar left-padded to the curve's
/// width (in a zeroizing buffer), or None when nothing needs changing.
fn normalize_ecdsa(body: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    let mut reader = body;
    let alg = take_string(&mut reader)?;
    let width = match alg {
        b"ecdsa-sha2-nistp256" => 32,
        b"ecdsa-sha2-nistp384" => 48,
        b"ecdsa-sha2-nistp521" => 66,
        _ => return None,
    };
    let curve = take_string(&mut reader)?;
    let point = take_string(&mut reader)?;
    let scalar = take_string(&mut reader)?;
    let digits = scalar.get(scalar.iter().position(|&b| b != 0)?..)?;
    if digits.len() >= width {
        return None;
    }
    let mut out = Zeroizing::new(Vec::with_capacity(body.len() + width));
    for field in [alg, curve, point] {
        put_string(&mut out, field);
    }
    out.extend_from_slice(&u32::try_from(width).ok()?.to_be_bytes());
    let padded = out.len() + width - digits.len();
    out.resize(padded, 0);
    out.extend_from_slice(digits);
    out.extend_from_slice(reader);
    Some(out)
}

/// The key type name at the start of an add request, for the log.
fn key_type_name(body: &[u8]) -> String {
    let mut reader = body;
    match String::decode(&mut reader) {
        Ok(name) if name.len() <= 64 => name,
        _ => "(malformed)".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openssl::bn::BigNumContext;
    use openssl::ec::{EcGroup, EcKey, PointConversionForm};
    use openssl::nid::Nid;
    use ssh_agent_lib::proto::PrivateCredential;

    /// An ADD_IDENTITY body for an ECDSA key whose scalar, written as
    /// OpenSSH writes mpints, is shorter than the curve's width.
    fn short_scalar_request(nid: Nid, name: &str, curve: &str, width: i32) -> Vec<u8> {
        let group = EcGroup::from_curve_name(nid).unwrap();
        let mut ctx = BigNumContext::new().unwrap();
        loop {
            let ec = EcKey::generate(&group).unwrap();
            let mut scalar = ec.private_key().to_vec();
            if scalar.first().is_some_and(|&b| b & 0x80 != 0) {
                scalar.insert(0, 0);
            }
            if scalar.len() >= usize::try_from(width).unwrap() {
                continue;
            }
            let point = ec
                .public_key()
                .to_bytes(&group, PointConversionForm::UNCOMPRESSED, &mut ctx)
                .unwrap();
            let mut body = Vec::new();
            for field in [name.as_bytes(), curve.as_bytes(), &point, &scalar, b"c"] {
                put_string(&mut body, field);
            }
            return body;
        }
    }

    #[test]
    fn ecdsa_scalars_with_leading_zero_bytes_are_accepted() {
        // One P-521 key in two has a 65-byte scalar; for P-256 one in 256.
        for (nid, name, curve, width) in [
            (Nid::SECP521R1, "ecdsa-sha2-nistp521", "nistp521", 66),
            (Nid::X9_62_PRIME256V1, "ecdsa-sha2-nistp256", "nistp256", 32),
        ] {
            let body = short_scalar_request(nid, name, curve, width);
            let (identity, lifetime) = parse_add(&body, false, "builtin").unwrap();
            assert_eq!(lifetime, None);
            let PrivateCredential::Key { privkey, comment } = identity.credential else {
                panic!("not a key")
            };
            assert_eq!(comment, "c");
            let key = HeldKeyForTest::new(&privkey).unwrap();
            assert_eq!(key.type_name(), name);
        }
    }

    use super::super::builtin::key::HeldKey as HeldKeyForTest;

    #[test]
    fn constraints_other_than_one_lifetime_are_refused_by_name() {
        let body = short_scalar_request(Nid::SECP521R1, "ecdsa-sha2-nistp521", "nistp521", 66);
        let with = |c: &[u8]| [body.as_slice(), c].concat();
        assert_eq!(
            parse_add(&with(&[1, 0, 0, 0, 9]), true, "builtin")
                .unwrap()
                .1,
            Some(9)
        );
        assert!(parse_add(&with(&[1, 0, 0, 0, 9]), false, "builtin").is_err());
        let e = parse_add(&with(&[2]), true, "builtin").unwrap_err();
        assert!(e.contains("confirm"), "{e}");
        let mut ext = vec![255u8];
        put_string(&mut ext, b"restrict-destination-v00@openssh.com");
        let e = parse_add(&with(&ext), true, "builtin").unwrap_err();
        assert!(e.contains("destination"), "{e}");
        let e = parse_add(&with(&[42]), true, "builtin").unwrap_err();
        assert!(e.contains("unknown constraint type 42"), "{e}");
    }
}
