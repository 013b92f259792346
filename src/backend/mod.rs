//! Everything that holds or reaches the keys.
//!
//! - [`upstream`]: one client connection to the upstream agent (ssh-agent-lib's
//!   client), opened lazily, with a timeout on every answer.
//! - [`supervisor`]: starts OpenSSH's `ssh-agent` when `agent.spawn = true`,
//!   restarts it when it dies, stops it on exit.
//! - [`builtin`]: the in-process backend: keyholder holds the keys, signs on
//!   a thread pool and serves `agent.socket` itself.

pub mod builtin;
pub mod supervisor;
pub mod upstream;

pub use upstream::{Upstream, UpstreamError};
