//! The private key files in `key_dir` (`key_dir/NAME`), as `arm` and
//! `check-config` see them: the file must be a regular file owned by root
//! that neither group nor others may access (the rule ssh applies to its own
//! key files), hold an OpenSSH private key, and that key's public half must
//! be the configured public key.
//!
//! An OpenSSH private key file carries its public key in cleartext, so the
//! match (and whether the file is encrypted) is checked without a
//! passphrase. The file's text is held in zeroizing memory, since an
//! unencrypted key (`require_encrypted = false`) is secret in itself.

use std::fs::{File, Metadata};
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use ssh_key::{HashAlg, PrivateKey};
use zeroize::Zeroizing;

use crate::config::{KeyConfig, PublicKeySource};

/// Larger files are not private keys (an RSA-16384 key is about 12 KiB).
const MAX_KEY_FILE: u64 = 1024 * 1024;

/// Why a key file could not be read.
#[derive(Debug)]
pub enum ReadError {
    /// The caller may not read it (a non-root `check-config`).
    Denied(std::io::Error),
    /// Anything else: missing, not a regular file, too large, not text.
    Other(String),
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Denied(e) => write!(f, "{e}"),
            Self::Other(e) => f.write_str(e),
        }
    }
}

/// What is wrong with the file's type, owner and mode, one message each,
/// each naming the file.
pub fn problems(path: &Path, meta: &Metadata) -> Vec<String> {
    match crate::trust::check_metadata(meta, crate::trust::Access::Secret) {
        Ok(()) => Vec::new(),
        Err(why) => vec![format!("{}: {why}", path.display())],
    }
}

/// Opens and reads the file (following a symlink, as ssh does; the checks
/// apply to the file actually opened). Returns its metadata and text.
pub fn read(path: &Path) -> Result<(Metadata, Zeroizing<String>), ReadError> {
    let file = path.display();
    // O_NONBLOCK: opening a FIFO planted at the path must not hang.
    let handle = File::options()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_NOCTTY)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::PermissionDenied => ReadError::Denied(e),
            std::io::ErrorKind::NotFound => {
                ReadError::Other(format!("private key {file} does not exist"))
            }
            _ => ReadError::Other(format!("cannot open {file}: {e}")),
        })?;
    let meta = handle
        .metadata()
        .map_err(|e| ReadError::Other(format!("cannot stat {file}: {e}")))?;
    if !meta.file_type().is_file() {
        return Err(ReadError::Other(format!("{file} is not a regular file")));
    }
    if meta.len() > MAX_KEY_FILE {
        return Err(ReadError::Other(format!(
            "{file} is {} bytes: too large to be a private key",
            meta.len()
        )));
    }
    let capacity = usize::try_from(meta.len()).unwrap_or(0).saturating_add(1);
    let mut text = Zeroizing::new(String::with_capacity(capacity));
    handle
        // No more than stat said: the buffer never grows (and leaves no
        // copy behind) even if the file does.
        .take(meta.len())
        .read_to_string(&mut text)
        .map_err(|e| ReadError::Other(format!("cannot read {file}: {e}")))?;
    Ok((meta, text))
}

/// Parses the file's text and checks that it holds `key`'s configured
/// public key. The result may still be encrypted.
pub fn parse(key: &KeyConfig, path: &Path, text: &str) -> Result<PrivateKey, String> {
    let file = path.display();
    let private = PrivateKey::from_openssh(text).map_err(|e| {
        let hint = if text.contains("-----BEGIN OPENSSH PRIVATE KEY-----") {
            String::new()
        } else {
            format!(" (convert it to the OpenSSH format with: ssh-keygen -p -f {file})")
        };
        format!("{file}: not an OpenSSH private key: {e}{hint}")
    })?;
    if private.public_key().key_data() != &key.public_key {
        let configured = match &key.source {
            PublicKeySource::Inline => format!("keys.{}.public_key", key.name),
            PublicKeySource::File(p) => p.display().to_string(),
        };
        return Err(format!(
            "{file} holds key {}, but the configured public key of {} ({configured}) is {}",
            private.public_key().fingerprint(HashAlg::Sha256),
            key.name,
            key.fingerprint
        ));
    }
    Ok(private)
}

/// What `arm` needs: the file read, its owner and mode checked, parsed and
/// matched against the configuration. Every failure is one message naming
/// the file.
pub fn load(key: &KeyConfig) -> Result<PrivateKey, String> {
    let path = &key.private_key_path;
    let file = path.display();
    let bytes = crate::trust::read_secret_capped(path, MAX_KEY_FILE).map_err(|e| match e {
        e if e.is_not_found() => format!("private key {file} does not exist"),
        crate::trust::TrustError::Io(e) => format!("cannot open {file}: {e}"),
        crate::trust::TrustError::Untrusted(why) => format!("{file}: {why}"),
    })?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| format!("{file}: not an OpenSSH private key (not text)"))?;
    parse(key, path, text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn open_modes_are_refused_naming_the_file() {
        let dir = std::env::temp_dir().join(format!("kh-keyfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("k");
        std::fs::write(&path, "x").unwrap();
        for (mode, bad) in [(0o600, false), (0o400, false), (0o640, true), (0o604, true)] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let meta = std::fs::metadata(&path).unwrap();
            let found = problems(&path, &meta);
            let too_open = found.iter().any(|p| p.contains("are too open"));
            assert_eq!(too_open, bad, "{mode:o}: {found:?}");
            if bad {
                assert!(found.join("").contains(&path.display().to_string()));
                assert!(found.join("").contains(&format!("{mode:04o}")));
            }
        }
        let meta = std::fs::metadata(&dir).unwrap();
        assert!(problems(&dir, &meta)[0].contains("not a regular file"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
