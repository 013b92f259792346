//! `keyholder list`: not implemented yet.

use std::path::Path;

use crate::error::{Error, Result};

/// Lists the keys the caller may use.
pub fn run(_config: &Path) -> Result<u8> {
    Err(Error::msg("list is not implemented yet"))
}
