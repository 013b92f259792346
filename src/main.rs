//! The `keyholder` command line (defined in [`keyholder::cli`]).

use std::process::ExitCode;

use clap::Parser;
use keyholder::cli::{Cli, Command};

/// Commands whose usage errors exit 1.
const GRANT_COMMANDS: [&str; 5] = ["request", "approve", "deny", "grants", "revoke"];

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let grant_command = std::env::args_os()
                .skip(1)
                .any(|a| GRANT_COMMANDS.iter().any(|c| a == *c));
            if grant_command && e.use_stderr() {
                // The grant commands: a bad input is one line and exit 1,
                // as every refusal.
                let text = e.render().to_string();
                let what: Vec<&str> = text
                    .lines()
                    .take_while(|l| !l.starts_with("Usage:"))
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .collect();
                let what = what.join(" ");
                eprintln!(
                    "keyholder: {} (see keyholder --help)",
                    what.strip_prefix("error: ").unwrap_or(&what)
                );
                return ExitCode::from(1);
            }
            let _ = e.print();
            // --help and --version are not errors. A usage error of `status`
            // is UNKNOWN (3) to monitoring, not CRITICAL (clap's 2).
            let code = if !e.use_stderr() {
                0
            } else if std::env::args_os().skip(1).any(|a| a == "status") {
                3
            } else {
                2
            };
            return ExitCode::from(code);
        }
    };
    let result = match cli.command {
        Command::Daemon { log } => keyholder::daemon::run(&cli.config, log).map(|()| 0),
        Command::Arm {
            passphrase_file,
            pin_file,
            secret_file,
        } => keyholder::commands::arm::run(
            &cli.config,
            passphrase_file.as_deref(),
            pin_file.as_deref(),
            secret_file.as_deref(),
        ),
        Command::Disarm => keyholder::commands::disarm::run(&cli.config),
        Command::Status { json, prometheus } => Ok(if prometheus {
            keyholder::commands::status::run_prometheus(&cli.config)
        } else {
            keyholder::commands::status::run(&cli.config, json)
        }),
        Command::List => keyholder::commands::list::run(&cli.config),
        Command::CheckConfig => keyholder::commands::check_config::run(&cli.config),
        Command::Ca => keyholder::commands::certificates::run_ca(&cli.config),
        Command::Cert { name } => keyholder::commands::certificates::run_cert(&cli.config, &name),
        Command::Request {
            key,
            duration,
            reason,
            wait,
        } => keyholder::commands::grants::run_request(&cli.config, &key, &duration, &reason, wait),
        Command::Approve { id, key } => {
            keyholder::commands::grants::run_approve(&cli.config, &id, key.as_deref())
        }
        Command::Deny { id, reason, key } => keyholder::commands::grants::run_deny(
            &cli.config,
            &id,
            reason.as_deref(),
            key.as_deref(),
        ),
        Command::Grants { json } => keyholder::commands::grants::run_list(&cli.config, json),
        Command::Revoke { id, key } => {
            keyholder::commands::grants::run_revoke(&cli.config, &id, key.as_deref())
        }
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("keyholder: {e}");
            ExitCode::from(1)
        }
    }
}
