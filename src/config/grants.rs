//! `[keys.NAME.grants]`: a key its members may use only under a grant
//! approved by others (or self-granted, break-glass), and the top-level
//! `state_dir` where grants are kept.
//!
//! Parsing and validation only; what the fields mean is decided in
//! `crate::policy::grants` and carried out by `crate::grants`.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::policy::grants::MAX_APPROVALS;

/// Default `state_dir`.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/keyholder";
/// Default `max_secs` (8 h).
pub const DEFAULT_MAX_SECS: u64 = 8 * 3600;
/// Default `pending_secs` (1 h).
pub const DEFAULT_PENDING_SECS: u64 = 3600;
/// The largest `max_secs` and `pending_secs` (31 days).
pub const MAX_GRANT_SECS: u64 = 31 * 86400;

/// `[keys.NAME.grants]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawGrants {
    #[serde(default)]
    approvers: Vec<String>,
    approvals: Option<u32>,
    max_secs: Option<u64>,
    pending_secs: Option<u64>,
    notify: Option<PathBuf>,
}

/// A key's grant settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantsConfig {
    /// Groups whose members approve or deny.
    pub approvers: Vec<String>,
    /// Distinct approvals needed; 0 = break-glass.
    pub approvals: u32,
    /// The longest grant.
    pub max_secs: u64,
    /// An undecided request lapses after this.
    pub pending_secs: u64,
    /// Run on every event (trusted: root's, not writable by others).
    pub notify: Option<PathBuf>,
}

/// Validates `[keys.NAME.grants]` of config file `path` (relative `notify`
/// paths are relative to the file's directory).
pub(super) fn load(path: &Path, name: &str, raw: RawGrants) -> Result<GrantsConfig> {
    let file = path.display();
    let field = |f: &str| format!("{file}: keys.{name}.grants.{f}");
    let approvals = raw.approvals.unwrap_or(1);
    if approvals > MAX_APPROVALS {
        return Err(Error::msg(format!(
            "{}: {approvals} is more than {MAX_APPROVALS}",
            field("approvals")
        )));
    }
    if approvals > 0 && raw.approvers.is_empty() {
        return Err(Error::msg(format!(
            "{}: empty; list the Unix groups whose members approve (or set approvals = 0 \
             for break-glass)",
            field("approvers")
        )));
    }
    if let Some(bad) = raw
        .approvers
        .iter()
        .find(|g| g.is_empty() || g.contains(|c: char| c.is_whitespace() || c == ':'))
    {
        return Err(Error::msg(format!(
            "{}: {bad:?} is not a valid group name",
            field("approvers")
        )));
    }
    let secs = |f: &str, v: Option<u64>, default: u64| match v {
        None => Ok(default),
        Some(v) if (1..=MAX_GRANT_SECS).contains(&v) => Ok(v),
        Some(v) => Err(Error::msg(format!(
            "{}: {v} is outside 1..={MAX_GRANT_SECS}",
            field(f)
        ))),
    };
    let max_secs = secs("max_secs", raw.max_secs, DEFAULT_MAX_SECS)?;
    let pending_secs = secs("pending_secs", raw.pending_secs, DEFAULT_PENDING_SECS)?;
    let notify = match raw.notify {
        None => None,
        Some(p) => {
            let p = if p.is_relative() {
                path.parent().unwrap_or(Path::new(".")).join(p)
            } else {
                p
            };
            crate::grants::check_program(&p)
                .map_err(|e| Error::msg(format!("{}: {}: {e}", field("notify"), p.display())))?;
            Some(p)
        }
    };
    let mut approvers = raw.approvers;
    approvers.sort();
    approvers.dedup();
    Ok(GrantsConfig {
        approvers,
        approvals,
        max_secs,
        pending_secs,
        notify,
    })
}

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use std::path::Path;

    const ED: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG0dfWR7X83D9xk2DLJjEwGct6dhvTRdMC/OJMR2HDp9 test";

    fn parse(grants: &str) -> crate::error::Result<Config> {
        Config::parse(
            Path::new("/etc/keyholder/keyholder.toml"),
            &format!(
                "[keys.prod]\npublic_key = \"{ED}\"\ngroups = [\"deployers\"]\n\
                 [keys.prod.grants]\n{grants}"
            ),
        )
    }

    #[test]
    fn defaults_and_fields() {
        let c = parse("approvers = [\"leads\", \"leads\", \"ops\"]\n").unwrap();
        let g = c.key("prod").unwrap().grants.as_ref().unwrap();
        assert_eq!(g.approvers, ["leads", "ops"]);
        assert_eq!(g.approvals, 1);
        assert_eq!(g.max_secs, 28800);
        assert_eq!(g.pending_secs, 3600);
        assert_eq!(g.notify, None);
        assert_eq!(c.state_dir, Path::new("/var/lib/keyholder"));
        let c = parse("approvals = 0\nmax_secs = 600\npending_secs = 60\n").unwrap();
        let g = c.key("prod").unwrap().grants.as_ref().unwrap();
        assert_eq!((g.approvals, g.max_secs, g.pending_secs), (0, 600, 60));
        // Approver groups are looked up for callers.
        let c = parse("approvers = [\"leads\"]\n").unwrap();
        let names = crate::policy::Policy::from(&c).group_names();
        assert_eq!(names, ["deployers", "leads"]);
    }

    #[test]
    fn bad_fields_name_key_and_field() {
        for (bad, field) in [
            ("", "approvers"),
            ("approvers = []\napprovals = 2\n", "approvers"),
            ("approvers = [\"a b\"]\n", "approvers"),
            ("approvers = [\"l\"]\napprovals = 17\n", "approvals"),
            ("approvers = [\"l\"]\nmax_secs = 0\n", "max_secs"),
            (
                "approvers = [\"l\"]\npending_secs = 99999999\n",
                "pending_secs",
            ),
            (
                "approvers = [\"l\"]\nnotify = \"/nonexistent/kh-notify\"\n",
                "notify",
            ),
        ] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(
                e.contains(&format!("keys.prod.grants.{field}")),
                "{bad}: {e}"
            );
        }
        let e = parse("approvers = [\"l\"]\nwho = 1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("who"), "{e}");
    }

    #[test]
    fn state_dir_is_relative_to_the_config() {
        let c = Config::parse(Path::new("/srv/kh/k.toml"), "state_dir = \"state\"\n").unwrap();
        assert_eq!(c.state_dir, Path::new("/srv/kh/state"));
    }
}
