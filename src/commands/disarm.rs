//! `keyholder disarm`: removes every identity from the upstream agent
//! (REMOVE_ALL_IDENTITIES on `agent.socket`, never through the proxy). Root
//! only. Exit 0 when the agent confirmed, 1 otherwise.

use std::path::Path;

use ssh_agent_lib::proto::{Request, Response};

use super::client::{describe, AgentClient};
use crate::config::Config;
use crate::error::{Error, Result};

/// Removes every identity from the upstream agent.
pub fn run(config_path: &Path) -> Result<u8> {
    crate::require_root("disarm")?;
    let config = Config::load(config_path)?;
    if config.agent.backend == crate::config::BackendKind::Pkcs11 {
        return super::token::disarm(&config);
    }
    let socket = config.agent.socket.display();
    let mut client = AgentClient::connect(&config.agent.socket, config.limits.upstream_timeout)
        .map_err(|e| {
            Error::msg(format!(
                "upstream agent unreachable at {socket}: {e} (is `keyholder daemon` running?)"
            ))
        })?;
    // How many there were, for the message; not needed for the removal.
    let before = match client.call(&Request::RequestIdentities) {
        Ok(Response::IdentitiesAnswer(ids)) => Some(ids.len()),
        _ => None,
    };
    match client.call(&Request::RemoveAllIdentities) {
        Ok(Response::Success) => {
            match before {
                Some(n) => {
                    say!("disarmed: removed {n} identities from the upstream agent at {socket}")
                }
                None => {
                    say!("disarmed: removed all identities from the upstream agent at {socket}")
                }
            }
            Ok(0)
        }
        Ok(other) => Err(Error::msg(format!(
            "the upstream agent at {socket} answered {} to removing all identities (is it locked?)",
            describe(&other)
        ))),
        Err(e) => Err(Error::msg(format!(
            "removing all identities from the upstream agent at {socket} failed: {e}"
        ))),
    }
}
