//! The agent wire protocol, as far as the proxy needs it: it turns bytes into
//! typed requests and typed answers back into bytes.
//!
//! - [`frame`]: length-prefixed framing with the 256 KiB cap; nothing beyond
//!   the cap is ever buffered.
//! - [`request`]: classification by type byte, then parsing of the only bodies
//!   the proxy acts on (list, sign, extension). Admin requests are recognised
//!   by their type byte alone: a private key in an add request is never decoded.
//! - [`userauth`]: parsing of the data in a sign request, to tell an SSH
//!   user-authentication request from anything else.
//! - [`session_bind`]: parsing of `session-bind@openssh.com` (host key or
//!   host certificate, session id, signature, forwarding flag).
//! - [`response`]: encoding answers to the client.
//! - [`status`]: the `status@keyholder` vendor extension's payload.
//! - [`grants`]: the `grant-…@keyholder` vendor extensions.
//! - [`wire`]: `string` and `mpint` written and read by hand.
//!
//! Message types and bodies are ssh-agent-lib's; this module adds the parts
//! its codec lacks (the length cap, strict trailing-byte checks).

pub mod frame;
pub mod grants;
pub mod request;
pub mod response;
pub mod session_bind;
pub mod status;
pub mod userauth;
pub mod wire;

pub use frame::{read_frame, FrameError, MAX_MESSAGE_LEN};
pub use request::{classify, AdminOp, Request};
