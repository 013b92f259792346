//! Who is on the other end of a connection: uid and pid from `SO_PEERCRED`,
//! user name and groups from the user database (NSS: files, LDAP, sssd).
//!
//! The peer process's own gids are never used: a setgid program gains
//! nothing. A uid with no passwd entry has no groups. Blocking: called only
//! through [`super::lookups`], which caches the answer briefly, runs it off
//! the async threads and bounds how long anyone waits for it.
//!
//! Membership is decided by gid: getgrouplist gives the user's gids, and each
//! group the configuration names is looked up by name (getgrnam) and kept if
//! its gid is among them. Groups the configuration does not name are never
//! looked up, which matters for directory users in dozens of groups.

use std::ffi::{CStr, CString};

use nix::errno::Errno;
use nix::unistd::{Gid, Group, Uid, User};

use crate::policy::Caller;

/// What the user database says about one uid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The user name; `None` when the uid has no passwd entry.
    pub user: Option<String>,
    /// The configured groups the user is in (empty without a passwd entry).
    pub groups: Vec<String>,
}

impl Entry {
    /// The caller this entry describes, connected as `uid` from `pid`.
    pub fn caller(&self, uid: u32, pid: Option<i32>) -> Caller {
        Caller {
            uid,
            pid,
            user: self.user.clone(),
            groups: self.groups.clone(),
        }
    }
}

/// Looks up `uid`'s name and which of `configured` (group names) it is in.
/// Blocking (NSS may ask a directory server): run it off the async workers.
///
/// An error of the user database, as opposed to "no such user or group", is
/// returned rather than taken for "no groups": answering as if the caller
/// had no keys would be a wrong answer (and a misleading audit line). Seen
/// under descriptor exhaustion, where getpwuid_r fails with EMFILE. glibc's
/// getgrouplist reports no such errors; it can only be taken as it is.
pub fn lookup(uid: u32, configured: &[String]) -> nix::Result<Entry> {
    let Some(user) = User::from_uid(Uid::from_raw(uid))? else {
        descriptors_left()?;
        return Ok(Entry {
            user: None,
            groups: Vec::new(),
        });
    };
    let gids = match CString::new(user.name.as_bytes()) {
        Ok(name) => group_list(&name, user.gid)?,
        // Cannot happen (the name came from a C string); the primary group
        // is then all that is known.
        Err(_) => vec![user.gid],
    };
    let mut groups = Vec::new();
    for name in configured {
        if let Some(group) = Group::from_name(name)? {
            if gids.contains(&group.gid) {
                groups.push(name.clone());
            }
        }
    }
    descriptors_left()?;
    Ok(Entry {
        user: Some(user.name),
        groups,
    })
}

/// Fails when the process is out of file descriptors. glibc reports a user
/// database it could not open (EMFILE) as "no such user", with errno 0, and
/// getgrouplist silently leaves out the groups it could not read; a lookup
/// made while descriptors ran out cannot be told from a real answer, so the
/// answer is not trusted when a descriptor cannot be had right after it.
fn descriptors_left() -> nix::Result<()> {
    match std::fs::File::open("/dev/null") {
        Ok(_) => Ok(()),
        Err(e) => match e.raw_os_error().map(nix::errno::Errno::from_raw) {
            Some(errno @ (nix::errno::Errno::EMFILE | nix::errno::Errno::ENFILE)) => Err(errno),
            _ => Ok(()),
        },
    }
}

/// getgrouplist(3): `user`'s groups, `group` included, in one pass over the
/// user database for users in up to 64 groups (two otherwise).
///
/// Not nix's wrapper: it starts with room for 8 groups and doubles, calling
/// getgrouplist again, a full pass over every NSS module, each time (a user
/// in 12 groups cost two passes, in 40 four), and reads
/// /proc/sys/kernel/ngroups_max on every call. glibc says how many groups
/// there are when the buffer is too small; this uses that.
fn group_list(user: &CStr, group: Gid) -> nix::Result<Vec<Gid>> {
    /// Linux's NGROUPS_MAX.
    const MAX: usize = 65_536;
    let mut gids: Vec<nix::libc::gid_t> = vec![0; 64];
    // Membership may grow between two calls: a few tries.
    for _ in 0..4 {
        let mut n = nix::libc::c_int::try_from(gids.len()).map_err(|_| Errno::EINVAL)?;
        // SAFETY: `gids` has room for `n` gids; getgrouplist writes at most
        // `n` of them and sets `n` to the number of groups the user has.
        let ret = unsafe {
            nix::libc::getgrouplist(user.as_ptr(), group.as_raw(), gids.as_mut_ptr(), &mut n)
        };
        let n = usize::try_from(n).map_err(|_| Errno::EINVAL)?;
        if ret >= 0 {
            gids.truncate(n);
            return Ok(gids.into_iter().map(Gid::from_raw).collect());
        }
        if gids.len() >= MAX {
            break;
        }
        gids.resize(n.max(gids.len() * 2).min(MAX), 0);
    }
    Err(Errno::EINVAL)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_in_its_primary_group_and_only_configured_groups_are_listed() {
        let configured = ["root".to_owned(), "kht-no-such-group".to_owned()];
        let c = lookup(0, &configured).unwrap().caller(0, Some(1));
        assert_eq!(c.user.as_deref(), Some("root"));
        assert_eq!(c.groups, ["root"]);
        assert_eq!(c.pid, Some(1));
        assert!(lookup(0, &[]).unwrap().groups.is_empty());
    }

    #[test]
    fn group_list_includes_the_given_group_and_agrees_with_nix() {
        let name = CString::new("root").unwrap();
        let ours = group_list(&name, Gid::from_raw(12_345)).unwrap();
        assert!(ours.contains(&Gid::from_raw(12_345)), "{ours:?}");
        let mut ours = group_list(&name, Gid::from_raw(0)).unwrap();
        let mut theirs = nix::unistd::getgrouplist(&name, Gid::from_raw(0)).unwrap();
        ours.sort_by_key(|g| g.as_raw());
        theirs.sort_by_key(|g| g.as_raw());
        assert_eq!(ours, theirs);
    }

    #[test]
    fn uid_without_passwd_entry_has_no_groups() {
        let c = lookup(3_999_999_999, &["root".to_owned()]).unwrap();
        assert_eq!(c.user, None);
        assert!(c.groups.is_empty());
    }
}
