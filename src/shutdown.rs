//! The daemon-wide shutdown signal, shared by `daemon/` and `backend/`.
//!
//! It lives below both so that neither depends on the other for it. It only
//! carries "stop now"; it must never grow into a place for other state.

use tokio::sync::watch;

/// Resolves when the shutdown signal has been given (or its sender is gone).
pub async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|&stop| stop).await;
}
