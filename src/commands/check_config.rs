//! `keyholder check-config`: loads the configuration exactly as the daemon
//! would, and reports what it found.

use std::path::Path;

use crate::config::{Config, PublicKeySource};
use crate::error::Result;

/// Validates the configuration; prints a summary. Exit 0, or an error.
pub fn run(path: &Path) -> Result<u8> {
    let config = Config::load(path)?;
    println!("{}: OK ({} key(s))", path.display(), config.keys.len());
    for key in &config.keys {
        let source = match &key.source {
            PublicKeySource::Inline => "inline public_key".to_owned(),
            PublicKeySource::File(p) => p.display().to_string(),
        };
        println!(
            "  {} {} groups={} allow_any_data={} public key: {}",
            key.name,
            key.fingerprint,
            key.groups.join(","),
            key.allow_any_data,
            source
        );
    }
    Ok(0)
}
