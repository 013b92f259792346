//! A shared event counter, for counts that one part of the program keeps and
//! another reports (the supervisor counts upstream restarts, the daemon's
//! metrics report them).
//!
//! It lives below `daemon/` and `backend/` so that neither depends on the
//! other for it. A counter only ever goes up, by one, without locking or
//! allocating; it must never carry anything but that number.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A count shared by its clones.
#[derive(Debug, Clone, Default)]
pub struct Counter(Arc<AtomicU64>);

impl Counter {
    /// Counts one event.
    pub fn add_one(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    /// The count so far.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_share_the_count() {
        let a = Counter::default();
        let b = a.clone();
        a.add_one();
        b.add_one();
        assert_eq!((a.get(), b.get()), (2, 2));
    }
}
