//! The builtin backend's signing pool: the shared worker pool
//! ([`crate::backend::pool`]) with one thread per core by default, each
//! signing with the key a job carries, so that no private-key operation ever
//! runs on the async runtime's threads. The pool never decides or logs
//! anything.

use std::sync::Arc;
use std::time::Duration;

use super::key::{HeldKey, SignFailed};
use crate::backend::pool;

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

type Job = (Arc<HeldKey>, Vec<u8>, u32);

/// The signing threads and their bounded queue.
#[derive(Debug)]
pub struct Pool(pool::Pool<Job, Result<Vec<u8>, SignFailed>>);

impl Pool {
    /// Starts `workers` threads; at most `capacity` jobs (≥ workers) are
    /// queued or running at once.
    pub fn start(workers: usize, capacity: usize) -> std::io::Result<Self> {
        pool::Pool::start("keyholder-sign", workers, capacity, |_| {
            // The key (possibly removed meanwhile: this may be its last
            // reference) is dropped before the answer is sent.
            |(key, data, flags): Job| key.sign(&data, flags)
        })
        .map(Self)
    }

    /// Worker threads.
    pub fn workers(&self) -> usize {
        self.0.workers()
    }

    /// Jobs queued or running at most.
    pub fn capacity(&self) -> usize {
        self.0.capacity()
    }

    /// Signs on a worker thread, within `deadline` (queueing included).
    pub async fn sign(
        &self,
        key: Arc<HeldKey>,
        data: Vec<u8>,
        flags: u32,
        deadline: Duration,
    ) -> Result<Vec<u8>, PoolError> {
        match self.0.run((key, data, flags), deadline).await {
            Ok(Ok(sig)) => Ok(sig),
            Ok(Err(e)) => Err(PoolError::Failed(e)),
            Err(pool::PoolError::Busy) => Err(PoolError::Busy),
            Err(pool::PoolError::Timeout) => Err(PoolError::Timeout),
            Err(pool::PoolError::Stopped) => Err(PoolError::Stopped),
        }
    }

    /// Stops taking jobs; the workers finish the queued ones and exit.
    pub fn stop(&self) {
        self.0.stop();
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
    async fn signs_and_maps_a_full_queue_to_busy() {
        let pool = Pool::start(2, 3).unwrap();
        assert_eq!((pool.workers(), pool.capacity()), (2, 3));
        let ok = pool
            .sign(key(), b"x".to_vec(), 0, Duration::from_secs(5))
            .await;
        assert!(ok.is_ok());
        let held = pool.0.hold(3).unwrap();
        let busy = pool
            .sign(key(), b"x".to_vec(), 0, Duration::from_millis(50))
            .await;
        assert_eq!(busy, Err(PoolError::Busy));
        drop(held);
        pool.stop();
        let stopped = pool
            .sign(key(), b"z".to_vec(), 0, Duration::from_secs(1))
            .await;
        assert_eq!(stopped, Err(PoolError::Stopped));
    }
}
