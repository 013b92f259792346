//! `keyholder arm`: arms the backend as the configuration describes
//! ([`crate::config::arming`]); a backend unlocked with one secret goes to
//! [`super::unlock`]. For key files (`--passphrase-file`), this decrypts the
//! configured keys found in `key_dir` and adds them to the upstream agent
//! (never through the proxy, which refuses additions for everyone). Root
//! only. An option meant for another backend (`--pin-file`,
//! `--secret-file`, `--passphrase-file`) is an error.
//!
//! For each configured key, in configuration order, then the certificate CA
//! (`[certificates] ca`), which is armed like a key:
//! - already loaded upstream (a certificate counts as its key): armed, no
//!   passphrase needed, nothing sent; so `arm` is idempotent;
//! - otherwise `key_dir/NAME` is checked (regular file, owned by root, no
//!   group/other permission bits), parsed, matched against the configured
//!   public key, refused if unencrypted while `require_encrypted`, decrypted,
//!   and added with ADD_IDENTITY (comment: the key's name).
//!
//! Before anything is sent, the peer of `agent.socket` must be root
//! (`SO_PEERCRED` uid 0): a socket someone else listens on gets no key.
//!
//! One passphrase serves every key it opens. From a file (option or systemd
//! credential) that is the only try; on the terminal, keys the first
//! passphrase did not open are asked for one by one (up to three times
//! each; an empty answer skips the key), and a passphrase that opens one of
//! them is tried on the others too.
//!
//! Passphrases and decrypted keys live in zeroizing memory (ssh-key's
//! private key types wipe themselves on drop; the ADD_IDENTITY message is
//! built in a zeroizing buffer by [`super::client`]). The process is hardened
//! first: no core dumps, not ptrace-able, memory locked where possible.

use std::path::Path;

use ssh_agent_lib::proto::{AddIdentity, PrivateCredential, Request, Response};
use ssh_key::PrivateKey;

use super::client::{describe, AgentClient};
use super::keyfile;
use super::passphrase::{Passphrase, Source, Tty};
use crate::config::arming::Arming;
use crate::config::{Config, KeyConfig};
use crate::error::{Error, Result};

/// Prompts per key after the first, shared one.
const TRIES_PER_KEY: usize = 3;

/// Where one key stands.
enum State {
    /// Loaded upstream before this run.
    AlreadyArmed,
    /// Parsed, still encrypted: needs a passphrase; why the last one tried
    /// did not open it.
    Locked(PrivateKey, Option<String>),
    /// Decrypted (or never encrypted): ready to add.
    Open(PrivateKey),
    /// Added by this run.
    Armed,
    /// Not armed, and why.
    Failed(String),
}

/// Arms every configured key; returns the exit code (0: all armed).
pub fn run(
    config_path: &Path,
    passphrase_file: Option<&Path>,
    pin_file: Option<&Path>,
    secret_file: Option<&Path>,
) -> Result<u8> {
    crate::require_root("arm")?;
    crate::hardening::apply()?;
    let mut config = Config::load(config_path)?;
    let arming = config.arming()?;
    // Each option names the file of one kind of backend; another's is an
    // error, not silently ignored.
    let mut file = None;
    for (flag, given) in [
        ("--passphrase-file", passphrase_file),
        ("--pin-file", pin_file),
        ("--secret-file", secret_file),
    ] {
        match given {
            Some(path) if flag == arming.flag() => file = Some(path),
            Some(_) => {
                return Err(Error::msg(format!(
                    "{flag} does not apply with agent.backend = \"{}\" (it is armed with {})",
                    config.agent.backend.name(),
                    arming.flag()
                )))
            }
            None => {}
        }
    }
    if let Arming::Secret(secret) = &arming {
        return super::unlock::arm(&config, secret, file);
    }
    // The certificate CA is armed with the keys, like one of them.
    config.keys = config.key_files();
    if config.keys.is_empty() {
        say!(
            "{}: no keys configured; nothing to arm",
            config.path.display()
        );
        return Ok(0);
    }

    let loaded = upstream_keys(&config)?;
    let mut states: Vec<State> = config
        .keys
        .iter()
        .map(|key| {
            if loaded.contains(&key.public_key) {
                State::AlreadyArmed
            } else {
                prepare(&config, key)
            }
        })
        .collect();

    if states.iter().any(|s| matches!(s, State::Locked(..))) {
        let source = Source::choose(file)?;
        unlock(&config, &mut states, &source);
    }

    if states.iter().any(|s| matches!(s, State::Open(_))) {
        add(&config, &mut states)?;
    }

    // What counts is what the agent holds now.
    let loaded = upstream_keys(&config)?;
    let mut failed = Vec::new();
    for (key, state) in config.keys.iter().zip(&states) {
        let armed = loaded.contains(&key.public_key);
        match state {
            State::AlreadyArmed if armed => say!("{}: already armed", key.name),
            State::Armed if armed => say!("{}: armed ({})", key.name, key.fingerprint),
            State::Failed(why) => say!("{}: FAILED: {why}", key.name),
            _ => say!(
                "{}: FAILED: the upstream agent does not hold it after arming",
                key.name
            ),
        }
        if !armed {
            failed.push(key.name.as_str());
        }
    }
    let total = config.keys.len();
    if failed.is_empty() {
        say!("all {total} key(s) armed");
        Ok(0)
    } else {
        say!(
            "{}/{total} key(s) armed; not armed: {}",
            total - failed.len(),
            failed.join(", ")
        );
        Ok(1)
    }
}

/// Connects to the upstream agent, with a message that says where and why
/// when it cannot. The agent must run as root (`SO_PEERCRED` of the
/// connection): decrypted keys are never sent to a socket someone else
/// listens on.
pub(super) fn connect(config: &Config) -> Result<AgentClient> {
    let socket = config.agent.socket.display();
    let client = AgentClient::connect(&config.agent.socket, config.limits.upstream_timeout)
        .map_err(|e| {
            Error::msg(format!(
                "upstream agent unreachable at {socket}: {e} (is `keyholder daemon` running?)"
            ))
        })?;
    match client.peer() {
        Ok((0, _)) => Ok(client),
        Ok((uid, pid)) => Err(Error::msg(format!(
            "the agent at {socket} runs as uid {uid} (pid {}), not root; refusing to send it \
             any key (check agent.socket)",
            pid.map_or_else(|| "unknown".to_owned(), |p| p.to_string())
        ))),
        Err(e) => Err(Error::msg(format!(
            "cannot tell who listens on {socket}: {e}; refusing to send it any key"
        ))),
    }
}

/// The public keys the upstream agent holds (a certificate as its key).
fn upstream_keys(config: &Config) -> Result<Vec<ssh_key::public::KeyData>> {
    let mut client = connect(config)?;
    let socket = config.agent.socket.display();
    match client.call(&Request::RequestIdentities) {
        Ok(Response::IdentitiesAnswer(ids)) => Ok(ids
            .into_iter()
            .map(|id| id.credential.key_data().clone())
            .collect()),
        Ok(other) => Err(Error::msg(format!(
            "upstream agent at {socket} answered {} to a request for its identities \
             (is it locked?)",
            describe(&other)
        ))),
        Err(e) => Err(Error::msg(format!("upstream agent at {socket}: {e}"))),
    }
}

/// Reads and checks one key file; the key is not decrypted yet.
fn prepare(config: &Config, key: &KeyConfig) -> State {
    let private = match keyfile::load(key) {
        Ok(p) => p,
        Err(e) => return State::Failed(e),
    };
    if private.is_encrypted() {
        State::Locked(private, None)
    } else if config.require_encrypted {
        State::Failed(format!(
            "{} is not encrypted and require_encrypted = true \
             (set a passphrase with: ssh-keygen -p -f {0})",
            key.private_key_path.display()
        ))
    } else {
        State::Open(private)
    }
}

/// Tries `passphrase` on every locked key; a key it does not open keeps
/// the reason.
fn try_all(states: &mut [State], passphrase: &Passphrase) {
    for state in states.iter_mut() {
        if let State::Locked(key, why) = state {
            match key.decrypt(passphrase) {
                Ok(open) => *state = State::Open(open),
                Err(ssh_key::Error::Crypto) => *why = Some("wrong passphrase".to_owned()),
                Err(e) => *why = Some(format!("cannot decrypt: {e}")),
            }
        }
    }
}

/// Turns every key still locked into a failure: the last reason, or `why`.
fn fail_locked(states: &mut [State], why: &str, origin: Option<&Path>) {
    for state in states.iter_mut() {
        if let State::Locked(_, last) = state {
            let reason = last.take().unwrap_or_else(|| why.to_owned());
            *state = State::Failed(match origin {
                Some(path) => format!("{reason} (from {})", path.display()),
                None => reason,
            });
        }
    }
}

/// Decrypts the locked keys with passphrases from `source`; what stays
/// locked becomes a failure.
fn unlock(config: &Config, states: &mut [State], source: &Source) {
    match source {
        Source::Fixed { passphrase, origin } => {
            try_all(states, passphrase);
            fail_locked(states, "wrong passphrase", Some(origin));
        }
        Source::Terminal(tty) => {
            if let Err(e) = ask(config, states, tty) {
                fail_locked(states, &format!("not decrypted: {e}"), None);
            }
            fail_locked(states, "no passphrase given", None);
        }
        Source::Unavailable(why) => {
            eprintln!("keyholder: {why}");
            fail_locked(
                states,
                "encrypted, and there is no passphrase source (see above)",
                None,
            );
        }
    }
}

/// The terminal dialogue: one shared prompt, then one key at a time.
fn ask(config: &Config, states: &mut [State], tty: &Tty) -> Result<()> {
    let locked: Vec<&str> = config
        .keys
        .iter()
        .zip(states.iter())
        .filter(|(_, s)| matches!(s, State::Locked(..)))
        .map(|(k, _)| k.name.as_str())
        .collect();
    if locked.len() > 1 {
        let passphrase = tty.prompt(&format!(
            "Passphrase for {} ({}): ",
            locked.join(", "),
            config.key_dir.display()
        ))?;
        try_all(states, &passphrase);
    }
    for (i, key) in config.keys.iter().enumerate() {
        for attempt in 0..TRIES_PER_KEY {
            if !matches!(states.get(i), Some(State::Locked(..))) {
                break;
            }
            let prompt = if attempt == 0 {
                format!(
                    "Passphrase for {} ({}): ",
                    key.name,
                    key.private_key_path.display()
                )
            } else {
                format!("Bad passphrase, try again for {}: ", key.name)
            };
            let passphrase = tty.prompt(&prompt)?;
            if passphrase.is_empty() {
                if let Some(State::Locked(_, why)) = states.get_mut(i) {
                    why.get_or_insert_with(|| "no passphrase given".to_owned());
                }
                break;
            }
            // A passphrase that opens this key may open others too.
            try_all(states, &passphrase);
        }
    }
    Ok(())
}

/// Adds every open key to the upstream agent, on one connection.
fn add(config: &Config, states: &mut [State]) -> Result<()> {
    let mut client = connect(config)?;
    for (key, state) in config.keys.iter().zip(states.iter_mut()) {
        let State::Open(private) = state else {
            continue;
        };
        let request = Request::AddIdentity(AddIdentity {
            credential: PrivateCredential::Key {
                privkey: private.key_data().clone(),
                comment: key.name.clone(),
            },
        });
        let result = client.call(&request);
        drop(request);
        *state = match result {
            Ok(Response::Success) => State::Armed,
            Ok(other) => State::Failed(format!(
                "the upstream agent at {} answered {} to adding it",
                config.agent.socket.display(),
                describe(&other)
            )),
            Err(e) => State::Failed(format!(
                "adding it to the upstream agent at {} failed: {e}",
                config.agent.socket.display()
            )),
        };
    }
    Ok(())
}
