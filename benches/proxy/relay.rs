//! The floor of any proxy on this machine: a relay that only copies agent
//! messages between a client and the agent, with nothing of keyholder's
//! (no caller lookup, no policy, no parsing beyond the length, no audit
//! line, no pooling: one upstream connection per client, as the client
//! itself would have). Plain blocking std threads, one per connection, two
//! reads and two writes per request: less work than any real proxy can do.
//!
//! It runs as bench user a (the agent's owner) in the agent's directory, a
//! worker of this binary (`relay` mode), and is measured against the agent
//! direct in interleaved windows of its own. It is a yardstick, never a product: it must
//! not grow anything a proxy would need.

use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Where the relay listens and what it relays to.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RelaySpec {
    pub listen: PathBuf,
    pub upstream: PathBuf,
}

/// OpenSSH's message size limit.
const MAX_MESSAGE: usize = 256 * 1024;

/// Accepts until killed.
pub fn serve(spec: &RelaySpec) -> io::Result<()> {
    let _ = std::fs::remove_file(&spec.listen);
    let listener = UnixListener::bind(&spec.listen)?;
    std::fs::set_permissions(&spec.listen, std::fs::Permissions::from_mode(0o600))?;
    for client in listener.incoming() {
        let Ok(client) = client else { continue };
        let upstream = spec.upstream.clone();
        std::thread::Builder::new()
            .stack_size(128 * 1024)
            .spawn(move || {
                if let Ok(agent) = UnixStream::connect(&upstream) {
                    let _ = relay(client, agent);
                }
            })?;
    }
    Ok(())
}

/// Request, answer, request, answer… until either side closes.
fn relay(mut client: UnixStream, mut agent: UnixStream) -> io::Result<()> {
    let mut buf = vec![0u8; 4096];
    loop {
        if !copy_message(&mut client, &mut agent, &mut buf)? {
            return Ok(());
        }
        if !copy_message(&mut agent, &mut client, &mut buf)? {
            return Ok(());
        }
    }
}

/// Copies one framed message; false at a clean end of input.
fn copy_message(from: &mut UnixStream, to: &mut UnixStream, buf: &mut Vec<u8>) -> io::Result<bool> {
    let mut filled = 0;
    loop {
        let n = from.read(&mut buf[filled..])?;
        if n == 0 {
            return Ok(false);
        }
        filled += n;
        if filled < 4 {
            continue;
        }
        let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len > MAX_MESSAGE {
            return Err(io::Error::other("message too long"));
        }
        let total = 4 + len;
        if buf.len() < total {
            buf.resize(total, 0);
        }
        if filled >= total {
            to.write_all(&buf[..filled])?;
            return Ok(true);
        }
    }
}
