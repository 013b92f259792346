//! `keyholder disarm`: not implemented yet.

use std::path::Path;

use crate::error::{Error, Result};

/// Removes every identity from the upstream agent.
pub fn run(_config: &Path) -> Result<u8> {
    crate::require_root("keyholder disarm")?;
    Err(Error::msg("disarm is not implemented yet"))
}
