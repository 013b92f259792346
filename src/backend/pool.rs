//! A bounded pool of blocking worker threads, shared by the in-process
//! backends (the builtin backend's signers, the PKCS#11 backend's token
//! sessions), so that no private-key or token operation ever runs on the
//! async runtime's threads.
//!
//! Each worker thread owns a handler made for it when the pool starts (so a
//! worker may keep state of its own, such as a PKCS#11 session, that never
//! moves between threads). The queue is bounded: a request first takes a
//! slot (jobs queued or running never exceed the capacity), waiting for one
//! while the pool is full: backpressure, never unbounded memory. Taking the
//! slot and getting the answer share one deadline; a request that misses it
//! gets [`PoolError::Busy`] or [`PoolError::Timeout`], and a job whose
//! requester has given up is skipped. The pool never decides or logs
//! anything.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

/// Why no answer came back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolError {
    /// Every slot stayed taken until the deadline.
    Busy,
    /// A slot was taken but the answer did not come in time.
    Timeout,
    /// The pool has stopped.
    Stopped,
}

impl std::fmt::Display for PoolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Busy => f.write_str("work queue full until the timeout"),
            Self::Timeout => f.write_str("answer not made in time"),
            Self::Stopped => f.write_str("worker pool stopped"),
        }
    }
}

struct Job<T, R> {
    input: T,
    reply: oneshot::Sender<R>,
    /// Released when the job is done (or dropped): frees the slot.
    slot: OwnedSemaphorePermit,
}

/// The worker threads and their bounded queue: each job is a `T`, each
/// answer an `R`.
pub struct Pool<T, R> {
    slots: Arc<Semaphore>,
    queue: Mutex<Option<mpsc::Sender<Job<T, R>>>>,
    workers: usize,
    capacity: usize,
}

impl<T, R> std::fmt::Debug for Pool<T, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("workers", &self.workers)
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl<T: Send + 'static, R: Send + 'static> Pool<T, R> {
    /// Starts `workers` threads named `NAME-i`, each running the handler
    /// `make(i)` returns (made on the new thread); at most `capacity` jobs
    /// (≥ workers) are queued or running at once. A handler's input is
    /// dropped before its answer is sent.
    pub fn start<F, H>(
        name: &str,
        workers: usize,
        capacity: usize,
        make: F,
    ) -> std::io::Result<Self>
    where
        F: Fn(usize) -> H + Send + Sync + 'static,
        H: FnMut(T) -> R,
    {
        let workers = workers.max(1);
        let capacity = capacity.max(workers);
        let (tx, rx) = mpsc::channel::<Job<T, R>>();
        let rx = Arc::new(Mutex::new(rx));
        let make = Arc::new(make);
        for i in 0..workers {
            let rx = Arc::clone(&rx);
            let make = Arc::clone(&make);
            std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .stack_size(256 * 1024)
                .spawn(move || {
                    let handler = make(i);
                    drop(make);
                    worker(&rx, handler);
                })?;
        }
        Ok(Self {
            slots: Arc::new(Semaphore::new(capacity)),
            queue: Mutex::new(Some(tx)),
            workers,
            capacity,
        })
    }

    /// Worker threads.
    pub fn workers(&self) -> usize {
        self.workers
    }

    /// Jobs queued or running at most.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Runs `input` on a worker thread, within `deadline` (queueing
    /// included).
    pub async fn run(&self, input: T, deadline: Duration) -> Result<R, PoolError> {
        let until = tokio::time::Instant::now() + deadline;
        let slot =
            match tokio::time::timeout_at(until, Arc::clone(&self.slots).acquire_owned()).await {
                Ok(Ok(slot)) => slot,
                Ok(Err(_)) => return Err(PoolError::Stopped),
                Err(_) => return Err(PoolError::Busy),
            };
        let (reply, answer) = oneshot::channel();
        let job = Job { input, reply, slot };
        let sent = self
            .queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|q| q.send(job).is_ok());
        if !sent {
            return Err(PoolError::Stopped);
        }
        match tokio::time::timeout_at(until, answer).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(_)) => Err(PoolError::Stopped),
            Err(_) => Err(PoolError::Timeout),
        }
    }

    /// Stops taking jobs; the workers finish the queued ones and exit
    /// (dropping their handlers).
    pub fn stop(&self) {
        self.slots.close();
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    /// Takes `n` slots as if `n` jobs were running (tests of a full queue).
    #[cfg(test)]
    pub(crate) fn hold(&self, n: u32) -> Option<OwnedSemaphorePermit> {
        Arc::clone(&self.slots).try_acquire_many_owned(n).ok()
    }
}

impl<T, R> Drop for Pool<T, R> {
    fn drop(&mut self) {
        self.slots.close();
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

fn worker<T, R>(rx: &Mutex<mpsc::Receiver<Job<T, R>>>, mut handler: impl FnMut(T) -> R) {
    loop {
        let job = {
            let rx = rx.lock().unwrap_or_else(|e| e.into_inner());
            rx.recv()
        };
        let Ok(Job { input, reply, slot }) = job else {
            return;
        };
        // The requester gave up (timeout, closed connection): skip the work.
        if reply.is_closed() {
            continue;
        }
        let answer = handler(input);
        // The slot goes before the answer, so that whoever gets it finds the
        // slot free.
        drop(slot);
        let _ = reply.send(answer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_queue_is_busy_until_the_deadline_then_serves_again() {
        let pool = Pool::start("t", 2, 3, |_| |x: u32| x * 2).unwrap();
        assert_eq!((pool.workers(), pool.capacity()), (2, 3));
        assert_eq!(pool.run(2, Duration::from_secs(5)).await, Ok(4));
        let held = pool.hold(3).unwrap();
        let busy = pool.run(1, Duration::from_millis(50)).await;
        assert_eq!(busy, Err(PoolError::Busy));
        let waiter = pool.run(3, Duration::from_secs(5));
        let release = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(held);
        };
        let (done, ()) = tokio::join!(waiter, release);
        assert_eq!(done, Ok(6));
        pool.stop();
        assert_eq!(
            pool.run(1, Duration::from_secs(1)).await,
            Err(PoolError::Stopped)
        );
    }

    #[tokio::test]
    async fn each_worker_keeps_its_own_state() {
        let pool = Pool::start("t", 1, 4, |i| {
            let mut calls = 0u32;
            move |_: ()| {
                calls += 1;
                (i, calls)
            }
        })
        .unwrap();
        assert_eq!(pool.run((), Duration::from_secs(5)).await, Ok((0, 1)));
        assert_eq!(pool.run((), Duration::from_secs(5)).await, Ok((0, 2)));
    }

    #[test]
    fn capacity_is_at_least_the_number_of_workers() {
        let pool = Pool::start("t", 3, 1, |_| |(): ()| ()).unwrap();
        assert_eq!(pool.capacity(), 3);
        let pool = Pool::start("t", 0, 0, |_| |(): ()| ()).unwrap();
        assert_eq!((pool.workers(), pool.capacity()), (1, 1));
    }
}
