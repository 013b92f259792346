//! `keyholder status`: not implemented yet.

use std::path::Path;

/// Reports status; returns the monitoring-plugin exit code.
pub fn run(_config: &Path, _json: bool) -> u8 {
    println!("UNKNOWN: status is not implemented yet");
    3
}
