//! The signing pool: a fixed set of OS threads (one per core by default)
//! that make every signature, so that no private-key operation ever runs on
//! the async runtime's threads.
//!
//! The queue is bounded: a request first takes a slot (jobs queued or being
//! signed never exceed the capacity), waiting for one while the pool is
//! full: backpressure, never unbounded memory. Taking the slot and getting
//! the signature share one deadline; a request that misses it gets
//! [`PoolError::Busy`] or [`PoolError::Timeout`], and a job whose requester
//! has given up is skipped. The pool never decides or logs anything.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use super::key::{HeldKey, SignFailed};

/// Why no signature came back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolError {
    /// Every slot stayed taken until the deadline.
    Busy,
    /// A slot was taken but the signature did not come in time.
    Timeout,
    /// OpenSSL refused to sign.
    Failed(SignFailed),
    /// The pool has stopped.
    Stopped,
}

impl std::fmt::Display for PoolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Busy => f.write_str("signing queue full until the timeout"),
            Self::Timeout => f.write_str("signature not made in time"),
            Self::Failed(e) => write!(f, "{e}"),
            Self::Stopped => f.write_str("signing pool stopped"),
        }
    }
}

struct Job {
    key: Arc<HeldKey>,
    data: Vec<u8>,
    flags: u32,
    reply: oneshot::Sender<Result<Vec<u8>, SignFailed>>,
    /// Released when the job is done (or dropped): frees the slot.
    _slot: OwnedSemaphorePermit,
}

/// The worker threads and their bounded queue.
pub struct Pool {
    slots: Arc<Semaphore>,
    queue: Mutex<Option<mpsc::Sender<Job>>>,
    workers: usize,
    capacity: usize,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("workers", &self.workers)
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

impl Pool {
    /// Starts `workers` threads; at most `capacity` jobs (≥ workers) are
    /// queued or running at once.
    pub fn start(workers: usize, capacity: usize) -> std::io::Result<Self> {
        let workers = workers.max(1);
        let capacity = capacity.max(workers);
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..workers {
            let rx = Arc::clone(&rx);
            std::thread::Builder::new()
                .name(format!("keyholder-sign-{i}"))
                .stack_size(256 * 1024)
                .spawn(move || worker(&rx))?;
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

    /// Signs on a worker thread, within `deadline` (queueing included).
    pub async fn sign(
        &self,
        key: Arc<HeldKey>,
        data: Vec<u8>,
        flags: u32,
        deadline: Duration,
    ) -> Result<Vec<u8>, PoolError> {
        let until = tokio::time::Instant::now() + deadline;
        let slot =
            match tokio::time::timeout_at(until, Arc::clone(&self.slots).acquire_owned()).await {
                Ok(Ok(slot)) => slot,
                Ok(Err(_)) => return Err(PoolError::Stopped),
                Err(_) => return Err(PoolError::Busy),
            };
        let (reply, answer) = oneshot::channel();
        let job = Job {
            key,
            data,
            flags,
            reply,
            _slot: slot,
        };
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
            Ok(Ok(Ok(sig))) => Ok(sig),
            Ok(Ok(Err(e))) => Err(PoolError::Failed(e)),
            Ok(Err(_)) => Err(PoolError::Stopped),
            Err(_) => Err(PoolError::Timeout),
        }
    }

    /// Stops taking jobs; the workers finish the queued ones and exit.
    pub fn stop(&self) {
        self.slots.close();
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.stop();
    }
}

fn worker(rx: &Mutex<mpsc::Receiver<Job>>) {
    loop {
        let job = {
            let rx = rx.lock().unwrap_or_else(|e| e.into_inner());
            rx.recv()
        };
        let Ok(Job {
            key,
            data,
            flags,
            reply,
            _slot: slot,
        }) = job
        else {
            return;
        };
        // The requester gave up (timeout, closed connection): skip the work.
        if reply.is_closed() {
            continue;
        }
        let result = key.sign(&data, flags);
        // The slot and the key (possibly removed meanwhile: this may be its
        // last reference) go before the answer, so that whoever gets it
        // finds the slot free.
        drop((slot, key));
        let _ = reply.send(result);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ssh_key::private::{Ed25519Keypair, KeypairData};

    fn key() -> Arc<HeldKey> {
        let kp = KeypairData::Ed25519(Ed25519Keypair::from_seed(&[5u8; 32]));
        Arc::new(HeldKey::new(&kp).unwrap())
    }

    #[tokio::test]
    async fn a_full_queue_is_busy_until_the_deadline_then_serves_again() {
        let pool = Pool::start(2, 3).unwrap();
        assert_eq!((pool.workers(), pool.capacity()), (2, 3));
        let ok = pool
            .sign(key(), b"x".to_vec(), 0, Duration::from_secs(5))
            .await;
        assert!(ok.is_ok());
        // Every slot taken (as by three signatures in progress).
        let held = Arc::clone(&pool.slots).try_acquire_many_owned(3).unwrap();
        let busy = pool
            .sign(key(), b"x".to_vec(), 0, Duration::from_millis(50))
            .await;
        assert_eq!(busy, Err(PoolError::Busy));
        // A waiter gets the first slot that frees up.
        let waiter = pool.sign(key(), b"y".to_vec(), 0, Duration::from_secs(5));
        let release = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(held);
        };
        let (signed, ()) = tokio::join!(waiter, release);
        assert!(signed.is_ok());
        pool.stop();
        let stopped = pool
            .sign(key(), b"z".to_vec(), 0, Duration::from_secs(1))
            .await;
        assert_eq!(stopped, Err(PoolError::Stopped));
    }

    #[test]
    fn capacity_is_at_least_the_number_of_workers() {
        let pool = Pool::start(3, 1).unwrap();
        assert_eq!(pool.capacity(), 3);
        let pool = Pool::start(0, 0).unwrap();
        assert_eq!((pool.workers(), pool.capacity()), (1, 1));
    }
}
