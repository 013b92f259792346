//! Listing flights: how REQUEST_IDENTITIES (and `status@keyholder`) reach
//! the agent. At most [`LIST_FLIGHTS`] listings are in flight upstream at
//! once; a list request is answered by the kept answer of a flight sent at
//! most [`LIST_FRESH`] before it arrived, or by a flight that started after
//! it arrived. An add or remove sent through the backend forgets the kept
//! answer.
//!
//! Never: keeps an error as an answer, keeps a listing sent before a change
//! finished, or lets a waiter outlive the call's deadline.

use std::sync::PoisonError;

use ssh_agent_lib::proto::{Identity, Request};
use tokio::sync::watch;
use tokio::time::{timeout_at, Instant};

use super::{parse_identities, parse_success, UpstreamBackend, LIST_FLIGHTS};
use crate::backend::BackendError;

/// The listing flights (see [`UpstreamBackend::list`]).
#[derive(Debug, Default)]
pub(super) struct Lists {
    /// Flights started so far; the n-th is numbered n.
    pub(super) started: u64,
    /// The newest flight's number and where its answer appears.
    pub(super) newest: Option<(u64, watch::Receiver<Option<ListAnswer>>)>,
    /// Flights not yet ended.
    pub(super) in_flight: usize,
    /// The answer of the newest flight (by start) that answered with a
    /// list, and when that flight started.
    pub(super) fresh: Option<(Instant, Vec<Identity>)>,
    /// Flights numbered up to this one started before the last add or
    /// remove this backend sent: their answers are never kept as fresh.
    pub(super) stale_through: u64,
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
pub(super) type ListAnswer = Result<Vec<Identity>, BackendError>;

impl UpstreamBackend {
    /// REQUEST_IDENTITIES: the kept answer if its flight was sent at most
    /// [`LIST_FRESH`] before this call began, else the answer of a flight
    /// that started after it began: the newest one if it did, else one of
    /// its own if fewer than [`LIST_FLIGHTS`] are in flight, else the next
    /// one to start.
    pub(super) async fn list(&self) -> Result<Vec<Identity>, BackendError> {
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
    pub(super) fn keep_fresh(&self, number: u64, started: Instant, ids: &[Identity]) {
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
    pub(super) async fn change(&self, request: &Request) -> Result<(), BackendError> {
        let done = self.call(request, parse_success).await;
        self.forget_fresh();
        done
    }

    /// Forgets the kept answer, and keeps none of the flights sent so far:
    /// an add or remove was just sent, the agent's keys may have changed.
    pub(super) fn forget_fresh(&self) {
        let mut lists = self.lock_lists();
        lists.fresh = None;
        lists.stale_through = lists.started;
    }

    pub(super) fn lock_lists(&self) -> std::sync::MutexGuard<'_, Lists> {
        self.lists.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A copy of a listing flight's answer for one of the callers it serves.
pub(super) fn duplicate(answer: &ListAnswer) -> ListAnswer {
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
