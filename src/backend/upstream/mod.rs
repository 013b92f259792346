//! The upstream backend: an ssh-agent reached over its Unix socket
//! (OpenSSH's `ssh-agent`, spawned by the daemon or run by someone else).
//!
//! Connections are pooled: a bounded set (at most [`POOL_MAX`], and never
//! more than `max_connections`) is opened lazily and reused across client
//! connections. A call takes a connection for one request and its answer,
//! then gives it back; one that failed, timed out or was cancelled
//! mid-answer is dropped (its framing can no longer be trusted), never
//! reused. This is correct only because no per-connection agent state is
//! ever created upstream: `session-bind@openssh.com` is not forwarded (see
//! the daemon), and nothing else the proxy forwards leaves state behind.
//!
//! Connecting: OpenSSH's agent listens with a backlog of 128 and accepts one
//! connection per loop pass, so under a burst a non-blocking connect fails
//! with EAGAIN. That is retried with a small jittered backoff; a real outage
//! (ECONNREFUSED, ENOENT, …) fails at once. At most [`CONNECTS_IN_FLIGHT`]
//! connects run at once.
//!
//! Listings are coalesced: at most [`LIST_FLIGHTS`] REQUEST_IDENTITIES are
//! in flight upstream at a time, and every list (or status) request is
//! answered by a flight that was sent at most [`LIST_FRESH`] (500 µs, less
//! than one signature by the agent) before it arrived, or after. A request
//! is answered at once by the newest answer if its flight was sent that
//! recently, else joins the newest flight if that one started after it
//! arrived, else starts one of its own while fewer than [`LIST_FLIGHTS`]
//! are in flight, else waits for the next. An add or remove sent through
//! this backend forgets the kept answer, and no flight sent before it
//! finished is kept. A flood of lists or `status@keyholder` costs the agent
//! a few requests at a time, however many callers wait; ordinary traffic
//! (every `ssh` lists first) is not held behind one flight queued behind the
//! agent's signs.
//!
//! With `agent.spawn = true` the agent itself is started, restarted and
//! stopped by [`supervisor`]; [`stream`] is the read side of an upstream
//! connection.
//!
//! Every call (waiting for a pooled connection, connecting, the request and
//! its answer) ends within the timeout. Answers are read with the proxy's own
//! capped framing ([`crate::protocol::read_frame`], 256 KiB) and a sign
//! answer is relayed as the agent produced it, never decoded.
//!
//! It must never forward anything the policy did not allow (it only sends
//! what its methods are asked), never log key material, and never reuse a
//! connection whose last answer was not read whole.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use ssh_agent_lib::proto::{
    AddIdentityConstrained, Identity, PublicCredential, RemoveIdentity, Request, Response,
    SignRequest,
};
use ssh_encoding::{Decode, Encode};
use tokio::io::BufReader;
use tokio::sync::{Notify, Semaphore};
use tokio::time::{timeout_at, Instant};
use zeroize::Zeroizing;

use super::{Backend, BackendError, BackendFuture, BackendStatus};
use crate::protocol::MAX_MESSAGE_LEN;
use stream::Stream;

mod flights;
mod pool;
pub mod stream;
pub mod supervisor;

use flights::Lists;
use pool::{Conn, Trip, UPSTREAM_READ_BUFFER};

/// Upstream connections open at most (in use and idle together). The agent
/// is single-threaded: more connections than this add poll work for it and
/// nothing else; callers beyond it wait for a free one (within the timeout).
pub const POOL_MAX: u32 = 64;
/// Listing flights in flight upstream at once. A listing costs the agent
/// little but waits its turn behind the signatures queued ahead of it: with
/// two flights, an `ssh` that arrives while one is queued is answered by the
/// other instead of waiting for both, and the agent never runs short of
/// signatures to make; each further flight is one more upstream round trip
/// for the daemon.
pub const LIST_FLIGHTS: usize = 2;
/// How long after a listing flight was sent its answer still serves a new
/// list request at once, without another trip to the agent. Shorter than
/// one signature by OpenSSH's agent (600-700 µs on a small host, most of
/// it unshielding the key): a listing sent alone can wait that long behind
/// one signature queued ahead of it, so no client can tell the two apart.
pub const LIST_FRESH: Duration = Duration::from_micros(500);
/// Upstream connects in flight at once: well under OpenSSH's listen backlog
/// of 128, so a refill after a restart never overruns it by itself.
pub const CONNECTS_IN_FLIGHT: usize = 16;
/// The first pause after EAGAIN on connect; doubles up to [`CONNECT_RETRY_MAX`].
const CONNECT_RETRY_MIN: Duration = Duration::from_millis(1);
const CONNECT_RETRY_MAX: Duration = Duration::from_millis(50);

/// SSH_AGENT_FAILURE, and the two legacy failure codes OpenSSH's client
/// also takes as failure.
const FAILURE: u8 = 5;
const SSH2_AGENT_FAILURE: u8 = 30;
const SSH_COM_AGENT2_FAILURE: u8 = 102;
const SUCCESS: u8 = 6;
const IDENTITIES_ANSWER: u8 = 12;
const SIGN_RESPONSE: u8 = 14;

/// An ssh-agent on a Unix socket, through a pool of connections.
#[derive(Debug)]
pub struct UpstreamBackend {
    socket: PathBuf,
    timeout_ms: AtomicU64,
    /// Connections not in use, each answered whole last time.
    idle: Mutex<Vec<Conn>>,
    /// One permit per connection in use; the pool never holds more
    /// connections than permits (a new one is opened only when none is idle).
    slots: Semaphore,
    /// Connects in flight.
    connects: Semaphore,
    /// Connects retried because the agent's backlog was full.
    connect_retries: AtomicU64,
    /// Listing flights.
    lists: Mutex<Lists>,
    /// Woken when a listing flight starts or ends.
    lists_changed: Notify,
    /// [`LIST_FRESH`] (tests set others).
    list_fresh: Duration,
}

impl UpstreamBackend {
    /// A backend for the agent on `socket`; no connection is opened yet.
    /// `max_connections` bounds the pool (with [`POOL_MAX`]).
    pub fn new(socket: PathBuf, timeout: Duration, max_connections: u32) -> Self {
        let slots = usize::try_from(max_connections.clamp(1, POOL_MAX)).unwrap_or(1);
        Self {
            socket,
            timeout_ms: AtomicU64::new(millis(timeout)),
            idle: Mutex::new(Vec::new()),
            slots: Semaphore::new(slots),
            connects: Semaphore::new(CONNECTS_IN_FLIGHT),
            connect_retries: AtomicU64::new(0),
            lists: Mutex::new(Lists::default()),
            lists_changed: Notify::new(),
            list_fresh: LIST_FRESH,
        }
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms.load(Ordering::Relaxed))
    }

    /// Connects retried so far because the agent's listen backlog was full.
    pub fn connect_retries(&self) -> u64 {
        self.connect_retries.load(Ordering::Relaxed)
    }

    /// Sends one framed request and hands the answer's body to `parse`, all
    /// within the timeout. The connection goes back to the pool unless the
    /// exchange failed or `parse` found the answer out of step.
    async fn call<T>(
        &self,
        request: &Request,
        parse: impl FnOnce(&[u8]) -> Result<T, BackendError>,
    ) -> Result<T, BackendError> {
        self.call_until(Instant::now() + self.timeout(), request, parse)
            .await
    }

    async fn call_until<T>(
        &self,
        deadline: Instant,
        request: &Request,
        parse: impl FnOnce(&[u8]) -> Result<T, BackendError>,
    ) -> Result<T, BackendError> {
        let frame = encode(request)?;
        let _slot = timeout_at(deadline, self.slots.acquire())
            .await
            .map_err(|_| BackendError::Timeout)?
            .map_err(|_| BackendError::Broken("connection pool closed".into()))?;
        let mut pooled = self.checkout();
        loop {
            let reused = pooled.is_some();
            let mut conn = match pooled.take() {
                Some(conn) => conn,
                None => Conn {
                    stream: BufReader::with_capacity(
                        UPSTREAM_READ_BUFFER,
                        Stream::new(self.connect(deadline).await?)
                            .map_err(|e| BackendError::Broken(format!("upstream socket: {e}")))?,
                    ),
                    buf: Vec::new(),
                },
            };
            match timeout_at(deadline, conn.round_trip(&frame)).await {
                // Dropped with `conn`: an answer may still be on its way.
                Err(_) => return Err(BackendError::Timeout),
                Ok(Err(Trip::ClosedBeforeAnswer(_))) if reused => continue,
                Ok(Err(Trip::ClosedBeforeAnswer(e) | Trip::Failed(e))) => {
                    return Err(BackendError::Broken(e))
                }
                Ok(Ok(())) => {
                    let result = parse(&conn.buf);
                    if !matches!(result, Err(BackendError::Broken(_))) {
                        self.checkin(conn);
                    }
                    return result;
                }
            }
        }
    }
}

/// Frames a request (`uint32 length`, then the message) in a buffer that is
/// wiped when dropped: an add request carries a private key.
fn encode(request: &Request) -> Result<Zeroizing<Vec<u8>>, BackendError> {
    let broken = |e: ssh_encoding::Error| BackendError::Broken(format!("cannot encode: {e}"));
    let len = request.encoded_len().map_err(broken)?;
    let header = u32::try_from(len)
        .ok()
        .filter(|_| len <= MAX_MESSAGE_LEN)
        .ok_or_else(|| BackendError::Broken("request too large".into()))?;
    let mut out = Zeroizing::new(Vec::with_capacity(4 + len));
    header.encode(&mut *out).map_err(broken)?;
    request.encode(&mut *out).map_err(broken)?;
    Ok(out)
}

/// FAILURE (in step: the connection stays usable), or an answer of a kind
/// that was not asked for (out of step: dropped).
fn unexpected(body: &[u8]) -> BackendError {
    match body.first() {
        Some(&(FAILURE | SSH2_AGENT_FAILURE | SSH_COM_AGENT2_FAILURE)) => BackendError::Refused,
        Some(t) => BackendError::Broken(format!("unexpected answer of type {t}")),
        None => BackendError::Broken("empty answer".into()),
    }
}

fn parse_identities(body: &[u8]) -> Result<Vec<Identity>, BackendError> {
    if body.first() != Some(&IDENTITIES_ANSWER) {
        return Err(unexpected(body));
    }
    match Response::decode(&mut &body[..]) {
        Ok(Response::IdentitiesAnswer(ids)) => Ok(ids),
        Ok(_) => Err(unexpected(body)),
        Err(e) => Err(BackendError::Broken(format!(
            "malformed identities answer: {e}"
        ))),
    }
}

/// The `string signature` of a SIGN_RESPONSE, as the agent sent it.
fn parse_signature(body: &[u8]) -> Result<Vec<u8>, BackendError> {
    let Some((&SIGN_RESPONSE, rest)) = body.split_first() else {
        return Err(unexpected(body));
    };
    let malformed = || BackendError::Broken("malformed sign answer".into());
    let (len, blob) = rest.split_first_chunk::<4>().ok_or_else(malformed)?;
    if usize::try_from(u32::from_be_bytes(*len)).ok() != Some(blob.len()) || blob.is_empty() {
        return Err(malformed());
    }
    Ok(blob.to_vec())
}

fn parse_success(body: &[u8]) -> Result<(), BackendError> {
    if body == [SUCCESS] {
        Ok(())
    } else {
        Err(unexpected(body))
    }
}

impl Backend for UpstreamBackend {
    fn name(&self) -> &'static str {
        "upstream"
    }

    fn identities(&self) -> BackendFuture<'_, Vec<Identity>> {
        Box::pin(self.list())
    }

    fn sign(&self, request: SignRequest) -> BackendFuture<'_, Vec<u8>> {
        Box::pin(async move {
            self.call(&Request::SignRequest(request), parse_signature)
                .await
        })
    }

    fn add(&self, identity: AddIdentityConstrained, _origin: String) -> BackendFuture<'_, ()> {
        Box::pin(async move {
            let request = if identity.constraints.is_empty() {
                Request::AddIdentity(identity.identity)
            } else {
                Request::AddIdConstrained(identity)
            };
            self.change(&request).await
        })
    }

    fn remove(&self, key: PublicCredential) -> BackendFuture<'_, ()> {
        Box::pin(async move {
            let request = Request::RemoveIdentity(RemoveIdentity { credential: key });
            self.change(&request).await
        })
    }

    fn remove_all(&self) -> BackendFuture<'_, ()> {
        Box::pin(self.change(&Request::RemoveAllIdentities))
    }

    fn status(&self) -> BackendFuture<'_, BackendStatus> {
        Box::pin(async move {
            let identities = self.identities().await?;
            Ok(BackendStatus { identities })
        })
    }

    fn set_timeout(&self, timeout: Duration) {
        self.timeout_ms.store(millis(timeout), Ordering::Relaxed);
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Opens the upstream backend: with `agent.spawn`, starts the agent (in a
/// directory only root may write) and its supervisor, which restarts it
/// when it dies and stops it on shutdown; otherwise uses the agent someone
/// else runs on `agent.socket`.
pub(super) async fn open(
    config: &crate::config::Config,
    context: super::OpenContext,
) -> crate::error::Result<super::Opened> {
    let agent = &config.agent;
    let mut tasks = Vec::new();
    if agent.spawn {
        crate::sockets::ensure_dir(&agent.socket, "agent.socket")?;
        let sup = supervisor::Supervisor::start(agent.clone(), context.log)
            .await?
            .count_restarts(context.restarts);
        tracing::info!(
            "upstream agent {} started (pid {}) on {}",
            agent.program.display(),
            sup.pid().unwrap_or(0),
            agent.socket.display()
        );
        tasks.push(tokio::spawn(sup.run(context.shutdown)));
    } else {
        tracing::info!("using the upstream agent at {}", agent.socket.display());
    }
    let backend = UpstreamBackend::new(
        agent.socket.clone(),
        config.limits.upstream_timeout,
        config.limits.max_connections,
    );
    Ok(super::Opened {
        backend: std::sync::Arc::new(backend),
        tasks,
    })
}

#[cfg(test)]
mod tests {
    use super::pool::jittered;
    use super::*;
    use nix::errno::Errno;
    use std::os::fd::AsRawFd;
    use std::sync::Arc;

    #[test]
    fn signature_is_taken_as_sent() {
        let sig = [&7u32.to_be_bytes()[..], b"ssh-rsa", &[1, 2, 3]].concat();
        let body = [
            &[SIGN_RESPONSE][..],
            &(sig.len() as u32).to_be_bytes(),
            &sig,
        ]
        .concat();
        assert_eq!(parse_signature(&body).unwrap(), sig);
        // Trailing or missing bytes, an empty blob, FAILURE, another type.
        let mut long = body.clone();
        long.push(0);
        assert!(matches!(
            parse_signature(&long),
            Err(BackendError::Broken(_))
        ));
        assert!(matches!(
            parse_signature(&body[..body.len() - 1]),
            Err(BackendError::Broken(_))
        ));
        assert!(matches!(
            parse_signature(&[SIGN_RESPONSE, 0, 0, 0, 0]),
            Err(BackendError::Broken(_))
        ));
        assert!(matches!(parse_signature(&[5]), Err(BackendError::Refused)));
        assert!(matches!(
            parse_signature(&[12]),
            Err(BackendError::Broken(_))
        ));
        assert!(matches!(parse_signature(&[]), Err(BackendError::Broken(_))));
    }

    #[test]
    fn success_and_failure() {
        assert!(parse_success(&[SUCCESS]).is_ok());
        assert!(matches!(parse_success(&[102]), Err(BackendError::Refused)));
        assert!(matches!(
            parse_success(&[SUCCESS, 0]),
            Err(BackendError::Broken(_))
        ));
        assert!(matches!(
            parse_identities(&[IDENTITIES_ANSWER, 0, 0]),
            Err(BackendError::Broken(_))
        ));
        assert_eq!(
            parse_identities(&[IDENTITIES_ANSWER, 0, 0, 0, 0]).unwrap(),
            vec![]
        );
    }

    #[test]
    fn jitter_stays_within_half_and_one_and_a_half() {
        for _ in 0..1000 {
            let d = jittered(Duration::from_millis(10));
            assert!(d >= Duration::from_millis(5) && d < Duration::from_millis(15));
        }
    }

    fn temp_socket(tag: &str) -> (PathBuf, PathBuf) {
        let dir = std::env::temp_dir().join(format!("kh-up-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        (dir.join("agent.sock"), dir)
    }

    #[tokio::test]
    async fn a_request_the_agent_never_reads_times_out_without_spinning() {
        let (socket, dir) = temp_socket("unread");
        // Accepts, never reads: a request larger than the socket's buffer
        // cannot be sent whole.
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let held = std::thread::spawn(move || listener.accept().map(|(s, _)| s));
        let b = UpstreamBackend::new(socket.clone(), Duration::from_millis(300), 8);
        let request = SignRequest {
            credential: PublicCredential::Key(ssh_key::public::KeyData::Ed25519(
                ssh_key::public::Ed25519PublicKey([7; 32]),
            )),
            data: vec![0x5a; 200 * 1024],
            flags: 0,
        };
        let started = std::time::Instant::now();
        assert!(matches!(b.sign(request).await, Err(BackendError::Timeout)));
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(250) && took < Duration::from_secs(3),
            "{took:?}"
        );
        drop(held.join());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn an_outage_fails_at_once_without_retrying() {
        let (socket, dir) = temp_socket("outage");
        let b = UpstreamBackend::new(socket.clone(), Duration::from_secs(5), 8);
        // ENOENT, then ECONNREFUSED (a socket file nothing listens on):
        // reported as such (a retry would end in Timeout).
        assert!(matches!(
            b.identities().await,
            Err(BackendError::Unreachable(e)) if e.kind() == std::io::ErrorKind::NotFound
        ));
        drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
        assert!(matches!(
            b.sign(SignRequest {
                credential: PublicCredential::Key(ssh_key::public::KeyData::Ed25519(
                    ssh_key::public::Ed25519PublicKey([1; 32])
                )),
                data: vec![1],
                flags: 0
            })
            .await,
            Err(BackendError::Unreachable(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused
        ));
        assert_eq!(b.connect_retries(), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A listener with a backlog of 1 that accepts nothing, filled up: the
    /// next non-blocking connect gets EAGAIN, as with a busy agent.
    fn full_listener(path: &std::path::Path) -> (std::os::fd::OwnedFd, Vec<std::os::fd::OwnedFd>) {
        use nix::sys::socket::{
            bind, connect, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
        };
        let addr = UnixAddr::new(path).unwrap();
        let listener = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::empty(),
            None,
        )
        .unwrap();
        bind(listener.as_raw_fd(), &addr).unwrap();
        listen(&listener, Backlog::new(1).unwrap()).unwrap();
        let mut queued = Vec::new();
        loop {
            let s = socket(
                AddressFamily::Unix,
                SockType::Stream,
                SockFlag::SOCK_NONBLOCK,
                None,
            )
            .unwrap();
            match connect(s.as_raw_fd(), &addr) {
                Ok(()) => queued.push(s),
                Err(Errno::EAGAIN) => break,
                Err(e) => panic!("{e}"),
            }
            assert!(queued.len() < 100);
        }
        (listener, queued)
    }

    #[tokio::test]
    async fn a_full_backlog_is_retried_until_there_is_room_or_the_deadline() {
        let (socket, dir) = temp_socket("backlog");
        let (listener, _queued) = full_listener(&socket);
        let b = UpstreamBackend::new(socket.clone(), Duration::from_millis(200), 8);
        // Never any room: Timeout, after retries (not Unreachable).
        let deadline = Instant::now() + Duration::from_millis(200);
        assert!(matches!(
            b.connect(deadline).await,
            Err(BackendError::Timeout)
        ));
        let retried = b.connect_retries();
        assert!(retried > 0);
        // Room made while it retries: connected.
        let accepter = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            let _ = nix::sys::socket::accept(listener.as_raw_fd()).unwrap();
            std::thread::sleep(Duration::from_millis(500));
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        assert!(b.connect(deadline).await.is_ok());
        assert!(b.connect_retries() > retried);
        accepter.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A stand-in agent that answers every REQUEST_IDENTITIES with no keys
    /// and every other request with SUCCESS, and counts the listings.
    fn counting_agent(socket: &std::path::Path) -> Arc<AtomicU64> {
        use std::io::{Read, Write};
        let listener = std::os::unix::net::UnixListener::bind(socket).unwrap();
        let lists = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&lists);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                let counted = Arc::clone(&counted);
                std::thread::spawn(move || loop {
                    let mut len = [0u8; 4];
                    if conn.read_exact(&mut len).is_err() {
                        return;
                    }
                    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
                    if conn.read_exact(&mut body).is_err() {
                        return;
                    }
                    let answer: &[u8] = if body.first() == Some(&11) {
                        counted.fetch_add(1, Ordering::SeqCst);
                        &[0, 0, 0, 5, IDENTITIES_ANSWER, 0, 0, 0, 0]
                    } else {
                        &[0, 0, 0, 1, SUCCESS]
                    };
                    if conn.write_all(answer).is_err() {
                        return;
                    }
                });
            }
        });
        lists
    }

    /// A backend in front of a [`counting_agent`] that keeps an answer for
    /// an hour, the listings counter, and the directory to remove.
    fn backend_keeping_answers(tag: &str) -> (UpstreamBackend, Arc<AtomicU64>, PathBuf) {
        let (socket, dir) = temp_socket(tag);
        let lists = counting_agent(&socket);
        let mut b = UpstreamBackend::new(socket, Duration::from_secs(5), 8);
        b.list_fresh = Duration::from_secs(3600);
        (b, lists, dir)
    }

    #[tokio::test]
    async fn a_recent_answer_serves_lists_until_it_is_too_old_or_keys_change() {
        let (mut b, lists, dir) = backend_keeping_answers("fresh");
        // Within the window: one listing upstream for ten requests.
        for _ in 0..10 {
            assert_eq!(b.identities().await.unwrap(), vec![]);
        }
        assert_eq!(lists.load(Ordering::SeqCst), 1);
        // A remove-all or a remove sent through the backend (an add goes
        // the same way): the next request is a listing of its own.
        b.remove_all().await.unwrap();
        b.identities().await.unwrap();
        b.identities().await.unwrap();
        assert_eq!(lists.load(Ordering::SeqCst), 2);
        b.remove(PublicCredential::Key(ssh_key::public::KeyData::Ed25519(
            ssh_key::public::Ed25519PublicKey([3; 32]),
        )))
        .await
        .unwrap();
        b.identities().await.unwrap();
        assert_eq!(lists.load(Ordering::SeqCst), 3);
        // Too old (a window of zero): every request goes upstream.
        b.list_fresh = Duration::ZERO;
        for _ in 0..3 {
            b.identities().await.unwrap();
        }
        assert_eq!(lists.load(Ordering::SeqCst), 6);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_listing_sent_before_a_change_finished_is_never_kept() {
        let (b, lists, dir) = backend_keeping_answers("stale");
        // A flight numbered before the change, answered after it.
        let (number, started) = {
            let mut lists = b.lock_lists();
            lists.started += 1;
            (lists.started, Instant::now())
        };
        b.forget_fresh();
        b.keep_fresh(number, started, &[]);
        assert!(b.lock_lists().fresh.is_none());
        b.identities().await.unwrap();
        b.identities().await.unwrap();
        assert_eq!(lists.load(Ordering::SeqCst), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
