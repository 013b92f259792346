//! The admin and monitoring commands: `arm`, `disarm`, `status`, `list`,
//! `check-config`, `ca`, `cert`, and the grant commands ([`grants`]:
//! `request`, `approve`, `deny`, `grants`, `revoke`). Each returns its exit code, or an error printed as one
//! line (exit 1).
//!
//! Helpers shared by them: [`client`] (a blocking agent-protocol client
//! with deadlines), [`keyfile`] (private key file checks), [`passphrase`]
//! (where `arm` gets passphrases).

/// `println!` that does not panic when stdout is gone (`keyholder status |
/// head -1`, a monitoring agent that stopped reading): output is best
/// effort, the exit code is what counts.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

pub mod arm;
pub mod certificates;
pub mod check_config;
pub mod client;
pub mod disarm;
pub mod grants;
pub mod keyfile;
pub mod list;
pub mod passphrase;
pub mod prometheus;
pub mod status;
pub mod token;
pub mod unlock;

use std::path::{Path, PathBuf};

use crate::config::{Config, DEFAULT_SOCKET};
use crate::error::{Error, Result};

/// The configuration as the commands for everyone (`status`, `list`) see
/// it: the file is normally world-readable, but when this user may not read
/// it, the defaults apply (with a note saying so) rather than failing.
#[derive(Debug)]
pub enum ClientConfig {
    /// The file, loaded and validated (boxed: far larger than the other).
    Loaded(Box<Config>),
    /// The file could not be read for lack of permission.
    Defaults {
        /// Says which file and that the defaults apply.
        note: String,
    },
}

impl ClientConfig {
    /// Loads `path`; permission denied falls back to the defaults, any
    /// other failure (missing file, invalid content) is an error.
    pub fn load(path: &Path) -> Result<Self> {
        match crate::trust::read_text(path) {
            Ok(text) => Config::parse(path, &text).map(|c| Self::Loaded(Box::new(c))),
            Err(crate::trust::TrustError::Io(e))
                if e.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                Ok(Self::Defaults {
                    note: format!(
                        "{}: cannot read ({e}); using the default socket {DEFAULT_SOCKET}",
                        path.display()
                    ),
                })
            }
            Err(e) => Err(Error::msg(format!("{}: {e}", path.display()))),
        }
    }

    /// The proxy socket.
    pub fn socket(&self) -> PathBuf {
        match self {
            Self::Loaded(c) => c.socket.clone(),
            Self::Defaults { .. } => PathBuf::from(DEFAULT_SOCKET),
        }
    }

    /// The configuration, when it could be read.
    pub fn config(&self) -> Option<&Config> {
        match self {
            Self::Loaded(c) => Some(&**c),
            Self::Defaults { .. } => None,
        }
    }

    /// The note to show when the defaults apply.
    pub fn note(&self) -> Option<&str> {
        match self {
            Self::Loaded(_) => None,
            Self::Defaults { note } => Some(note),
        }
    }
}
