//! The one trust check for every file and directory keyholder trusts: the
//! configuration, `key_dir`, `NAME.pub`, the CA's `.pub`, destinations files,
//! private keys, passphrase, PIN and secret files, TLS files, programs it
//! runs, and state files.
//!
//! A trusted file is a regular file (never a symbolic link, a FIFO, a device
//! or a socket) owned by root that neither group nor others may write; a
//! secret (a private key, a passphrase, a PIN, a secret id) is also one that
//! neither group nor others may read. A trusted directory is owned by root
//! and not writable by group or others. Files are opened non-blocking,
//! without following a final symbolic link and without becoming a
//! controlling terminal, and every check is made on the opened descriptor:
//! nothing planted at a path can block the reader or change between the
//! check and the read. Reads are capped in size.
//!
//! This module must never read a file before its checks pass, never follow
//! a final symbolic link, and never keep a copy of a secret outside
//! zeroizing memory.

use std::fs::{File, Metadata};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

use zeroize::Zeroizing;

/// The largest trusted file read (far above any real configuration, public
/// key, destinations file or private key).
pub const MAX_FILE_LEN: u64 = 1024 * 1024;

/// The largest secret file read (a passphrase, a PIN, a secret id, a TLS
/// private key).
pub const MAX_SECRET_LEN: u64 = 64 * 1024;

/// Who besides root may see a trusted file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone may read it; only root may write it (configuration, public
    /// keys, destinations, programs).
    Public,
    /// Only root may read or write it (private keys, passphrases, PINs,
    /// secret ids, TLS private keys, state files).
    Secret,
}

/// Why a file or directory that must be trusted was not used.
#[derive(Debug)]
pub enum TrustError {
    /// It could not be opened, examined or read (missing, permission
    /// denied, I/O error).
    Io(std::io::Error),
    /// It is not what a trusted file or directory must be.
    Untrusted(String),
}

impl TrustError {
    /// Whether the reason is that this process may not open it (a non-root
    /// caller of a command for everyone).
    pub fn is_permission_denied(&self) -> bool {
        matches!(self, Self::Io(e) if e.kind() == std::io::ErrorKind::PermissionDenied)
    }

    /// Whether the path does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Io(e) if e.kind() == std::io::ErrorKind::NotFound)
    }
}

impl std::fmt::Display for TrustError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Io(e) => write!(f, "cannot read: {e}"),
            Self::Untrusted(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for TrustError {}

/// The rule for an opened file's metadata: a regular file owned by root,
/// with no write access (and, for a secret, no access at all) for group and
/// others. The message says what is wrong and how to mend it.
pub fn check_metadata(meta: &Metadata, access: Access) -> Result<(), String> {
    let kind = meta.file_type();
    if !kind.is_file() {
        let what = if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_dir() {
            "a directory"
        } else if kind.is_socket() {
            "a socket"
        } else if kind.is_symlink() {
            "a symbolic link"
        } else {
            "a device"
        };
        return Err(format!(
            "is {what}, not a regular file; refusing to trust it"
        ));
    }
    if meta.uid() != 0 {
        return Err(format!(
            "owned by uid {}, not root; refusing to trust it (chown root)",
            meta.uid()
        ));
    }
    let mode = meta.mode() & 0o7777;
    match access {
        Access::Public if mode & 0o022 != 0 => Err(format!(
            "mode {mode:04o} is writable by group or others; refusing to trust it (chmod go-w)"
        )),
        Access::Secret if mode & 0o077 != 0 => Err(format!(
            "permissions {mode:04o} are too open: group or others may access it; refusing to \
             trust it (chmod 600)"
        )),
        _ => Ok(()),
    }
}

/// Opens `path` for reading and checks the opened descriptor against
/// [`check_metadata`]. Never blocks (a FIFO is refused, not waited on) and
/// never follows a final symbolic link.
pub fn open(path: &Path, access: Access) -> Result<(File, Metadata), TrustError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_NOFOLLOW | nix::libc::O_NOCTTY)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(nix::libc::ELOOP) => TrustError::Untrusted(
                "is a symbolic link, not a regular file; name the file itself".to_owned(),
            ),
            _ => TrustError::Io(e),
        })?;
    let meta = file.metadata().map_err(TrustError::Io)?;
    check_metadata(&meta, access).map_err(TrustError::Untrusted)?;
    Ok((file, meta))
}

/// Reads at most `cap` bytes of an opened file into a buffer allocated once
/// (it never grows, so no copy of a secret is left behind); more is an
/// error.
fn read_capped(file: File, meta: &Metadata, cap: u64) -> Result<Zeroizing<Vec<u8>>, TrustError> {
    if meta.len() > cap {
        return Err(TrustError::Untrusted(format!(
            "larger than {cap} bytes; refusing to read it"
        )));
    }
    let capacity = usize::try_from(meta.len().saturating_add(1)).unwrap_or(0);
    let mut bytes = Zeroizing::new(Vec::with_capacity(capacity));
    let mut limited = file.take(meta.len().saturating_add(1));
    limited.read_to_end(&mut bytes).map_err(TrustError::Io)?;
    if bytes.len() as u64 > meta.len() {
        return Err(TrustError::Untrusted(
            "grew while being read; refusing to trust it".to_owned(),
        ));
    }
    Ok(bytes)
}

/// Reads a trusted text file readable by anyone (the configuration, a
/// public key, a destinations file).
pub fn read_text(path: &Path) -> Result<String, TrustError> {
    let (file, meta) = open(path, Access::Public)?;
    let bytes = read_capped(file, &meta, MAX_FILE_LEN)?;
    String::from_utf8(bytes.to_vec())
        .map_err(|_| TrustError::Untrusted("is not UTF-8 text; refusing to read it".to_owned()))
}

/// Reads a secret file (root's alone), into zeroizing memory.
pub fn read_secret(path: &Path) -> Result<Zeroizing<Vec<u8>>, TrustError> {
    read_secret_capped(path, MAX_SECRET_LEN)
}

/// Reads a secret file of at most `cap` bytes (a private key may be larger
/// than a passphrase), into zeroizing memory.
pub fn read_secret_capped(path: &Path, cap: u64) -> Result<Zeroizing<Vec<u8>>, TrustError> {
    let (file, meta) = open(path, Access::Secret)?;
    read_capped(file, &meta, cap)
}

/// Checks a trusted file without reading it (a program keyholder runs).
pub fn check_file(path: &Path, access: Access) -> Result<(), TrustError> {
    open(path, access).map(drop)
}

/// Checks a trusted directory: it exists, is a directory, is owned by root
/// and is not writable by group or others (a sticky `/tmp` counts: others
/// can create names in it). A symbolic link to such a directory is
/// followed.
pub fn check_dir(path: &Path) -> Result<(), TrustError> {
    let meta = std::fs::metadata(path).map_err(TrustError::Io)?;
    if !meta.is_dir() {
        return Err(TrustError::Untrusted("is not a directory".to_owned()));
    }
    let mode = meta.mode() & 0o7777;
    if meta.uid() != 0 || mode & 0o022 != 0 {
        return Err(TrustError::Untrusted(format!(
            "is owned by uid {} with mode {mode:04o}: writable by others than root; use a \
             directory owned by root and writable by no one else (chown root, chmod go-w)",
            meta.uid()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn dir(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("kh-trust-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        d
    }

    fn root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    #[test]
    fn modes_are_checked_per_access() {
        if !root() {
            eprintln!("SKIPPED modes_are_checked_per_access: needs root-owned files");
            return;
        }
        let d = dir("modes");
        let f = d.join("f");
        std::fs::write(&f, "text").unwrap();
        for (mode, public_ok, secret_ok) in [
            (0o644, true, false),
            (0o600, true, true),
            (0o400, true, true),
            (0o664, false, false),
            (0o646, false, false),
            (0o640, true, false),
        ] {
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode)).unwrap();
            assert_eq!(read_text(&f).is_ok(), public_ok, "{mode:o} public");
            assert_eq!(read_secret(&f).is_ok(), secret_ok, "{mode:o} secret");
        }
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_fifo_a_symlink_a_directory_and_a_large_file_are_refused_at_once() {
        if !root() {
            eprintln!("SKIPPED a_fifo_…: needs root-owned files");
            return;
        }
        let d = dir("kinds");
        let fifo = d.join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
        let e = read_text(&fifo).unwrap_err().to_string();
        assert!(e.contains("FIFO"), "{e}");
        let real = d.join("real");
        std::fs::write(&real, "x").unwrap();
        let link = d.join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let e = read_text(&link).unwrap_err().to_string();
        assert!(e.contains("symbolic link"), "{e}");
        let e = read_text(&d).unwrap_err().to_string();
        assert!(e.contains("directory"), "{e}");
        let big = d.join("big");
        std::fs::write(&big, vec![b'a'; MAX_SECRET_LEN as usize + 1]).unwrap();
        std::fs::set_permissions(&big, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = read_secret(&big).unwrap_err().to_string();
        assert!(e.contains("larger than"), "{e}");
        assert!(read_text(&big).is_ok());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn directories_writable_by_others_are_refused() {
        if !root() {
            eprintln!("SKIPPED directories_writable_by_others_are_refused: needs root");
            return;
        }
        let d = dir("dirs");
        assert!(check_dir(&d).is_ok());
        for mode in [0o775, 0o757, 0o1777] {
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = check_dir(&d).unwrap_err().to_string();
            assert!(e.contains("writable by others than root"), "{mode:o}: {e}");
        }
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        let f = d.join("f");
        std::fs::write(&f, "x").unwrap();
        assert!(check_dir(&f).is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
