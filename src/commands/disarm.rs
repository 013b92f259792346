//! `keyholder disarm`: takes the keys away from the backend, as the
//! configuration describes ([`crate::config::arming`]): for a backend
//! unlocked with a smartcard PIN, SSH_AGENTC_REMOVE_SMARTCARD_KEY (the
//! daemon logs out and forgets the PIN, [`super::unlock`]); otherwise
//! every identity is removed from the agent on `agent.socket`
//! (REMOVE_ALL_IDENTITIES, never through the proxy). Root only. Exit 0 when
//! the agent confirmed, 1 otherwise.

use std::path::Path;

use ssh_agent_lib::proto::{Request, Response};

use super::client::{describe, AgentClient};
use crate::config::arming::{Arming, Secret, Unlock};
use crate::config::Config;
use crate::error::{Error, Result};

/// Takes the keys away from the backend.
pub fn run(config_path: &Path) -> Result<u8> {
    crate::require_root("disarm")?;
    let config = Config::load(config_path)?;
    if let Arming::Secret(Secret {
        send: Unlock::Smartcard { id },
        ..
    }) = config.arming()?
    {
        return super::unlock::disarm_smartcard(&config, &id);
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
