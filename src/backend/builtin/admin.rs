//! `agent.socket` when the builtin backend holds the keys: the admin side of
//! the agent protocol, served by the daemon itself, to root only.
//!
//! Served: REQUEST_IDENTITIES, ADD_IDENTITY, ADD_ID_CONSTRAINED with a
//! lifetime, REMOVE_IDENTITY, REMOVE_ALL_IDENTITIES, SIGN_REQUEST, so that
//! `keyholder arm/disarm` and `ssh-add -l/-L/-d/-D/-t` work unchanged.
//! Refused with FAILURE and a log line saying why: confirm, destination and
//! every other constraint, smartcard keys, lock/unlock, extensions, unknown
//! types. A peer whose SO_PEERCRED uid is not 0 is logged and disconnected
//! before anything is read.
//!
//! This module owns its accept loop (never ssh-agent-lib's server loop). It
//! must never log key material or passphrases, and never keep a copy of a
//! received message: each one is read into a buffer allocated once at its
//! full size (so it never reallocates) and zeroized after use.

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ssh_agent_lib::proto::{AddIdentity, PublicCredential, RemoveIdentity, Request, Response};
use ssh_encoding::{Decode, Reader};
use ssh_key::HashAlg;
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{watch, Semaphore};
use zeroize::{Zeroize, Zeroizing};

use super::{Inner, SignError};
use crate::error::{Error, Result};
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

/// Binds `agent.socket` (mode 0600). Its directory must be owned by root and
/// writable by root only. A stale socket is replaced; a socket something
/// answers on, or a file that is not a socket, is an error.
pub fn bind(path: &Path) -> Result<UnixListener> {
    let shown = path.display();
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            // Created root-only (umask 077).
            std::fs::create_dir_all(dir).map_err(|e| {
                Error::msg(format!(
                    "agent.socket {shown}: cannot create {}: {e}",
                    dir.display()
                ))
            })?;
        }
        let meta = std::fs::metadata(dir)
            .map_err(|e| Error::msg(format!("agent.socket {shown}: {}: {e}", dir.display())))?;
        if meta.uid() != 0 || meta.mode() & 0o022 != 0 {
            return Err(Error::msg(format!(
                "agent.socket {shown}: its directory {} must be owned by root and writable \
                 by root only (it is uid {} mode {:o})",
                dir.display(),
                meta.uid(),
                meta.mode() & 0o7777
            )));
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(Error::msg(format!(
                    "agent.socket {shown} is in use by another process \
                     (is keyholder or an ssh-agent already running there?)"
                )));
            }
            std::fs::remove_file(path).map_err(|e| {
                Error::msg(format!("cannot remove stale agent.socket {shown}: {e}"))
            })?;
        }
        Ok(_) => {
            return Err(Error::msg(format!(
                "agent.socket {shown} exists and is not a socket; refusing to replace it"
            )))
        }
        Err(_) => {}
    }
    // umask 077 (hardening) keeps others out between bind and chmod.
    let listener = UnixListener::bind(path)
        .map_err(|e| Error::msg(format!("cannot listen on agent.socket {shown}: {e}")))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::msg(format!("cannot chmod agent.socket {shown}: {e}")))?;
    Ok(listener)
}

/// Accepts admin connections until shutdown; then removes the socket.
pub async fn serve(
    listener: UnixListener,
    path: PathBuf,
    inner: Arc<Inner>,
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
                let inner = Arc::clone(&inner);
                let stop = shutdown.clone();
                tokio::spawn(async move {
                    connection(stream, inner, stop).await;
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
    if std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(&path);
    }
}

async fn connection(stream: UnixStream, inner: Arc<Inner>, mut shutdown: watch::Receiver<bool>) {
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
             the builtin backend's admin socket; closed"
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
        let reply = handle(&inner, &buf, pid).await;
        buf.zeroize();
        if stream.write_all(&reply).await.is_err() {
            break;
        }
    }
}

/// One request from root; returns the framed answer.
async fn handle(inner: &Inner, message: &[u8], pid: i32) -> Vec<u8> {
    let Some((&kind, body)) = message.split_first() else {
        return response::FAILURE.to_vec();
    };
    match kind {
        // Decoded by hand: ssh-agent-lib's decoder cannot say which
        // constraint it did not understand.
        17 | 25 => return add(inner, body, kind == 25, pid),
        // SSH_AGENTC_REMOVE_ALL_RSA_IDENTITIES: `ssh-add -D` still sends it
        // after the SSH2 one, and OpenSSH's agent treats it as remove-all.
        9 if body.is_empty() => {
            let n = inner.store.remove_all();
            if n > 0 {
                tracing::info!("agent.socket: removed all keys ({n}) for pid={pid}");
            }
            return response::SUCCESS.to_vec();
        }
        20 | 21 | 26 => {
            tracing::warn!(
                "agent.socket: refused a smartcard request (type {kind}) from pid={pid}: \
                 the builtin backend holds no smartcard keys"
            );
            return response::FAILURE.to_vec();
        }
        22 | 23 => {
            tracing::warn!(
                "agent.socket: refused a {} request from pid={pid}: the builtin backend \
                 cannot be locked (disarm it with `keyholder disarm`)",
                if kind == 22 { "lock" } else { "unlock" }
            );
            return response::FAILURE.to_vec();
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
        Request::RequestIdentities => Response::IdentitiesAnswer(inner.identities()),
        Request::SignRequest(sign) => match inner.sign(&sign).await {
            Ok(blob) => return response::sign_response(&blob),
            Err(e) => {
                if !matches!(e, SignError::NotHeld) {
                    tracing::warn!("agent.socket: sign for pid={pid} failed: {e}");
                }
                Response::Failure
            }
        },
        Request::RemoveIdentity(RemoveIdentity { credential }) => remove(inner, &credential, pid),
        Request::RemoveAllIdentities => {
            let n = inner.store.remove_all();
            tracing::info!("agent.socket: removed all keys ({n}) for pid={pid}");
            Response::Success
        }
        Request::Extension(ext) => {
            tracing::debug!(
                "agent.socket: refused extension {:?} from pid={pid}: not supported by the \
                 builtin backend",
                ext.name
            );
            Response::Failure
        }
        other => {
            tracing::warn!(
                "agent.socket: refused request type {} from pid={pid}: not supported by the \
                 builtin backend",
                other.message_id()
            );
            Response::Failure
        }
    };
    response::encode(&answer)
}

fn remove(inner: &Inner, credential: &PublicCredential, pid: i32) -> Response {
    let PublicCredential::Key(key) = credential else {
        return Response::Failure;
    };
    if inner.store.remove(key) {
        tracing::info!(
            "agent.socket: removed key {} for pid={pid}",
            key.fingerprint(HashAlg::Sha256)
        );
        Response::Success
    } else {
        Response::Failure
    }
}

/// ADD_IDENTITY / ADD_ID_CONSTRAINED.
fn add(inner: &Inner, body: &[u8], constrained: bool, pid: i32) -> Vec<u8> {
    let result = parse_add(body, constrained).and_then(|(identity, lifetime)| {
        inner.add_key(
            identity.credential,
            lifetime,
            &format!("pid={pid} on agent.socket"),
        )
    });
    match result {
        Ok(()) => response::SUCCESS.to_vec(),
        Err(why) => {
            tracing::warn!("agent.socket: refused to add a key for pid={pid}: {why}");
            response::FAILURE.to_vec()
        }
    }
}

/// The identity of an add request and its lifetime constraint, or why the
/// request is refused (one line, naming the key type or the constraint).
fn parse_add(
    body: &[u8],
    constrained: bool,
) -> std::result::Result<(AddIdentity, Option<u32>), String> {
    let normalized = normalize_ecdsa(body);
    let body = normalized.as_deref().map_or(body, Vec::as_slice);
    let mut reader = body;
    let identity = AddIdentity::decode(&mut reader).map_err(|e| {
        let name = key_type_name(body);
        format!("cannot use a key of type {name:?}: {e} (the builtin backend holds Ed25519, RSA 2048-16384 and ECDSA P-256/384/521 keys)")
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
                return Err(
                    "the confirm constraint (ssh-add -c) is not supported by the builtin backend"
                        .to_owned(),
                )
            }
            CONSTRAIN_MAXSIGN => {
                return Err(
                    "the maximum-signatures constraint is not supported by the builtin backend"
                        .to_owned(),
                )
            }
            CONSTRAIN_EXTENSION => {
                let name = String::decode(&mut reader).unwrap_or_else(|_| "(malformed)".to_owned());
                let what = if name.starts_with("restrict-destination") {
                    " (destination constraints, ssh-add -h)"
                } else {
                    ""
                };
                return Err(format!(
                    "constraint {name:?}{what} is not supported by the builtin backend"
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

fn take_string<'a>(reader: &mut &'a [u8]) -> Option<&'a [u8]> {
    let (len, rest) = reader.split_first_chunk::<4>()?;
    let (value, rest) = rest.split_at_checked(usize::try_from(u32::from_be_bytes(*len)).ok()?)?;
    *reader = rest;
    Some(value)
}

fn put_string(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&u32::try_from(bytes.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(bytes);
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
            let (identity, lifetime) = parse_add(&body, false).unwrap();
            assert_eq!(lifetime, None);
            let PrivateCredential::Key { privkey, comment } = identity.credential else {
                panic!("not a key")
            };
            assert_eq!(comment, "c");
            let key = HeldKeyForTest::new(&privkey).unwrap();
            assert_eq!(key.type_name(), name);
        }
    }

    use super::super::key::HeldKey as HeldKeyForTest;

    #[test]
    fn constraints_other_than_one_lifetime_are_refused_by_name() {
        let body = short_scalar_request(Nid::SECP521R1, "ecdsa-sha2-nistp521", "nistp521", 66);
        let with = |c: &[u8]| [body.as_slice(), c].concat();
        assert_eq!(parse_add(&with(&[1, 0, 0, 0, 9]), true).unwrap().1, Some(9));
        assert!(parse_add(&with(&[1, 0, 0, 0, 9]), false).is_err());
        let e = parse_add(&with(&[2]), true).unwrap_err();
        assert!(e.contains("confirm"), "{e}");
        let mut ext = vec![255u8];
        put_string(&mut ext, b"restrict-destination-v00@openssh.com");
        let e = parse_add(&with(&ext), true).unwrap_err();
        assert!(e.contains("destination"), "{e}");
        let e = parse_add(&with(&[42]), true).unwrap_err();
        assert!(e.contains("unknown constraint type 42"), "{e}");
    }
}
