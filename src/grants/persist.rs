//! `STATE_DIR/grants.json`: the grants kept across restarts and reloads.
//!
//! Written whole, atomically: a temporary file beside it (root, 0600),
//! synced, renamed over it, and the directory synced, so that a crash
//! leaves either the old state or the new one. Read only when keyholder
//! can trust it (root's, not readable or writable by others, a regular
//! file, parseable); otherwise it is refused, and the daemon starts with
//! no grants rather than grant access it cannot account for.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::policy::grants::{Grant, Grants, MAX_ID};

/// The file's name in `state_dir`.
pub const FILE: &str = "grants.json";
/// The format version written.
pub const VERSION: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    version: u32,
    grants: Vec<Grant>,
}

/// The state file in `state_dir`, after creating the directory (0700
/// root) when missing and checking it is trusted.
pub fn prepare(state_dir: &Path) -> Result<PathBuf, String> {
    if !state_dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .map_err(|e| format!("cannot create {}: {e}", state_dir.display()))?;
    }
    super::check_dir(state_dir).map_err(|e| format!("{}: {e}", state_dir.display()))?;
    Ok(state_dir.join(FILE))
}

/// Reads the state at `path`: `Ok(None)` when there is none yet.
pub fn load(path: &Path) -> Result<Option<Grants>, String> {
    let text = match super::read_state(path) {
        Ok(t) => t,
        Err(e) if e.is_not_found() => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let file: StateFile =
        serde_json::from_str(&text).map_err(|e| format!("cannot parse it: {e}"))?;
    if file.version != VERSION {
        return Err(format!("format version {} is not {VERSION}", file.version));
    }
    let mut ids = std::collections::HashSet::new();
    for g in &file.grants {
        if g.id.is_empty() || g.id.len() > MAX_ID || !ids.insert(g.id.as_str()) {
            return Err(format!("bad or repeated grant id {:?}", g.id));
        }
    }
    Ok(Some(Grants {
        grants: file.grants,
    }))
}

/// Writes `grants` to `path` atomically and durably.
pub fn save(path: &Path, grants: &Grants) -> Result<(), String> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let text = serde_json::to_vec_pretty(&StateFile {
        version: VERSION,
        grants: grants.grants.clone(),
    })
    .map_err(|e| format!("cannot encode grants: {e}"))?;
    let tmp = dir.join(format!(".{FILE}.tmp"));
    let fail = |what: &str, e: std::io::Error| format!("cannot {what} {}: {e}", tmp.display());
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(|e| fail("create", e))?;
    file.write_all(&text).map_err(|e| fail("write", e))?;
    file.sync_all().map_err(|e| fail("sync", e))?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("cannot replace {}: {e}", path.display())
    })?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| format!("cannot sync {}: {e}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::grants::{Person, State};
    use std::os::unix::fs::PermissionsExt;

    fn grant(id: &str) -> Grant {
        Grant {
            id: id.into(),
            key: "prod".into(),
            requester: Person {
                uid: 1000,
                user: Some("alice".into()),
            },
            reason: "deploy \"x\"\n".into(),
            secs: 60,
            requested_at: 10,
            approvals: Vec::new(),
            needed: 1,
            break_glass: false,
            state: State::Active {
                from: 10,
                until: 70,
            },
            ended_by: None,
            note: None,
        }
    }

    #[test]
    fn saved_state_loads_back_and_bad_state_is_refused() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let dir = std::env::temp_dir().join(format!("kh-grants-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = prepare(&dir.join("state")).unwrap();
        let meta = std::fs::metadata(dir.join("state")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o700);
        assert_eq!(load(&path).unwrap(), None);
        let grants = Grants {
            grants: vec![grant("a1"), grant("b2")],
        };
        save(&path, &grants).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(load(&path).unwrap(), Some(grants.clone()));
        // Repeated ids, bad JSON, another version, a mode others can read.
        let dup = Grants {
            grants: vec![grant("a1"), grant("a1")],
        };
        save(&path, &dup).unwrap();
        assert!(load(&path).unwrap_err().contains("repeated"));
        std::fs::write(&path, "{not json").unwrap();
        assert!(load(&path).unwrap_err().contains("parse"));
        std::fs::write(&path, "{\"version\": 9, \"grants\": []}").unwrap();
        assert!(load(&path).unwrap_err().contains("version"));
        save(&path, &grants).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(load(&path).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
