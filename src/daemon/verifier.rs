//! Where session bindings are verified: off the async runtime's threads, at
//! most [`PER_UID`] at once per uid and a few at once in all, so one user
//! flooding bindings (RSA-16384, say) waits for itself and does not slow
//! another user's signing. Wiring only: the check is `crate::verify`, the
//! decision `crate::policy`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;

use crate::policy::destinations::Binding;
use crate::protocol::session_bind::SessionBind;

/// Verifications one uid may have running or queued for a thread at once.
pub const PER_UID: usize = 2;

/// The verification slots of the daemon.
#[derive(Debug)]
pub struct Verifier {
    all: Arc<Semaphore>,
    per_uid: Mutex<HashMap<u32, Arc<Semaphore>>>,
}

impl Default for Verifier {
    fn default() -> Self {
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        Self {
            all: Arc::new(Semaphore::new(threads.max(2))),
            per_uid: Mutex::new(HashMap::new()),
        }
    }
}

impl Verifier {
    /// Verifies `bind` for `uid` on a blocking thread, once a slot is free.
    pub async fn verify(&self, uid: u32, bind: Box<SessionBind>) -> Result<Binding, &'static str> {
        let mine = {
            let mut map = self.per_uid.lock().unwrap_or_else(|e| e.into_inner());
            Arc::clone(
                map.entry(uid)
                    .or_insert_with(|| Arc::new(Semaphore::new(PER_UID))),
            )
        };
        let result = async {
            // The uid's own slot first: a flooding uid queues behind itself,
            // holding at most PER_UID of the shared slots.
            let _own = mine.acquire().await.map_err(|_| "shutting down")?;
            let _shared = self.all.acquire().await.map_err(|_| "shutting down")?;
            tokio::task::spawn_blocking(move || crate::verify::binding(&bind))
                .await
                .unwrap_or(Err("verification failed to run"))
        }
        .await;
        let mut map = self.per_uid.lock().unwrap_or_else(|e| e.into_inner());
        // Only the map and this call hold it: nobody else is waiting.
        if Arc::strong_count(&mine) == 2 {
            map.remove(&uid);
        }
        result
    }
}
