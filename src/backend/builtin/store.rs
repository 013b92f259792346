//! The builtin backend's keys: in the order they were added (as OpenSSH's
//! agent lists them), each with its comment and optional expiry.
//!
//! Expired keys are never listed or used; the reaper ([`KeyStore::reap`],
//! called twice a second) drops them (zeroizing them once no signature in
//! progress holds them). The store only holds keys; it never signs, logs
//! or decides.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ssh_key::public::KeyData;

use super::key::HeldKey;

/// One held key.
#[derive(Debug)]
struct Entry {
    key: Arc<HeldKey>,
    comment: String,
    expires: Option<Instant>,
}

impl Entry {
    fn live(&self, now: Instant) -> bool {
        self.expires.is_none_or(|t| t > now)
    }
}

/// What [`KeyStore::add`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Added {
    /// A new key.
    New,
    /// The key was held already: its comment and lifetime were replaced.
    Replaced,
}

/// The keys, shared by the admin socket, the proxy's sign path and the reaper.
#[derive(Debug, Default)]
pub struct KeyStore {
    entries: Mutex<Vec<Entry>>,
}

impl KeyStore {
    fn lock(&self) -> MutexGuard<'_, Vec<Entry>> {
        // A panic while holding the lock cannot leave the list half-changed
        // (every change is one Vec operation), so a poisoned lock is usable.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a key, or replaces the comment and lifetime of the same key (as
    /// OpenSSH does). `lifetime` None: until removed.
    pub fn add(&self, key: HeldKey, comment: String, lifetime: Option<Duration>) -> Added {
        let expires = lifetime.map(|l| Instant::now() + l);
        let mut entries = self.lock();
        if let Some(e) = entries.iter_mut().find(|e| e.key.public() == key.public()) {
            e.comment = comment;
            e.expires = expires;
            return Added::Replaced;
        }
        entries.push(Entry {
            key: Arc::new(key),
            comment,
            expires,
        });
        Added::New
    }

    /// The public keys and comments, in the order added.
    pub fn list(&self) -> Vec<(KeyData, String)> {
        let now = Instant::now();
        self.lock()
            .iter()
            .filter(|e| e.live(now))
            .map(|e| (e.key.public().clone(), e.comment.clone()))
            .collect()
    }

    /// The key with this public half, for signing.
    pub fn get(&self, public: &KeyData) -> Option<Arc<HeldKey>> {
        let now = Instant::now();
        self.lock()
            .iter()
            .find(|e| e.live(now) && e.key.public() == public)
            .map(|e| Arc::clone(&e.key))
    }

    /// Removes one key; false if it was not held.
    pub fn remove(&self, public: &KeyData) -> bool {
        let mut entries = self.lock();
        let before = entries.len();
        entries.retain(|e| e.key.public() != public);
        entries.len() != before
    }

    /// Removes every key; returns how many there were.
    pub fn remove_all(&self) -> usize {
        let mut entries = self.lock();
        let n = entries.len();
        entries.clear();
        entries.shrink_to_fit();
        n
    }

    /// How many keys are held (and not expired).
    pub fn len(&self) -> usize {
        let now = Instant::now();
        self.lock().iter().filter(|e| e.live(now)).count()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops expired keys; returns the public keys dropped, and when the
    /// next key expires.
    pub fn reap(&self) -> (Vec<(KeyData, String)>, Option<Instant>) {
        let mut entries = self.lock();
        let now = Instant::now();
        let mut gone = Vec::new();
        entries.retain(|e| {
            let keep = e.live(now);
            if !keep {
                gone.push((e.key.public().clone(), e.comment.clone()));
            }
            keep
        });
        let next = entries.iter().filter_map(|e| e.expires).min();
        (gone, next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ssh_key::private::{Ed25519Keypair, KeypairData};

    fn key(seed: u8) -> HeldKey {
        HeldKey::new(&KeypairData::Ed25519(Ed25519Keypair::from_seed(
            &[seed; 32],
        )))
        .unwrap()
    }

    #[test]
    fn keys_are_listed_in_order_replaced_in_place_and_removed() {
        let store = KeyStore::default();
        assert_eq!(store.add(key(1), "one".into(), None), Added::New);
        assert_eq!(store.add(key(2), "two".into(), None), Added::New);
        assert_eq!(store.add(key(1), "uno".into(), None), Added::Replaced);
        let list = store.list();
        assert_eq!(
            list.iter().map(|(_, c)| c.as_str()).collect::<Vec<_>>(),
            ["uno", "two"]
        );
        let one = list[0].0.clone();
        assert!(store.get(&one).is_some());
        assert!(store.remove(&one));
        assert!(!store.remove(&one));
        assert!(store.get(&one).is_none());
        assert_eq!(store.remove_all(), 1);
        assert!(store.is_empty());
    }

    #[test]
    fn an_expired_key_is_never_used_and_the_reaper_drops_it() {
        let store = KeyStore::default();
        store.add(key(1), "short".into(), Some(Duration::from_millis(30)));
        store.add(key(2), "long".into(), Some(Duration::from_secs(3600)));
        store.add(key(3), "forever".into(), None);
        let short = store.list()[0].0.clone();
        assert_eq!(store.len(), 3);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(store.len(), 2);
        assert!(store.get(&short).is_none());
        let (gone, next) = store.reap();
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].1, "short");
        assert!(next.is_some_and(|t| t > Instant::now()));
        // Adding the expired key again makes it new, with a new lifetime.
        assert_eq!(store.add(key(1), "again".into(), None), Added::New);
        assert_eq!(store.len(), 3);
    }
}
