//! The command line definition, shared by the `keyholder` binary and the
//! man page and shell completion generator (`examples/gen-manpages.rs`), so
//! that both describe the same interface.

use std::path::PathBuf;

use clap::{CommandFactory, Parser, Subcommand};

use crate::config::{LogTarget, DEFAULT_CONFIG};

/// Privileged ssh-agent proxy: lets a group of people use a deploy key
/// without ever holding it.
///
/// Deployers point SSH_AUTH_SOCK at the proxy socket (default
/// /run/keyholder/proxy.sock) and run plain ssh, scp, rsync or git. The
/// daemon lists and signs only with the keys their Unix groups may use, and
/// only SSH user-authentication requests; adding, removing and locking keys
/// through the proxy is refused for everyone. Per key, `destinations`,
/// `remote_users` and `allow_forwarding` limit which hosts and accounts a key
/// logs into and whether it works through a forwarded agent (keyholder
/// verifies session-bind@openssh.com itself). With [certificates], each caller
/// also gets a short-lived certificate naming them, so targets' logs say who
/// logged in.
#[derive(Debug, Parser)]
#[command(
    name = "keyholder",
    version,
    propagate_version = true,
    max_term_width = 100
)]
pub struct Cli {
    /// Configuration file.
    #[arg(long, short = 'c', global = true, env = "KEYHOLDER_CONFIG", default_value = DEFAULT_CONFIG, value_name = "FILE")]
    pub config: PathBuf,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy (and its backend) in the foreground. Root only.
    ///
    /// Listens on `socket` (mode 0666) and opens the backend agent.backend names: "upstream"
    /// starts `ssh-agent -D -a agent.socket` when agent.spawn = true (or uses an agent someone
    /// else runs); "builtin" (keys in the daemon), "pkcs11" (keys on a token) and "openbao"
    /// (transit keys in a cluster) serve agent.socket themselves, root only. Serves until
    /// SIGTERM or SIGINT (exit 0, socket removed).
    /// SIGHUP reloads the configuration; a configuration that fails to load leaves the
    /// last good one in force. Under systemd it reports readiness with sd_notify.
    ///
    /// A caller's groups are looked up for every request, cached for at most
    /// limits.lookup_cache_secs (default 5; dropped when /etc/passwd or /etc/group change
    /// and on SIGHUP); a lookup slower than limits.lookup_timeout_secs (default 5) gets that
    /// caller's requests refused (user-lookup-timeout) while everyone else is served.
    Daemon {
        /// Where logs go; overrides `log` in the configuration.
        #[arg(long, value_enum, value_name = "TARGET")]
        log: Option<LogTarget>,
    },
    /// Arm the backend: give it what unlocks the configured keys. Root only.
    ///
    /// With agent.backend = "upstream" or "builtin": decrypts every configured key found in
    /// key_dir and adds it to whatever serves agent.socket (an ssh-agent, or the daemon
    /// itself). With "pkcs11": hands the daemon the token's user PIN (--pin-file,
    /// $CREDENTIALS_DIRECTORY/keyholder-pin, or the terminal), tried once. With "openbao":
    /// hands the daemon the AppRole secret id or token (--secret-file,
    /// $CREDENTIALS_DIRECTORY/keyholder-openbao-secret, or the terminal); with auth = "cert" or
    /// "agent" nothing is asked. Either way each key not armed is named with why.
    ///
    /// Keys the upstream agent already holds count as armed and need no passphrase, so arm is
    /// idempotent. Each other key is read from key_dir/NAME, which must be a regular file owned
    /// by root with no group or other permissions, hold the configured public key, and be
    /// encrypted when require_encrypted = true.
    ///
    /// Asks for the passphrase on the terminal (one prompt serves every key it opens; it asks
    /// again for keys it could not open), or reads it from --passphrase-file, or from
    /// $CREDENTIALS_DIRECTORY/keyholder-passphrase (systemd credentials). Prints one line per
    /// key and a summary. Exit 0 when every configured key is armed, 1 otherwise (each failure
    /// named).
    Arm {
        /// Read the passphrase from this file (first line) instead of the terminal.
        #[arg(long, value_name = "FILE")]
        passphrase_file: Option<PathBuf>,
        /// With agent.backend = "pkcs11": read the token's user PIN from this file (first line)
        /// instead of $CREDENTIALS_DIRECTORY/keyholder-pin or the terminal.
        #[arg(long, value_name = "FILE")]
        pin_file: Option<PathBuf>,
        /// backend = "openbao": read the AppRole secret id (or the token, with auth = "token")
        /// from this file (first line) instead of $CREDENTIALS_DIRECTORY/keyholder-openbao-secret
        /// or the terminal; the daemon logs in with it and keeps it in locked memory.
        #[arg(long, value_name = "FILE")]
        secret_file: Option<PathBuf>,
    },
    /// Disarm the backend: remove every identity from the upstream agent. Root only.
    ///
    /// Talks to agent.socket directly (the proxy refuses removals for everyone). With
    /// agent.backend = "pkcs11" the daemon logs out of the token and forgets the PIN; with
    /// "openbao" it revokes its token and forgets the secret. Exit 0 when the backend
    /// confirmed, 1 otherwise.
    Disarm,
    /// Report whether the daemon is reachable and which configured keys are armed.
    ///
    /// Works for any user; asks the daemon over the proxy socket, within 10 s. The first line
    /// is a one-line summary ("OK: 2/2 keys armed"), then one line per key. Exit codes follow
    /// the monitoring-plugin convention: 0 OK (all keys armed), 1 WARNING (some armed),
    /// 2 CRITICAL (none armed, or daemon or backend unreachable; a line names what the
    /// backend reports wrong: a sealed cluster, a missing token, a key mismatch…), 3 UNKNOWN
    /// (configuration error, no keys configured, an answer that cannot be understood).
    /// When this user may not read the configuration, the default socket is asked.
    Status {
        /// Print a stable JSON document instead of text (same exit codes).
        #[arg(long, conflicts_with = "prometheus")]
        json: bool,
        /// Print the daemon's counters in the Prometheus text format instead (same exit codes;
        /// `keyholder_up 0` when the daemon does not answer). Reference: docs/metrics.md
        /// (/usr/share/doc/keyholder/docs/metrics.md).
        #[arg(long)]
        prometheus: bool,
    },
    /// List the keys you may use, with names, fingerprints and public key paths.
    ///
    /// One line per armed key your groups allow: NAME, SHA256 fingerprint, algorithm, and the
    /// public key file (or "(inline)"). Select one identity with
    /// `ssh -i /etc/keyholder.d/NAME.pub -o IdentitiesOnly=yes`. Exit 1 when there is none.
    List,
    /// Validate the configuration and key files. Exit 1 with precise messages on error.
    ///
    /// The configuration file and every NAME.pub must be regular files owned by root and not
    /// writable by group or others. Checks every private key file as arm will: present, a regular file owned by root,
    /// no group or other permissions, holding the configured public key, encrypted when
    /// require_encrypted = true. Run as a user who cannot read the private keys, the checks
    /// that need their contents are skipped with a note. A key's destinations file must be a
    /// regular file owned by root, not writable by group or others, every line a host key,
    /// @cert-authority or @revoked entry; its host key and CA counts are reported. With
    /// agent.backend = "pkcs11", as root, it also logs in to the token (the PIN from
    /// $CREDENTIALS_DIRECTORY/keyholder-pin or the terminal) and warns about a key that is
    /// extractable or not sensitive; with "openbao", it checks the [openbao] files.
    CheckConfig,
    /// Print the certificate CA's public key line, for targets' TrustedUserCAKeys.
    ///
    /// Reads `[certificates] ca` from the configuration (key_dir/CA.pub; with
    /// ca = "openbao:ROLE", the engine's CA key pinned in key_dir/openbao-ca.pub). On each target, put
    /// the line in a file named by sshd's TrustedUserCAKeys: logins with keyholder's
    /// certificates are then accepted without an authorized_keys entry, and sshd logs the key
    /// ID ("ID keyholder:alice@deploy1:deploy (serial …)"). Exit 1 when no CA is configured.
    Ca,
    /// Print your current certificate for key NAME (for ssh -o CertificateFile=FILE).
    ///
    /// Asks the daemon over the proxy socket, as you: the certificate it lists to you for NAME
    /// (minted for you when needed: key ID naming you, valid `validity_secs`). OpenSSH never
    /// pairs an agent certificate with `-i /etc/keyholder.d/NAME.pub -o IdentitiesOnly=yes`;
    /// tools that pin an identity that way add `-o CertificateFile=FILE` with this output.
    /// Exit 1 with the reason when there is none for you.
    Cert {
        /// The key's name (its table in the configuration).
        name: String,
    },
    /// Ask for a grant to use KEY for a while (keys with [keys.NAME.grants]).
    ///
    /// For members of the key's groups. Prints the request's id; the key's approvers (shown
    /// by `keyholder grants`) approve it with `keyholder approve ID`. DURATION is 90s, 30m, 2h,
    /// 1d or plain seconds, at most the key's max_secs. With --wait, waits until the request is
    /// decided. Exit 0 when granted or pending, 1 when refused, denied, withdrawn or lapsed.
    /// Reference: docs/grants.md.
    Request {
        /// The key's name.
        key: String,
        /// How long the grant lasts once approved (90s, 30m, 2h, 1d, seconds).
        #[arg(long = "for", value_name = "DURATION")]
        duration: String,
        /// Why (at most 256 bytes, no control characters; logged and shown to approvers).
        #[arg(long, value_name = "TEXT")]
        reason: String,
        /// Wait until the request is decided (exit 0 granted, 1 denied or lapsed).
        #[arg(long)]
        wait: bool,
    },
    /// Approve grant request ID (members of the key's approver groups, not the requester).
    ///
    /// Each person counts once; the grant starts when the last approval needed arrives.
    Approve {
        /// The request's id (from `keyholder grants`).
        id: String,
        /// Only if the request is for this key.
        #[arg(long, value_name = "KEY")]
        key: Option<String>,
    },
    /// Deny grant request ID (members of the key's approver groups, not the requester).
    Deny {
        /// The request's id.
        id: String,
        /// What to tell the requester (logged).
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
        /// Only if the request is for this key.
        #[arg(long, value_name = "KEY")]
        key: Option<String>,
    },
    /// List pending grant requests and active grants, and who may approve each.
    Grants {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// End grant ID at once, or withdraw a pending request (the grantee, an approver, root).
    ///
    /// A certificate handed out under the grant stays valid at targets until its own end
    /// (at most [certificates] validity_secs).
    Revoke {
        /// The grant's id.
        id: String,
        /// Only if the grant is for this key.
        #[arg(long, value_name = "KEY")]
        key: Option<String>,
    },
}

/// The clap command tree of `keyholder` (for man pages and completions).
pub fn command() -> clap::Command {
    Cli::command()
}

#[cfg(test)]
mod tests {
    #[test]
    fn command_definition_is_consistent() {
        super::command().debug_assert();
    }
}
