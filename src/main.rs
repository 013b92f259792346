//! The `keyholder` command line (defined in [`keyholder::cli`]).

use std::process::ExitCode;

use clap::Parser;
use keyholder::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
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
            secret_file,
        } => keyholder::commands::arm::run(
            &cli.config,
            passphrase_file.as_deref(),
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
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("keyholder: {e}");
            ExitCode::from(1)
        }
    }
}
