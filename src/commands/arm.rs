//! `keyholder arm`: not implemented yet.

use std::path::Path;

use crate::error::{Error, Result};

/// Arms every configured key.
pub fn run(_config: &Path, _passphrase_file: Option<&Path>) -> Result<u8> {
    crate::require_root("keyholder arm")?;
    Err(Error::msg("arm is not implemented yet"))
}
