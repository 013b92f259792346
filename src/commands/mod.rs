//! The admin and monitoring commands: `arm`, `disarm`, `status`, `list`,
//! `check-config`. Each returns its exit code, or an error printed as one
//! line (exit 1).

pub mod arm;
pub mod check_config;
pub mod disarm;
pub mod list;
pub mod status;
