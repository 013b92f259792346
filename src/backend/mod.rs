//! Everything that talks to the upstream agent.
//!
//! - [`upstream`]: one client connection to the upstream agent (ssh-agent-lib's
//!   client), opened lazily, with a timeout on every answer.
//! - [`supervisor`]: starts OpenSSH's `ssh-agent` when `agent.spawn = true`,
//!   restarts it when it dies, stops it on exit.

pub mod supervisor;
pub mod upstream;

pub use upstream::{Upstream, UpstreamError};
