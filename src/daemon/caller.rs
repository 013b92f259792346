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
///
/// An error of the user database, as opposed to "no such user or group", is
/// returned rather than taken for "no groups": answering as if the caller
/// had no keys would be a wrong answer (and a misleading audit line). Seen
/// under descriptor exhaustion, where getpwuid_r fails with EMFILE. glibc's
/// getgrouplist reports no such errors; it can only be taken as it is.
pub fn resolve(uid: u32, pid: Option<i32>) -> nix::Result<Caller> {
    let Some(user) = User::from_uid(Uid::from_raw(uid))? else {
        descriptors_left()?;
        return Ok(Caller {
            uid,
            pid,
            user: None,
            groups: Vec::new(),
        });
    };
    let gids = match CString::new(user.name.as_bytes()) {
        Ok(name) => getgrouplist(&name, user.gid)?,
        // Cannot happen (the name came from a C string); the primary group
        // is then all that is known.
        Err(_) => vec![user.gid],
    };
    let mut groups = Vec::with_capacity(gids.len());
    for gid in gids {
        if let Some(group) = Group::from_gid(gid)? {
            groups.push(group.name);
        }
    }
    groups.sort();
    groups.dedup();
    descriptors_left()?;
    Ok(Caller {
        uid,
        pid,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_resolves_with_its_primary_group() {
        let c = resolve(0, Some(1)).unwrap();
        assert_eq!(c.user.as_deref(), Some("root"));
        assert!(c.groups.iter().any(|g| g == "root"), "{:?}", c.groups);
    }

    #[test]
    fn uid_without_passwd_entry_has_no_groups() {
        let c = resolve(3_999_999_999, None).unwrap();
        assert_eq!(c.user, None);
        assert!(c.groups.is_empty());
    }
}
