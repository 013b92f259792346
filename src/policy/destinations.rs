//! Where a key may be used: the destination, remote-user and forwarding
//! rules, over a connection's session bindings (OpenSSH's ssh-agent.c
//! `process_ext_session_bind`, `process_sign_request2` and
//! `identity_permitted`, 9.6 or later, with a key's destinations file in
//! place of `ssh-add -h`).
//!
//! Pure: it takes facts (bindings whose signatures were already verified,
//! whether a binding failed, the parsed user-auth request, the key's rules,
//! the time) and returns decisions. It never verifies a signature, reads a
//! file or looks at a clock.

use std::sync::Arc;

use ssh_key::public::KeyData;

use super::Reason;
use crate::known_hosts::KnownHosts;
use crate::protocol::userauth::UserAuth;

/// OpenSSH's `AGENT_MAX_SESSION_IDS`.
pub const MAX_BINDINGS: usize = 16;

/// A host certificate's facts, its CA signature already verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostCert {
    /// The CA key that signed it.
    pub ca: KeyData,
    /// Whether it is a host (not a user) certificate.
    pub host: bool,
    /// Valid from (Unix seconds, inclusive).
    pub valid_after: u64,
    /// Valid until (Unix seconds, exclusive).
    pub valid_before: u64,
}

/// One verified binding: the host key signed the session identifier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    /// The host key blob as bound (a plain key or a certificate).
    pub host_key_blob: Vec<u8>,
    /// The plain host key (the certified key, for a certificate).
    pub key: KeyData,
    /// `SHA256:…` of [`Binding::key`] (the audit line's `dest=`).
    pub fingerprint: String,
    /// The certificate's facts, when the host key is a certificate.
    pub cert: Option<HostCert>,
    /// The session identifier.
    pub session_id: Vec<u8>,
    /// Bound for agent forwarding.
    pub forwarding: bool,
}

/// A connection's bindings: per client connection, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bindings {
    list: Vec<Binding>,
    /// A binding failed (malformed, bad signature, out of order, or not
    /// verified because the caller may use no key).
    failed: bool,
    /// A failed binding said it was for forwarding, or its flag could not
    /// be read: it may have been, so it counts as one.
    failed_forwarding: bool,
}

/// A new binding, before its signature is verified.
#[derive(Debug, Clone, Copy)]
pub struct Proposed<'a> {
    /// The host key blob.
    pub host_key_blob: &'a [u8],
    /// The session identifier.
    pub session_id: &'a [u8],
}

impl Bindings {
    /// The verified bindings, oldest first.
    pub fn list(&self) -> &[Binding] {
        &self.list
    }

    /// The binding made last.
    pub fn last(&self) -> Option<&Binding> {
        self.list.last()
    }

    /// Whether some binding failed.
    pub fn failed(&self) -> bool {
        self.failed
    }

    /// Whether a verified binding is for forwarding.
    pub fn forwarded(&self) -> bool {
        self.list.iter().any(|b| b.forwarding)
    }

    /// Whether the connection may be a forwarded one: a verified forwarding
    /// binding, or a failed binding that may have been one.
    pub fn maybe_forwarded(&self) -> bool {
        self.forwarded() || self.failed_forwarding
    }

    /// Remembers a failed binding; `forwarding` is its flag, `None` when it
    /// could not be read.
    pub fn fail(&mut self, forwarding: Option<bool>) {
        self.failed = true;
        if forwarding != Some(false) {
            self.failed_forwarding = true;
        }
    }

    /// Whether `new` may be recorded, judged before its signature is
    /// verified (so an out-of-order binding costs no verification): not
    /// after a non-forwarding binding, a session id not already bound to
    /// another key, at most [`MAX_BINDINGS`].
    pub fn check(&self, new: Proposed<'_>) -> Result<(), &'static str> {
        for b in &self.list {
            if !b.forwarding {
                return Err("binding after a non-forwarding binding");
            }
            if b.session_id == new.session_id {
                return if b.host_key_blob == new.host_key_blob {
                    Ok(())
                } else {
                    Err("session identifier already bound to another host key")
                };
            }
        }
        if self.list.len() >= MAX_BINDINGS {
            return Err("too many bindings");
        }
        Ok(())
    }

    /// Records a verified binding that passed [`Bindings::check`]; the
    /// same session id and key again are recorded once.
    pub fn record(&mut self, binding: Binding) -> Result<(), &'static str> {
        self.check(Proposed {
            host_key_blob: &binding.host_key_blob,
            session_id: &binding.session_id,
        })?;
        let known = self.list.iter().any(|b| {
            b.session_id == binding.session_id && b.host_key_blob == binding.host_key_blob
        });
        if !known {
            self.list.push(binding);
        }
        Ok(())
    }
}

/// A key's destination rules (all optional).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules {
    /// The host keys and CAs it may be used towards.
    pub destinations: Option<Arc<KnownHosts>>,
    /// The remote user names the user-auth request may name.
    pub remote_users: Option<Vec<String>>,
    /// May be used on a connection with a forwarding binding.
    pub allow_forwarding: bool,
}

/// Whether a sign request may go ahead under `rules`, on a connection with
/// `bindings`; `auth` is the parsed user-auth request (`None` when the data
/// is not one, for `allow_any_data` keys); `now` is Unix seconds.
pub fn check_sign(
    rules: &Rules,
    bindings: &Bindings,
    auth: Option<&UserAuth>,
    now: u64,
) -> Result<(), Reason> {
    if !rules.allow_forwarding {
        if bindings.forwarded() {
            return Err(Reason::ForwardedUse);
        }
        if bindings.maybe_forwarded() {
            return Err(Reason::BadSessionBind);
        }
    }
    if let Some(hosts) = &rules.destinations {
        if bindings.failed() {
            return Err(Reason::BadSessionBind);
        }
        let Some(last) = bindings.last() else {
            return Err(Reason::NoSessionBind);
        };
        if !bound_destination_ok(hosts, bindings, last, auth, now) {
            return Err(Reason::DestinationNotAllowed);
        }
    }
    if let Some(users) = &rules.remote_users {
        if !auth.is_some_and(|a| users.contains(&a.user)) {
            return Err(Reason::RemoteUserNotAllowed);
        }
    }
    Ok(())
}

fn bound_destination_ok(
    hosts: &KnownHosts,
    bindings: &Bindings,
    last: &Binding,
    auth: Option<&UserAuth>,
    now: u64,
) -> bool {
    // Only a user-auth request names the session it is for.
    let Some(auth) = auth else {
        return false;
    };
    // The last binding is the connection to the destination; a forwarding
    // one means the client signs where it forwarded to, not where it logs in.
    if last.forwarding || auth.session_id != last.session_id {
        return false;
    }
    match &auth.host_key {
        Some(host_key) if *host_key != last.host_key_blob => return false,
        None if bindings.list().len() > 1 => return false,
        _ => {}
    }
    admits(hosts, last, now)
}

/// The verified binding a user-auth request belongs to: the one whose
/// session id is the one in the data and, for a hostbound request, whose
/// host key is the one in the data. At most one binding per session id is
/// ever recorded ([`Bindings::check`]).
pub fn binding_for<'b>(bindings: &'b Bindings, auth: &UserAuth) -> Option<&'b Binding> {
    bindings.list().iter().find(|b| {
        b.session_id == auth.session_id
            && auth.host_key.as_ref().is_none_or(|h| *h == b.host_key_blob)
    })
}

/// Whether the destinations file admits the host a binding is to: its
/// plain key is listed, or its host certificate is valid now and signed by
/// a listed CA; never when the key or the CA is `@revoked`.
pub fn admits(hosts: &KnownHosts, binding: &Binding, now: u64) -> bool {
    if hosts.revoked.contains(&binding.key) {
        return false;
    }
    match &binding.cert {
        None => hosts.host_keys.contains(&binding.key),
        Some(cert) => {
            cert.host
                && cert.valid_after <= now
                && now < cert.valid_before
                && !hosts.revoked.contains(&cert.ca)
                && hosts.cas.contains(&cert.ca)
        }
    }
}

/// Whether a key under `rules` is listed on a connection with `bindings`:
/// not on a (possibly) forwarded connection unless it allows forwarding;
/// not with destinations after a failed binding (it could not sign there).
pub fn listed(rules: &Rules, bindings: &Bindings) -> bool {
    if !rules.allow_forwarding && bindings.maybe_forwarded() {
        return false;
    }
    !(rules.destinations.is_some() && bindings.failed())
}

#[cfg(test)]
mod tests;
