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

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::socket::{recv, MsgFlags};
use ssh_agent_lib::proto::{
    AddIdentityConstrained, Identity, PublicCredential, RemoveIdentity, Request, Response,
    SignRequest,
};
use ssh_encoding::{Decode, Encode};
use tokio::io::BufReader;
use tokio::net::UnixStream;
use tokio::sync::{watch, Notify, Semaphore};
use tokio::time::{timeout_at, Instant};
use zeroize::Zeroizing;

use super::{Backend, BackendError, BackendFuture, BackendStatus};
use crate::protocol::{read_frame, FrameError, MAX_MESSAGE_LEN};
use stream::Stream;

pub mod stream;
pub mod supervisor;

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

/// The listing flights (see [`UpstreamBackend::list`]).
#[derive(Debug, Default)]
struct Lists {
    /// Flights started so far; the n-th is numbered n.
    started: u64,
    /// The newest flight's number and where its answer appears.
    newest: Option<(u64, watch::Receiver<Option<ListAnswer>>)>,
    /// Flights not yet ended.
    in_flight: usize,
    /// The answer of the newest flight (by start) that answered with a
    /// list, and when that flight started.
    fresh: Option<(Instant, Vec<Identity>)>,
    /// Flights numbered up to this one started before the last add or
    /// remove this backend sent: their answers are never kept as fresh.
    stale_through: u64,
}

/// A listing flight in flight: ended (counted out, waiters woken) when
/// dropped.
struct FlightGuard<'a>(&'a UpstreamBackend);

impl Drop for FlightGuard<'_> {
    fn drop(&mut self) {
        let mut lists = self.0.lock_lists();
        lists.in_flight = lists.in_flight.saturating_sub(1);
        drop(lists);
        self.0.lists_changed.notify_waiters();
    }
}

/// What a list request does next.
enum ListStep {
    Join(watch::Receiver<Option<ListAnswer>>),
    /// Lead the flight with this number.
    Lead(u64, watch::Sender<Option<ListAnswer>>),
    Wait,
}

/// The answer of one listing flight.
type ListAnswer = Result<Vec<Identity>, BackendError>;

/// Read buffer of an upstream connection: a sign answer (and a short
/// listing) arrives whole in one read, header and body together.
const UPSTREAM_READ_BUFFER: usize = 2048;

/// One upstream connection and its message buffer. Reads go through a
/// buffer, so an answer costs one `recv`, not one for its header and one for
/// its body; bytes left in it after an answer mean the connection is out of
/// step (it is then never reused, see [`Conn::is_open`]).
#[derive(Debug)]
struct Conn {
    stream: BufReader<Stream>,
    buf: Vec<u8>,
}

/// How one round trip failed.
enum Trip {
    /// Nothing of an answer arrived: the peer had closed the connection.
    /// On a reused connection the request is worth one more try.
    ClosedBeforeAnswer(String),
    /// Anything else: the connection is dropped.
    Failed(String),
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

    /// REQUEST_IDENTITIES: the kept answer if its flight was sent at most
    /// [`LIST_FRESH`] before this call began, else the answer of a flight
    /// that started after it began: the newest one if it did, else one of
    /// its own if fewer than [`LIST_FLIGHTS`] are in flight, else the next
    /// one to start.
    async fn list(&self) -> Result<Vec<Identity>, BackendError> {
        let now = Instant::now();
        let deadline = now + self.timeout();
        let arrived = {
            let lists = self.lock_lists();
            if let Some((started, ids)) = &lists.fresh {
                if now.saturating_duration_since(*started) <= self.list_fresh {
                    return Ok(ids.clone());
                }
            }
            lists.started
        };
        loop {
            let changed = self.lists_changed.notified();
            tokio::pin!(changed);
            let mut step = self.list_step(arrived);
            if matches!(step, ListStep::Wait) {
                // Registered for the next change, then looked at again: a
                // change between the two looks is not missed. (Joining or
                // leading at once, the common case, never touches the
                // waiter list.)
                changed.as_mut().enable();
                step = self.list_step(arrived);
            }
            match step {
                ListStep::Join(mut answer) => {
                    let got = timeout_at(deadline, answer.wait_for(Option::is_some))
                        .await
                        .map_err(|_| BackendError::Timeout)?;
                    match got {
                        Ok(answer) => {
                            if let Some(answer) = &*answer {
                                return duplicate(answer);
                            }
                        }
                        // Its leader was cancelled before the answer:
                        // look again (a flight of our own, or a newer one).
                        Err(_) => continue,
                    }
                }
                ListStep::Lead(number, tx) => {
                    // Counted out however this ends, cancellation included.
                    let _flight = FlightGuard(self);
                    self.lists_changed.notify_waiters();
                    let started = Instant::now();
                    let answer = self
                        .call_until(deadline, &Request::RequestIdentities, parse_identities)
                        .await;
                    if let Ok(ids) = &answer {
                        self.keep_fresh(number, started, ids);
                    }
                    let shared = duplicate(&answer);
                    let _ = tx.send(Some(answer));
                    return shared;
                }
                ListStep::Wait => {
                    timeout_at(deadline, changed)
                        .await
                        .map_err(|_| BackendError::Timeout)?;
                }
            }
        }
    }

    /// What a list call that arrived after flight `arrived` started does
    /// now: join the newest flight if it started later, else lead one if
    /// fewer than [`LIST_FLIGHTS`] are in flight (counted in), else wait.
    fn list_step(&self, arrived: u64) -> ListStep {
        let mut lists = self.lock_lists();
        match &lists.newest {
            Some((n, answer)) if *n > arrived => ListStep::Join(answer.clone()),
            _ if lists.in_flight < LIST_FLIGHTS => {
                lists.started += 1;
                lists.in_flight += 1;
                let (tx, rx) = watch::channel(None);
                lists.newest = Some((lists.started, rx));
                ListStep::Lead(lists.started, tx)
            }
            _ => ListStep::Wait,
        }
    }

    /// Keeps flight `number`'s answer as the fresh one, unless a newer
    /// flight's is kept already or an add or remove was sent since it
    /// started.
    fn keep_fresh(&self, number: u64, started: Instant, ids: &[Identity]) {
        let mut lists = self.lock_lists();
        if number <= lists.stale_through {
            return;
        }
        if matches!(&lists.fresh, Some((kept, _)) if *kept >= started) {
            return;
        }
        lists.fresh = Some((started, ids.to_vec()));
    }

    /// An add or remove, answered SUCCESS or not: then no listing sent
    /// before it finished is kept (see [`Self::forget_fresh`]).
    async fn change(&self, request: &Request) -> Result<(), BackendError> {
        let done = self.call(request, parse_success).await;
        self.forget_fresh();
        done
    }

    /// Forgets the kept answer, and keeps none of the flights sent so far:
    /// an add or remove was just sent, the agent's keys may have changed.
    fn forget_fresh(&self) {
        let mut lists = self.lock_lists();
        lists.fresh = None;
        lists.stale_through = lists.started;
    }

    fn lock_lists(&self) -> std::sync::MutexGuard<'_, Lists> {
        self.lists.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// An idle connection the agent has not closed, if there is one.
    fn checkout(&self) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some(conn) = idle.pop() {
            if conn.is_open() {
                return Some(conn);
            }
        }
        None
    }

    fn checkin(&self, mut conn: Conn) {
        if conn.buf.capacity() > 16 * 1024 {
            conn.buf = Vec::new();
        }
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(conn);
    }

    /// Connects, retrying while the agent's listen backlog is full (EAGAIN),
    /// until `deadline`. Any other error fails at once.
    async fn connect(&self, deadline: Instant) -> Result<UnixStream, BackendError> {
        let _permit = timeout_at(deadline, self.connects.acquire())
            .await
            .map_err(|_| BackendError::Timeout)?
            .map_err(|_| BackendError::Broken("connection pool closed".into()))?;
        let mut delay = CONNECT_RETRY_MIN;
        loop {
            match timeout_at(deadline, UnixStream::connect(&self.socket)).await {
                Err(_) => return Err(BackendError::Timeout),
                Ok(Ok(stream)) => return Ok(stream),
                Ok(Err(e)) if e.raw_os_error() == Some(Errno::EAGAIN as i32) => {
                    self.connect_retries.fetch_add(1, Ordering::Relaxed);
                    let pause = jittered(delay);
                    if Instant::now() + pause >= deadline {
                        return Err(BackendError::Timeout);
                    }
                    tokio::time::sleep(pause).await;
                    delay = (delay * 2).min(CONNECT_RETRY_MAX);
                }
                Ok(Err(e)) => return Err(BackendError::Unreachable(e)),
            }
        }
    }
}

impl Conn {
    /// Whether this idle connection is still in step: nothing left in its
    /// buffer, and nothing (an answer nobody asked for, or end of file)
    /// readable on it. The kernel is asked only when the runtime has seen
    /// the socket become readable since it was last drained: an idle
    /// connection normally has not, and one the agent closed without the
    /// runtime noticing yet fails its request with "closed before the
    /// answer", which is retried on a fresh connection.
    fn is_open(&self) -> bool {
        if !self.stream.buffer().is_empty() {
            return false;
        }
        if !self.stream.get_ref().seen_readable() {
            return true;
        }
        let mut byte = [0u8; 1];
        matches!(
            recv(
                self.stream.get_ref().as_raw_fd(),
                &mut byte,
                MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT
            ),
            Err(Errno::EAGAIN)
        )
    }

    async fn round_trip(&mut self, frame: &[u8]) -> Result<(), Trip> {
        self.stream.get_ref().write_all(frame).await.map_err(|e| {
            if matches!(
                e.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            ) {
                Trip::ClosedBeforeAnswer(e.to_string())
            } else {
                Trip::Failed(e.to_string())
            }
        })?;
        match read_frame(&mut self.stream, &mut self.buf).await {
            Ok(()) => Ok(()),
            Err(FrameError::Closed) => Err(Trip::ClosedBeforeAnswer("connection closed".into())),
            Err(FrameError::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                Err(Trip::ClosedBeforeAnswer(e.to_string()))
            }
            Err(e) => Err(Trip::Failed(e.to_string())),
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

/// A copy of a listing flight's answer for one of the callers it serves.
fn duplicate(answer: &ListAnswer) -> ListAnswer {
    match answer {
        Ok(ids) => Ok(ids.clone()),
        Err(BackendError::Unreachable(e)) => {
            Err(BackendError::Unreachable(e.raw_os_error().map_or_else(
                || std::io::Error::new(e.kind(), e.to_string()),
                std::io::Error::from_raw_os_error,
            )))
        }
        Err(BackendError::Timeout) => Err(BackendError::Timeout),
        Err(BackendError::Busy) => Err(BackendError::Busy),
        Err(BackendError::Refused) => Err(BackendError::Refused),
        Err(BackendError::Unsupported) => Err(BackendError::Unsupported),
        Err(BackendError::Broken(e)) => Err(BackendError::Broken(e.clone())),
    }
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
            Ok(BackendStatus {
                identities,
                problems: Vec::new(),
            })
        })
    }

    fn set_timeout(&self, timeout: Duration) {
        self.timeout_ms.store(millis(timeout), Ordering::Relaxed);
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// `base` give or take half, so that connects retried after one burst do
/// not all come back at the same instant.
fn jittered(base: Duration) -> Duration {
    let random = RandomState::new().build_hasher().finish();
    let nanos = u64::try_from(base.as_nanos()).unwrap_or(u64::MAX).max(2);
    Duration::from_nanos(nanos / 2 + random % nanos)
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
    use super::*;
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
