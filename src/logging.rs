//! Log output: syslog (facility authpriv, identity `keyholder`) or stderr.
//! The level is INFO unless `$KEYHOLDER_LOG_LEVEL` says otherwise
//! (`error`, `warn`, `info`, `debug`, `trace`).

use tracing::level_filters::LevelFilter;

use crate::config::LogTarget;
use crate::error::{Error, Result};

/// Installs the global logger. Call once.
pub fn init(target: LogTarget) -> Result<()> {
    let level = std::env::var("KEYHOLDER_LOG_LEVEL")
        .ok()
        .and_then(|l| l.parse::<LevelFilter>().ok())
        .unwrap_or(LevelFilter::INFO);
    let builder = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_target(false);
    let installed = match target {
        LogTarget::Stderr => builder
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .try_init(),
        LogTarget::Syslog => {
            let syslog = syslog_tracing::Syslog::new(
                c"keyholder",
                syslog_tracing::Options::LOG_PID,
                syslog_tracing::Facility::AuthPriv,
            )
            .ok_or_else(|| Error::msg("syslog logger already initialised"))?;
            builder
                .with_writer(syslog)
                .with_ansi(false)
                .without_time()
                .with_level(false)
                .try_init()
        }
    };
    installed.map_err(|e| Error::msg(format!("cannot initialise logging: {e}")))
}
