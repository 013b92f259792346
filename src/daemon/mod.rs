//! `keyholder daemon`: wires the pieces together.
//!
//! Binds the proxy socket, starts (or finds) the upstream agent, and runs
//! the accept loop: each accepted connection is admitted by the [`limits`]
//! (never waiting for the user database), then served ([`connection`]) in
//! its own task, which resolves the caller for each request through
//! [`lookups`]. A shutdown signal every task watches ends them all on
//! SIGTERM or SIGINT; SIGHUP reloads the configuration on a blocking thread,
//! never in the accept loop (a bad one leaves the last good one in force),
//! and drops the lookup cache. Before anything is spawned or bound, a daemon
//! already answering on the sockets makes this one exit
//! ([`crate::sockets`]). The decision itself lives in [`crate::policy`].

pub mod audit;
pub mod caller;
pub mod connection;
pub mod limits;
pub mod lookups;
pub mod metrics;
pub mod userdb_watch;
pub mod verifier;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixStream;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, watch};

use crate::backend::Backend;
use crate::config::{Config, Limits, LogTarget};
use crate::error::{Error, Result};
use crate::policy::Policy;
use crate::ratelog::{self, RateLog, Who};
use crate::sockets::{self, Probe};
use limits::{LimitHit, Limiter};

/// How long open connections get to finish on shutdown.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Accept errors (EMFILE…): the first of a burst, then a count per window.
pub static ACCEPT_FAILED: ratelog::Kind = ratelog::Kind {
    name: "accept errors",
    burst: 1,
    level: tracing::Level::ERROR,
};
/// Accept-error backoff bounds.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// The period of [`timer_floor`].
const TIMER_FLOOR: Duration = Duration::from_secs(1);

/// The settings requests are handled under; replaced whole on reload.
#[derive(Debug)]
pub struct Runtime {
    /// Keys and groups.
    pub policy: Policy,
    /// Timeouts and limits.
    pub limits: Limits,
    /// The groups the keys name: a caller's membership is looked up for
    /// these (for each request, through the lookup cache).
    pub groups: Arc<[String]>,
    /// What certificates are minted with, when `[certificates]` is set
    /// (a reload applies to the next certificate minted).
    pub certs: Option<crate::certs::Settings>,
}

impl From<&Config> for Runtime {
    fn from(config: &Config) -> Self {
        let policy = Policy::from(config);
        Self {
            groups: policy.group_names().into(),
            policy,
            limits: config.limits,
            certs: crate::certs::Settings::from_config(config),
        }
    }
}

/// State shared by all connection tasks.
#[derive(Debug)]
pub struct Shared {
    /// The settings in force.
    pub runtime: watch::Receiver<Arc<Runtime>>,
    /// Holds or reaches the keys; which one, the daemon never needs to know.
    pub backend: Arc<dyn Backend>,
    /// Certificates minted, cached and remembered.
    pub authority: crate::certs::Authority,
    /// Caller lookups and their cache.
    pub lookups: Arc<lookups::Lookups>,
    /// Session-binding verification slots.
    pub verifier: verifier::Verifier,
    /// Per-uid rate limiting of refusals and other lines a flood repeats.
    pub log: Arc<RateLog>,
    /// Counters since start (`keyholder status --prometheus`).
    pub metrics: metrics::Metrics,
    /// Grants: requests read a snapshot of them; grant extensions change them.
    pub grants: Arc<crate::grants::Store>,
}

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(config_path: &Path, log: Option<LogTarget>) -> Result<()> {
    crate::require_root("keyholder daemon")?;
    let config = Config::load(config_path)?;
    let target = log.unwrap_or(config.log);
    crate::logging::init(target)?;
    let hardening = crate::hardening::apply()?;
    if let Err(why) = &hardening.mlock {
        tracing::warn!("memory not locked: {why}");
    }
    if let Err(why) = crate::hardening::return_freed_memory() {
        tracing::warn!("freed memory may stay resident: {why}");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("keyholder")
        .thread_stack_size(512 * 1024)
        .max_blocking_threads(64)
        .build()
        .map_err(|e| Error::msg(format!("cannot start the async runtime: {e}")))?;
    // The accept loop runs on a worker, not on this thread: an accepted
    // connection is then handed on without waking another thread first.
    let result = runtime.block_on(async {
        tokio::spawn(serve(config, hardening.mlock.is_ok()))
            .await
            .unwrap_or_else(|e| Err(Error::msg(format!("the daemon's main task failed: {e}"))))
    });
    // `main` prints the error on stderr; the system log gets it too, but a
    // log on stderr would show the same line twice.
    if let (Err(e), LogTarget::Syslog) = (&result, target) {
        tracing::error!("{e}");
    }
    // Do not wait for a user-database lookup stuck in a blocking thread.
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

async fn serve(mut config: Config, memory_locked: bool) -> Result<()> {
    // First, so that a spawned agent inherits the raised descriptor limit.
    let max_connections = limits::fit_descriptors(config.limits.max_connections);
    let (stop_tx, stop_rx) = watch::channel(false);
    let metrics = metrics::Metrics::new();
    let mut sigterm = signal_stream(SignalKind::terminate())?;
    let mut sigint = signal_stream(SignalKind::interrupt())?;
    let mut sighup = signal_stream(SignalKind::hangup())?;

    // Before anything is spawned or touched: a second daemon started by
    // mistake must leave the running one (and its agent) alone.
    refuse_if_running(&config)?;
    let log = RateLog::start(RateLog::window_from_env(), stop_rx.clone());
    sockets::ensure_dir(&config.socket, "socket")?;
    let context = crate::backend::OpenContext {
        shutdown: stop_rx.clone(),
        memory_locked,
        log: Arc::clone(&log),
        restarts: metrics.upstream_restarts.clone(),
    };
    let opened = crate::backend::open(&config, context).await?;
    let listener = match sockets::bind(&config.socket, 0o666, "socket") {
        Ok(l) => l,
        Err(e) => {
            let _ = stop_tx.send(true);
            opened.stopped().await;
            return Err(e);
        }
    };
    let backend = Arc::clone(&opened.backend);
    let limiter = Limiter::new(max_connections, config.limits.max_connections_per_user);
    let (runtime_tx, runtime_rx) = watch::channel(Arc::new(Runtime::from(&config)));
    let grants = {
        let (dir, policy, log) = (
            config.state_dir.clone(),
            runtime_rx.borrow().policy.clone(),
            Arc::clone(&log),
        );
        tokio::task::spawn_blocking(move || crate::grants::Store::open(&dir, &policy, log))
            .await
            .map_err(|e| Error::msg(format!("cannot open the grant store: {e}")))?
    };
    tokio::spawn(Arc::clone(&grants).run(
        runtime_rx.clone(),
        |rt: &Runtime| &rt.policy,
        stop_rx.clone(),
    ));
    let shared = Arc::new(Shared {
        runtime: runtime_rx,
        backend,
        authority: crate::certs::Authority::new(),
        lookups: lookups::Lookups::new(Arc::clone(&log)),
        verifier: verifier::Verifier::default(),
        log,
        metrics,
        grants,
    });
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    tokio::spawn(timer_floor(stop_rx.clone()));

    crate::notify::notify("READY=1");
    tracing::info!(
        "keyholder {} listening on {} with {} configured key(s): {}",
        env!("CARGO_PKG_VERSION"),
        config.socket.display(),
        config.keys.len(),
        key_names(&config)
    );

    if let Some(c) = &config.certificates {
        tracing::info!(
            "certificates: CA {} ({}), valid {} s (backdated {} s), key ID {:?}, for: {}",
            c.ca.name,
            c.ca.fingerprint,
            c.validity_secs,
            c.backdate_secs,
            c.key_id,
            config
                .keys
                .iter()
                .filter(|k| k.cert.mode != crate::config::CertMode::Off)
                .map(|k| format!("{} ({})", k.name, k.cert.mode.name()))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if config.keys.is_empty() {
        tracing::warn!(
            "no keys configured in {}: every sign request will be refused",
            config.path.display()
        );
    }

    let mut backoff = ACCEPT_BACKOFF_MIN;
    // After an accept error (EMFILE, ENFILE…) accepting pauses for `backoff`:
    // the listener stays readable while the error lasts, so retrying at once
    // would spin. The pause is a branch of its own rather than a sleep in
    // the accept branch, so signals are still handled during it.
    let mut paused_until: Option<tokio::time::Instant> = None;
    // A reload reads files (which may be slow, or not what they should be)
    // on a blocking thread; the loop applies its result when it is ready.
    // A SIGHUP during a reload is coalesced into one more after it.
    let mut reloading: Option<tokio::task::JoinHandle<Result<Config>>> = None;
    let mut reload_again = false;
    loop {
        tokio::select! {
            // Signals first: a pending SIGTERM must not lose the draw, time
            // after time, to an accept that is always ready and failing.
            biased;
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            _ = sighup.recv() => {
                if reloading.is_some() {
                    reload_again = true;
                } else {
                    reloading = Some(start_reload(&config.path));
                }
            }
            loaded = async {
                match reloading.as_mut() {
                    Some(task) => task.await,
                    None => std::future::pending().await,
                }
            }, if reloading.is_some() => {
                reloading = None;
                shared.metrics.reloaded(matches!(loaded, Ok(Ok(_))));
                match loaded {
                    Ok(Ok(new)) => {
                        config = apply_reload(&config, new, &limiter, &runtime_tx);
                        shared.backend.set_timeout(config.limits.upstream_timeout);
                    }
                    Ok(Err(e)) => {
                        tracing::error!("reload failed, keeping the last good configuration: {e}");
                    }
                    Err(e) => {
                        tracing::error!("reload failed, keeping the last good configuration: {e}");
                    }
                }
                if std::mem::take(&mut reload_again) {
                    reloading = Some(start_reload(&config.path));
                }
                shared.lookups.clear();
            }
            () = tokio::time::sleep_until(paused_until.unwrap_or_else(tokio::time::Instant::now)),
                if paused_until.is_some() => paused_until = None,
            accepted = listener.accept(), if paused_until.is_none() => match accepted {
                Ok((stream, _)) => {
                    backoff = ACCEPT_BACKOFF_MIN;
                    admit(stream, &limiter, &shared, &stop_rx, &done_tx);
                }
                Err(e) => {
                    if shared.log.allow(&ACCEPT_FAILED, Who::Unattributed) {
                        tracing::error!("accept failed: {e}; retrying");
                    }
                    paused_until = Some(tokio::time::Instant::now() + backoff);
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                }
            },
        }
    }

    tracing::info!("shutting down");
    crate::notify::notify("STOPPING=1");
    let _ = stop_tx.send(true);
    drop(listener);
    sockets::remove(&config.socket);
    drop(done_tx);
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, done_rx.recv()).await;
    opened.stopped().await;
    let lookups = shared.lookups.stats();
    tracing::info!(
        "stopped; user lookups since start: {} run, {} requests answered from the cache, \
         {} timed out",
        lookups.run,
        lookups.reused,
        lookups.timed_out
    );
    Ok(())
}

/// Keeps a timer due within [`TIMER_FLOOR`] at all times, so that the
/// runtime's time driver never sleeps towards a later deadline. Every
/// upstream request registers a timeout (`upstream_timeout_secs`, 30 s by
/// default) and every request waits under the idle timeout; a timer due
/// before the one the sleeping driver waits for makes tokio wake that
/// thread (an eventfd write and two extra `epoll_wait`s, on another CPU),
/// once per request. With this floor no timeout of a second or more is ever
/// the earliest, and the cost is one wake-up per second.
async fn timer_floor(mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(TIMER_FLOOR);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stopped(&mut stop) => return,
        }
    }
}

/// Admits (or refuses) one accepted connection and spawns its task. Never
/// waits for the user database: a connection the shared bucket of unlisted
/// uids refuses waits for its uid's lookup in a task of its own
/// ([`admit_after_lookup`]).
fn admit(
    stream: UnixStream,
    limiter: &Arc<Limiter>,
    shared: &Arc<Shared>,
    stop: &watch::Receiver<bool>,
    done: &mpsc::Sender<()>,
) {
    let Ok(cred) = stream.peer_cred() else {
        return;
    };
    shared.metrics.accepted();
    let (uid, pid) = (cred.uid(), cred.pid());
    // uids not known to have a passwd entry share one bucket. Known: a line
    // of /etc/passwd, or an earlier lookup; the user database itself is
    // never waited for here.
    let listed = shared.lookups.listed(uid);
    let admission = match limiter.admit(uid, listed) {
        Ok(a) => a,
        Err(LimitHit::Unlisted) => {
            // Maybe a directory user not seen yet (LDAP, sssd, userdb):
            // looked up before the shared bucket refuses it.
            if let Some(place) = limiter.pending_lookup() {
                let (limiter, shared) = (Arc::clone(limiter), Arc::clone(shared));
                let (stop, done) = (stop.clone(), done.clone());
                tokio::spawn(async move {
                    admit_after_lookup(stream, uid, pid, &limiter, shared, stop).await;
                    drop((place, done));
                });
                return;
            }
            refuse_connection(shared, uid, pid, LimitHit::Unlisted, false);
            // Looked up in the background, so that its next connection
            // gets its own bucket if it has a passwd entry.
            let (groups, limits) = {
                let rt = shared.runtime.borrow();
                (Arc::clone(&rt.groups), rt.limits)
            };
            shared
                .lookups
                .prefetch(uid, &groups, limits.lookup_cache, limits.lookup_timeout);
            return;
        }
        Err(hit) => {
            refuse_connection(shared, uid, pid, hit, listed);
            return;
        }
    };
    let shared = Arc::clone(shared);
    let stop = stop.clone();
    let done = done.clone();
    tokio::spawn(async move {
        let _open = shared.metrics.open();
        connection::serve(stream, uid, pid, admission, Arc::clone(&shared), stop).await;
        drop(done);
    });
}

/// A connection of `uid` the shared bucket of unlisted uids refused: looks
/// the uid up (within `lookup_timeout_secs`; the answer is cached for the
/// connection's first request) and, when the user database knows it,
/// admits it in a bucket of its own and serves it; else refuses it as
/// before.
async fn admit_after_lookup(
    stream: UnixStream,
    uid: u32,
    pid: Option<i32>,
    limiter: &Arc<Limiter>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let (groups, limits) = {
        let rt = shared.runtime.borrow();
        (Arc::clone(&rt.groups), rt.limits)
    };
    let lookup = shared.lookups.caller(
        uid,
        pid,
        &groups,
        limits.lookup_cache,
        limits.lookup_timeout,
    );
    let who = tokio::select! {
        w = lookup => w,
        () = stopped(&mut stop) => return,
    };
    let known = matches!(&who, lookups::Who::Known(c) if c.user.is_some());
    let admitted = if known {
        limiter.admit(uid, true)
    } else {
        Err(LimitHit::Unlisted)
    };
    match admitted {
        Ok(admission) => {
            let _open = shared.metrics.open();
            connection::serve(stream, uid, pid, admission, Arc::clone(&shared), stop).await;
        }
        Err(hit) => refuse_connection(&shared, uid, pid, hit, known),
    }
}

/// Counts and logs a connection a limit refused (once per burst per uid:
/// uids without a passwd entry share one bucket, as they share one
/// connection limit; the count follows when the window ends); dropping the
/// stream closes it.
fn refuse_connection(shared: &Shared, uid: u32, pid: Option<i32>, hit: LimitHit, listed: bool) {
    shared.metrics.closed(hit);
    let kind = match hit {
        LimitHit::Total => &limits::TOTAL_REACHED,
        LimitHit::PerUser => &limits::PER_USER_REACHED,
        LimitHit::Unlisted => &limits::UNLISTED_REACHED,
    };
    let who = if listed { Who::Uid(uid) } else { Who::Unlisted };
    if shared.log.allow(kind, who) {
        tracing::warn!(
            "{}: closing new connection of uid={uid} pid={}",
            kind.name,
            pid.unwrap_or(0)
        );
    }
}

/// Loads the configuration at `path` again, on a blocking thread.
fn start_reload(path: &Path) -> tokio::task::JoinHandle<Result<Config>> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || Config::load(&path))
}

/// Puts a freshly loaded configuration in force (what a reload can change);
/// returns the configuration now current.
fn apply_reload(
    current: &Config,
    new: Config,
    limiter: &Limiter,
    runtime: &watch::Sender<Arc<Runtime>>,
) -> Config {
    let restart_only = [
        ("socket", current.socket != new.socket),
        ("agent", current.agent != new.agent),
        ("log", current.log != new.log),
        (
            "limits.max_connections",
            current.limits.max_connections != new.limits.max_connections,
        ),
        ("state_dir", current.state_dir != new.state_dir),
        ("[pkcs11]", current.pkcs11 != new.pkcs11),
        ("[openbao]", current.openbao != new.openbao),
        (
            // A backend that looks its keys up when it starts (a token's
            // objects, transit keys) serves the keys it started with.
            "the keys the backend looks up at start",
            new.agent.backend.looks_keys_up_at_start() && key_set(current) != key_set(&new),
        ),
    ];
    for (field, changed) in restart_only {
        if changed {
            tracing::warn!("{field} changed: takes effect at the next restart, not on reload");
        }
    }
    limiter.set_max_per_user(new.limits.max_connections_per_user);
    runtime.send_replace(Arc::new(Runtime::from(&new)));
    tracing::info!(
        "configuration reloaded from {}: {} key(s): {}",
        new.path.display(),
        new.keys.len(),
        key_names(&new)
    );
    let mut kept = new;
    kept.socket = current.socket.clone();
    kept.agent = current.agent.clone();
    kept.log = current.log;
    kept.limits.max_connections = current.limits.max_connections;
    kept.state_dir = current.state_dir.clone();
    kept
}

pub use crate::shutdown::stopped;

/// Each key's name, public key and where the backend finds it.
fn key_set(config: &Config) -> Vec<(&str, &ssh_key::public::KeyData, Option<&str>)> {
    config
        .keys
        .iter()
        .map(|k| (k.name.as_str(), &k.public_key, k.transit_key.as_deref()))
        .collect()
}

fn key_names(config: &Config) -> String {
    if config.keys.is_empty() {
        return "none".to_owned();
    }
    config
        .keys
        .iter()
        .map(|k| k.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn signal_stream(kind: SignalKind) -> Result<tokio::signal::unix::Signal> {
    signal(kind).map_err(|e| Error::msg(format!("cannot install signal handler: {e}")))
}

/// Fails with "already running (pid N)" when something answers on the
/// proxy socket or, with `agent.spawn`, on `agent.socket`.
fn refuse_if_running(config: &Config) -> Result<()> {
    if let Ok(live @ Probe::Live { .. }) = sockets::probe(&config.socket) {
        return Err(Error::msg(format!(
            "keyholder is already running ({}): {} answers; not starting a second daemon",
            live.pid_text(),
            config.socket.display()
        )));
    }
    if config.agent.spawn {
        if let Ok(live @ Probe::Live { .. }) = sockets::probe(&config.agent.socket) {
            return Err(Error::msg(format!(
                "already running ({}): an agent answers on agent.socket {}; not starting \
                 another (is another keyholder daemon running with this configuration?)",
                live.pid_text(),
                config.agent.socket.display()
            )));
        }
    }
    Ok(())
}
