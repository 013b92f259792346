//! `[limits]`: connection counts, timeouts and the user-lookup cache, with
//! their defaults and bounds.
//!
//! Never: accepts a zero where zero would disable a limit by accident.

use super::*;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    pub(super) max_connections: Option<u32>,
    pub(super) max_connections_per_user: Option<u32>,
    pub(super) idle_timeout_secs: Option<u64>,
    pub(super) upstream_timeout_secs: Option<u64>,
    pub(super) lookup_cache_secs: Option<u64>,
    pub(super) lookup_timeout_secs: Option<u64>,
}

/// Resource limits (`[limits]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once, all users together.
    pub max_connections: u32,
    /// Connections open at once by one uid.
    pub max_connections_per_user: u32,
    /// A connection with no complete request for this long is closed.
    pub idle_timeout: Duration,
    /// An upstream answer that takes longer than this yields FAILURE.
    pub upstream_timeout: Duration,
    /// A caller's user name and groups are reused for at most this long
    /// (zero: looked up for every request).
    pub lookup_cache: Duration,
    /// A user-database lookup that takes longer leaves the request without
    /// groups (`user-lookup-timeout`).
    pub lookup_timeout: Duration,
}

/// The largest `lookup_cache_secs` and `lookup_timeout_secs` accepted: an
/// hour is already far beyond any useful value.
pub const MAX_LOOKUP_SECS: u64 = 3600;

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            max_connections_per_user: 512,
            idle_timeout: Duration::from_secs(300),
            upstream_timeout: Duration::from_secs(30),
            lookup_cache: Duration::from_secs(5),
            lookup_timeout: Duration::from_secs(5),
        }
    }
}

pub(super) fn positive<T: PartialEq + Default + Copy>(
    file: &impl std::fmt::Display,
    field: &str,
    value: Option<T>,
    default: T,
) -> Result<T> {
    match value {
        Some(v) if v == T::default() => Err(Error::msg(format!(
            "{file}: {field}: must be greater than 0"
        ))),
        Some(v) => Ok(v),
        None => Ok(default),
    }
}

pub(super) fn at_most(
    file: &impl std::fmt::Display,
    field: &str,
    value: Option<u64>,
    default: u64,
) -> Result<u64> {
    match value {
        Some(v) if v > MAX_LOOKUP_SECS => Err(Error::msg(format!(
            "{file}: {field}: must be at most {MAX_LOOKUP_SECS}"
        ))),
        Some(v) => Ok(v),
        None => Ok(default),
    }
}

/// The `[limits]` settings, defaults filled in and bounds checked.
pub(super) fn load(file: &impl std::fmt::Display, raw: &RawLimits) -> Result<Limits> {
    let defaults = Limits::default();
    Ok(Limits {
        max_connections: positive(
            &file,
            "limits.max_connections",
            raw.max_connections,
            defaults.max_connections,
        )?,
        max_connections_per_user: positive(
            &file,
            "limits.max_connections_per_user",
            raw.max_connections_per_user,
            defaults.max_connections_per_user,
        )?,
        idle_timeout: Duration::from_secs(positive(
            &file,
            "limits.idle_timeout_secs",
            raw.idle_timeout_secs,
            defaults.idle_timeout.as_secs(),
        )?),
        upstream_timeout: Duration::from_secs(positive(
            &file,
            "limits.upstream_timeout_secs",
            raw.upstream_timeout_secs,
            defaults.upstream_timeout.as_secs(),
        )?),
        lookup_cache: Duration::from_secs(at_most(
            &file,
            "limits.lookup_cache_secs",
            raw.lookup_cache_secs,
            defaults.lookup_cache.as_secs(),
        )?),
        lookup_timeout: Duration::from_secs(at_most(
            &file,
            "limits.lookup_timeout_secs",
            positive(
                &file,
                "limits.lookup_timeout_secs",
                raw.lookup_timeout_secs,
                defaults.lookup_timeout.as_secs(),
            )
            .map(Some)?,
            defaults.lookup_timeout.as_secs(),
        )?),
    })
}
