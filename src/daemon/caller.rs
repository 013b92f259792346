//! Who is on the other end of a connection: uid and pid from `SO_PEERCRED`,
//! user name and groups from the user database (NSS: files, LDAP, sssd).
//!
//! The peer process's own gids are never used: a setgid program gains
//! nothing. A uid with no passwd entry has no groups. Looked up afresh for
//! every connection, so group changes apply to the next connection.

use std::ffi::CString;

use nix::unistd::{getgrouplist, Group, Uid, User};

use crate::policy::Caller;

/// Resolves `uid`'s name and groups. Blocking (NSS may ask a directory
/// server): run it off the async workers.
pub fn resolve(uid: u32, pid: Option<i32>) -> Caller {
    let user = User::from_uid(Uid::from_raw(uid)).ok().flatten();
    let Some(user) = user else {
        return Caller {
            uid,
            pid,
            user: None,
            groups: Vec::new(),
        };
    };
    let gids = CString::new(user.name.as_bytes())
        .ok()
        .and_then(|name| getgrouplist(&name, user.gid).ok())
        .unwrap_or_else(|| vec![user.gid]);
    let mut groups: Vec<String> = gids
        .into_iter()
        .filter_map(|gid| Group::from_gid(gid).ok().flatten())
        .map(|g| g.name)
        .collect();
    groups.sort();
    groups.dedup();
    Caller {
        uid,
        pid,
        user: Some(user.name),
        groups,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_resolves_with_its_primary_group() {
        let c = resolve(0, Some(1));
        assert_eq!(c.user.as_deref(), Some("root"));
        assert!(c.groups.iter().any(|g| g == "root"), "{:?}", c.groups);
    }

    #[test]
    fn uid_without_passwd_entry_has_no_groups() {
        let c = resolve(3_999_999_999, None);
        assert_eq!(c.user, None);
        assert!(c.groups.is_empty());
    }
}
