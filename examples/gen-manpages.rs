//! Generates the man pages and shell completions of `keyholder` from its clap
//! definition ([`keyholder::cli::command`]), for the Debian package.
//!
//! ```sh
//! cargo run --example gen-manpages -- target/assets
//! ```
//!
//! writes `OUT/man/keyholder.1` and one `keyholder-SUBCOMMAND.1` per
//! subcommand, and `OUT/completions/{keyholder.bash,_keyholder,keyholder.fish}`.
//! The page date comes from `$SOURCE_DATE_EPOCH` (reproducible builds) and is
//! left out without it. This is an example rather than part of the binary so
//! that `clap_mangen` and `clap_complete` stay out of the daemon's dependency
//! tree (they are dev-dependencies).

use std::error::Error;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use clap_complete::Shell;
use clap_mangen::roff::{bold, italic, roman, Inline, Roff};
use clap_mangen::Man;

type Result<T> = std::result::Result<T, Box<dyn Error>>;

const MANUAL: &str = "keyholder manual";

fn main() -> Result<()> {
    let mut args = std::env::args_os().skip(1);
    let (Some(out), None) = (args.next(), args.next()) else {
        return Err("usage: gen-manpages OUT_DIR".into());
    };
    let out = PathBuf::from(out);
    let date = source_date()?;

    let mut cmd = keyholder::cli::command().disable_help_subcommand(true);
    cmd.build();

    let man_dir = out.join("man");
    fs::create_dir_all(&man_dir)?;
    let source = format!("keyholder {}", env!("CARGO_PKG_VERSION"));
    let main_page = Man::new(cmd.clone())
        .title("KEYHOLDER")
        .date(date.clone())
        .source(source.clone())
        .manual(MANUAL);
    write_page(&man_dir, &main_page, true, &main_extra())?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = sub.get_name().to_owned();
        let page = Man::new(sub.clone())
            .title(format!("KEYHOLDER-{}", name.to_uppercase()))
            .date(date.clone())
            .source(source.clone())
            .manual(MANUAL);
        write_page(&man_dir, &page, false, &sub_extra(&name))?;
    }

    let completions = out.join("completions");
    fs::create_dir_all(&completions)?;
    let mut cmd = keyholder::cli::command();
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let path = clap_complete::generate_to(shell, &mut cmd, "keyholder", &completions)?;
        println!("{}", path.display());
    }
    Ok(())
}

/// Writes `page` followed by the hand-written `extra` sections, without
/// hyphenation or justification (paths and option names stay whole).
fn write_page(dir: &Path, page: &Man, has_subcommands: bool, extra: &Roff) -> Result<()> {
    let path = dir.join(page.get_filename());
    let mut file = fs::File::create(&path)?;
    page.render_title(&mut file)?;
    file.write_all(b".nh\n.ad l\n")?;
    page.render_name_section(&mut file)?;
    page.render_synopsis_section(&mut file)?;
    page.render_description_section(&mut file)?;
    page.render_options_section(&mut file)?;
    if has_subcommands {
        page.render_subcommands_section(&mut file)?;
    }
    page.render_version_section(&mut file)?;
    extra.to_writer(&mut file)?;
    file.flush()?;
    println!("{}", path.display());
    Ok(())
}

/// One `.TP` entry: a bold term and its description.
fn item(roff: &mut Roff, term: impl Into<Vec<Inline>>, text: &str) {
    roff.control("TP", []);
    roff.text(term);
    roff.text([roman(text)]);
}

fn section(roff: &mut Roff, name: &str) {
    roff.control("SH", [name]);
}

fn see_also(roff: &mut Roff, pages: &[(&str, &str)]) {
    section(roff, "SEE ALSO");
    let mut inlines = Vec::new();
    for (i, (name, sec)) in pages.iter().enumerate() {
        if i > 0 {
            inlines.push(roman(", "));
        }
        inlines.push(bold(*name));
        inlines.push(roman(format!("({sec})")));
    }
    roff.text(inlines);
}

/// FILES, ENVIRONMENT, SIGNALS, EXIT STATUS and SEE ALSO of keyholder(1).
fn main_extra() -> Roff {
    let mut r = Roff::new();
    section(&mut r, "FILES");
    item(
        &mut r,
        [bold("/etc/keyholder/keyholder.toml")],
        "The configuration: sockets, key directory, log target, limits, and which Unix groups \
         may use which key. Every setting is documented in the file shipped by the package.",
    );
    item(
        &mut r,
        [bold("/etc/keyholder.d/"), italic("NAME")],
        "An encrypted private key, mode 0600 (or 0400), owned by root. keyholder arm refuses \
         one that group or others can read. The directory itself is 0755 root.",
    );
    item(
        &mut r,
        [bold("/etc/keyholder.d/"), italic("NAME"), bold(".pub")],
        "Its public key, world-readable on purpose: ssh -i /etc/keyholder.d/NAME.pub \
         -o IdentitiesOnly=yes selects that identity through the proxy.",
    );
    item(
        &mut r,
        [bold("/run/keyholder/proxy.sock")],
        "The proxy socket (mode 0666) that deployers use as SSH_AUTH_SOCK.",
    );
    item(
        &mut r,
        [bold("/run/keyholder/agent.sock")],
        "The upstream ssh-agent socket (mode 0600, root only) that holds the decrypted keys.",
    );

    section(&mut r, "ENVIRONMENT");
    item(
        &mut r,
        [bold("KEYHOLDER_CONFIG")],
        "The configuration file, when --config is not given.",
    );
    item(
        &mut r,
        [bold("KEYHOLDER_LOG_LEVEL")],
        "The daemon's log level: error, warn, info (the default), debug or trace.",
    );
    item(
        &mut r,
        [bold("CREDENTIALS_DIRECTORY")],
        "Set by systemd for units with LoadCredential= or LoadCredentialEncrypted=: \
         keyholder arm reads the passphrase from $CREDENTIALS_DIRECTORY/keyholder-passphrase.",
    );
    item(
        &mut r,
        [bold("SSH_AUTH_SOCK")],
        "Deployers set it to /run/keyholder/proxy.sock to use the keys their groups may use.",
    );

    section(&mut r, "SIGNALS");
    item(
        &mut r,
        [bold("SIGHUP")],
        "keyholder daemon reloads its configuration (systemctl reload keyholder); one that \
         fails to load leaves the last good configuration in force and is logged as an error.",
    );
    item(
        &mut r,
        [bold("SIGTERM"), roman(", "), bold("SIGINT")],
        "keyholder daemon stops its upstream agent, removes the proxy socket and exits 0.",
    );

    section(&mut r, "EXIT STATUS");
    r.text([roman(
        "0 on success, 1 on failure (a one-line message says why; root-only commands say so \
         when run by another user). keyholder status follows the monitoring-plugin convention: \
         0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN; see ",
    )]);
    r.text([bold("keyholder-status"), roman("(1).")]);

    see_also(
        &mut r,
        &[
            ("ssh-agent", "1"),
            ("ssh-add", "1"),
            ("ssh", "1"),
            ("systemd-creds", "1"),
            ("systemctl", "1"),
        ],
    );
    r
}

/// EXIT STATUS and SEE ALSO of keyholder-SUBCOMMAND(1).
fn sub_extra(name: &str) -> Roff {
    let mut r = Roff::new();
    section(&mut r, "EXIT STATUS");
    match name {
        "status" => {
            item(&mut r, [bold("0")], "OK: every configured key is armed.");
            item(
                &mut r,
                [bold("1")],
                "WARNING: some configured keys are armed.",
            );
            item(
                &mut r,
                [bold("2")],
                "CRITICAL: the daemon or the upstream agent is unreachable, or no key is armed.",
            );
            item(
                &mut r,
                [bold("3")],
                "UNKNOWN: the state could not be determined.",
            );
        }
        "arm" => {
            item(&mut r, [bold("0")], "Every configured key is armed.");
            item(
                &mut r,
                [bold("1")],
                "Some key could not be armed (each is named with the reason), or another error.",
            );
        }
        "list" => {
            item(&mut r, [bold("0")], "At least one key is listed.");
            item(&mut r, [bold("1")], "No key may be used, or an error.");
        }
        "daemon" => {
            item(
                &mut r,
                [bold("0")],
                "Stopped by SIGTERM or SIGINT (the proxy socket is removed).",
            );
            item(&mut r, [bold("1")], "It could not start, or failed.");
        }
        "ca" => {
            item(&mut r, [bold("0")], "The CA public key line was printed.");
            item(
                &mut r,
                [bold("1")],
                "No certificate CA is configured ([certificates] ca), or another error.",
            );
        }
        "cert" => {
            item(
                &mut r,
                [bold("0")],
                "Your certificate for the key was printed.",
            );
            item(
                &mut r,
                [bold("1")],
                "There is none for you (the reason is printed): your groups do not allow the key, \
                 certificates are off for it, or it or the CA is not armed.",
            );
        }
        _ => {
            item(&mut r, [bold("0")], "Success.");
            item(&mut r, [bold("1")], "Failure, with a message saying why.");
        }
    }
    let mut pages = vec![("keyholder", "1")];
    match name {
        "arm" => pages.extend([("ssh-add", "1"), ("systemd-creds", "1")]),
        "daemon" => pages.extend([("ssh-agent", "1"), ("systemctl", "1")]),
        "list" => pages.extend([("ssh", "1")]),
        "ca" => pages.extend([("sshd_config", "5"), ("ssh-keygen", "1")]),
        "cert" => pages.extend([("ssh", "1"), ("ssh_config", "5")]),
        _ => {}
    }
    see_also(&mut r, &pages);
    r
}

/// `$SOURCE_DATE_EPOCH` as YYYY-MM-DD (UTC), or "" when it is not set.
fn source_date() -> Result<String> {
    let Some(epoch) = std::env::var_os("SOURCE_DATE_EPOCH") else {
        return Ok(String::new());
    };
    let secs: i64 = epoch
        .to_str()
        .and_then(|s| s.trim().parse().ok())
        .ok_or("SOURCE_DATE_EPOCH is not a number of seconds")?;
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    Ok(format!("{y:04}-{m:02}-{d:02}"))
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    // day is 1..=31 and month 1..=12 by construction.
    (year, month as u32, day as u32)
}

#[cfg(test)]
mod tests {
    use super::civil_from_days;

    #[test]
    fn known_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }
}
