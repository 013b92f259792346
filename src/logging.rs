//! Log output: syslog (facility authpriv, identity `keyholder`) or stderr.
//! The level is INFO unless `$KEYHOLDER_LOG_LEVEL` says otherwise
//! (`error`, `warn`, `info`, `debug`, `trace`).
//!
//! Lines are formatted by [`Line`]: on stderr `2026-12-02T01:02:03.456789Z
//!  INFO message`, on syslog the message alone (syslog stamps and ranks it).
//! Every granted sign writes one, before its signature goes back, so the
//! formatter is on the signing path: it writes whole runs of text, not a
//! character at a time, and formats the date once a second per thread.
//!
//! It must never let a logged value pose as a second line or drive a
//! terminal: control characters (C0 but tab, DEL, C1) are written escaped,
//! whatever the message (audit values are escaped before, by the audit
//! module; this is the floor for every line).

use std::cell::RefCell;
use std::fmt::{self, Write as _};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use crate::config::LogTarget;
use crate::error::{Error, Result};

/// A log field value (audit lines, grant events), printed bare when plain,
/// quoted and escaped otherwise, so that a value from a client or the user
/// database can never pose as another field or another line. `None` is `-`.
pub struct Value<'a>(pub Option<&'a str>);

impl fmt::Display for Value<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            None => f.write_str("-"),
            Some(v)
                if !v.is_empty()
                    && v.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"._-@:+/=,".contains(&b)) =>
            {
                f.write_str(v)
            }
            Some(v) => write!(f, "{v:?}"),
        }
    }
}

/// Installs the global logger. Call once.
pub fn init(target: LogTarget) -> Result<()> {
    let level = std::env::var("KEYHOLDER_LOG_LEVEL")
        .ok()
        .and_then(|l| l.parse::<LevelFilter>().ok())
        .unwrap_or(LevelFilter::INFO);
    let builder = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_ansi(false);
    let installed = match target {
        LogTarget::Stderr => builder
            .event_format(Line { stamped: true })
            .with_writer(std::io::stderr)
            .try_init(),
        LogTarget::Syslog => {
            let syslog = syslog_tracing::Syslog::new(
                c"keyholder",
                syslog_tracing::Options::LOG_PID,
                syslog_tracing::Facility::AuthPriv,
            )
            .ok_or_else(|| Error::msg("syslog logger already initialised"))?;
            builder
                .event_format(Line { stamped: false })
                .with_writer(syslog)
                .try_init()
        }
    };
    installed.map_err(|e| Error::msg(format!("cannot initialise logging: {e}")))
}

/// One log line: `TIME LEVEL message field=value…` when `stamped`, else
/// `message field=value…`.
#[derive(Debug, Clone, Copy)]
pub struct Line {
    pub stamped: bool,
}

impl<S, N> FormatEvent<S, N> for Line
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        if self.stamped {
            write_time(&mut writer, SystemTime::now())?;
            write!(writer, " {:>5} ", event.metadata().level().as_str())?;
        }
        let mut fields = Fields {
            out: Escaped(&mut writer),
            first: true,
            result: Ok(()),
        };
        event.record(&mut fields);
        fields.result?;
        writer.write_char('\n')
    }
}

/// Writes an event's fields: the message first as it is, the others as
/// ` name=value`.
struct Fields<'w, 'a> {
    out: Escaped<'w, 'a>,
    first: bool,
    result: fmt::Result,
}

impl Fields<'_, '_> {
    fn field(&mut self, field: &Field, value: fmt::Arguments<'_>) {
        if self.result.is_err() {
            return;
        }
        let sep = if self.first { "" } else { " " };
        self.first = false;
        self.result = if field.name() == "message" {
            self.out
                .0
                .write_str(sep)
                .and_then(|()| self.out.write_fmt(value))
        } else {
            self.out
                .0
                .write_fmt(format_args!("{sep}{}=", field.name()))
                .and_then(|()| self.out.write_fmt(value))
        };
    }
}

impl Visit for Fields<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.field(field, format_args!("{value}"));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.field(field, format_args!("{value:?}"));
    }
}

/// A writer that passes text through in runs and escapes the control
/// characters in it.
struct Escaped<'w, 'a>(&'w mut Writer<'a>);

impl fmt::Write for Escaped<'_, '_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut run = 0;
        for (i, c) in s.char_indices() {
            if is_control(c) {
                self.0.write_str(s.get(run..i).unwrap_or_default())?;
                write!(self.0, "\\x{:02x}", u32::from(c))?;
                run = i + c.len_utf8();
            }
        }
        self.0.write_str(s.get(run..).unwrap_or_default())
    }
}

/// C0 controls but tab, DEL and C1 controls: what can end a line or start
/// a terminal sequence.
fn is_control(c: char) -> bool {
    (c < ' ' && c != '\t') || ('\u{7f}'..='\u{9f}').contains(&c)
}

thread_local! {
    /// The last second formatted on this thread, and its text.
    static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

/// `2026-12-02T01:02:03.456789Z` (UTC, RFC 3339, microseconds).
fn write_time(w: &mut impl fmt::Write, now: SystemTime) -> fmt::Result {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    SECOND.with(|cached| {
        let mut cached = cached.borrow_mut();
        if cached.0 != secs {
            let text = &mut cached.1;
            text.clear();
            let (y, m, d) = civil(secs / 86_400);
            let t = secs % 86_400;
            let _ = write!(
                text,
                "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
                t / 3600,
                t / 60 % 60,
                t % 60
            );
            cached.0 = secs;
        }
        w.write_str(&cached.1)
    })?;
    write!(w, ".{:06}Z", since.subsec_micros())
}

/// The proleptic Gregorian date of `days` since 1970-01-01.
fn civil(days: u64) -> (u64, u64, u64) {
    // Days since 0000-03-01, in 400-year eras of 146097 days.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = era * 400 + yoe + u64::from(m <= 2);
    (y, m, d)
}

/// Log output captured for a test (a writer for tracing's subscriber).
#[cfg(test)]
#[derive(Clone, Default)]
pub(crate) struct Captured(pub std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

#[cfg(test)]
impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn time(secs: u64, micros: u32) -> String {
        let mut s = String::new();
        write_time(&mut s, UNIX_EPOCH + Duration::new(secs, micros * 1000)).unwrap();
        s
    }

    #[test]
    fn dates_are_rfc3339_utc_with_microseconds() {
        assert_eq!(time(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(time(951_782_400, 7), "2000-02-29T00:00:00.000007Z");
        assert_eq!(time(1_764_637_323, 456_789), "2025-12-02T01:02:03.456789Z");
        assert_eq!(time(4_107_542_399, 999_999), "2100-02-28T23:59:59.999999Z");
        assert_eq!(time(253_402_300_799, 0), "9999-12-31T23:59:59.000000Z");
        // The cached second is per thread and changes with the time.
        assert_eq!(time(1_764_637_323, 1), "2025-12-02T01:02:03.000001Z");
        assert_eq!(time(1_764_637_324, 1), "2025-12-02T01:02:04.000001Z");
    }

    #[test]
    fn every_day_of_four_centuries_follows_the_one_before() {
        let (mut y, mut m, mut d) = civil(0);
        assert_eq!((y, m, d), (1970, 1, 1));
        for days in 1..146_097 {
            let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
            let month_len = match m {
                2 if leap => 29,
                2 => 28,
                4 | 6 | 9 | 11 => 30,
                _ => 31,
            };
            (y, m, d) = if d < month_len {
                (y, m, d + 1)
            } else if m < 12 {
                (y, m + 1, 1)
            } else {
                (y + 1, 1, 1)
            };
            assert_eq!(civil(days), (y, m, d), "day {days}");
        }
    }

    /// What `emit` logs through [`Line`], as the subscriber writes it.
    fn logged(stamped: bool, emit: impl FnOnce()) -> String {
        let sink = Captured::default();
        let writer = sink.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .event_format(Line { stamped })
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, emit);
        let bytes = sink.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn a_line_is_time_level_message_and_fields_on_one_line() {
        let line = logged(true, || tracing::warn!(uid = 7, "closing\nuid={}", 1001));
        // 2026-12-02T01:02:03.456789Z  WARN closing\x0auid=1001 uid=7
        let (time, rest) = line.split_at(27);
        assert!(
            time.ends_with('Z') && time.as_bytes()[10] == b'T',
            "{line:?}"
        );
        assert_eq!(rest, "  WARN closing\\x0auid=1001 uid=7\n");
        let line = logged(true, || tracing::error!("x"));
        assert_eq!(&line[27..], " ERROR x\n");
        // syslog stamps and ranks lines itself
        let line = logged(
            false,
            || tracing::info!(target: "keyholder::audit", "sign user=a"),
        );
        assert_eq!(line, "sign user=a\n");
    }

    fn escaped(s: &str) -> String {
        let mut out = String::new();
        let mut w = Writer::new(&mut out);
        Escaped(&mut w).write_str(s).unwrap();
        out
    }

    #[test]
    fn control_characters_are_escaped_and_the_rest_passes_whole() {
        assert_eq!(escaped("plain text, tab\there"), "plain text, tab\there");
        assert_eq!(escaped("a\nb\r\n"), "a\\x0ab\\x0d\\x0a");
        assert_eq!(escaped("\x1b[31mred"), "\\x1b[31mred");
        assert_eq!(escaped("del\x7f c1\u{9b}x"), "del\\x7f c1\\x9bx");
        assert_eq!(escaped("ünïcødé ✓"), "ünïcødé ✓");
        assert_eq!(escaped(""), "");
    }
}
